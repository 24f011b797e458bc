"""A small LLaVA-style vision-language model whose language model has MoE FFNs (MoE-LLaVA).

MoE-LLaVA (Lin et al. 2024; spec multimodal_compression_systems.md §3): a vision tower (here a
moevision ViT, dense or MoE, frozen after its own pre-training) -> an ``mlp2x_gelu`` projector -> a
decoder-only LM whose FFNs in every other layer (``moe_layers="sparse"``: 0, 2, 4, ...) are top-2-of-4
MoE layers with SwiGLU experts (``moevision.MoE``: capacity 1.5 train / 2.0 eval, DeepSpeed capacity
ceil(k*cf*S/E), gates renormalised after dropping, Switch loss weighted by ``router_aux_loss_coef``).
Image tokens come first, then the question, ``<sep>``, the answer and ``<eos>``; the loss is the causal
LM loss on the answer tokens only (+ the MoE aux losses). The three-stage recipe (projector, dense LM,
upcycled MoE) is in ``moevision.train.vlm``; ``stage_parameters`` names what each stage trains.

MoMa (Lin et al. 2024, §5) option: ``image_experts=n`` splits the E experts of each MoE layer into n
image experts and E-n text experts; a token is routed (token choice, top-k) only within its modality's
group (``MoE.forward(..., expert_mask=...)``). Deviation: MoMa uses expert choice inside each group
(and auxiliary routers for causal inference); token choice is causal as it is, so it is used here.

PILL (Zhang et al. 2023, §9) option: ``adapter="pill"`` adds to every LM layer a shared GLU adapter
before attention, Modality-Attention-Gating (MAG: the attention values of image tokens scaled by a
per-head ``tanh`` gate of the token, zero-initialised, so image tokens start with zero value) and a
Mixture of Modality Adapter Experts (MoMAE: a vision GLU adapter for image positions and a text one for
text positions, added to the FFN's input). The LM stays frozen; ``stage_parameters`` gives PILL's two
stages (I: projector + vision adapters with MAG off; II: projector + every adapter + MAG). GLU adapter
``A(x) = U(SiLU(G x) * D x)``, bottleneck ``adapter_rank`` (32), no biases, G and D ~ N(0, 0.02), U = 0.

Deviations: no KV cache (greedy decoding recomputes the short sequence); padding tokens are removed
before every MoE layer so they take no capacity; the patch grid may be average-pooled (``image_pool``)
before the projector to keep the LM sequence short on CPU; the DeepSpeed Gumbel noise on the second
expert is not implemented (routing is deterministic, as DeepSpeed at eval).

Shape legend: B batch, N sequence (image + text), Ni image tokens, L text tokens, D width, Dv vision
width, V vocabulary, E experts, T valid tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config as C
from ..moe import MoE
from ..moe.placement import moe_layer_indices
from .tokenizer import SPECIALS, WordTokenizer
from ._builder import register_arch, register_model
from .vit import ViTConfig, VisionTransformer

IGNORE = -100
_PLACEMENT = {"sparse": lambda d: tuple(range(0, d, 2)), "first_half": lambda d: tuple(range(d // 2)),
              "second_half": lambda d: tuple(range(d // 2, d))}


def vlm_moe_layers(spec, depth: int) -> tuple[int, ...]:
    """MoE-LLaVA's ``moe_mode`` names (``sparse`` = 0, 2, 4 ...; ``first_half``; ``second_half``) plus
    the ViT placement grammar (block lists, ``every_2`` = odd layers, ``all``, ``none``)."""
    return _PLACEMENT[spec](depth) if isinstance(spec, str) and spec in _PLACEMENT else moe_layer_indices(spec, depth)


@dataclass
class VLMConfig:
    vocab: list[str] = field(default_factory=lambda: list(SPECIALS))
    vision: dict = field(default_factory=dict)  # a full ViTConfig dict (the tower is rebuilt exactly)
    vision_select_layer: int = -1  # -1: final normed tokens; -2: penultimate block (LLaVA's choice)
    image_pool: int = 1  # average-pool the patch grid by this factor before the projector
    projector: str = "mlp2x_gelu"  # mlp2x_gelu | linear
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    ffn_hidden: int = 256
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    max_len: int = 128  # longest sequence (image + text) RoPE tables are checked against
    rope_base: float = 10000.0
    moe_layers: str | list[int] = "none"
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float | None = 1.5
    eval_capacity_factor: float | None = 2.0
    router_aux_loss_coef: float = 0.01
    normalize_after_drop: bool = True
    second_expert_noise: str = "none"  # "gumbel": DeepSpeed's sampled 2nd expert in training (MoE-LLaVA's code)
    image_experts: int = 0  # MoMa: experts [0, n) take image tokens, [n, E) text tokens; 0 = off
    moe_impl: str = "sorted"
    adapter: str = "none"  # none | pill (PILL's MAG + MoMAE adapters on a frozen LM)
    adapter_rank: int = 32  # PILL's GLU adapter bottleneck
    pill_mag: bool = True  # PILL's modality-attention gating (False: an ablation, image values never gated)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMConfig":
        cfg = C.from_dict(cls, d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        for k in ("dim", "depth", "num_heads", "ffn_hidden", "max_len", "num_experts", "top_k", "image_pool",
                  "adapter_rank"):
            v = getattr(self, k)
            C.check(isinstance(v, int) and v >= 1, f"model.{k}", v, "must be a positive integer")
        C.check(self.dim % (2 * self.num_heads) == 0, "model.num_heads", self.num_heads,
                f"dim={self.dim} must be divisible by 2*num_heads (RoPE needs even head widths)")
        C.check(self.projector in ("mlp2x_gelu", "linear"), "model.projector", self.projector, "mlp2x_gelu | linear")
        C.check(self.norm in ("rmsnorm", "layernorm"), "model.norm", self.norm, "rmsnorm | layernorm")
        C.check(self.vision_select_layer in (-1, -2), "model.vision_select_layer", self.vision_select_layer, "-1 or -2")
        C.check(self.top_k <= self.num_experts, "model.top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        for k in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, k)
            C.check(v is None or v > 0, f"model.{k}", v, "must be > 0, or none for dropless")
        C.check(self.second_expert_noise in ("none", "gumbel"), "model.second_expert_noise", self.second_expert_noise,
                "none | gumbel")
        C.check(self.second_expert_noise == "none" or self.top_k >= 2, "model.second_expert_noise",
                self.second_expert_noise, f"'gumbel' samples the 2nd expert: it needs top_k >= 2 (got {self.top_k})")
        C.check(self.router_aux_loss_coef >= 0, "model.router_aux_loss_coef", self.router_aux_loss_coef, ">= 0")
        n = self.image_experts
        C.check(n == 0 or (self.top_k <= n and self.top_k <= self.num_experts - n), "model.image_experts", n,
                f"0 (off), or leave >= top_k={self.top_k} experts for each modality out of {self.num_experts}")
        C.check(len(self.vocab) >= len(SPECIALS) and list(self.vocab[:4]) == list(SPECIALS), "model.vocab",
                self.vocab[:4], f"must start with {SPECIALS}")
        moe = vlm_moe_layers(self.moe_layers, self.depth)
        C.check(self.adapter in ("none", "pill"), "model.adapter", self.adapter, "none | pill")
        C.check(self.adapter == "none" or not moe, "model.adapter", self.adapter,
                f"PILL adapts a frozen dense LM: use moe_layers='none' (got {self.moe_layers!r})")
        vcfg = ViTConfig.from_dict(self.vision)
        C.check(vcfg.stem == "patch" and not vcfg.class_token and vcfg.global_pool == "avg", "model.vision",
                "stem/class_token", "the vision tower must be a patch ViT without a class token")
        g = vcfg.img_size // vcfg.patch_size
        C.check(g % self.image_pool == 0, "model.image_pool", self.image_pool, f"must divide the {g}x{g} patch grid")

    @property
    def num_image_tokens(self) -> int:
        v = ViTConfig.from_dict(self.vision)
        return (v.img_size // v.patch_size // self.image_pool) ** 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def rope_tables(n: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None]  # (N, Dh/2)
    return ang.cos(), ang.sin()


def apply_rope(x_BHND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHND[..., 0::2], x_BHND[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x_BHND.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BND: torch.Tensor, rope, value_gate_BNH: torch.Tensor | None = None) -> torch.Tensor:
        """``value_gate_BNH`` (PILL's MAG): each token's value vector is scaled per head by this factor."""
        B, N, D = x_BND.shape
        q, k, v = self.qkv(x_BND).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if value_gate_BNH is not None:
            v = v * value_gate_BNH.transpose(1, 2).unsqueeze(-1).to(v.dtype)  # (B, H, N, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); as an expert: w1 = gate.T, w3 = up.T, w2 = down.T."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GLUAdapter(nn.Module):
    """PILL's adapter ``U(SiLU(G x) * D x)``: bottleneck ``rank``, no biases; U zero-initialised, so the
    adapter is exactly 0 until it trains."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.G = nn.Linear(dim, rank, bias=False)
        self.D = nn.Linear(dim, rank, bias=False)
        self.U = nn.Linear(rank, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.G.weight, std=0.02)
        nn.init.normal_(self.D.weight, std=0.02)
        nn.init.zeros_(self.U.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(F.silu(self.G(x)) * self.D(x))


class PILLAdapters(nn.Module):
    """One LM layer's PILL parameters: ``attn`` (shared adapter before attention), ``mag`` (W_g of the
    modality-attention gate, zero-initialised: g = tanh(W_g x) = 0 at the start), ``vis`` / ``txt``
    (MoMAE: the modality adapter experts before the FFN)."""

    def __init__(self, dim: int, num_heads: int, rank: int):
        super().__init__()
        self.attn, self.vis, self.txt = GLUAdapter(dim, rank), GLUAdapter(dim, rank), GLUAdapter(dim, rank)
        self.mag = nn.Linear(dim, num_heads, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for a in (self.attn, self.vis, self.txt):
            a.reset_parameters()
        nn.init.zeros_(self.mag.weight)

    def value_gate(self, a_BND: torch.Tensor, is_image_BN: torch.Tensor) -> torch.Tensor:
        """(B, N, H): tanh(W_g a) at image positions, 1 at text positions (text values untouched)."""
        g = torch.tanh(self.mag(a_BND))
        return torch.where(is_image_BN.unsqueeze(-1), g, torch.ones_like(g))

    def modality_adapter(self, h_BND: torch.Tensor, is_image_BN: torch.Tensor) -> torch.Tensor:
        """MoMAE, hard routing by modality: A_vis on image positions, A_txt on the others (each adapter
        sees only its own tokens)."""
        out = torch.zeros_like(h_BND)
        if bool(is_image_BN.any()):
            out[is_image_BN] = self.vis(h_BND[is_image_BN])
        out[~is_image_BN] = self.txt(h_BND[~is_image_BN])
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: VLMConfig, moe: bool):
        super().__init__()
        norm = RMSNorm if cfg.norm == "rmsnorm" else nn.LayerNorm
        self.norm1, self.attn, self.norm2 = norm(cfg.dim), CausalSelfAttention(cfg.dim, cfg.num_heads), norm(cfg.dim)
        self.image_experts = cfg.image_experts
        self.pill = PILLAdapters(cfg.dim, cfg.num_heads, cfg.adapter_rank) if cfg.adapter == "pill" else None
        if moe:
            self.ffn = MoE(cfg.dim, cfg.ffn_hidden, cfg.num_experts, cfg.top_k, router="topk",
                           capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                           normalize_topk=True, normalize_after_drop=cfg.normalize_after_drop, activation="swiglu",
                           bias=False, noise_std=0.0, importance_loss_weight=0.0, load_loss_weight=0.0,
                           switch_loss_weight=cfg.router_aux_loss_coef, capacity_multiple_of=None,
                           impl=cfg.moe_impl, record_routing=True, second_expert_noise=cfg.second_expert_noise)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, rope, valid_BN: torch.Tensor, is_image_BN: torch.Tensor, mag: bool = True):
        if self.pill is not None:  # PILL: h = x + Attn(xn + A_attn(xn)) with MAG; x + FFN(hn + MoMAE(hn))
            xn = self.norm1(x)
            a = xn + self.pill.attn(xn)
            x = x + self.attn(a, rope, self.pill.value_gate(a, is_image_BN) if mag else None)
            hn = self.norm2(x)
            return x + self.ffn(hn + self.pill.modality_adapter(hn, is_image_BN)), None, None, None
        x = x + self.attn(self.norm1(x), rope)
        h = self.norm2(x)
        if not isinstance(self.ffn, MoE):
            return x + self.ffn(h), None, None, None
        # only real tokens are routed: padding takes no capacity and stays out of the statistics
        img_T = is_image_BN[valid_BN]
        mask = None
        if self.image_experts:
            E, n = self.ffn.num_experts, self.image_experts
            mask = (torch.arange(E, device=x.device) < n).unsqueeze(0) == img_T.unsqueeze(1)  # (T, E)
        out = self.ffn(h[valid_BN], expert_mask=mask)
        y = h.new_zeros(h.shape)
        y[valid_BN] = out.out
        with torch.no_grad():  # kept assignments per (modality, expert): row 0 image, row 1 text tokens
            st = out.stats
            st.tokens_per_expert  # noqa: B018  (materialises lazily computed statistics)
            ids, kept = st.expert_idx, st.kept  # (T, K)
            load = torch.zeros(2, self.ffn.num_experts, device=x.device)
            rows = (~img_T).long().unsqueeze(1).expand_as(ids)
            load.index_put_((rows[kept], ids[kept]), torch.ones((), device=x.device), accumulate=True)
        return x + y, out.aux_loss, out.stats, load


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (B, N, V)
    loss: torch.Tensor | None  # answer-token LM loss + aux loss
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    routing: list = field(default_factory=list)  # RoutingStats per MoE layer
    modality_load: list = field(default_factory=list)  # (2, E) per MoE layer: image row, text row
    moe_layers: tuple[int, ...] = ()


class VisionLanguageModel(nn.Module):
    arch_name = "vlm"

    def __init__(self, config: VLMConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.tokenizer = WordTokenizer(cfg.vocab)
        self.vision = VisionTransformer(ViTConfig.from_dict(cfg.vision))
        dv, D = self.vision.config.embed_dim, cfg.dim
        self.projector = (nn.Sequential(nn.Linear(dv, D), nn.GELU(), nn.Linear(D, D)) if cfg.projector == "mlp2x_gelu"
                          else nn.Sequential(nn.Linear(dv, D)))
        self.embed = nn.Embedding(len(cfg.vocab), D)
        self.moe_layers = vlm_moe_layers(cfg.moe_layers, cfg.depth)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i in self.moe_layers) for i in range(cfg.depth))
        self.norm = RMSNorm(D) if cfg.norm == "rmsnorm" else nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, len(cfg.vocab), bias=False)
        for m in [self.projector, self.embed, self.layers, self.lm_head]:
            for p in m.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)
        for layer in self.layers:
            if layer.pill is not None:
                layer.pill.reset_parameters()  # U = 0 and W_g = 0: the adapters start as exact no-ops
        self.mag_enabled = True  # PILL's stage I trains with MAG off (image values not gated)

    # -- vision side
    def encode_images(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Vision-tower patch features, pooled: (B, Ni, Dv), before the projector (cacheable)."""
        v, cfg = self.vision, self.config
        if cfg.vision_select_layer == -1:
            x = v.forward_features(images_BCHW)
        else:
            x = v.pos_drop(v.patch_embed(images_BCHW) + v.pos_embed)
            state: dict = {}
            for blk in v.blocks[:len(v.blocks) + 1 + cfg.vision_select_layer]:
                x = blk(x, state)[0]
        x = x[:, v.num_prefix_tokens:]
        p = cfg.image_pool
        if p > 1:
            B, N, Dv = x.shape
            g = int(N ** 0.5)
            x = F.avg_pool2d(x.transpose(1, 2).reshape(B, Dv, g, g), p).flatten(2).transpose(1, 2)
        return x

    # -- language side
    def forward(self, tokens_BL: torch.Tensor, lengths_B: torch.Tensor, labels_BL: torch.Tensor | None = None, *,
                images: torch.Tensor | None = None, image_feats: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None) -> VLMOutput:
        """Right-padded text ``tokens_BL`` with ``lengths_B`` real tokens each; the image (raw ``images`` or
        cached ``image_feats`` from ``encode_images``; neither = text-only) goes in front. ``prefix``
        instead of an image: (B, Np, dim) embeddings from another modality's connector (e.g. Uni-MoE's
        speech aligner), put in front as they are; they count as the non-text ("image") positions for
        MoMa groups, PILL and the routing statistics. ``labels_BL`` holds the target token at answer
        positions and -100 elsewhere (the loss predicts each labelled token from the positions before it)."""
        if prefix is not None and (images is not None or image_feats is not None):
            raise ValueError("give either an image (images / image_feats) or a prefix, not both")
        if images is not None and image_feats is None:
            image_feats = self.encode_images(images)
        B, L = tokens_BL.shape
        x = self.embed(tokens_BL)
        Ni = 0 if image_feats is None else image_feats.shape[1]
        if Ni:
            x = torch.cat([self.projector(image_feats.to(x.dtype)), x], dim=1)
        elif prefix is not None:
            if prefix.dim() != 3 or prefix.shape[0] != B or prefix.shape[2] != self.config.dim:
                raise ValueError(f"prefix must be (B={B}, Np, dim={self.config.dim}), got {tuple(prefix.shape)}")
            Ni = prefix.shape[1]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        N = Ni + L
        if N > self.config.max_len:
            raise ValueError(f"sequence of {N} tokens ({Ni} image + {L} text) exceeds max_len={self.config.max_len}")
        pos = torch.arange(N, device=x.device)
        valid = (pos.unsqueeze(0) < (Ni + lengths_B.to(x.device)).unsqueeze(1))  # (B, N)
        is_image = (pos < Ni).unsqueeze(0).expand(B, N)
        rope = rope_tables(N, self.config.dim // self.config.num_heads, self.config.rope_base, x.device)
        aux = x.new_zeros((), dtype=torch.float32)
        routing, loads = [], []
        for layer in self.layers:
            x, a, st, load = layer(x, rope, valid, is_image, self.mag_enabled and self.config.pill_mag)
            if a is not None:
                aux = aux + a
                routing.append(st)
                loads.append(load)
        logits = self.lm_head(self.norm(x))
        lm_loss = loss = None
        if labels_BL is not None:
            full = F.pad(labels_BL.to(x.device), (Ni, 0), value=IGNORE)
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), full[:, 1:].flatten(), ignore_index=IGNORE)
            loss = lm_loss + aux
        return VLMOutput(logits, loss, lm_loss, aux, routing, loads, self.moe_layers)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, images: torch.Tensor | None = None,
                 image_feats: torch.Tensor | None = None, max_new_tokens: int = 4,
                 prefix: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy decoding of each prompt (token ids, ending with ``<sep>``) until ``<eos>``; the image or
        ``prefix`` as in ``forward``."""
        was = self.training
        self.eval()
        if images is not None and image_feats is None:
            image_feats = self.encode_images(images)
        dev = self.lm_head.weight.device
        B, tok = len(prompts), self.tokenizer
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        buf = torch.full((B, int(lengths.max()) + max_new_tokens), tok.pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            buf[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        Ni = image_feats.shape[1] if image_feats is not None else (prefix.shape[1] if prefix is not None else 0)
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)
        for _ in range(max_new_tokens):
            L = int(lengths.max())
            logits = self(buf[:, :L], lengths, image_feats=image_feats, prefix=prefix).logits
            nxt = logits[rows, Ni + lengths - 1].argmax(-1)
            for i in (~done).nonzero().flatten().tolist():
                out[i].append(int(nxt[i]))
            buf[rows, lengths] = torch.where(done, buf[rows, lengths], nxt)
            done = done | (nxt == tok.eos_id)
            lengths = lengths + (~done).long()
            if bool(done.all()):
                break
        self.train(was)
        return out

    def answer(self, questions: list[str], *, images=None, image_feats=None, max_new_tokens: int = 4,
               prefix=None) -> list[str]:
        tok = self.tokenizer
        prompts = [tok.encode(q) + [tok.sep_id] for q in questions]
        gen = self.generate(prompts, images=images, image_feats=image_feats, max_new_tokens=max_new_tokens,
                            prefix=prefix)
        return [tok.decode(g) for g in gen]

    # -- bookkeeping
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Per text token: everything but the vision tower (and PILL's vision adapters), with top_k of E
        experts per MoE layer."""
        total = 0
        for name, p in self.named_parameters():
            if name.startswith("vision.") or ".pill.vis." in name:
                continue
            total += p.numel() * self.config.top_k // self.config.num_experts if ".experts." in name else p.numel()
        return total

    def save_pretrained(self, directory) -> Any:
        from ._builder import save_pretrained
        return save_pretrained(self, directory)


register_arch("vlm", VisionLanguageModel, VLMConfig)


def stage_parameters(model: VisionLanguageModel, stage: str | int, *, stage3_trainable: str = "all_ffn") -> set[str]:
    """Names of the parameters MoE-LLaVA trains in ``stage`` (spec §3(b) table; the vision tower is never
    trained): 1 = the projector; 2 = projector + the whole LM; 3 = the MoE layers (experts + routers;
    ``moe_only``) or every FFN, MoE or dense (``all_ffn``: the code's substring match, the default).
    Two stand-in pre-stages: ``vision`` (the tower, instead of a pre-trained CLIP) and ``lm`` (the LM
    alone, instead of a pre-trained LLM). A PILL model (``adapter="pill"``) keeps its LM frozen: I = the
    projector + the vision adapters (MoMAE's A_vis), II = the projector + every adapter + the MAG gates;
    it has no stage III. No stage trains PILL's adapters except I and II."""
    names = [n for n, _ in model.named_parameters()]
    pill = [n for n in names if ".pill." in n]
    lm = [n for n in names if n.split(".")[0] in ("embed", "layers", "norm", "lm_head") and ".pill." not in n]
    stage = str(stage)
    if stage == "vision":
        return {n for n in names if n.startswith("vision.")}
    if stage == "lm":
        return set(lm)
    if model.config.adapter == "pill" and stage in ("1", "2", "3"):
        proj = {n for n in names if n.startswith("projector.")}
        if stage == "1":
            return proj | {n for n in pill if ".pill.vis." in n}
        if stage == "2":
            return proj | set(pill)
        raise ValueError("a PILL model has no stage 3 (its LM stays frozen; stages are vision, lm, 1, 2)")
    if stage == "1":
        return {n for n in names if n.startswith("projector.")}
    if stage == "2":
        return {n for n in names if n.startswith("projector.")} | set(lm)
    if stage == "3":
        if stage3_trainable not in ("moe_only", "all_ffn"):
            raise ValueError(f"stage3_trainable must be 'moe_only' or 'all_ffn', got {stage3_trainable!r}")
        keep = [f"layers.{i}.ffn." for i in (model.moe_layers if stage3_trainable == "moe_only" else range(len(model.layers)))]
        return {n for n in names if any(n.startswith(k) for k in keep)}
    raise ValueError(f"unknown stage {stage!r}; stages are vision, lm, 1, 2, 3")


def set_stage(model: VisionLanguageModel, stage: str | int, **kw) -> set[str]:
    """Set ``requires_grad`` to exactly ``stage_parameters(model, stage)``; return that set."""
    train = stage_parameters(model, stage, **kw)
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
    return train


@torch.no_grad()
def upcycle(model: VisionLanguageModel, *, moe_layers="sparse", num_experts: int | None = None,
            top_k: int | None = None, image_experts: int | None = None,
            config_overrides: dict[str, Any] | None = None) -> VisionLanguageModel:
    """Sparse upcycling (MoE-LLaVA stage III init): a copy of ``model`` whose FFNs in ``moe_layers`` are
    MoE layers with every expert an exact copy of that dense FFN and a freshly initialised router.
    ``config_overrides``: further ``VLMConfig`` fields of the copy (e.g. the routing: capacity, aux loss)."""
    over = {**(config_overrides or {}), "moe_layers": moe_layers}
    for k, v in (("num_experts", num_experts), ("top_k", top_k), ("image_experts", image_experts)):
        if v is not None:
            over[k] = v
    if model.moe_layers:
        raise ValueError("upcycle() takes a dense model; this one already has MoE layers")
    new = VisionLanguageModel(VLMConfig.from_dict({**model.config.to_dict(), **over}))
    src = model.state_dict()
    dst = new.state_dict()
    for k in dst:
        if k in src:
            dst[k].copy_(src[k])
    for i in new.moe_layers:
        ex, ffn = new.layers[i].ffn.experts, model.layers[i].ffn
        ex.w1.copy_(ffn.gate_proj.weight.t().expand_as(ex.w1))
        ex.w3.copy_(ffn.up_proj.weight.t().expand_as(ex.w3))
        ex.w2.copy_(ffn.down_proj.weight.t().expand_as(ex.w2))
    new.model_name = getattr(model, "model_name", None)
    return new.to(next(model.parameters()).device)


@torch.no_grad()
def add_pill(model: VisionLanguageModel, *, adapter_rank: int | None = None,
             pill_mag: bool | None = None) -> VisionLanguageModel:
    """A copy of the dense ``model`` with PILL's adapters added to every LM layer (fresh: U = 0 and
    W_g = 0, so the copy computes exactly what ``model`` does with MAG off, and with MAG on only the
    image tokens' attention values change: they start at 0)."""
    if model.moe_layers:
        raise ValueError("add_pill() takes a dense model: PILL adapts a frozen dense LM")
    if model.config.adapter == "pill":
        raise ValueError("this model already has PILL adapters")
    over: dict[str, Any] = {"adapter": "pill"}
    for k, v in (("adapter_rank", adapter_rank), ("pill_mag", pill_mag)):
        if v is not None:
            over[k] = v
    new = VisionLanguageModel(VLMConfig.from_dict({**model.config.to_dict(), **over}))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".pill." in k for k in missing), (missing, unexpected)
    new.model_name = getattr(model, "model_name", None)
    return new.to(next(model.parameters()).device)


# ---- registered entrypoints ---------------------------------------------------------------------
def default_vocab() -> list[str]:
    """A placeholder vocabulary (training builds the real one from its data and stores it in the config)."""
    from ..data.easy_vqa import ANSWERS
    return list(SPECIALS) + sorted(set(ANSWERS) | {"what", "is", "the", "shape", "color", "?", "there", "a"})


def _vision(**kw) -> dict:
    base = dict(img_size=64, in_chans=3, num_classes=1, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                mlp_ratio=2.0, class_token=False, global_pool="avg")
    return ViTConfig.from_dict({**base, **kw}).to_dict()


def _vlm(defaults: dict[str, Any], overrides: dict[str, Any]) -> VisionLanguageModel:
    d = {"vocab": default_vocab(), **defaults, **overrides}
    return VisionLanguageModel(VLMConfig.from_dict(d))


@register_model
def vlm_tiny_test(**kw) -> VisionLanguageModel:
    """Tiny dense VLM for tests: 32x32 images, 8x8 patches (16 image tokens), LM width 32, 2 layers."""
    return _vlm(dict(vision=_vision(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2), dim=32,
                     depth=2, num_heads=2, ffn_hidden=64, max_len=96), kw)


@register_model
def moe_vlm_tiny_test(**kw) -> VisionLanguageModel:
    """``vlm_tiny_test`` with MoE-LLaVA layers (layer 0; E=4, top-2)."""
    return _vlm(dict(vision=_vision(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2), dim=32,
                     depth=2, num_heads=2, ffn_hidden=64, max_len=96, moe_layers="sparse"), kw)


@register_model
def vlm_easyvqa(**kw) -> VisionLanguageModel:
    """Dense VLM for 64x64 images: ViT (patch 8, d=64, 3 blocks) pooled 2x2 to 16 image tokens,
    mlp2x_gelu projector, LM d=128, 2 layers, 4 heads, SwiGLU 256, RMSNorm, RoPE (CPU-sized)."""
    return _vlm(dict(vision=_vision(), image_pool=2, dim=128, depth=2, num_heads=4, ffn_hidden=256), kw)


@register_model
def moe_vlm_easyvqa(**kw) -> VisionLanguageModel:
    """``vlm_easyvqa`` with MoE-LLaVA FFNs in every other layer from 0 ("sparse": layer 0 of 2; E=4
    SwiGLU experts, top-2, cf 1.5/2.0)."""
    return _vlm(dict(vision=_vision(), image_pool=2, dim=128, depth=2, num_heads=4, ffn_hidden=256,
                     moe_layers="sparse"), kw)
