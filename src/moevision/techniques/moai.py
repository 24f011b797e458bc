"""MoAI: Mixture of All Intelligence (Lee et al., "MoAI: Mixture of All Intelligence for Large Language and
Vision Models", 2024), as specified in multimodal_compression_systems.md §8 ([V]: read in the official code).

External computer-vision models (panoptic segmentation, open-world detection, scene graphs, OCR) describe the
image; their outputs are *verbalised* to text, embedded, compressed by the **MoAI-Compressor** into a fixed
number of tokens A, and injected into a frozen language model by **MoAI-Mixer** blocks.

- ``MoAICompressor``: a Perceiver resampler. L learnable latents (64 in the paper); ``depth`` layers of
  multi-head attention whose queries are the (normed) latents and whose keys/values are the concatenation of
  the (normed) auxiliary tokens and latents, then an FFN (LayerNorm -> Linear -> GELU -> Linear, width
  multiplier 1), both residual; a final LayerNorm. Output A: (B, L, D).
- ``LoRAAttention``: one mixer expert. q, k, v and o are each a rank-r factorised linear (D -> r -> D) with a
  GELU after each of q, k, v and after o; ``heads`` heads; softmax(Q K^T / sqrt(d_h)) V with no causal mask;
  output = query + o(attention).
- ``MoAIMixer``: splits the hidden states entering a layer into image tokens I and language tokens L (masks)
  and runs six experts - visual: CA(I<-A), CA(I<-L), SA(I); language: CA(L<-A), CA(L<-I), SA(L). Per token,
  gates ``w_I = softmax(Linear_{D->3}(I))`` and ``w_L = softmax(Linear_{D->3}(L))`` mix them,
  ``I' = sum_j w_I,j E^I_j`` (likewise L'), written back at their positions; other tokens (padding, text
  outside both masks) pass unchanged. ``mode="random"`` is training step 1: each forward uses one uniformly
  random expert per side (the experts train independently); ``mode="soft"`` is step 2, the gated mixture.
- ``attach_mixers``: mixers in the layers i with (i + 1) % every == 0 (every = 8 in the paper: layers 7, 15,
  23, 31 of 32) of ``models.vlm.VisionLanguageModel``, applied to the hidden states entering the layer, with
  the compressed tokens given per forward (``MoAIHandle.set_aux``). Only the compressor, the latents and the
  mixers are meant to train (``MoAIHandle.trainable_parameters``); the language model stays frozen.
- ``verbalize``: the CPU miniature's "CV experts" on ShapeWorld scenes: the ground-truth object list (an
  exact detector) or a noisy one (each object dropped or its colour/shape flipped with a probability),
  written as a whitespace-tokenised "human string".

Shape legend: B batch, N sequence, D width, M auxiliary tokens, L latents, r rank, H heads, Dh head width.

Deviations and choices:
- The mixer acts on a layer's *input* hidden states (the residual stream, before the layer's own norm and
  attention); the official code applies it to the states the layer's attention receives. Where exactly it
  sits inside InternLM2's layer is not part of this library's LM, which has a pre-norm decoder.
- An expert whose key set is empty for a sample (e.g. CA(I<-L) with no language token) returns its query
  unchanged (o is skipped), instead of attending over nothing.
- Every expert is computed for all N positions with key masks and the result is selected by the masks: the
  same per-token function as gathering I and L first (a token's output depends only on its own query), at
  twice the work; fine at the miniature's scale.
- ``zero_init_o`` (default True): o's up-projection starts at 0, so GELU(o(.)) = 0 and a fresh mixer is the
  identity (each expert returns its query, and the gates sum to 1). The official initialisation is not in
  the spec ([R]); with it off o is initialised like the other projections.
- The compressor's width equals the language model's (as in the paper: 4096 both); ``aux_dim`` adds an input
  projection when the auxiliary tokens come in another width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

EXPERTS_I = ("CA(I<-A)", "CA(I<-L)", "SA(I)")
EXPERTS_L = ("CA(L<-A)", "CA(L<-I)", "SA(L)")
MODES = ("soft", "random")


def _pos(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return v


@dataclass
class MoAIConfig:
    """Sizes (defaults: the paper's, for a width-4096 LM; the CPU miniature shrinks them)."""

    dim: int
    num_latents: int = 64
    compressor_depth: int = 4
    compressor_heads: int = 4
    compressor_head_dim: int = 64
    compressor_ff_mult: int = 1
    aux_dim: int | None = None
    rank: int = 64
    mixer_heads: int = 4
    every: int = 8
    mode: str = "soft"
    zero_init_o: bool = True

    def __post_init__(self):
        for n in ("dim", "num_latents", "compressor_depth", "compressor_heads", "compressor_head_dim",
                  "compressor_ff_mult", "rank", "mixer_heads", "every"):
            _pos(n, getattr(self, n))
        if self.aux_dim is not None:
            _pos("aux_dim", self.aux_dim)
        if self.dim % self.mixer_heads:
            raise ConfigError(f"dim={self.dim} must be divisible by mixer_heads={self.mixer_heads}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")


# ------------------------------------------------------------------------------------------------ compressor

class _PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_aux, self.norm_lat = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult), nn.GELU(),
                                nn.Linear(dim * ff_mult, dim))

    def forward(self, aux_BMD: torch.Tensor, lat_BLD: torch.Tensor, aux_mask_BM: torch.Tensor | None):
        B, L, _ = lat_BLD.shape
        a, lat = self.norm_aux(aux_BMD), self.norm_lat(lat_BLD)
        kv_in = torch.cat([a, lat], dim=1)  # keys/values over the auxiliary tokens and the latents
        q = self.to_q(lat).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(kv_in).view(B, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if aux_mask_BM is not None:  # latents are always valid keys
            keep = torch.cat([aux_mask_BM.bool(), aux_mask_BM.new_ones(B, L, dtype=torch.bool)], dim=1)
            mask = keep[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        lat_BLD = lat_BLD + self.to_out(o.transpose(1, 2).reshape(B, L, -1))
        return lat_BLD + self.ff(lat_BLD)


class MoAICompressor(nn.Module):
    """Perceiver resampler: auxiliary tokens (B, M, aux_dim or D) -> A (B, L, D)."""

    def __init__(self, cfg: MoAIConfig):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.dim) * 0.02)
        self.proj = nn.Linear(cfg.aux_dim, cfg.dim) if cfg.aux_dim and cfg.aux_dim != cfg.dim else None
        self.layers = nn.ModuleList(_PerceiverLayer(cfg.dim, cfg.compressor_heads, cfg.compressor_head_dim,
                                                    cfg.compressor_ff_mult) for _ in range(cfg.compressor_depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, aux_BMX: torch.Tensor, aux_mask_BM: torch.Tensor | None = None) -> torch.Tensor:
        want = self.cfg.aux_dim or self.cfg.dim
        if aux_BMX.dim() != 3 or aux_BMX.shape[-1] != want:
            raise ValueError(f"auxiliary tokens must be (B, M, {want}), got {tuple(aux_BMX.shape)}")
        if aux_mask_BM is not None and tuple(aux_mask_BM.shape) != tuple(aux_BMX.shape[:2]):
            raise ValueError(f"aux_mask must be (B, M) = {tuple(aux_BMX.shape[:2])}, got {tuple(aux_mask_BM.shape)}")
        x = self.proj(aux_BMX) if self.proj is not None else aux_BMX
        lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            lat = layer(x, lat, aux_mask_BM)
        return self.norm(lat)


# ------------------------------------------------------------------------------------------------- mixer

class _LowRank(nn.Sequential):
    def __init__(self, dim: int, rank: int):
        super().__init__(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))


class LoRAAttention(nn.Module):
    """One MoAI-Mixer expert: out = query + GELU(o(softmax(GELU(q) GELU(k)^T / sqrt(Dh)) GELU(v)))."""

    def __init__(self, dim: int, rank: int, heads: int, zero_init_o: bool = True):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (_LowRank(dim, rank) for _ in range(4))
        if zero_init_o:
            nn.init.zeros_(self.o[1].weight)
            nn.init.zeros_(self.o[1].bias)

    def forward(self, query_BND: torch.Tensor, keys_BMD: torch.Tensor, key_mask_BM: torch.Tensor | None = None):
        B, N, D = query_BND.shape
        M = keys_BMD.shape[1]

        def heads(t, n):
            return F.gelu(t).view(B, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(query_BND), N), heads(self.k(keys_BMD), M), heads(self.v(keys_BMD), M)
        if key_mask_BM is None:
            att = F.scaled_dot_product_attention(q, k, v)
            return query_BND + F.gelu(self.o(att.transpose(1, 2).reshape(B, N, D)))
        keep = key_mask_BM.bool()
        any_key = keep.any(dim=1)  # (B,) samples with at least one key
        # a sample with no key attends over all keys (finite) and its update is then dropped
        safe = keep | ~any_key[:, None]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None, None, :])
        upd = F.gelu(self.o(att.transpose(1, 2).reshape(B, N, D)))
        return query_BND + upd * any_key[:, None, None].to(upd.dtype)


@dataclass
class MixerInfo:
    """What one mixer did: per-token gates (B, N, 3) for each side (zeros where the token is not on that
    side) and, in random mode, the expert chosen per side."""

    gates_I: torch.Tensor
    gates_L: torch.Tensor
    choice: tuple[int, int] | None


class MoAIMixer(nn.Module):
    """Six LoRA-attention experts mixed per token by two gates (see the module docstring)."""

    def __init__(self, cfg: MoAIConfig):
        super().__init__()
        self.cfg = cfg
        self.mode = cfg.mode
        self.experts_I = nn.ModuleList(LoRAAttention(cfg.dim, cfg.rank, cfg.mixer_heads, cfg.zero_init_o)
                                       for _ in EXPERTS_I)
        self.experts_L = nn.ModuleList(LoRAAttention(cfg.dim, cfg.rank, cfg.mixer_heads, cfg.zero_init_o)
                                       for _ in EXPERTS_L)
        self.gate_I, self.gate_L = nn.Linear(cfg.dim, 3), nn.Linear(cfg.dim, 3)
        self.last: MixerInfo | None = None

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, h_BND: torch.Tensor, image_BN: torch.Tensor, lang_BN: torch.Tensor, aux_BLD: torch.Tensor,
                aux_mask_BL: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        B, N, D = h_BND.shape
        if tuple(image_BN.shape) != (B, N) or tuple(lang_BN.shape) != (B, N):
            raise ValueError(f"image/language masks must be (B, N) = {(B, N)}, got {tuple(image_BN.shape)} and "
                             f"{tuple(lang_BN.shape)}")
        if aux_BLD.dim() != 3 or aux_BLD.shape[0] != B or aux_BLD.shape[2] != D:
            raise ValueError(f"aux tokens must be (B={B}, L, D={D}), got {tuple(aux_BLD.shape)}")
        img, lang = image_BN.bool(), lang_BN.bool()
        if bool((img & lang).any()):
            raise ValueError("a token cannot be both an image and a language token")
        keys = {"A": (aux_BLD, aux_mask_BL), "I": (h_BND, img), "L": (h_BND, lang)}
        plan_I = (("A", self.experts_I[0]), ("L", self.experts_I[1]), ("I", self.experts_I[2]))
        plan_L = (("A", self.experts_L[0]), ("I", self.experts_L[1]), ("L", self.experts_L[2]))
        w_I = torch.softmax(self.gate_I(h_BND), dim=-1)
        w_L = torch.softmax(self.gate_L(h_BND), dim=-1)
        choice = None
        if self.mode == "random":  # step 1: one uniformly random expert per side for this forward
            ci, cl = (int(c) for c in torch.randint(0, 3, (2,), generator=generator))
            choice = (ci, cl)
            w_I = F.one_hot(torch.full((B, N), ci, device=h_BND.device), 3).to(h_BND.dtype)
            w_L = F.one_hot(torch.full((B, N), cl, device=h_BND.device), 3).to(h_BND.dtype)

        def mix(plan, w):
            out = torch.zeros_like(h_BND)
            for j, (src, expert) in enumerate(plan):
                if self.mode == "random" and float(w[0, 0, j]) == 0.0:
                    continue  # the expert not chosen this step is not run
                k, m = keys[src]
                out = out + w[..., j:j + 1] * expert(h_BND, k, m)
            return out

        new_I, new_L = mix(plan_I, w_I), mix(plan_L, w_L)
        out = torch.where(img[..., None], new_I, torch.where(lang[..., None], new_L, h_BND))
        zero = torch.zeros_like(w_I)
        self.last = MixerInfo(gates_I=torch.where(img[..., None], w_I, zero).detach(),
                              gates_L=torch.where(lang[..., None], w_L, zero).detach(), choice=choice)
        return out


# -------------------------------------------------------------------------------------- wiring into a VLM

class MoAIHandle(nn.Module):
    """The compressor and the mixers attached to a ``VisionLanguageModel`` (``attach_mixers``)."""

    def __init__(self, cfg: MoAIConfig, layer_ids: list[int]):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = layer_ids
        self.compressor = MoAICompressor(cfg)
        self.mixers = nn.ModuleDict({str(i): MoAIMixer(cfg) for i in layer_ids})
        self._aux: torch.Tensor | None = None
        self._hooks: list = []

    def set_aux(self, aux_tokens_BMX: torch.Tensor | None, aux_mask_BM: torch.Tensor | None = None) -> None:
        """Compress the auxiliary tokens for the next forward(s) of the model (None: mixers pass through)."""
        self._aux = None if aux_tokens_BMX is None else self.compressor(aux_tokens_BMX, aux_mask_BM)

    def set_mode(self, mode: str) -> None:
        for m in self.mixers.values():
            m.set_mode(mode)

    def trainable_parameters(self):
        return list(self.parameters())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def mixer_layers(depth: int, every: int) -> list[int]:
    """Layers i with (i + 1) % every == 0 (every=8, depth=32: 7, 15, 23, 31)."""
    return [i for i in range(depth) if (i + 1) % every == 0]


def attach_mixers(model, cfg: MoAIConfig, freeze_model: bool = True) -> MoAIHandle:
    """Put MoAI-Mixers in front of the layers i with (i + 1) % cfg.every == 0 of a ``VisionLanguageModel``
    (forward pre-hooks on its decoder layers: the layer's input hidden states are mixed, image tokens by
    ``is_image``, language tokens = the other valid positions). The returned handle holds the compressor
    and the mixers (register it on the model or train it alongside); call ``handle.set_aux(tokens)``
    before each forward. ``freeze_model``: the language model's own parameters stop needing grad."""
    layers = getattr(model, "layers", None)
    if layers is None or not len(layers):
        raise ConfigError("attach_mixers needs a model with a non-empty .layers (a VisionLanguageModel)")
    width = model.config.dim
    if cfg.dim != width:
        raise ConfigError(f"MoAIConfig.dim={cfg.dim} must equal the model's width {width}")
    ids = mixer_layers(len(layers), cfg.every)
    if not ids:
        raise ConfigError(f"every={cfg.every} places no mixer in a {len(layers)}-layer model")
    handle = MoAIHandle(cfg, ids)
    if freeze_model:
        for p in model.parameters():
            p.requires_grad_(False)

    def hook(i):
        def pre(module, args, kwargs):
            if handle._aux is None:
                return None
            x, rope, valid, is_image = args[:4]
            aux = handle._aux
            if aux.shape[0] != x.shape[0]:
                raise ValueError(f"set_aux got a batch of {aux.shape[0]}, the model a batch of {x.shape[0]}")
            mixed = handle.mixers[str(i)](x, is_image & valid, valid & ~is_image, aux.to(x.dtype))
            return (mixed, rope, valid, is_image) + tuple(args[4:]), kwargs
        return pre

    for i in ids:
        handle._hooks.append(layers[i].register_forward_pre_hook(hook(i), with_kwargs=True))
    return handle


# ------------------------------------------------------------------------------------ verbalised CV experts

def verbalize(objects: list[dict], *, noise: float = 0.0, rng: np.random.Generator | None = None) -> str:
    """The miniature's "CV expert" output for a ShapeWorld scene as a whitespace-tokenised string:
    ``"detections : red circle at row 0 col 1 ; blue square at row 2 col 3 ."`` (objects in row-major
    order). ``noise`` > 0: each object is independently dropped or, with equal probability, has its colour or
    its shape flipped to another value, with probability ``noise`` (the spec's 10% noisy detector)."""
    from ..data.shapeworld import COLOURS, SHAPES

    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise!r}")
    if noise > 0 and rng is None:
        raise ValueError("a noisy verbaliser needs rng (a numpy Generator) for reproducible noise")
    parts = []
    for o in sorted(objects, key=lambda o: (o["row"], o["col"])):
        colour, shape = o["colour"], o["shape"]
        if noise > 0 and rng.random() < noise:
            kind = rng.integers(3)
            if kind == 0:
                continue  # dropped
            if kind == 1:
                colour = rng.choice([c for c in COLOURS if c != colour])
            else:
                shape = rng.choice([s for s in SHAPES if s != shape])
        parts.append(f"{colour} {shape} at row {o['row']} col {o['col']}")
    return "detections : " + (" ; ".join(parts) if parts else "none") + " ."


def gate_entropy(info: MixerInfo, side: str = "I") -> float:
    """Mean entropy (nats) of one side's gates over its tokens (log 3 = uniform)."""
    g = info.gates_I if side == "I" else info.gates_L
    rows = g[g.sum(-1) > 0]
    if rows.numel() == 0:
        return float("nan")
    return float(-(rows * rows.clamp_min(1e-12).log()).sum(-1).mean())


__all__ = ["MoAIConfig", "MoAICompressor", "LoRAAttention", "MoAIMixer", "MixerInfo", "MoAIHandle",
           "attach_mixers", "mixer_layers", "verbalize", "gate_entropy", "EXPERTS_I", "EXPERTS_L"]
