"""The training loop: AdamW, warmup + cosine, label smoothing, gradient clipping, aux-loss weighting,
optional bf16 autocast, evaluation each epoch, JSONL metrics, atomic checkpoints and exact resume.

Exact resume: the data order of an epoch depends only on (seed, epoch), the augmentation of a step only
on (seed, step), and the global torch RNG (dropout, router noise, random routing) is saved in the
checkpoint. A run stopped after any checkpoint and resumed ends with the same weights.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..data import ImageDataset, build_augment, get_dataset, iterate_batches, normalize, num_batches
from ..errors import CheckpointError, ConfigError, DivergenceError
from ..models import create_model
from ..utils import atomic_write
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .hooks import build_step_hooks
from .optim import build_optimizer, set_lr, warmup_cosine
from .run_config import DEVICE_PATTERN, RunConfig

CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, MODEL_DIR = "config.json", "metrics.jsonl", "summary.json", "model"
# what a run leaves in its directory (train, eval, analyze's default output, a vision-language run's stages)
RUN_ARTIFACTS = (CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME, "eval.json", CONFIG_NAME, MODEL_DIR, "analysis", "stages")


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``--device`` / ``train.device``) -> a torch device."""
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise ConfigError(f"device {name!r} (--device / train.device) is not supported; use auto, cpu, cuda "
                          f"or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use --device cpu")
    return torch.device(name)


def load_data(cfg: RunConfig) -> tuple[ImageDataset, ImageDataset]:
    d = cfg.data
    train = get_dataset(d.dataset, "train", d.data_dir, download=d.download)
    test = get_dataset(d.dataset, "test", d.data_dir, download=d.download)
    if d.train_subset is not None and d.train_subset < len(train):
        train = train.subset(d.train_subset, seed=cfg.train.seed)
    if d.test_subset is not None and d.test_subset < len(test):
        test = test.subset(d.test_subset, seed=cfg.train.seed)
    m = cfg.model
    if train.image_shape != (m.in_chans, m.img_size, m.img_size):
        raise ConfigError(f"data.dataset={d.dataset!r} has images {train.image_shape} but the model expects "
                          f"({m.in_chans}, {m.img_size}, {m.img_size}); set model.img_size / model.in_chans")
    if train.num_classes != m.num_classes:
        raise ConfigError(f"data.dataset={d.dataset!r} has {train.num_classes} classes, model.num_classes="
                          f"{m.num_classes}")
    return train, test


def build_model(cfg: RunConfig) -> torch.nn.Module:
    """The run's model with fresh weights (``fit`` loads ``train.init_from`` weights into it)."""
    if cfg.train.init_from is not None:  # the name may be unregistered (an upcycled or converted model)
        from ..models import VisionTransformer

        model = VisionTransformer(cfg.model)
        model.model_name = cfg.model_name
        return model
    return create_model(cfg.model_name, **cfg.model.to_dict())


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class _LayerStats:
    """Accumulates per-MoE-layer expert load and dropped fraction over batches."""

    def __init__(self):
        self.load: dict[int, torch.Tensor] = {}
        self.dropped: dict[int, float] = {}
        self.n = 0

    def add(self, out) -> None:
        self.n += 1
        for blk, st in zip(out.moe_layers, out.routing):
            self.load[blk] = self.load.get(blk, 0) + st.tokens_per_expert.float().cpu()
            self.dropped[blk] = self.dropped.get(blk, 0.0) + float(st.dropped_fraction)

    def all_reduce(self, all_sum) -> None:
        """Sum the accumulated statistics over ranks (``all_sum``: a list of floats -> their sums)."""
        keys = sorted(self.load)
        sizes = [self.load[k].numel() for k in keys]
        flat = all_sum([x for k in keys for x in self.load[k].tolist()] + [self.dropped[k] for k in keys] + [self.n])
        off = 0
        for k, m in zip(keys, sizes):
            self.load[k], off = torch.tensor(flat[off:off + m]), off + m
        for k in keys:
            self.dropped[k], off = flat[off], off + 1
        self.n = int(flat[off])

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for blk, load in self.load.items():
            frac = load / load.sum().clamp_min(1e-9)
            cv = float(frac.std(unbiased=False) / frac.mean()) if frac.numel() > 1 else 0.0
            rows.append({"block": blk, "expert_load": [round(float(f), 4) for f in frac],
                         "load_cv": round(cv, 4), "dropped_fraction": round(self.dropped[blk] / self.n, 5)})
        return rows


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ImageDataset, *, batch_size: int = 500, device="cpu",
             amp: bool = False, progress: bool = False,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None, parallel=None) -> dict[str, Any]:
    """Accuracy, mean cross-entropy and per-MoE-layer routing statistics on ``dataset``.
    ``transform`` (e.g. a corruption) is applied to the [0, 1] images before normalisation.
    ``parallel`` (a ``distributed.training.DistributedRun``): every rank evaluates its slice of each
    batch and the results are summed over ranks (every rank calls this)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    layers = _LayerStats()
    shard = parallel.data_shard if parallel is not None else None
    it = iterate_batches(dataset, batch_size, shuffle=False, device=device, shard=shard)
    for images, labels in tqdm(it, total=num_batches(len(dataset), batch_size), desc="eval", leave=False,
                               disable=not progress, dynamic_ncols=True):
        if images.shape[0] == 0:  # this rank's slice of a short last batch: still join the collectives
            with _autocast(device, amp):
                parallel.idle_forward(model, dataset.image_shape, device)
            continue
        if transform is not None:
            images = transform(images.cpu()).to(device)
        with _autocast(device, amp):
            out = model(normalize(images, dataset.mean, dataset.std))
        logits = out.logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        n += labels.numel()
        layers.add(out)
    if parallel is not None and parallel.world_size > 1:
        correct, loss_sum, n = parallel.all_sum([correct, loss_sum, n])
        correct, n = int(correct), int(n)
        layers.all_reduce(parallel.all_sum)
    model.train(was_training)
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "num_images": n,
            "moe_layers": layers.summary()}


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint so the log reads as one run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write(path, lambda p: Path(p).write_text("".join(l + "\n" for l in keep)))


def clear_run_artifacts(run_dir: Path, init_from: str | os.PathLike | None = None) -> None:
    """Delete what an earlier run left in ``run_dir`` (``RUN_ARTIFACTS``) before a fresh run starts there
    (``train --overwrite``), so that its checkpoint or final model is never taken for the new run's. Refuses
    (deleting nothing) when ``init_from``, the new run's starting weights, lies in one of those artifacts."""
    if init_from is not None:
        init, out = Path(init_from).resolve(), Path(run_dir).resolve()
        if init == out or any(out / a in (init, *init.parents) for a in RUN_ARTIFACTS):
            raise ConfigError(f"the initial weights {init_from} (--init / train.init_from) are part of {run_dir}'s "
                              f"previous run, which a fresh run there deletes; copy that model directory "
                              f"elsewhere first, or pass another --out")
    for name in RUN_ARTIFACTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def write_run_config(cfg: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"moevision_version": __version__, **cfg.to_dict()}
    atomic_write(run_dir / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(data, indent=2) + "\n"))


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {run_dir} is not a moevision run directory")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is corrupt: expected a JSON object (a run config), got a JSON "
                                  f"{type(data).__name__}; restore it, or start a new run")
        data.pop("moevision_version", None)
        if data.get("kind") == "vlm":  # a vision-language run (train/vlm.py)
            from .vlm import VLMRunConfig
            return VLMRunConfig.from_dict(data)
        return RunConfig.from_dict(data)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt (invalid JSON: {e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path} is not a valid run config: {e}") from None


def fit(cfg: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (resuming from its checkpoint when ``resume``); return the summary.

    ``on_step(step)`` is called after every optimiser step (hooks, tests). An interrupt (Ctrl-C) leaves
    the last complete checkpoint in place: a checkpoint is only ever written between steps.
    """
    if getattr(cfg, "kind", None) == "vlm":  # vision-language recipes run MoE-LLaVA's stages (train/vlm.py)
        from .vlm import fit_vlm
        return fit_vlm(cfg, run_dir, resume=resume, progress=progress, log=log)
    wall_start = time.perf_counter()
    run_dir = Path(run_dir)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    from ..distributed.training import setup_parallel

    par = setup_parallel(cfg)  # torchrun: W ranks (DP x EP); else one process, exactly as before
    write_jsonl = _append_jsonl if par.is_main else (lambda *_: None)  # rank 0 writes files and logs
    if not par.is_main:
        progress, log = False, (lambda *_: None)
    device = par.device or resolve_device(tc.device)
    train_ds, test_ds = load_data(cfg)
    torch.manual_seed(tc.seed)
    model = par.prepare_model(build_model(cfg).to(device), tc.seed)
    _kernels_note(model, device)  # builds the native CPU kernels now if needed, not inside a timed step
    optimizer = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas)
    augment = build_augment(cfg.data.augment)
    hooks = build_step_hooks(cfg, model)
    if par.world_size > 1:
        par.check_hooks(hooks)
    bs = cfg.data.batch_size
    steps_per_epoch = num_batches(len(train_ds), bs, drop_last=len(train_ds) >= bs)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    warmup = int(round(tc.warmup_epochs * steps_per_epoch))
    ckpt_path, metrics_path = run_dir / CHECKPOINT_NAME, run_dir / METRICS_NAME

    step, epoch, batch_in_epoch, train_seconds, last_eval, prior_wall = 0, 0, 0, 0.0, None, 0.0
    window = None
    if resume:
        st = par.load_checkpoint(ckpt_path, model=model, optimizer=optimizer)
        lacks = [k for k in ("step", "epoch", "batch_in_epoch", "train_seconds")
                 if not isinstance(st, dict) or not isinstance(st.get(k), (int, float))]
        if lacks:
            what = (f"has no valid {', '.join(lacks)}" if isinstance(st, dict) else
                    f"is a JSON {type(st).__name__}, not an object")
            raise CheckpointError(f"checkpoint {ckpt_path} is corrupt: its training state {what}; resume from an "
                                  f"intact copy, or start the run again with --overwrite")
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        train_seconds, last_eval = st["train_seconds"], st.get("last_eval")
        prior_wall = st.get("wall_seconds", 0.0)
        window = st.get("log_window")  # the logging window's sums (absent in older checkpoints)
        if par.is_main:
            _truncate_metrics(metrics_path, step)
        log(f"resumed {run_dir} at step {step} (epoch {epoch + 1}, batch {batch_in_epoch})")
    else:
        if tc.init_from is not None:
            from .init_from import load_init_optimizer_state, load_init_weights

            load_init_weights(model, tc.init_from)
            if tc.init_optimizer_state:
                load_init_optimizer_state(model, optimizer, tc.init_from)
        if par.is_main:
            if run_dir.is_dir():  # a fresh run: nothing of an earlier one in run_dir may pass for its output
                clear_run_artifacts(run_dir, tc.init_from)
            write_run_config(cfg, run_dir)

    def checkpoint() -> None:
        # the logging window's sums over all ranks, so the first record after a resume averages the same steps
        loss_sum, correct, n = par.all_sum([run_loss, run_correct, run_n])
        par.save_checkpoint(ckpt_path, model=model, optimizer=optimizer, state={
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "train_seconds": train_seconds,
            "last_eval": last_eval, "total_steps": total_steps,
            "wall_seconds": prior_wall + time.perf_counter() - wall_start,
            "log_window": {"loss": loss_sum, "correct": int(correct), "n": int(n)}})

    final = None
    start_step, prior_train_seconds = step, train_seconds  # where this process starts (resume)
    model.train()
    # the compiled module shares the parameters; checkpoints, hooks and evaluation use ``model`` itself
    fwd_model = torch.compile(model, mode=tc.compile) if tc.compile else model
    first_step_seconds = None  # this process's first step (compilation, with train.compile)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    run_loss, run_correct, run_n, window_t, window_imgs = 0.0, 0, 0, time.perf_counter(), 0
    if par.is_main and isinstance(window, dict):  # rank 0 holds the sums; all_sum adds the others' 0
        try:
            run_loss, run_correct, run_n = float(window["loss"]), int(window["correct"]), int(window["n"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"checkpoint {ckpt_path} is corrupt: invalid log_window {window!r}") from None
    try:
        while epoch < tc.epochs and step < total_steps:
            batches = iterate_batches(train_ds, bs, shuffle=True, seed=tc.seed, epoch=epoch,
                                      drop_last=len(train_ds) >= bs, start_batch=batch_in_epoch,
                                      shard=par.data_shard)
            for images, labels in batches:
                t0 = time.perf_counter()
                gen = torch.Generator().manual_seed(par.aug_seed(tc.seed * 1_000_003 + step))
                # augment on the host with its seeded generator, then one transfer to the device
                x = normalize(augment(images, gen).to(device), train_ds.mean, train_ds.std)
                labels = labels.to(device)
                set_lr(optimizer, warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup,
                                                lr=tc.lr, min_lr=tc.min_lr))
                with _autocast(device, tc.amp):
                    out = fwd_model(x)
                logits = out.logits.float()
                task_loss = F.cross_entropy(logits, labels, label_smoothing=tc.label_smoothing)
                loss = task_loss + tc.aux_loss_weight * out.aux_loss.float()
                if not torch.isfinite(loss):
                    bar.close()
                    fix = (f"lower train.lr (now {tc.lr:g}) or train.grad_clip (now {tc.grad_clip:g})"
                           if tc.grad_clip is not None else
                           f"lower train.lr (now {tc.lr:g}) or enable gradient clipping (--set train.grad_clip=1.0)")
                    raise DivergenceError(f"training diverged: the loss is {float(loss.detach())} at step {step}; "
                                          f"{fix}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                par.reduce_gradients(model)
                if tc.grad_clip is not None:
                    par.clip_grad_norm_(model, tc.grad_clip)
                optimizer.step()
                step += 1
                for hook in hooks:
                    hook(model, step, total_steps)
                batch_in_epoch += 1
                dt = time.perf_counter() - t0
                train_seconds += dt
                if first_step_seconds is None:
                    first_step_seconds = dt
                run_loss += float(task_loss.detach()) * labels.numel()
                run_correct += int((logits.argmax(-1) == labels).sum())
                run_n += labels.numel()
                window_imgs += labels.numel()
                bar.update(1)
                if step % tc.log_every == 0 or step == total_steps:
                    run_loss, run_correct, run_n, window_imgs = par.all_sum([run_loss, run_correct, run_n, window_imgs])
                    ips = window_imgs / max(time.perf_counter() - window_t, 1e-9)
                    rec = {"type": "train", "step": step, "epoch": epoch + batch_in_epoch / steps_per_epoch,
                           "loss": run_loss / run_n, "train_accuracy": run_correct / run_n,
                           "aux_loss": float(out.aux_loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                           "images_per_s": ips}
                    write_jsonl(metrics_path, rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_accuracy']:.3f}",
                                    img_s=f"{ips:.0f}", epoch=f"{rec['epoch']:.2f}")
                    run_loss, run_correct, run_n, window_t, window_imgs = 0.0, 0, 0, time.perf_counter(), 0
                if step % tc.checkpoint_every == 0:
                    checkpoint()
                if on_step is not None:
                    on_step(step)
                if step >= total_steps:
                    break
            if batch_in_epoch >= steps_per_epoch or step >= total_steps:
                finished_epoch = batch_in_epoch >= steps_per_epoch
                if finished_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                if step >= total_steps or epoch % tc.eval_every == 0:
                    ev = evaluate(model, test_ds, batch_size=cfg.data.eval_batch_size, device=device, amp=tc.amp,
                                  parallel=par if par.world_size > 1 else None)
                    final = ev if step >= total_steps else None
                    last_eval = {"accuracy": ev["accuracy"], "loss": ev["loss"]}
                    write_jsonl(metrics_path, {"type": "eval", "step": step, "epoch": epoch,
                                                 "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
                                                 "moe_layers": ev["moe_layers"]})
                    (bar.write if progress else log)(f"epoch {epoch}/{tc.epochs}  step {step}  test accuracy "
                                                     f"{ev['accuracy']:.4f}  test loss {ev['loss']:.4f}")
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        log(f"\ninterrupted at step {step}. Resume from the last checkpoint with: moevision train --resume {run_dir}")
        raise
    bar.close()

    if final is None:  # the run ended without evaluating its final weights (resumed finished run, ...)
        final = evaluate(model, test_ds, batch_size=cfg.data.eval_batch_size, device=device, amp=tc.amp,
                         parallel=par if par.world_size > 1 else None)
    par.save_pretrained(model, run_dir / MODEL_DIR)  # always the full model
    summary = make_summary(cfg, par.full_model(model), final, train_seconds=train_seconds, steps=step,
                           images_seen=step * bs, device=device)
    summary["epochs"] = round(step / steps_per_epoch, 3)
    if tc.compile:
        summary["compile"] = tc.compile
        if first_step_seconds is not None and step - start_step > 1:
            # steady-state throughput: the first step of a compiled run is mostly compilation
            rest = max(train_seconds - prior_train_seconds - first_step_seconds, 1e-9)
            summary.update(first_step_seconds=round(first_step_seconds, 2),
                           images_per_s_after_first=round((step - start_step - 1) * bs / rest, 1))
    summary["wall_seconds"] = round(prior_wall + time.perf_counter() - wall_start, 2)
    if getattr(par, "mesh", None) is not None:  # launched by torchrun (world size 1 included)
        summary["world_size"], summary["ep"] = par.world_size, par.mesh.ep
    if par.is_main:
        atomic_write(run_dir / SUMMARY_NAME, lambda p: Path(p).write_text(json.dumps(summary, indent=2) + "\n"))
    par.close()
    return summary


def make_summary(cfg: RunConfig, model, ev: dict[str, Any], *, train_seconds: float, steps: int,
                 images_seen: int, device) -> dict[str, Any]:
    return {
        "recipe": cfg.recipe, "model_name": cfg.model_name, "dataset": cfg.data.dataset,
        "test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "test_images": ev["num_images"],
        "train_seconds": round(train_seconds, 2), "steps": steps,
        "images_per_s": round(images_seen / max(train_seconds, 1e-9), 1),
        "params_total": model.num_params(), "params_active": model.num_active_params(),
        "moe_layers": ev["moe_layers"], "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "moevision": __version__,
        "kernels": _kernels_note(model, device),
    }


def _kernels_note(model, device) -> str | None:
    """Which MoE execution path ran, for the summary: on CPU whether the native kernels were in use."""
    from ..kernels import native_status
    from ..moe import MoE

    if torch.device(device).type != "cpu" or not any(isinstance(m, MoE) for m in model.modules()):
        return None
    from ..kernels import native_ops

    native_ops()  # loads (first call: builds) them, so the status is final
    return native_status()


def format_summary(s: dict[str, Any]) -> str:
    if s.get("kind") == "vlm":
        from .vlm import format_vlm_summary
        return format_vlm_summary(s)
    lines = [
        f"{'model':<22}{s['model_name']}  (recipe {s['recipe']}, {s['dataset']})",
        f"{'test accuracy':<22}{100 * s['test_accuracy']:.2f}%  ({s['test_images']} images, loss {s['test_loss']:.4f})",
        f"{'parameters':<22}{s['params_total'] / 1e6:.3f}M total, {s['params_active'] / 1e6:.3f}M active per token",
    ]
    if s.get("train_seconds") is not None:
        lines.append(f"{'training':<22}{s['train_seconds']:.1f} s in steps, {s['steps']} steps, "
                     f"{s['images_per_s']:.0f} images/s on {s['device']} ({s['threads']} threads)")
    if s.get("kernels"):
        lines.append(f"{'kernels':<22}{s['kernels']}")
    if s.get("first_step_seconds") is not None:
        lines.append(f"{'torch.compile':<22}mode {s['compile']}: first step {s['first_step_seconds']:.1f} s "
                     f"(compilation), then {s['images_per_s_after_first']:.0f} images/s")
    if s.get("wall_seconds") is not None:
        lines.append(f"{'wall time':<22}{s['wall_seconds']:.1f} s (data, evaluation and checkpoints included)")
    if s["moe_layers"]:
        lines.append("MoE layers (test set):")
        lines.append(f"  {'block':<7}{'dropped':>9}{'load CV':>9}   expert load (share of assignments)")
        for r in s["moe_layers"]:
            load = " ".join(f"{x:.2f}" for x in r["expert_load"])
            lines.append(f"  {r['block']:<7}{100 * r['dropped_fraction']:>8.2f}%{r['load_cv']:>9.3f}   {load}")
    return "\n".join(lines)
