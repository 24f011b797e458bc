"""The standard compression sweep (``moevision compress RUN_DIR --table docs/results/qmoe.md``): QMoE
and round-to-nearest at ternary and 2-bit, pruning and merging, over calibration seeds, written as a
Markdown table with the command that regenerates it."""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .pipeline import CompressOptions, image_batches, prediction_shift, run


# the <= 1 bit configuration: a dictionary built for each matrix's zero fraction, fp8 per-row grids, and
# the zero threshold (and GPTQ's damping) chosen by ``ratecontrol`` on the rate and the calibration
# images - never on test accuracy
TUNED = {"qmoe.bits": "ternary", "qmoe.dictionary": "fit", "qmoe.scale_dtype": "float8_e4m3fn", "target_bits": 1.0}


def variants(num_experts: int) -> list[tuple[str, dict]]:
    """(label, overrides of CompressOptions; ``qmoe.<field>`` for QMoEConfig fields)."""
    E = num_experts
    return [
        ("QMoE ternary (spec: fixed dictionary, bf16 grids)", {"method": "qmoe", "qmoe.bits": "ternary"}),
        ("RTN ternary (same storage)", {"method": "rtn", "qmoe.bits": "ternary"}),
        ("QMoE ternary, fitted dictionary", {"method": "qmoe", "qmoe.bits": "ternary", "qmoe.dictionary": "fit"}),
        ("QMoE ternary <= 1.0 bit (fitted dictionary, fp8 grids, rate control)", {**TUNED, "method": "qmoe"}),
        ("RTN ternary <= 1.0 bit (same storage and rate control)", {**TUNED, "method": "rtn"}),
        ("QMoE 2-bit", {"method": "qmoe", "qmoe.bits": "2bit"}),
        ("RTN 2-bit", {"method": "rtn", "qmoe.bits": "2bit"}),
        (f"prune {E} -> {E - 1} experts (least used out)", {"method": "prune", "keep": E - 1}),
        (f"prune {E} -> {max(E // 2, 1)} experts", {"method": "prune", "keep": max(E // 2, 1)}),
        (f"merge {E} -> {max(E // 2, 1)} experts (usage-weighted average)", {"method": "merge", "merge_to": max(E // 2, 1)}),
    ]


# (GPTQ row, RTN row) at equal storage, by position in ``variants``
COMPARISONS = ((0, 1), (3, 4), (5, 6))
TARGET_BITS, TARGET_POINTS = 1.0, 0.5


@torch.no_grad()
def _without_experts(model: torch.nn.Module) -> torch.nn.Module:
    """The reference of what expert compression could lose at most: every expert weight and bias set
    to zero, so each MoE layer adds nothing to the residual stream."""
    from .calibrate import moe_layers

    m = copy.deepcopy(model)
    for _, moe in moe_layers(m):
        for p in moe.experts.parameters():
            p.zero_()
    return m


def _apply(base: CompressOptions, overrides: dict, seed: int) -> CompressOptions:
    o = replace(base, qmoe=replace(base.qmoe), seed=seed)
    for k, v in overrides.items():
        if k.startswith("qmoe."):
            setattr(o.qmoe, k[5:], v)
        else:
            setattr(o, k, v)
    return o


def _ms(v: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m = statistics.mean(v) * scale
    if len(v) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(v) * scale:.{digits}f}"


def sweep(model: torch.nn.Module, train, test, *, base: CompressOptions, seeds: int, evaluate: Callable,
          device, out: str | Path, command: str, note: str | None = None, log: Callable[[str], None] = print,
          progress: bool = True,
          timing_images: int = 1000) -> Path:
    E = model.config.num_experts
    before = evaluate(model, test)
    log(f"uncompressed: test accuracy {100 * before['accuracy']:.2f}%")
    zeroed = _without_experts(model)
    no_experts = evaluate(zeroed, test)
    no_experts["kl"], no_experts["agreement"] = prediction_shift(model, zeroed, image_batches(test, base.batch_size, device))
    log(f"every expert's output zeroed: test accuracy {100 * no_experts['accuracy']:.2f}%")
    rows = []
    todo = [(label, ov, s) for label, ov in variants(E)
            for s in (range(1) if ov["method"] == "rtn" else range(seeds))]  # RTN uses no data
    bar = tqdm(total=len(todo), desc="compress sweep", disable=not progress, dynamic_ncols=True)
    by_label: dict[str, list[dict]] = {}
    for label, ov, seed in todo:
        t0 = time.perf_counter()
        _, rep = run(copy.deepcopy(model), train, test, _apply(base, ov, seed), evaluate=evaluate, device=device,
                     before=before, timing_images=timing_images)
        rep["seconds"] = time.perf_counter() - t0
        by_label.setdefault(label, []).append(rep)
        bar.update(1)
        log(f"{label} seed {seed}: {rep['bits_per_expert_param']:.3f} bits/param, accuracy "
            f"{100 * rep['accuracy_after']:.2f}%")
    bar.close()
    for label, _ in variants(E):
        rows.append((label, by_label[label]))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_markdown(model, before, rows, base, seeds, command, path.parent, note, no_experts))
    raw = path.with_suffix(".json")
    raw.write_text(json.dumps({"uncompressed": before, "experts_zeroed": no_experts, "rows": {l: r for l, r in rows}},
                              indent=1, default=str) + "\n")
    return path


def _markdown(model, before, rows, base: CompressOptions, seeds: int, command: str, path_dir: Path,
              note: str | None = None, no_experts: dict | None = None) -> str:
    cfg = model.config
    r0 = rows[0][1][0]
    E, D = cfg.num_experts, cfg.embed_dim
    F = int(D * (cfg.expert_hidden_ratio or cfg.mlp_ratio))
    lines = [
        "# QMoE: sub-1-bit experts, and fewer experts, on the default Fashion-MNIST MoE-ViT", "",
        f"Regenerate: `{command}` "
        f"(calibration: {base.calib_images} training images per seed, seeds 0..{seeds - 1}; RTN uses no data, one run). "
        f"Model `{getattr(model, 'model_name', '?')}`: {len(model.moe_layers)} MoE layers (blocks "
        f"{list(model.moe_layers)}), E={E} experts of D={D} -> F={F} -> D with biases; "
        f"{r0['expert_params']:,} expert parameters of {sum(p.numel() for p in model.parameters()):,}. "
        f"Test set: {before['num_images']} Fashion-MNIST test images; uncompressed accuracy "
        f"{100 * before['accuracy']:.2f}% (one trained model: the spread below is over calibration sets, "
        f"not over training seeds). torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s) "
        f"({platform.machine()}); times are per image at batch {base.batch_size}, medians of interleaved runs "
        "on a shared machine, so treat them as rough." + (f" {note}" if note else ""), "",
        "Bits per expert parameter count everything stored for the experts (codewords and offsets, per-row "
        "grids, biases) over all expert parameters (weights and biases); bf16 experts are 16 bits, so 16 / bits "
        "is the experts' compression over bf16. Pruned / merged models keep fp32 experts: their figure is "
        "32 x (experts left / experts before). KL to original and same prediction compare each test image's "
        "class distribution with the uncompressed model's.", "",
        "| variant | runs | bits / expert param | same, spec row layout | zero threshold / damping | zero weights % "
        "| checkpoint KiB | test acc. % | Δ acc. (points) | test loss | KL to original (x1e-3) | same prediction % "
        "| ms / image (orig -> new) | decode all experts, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mean = statistics.mean
    for label, reps in rows:
        col = lambda k: [r[k] for r in reps if r.get(k) is not None]  # noqa: E731
        alt = col("bits_per_expert_param_row")
        tau = col("zero_threshold") if reps[0].get("bits") == "ternary" else []
        damp = col("percdamp") if reps[0].get("method") == "qmoe" else []
        zf = col("zero_fraction")
        delta = [r["accuracy_after"] - r["accuracy_before"] for r in reps]
        lines.append(
            f"| {label} | {len(reps)} | {_ms(col('bits_per_expert_param'), digits=3)} "
            f"| {_ms(alt, digits=3) if alt else '-'} | {(_ms(tau) if tau else '-') + (' / ' + _ms(damp, digits=1) if damp else '')} "
            f"| {_ms(zf, 100, 1) if zf else '-'} "
            f"| {mean(col('checkpoint_bytes')) / 1024:.0f} | {_ms(col('accuracy_after'), 100)} | {_ms(delta, 100)} "
            f"| {_ms(col('loss_after'), digits=4)} | {_ms(col('test_kl_to_original'), 1e3, 3)} "
            f"| {_ms(col('test_agreement'), 100)} | {mean(col('ms_per_image_before')):.3f} -> "
            f"{mean(col('ms_per_image_after')):.3f} | {mean(col('decode_ms_all_experts')):.2f} |")
    lines += ["", f"Uncompressed: test accuracy {100 * before['accuracy']:.2f}%, test loss {before['loss']:.4f}."]
    if no_experts is not None:
        lines[-1] += (f" Reference for the scale of the differences: with every expert's output set to zero (each MoE "
                      f"layer adds nothing to the residual stream) the model reaches {100 * no_experts['accuracy']:.2f}% "
                      f"(loss {no_experts['loss']:.4f}, KL to original {1e3 * no_experts['kl']:.3f}e-3, same "
                      f"prediction {100 * no_experts['agreement']:.2f}%): accuracy alone cannot tell the variants "
                      "apart on this model, the loss and the KL can.")
    lines.append("")
    met = [label for label, reps in rows
           if mean(r["bits_per_expert_param"] for r in reps) <= TARGET_BITS
           and mean(r["accuracy_after"] - r["accuracy_before"] for r in reps) >= -TARGET_POINTS / 100]
    lines += [f"Target of the issue (<= {TARGET_BITS} bit per expert parameter, codes plus metadata, with <= "
              f"{TARGET_POINTS} point accuracy loss; means over seeds): "
              + ("met by " + "; ".join(f"*{m}*" for m in met) if met else "met by no row") + ".", ""]
    for i, j in COMPARISONS:
        if max(i, j) < len(rows) and rows[i][0].startswith("QMoE") and rows[j][0].startswith("RTN"):
            (la, ra), (lb, rb) = rows[i], rows[j]
            lines.append(f"- {la} vs {lb}: test loss {mean(r['loss_after'] for r in ra):.4f} vs "
                         f"{mean(r['loss_after'] for r in rb):.4f}, accuracy {100 * mean(r['accuracy_after'] for r in ra):.2f}% "
                         f"vs {100 * mean(r['accuracy_after'] for r in rb):.2f}%.")
    lines += ["", f"Checkpoint sizes: the uncompressed model is {r0['checkpoint_bytes_fp32'] / 1024:.0f} KiB in fp32 and "
              f"{r0['checkpoint_bytes_bf16'] / 1024:.0f} KiB in bf16; compressed checkpoints keep the non-expert "
              f"weights in {base.dense_dtype}, so at this size they are dominated by the dense part.", ""]
    q = rows[0][1]
    lines += [
        "Where the bits of the spec-default ternary row go (mean over seeds): codewords "
        f"{statistics.mean(r['code_bits_per_weight'] * r['expert_weight_entries'] / r['expert_params'] for r in q):.3f}, "
        f"per-row (lo, hi) grids {statistics.mean(r['grid_bits_per_param'] for r in q):.3f}, biases "
        f"{statistics.mean(r['bias_bits_per_param'] for r in q):.3f} bits per expert parameter. The grids cost 32 bits "
        f"per row, i.e. {32 / D:.3f} bit/weight for the {F} rows of width {D} and {32 / F:.3f} for the {D} rows of "
        f"width {F}: with experts this small the metadata is a large share of the budget (QMoE's rows are "
        "768-6144 wide).", ""]
    lines += _gpu_section(path_dir)
    return "\n".join(lines) + "\n"


def _gpu_section(directory: Path) -> list[str]:
    """The GPU decode benchmark's figures, when its JSON lies beside the table."""
    files = sorted(directory.glob("qmoe_decode_*.json"))
    if not files:
        return []
    out = ["## Decoding on a GPU", "",
           "`python benchmarks/qmoe_decode.py --device cuda --json docs/results/qmoe_decode_<gpu>.json`: random "
           "ternary experts (P(zero) = 0.885, row layout), every expert decoded per call (no cache), 4096 tokens "
           "spread evenly over the experts, fp32; the compressed forward is the decode plus the same GEMMs.", "",
           "| file | device | shape | code bits / weight | decode all experts, ms | forward dense -> compressed, ms |",
           "|---|---|---|---|---|---|"]
    for f in files:
        data = json.loads(f.read_text())
        for r in data["rows"]:
            out.append(f"| {f.name} | {data['env']['device']} | {r['shape']} | {r['bits_per_weight']:.3f} "
                       f"| {r['decode_all_ms']:.2f} | {r['forward_dense_ms']:.2f} -> {r['forward_compressed_ms']:.2f} |")
    return out + [""]
