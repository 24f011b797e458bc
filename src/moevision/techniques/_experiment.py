"""What the seeded comparison commands (``moevision multitask``, ``moevision advmoe``) share: the train/test
subsets, the row x seed loop with one cached JSON result per run (written atomically, recomputed or
refreshed when stale), the mean ± std cells, and the Markdown + JSON report."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..utils import atomic_write


def check_grid_settings(settings, positive_ints: tuple[str, ...], known_rows) -> None:
    """The checks every seeded comparison's settings share: ``positive_ints`` name positive integer
    fields, and ``settings.rows`` is a non-empty subset of ``known_rows``."""
    for k in positive_ints:
        v = getattr(settings, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{k} must be a positive integer, got {v!r}")
    bad = [r for r in settings.rows if r not in known_rows]
    if bad or not settings.rows:
        raise ConfigError(f"rows: unknown {bad}; choose from {list(known_rows)}")


def load_subsets(dataset: str, train_subset: int, test_subset: int, data_dir: str | None = None,
                 download: bool = False):
    """(train, test) deterministic subsets of ``dataset`` (seed 0, the same for every row and seed)."""
    from ..data import get_dataset

    kw = {"data_dir": data_dir, "download": download} if dataset == "fashion_mnist" else {}
    return (get_dataset(dataset, "train", **kw).subset(train_subset, seed=0),
            get_dataset(dataset, "test", **kw).subset(test_subset, seed=0))


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent)
    atomic_write(path, lambda p: Path(p).write_text(text))


def run_grid(settings, work: Path | None, compute: Callable[[str, int, Path | None], dict],
             describe: Callable[[str, int, dict], str],
             refresh: Callable[[str, int, dict, Path], dict | None] | None = None) -> dict[str, list[dict]]:
    """``compute(row, seed, cache)`` for every row x seed of ``settings`` (``rows``, ``seeds``), unless
    ``work/{row}_seed{seed}.json`` holds the result; ``refresh(row, seed, cached, cache)`` may return an
    updated result for a stale cached one (None keeps it). Prints ``describe`` per run."""
    results: dict[str, list[dict]] = {r: [] for r in settings.rows}
    for row in settings.rows:
        for seed in range(settings.seeds):
            cache = None if work is None else Path(work) / f"{row}_seed{seed}.json"
            res = json.loads(cache.read_text()) if cache is not None and cache.is_file() else None
            if res is not None and refresh is not None:
                new = refresh(row, seed, res, cache)
                if new is not None:
                    res = new
                    write_json(cache, res)
            if res is None:
                res = compute(row, seed, cache)
                if cache is not None:
                    write_json(cache, res)
            results[row].append(res)
            print(f"  {row:17s} seed {seed}: {describe(row, seed, res)}", flush=True)
    return results


def run_seeds(settings, work: Path | None, run_seed: Callable[[Any, int, Callable[[str], None]], dict],
              log: Callable[[str], None] = print) -> list[dict]:
    """``run_seed(settings, seed, log)`` for seed 0 .. settings.seeds - 1 (the miniatures whose rows share
    a seed's pre-training), unless ``work/seed{seed}.json`` holds the result of the same settings (every
    field but ``seeds`` and ``threads``); a cached result of other settings is recomputed. Sets torch's
    thread count when ``settings.threads`` is non-zero."""
    import torch

    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    key = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("seeds", "threads")}
    results = []
    for seed in range(settings.seeds):
        cache = None if work is None else Path(work) / f"seed{seed}.json"
        res = json.loads(cache.read_text()) if cache is not None and cache.is_file() else None
        if res is not None and res.get("settings") != key:
            res = None  # another configuration: recompute
        if res is None:
            res = run_seed(settings, seed, log)
            res["settings"] = key
            if cache is not None:
                write_json(cache, res)
        else:
            log(f"  seed {seed}: cached ({cache})")
        results.append(res)
    return results


def write_report(settings, results: dict, out: Path | None, markdown: Callable[[dict], str],
                 extra: dict | None = None) -> dict:
    """{"settings", "results"} (+ ``extra`` fields); written to ``out`` (Markdown) and ``out`` with .json
    when given."""
    report = {"settings": dataclasses.asdict(settings), "results": results, **(extra or {})}
    if out is not None:
        out = Path(out)
        write_json(out.with_suffix(".json"), report, indent=1)
        text = markdown(report)
        atomic_write(out, lambda p: Path(p).write_text(text))
    return report


class ExactMatch:
    """Exact-match accuracy per question type over batches of generated answers (whitespace-stripped)."""

    def __init__(self, qtypes):
        self.counts = {q: [0, 0] for q in qtypes}

    def add(self, preds, answers, qtypes) -> None:
        for p, a, q in zip(preds, answers, qtypes):
            c = self.counts[q]
            c[0] += int(p.strip() == a)
            c[1] += 1

    def result(self) -> dict:
        """{qtype: accuracy} and "all" (over every question), 0 where a type had none."""
        out = {q: c[0] / max(1, c[1]) for q, c in self.counts.items()}
        out["all"] = sum(c[0] for c in self.counts.values()) / max(1, sum(c[1] for c in self.counts.values()))
        return out


def mean_std(vals: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """"mean ± std" (sample std; 0 for one value) of ``vals`` times ``scale``."""
    m = statistics.fmean(vals) * scale
    s = statistics.stdev(vals) * scale if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"
