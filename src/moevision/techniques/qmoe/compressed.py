"""``CompressedExperts``: a drop-in for ``moe.experts.Experts`` that keeps QMoE codes and decodes the
weights of the experts a forward pass needs, at run time (QMoE, Frantar & Alistarh 2023; spec §1 B4).

It keeps the forward contract the dispatch implementations use (``forward_expert``,
``forward_sorted``, ``forward_padded``; ``grouped_mm_ok`` is False, so ``grouped`` falls back to
``sorted``); ``w1``/``w2``/``w3`` read as the decoded stacked weights for code that reads them. ``forward_sorted`` decodes only the experts that received tokens (the spec's "only execute
experts that received >= 1 token"). Decoded weights are dropped after the call unless ``cache_size``
> 0, which keeps that many experts' decoded weights (least recently used out).

Stored per projection ``p`` in (w1, w2, w3), in ``nn.Linear`` layout (rows = outputs):
- ternary: ``{p}_codes`` (int16 holding 16-bit codeword ids, all experts concatenated),
  ``{p}_code_offsets`` (int64, E+1), ``{p}_row_offsets`` (int32, E x (R+1), ``row`` layout only),
  ``{p}_grid`` (E, R, 2) per-row (lo, hi);
- 2-bit: ``{p}_packed`` (uint8, E x ceil(R*C/4)), ``{p}_grid`` (E, R, 2) per-row (scale, zero);
- ``b1``, ``b2``: the biases (``bias_dtype``).

Shape legend: E experts, D width, F hidden, R rows, C columns, N tokens of one expert.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...moe.experts import ACTIVATIONS, Experts
from . import codec
from .gptq import dequantize


@dataclass
class ProjectionSpec:
    """How one projection (w1/w2/w3) is stored: grid, codec layout and dictionary."""

    bits: str  # "ternary" | "2bit"
    rows: int
    cols: int
    layout: str = "stream"
    p_zero: float = codec.P_ZERO

    def to_dict(self) -> dict:
        return dict(bits=self.bits, rows=self.rows, cols=self.cols, layout=self.layout, p_zero=self.p_zero)


def _projections(swiglu: bool) -> tuple[str, ...]:
    return ("w1", "w2", "w3") if swiglu else ("w1", "w2")


class CompressedExperts(nn.Module):
    """E experts with compressed weight matrices (buffers only: nothing here is trainable)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, specs: dict[str, ProjectionSpec], *,
                 activation: str = "gelu", bias: bool = True, cache_size: int = 0):
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.has_bias = activation, bias
        self.swiglu = activation == "swiglu"
        self.act = F.silu if self.swiglu else ACTIVATIONS[activation]
        self.specs = specs
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        self.decode_calls = 0  # experts decoded so far (for tests and overhead accounting)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, experts: Experts, codes: dict[str, torch.Tensor], grids: dict[str, torch.Tensor],
                   bits: str, *, layout: str = "stream", p_zero: dict[str, float] | float = codec.P_ZERO,
                   scale_dtype: torch.dtype = torch.bfloat16, bias_dtype: torch.dtype = torch.bfloat16,
                   cache_size: int = 0) -> "CompressedExperts":
        """Encode integer codes (E, R, C) per projection (``nn.Linear`` layout) with their grids."""
        specs, buffers = {}, {}
        for p in _projections(experts.swiglu):
            c, g = codes[p], grids[p]
            E, R, C = c.shape
            pz = p_zero[p] if isinstance(p_zero, dict) else p_zero
            specs[p] = ProjectionSpec(bits, R, C, layout, pz)
            buffers[f"{p}_grid"] = g.to(scale_dtype)
            if bits == "ternary":
                d = codec.build_dictionary(pz)
                encs = [codec.encode(c[e], layout=layout, dictionary=d) for e in range(E)]
                lens = torch.tensor([0] + [x.codes.numel() for x in encs]).cumsum(0)
                buffers[f"{p}_codes"] = torch.cat([x.codes for x in encs])
                buffers[f"{p}_code_offsets"] = lens
                if layout == "row":
                    buffers[f"{p}_row_offsets"] = torch.stack([x.row_offsets for x in encs])
            else:
                buffers[f"{p}_packed"] = torch.stack([codec.pack_2bit(c[e]) for e in range(E)])
        if experts.has_bias:
            buffers["b1"] = experts.b1.detach().to(bias_dtype)
            buffers["b2"] = experts.b2.detach().to(bias_dtype)
        m = cls(experts.num_experts, experts.dim, experts.hidden_dim, specs, activation=experts.activation,
                bias=experts.has_bias, cache_size=cache_size)
        for k, v in buffers.items():
            m.register_buffer(k, v.detach().cpu().contiguous())
        return m.to(experts.w1.device)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str, meta: dict, *,
                   cache_size: int = 0) -> "CompressedExperts":
        """Rebuild from a checkpoint's tensors (``prefix`` = "blocks.1.mlp.experts.") and the layer's
        metadata written by ``describe``."""
        specs = {p: ProjectionSpec(**s) for p, s in meta["projections"].items()}
        m = cls(meta["num_experts"], meta["dim"], meta["hidden_dim"], specs, activation=meta["activation"],
                bias=meta["bias"], cache_size=cache_size)
        for name, shape in m.expected_buffers().items():
            if prefix + name not in state:
                raise KeyError(f"{prefix}{name} is missing")
            v = state[prefix + name]
            if shape is not None and tuple(v.shape) != shape:
                raise ValueError(f"{prefix}{name} has shape {tuple(v.shape)}, expected {shape}")
            m.register_buffer(name, v)
        return m

    def expected_buffers(self) -> dict[str, tuple | None]:
        """Stored tensor names and shapes (None: the code's length, known from the file)."""
        E, out = self.num_experts, {}
        for p, s in self.specs.items():
            out[f"{p}_grid"] = (E, s.rows, 2)
            if s.bits == "ternary":
                out[f"{p}_codes"] = None
                out[f"{p}_code_offsets"] = (E + 1,)
                if s.layout == "row":
                    out[f"{p}_row_offsets"] = (E, s.rows + 1)
            else:
                out[f"{p}_packed"] = (E, (s.rows * s.cols + 3) // 4)
        if self.has_bias:
            out["b1"], out["b2"] = (E, self.hidden_dim), (E, self.dim)
        return out

    def describe(self) -> dict:
        return dict(num_experts=self.num_experts, dim=self.dim, hidden_dim=self.hidden_dim,
                    activation=self.activation, bias=self.has_bias,
                    projections={p: s.to_dict() for p, s in self.specs.items()})

    def extra_repr(self) -> str:
        bits = {s.bits for s in self.specs.values()}
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"bits={'/'.join(sorted(bits))}, cache_size={self.cache_size}")

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # decoded weights follow the codes' device/dtype on the next call
        return super()._apply(fn, *args, **kwargs)

    def storage_bytes(self) -> int:
        """Bytes of everything stored for these experts (codes, offsets, grids, biases)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # -- decoding --------------------------------------------------------------------------------
    def _decode_projection(self, p: str, ids: list[int]) -> torch.Tensor:
        s = self.specs[p]
        R, C = s.rows, s.cols
        grid = getattr(self, f"{p}_grid")[ids]
        if s.bits == "ternary":
            offs = getattr(self, f"{p}_code_offsets").tolist()  # E+1 numbers: one small host read
            codes = getattr(self, f"{p}_codes")
            if ids == list(range(ids[0], ids[-1] + 1)):  # consecutive experts: one slice, no copy
                run = codes[offs[ids[0]]:offs[ids[-1] + 1]]
            else:
                run = torch.cat([codes[offs[e]:offs[e + 1]] for e in ids])
            P = (C + 1) // 2
            t = codec.decode_codes(run, len(ids) * R * 2 * P,
                                   dictionary=codec.build_dictionary(s.p_zero)).view(len(ids), R, 2 * P)[..., :C]
        else:
            packed = getattr(self, f"{p}_packed")[ids]
            t = codec.unpack_2bit(packed, R * C).view(len(ids), R, C)
        return dequantize(t, grid, s.bits)

    def decoded(self, ids: list[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Decoded (k, R, C) weights of experts ``ids`` per projection, through the LRU cache."""
        if self.cache_size == 0:  # decode straight into the stacked tensors the forward needs
            self.decode_calls += len(ids)
            return {p: self._decode_projection(p, ids).to(dtype) for p in self.specs}
        missing = [e for e in ids if e not in self._cache]
        if missing:
            fresh = {p: self._decode_projection(p, missing) for p in self.specs}
            self.decode_calls += len(missing)
            for j, e in enumerate(missing):
                self._cache[e] = {p: w[j] for p, w in fresh.items()}
        out = {p: torch.stack([self._cache[e][p] for e in ids]).to(dtype) for p in self.specs}
        for e in ids:
            self._cache.move_to_end(e)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def dequantized_experts(self) -> Experts:
        """An ordinary ``Experts`` holding the decoded weights (fp32) - the oracle of the tests."""
        ex = Experts(self.num_experts, self.dim, self.hidden_dim, activation=self.activation, bias=self.has_bias)
        w = self.decoded(list(range(self.num_experts)), torch.float32)
        with torch.no_grad():
            for p in self.specs:
                getattr(ex, p).copy_(w[p].transpose(1, 2))
            if self.has_bias:
                ex.b1.copy_(self.b1.float())
                ex.b2.copy_(self.b2.float())
        return ex.to(self.w1_grid.device)

    # -- the Experts forward contract --------------------------------------------------------------
    def _mlp(self, x: torch.Tensor, w: dict[str, torch.Tensor], j: int, e: int) -> torch.Tensor:
        b1 = self.b1[e].to(x.dtype) if self.has_bias else None
        h = F.linear(x, w["w1"][j], b1)
        h = self.act(h) * F.linear(x, w["w3"][j]) if self.swiglu else self.act(h)
        return F.linear(h, w["w2"][j], self.b2[e].to(x.dtype) if self.has_bias else None)

    def forward_expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        return self._mlp(x_ND, self.decoded([e], x_ND.dtype), 0, e)

    def forward_sorted(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        used = [e for e, n in enumerate(counts) if n]
        w = self.decoded(used, x_ND.dtype)
        chunks = torch.split(x_ND, counts)
        outs = [self._mlp(chunks[e], w, j, e) for j, e in enumerate(used)]
        return torch.cat(outs) if outs else x_ND.new_zeros(0, self.dim)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        w = self.decoded(list(range(self.num_experts)), x_ECD.dtype)
        h = torch.bmm(x_ECD, w["w1"].transpose(1, 2))
        if self.has_bias:
            h = h + self.b1.to(x_ECD.dtype).unsqueeze(1)
        h = self.act(h) * torch.bmm(x_ECD, w["w3"].transpose(1, 2)) if self.swiglu else self.act(h)
        y = torch.bmm(h, w["w2"].transpose(1, 2))
        return y + self.b2.to(x_ECD.dtype).unsqueeze(1) if self.has_bias else y

    def grouped_mm_ok(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
        return False  # dispatch "grouped" (and automatic choice) falls back to "sorted"

    # -- code that reads the stacked weights directly gets them decoded (every expert, fp32) -------
    def _stacked(self, p: str) -> torch.Tensor:
        if p not in self.specs:
            raise AttributeError(p)
        return self.decoded(list(range(self.num_experts)), torch.float32)[p].transpose(1, 2)

    w1 = property(lambda self: self._stacked("w1"), doc="decoded (E, D, F)")
    w2 = property(lambda self: self._stacked("w2"), doc="decoded (E, F, D)")
    w3 = property(lambda self: self._stacked("w3"), doc="decoded (E, D, F), SwiGLU only")
