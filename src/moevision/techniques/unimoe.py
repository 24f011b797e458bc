"""Uni-MoE (Li et al., "Uni-MoE: Scaling Unified Multimodal LLMs with Mixture of Experts", 2024), as specified in
multimodal_compression_systems.md §4: modality encoders reach an LLM through connectors, the LLM's FFNs
become sparse MoE layers whose experts were first trained per modality, and a progressive recipe trains
(1) the connectors, (2) one FFN per modality, (3) the MoE (router + LoRA) on mixed data.

The library part:

- **LoRA by reparametrisation** (``add_lora``): a weight W becomes ``W + (alpha / r) * U @ V`` through
  ``torch.nn.utils.parametrize``. W itself is frozen and stays the module's ``.original``; only U and V
  train. The factor on the weight's output side starts at zero, so a fresh LoRA changes nothing (as B = 0 in
  LoRA); the other is Kaiming-uniform (as A). It works on an ``nn.Linear`` weight (out, in) and on the
  (E, in, out) weights of ``moevision.moe.Experts``, where each expert gets its own pair: Uni-MoE's
  8-expert ``LlamaMLPLoRA`` (frozen gate/up/down + a LoRA on each, per expert). Every dispatch path reads
  the reparametrised weights, so the MoE kernels need no LoRA code. ``merge_lora`` folds them in.
- **Mixtral routing** (the 4-expert release: top-2 logits -> softmax over the 2, no capacity, no aux loss)
  is the library's ``topk`` router with ``normalize_topk=True`` and no capacity. The softmax over all E
  renormalised over the top 2 equals the softmax of the 2 logits. ``MIXTRAL_ROUTING`` holds those
  ``VLMConfig`` fields.
- **Speech connector** (``SpeechConnector``): a small 1-D conv encoder (the stand-in for Whisper's encoder)
  and an aligner, Q learnable queries through one Transformer decoder layer over the encoder's output
  (the stand-in for the Whisper decoder run as a Q-Former). Then a linear projector to the LLM's width.
  Its output goes in front of the text as ``VisionLanguageModel(..., prefix=...)``.
- **Experts from modality experts** (``moe_from_modality_experts``): a MoE copy of a dense model whose
  expert e in every MoE layer is a given dense FFN: the stage-2 modality experts, then copies of the base.
- **Stage parameter sets** (``stage_parameters``): 1 = the connectors (image projector, speech connector);
  2 = the LLM's FFNs; 3 = the routers, every LoRA factor and the connectors' projectors.

Deviations:
- LoRA dropout (0.05 in the code's defaults) is not applied. A merged weight has no per-input dropout;
  use ``dropout`` on the inputs if needed.
- The miniature (``unimoe_experiment``) replaces CLIP / Whisper / BEATs and LLaMA with CPU-sized
  stand-ins trained in two pre-stages (see there).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as P

from ..errors import ConfigError
from ..models.vlm import SwiGLU, VisionLanguageModel, upcycle


class LoRADelta(nn.Module):
    """The parametrisation ``W -> W + (alpha / r) * U @ V`` of a weight of shape (..., m, n): U (..., m, r),
    V (..., r, n); ``out_dim`` (-2 or -1) names W's output axis, whose factor starts at 0."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, out_dim: int, dtype=None, device=None):
        super().__init__()
        if len(shape) < 2:
            raise ConfigError(f"LoRA needs a weight of at least 2 dims, got shape {tuple(shape)}")
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
        if out_dim not in (-2, -1):
            raise ConfigError(f"out_dim must be -2 (nn.Linear's (out, in)) or -1 ((E, in, out)), got {out_dim!r}")
        *lead, m, n = shape
        self.rank, self.alpha, self.out_dim = rank, float(alpha), out_dim
        self.scale = self.alpha / rank
        self.U = nn.Parameter(torch.empty(*lead, m, rank, dtype=dtype, device=device))
        self.V = nn.Parameter(torch.empty(*lead, rank, n, dtype=dtype, device=device))
        zero, rand = (self.U, self.V) if out_dim == -2 else (self.V, self.U)
        fan_in = n if out_dim == -2 else m  # the input width the random factor reads
        with torch.no_grad():
            zero.zero_()
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and LoRA's A
            rand.uniform_(-bound, bound)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.scale * (self.U @ self.V).to(W.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def add_lora(module: nn.Module, name: str, rank: int, alpha: float, *, out_dim: int = -2) -> LoRADelta:
    """Reparametrise ``module.<name>`` as frozen W + a LoRA delta; returns the delta module."""
    if P.is_parametrized(module, name):
        raise ConfigError(f"{type(module).__name__}.{name} already has a parametrisation (LoRA added twice?)")
    W = getattr(module, name)
    delta = LoRADelta(W.shape, rank, alpha, out_dim, dtype=W.dtype, device=W.device)
    P.register_parametrization(module, name, delta)
    module.parametrizations[name].original.requires_grad_(False)
    return delta


def add_lora_to_experts(experts: nn.Module, rank: int, alpha: float) -> list[LoRADelta]:
    """Uni-MoE 8e's ``LlamaMLPLoRA``: a LoRA per expert on each projection (w1 gate, w3 up, w2 down) of a
    ``moevision.moe.Experts``; the stored weights are frozen."""
    names = ["w1", "w2"] + (["w3"] if getattr(experts, "swiglu", False) else [])
    if getattr(experts, "has_bias", False):
        raise ConfigError("LoRA experts are for bias-free (LLaMA-style SwiGLU) experts; this Experts has biases")
    return [add_lora(experts, n, rank, alpha, out_dim=-1) for n in names]


def add_lora_to_linears(model: nn.Module, rank: int, alpha: float, include) -> list[str]:
    """A LoRA on the weight of every ``nn.Linear`` whose qualified name passes ``include(name)``; returns
    the names."""
    done = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and include(name) and not P.is_parametrized(m, "weight"):
            add_lora(m, "weight", rank, alpha, out_dim=-2)
            done.append(name)
    return done


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta into its weight (in place): plain parameters again, same function."""
    for m in list(model.modules()):
        if P.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                if any(isinstance(p, LoRADelta) for p in m.parametrizations[name]):
                    P.remove_parametrizations(m, name, leave_parametrized=True)
                    getattr(m, name).requires_grad_(True)
    return model


def lora_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith(".U") or n.endswith(".V")}


class SpeechConnector(nn.Module):
    """Frames (B, T, C_in) -> (B, Q, dim): a 1-D conv encoder (two convolutions, the second with stride 2;
    the stand-in for Whisper's encoder), Q learnable queries through one pre-norm Transformer decoder layer
    over the encoder's output (the aligner: Uni-MoE runs a Whisper decoder over learnable queries), and a
    linear projector to the LLM width. ``mask`` (B, T) bool, True = a real frame (padding is ignored)."""

    def __init__(self, in_dim: int, width: int, dim: int, *, queries: int = 8, heads: int = 2):
        super().__init__()
        for k, v in (("in_dim", in_dim), ("width", width), ("dim", dim), ("queries", queries), ("heads", heads)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"SpeechConnector {k} must be a positive integer, got {v!r}")
        if width % heads:
            raise ConfigError(f"SpeechConnector width={width} must be divisible by heads={heads}")
        self.conv1 = nn.Conv1d(in_dim, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.aligner = nn.TransformerDecoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                                  batch_first=True, norm_first=True)
        self.projector = nn.Linear(width, dim)

    def encode(self, frames_BTC: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """(B, ceil(T/2), width). Padded frames are zeroed before each convolution, so a real frame's
        features are those of the unpadded sequence (whose ends the convolutions pad with zeros)."""
        x = frames_BTC.transpose(1, 2)
        m = None if mask_BT is None else mask_BT.unsqueeze(1).to(x.dtype)
        if m is not None:
            x = x * m
        h = F.gelu(self.conv1(x))
        if m is not None:
            h = h * m
        return F.gelu(self.conv2(h)).transpose(1, 2)

    def forward(self, frames_BTC: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encode(frames_BTC, mask_BT)
        pad = None
        if mask_BT is not None:
            pad = ~mask_BT[:, ::2][:, :h.shape[1]]  # a stride-2 output is real if its centre frame is
        q = self.queries.unsqueeze(0).expand(h.shape[0], -1, -1)
        return self.projector(self.aligner(q, h, memory_key_padding_mask=pad))


# Uni-MoE 4e's MoE layers: Mixtral routing (top-2, gates renormalised over the 2, which is the softmax of the 2
# logits), no capacity (nothing dropped), no auxiliary loss
MIXTRAL_ROUTING = {"capacity_factor": None, "eval_capacity_factor": None, "router_aux_loss_coef": 0.0}


@torch.no_grad()
def moe_from_modality_experts(dense: VisionLanguageModel, experts: list[dict[int, SwiGLU] | None], *,
                              moe_layers="all", top_k: int = 2) -> VisionLanguageModel:
    """A MoE copy of the dense ``dense`` model with Mixtral routing (``MIXTRAL_ROUTING``): ``upcycle``'s copy,
    then in each MoE layer i expert e set to ``experts[e][i]`` (a dense FFN of that layer, e.g. the stage-2
    image expert), or left the dense model's own FFN where ``experts[e]`` is None (the base). Routers are
    fresh."""
    if dense.moe_layers:
        raise ConfigError("moe_from_modality_experts takes a dense model")
    new = upcycle(dense, moe_layers=moe_layers, num_experts=len(experts), top_k=top_k,
                  config_overrides=MIXTRAL_ROUTING)
    for i in new.moe_layers:
        ex = new.layers[i].ffn.experts
        for e, src in enumerate(experts):
            if src is not None:
                ex.w1[e].copy_(src[i].gate_proj.weight.t())
                ex.w3[e].copy_(src[i].up_proj.weight.t())
                ex.w2[e].copy_(src[i].down_proj.weight.t())
    return new


def stage_parameters(model: nn.Module, stage: str | int, *, connector_prefixes: Iterable[str] = ("projector.",),
                     speech_prefix: str = "speech.") -> set[str]:
    """Names Uni-MoE trains in ``stage`` (§4(b)) of a module holding the LLM (a ``VisionLanguageModel`` under
    ``lm.``) and the speech connector (under ``speech.``): 1 = the connectors (the image projector and the
    whole speech connector; the LLM frozen); 2 = the LLM's FFNs (one copy per modality is trained this
    way); 3 = the MoE routers, every LoRA factor and the connectors' projectors."""
    names = [n for n, _ in model.named_parameters()]
    proj = {n for n in names for c in connector_prefixes if n.startswith("lm." + c)}
    stage = str(stage)
    if stage == "1":
        return proj | {n for n in names if n.startswith(speech_prefix)}
    if stage == "2":
        return {n for n in names if n.startswith("lm.layers.") and ".ffn." in n}
    if stage == "3":
        return (proj | {n for n in names if n.startswith(speech_prefix + "projector.")}
                | {n for n in names if ".router." in n} | lora_parameter_names(model))
    raise ConfigError(f"unknown Uni-MoE stage {stage!r}; stages are 1, 2, 3")


def set_stage(model: nn.Module, stage: str | int, **kw) -> set[str]:
    train = stage_parameters(model, stage, **kw)
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
    return train
