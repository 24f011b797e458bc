"""Vision Transformer, dense and MoE (V-MoE: Riquelme et al., NeurIPS 2021).

Pre-norm blocks ``x + Attn(LN1(x)); x + MLP(LN2(x))``; the MLP of the blocks listed in ``moe_layers``
is a ``moevision.MoE`` (same width, experts of the dense MLP's shape). Tokens come from a linear patch
embedding (``stem="patch"``) or a small conv stem (``stem="conv"``, a hybrid ViT). State-dict keys
follow timm (``patch_embed.proj``, ``blocks.i.attn.qkv``, ``blocks.i.mlp.fc1`` ...), MoE blocks hold
``blocks.i.mlp.router.weight`` and ``blocks.i.mlp.experts.w1`` ...

Shape legend: B batch, N tokens (incl. class token), D width.
"""

from __future__ import annotations

from functools import partial
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import config as C
from ..errors import ConfigError
from ..registry import Registry
from ..layers import Attention, ConvStem, DropPath, LayerScale, Mlp, PatchEmbed, get_attention
from ..moe import ROUTERS, MoE, moe_layer_indices
from ..moe.router import TASK_ROUTING
from ..moe.types import MoEOutput
from ..moe.losses import LOAD_THRESHOLDS
from ._builder import ModelOutput, register_arch, register_model


@dataclass
class ViTConfig:
    """A dense or MoE ViT. ``moe_layers`` (block indices, ``every_2``, ``last_odd_2`` ...) decides which
    blocks are MoE; ``none`` gives the dense model. MoE options mirror ``moevision.MoE``."""

    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    stem: str = "patch"  # "patch" | "conv"
    patch_size: int = 4
    stem_channels: int = 32
    stem_convs_per_stage: int = 1
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"  # "token" | "avg"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # LayerNorm eps (PyTorch's default 1e-5; HF ViT uses 1e-12, DINOv2 and timm 1e-6), MLP/expert
    # activation ("gelu" exact, "gelu_tanh", "relu", "silu"), and LayerScale (CaiT/DINOv2): None = off,
    # else the initial value of ``blocks.i.ls1.gamma`` / ``ls2.gamma`` (standard block only)
    norm_eps: float = 1e-5
    mlp_act: str = "gelu"
    layer_scale_init: float | None = None
    # attention layer by name ("mha"; "moh" = Mixture-of-Head attention) in the blocks ``attention_layers``
    attention: str = "mha"
    attention_layers: str | list[int] = "all"
    attention_options: dict = field(default_factory=dict)  # e.g. {"shared_heads": 2, "top_k": 2} for moh
    # block class by name ("standard"; "momentum" = MomentumSMoE residuals), with its options
    block: str = "standard"
    block_options: dict = field(default_factory=dict)
    # MoE
    moe_layers: str | list[int] = "none"
    num_experts: int = 8
    top_k: int = 1
    router: str = "topk"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    normalize_topk: bool = False
    noise_std: float | None = None
    batch_priority: bool = False
    group_size: int | None = None  # tokens per routing group; None = the whole batch
    slots_per_expert: int = 1
    expert_hidden_ratio: float | None = None  # expert hidden width / D; None = mlp_ratio
    expert_init: str = "independent"
    importance_loss_weight: float = 0.005
    importance_on: str = "probs"  # "probs" (V-MoE) | "gates" (Shazeer / M³ViT): see moevision.MoE
    load_threshold: str = "kth"  # the load loss's: "kth" (vmoe) | "shazeer_in_out" (Shazeer / M³ViT): see moevision.MoE
    router_logits: str = "linear"  # "linear" | "cosine" (SwinV2-MoE / Tutel cosine_top): see moevision.MoE
    second_expert_noise: str = "none"  # "none" | "gumbel" (DeepSpeed's sampled 2nd expert): see moevision.MoE
    load_loss_weight: float = 0.005
    switch_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    moe_impl: str = "auto"  # see moevision.kernels
    # task-dependent routing (M³ViT): "none", "multi_gate" or "task_conditioned"; forward then takes task=
    task_routing: str = "none"
    num_tasks: int = 0
    task_embed_dim: int | None = None

    # -- config protocol
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        cfg = C.from_dict(cls, d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        for k in ("img_size", "in_chans", "num_classes", "patch_size", "embed_dim", "depth", "num_heads",
                  "num_experts", "top_k", "slots_per_expert", "stem_channels", "stem_convs_per_stage"):
            v = getattr(self, k)
            C.check(isinstance(v, int) and v >= 1, f"model.{k}", v, "must be a positive integer")
        C.check(self.stem in ("patch", "conv"), "model.stem", self.stem, "must be 'patch' or 'conv'")
        C.check(self.stem == "conv" or self.img_size % self.patch_size == 0, "model.patch_size", self.patch_size,
                f"must divide img_size={self.img_size} with stem='patch'")
        C.check(self.stem == "patch" or (self.patch_size & (self.patch_size - 1)) == 0, "model.patch_size",
                self.patch_size, "must be a power of two with stem='conv'")
        C.check(self.embed_dim % self.num_heads == 0, "model.num_heads", self.num_heads,
                f"must divide embed_dim={self.embed_dim}")
        C.check(self.global_pool in ("token", "avg"), "model.global_pool", self.global_pool, "'token' or 'avg'")
        C.check(self.class_token or self.global_pool == "avg", "model.global_pool", self.global_pool,
                "must be 'avg' when class_token is false")
        C.check(self.mlp_ratio > 0, "model.mlp_ratio", self.mlp_ratio, "must be > 0")
        C.check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        C.check(self.mlp_act in MLP_ACTS, "model.mlp_act", self.mlp_act, f"must be one of {tuple(MLP_ACTS)}")
        C.check(self.layer_scale_init is None or self.block == "standard", "model.layer_scale_init",
                self.layer_scale_init, f"is only applied by the standard block, not block={self.block!r}")
        for k in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            C.check(0.0 <= getattr(self, k) < 1.0, f"model.{k}", getattr(self, k), "must be in [0, 1)")
        C.check(self.router in ROUTERS, "model.router", self.router, f"must be one of {ROUTERS}")
        C.check(self.top_k <= self.num_experts, "model.top_k", self.top_k,
                f"must be <= num_experts={self.num_experts}")
        for k in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, k)
            C.check(v is None or v > 0, f"model.{k}", v, "must be > 0, or none for dropless")
        moe_layer_indices(self.moe_layers, self.depth, "model.moe_layers")  # raises on a bad spec
        moe_layer_indices(self.attention_layers, self.depth, "model.attention_layers")
        C.check(self.importance_on in ("probs", "gates"), "model.importance_on", self.importance_on,
                "must be 'probs' or 'gates'")
        C.check(self.importance_on == "probs" or self.router == "topk", "model.importance_on",
                self.importance_on, "'gates' needs model.router='topk'")
        C.check(self.load_threshold in LOAD_THRESHOLDS, "model.load_threshold", self.load_threshold,
                f"must be one of {LOAD_THRESHOLDS}")
        C.check(self.load_threshold == "kth" or self.router == "topk", "model.load_threshold",
                self.load_threshold, "'shazeer_in_out' needs model.router='topk'")
        C.check(self.router_logits in ("linear", "cosine"), "model.router_logits", self.router_logits,
                "must be 'linear' or 'cosine'")
        C.check(self.router_logits == "linear" or self.router == "topk", "model.router_logits",
                self.router_logits, "'cosine' needs model.router='topk'")
        C.check(self.second_expert_noise in ("none", "gumbel"), "model.second_expert_noise", self.second_expert_noise,
                "none | gumbel")
        C.check(self.second_expert_noise == "none" or (self.router == "topk" and self.top_k >= 2),
                "model.second_expert_noise", self.second_expert_noise, "'gumbel' needs model.router='topk' and top_k >= 2")
        C.check(self.task_routing in TASK_ROUTING, "model.task_routing", self.task_routing,
                f"must be one of {TASK_ROUTING}")
        if self.task_routing != "none":
            C.check(isinstance(self.num_tasks, int) and self.num_tasks >= 1, "model.num_tasks", self.num_tasks,
                    f"must be a positive integer with task_routing={self.task_routing!r}")
            C.check(self.router == "topk", "model.router", self.router,
                    f"must be 'topk' with task_routing={self.task_routing!r}")
            C.check(bool(self.moe_block_indices), "model.moe_layers", self.moe_layers,
                    "names no MoE block, so task_routing has nothing to route")
        else:
            C.check(not self.num_tasks, "model.num_tasks", self.num_tasks,
                    "needs model.task_routing 'multi_gate' or 'task_conditioned'")
        C.check(self.task_embed_dim is None or self.task_routing == "task_conditioned", "model.task_embed_dim",
                self.task_embed_dim, "needs model.task_routing='task_conditioned'")
        C.check(not self.attention_options.get("num_tasks") or self.task_routing != "none",
                "model.attention_options", self.attention_options,
                "sets num_tasks but model.task_routing is 'none': set model.task_routing='multi_gate' and "
                "model.num_tasks instead (the attention layer then gets a router per task)")
        get_attention(self.attention)
        get_block(self.block)

    @property
    def moe_block_indices(self) -> tuple[int, ...]:
        return moe_layer_indices(self.moe_layers, self.depth)

    def moe_kwargs(self) -> dict[str, Any]:
        return dict(
            router=self.router, capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor if self.eval_capacity_factor is not None
            else self.capacity_factor,
            normalize_topk=self.normalize_topk, noise_std=self.noise_std, batch_priority=self.batch_priority,
            group_size=self.group_size, slots_per_expert=self.slots_per_expert, expert_init=self.expert_init,
            importance_loss_weight=self.importance_loss_weight, load_loss_weight=self.load_loss_weight,
            switch_loss_weight=self.switch_loss_weight, z_loss_weight=self.z_loss_weight, impl=self.moe_impl,
            activation=self.mlp_act, task_routing=self.task_routing, num_tasks=self.num_tasks,
            task_embed_dim=self.task_embed_dim, importance_on=self.importance_on, router_logits=self.router_logits,
            second_expert_noise=self.second_expert_noise, load_threshold=self.load_threshold)


# MLP activations by name; each is also an expert activation of ``moevision.MoE`` (same function)
MLP_ACTS: dict[str, Any] = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU,
                            "silu": nn.SiLU}


def call_mlp(mlp: nn.Module, x: torch.Tensor, state: dict | None):
    """The block's FFN on ``x``; an MoE that routes by task gets the forward pass's ``state["task"]``."""
    if isinstance(mlp, MoE) and mlp.task_aware:
        return mlp(x, task=None if state is None else state.get("task"))
    return mlp(x)


def call_attn(attn: nn.Module, x: torch.Tensor, state: dict | None):
    """The block's attention on ``x``; an attention layer that routes by task (``task_aware``, e.g.
    Mod-Squad's MoA) gets the forward pass's ``state["task"]``."""
    if getattr(attn, "task_aware", False):
        return attn(x, task=None if state is None else state.get("task"))
    return attn(x)


class Block(nn.Module):
    """Pre-norm transformer block; ``mlp`` is an ``Mlp`` or a ``MoE`` (which also returns aux/stats)."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, *, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm,
                 attn: nn.Module | None = None, layer_scale_init: float | None = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn if attn is not None else Attention(dim, num_heads, qkv_bias=qkv_bias,
                                                            attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        # LayerScale on both residual branches (CaiT, DINOv2); Identity (no state-dict keys) when off
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()

    def forward(self, x: torch.Tensor, state: dict | None = None):
        """Returns (x, aux loss or None, MoE-FFN routing stats or None). Attention layers that route
        (MoH) return an ``MoEOutput`` too; their aux loss is added (MoH reports its share of the mean over
        the model's MoH layers), their stats are not reported.
        ``state`` is a dict threaded through the blocks of one forward pass (used by block variants
        such as MomentumSMoE's; the standard block ignores it)."""
        aux = None
        a = call_attn(self.attn, self.norm1(x), state)
        if isinstance(a, MoEOutput):
            a, aux = a.out, a.aux_loss
        x = x + self.drop_path(self.ls1(a))
        y = call_mlp(self.mlp, self.norm2(x), state)
        if isinstance(y, MoEOutput):
            aux = y.aux_loss if aux is None else aux + y.aux_loss
            return x + self.drop_path(self.ls2(y.out)), aux, y.stats
        return x + self.drop_path(self.ls2(y)), aux, None


BLOCKS = Registry("block")
BLOCKS.register("standard", Block)
register_block = BLOCKS.register  # (name, cls): cls has Block's constructor signature plus its own options
get_block = BLOCKS.get


class VisionTransformer(nn.Module):
    arch_name = "vit"

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        D = cfg.embed_dim
        stem_cls = PatchEmbed if cfg.stem == "patch" else ConvStem
        stem_kw = {} if cfg.stem == "patch" else {"channels": cfg.stem_channels,
                                                  "convs_per_stage": cfg.stem_convs_per_stage}
        self.patch_embed = stem_cls(cfg.img_size, cfg.patch_size, cfg.in_chans, D, **stem_kw)
        n_prefix = 1 if cfg.class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + n_prefix, D))
        self.num_prefix_tokens = n_prefix
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        hidden = int(D * cfg.mlp_ratio)
        expert_hidden = int(D * (cfg.expert_hidden_ratio or cfg.mlp_ratio))
        self.moe_layers = cfg.moe_block_indices
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        attn_cls, block_cls = get_attention(cfg.attention), get_block(cfg.block)
        attn_blocks = moe_layer_indices(cfg.attention_layers, cfg.depth) if cfg.attention != "mha" else ()
        attn_options = dict(cfg.attention_options)
        if cfg.task_routing != "none" and getattr(attn_cls, "accepts_tasks", False):
            attn_options.setdefault("num_tasks", cfg.num_tasks)  # a router per task there too (Mod-Squad)
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        block_kw: dict[str, Any] = {"norm_layer": norm_layer}
        if cfg.layer_scale_init is not None:
            block_kw["layer_scale_init"] = cfg.layer_scale_init
        blocks = []
        for i in range(cfg.depth):
            if i in self.moe_layers:
                mlp = MoE(D, expert_hidden, cfg.num_experts, cfg.top_k, **cfg.moe_kwargs())
            else:
                mlp = Mlp(D, hidden, act_layer=MLP_ACTS[cfg.mlp_act], drop=cfg.drop_rate)
            attn = None
            if i in attn_blocks:
                try:
                    attn = attn_cls(D, cfg.num_heads, qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate,
                                    proj_drop=cfg.drop_rate, **attn_options)
                except TypeError as e:
                    raise ConfigError(f"model.attention_options={cfg.attention_options!r} not accepted by "
                                      f"attention {cfg.attention!r}: {e}") from None
            try:
                blocks.append(block_cls(D, cfg.num_heads, mlp, qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate,
                                        attn_drop=cfg.attn_drop_rate, drop_path=dpr[i], attn=attn,
                                        **block_kw, **cfg.block_options))
            except TypeError as e:
                raise ConfigError(f"model.block_options={cfg.block_options!r} not accepted by block "
                                  f"{cfg.block!r}: {e}") from None
        self.blocks = nn.ModuleList(blocks)
        # attention layers whose aux loss is averaged over layers (MoH: 0.01 * mean_l L_b, as the
        # reference engine) get the count; the block still adds their per-layer share
        averaged = [b.attn for b in self.blocks if hasattr(b.attn, "aux_layers")]
        for a in averaged:
            a.aux_layers = len(averaged)
        self.norm = norm_layer(D)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: trunc-normal(0.02) linear weights and positions, zero biases; experts too."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, MoE):
                with torch.no_grad():
                    ex = m.experts
                    for name in ("w1", "w2", "w3"):
                        if hasattr(ex, name):
                            p = getattr(ex, name)
                            nn.init.trunc_normal_(p, std=0.02)
                            if ex.init == "shared":
                                p.copy_(p[:1].expand_as(p))
                    for name in ("b1", "b2"):
                        if hasattr(ex, name):
                            nn.init.zeros_(getattr(ex, name))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    # -- forward
    def _features(self, x: torch.Tensor, task=None):
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        aux = x.new_zeros((), dtype=torch.float32)
        stats = []
        state: dict = {}  # fresh per forward: nothing leaks across batches
        if self.config.task_routing != "none":
            if task is None:
                raise ValueError(f"this model routes by task (model.task_routing={self.config.task_routing!r}, "
                                 f"num_tasks={self.config.num_tasks}); call it with task=<id>")
            state["task"] = task
        elif task is not None:
            raise ValueError("task= was given but this model does not route by task (model.task_routing='none')")
        for blk in self.blocks:
            x, a, s = blk(x, state)
            if a is not None:
                aux = aux + a
            if s is not None:
                stats.append(s)
        return self.norm(x), aux, stats

    def forward_features(self, x: torch.Tensor, task=None) -> torch.Tensor:
        """The token sequence after the final norm, (B, N, D). ``task``: see ``forward``."""
        return self._features(x, task)[0]

    def forward_head(self, x_BND: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x_BND[:, 0] if self.config.global_pool == "token" else x_BND[:, self.num_prefix_tokens:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, task=None) -> ModelOutput:
        """``task`` (models with ``task_routing`` only, and then required): the task id, an int or a (B,)
        integer tensor, handed to every MoE layer's router (M³ViT)."""
        cfg = self.config
        if x.dim() != 4 or x.shape[1:] != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ValueError(f"expected images of shape (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), "
                             f"got {tuple(x.shape)}")
        feats, aux, stats = self._features(x, task)
        return ModelOutput(logits=self.forward_head(feats), aux_loss=aux, routing=stats, moe_layers=self.moe_layers)

    # -- parameter counts
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters used per token: each MoE layer counts its router plus top_k experts (soft MoE and
        expert choice: on average capacity-factor experts; reported as top_k=1 for them)."""
        total = 0
        for name, p in self.named_parameters():
            if ".experts." in name:
                blk = self.blocks[int(name.split(".")[1])].mlp
                k = blk.top_k if blk.router_name == "topk" else 1
                total += p.numel() // blk.num_experts * k
            else:
                total += p.numel()
        return total

    def save_pretrained(self, directory) -> Any:
        from ._builder import save_pretrained
        return save_pretrained(self, directory)


register_arch("vit", VisionTransformer, ViTConfig)


def _vit(defaults: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    cfg = ViTConfig.from_dict({**defaults, **overrides})
    return VisionTransformer(cfg)


# ---- registered entrypoints -------------------------------------------------------------------
_FMNIST = dict(img_size=28, in_chans=1, num_classes=10)


@register_model
def vit_tiny_test(**kw) -> VisionTransformer:
    """Tiny dense ViT for tests (16x16 inputs, 2 blocks)."""
    return _vit(dict(img_size=16, in_chans=1, num_classes=4, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                     mlp_ratio=2.0), kw)


@register_model
def moe_vit_tiny_test(**kw) -> VisionTransformer:
    """Tiny MoE ViT for tests: 2 blocks, block 1 MoE (E=4, top-2, capacity 1.25)."""
    return _vit(dict(img_size=16, in_chans=1, num_classes=4, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                     mlp_ratio=2.0, moe_layers="every_2", num_experts=4, top_k=2, capacity_factor=1.25), kw)


@register_model
def vit_fmnist_patch4(**kw) -> VisionTransformer:
    """Plain ViT, patch 4 on 28x28 (49 tokens + CLS), d=128, 6 blocks (the anchors' baseline)."""
    return _vit(dict(_FMNIST, patch_size=4, embed_dim=128, depth=6, num_heads=4), kw)


@register_model
def moe_vit_fmnist_patch4(**kw) -> VisionTransformer:
    """V-MoE version of ``vit_fmnist_patch4``: E=8 top-1 in odd blocks."""
    return _vit(dict(_FMNIST, patch_size=4, embed_dim=128, depth=6, num_heads=4, moe_layers="every_2",
                     num_experts=8, top_k=1), kw)


@register_model
def vit_fmnist_hybrid(**kw) -> VisionTransformer:
    """Hybrid ViT: a conv stem (4 stages of 2 convs, 16-32-64-128 channels) to a 4x4 grid (16 tokens +
    CLS), d=128, 4 blocks; the dense twin of ``moe_vit_fmnist_hybrid`` (same active parameters per token)."""
    return _vit(dict(_FMNIST, stem="conv", patch_size=8, stem_channels=16, stem_convs_per_stage=2, embed_dim=128,
                     depth=4, num_heads=4, mlp_ratio=2.0), kw)


@register_model
def moe_vit_fmnist_hybrid(**kw) -> VisionTransformer:
    """MoE hybrid ViT: ``vit_fmnist_hybrid`` with E=4 top-1 experts in the odd blocks (V-MoE "every 2")."""
    return _vit(dict(_FMNIST, stem="conv", patch_size=8, stem_channels=16, stem_convs_per_stage=2, embed_dim=128,
                     depth=4, num_heads=4, mlp_ratio=2.0, moe_layers="every_2", num_experts=4, top_k=1, capacity_factor=1.25,
                     eval_capacity_factor=2.0), kw)


@register_model
def vit_digits(**kw) -> VisionTransformer:
    """DigitsViT of the specs (vision_moe.md §0.6): sklearn digits 8x8, patch 2 (16 tokens + CLS), d=64,
    4 blocks, 4 heads, MLP 128. Set ``moe_layers`` etc. for its MoE versions."""
    return _vit(dict(img_size=8, in_chans=1, num_classes=10, patch_size=2, embed_dim=64, depth=4, num_heads=4,
                     mlp_ratio=2.0), kw)
