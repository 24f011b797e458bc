"""The experiment behind ``moevision compress``: compress a trained MoE model (QMoE / RTN / pruning /
merging), measure bits per expert parameter, checkpoint size, accuracy before and after and the
inference time with run-time decoding; and the sweep that writes ``docs/results/qmoe.md``.

Calibration images come from the training split only (QMoE's hygiene: evaluation data never enters
a Hessian); evaluation is on the test split.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ...data import ImageDataset, normalize
from ...errors import ConfigError
from .calibrate import DTYPES, QMoEConfig
from .compressed import CompressedExperts
from .prune import expert_usage, merge_by_similarity, prune_by_usage
from .ratecontrol import build, search
from .storage import compress_model, compression_stats, expert_param_count, save_compressed

METHODS = ("qmoe", "rtn", "prune", "merge")


@dataclass
class CompressOptions:
    method: str = "qmoe"
    qmoe: QMoEConfig = field(default_factory=QMoEConfig)
    calib_images: int = 1024
    seed: int = 0
    keep: int | None = None  # prune: experts kept per layer
    merge_to: int | None = None  # merge: experts per layer after merging
    merge_weighting: str = "usage"
    merge_router: str = "mean"
    dense_dtype: str = "float32"  # storage of the non-expert weights in the compressed checkpoint
    batch_size: int = 256
    target_bits: float | None = None  # ternary: meet this many bits/param (see ratecontrol)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.calib_images, int) and self.calib_images >= 1):
            raise ConfigError(f"calib_images must be a positive integer, got {self.calib_images!r}")
        if self.method == "prune" and self.keep is None:
            raise ConfigError("method 'prune' needs keep (experts kept per layer, e.g. --keep 3)")
        if self.method == "merge" and self.merge_to is None:
            raise ConfigError("method 'merge' needs merge_to (experts per layer after merging, e.g. --merge-to 2)")
        if self.dense_dtype not in DTYPES:
            raise ConfigError(f"dense_dtype must be one of {sorted(DTYPES)}, got {self.dense_dtype!r}")
        if self.target_bits is not None and not (self.target_bits > 0 and self.qmoe.bits == "ternary"):
            raise ConfigError(f"target_bits={self.target_bits!r} needs bits='ternary' and a value > 0")
        self.qmoe.method = "rtn" if self.method == "rtn" else "gptq"
        self.qmoe.validate()


def image_batches(ds: ImageDataset, batch_size: int, device) -> list[torch.Tensor]:
    x = ds.images.float() / 255.0 if ds.images.dtype == torch.uint8 else ds.images.float()
    return [normalize(b, ds.mean, ds.std).to(device) for b in torch.split(x, batch_size)]


def compress(model: torch.nn.Module, calib: list[torch.Tensor], opts: CompressOptions,
             log: Callable[[str], None] = lambda s: None) -> tuple[torch.nn.Module, dict]:
    """The compressed model (a new module; ``model`` is left alone) and what was done to it."""
    opts.validate()
    if opts.method in ("qmoe", "rtn"):
        if opts.target_bits is None:
            best, record = build(model, calib, opts.qmoe, log), {}
        else:
            best, record = search(model, calib, opts.qmoe, opts.target_bits, log)
        q, work, res, out, stats = best.config, best.work, best.results, best.model, best.stats
        info = {"layers": {n: r[1] for n, r in res.items()}, "zero_threshold": q.zero_threshold,
                "percdamp": q.percdamp, **record, **stats}
        if q.bits == "ternary":
            zeros = sum(int((r.codes == 0).sum()) for layer, _ in res.values() for r in layer.values())
            info["zero_fraction"] = zeros / stats["expert_weight_entries"]
            # what the other code layout would cost (the spec's row layout stores int32 row offsets)
            alt = compress_model(work, res, replace(q, layout=alt_layout(q.layout)))
            info[f"bits_per_expert_param_{alt_layout(q.layout)}"] = compression_stats(alt)["bits_per_expert_param"]
        return out, info
    usage = expert_usage(model, calib)
    if opts.method == "prune":
        out, keep = prune_by_usage(model, usage, opts.keep)
        info = {"kept": keep}
    else:
        out, groups = merge_by_similarity(model, usage, opts.merge_to, weighting=opts.merge_weighting,
                                          router=opts.merge_router)
        info = {"groups": groups}
    info["usage"] = {n: [int(v) for v in u.tolist()] for n, u in usage.items()}
    params = expert_param_count(model)
    info.update(expert_params=params, expert_bytes=4 * expert_param_count(out),
                bits_per_expert_param=32 * expert_param_count(out) / params,
                expert_bytes_fp32=4 * params, expert_bytes_bf16=2 * params)
    return out, info


def alt_layout(layout: str) -> str:
    return "row" if layout == "stream" else "stream"


def state_bytes(model: torch.nn.Module, dense_dtype: str = "float32") -> int:
    """Tensor bytes of the checkpoint: compressed buffers as stored, other floats in ``dense_dtype``."""
    size = DTYPES[dense_dtype].itemsize
    total = 0
    compressed = {n for n, m in model.named_modules() if isinstance(m, CompressedExperts)}
    for k, v in model.state_dict().items():
        inside = any(k.startswith(c + ".") for c in compressed)
        total += v.numel() * (v.element_size() if inside or not v.is_floating_point() else size)
    return total


@torch.no_grad()
def seconds_per_image(model: torch.nn.Module, batches: list[torch.Tensor], repeats: int = 3) -> float:
    """Median over ``repeats`` of the time to run ``batches`` (eval mode), per image."""
    model.eval()
    n = sum(b.shape[0] for b in batches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            model(b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n


@torch.no_grad()
def decode_seconds(model: torch.nn.Module, repeats: int = 3) -> float:
    """Time to decode every expert of every compressed layer once (what one forward pass that uses all
    experts pays), median over ``repeats``."""
    layers = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    if not layers:
        return 0.0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in layers:
            m._cache.clear()
            m.decoded(list(range(m.num_experts)), torch.float32)
            m._cache.clear()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def prediction_shift(reference: torch.nn.Module, model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(reference || model) of the class distributions, and the fraction of images on which both
    predict the same class: finer than accuracy when compression barely moves it."""
    kl, same, n = 0.0, 0, 0
    for b in batches:
        p = torch.log_softmax(reference(b).logits.float(), -1)
        q = torch.log_softmax(model(b).logits.float(), -1)
        kl += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum"))
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += b.shape[0]
    return kl / max(n, 1), same / max(n, 1)


def run(model: torch.nn.Module, train: ImageDataset, test: ImageDataset, opts: CompressOptions, *,
        evaluate: Callable, device="cpu", before: dict | None = None, out_dir: str | Path | None = None,
        timing_images: int = 1000, log: Callable[[str], None] = lambda s: None) -> tuple[torch.nn.Module, dict]:
    """Compress, evaluate before (unless ``before`` is given) and after, time both, optionally save.
    ``evaluate(model, dataset) -> {"accuracy", "loss", ...}``."""
    opts.validate()
    calib = image_batches(train.subset(opts.calib_images, seed=opts.seed), opts.batch_size, device)
    model = model.to(device).eval()
    t0 = time.perf_counter()
    comp, info = compress(model, calib, opts, log=log)
    comp = comp.to(device).eval()
    compress_s = time.perf_counter() - t0
    if before is None:
        before = evaluate(model, test)
    after = evaluate(comp, test)
    kl, agreement = prediction_shift(model, comp, image_batches(test, opts.batch_size, device))
    timing = image_batches(test.subset(min(timing_images, len(test)), seed=0), opts.batch_size, device)
    t_before, t_after = [], []
    for _ in range(3):  # interleaved, so machine load hits both alike
        t_before.append(seconds_per_image(model, timing, 1))
        t_after.append(seconds_per_image(comp, timing, 1))
    n_params = sum(p.numel() for p in model.state_dict().values() if p.is_floating_point())
    report = {
        "method": opts.method, "bits": opts.qmoe.bits if opts.method in ("qmoe", "rtn") else None,
        "seed": opts.seed, "calib_images": opts.calib_images,
        "options": {**opts.qmoe.to_dict(), "target_bits": opts.target_bits, "keep": opts.keep, "merge_to": opts.merge_to,
                    "merge_weighting": opts.merge_weighting, "merge_router": opts.merge_router,
                    "dense_dtype": opts.dense_dtype},
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "loss_before": before["loss"], "loss_after": after["loss"], "test_images": after.get("num_images"),
        "test_kl_to_original": kl, "test_agreement": agreement,
        "checkpoint_bytes": state_bytes(comp, opts.dense_dtype), "checkpoint_bytes_fp32": 4 * n_params,
        "checkpoint_bytes_bf16": 2 * n_params,
        "ms_per_image_before": 1e3 * statistics.median(t_before), "ms_per_image_after": 1e3 * statistics.median(t_after),
        "decode_ms_all_experts": 1e3 * decode_seconds(comp), "compress_seconds": compress_s, **info,
    }
    report["decode_overhead"] = report["ms_per_image_after"] / report["ms_per_image_before"] - 1.0
    if out_dir is not None:
        if opts.method in ("qmoe", "rtn"):
            save_compressed(comp, out_dir, opts.qmoe, dense_dtype=opts.dense_dtype,
                            extra={"bits_per_expert_param": report["bits_per_expert_param"]})
        else:
            comp.save_pretrained(out_dir)
        report["checkpoint_file_bytes"] = (Path(out_dir) / "model.safetensors").stat().st_size
    return comp, report
