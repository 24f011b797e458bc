"""m2mKD: module-to-module knowledge distillation (Lo et al., "m2mKD: Module-to-Module Knowledge
Distillation for Modular Transformers", 2024; vision_moe.md §8) from a dense ViT teacher to an MoE ViT.

Procedure ([V] kamanphoebe/m2mKD):
1. Split the teacher into M contiguous modules (``split_model``; module 0 owns the patch embedding, class
   token and positions, the last module the final norm and head). A small **meta model** with the
   teacher's width and one block per module, trained end to end and then frozen, supplies the context
   around each module.
2. For each module i (independent of the others): the student module S_i (a slice of the MoE student,
   with a pre-stitch ``LN(d_meta) -> Linear(d_meta, d_student)`` when i > 0 and a post-stitch
   ``LN(d_student) -> Linear(d_student, d_meta)`` when i < M - 1) replaces meta block i; so does the
   teacher module T_i. The student hybrid ``M_{>i} . S~_i . M_{<i}`` is trained to match the teacher
   hybrid's logits: ``L = (1 - alpha) CE(z_S, y) + alpha tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau))``
   with the KL summed and divided by ``z_S.numel()`` (DeiT's normalisation); alpha = 0.5, tau = 1.0 [V].
   Meta model and teacher run frozen; only S~_i (with its stitches) is trained.
   ``meta_from_teacher`` builds the meta model from the teacher's own blocks instead (see its deviation note).
3. ``assemble_student`` loads the student modules (stitches dropped) into the full student, which is then
   trained end to end (``moevision.train.fit`` with ``train.init_from``).

Deviations: the student's MoE aux loss (if its MoE layers have one) is added to the module loss with
weight ``aux_weight`` (the reference's fastmoe gate has none); no mixup/cutmix; a linear-warmup + cosine
schedule; the teacher is any trained dense moevision ViT split by ``split_model`` (the paper's teacher
is itself built by Deep Incubation, an option it also allows).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import ImageDataset
from ..errors import ConfigError
from ..models.vit import VisionTransformer
from ._loop import epochs_of, run_steps, shuffled_batches, steps_per_epoch

DISTILLATION_TYPES = ("soft", "hard")


class ViTSegment(nn.Module):
    """Blocks [start, stop) of a ViT, sharing its modules (no copy). Segment 0 also embeds the image; the
    last segment also applies the final norm and the head, returning logits. Its state-dict keys are the
    full model's (``blocks.i.*``, ``patch_embed.*`` ...), so segments concatenate back into the model."""

    def __init__(self, vit: VisionTransformer, start: int, stop: int):
        super().__init__()
        depth = len(vit.blocks)
        if not 0 <= start < stop <= depth:
            raise ConfigError(f"segment [{start}, {stop}) is not a non-empty range of the {depth} blocks")
        self.start, self.stop = start, stop
        self.has_embed, self.has_head = start == 0, stop == depth
        if self.has_embed:
            self.patch_embed, self.pos_drop = vit.patch_embed, vit.pos_drop
            self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed
        self.blocks = nn.ModuleDict({str(i): vit.blocks[i] for i in range(start, stop)})
        if self.has_head:
            self.norm, self.head_drop, self.head = vit.norm, vit.head_drop, vit.head
            self.global_pool, self.num_prefix_tokens = vit.config.global_pool, vit.num_prefix_tokens
        self.width = vit.config.embed_dim

    def forward(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.has_embed:
            x = self.patch_embed(x)
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = self.pos_drop(x + self.pos_embed)
        aux = x.new_zeros((), dtype=torch.float32)
        for blk in self.blocks.values():
            x, a, _ = blk(x, state)
            if a is not None:
                aux = aux + a
        if self.has_head:
            x = self.norm(x)
            x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(1)
            x = self.head(self.head_drop(x))
        return x, aux


def split_model(vit: VisionTransformer, sizes: Sequence[int]) -> list[ViTSegment]:
    """Cut ``vit`` into consecutive segments of ``sizes`` blocks (they must add up to its depth)."""
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes) or sum(sizes) != len(vit.blocks):
        raise ConfigError(f"module sizes {sizes} must be positive and add up to the depth {len(vit.blocks)}")
    out, start = [], 0
    for s in sizes:
        out.append(ViTSegment(vit, start, start + s))
        start += s
    return out


def run_segments(segments: Sequence[nn.Module], x: torch.Tensor, state: dict | None = None):
    """Apply segments in order; returns (output, summed aux loss)."""
    state = {} if state is None else state
    aux = x.new_zeros((), dtype=torch.float32)
    for seg in segments:
        x, a = seg(x, state)
        aux = aux + a
    return x, aux


class StitchAdapter(nn.Module):
    """``LN(d_in) -> Linear(d_in, d_out)``: adapts widths between meta and student modules."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class StudentModule(nn.Module):
    """S~_i: optional pre-stitch, a student segment, optional post-stitch."""

    def __init__(self, segment: ViTSegment, index: int, num_modules: int, meta_width: int):
        super().__init__()
        self.segment, self.index = segment, index
        self.pre = StitchAdapter(meta_width, segment.width) if index > 0 else nn.Identity()
        self.post = StitchAdapter(segment.width, meta_width) if index < num_modules - 1 else nn.Identity()

    def forward(self, x: torch.Tensor, state: dict):
        x, aux = self.segment(self.pre(x), state)
        return self.post(x), aux


def m2mkd_loss(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.5, tau: float = 1.0,
               distillation_type: str = "soft") -> torch.Tensor:
    """DeiT-style distillation: (1 - alpha) CE(z_s, y) + alpha * KD, KD = tau^2 * sum KL / z_s.numel()
    (soft) or CE(z_s, argmax z_t) (hard)."""
    if distillation_type not in DISTILLATION_TYPES:
        raise ConfigError(f"distillation_type={distillation_type!r} must be one of {DISTILLATION_TYPES}")
    if not 0.0 <= alpha <= 1.0 or tau <= 0:
        raise ConfigError(f"alpha={alpha} must be in [0, 1] and tau={tau} > 0")
    base = F.cross_entropy(z_s, labels)
    if distillation_type == "soft":
        kd = F.kl_div(F.log_softmax(z_s / tau, dim=-1), F.log_softmax(z_t / tau, dim=-1), reduction="sum",
                      log_target=True) * (tau * tau) / z_s.numel()
    else:
        kd = F.cross_entropy(z_s, z_t.argmax(dim=-1))
    return (1.0 - alpha) * base + alpha * kd


def student_modules(student: VisionTransformer, sizes: Sequence[int], meta_width: int) -> list[StudentModule]:
    segs = split_model(student, sizes)
    return [StudentModule(s, i, len(segs), meta_width) for i, s in enumerate(segs)]


def _freeze(model: nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def distill_module(index: int, *, teacher: VisionTransformer, meta: VisionTransformer, module: StudentModule,
                   teacher_sizes: Sequence[int], train: ImageDataset, epochs: int = 1, lr: float = 1e-3,
                   weight_decay: float = 0.05, batch_size: int = 64, warmup_steps: int = 20, alpha: float = 0.5,
                   tau: float = 1.0, distillation_type: str = "soft", aux_weight: float = 1.0, augment: str = "none",
                   seed: int = 0) -> list[float]:
    """Train student module ``index`` inside the meta model against teacher module ``index``."""
    M = len(teacher_sizes)
    if len(meta.blocks) != M:
        raise ConfigError(f"the meta model needs one block per module: depth {len(meta.blocks)} for {M} modules")
    if meta.config.embed_dim != teacher.config.embed_dim:
        raise ConfigError(f"meta width {meta.config.embed_dim} must equal the teacher's {teacher.config.embed_dim}")
    _freeze(teacher), _freeze(meta)
    meta_segs = split_model(meta, [1] * M)
    t_mod = split_model(teacher, teacher_sizes)[index]
    prefix, suffix = meta_segs[:index], meta_segs[index + 1:]
    module.train()
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    total = steps_per_epoch(len(train), batch_size) * epochs

    def step_loss(x, y):
        with torch.no_grad():
            h, _ = run_segments(prefix, x)
            z_t, _ = run_segments([t_mod, *suffix], h)
        state: dict = {}
        z, aux = module(h, state)
        z_s, _ = run_segments(suffix, z, state)
        return m2mkd_loss(z_s, z_t, y, alpha=alpha, tau=tau, distillation_type=distillation_type) + aux_weight * aux

    batches = epochs_of(lambda e: shuffled_batches(train, batch_size, seed=seed * 31 + index, epoch=e,
                                                   augment=augment), epochs)
    return run_steps(params, batches, step_loss, total_steps=total, lr=lr, weight_decay=weight_decay,
                     warmup_steps=min(warmup_steps, total // 2))


def assemble_student(config, modules: Sequence[StudentModule]) -> VisionTransformer:
    """The full student from its modules' segments (stitches dropped); strict: every key exactly once."""
    state: dict[str, torch.Tensor] = {}
    for m in modules:
        for k, v in m.segment.state_dict().items():
            if k in state:
                raise ConfigError(f"assemble_student: {k} appears in two modules")
            state[k] = v.detach().clone()
    model = VisionTransformer(config)
    model.load_state_dict(state, strict=True)
    return model


def meta_from_teacher(teacher: VisionTransformer, sizes: Sequence[int], pick: str = "last") -> VisionTransformer:
    """A meta model with one block per module taken from the teacher (the ``last`` or ``first`` block of each
    module) plus the teacher's embedding, final norm and head.

    Deviation: the paper pretrains an independent meta model and builds the teacher with Deep Incubation
    inside it, so teacher modules fit the meta model. A teacher trained on its own and split afterwards does
    not fit an independent meta model (its teacher hybrids scored 23% and 43% against the teacher's 89% in
    docs/results/upcycling.md); a meta model made of the teacher's own blocks keeps the teacher hybrids
    close to the teacher. Fine-tune it end to end (``moevision.train.fit`` with ``train.init_from``) if
    wanted."""
    if pick not in ("last", "first"):
        raise ConfigError(f"pick={pick!r} must be 'last' or 'first'")
    import copy

    segs = split_model(teacher, sizes)  # validates the sizes
    blocks = [s.stop - 1 if pick == "last" else s.start for s in segs]
    cfg = copy.deepcopy(teacher.config)
    cfg.depth = len(blocks)
    meta = VisionTransformer(cfg)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
    for j, b in enumerate(blocks):
        state.update({f"blocks.{j}.{k}": v for k, v in teacher.blocks[b].state_dict().items()})
    meta.load_state_dict(state)
    meta.model_name = f"{getattr(teacher, 'model_name', None) or 'vit'}_meta"
    return meta


@torch.no_grad()
def hybrid_accuracy(segments: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of a chain of segments/modules (e.g. a teacher or student hybrid) on normalised images."""
    for s in segments:
        s.eval()
    z, _ = run_segments(segments, x)
    return float((z.argmax(-1) == y).float().mean())


def m2mkd(teacher: VisionTransformer, meta: VisionTransformer, student: VisionTransformer, train: ImageDataset, *,
          teacher_sizes: Sequence[int], student_sizes: Sequence[int], log: Callable[[str], None] = lambda s: None,
          **kw) -> VisionTransformer:
    """Phase 2 for every module (sequentially; the pairs are independent), then the assembled student
    (phase 3, end-to-end training, is left to ``moevision.train.fit``)."""
    if len(teacher_sizes) != len(student_sizes):
        raise ConfigError(f"teacher and student need the same number of modules: {teacher_sizes} vs {student_sizes}")
    modules = student_modules(student, student_sizes, meta.config.embed_dim)
    for i, mod in enumerate(modules):
        losses = distill_module(i, teacher=teacher, meta=meta, module=mod, teacher_sizes=teacher_sizes, train=train,
                                **kw)
        log(f"m2mKD module {i}: {len(losses)} steps, loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return assemble_student(student.config, modules)


__all__ = ["ViTSegment", "split_model", "run_segments", "StitchAdapter", "StudentModule", "m2mkd_loss",
           "student_modules", "distill_module", "assemble_student", "m2mkd", "meta_from_teacher", "hybrid_accuracy",
           "DISTILLATION_TYPES"]

