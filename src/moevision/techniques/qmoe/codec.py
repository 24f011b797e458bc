"""QMoE's sub-1-bit dictionary code for ternary matrices, and a plain 2-bit packer.

Frantar & Alistarh 2023, "QMoE: Practical Sub-1-Bit Compression of Trillion-Parameter Models"
(arXiv 2310.16795); spec ``multimodal_compression_systems.md`` §1 B4 [V].

A ternary matrix holds codes ``t`` in {0: zero, 1: lo, 2: hi} (the values are per-row ``lo``/``hi``,
kept elsewhere). Weights are paired, ``sym = t[2i] + 3 * t[2i + 1]`` in 0..8 (an odd last weight is
paired with 0). A fixed dictionary of 65,536 codewords, each a run of 1..14 pair symbols, is built once
from an i.i.d. model (P(zero) = 0.885) by popping the most probable sequences from a max-heap; the set
is prefix-closed, so greedy longest-match parsing never fails. Every codeword is a 16-bit index.

Two layouts (an option; the decoders handle both):
- ``row`` (the spec): every row is parsed on its own and ``row_offsets`` (int32, R+1) are stored, which
  a warp-per-row GPU kernel needs for random access to rows.
- ``stream`` (this project's default): the whole matrix is one symbol stream (rows padded to an even
  width) and no offsets are stored. The decoders here decode whole matrices, so they need none; this
  saves the offsets and the partial last codeword of every row, which matters for narrow rows
  (128 weights: 0.25 bit/weight for the offsets alone).

Decoders: ``decode_reference`` (a Python loop over the dictionary's sequences, obviously correct),
``decode`` / ``decode_codes`` (vectorised torch: gather each codeword's 28 weight codes from an
expanded uint8 table and keep the 2 * length it fills) and ``decode_codes_packed`` (the same from the
spec's packed 2x32-bit decode table that a GPU kernel reads: length in bits 0..3 of both words, 7 pairs
of 4 bits in bits 4..31). No fused GPU decode-and-multiply kernel is provided.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ...errors import ConfigError

DICT_SIZE, MAX_PAIRS, P_ZERO = 65_536, 14, 0.885
LAYOUTS = ("stream", "row")


@dataclass(frozen=True)
class Dictionary:
    """The codeword table: ``pairs[i, :lens[i]]`` are codeword i's pair symbols (pop order)."""

    pairs: np.ndarray  # (N, MAX_PAIRS) uint8, zero padded
    lens: np.ndarray  # (N,) int64, 1..MAX_PAIRS
    log_probs: np.ndarray  # (N,) float64, log probability of each codeword under the i.i.d. model
    child: np.ndarray  # (N, 9) int64: id of codeword + one more symbol, -1 if absent
    root: np.ndarray  # (9,) int64: id of each one-symbol codeword
    table: np.ndarray  # (N, 2) int64: the packed decode table (see module docstring)

    def __len__(self) -> int:
        return len(self.lens)

    def sequence(self, i: int) -> tuple[int, ...]:
        return tuple(int(s) for s in self.pairs[i, : self.lens[i]])


@lru_cache(maxsize=16)
def build_dictionary(p_zero: float = P_ZERO, size: int = DICT_SIZE, max_pairs: int = MAX_PAIRS) -> Dictionary:
    """Heap construction of the spec (B4). A sequence's probability is p00^a p0x^b pxx^c for its counts
    of (zero, zero) pairs, mixed pairs and (nonzero, nonzero) pairs, so equal-probability sequences get
    bit-identical keys; ties are popped in insertion order (a global push counter).

    Same pop order as pushing all 9 extensions of every popped sequence, with fewer pushes: the
    extensions fall into 3 classes of equal probability (symbol 0; 1, 2, 3, 6; 4, 5, 7, 8) whose members
    pop in counter order, so each class enters the heap as its first member and the next member is
    pushed when one pops (its key and counter are what the full push would have given it)."""
    if not 0.0 < p_zero < 1.0:
        raise ConfigError(f"dictionary p_zero must be in (0, 1), got {p_zero}")
    if size > 2 ** 16:
        raise ConfigError(f"dictionary size must be <= 65536 (16-bit codewords), got {size}")
    if not 1 <= max_pairs <= MAX_PAIRS:
        raise ConfigError(f"dictionary max_pairs must be in [1, {MAX_PAIRS}] (the decode table's width), got {max_pairs}")
    p_nz = (1.0 - p_zero) / 2
    lp = (2 * math.log(p_zero), math.log(p_zero) + math.log(p_nz), 2 * math.log(p_nz))
    classes = ((0,), (1, 2, 3, 6), (4, 5, 7, 8))  # pair symbols by their number of nonzero weights
    heap: list = []  # (-log p, counter, parent index (-1: empty sequence), class, position in class)
    seqs: list[tuple[int, ...]] = []
    logps: list[float] = []
    counts: list[tuple[int, int, int]] = []
    next_counter = 1  # the empty sequence took counter 0

    def push_extensions(parent: int, cnt) -> None:
        nonlocal next_counter
        for k, syms in enumerate(classes):
            c = list(cnt)
            c[k] += 1
            heapq.heappush(heap, (-(c[0] * lp[0] + c[1] * lp[1] + c[2] * lp[2]), next_counter + syms[0], parent, k, 0))
        next_counter += 9

    push_extensions(-1, (0, 0, 0))
    while heap and len(seqs) < size:
        neg, counter, parent, k, j = heapq.heappop(heap)
        syms = classes[k]
        if j + 1 < len(syms):
            heapq.heappush(heap, (neg, counter - syms[j] + syms[j + 1], parent, k, j + 1))
        seq = (seqs[parent] if parent >= 0 else ()) + (syms[j],)
        c = list(counts[parent]) if parent >= 0 else [0, 0, 0]
        c[k] += 1
        seqs.append(seq)
        logps.append(-neg)
        counts.append((c[0], c[1], c[2]))
        if len(seq) < max_pairs:
            push_extensions(len(seqs) - 1, c)
    n = len(seqs)
    pairs = np.zeros((n, MAX_PAIRS), np.uint8)
    lens = np.array([len(s) for s in seqs], np.int64)
    index = {}
    for i, s in enumerate(seqs):
        pairs[i, : len(s)] = s
        index[s] = i
    child = np.full((n, 9), -1, np.int64)
    root = np.full(9, -1, np.int64)
    for i, s in enumerate(seqs):
        if len(s) == 1:
            root[s[0]] = i
        else:
            child[index[s[:-1]], s[-1]] = i  # the parent exists: the set is prefix-closed
    return Dictionary(pairs, lens, np.array(logps), child, root, _pack_table(pairs, lens))


def _pack_table(pairs: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Two 32-bit words per codeword: word h holds pairs 7h..7h+6 as 4-bit nibbles in bits 4..31
    (low 2 bits = the pair's first weight's code, high 2 bits = the second's) and the length in bits 0..3."""
    nib = (pairs % 3).astype(np.int64) | ((pairs // 3).astype(np.int64) << 2)  # (N, 14)
    nib[np.arange(pairs.shape[1])[None, :] >= lens[:, None]] = 0
    shifts = 4 + 4 * np.arange(7, dtype=np.int64)
    words = [(nib[:, 7 * h: 7 * h + 7] << shifts).sum(1) | lens for h in range(2)]
    return np.stack(words, 1)


# -- symbols -------------------------------------------------------------------------------------
def to_pair_symbols(t_RC: np.ndarray) -> np.ndarray:
    """(R, C) ternary codes -> (R, ceil(C / 2)) pair symbols (odd width: last weight paired with 0)."""
    t = np.asarray(t_RC, dtype=np.int64)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D matrix of ternary codes, got shape {t.shape}")
    if t.size and (t.min() < 0 or t.max() > 2):
        raise ValueError("ternary codes must be in {0, 1, 2}")
    if t.shape[1] % 2:
        t = np.concatenate([t, np.zeros((t.shape[0], 1), np.int64)], 1)
    return t[:, 0::2] + 3 * t[:, 1::2]


def greedy_parse(sym_BL: np.ndarray, d: Dictionary) -> list[np.ndarray]:
    """Greedy longest match of each of B symbol streams (vectorised over streams, a loop over
    positions): walk the trie; when the next symbol is no child of the current node, emit the node and
    restart from the root with that symbol; emit the last node at the end."""
    B, L = sym_BL.shape
    if L == 0:
        return [np.zeros(0, np.int64) for _ in range(B)]
    out = np.zeros((B, L), np.int64)
    count = np.zeros(B, np.int64)
    rows = np.arange(B)
    node = d.root[sym_BL[:, 0]]
    for j in range(1, L):
        s = sym_BL[:, j]
        nxt = d.child[node, s]
        emit = nxt < 0
        if emit.any():
            r = rows[emit]
            out[r, count[r]] = node[r]
            count[r] += 1
            nxt = np.where(emit, d.root[s], nxt)
        node = nxt
    out[rows, count] = node
    count += 1
    return [out[b, : count[b]] for b in range(B)]


@dataclass
class EncodedTernary:
    """One ternary matrix's code: ``codes`` (int16 holding uint16 ids) and, for ``row`` layout,
    ``row_offsets`` (int32, R+1; row r's codewords are ``codes[row_offsets[r]:row_offsets[r+1]]``)."""

    codes: torch.Tensor
    shape: tuple[int, int]
    row_offsets: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        extra = self.row_offsets.numel() * 4 if self.row_offsets is not None else 0
        return self.codes.numel() * 2 + extra


def encode(t_RC, *, layout: str = "stream", dictionary: Dictionary | None = None) -> EncodedTernary:
    """Encode an (R, C) matrix of ternary codes (numpy or torch, values 0/1/2)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"codec layout must be one of {LAYOUTS}, got {layout!r}")
    d = dictionary or build_dictionary()
    t = t_RC.cpu().numpy() if isinstance(t_RC, torch.Tensor) else np.asarray(t_RC)
    sym = to_pair_symbols(t)
    R = sym.shape[0]
    if layout == "row":
        parts = greedy_parse(sym, d)
        offs = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
        codes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        row_offsets = torch.from_numpy(offs)
    else:
        codes = greedy_parse(sym.reshape(1, -1), d)[0] if R else np.zeros(0, np.int64)
        row_offsets = None
    return EncodedTernary(torch.from_numpy(codes.astype(np.uint16).view(np.int16).copy()), tuple(t.shape), row_offsets)


def decode_reference(enc: EncodedTernary, dictionary: Dictionary | None = None) -> torch.Tensor:
    """The plain decoder: look every codeword's pair sequence up and unpair it. (R, C) int64."""
    d = dictionary or build_dictionary()
    R, C = enc.shape
    weights: list[int] = []
    for c in enc.codes.tolist():
        for s in d.sequence(c & 0xFFFF):
            weights += [s % 3, s // 3]
    P = (C + 1) // 2
    if len(weights) != R * 2 * P:
        raise ValueError(f"code decodes to {len(weights)} weights, expected {R * 2 * P}")
    return torch.tensor(weights, dtype=torch.int64).view(R, 2 * P)[:, :C]


_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _tables_on(device: torch.device, d: Dictionary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per device: the packed table (N, 2) int64, and the expanded one: (N, 28) uint8 weight codes with
    its (N, 28) bool mask of the positions a codeword fills (2 * length)."""
    key = (str(device), id(d))
    if key not in _TABLES:
        pairs = torch.from_numpy(d.pairs.astype(np.int64))
        weights = torch.stack([pairs % 3, pairs // 3], -1).view(len(d), 2 * MAX_PAIRS).to(torch.uint8)
        fills = torch.arange(2 * MAX_PAIRS) < 2 * torch.from_numpy(d.lens).unsqueeze(1)
        _TABLES[key] = (torch.from_numpy(d.table).to(device), weights.to(device), fills.to(device))
    return _TABLES[key]


def _check(flat: torch.Tensor, num_weights: int) -> torch.Tensor:
    if flat.numel() != num_weights:
        raise ValueError(f"code decodes to {flat.numel()} weights, expected {num_weights}")
    return flat.long()


def decode_codes(codes: torch.Tensor, num_weights: int, *, dictionary: Dictionary | None = None) -> torch.Tensor:
    """The fast decoder: a run of codewords -> ``num_weights`` ternary codes (int64, on the codes'
    device), by gathering each codeword's 28 weight codes from the expanded table and keeping the
    2 * length it fills (one index_select, one masked_select)."""
    d = dictionary or build_dictionary()
    _, weights, fills = _tables_on(codes.device, d)
    idx = codes.long() & 0xFFFF
    return _check(torch.masked_select(weights.index_select(0, idx), fills.index_select(0, idx)), num_weights)


def decode_codes_packed(codes: torch.Tensor, num_weights: int, *, dictionary: Dictionary | None = None) -> torch.Tensor:
    """The same from the spec's packed 2 x 32-bit table (what a GPU kernel reads): unpack the length
    and the 28 2-bit fields with shifts and masks. Slower in torch; kept to test the table format."""
    d = dictionary or build_dictionary()
    words = _tables_on(codes.device, d)[0][codes.long() & 0xFFFF]  # (n, 2)
    lens = words[:, 0] & 0xF
    shifts = 4 + 4 * torch.arange(7, device=codes.device)
    nib = ((words.unsqueeze(-1) >> shifts) & 0xF).view(-1, MAX_PAIRS)  # (n, 14) pair nibbles
    t = torch.stack([nib & 3, nib >> 2], -1).view(-1, 2 * MAX_PAIRS)  # (n, 28) weight codes
    keep = torch.arange(2 * MAX_PAIRS, device=codes.device) < 2 * lens.unsqueeze(1)
    return _check(t[keep], num_weights)


def decode(enc: EncodedTernary, dictionary: Dictionary | None = None) -> torch.Tensor:
    """The fast decoder (either layout: rows are contiguous in the code). (R, C) int64."""
    R, C = enc.shape
    P = (C + 1) // 2
    return decode_codes(enc.codes, R * 2 * P, dictionary=dictionary).view(R, 2 * P)[:, :C]


# -- 2-bit ---------------------------------------------------------------------------------------
def pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """Integers in 0..3 -> uint8, four per byte (first value in the low bits); zero padded."""
    flat = q.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 4)
    return flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)


def unpack_2bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_2bit`` along the last axis (leading axes kept): (..., numel) int64."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 3).reshape(*packed.shape[:-1], -1)[..., :numel].long()


def entropy_bits(p_zero: float) -> float:
    """Entropy per weight of the i.i.d. ternary model (P(lo) = P(hi)): the rate bound of any code."""
    p = (1 - p_zero) / 2
    return -(p_zero * math.log2(p_zero) + 2 * p * math.log2(p))
