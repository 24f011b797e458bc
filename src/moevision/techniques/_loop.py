"""A small training loop for the multi-phase techniques (CLIP-MoE stages and router training, m2mKD
module distillation): AdamW over a chosen parameter subset, warmup + cosine, gradient clipping, seeded
batch order and augmentation. Whole-model phases use ``moevision.train.fit`` instead."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from ..data import ImageDataset, build_augment, iterate_batches, normalize
from ..errors import ConfigError
from ..train.optim import set_lr, warmup_cosine


def freeze_all_but(model: torch.nn.Module, trainable: Callable[[str], bool]) -> list[str]:
    """Set ``requires_grad`` from ``trainable(name)``; return the trainable parameter names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable(name)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ConfigError("no parameter is left trainable")
    return names


def freeze_norm_stats(model: torch.nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode, so a phase that trains other
    parameters does not move their running statistics (call after ``model.train()``)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()


def shuffled_batches(dataset: ImageDataset, batch_size: int, *, seed: int, epoch: int, augment: str = "none",
                     device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (x, y) batches in the seeded order of ``epoch`` (full batches only)."""
    aug = build_augment(augment)
    for b, (images, labels) in enumerate(iterate_batches(dataset, batch_size, shuffle=True, seed=seed, epoch=epoch,
                                                         drop_last=len(dataset) >= batch_size)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 100_003 + b)
        yield normalize(aug(images, gen), dataset.mean, dataset.std).to(device), labels.to(device)


def index_batches(dataset: ImageDataset, batches: Iterable[torch.Tensor], device="cpu"):
    """Normalised (x, y) for explicit index batches (e.g. single-cluster batches)."""
    for idx in batches:
        x = normalize(dataset.float_images(idx), dataset.mean, dataset.std)
        yield x.to(device), dataset.labels[idx].to(device)


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, *, betas=(0.9, 0.999),
          exclude_decay: Iterable[torch.nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms and ``exclude_decay`` get none)."""
    skip = {id(p) for p in exclude_decay}
    decay = [p for p in params if p.ndim > 1 and id(p) not in skip]
    no_decay = [p for p in params if p.ndim <= 1 or id(p) in skip]
    return torch.optim.AdamW([g for g in ({"params": decay, "weight_decay": weight_decay},
                                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]],
                             lr=lr, betas=tuple(betas))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, grad_clip: float | None, where: str
                   ) -> None:
    """Refuse a non-finite loss (naming ``where``), then zero_grad, backward, clip and step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: loss is {float(loss)}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def run_steps(params: list[torch.nn.Parameter], batches: Iterable, loss_fn: Callable, *, total_steps: int,
              lr: float, weight_decay: float = 0.05, warmup_steps: int = 0, min_lr: float | None = None,
              grad_clip: float | None = 1.0, betas=(0.9, 0.999), progress: Callable[[int, float], None] | None = None
              ) -> list[float]:
    """Optimise ``params`` with AdamW on ``loss_fn(x, y)`` over ``batches``; returns the loss per step."""
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps}: the phase has no full batch to train on")
    opt = adamw(params, lr, weight_decay, betas=betas)
    min_lr = lr * 0.01 if min_lr is None else min_lr
    losses = []
    for step, (x, y) in enumerate(batches):
        if step >= total_steps:
            break
        set_lr(opt, warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup_steps, lr=lr, min_lr=min_lr))
        loss = loss_fn(x, y)
        optimizer_step(opt, loss, params, grad_clip, f"step {step}")
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    return losses


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size if n >= batch_size else 1


def epochs_of(batches_fn: Callable[[int], Iterable], epochs: int):
    """Chain ``batches_fn(epoch)`` for ``epochs`` epochs."""
    for e in range(epochs):
        yield from batches_fn(e)
