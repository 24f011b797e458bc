"""The complete description of a run: model, data and training settings (a recipe returns one)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .. import config as C
from ..errors import ConfigError
from ..data import AUGMENTS, DATASETS
from ..models.vit import ViTConfig


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    data_dir: str | None = None  # None: $MOEVISION_DATA, the Debian package, the user cache
    download: bool = False  # fetch Fashion-MNIST from its official mirror when found nowhere
    train_subset: int | None = None  # use a random subset of this many training images
    test_subset: int | None = None
    augment: str = "flip_crop"
    batch_size: int = 128
    eval_batch_size: int = 500

    def validate(self) -> None:
        C.check(self.dataset in DATASETS, "data.dataset", self.dataset, f"must be one of {DATASETS}")
        C.check(self.augment in AUGMENTS, "data.augment", self.augment, f"must be one of {AUGMENTS}")
        for k in ("batch_size", "eval_batch_size"):
            C.check(getattr(self, k) >= 1, f"data.{k}", getattr(self, k), "must be >= 1")
        for k in ("train_subset", "test_subset"):
            v = getattr(self, k)
            C.check(v is None or v >= 1, f"data.{k}", v, "must be >= 1 or none")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# what train.device / --device accept (engine.resolve_device reads the same)
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop early after this many optimiser steps (tests, smoke runs)
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 0.5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    aux_loss_weight: float = 1.0  # multiplies the (already weighted) MoE aux losses
    amp: bool = False  # bfloat16 autocast
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # torch CPU threads; None = all cores
    log_every: int = 50
    checkpoint_every: int = 200  # steps; a checkpoint is also written at the end of every epoch
    eval_every: int = 1  # epochs
    # start from the weights of a model directory (save_pretrained / `moevision upcycle`); strict key and
    # shape checks (moevision.train.init_from). `moevision train --init DIR` also takes its model config.
    init_from: str | None = None
    init_optimizer_state: bool = False  # also load DIR/optimizer.safetensors (upcycled Adam moments)
    # torch.compile the training forward (+ its backward): null = eager; else the mode, one of
    # COMPILE_MODES ("reduce-overhead" adds CUDA graphs on a GPU: the MoE layers' fused path has no host
    # sync, so the whole step is capturable). Evaluation stays eager. Needs Triton on CUDA, a C++
    # compiler on CPU.
    compile: str | None = None

    def validate(self) -> None:
        C.check(self.compile is None or self.compile in COMPILE_MODES, "train.compile", self.compile,
                f"must be null or one of {list(COMPILE_MODES)}")
        C.check(not self.init_optimizer_state or self.init_from is not None, "train.init_optimizer_state",
                self.init_optimizer_state, "needs train.init_from")
        C.check(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        C.check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, "must be >= 1")
        C.check(0 < self.lr < math.inf, "train.lr", self.lr, "must be a finite number > 0")
        C.check(0 <= self.min_lr <= self.lr, "train.min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        C.check(0 <= self.warmup_epochs < math.inf, "train.warmup_epochs", self.warmup_epochs,
                "must be a finite number >= 0")
        C.check(0 <= self.weight_decay < math.inf, "train.weight_decay", self.weight_decay,
                "must be a finite number >= 0")
        C.check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", self.betas,
                "must be two numbers in [0, 1)")
        C.check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        C.check(self.grad_clip is None or 0 < self.grad_clip < math.inf, "train.grad_clip", self.grad_clip,
                "must be a finite number > 0 or none")
        C.check(0 <= self.aux_loss_weight < math.inf, "train.aux_loss_weight", self.aux_loss_weight,
                "must be a finite number >= 0")
        C.check(isinstance(self.device, str) and re.fullmatch(DEVICE_PATTERN, self.device) is not None,
                "train.device", self.device, "must be auto, cpu, cuda or cuda:N")
        C.check(self.num_threads is None or self.num_threads >= 1, "train.num_threads", self.num_threads, ">= 1")
        for k in ("log_every", "checkpoint_every", "eval_every"):
            C.check(getattr(self, k) >= 1, f"train.{k}", getattr(self, k), "must be >= 1")


@dataclass
class EWAConfig:
    """Experts Weights Averaging (Huang et al. 2023): after each optimiser step, pull every expert of the
    random-routed MoE layers toward the others with share rate ``beta`` ([R] defaults). "Early EWA": with
    ``stop_fraction`` < 1 only during that first fraction of the steps; a model without random-routed MoE
    layers then gets it on its router-based ones (``techniques.ewa``)."""

    enabled: bool = False
    beta: float = 0.3
    mode: str = "others"  # "others" (paper's share-rate form) | "mean"
    stop_fraction: float = 1.0  # "Early EWA": apply only during this fraction of training (router-based MoEs too)

    def validate(self) -> None:
        C.check(0.0 <= self.beta <= 1.0, "techniques.ewa.beta", self.beta, "must be in [0, 1]")
        C.check(self.mode in ("others", "mean"), "techniques.ewa.mode", self.mode, "must be 'others' or 'mean'")
        C.check(0.0 < self.stop_fraction <= 1.0, "techniques.ewa.stop_fraction", self.stop_fraction,
                "must be in (0, 1]")


@dataclass
class TechniquesConfig:
    ewa: EWAConfig = field(default_factory=EWAConfig)


@dataclass
class ParallelConfig:
    """Multi-process training, launched with ``torchrun --nproc-per-node N -m moevision train ...``.
    ``ep``: expert-parallel degree (each MoE layer's experts are split over ``ep`` ranks; the world is
    ``world_size // ep`` data-parallel replicas of that group); 1 = pure data parallel. ``backend``:
    auto (nccl on CUDA, gloo on CPU), gloo or nccl. ``layout``: the expert-parallel dispatch, auto
    (padded with a capacity, ragged when dropless), ragged, padded, gather (move the expert weights,
    not the tokens: Tutel's r=0) or adaptive (per call, the cheaper of padded and gather).
    ``overlap_degree``: padded exchanges pipelined in this many capacity chunks (Tutel's
    a2a_ffn_overlap_degree, 1-32), or "auto" (Tutel's online choice per capacity, timed on the first
    calls). See docs/distributed.md."""

    ep: int = 1
    backend: str = "auto"
    layout: str = "auto"
    overlap_degree: int | str = 1

    def validate(self) -> None:
        C.check(isinstance(self.ep, int) and self.ep >= 1, "parallel.ep", self.ep, "must be a positive integer")
        C.check(self.backend in ("auto", "gloo", "nccl"), "parallel.backend", self.backend,
                "must be auto, gloo or nccl")
        C.check(self.layout in ("auto", "ragged", "padded", "gather", "adaptive"), "parallel.layout", self.layout,
                "must be auto, ragged, padded, gather or adaptive")
        od = self.overlap_degree
        C.check(od == "auto" or (isinstance(od, int) and not isinstance(od, bool) and 1 <= od <= 32),
                "parallel.overlap_degree", od, "must be an integer in [1, 32] or auto")


@dataclass
class RunConfig:
    recipe: str = "custom"
    model_name: str = "moe_vit_fmnist_hybrid"
    model: ViTConfig = field(default_factory=ViTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    techniques: TechniquesConfig = field(default_factory=TechniquesConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:  # sections validate themselves (config.validate_config); cross-section here
        if self.train.compile is not None and self.parallel.ep > 1:
            raise ConfigError(f"train.compile={self.train.compile!r} is not supported with expert parallelism "
                              f"(parallel.ep={self.parallel.ep}); set train.compile=null or parallel.ep=1")
        if self.model.task_routing != "none":
            raise ConfigError(f"model.task_routing={self.model.task_routing!r}: `moevision train` trains one "
                              f"task, so there is no task id to route by; train task-routed models with "
                              f"`moevision multitask` or moevision.techniques.multitask.MultiTaskViT, or set "
                              f"model.task_routing=none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        cfg = C.from_dict(cls, d)
        C.validate_config(cfg)
        return cfg
