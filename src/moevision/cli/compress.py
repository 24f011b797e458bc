"""``moevision compress``: QMoE sub-1-bit / 2-bit compression of a trained MoE model's experts, or
pruning / merging experts, with the rate, size, accuracy and decode-time figures."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MoEVisionError

DESCRIPTION = """Compress the experts of a trained MoE model (a run directory or a save_pretrained directory).

methods:
  qmoe   GPTQ per expert (Hessians from the tokens routed to each expert on --calib-images training
         images) to a ternary grid stored with QMoE's sub-1-bit dictionary code, or to a 2-bit grid
  rtn    the same grids by round to nearest (no data)
  prune  keep the --keep most used experts per layer (usage measured on the calibration images)
  merge  average experts into --merge-to groups per layer (EWA-style; grouped by weight similarity)

It prints bits per expert parameter (codes plus metadata: offsets, per-row scales, biases), the
checkpoint size against fp32 and bf16, test accuracy before and after, and inference time with the
run-time decoding. The output directory loads with `moevision eval OUT` / moevision.from_pretrained.
--table PATH instead runs the standard set of variants over --seeds calibration seeds and writes a
Markdown table (docs/results/qmoe.md)."""

EPILOG = """examples:
  moevision compress runs/fmnist_moe --out runs/fmnist_moe_q1 --bits ternary
  moevision compress runs/fmnist_moe --out runs/fmnist_moe_q2 --bits 2
  moevision compress runs/fmnist_moe --out runs/fmnist_moe_p3 --method prune --keep 3
  moevision eval runs/fmnist_moe_q1
  moevision compress runs/fmnist_moe --table docs/results/qmoe.md --seeds 3
"""


def register(sub) -> dict:
    import argparse

    c = sub.add_parser("compress", help="QMoE sub-1-bit / 2-bit compression of the experts; expert pruning or merging",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("run_dir", help="a run directory (its final model) or a model directory")
    c.add_argument("--out", default=None, help="directory for the compressed checkpoint (required unless --table)")
    c.add_argument("--overwrite", action="store_true", help="allow --out to name a non-empty directory")
    c.add_argument("--method", default="qmoe", choices=["qmoe", "rtn", "prune", "merge"], help="default qmoe")
    c.add_argument("--bits", default="ternary", choices=["ternary", "2", "2bit"],
                   help="grid: ternary {lo, 0, hi} per row (sub-1-bit code) or 2-bit (default ternary)")
    c.add_argument("--calib-images", type=int, default=1024, help="training images routed for calibration (1024)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (0)")
    q = c.add_argument_group("QMoE options")
    q.add_argument("--percdamp", type=float, default=0.1, help="Hessian dampening, fraction of the mean diagonal (0.1)")
    q.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-batch block of columns (128)")
    q.add_argument("--actorder", action="store_true", help="quantise columns by decreasing Hessian diagonal")
    q.add_argument("--true-sequential", action="store_true",
                   help="second projection's Hessian from the quantised first projection's outputs")
    q.add_argument("--no-sequential", action="store_true",
                   help="calibrate every layer on the original model (default: later layers see the quantised ones)")
    q.add_argument("--max-tokens-mul", type=float, default=4.0,
                   help="cap tokens per expert at this times (calibration tokens)/E; 0 = no cap (4)")
    q.add_argument("--min-tokens", type=int, default=1, help="experts with fewer tokens use --fallback (1)")
    q.add_argument("--fallback", default="rtn", choices=["rtn", "pooled"],
                   help="for experts with too few tokens: round to nearest, or the layer's pooled Hessian")
    q.add_argument("--zero-threshold", type=float, default=0.5,
                   help="ternary: round to hi above this fraction of hi (lo likewise); QMoE 0.5")
    q.add_argument("--target-bits", type=float, default=None,
                   help="ternary rate control: the zero threshold (and GPTQ damping) meeting this many bits per "
                        "expert parameter, chosen on the rate and the calibration images only (no labels)")
    q.add_argument("--layout", default="stream", choices=["stream", "row"],
                   help="code layout: one stream per matrix, or per row with int32 row offsets (the spec's)")
    q.add_argument("--dictionary", default="fixed", choices=["fixed", "fit"],
                   help="fixed: QMoE's dictionary (P(zero)=0.885); fit: built for each matrix's zero fraction")
    q.add_argument("--scale-dtype", default="bfloat16", choices=["bfloat16", "float16", "float8_e4m3fn", "float32"],
                   help="storage of the per-row grid (bfloat16)")
    q.add_argument("--bias-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="storage of the expert biases (bfloat16)")
    q.add_argument("--dense-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage of the non-expert weights in the checkpoint (float32)")
    pm = c.add_argument_group("pruning / merging")
    pm.add_argument("--keep", type=int, default=None, help="prune: experts kept per layer")
    pm.add_argument("--merge-to", type=int, default=None, help="merge: experts per layer after merging")
    pm.add_argument("--merge-weighting", default="usage", choices=["usage", "uniform"], help="(usage)")
    pm.add_argument("--merge-router", default="mean", choices=["mean", "top"],
                    help="merged router row: weighted mean of the rows, or the most used member's (mean)")
    ev = c.add_argument_group("evaluation")
    ev.add_argument("--dataset", default="fashion_mnist", help="data set for a model directory (run directories use their own)")
    ev.add_argument("--data-dir", default=None, help="directory holding the data set files")
    ev.add_argument("--test-subset", type=int, default=None, help="evaluate on this many test images (default all)")
    ev.add_argument("--timing-images", type=int, default=1000,
                    help="test images timed through the original and the compressed model (1000)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda or auto (cpu)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--table", default=None, metavar="PATH", help="run the standard variants and write a Markdown table")
    ev.add_argument("--seeds", type=int, default=3, help="calibration seeds per variant with --table (3)")
    ev.add_argument("--note", default=None, help="with --table: a sentence on where the model came from, put in the doc")
    return {"compress": _cmd_compress}


def _options(args):
    from ..techniques.qmoe import QMoEConfig
    from ..techniques.qmoe.pipeline import CompressOptions

    q = QMoEConfig(bits="ternary" if args.bits == "ternary" else "2bit", percdamp=args.percdamp,
                   blocksize=args.blocksize, actorder=args.actorder, true_sequential=args.true_sequential,
                   sequential=not args.no_sequential, max_tokens_mul=args.max_tokens_mul, min_tokens=args.min_tokens,
                   fallback=args.fallback, zero_threshold=args.zero_threshold, layout=args.layout,
                   dictionary=args.dictionary, scale_dtype=args.scale_dtype, bias_dtype=args.bias_dtype)
    o = CompressOptions(method=args.method, qmoe=q, calib_images=args.calib_images, seed=args.seed, keep=args.keep,
                        merge_to=args.merge_to, merge_weighting=args.merge_weighting,
                        merge_router=args.merge_router, dense_dtype=args.dense_dtype, target_bits=args.target_bits)
    o.validate()
    return o


def _cmd_compress(args) -> int:
    from ..train import RunConfig, evaluate, read_run_config
    from ..train.engine import load_data, resolve_device
    from .main import _is_model_dir, _load_final_model, check_out_dir

    if args.out is None and args.table is None:
        raise MoEVisionError("--out DIR is required (or --table PATH for the standard sweep)")
    if args.test_subset is not None and args.test_subset < 1:
        raise MoEVisionError(f"--test-subset must be >= 1, got {args.test_subset}")
    if args.seeds < 1:
        raise MoEVisionError(f"--seeds must be >= 1, got {args.seeds}")
    if args.timing_images < 1:
        raise MoEVisionError(f"--timing-images must be >= 1, got {args.timing_images}")
    opts = _options(args)
    run_dir = Path(args.run_dir)
    if args.out is not None and args.table is None:
        check_out_dir(args.out, overwrite=args.overwrite, source=run_dir)
    device = resolve_device(args.device)
    model = _load_final_model(run_dir)
    if not getattr(model, "moe_layers", ()):
        raise MoEVisionError(f"{run_dir} holds a dense model: no experts to compress")
    if _is_model_dir(run_dir):
        cfg = RunConfig(recipe="-", model_name=model.model_name or "?", model=model.config)
        cfg.data.dataset = args.dataset
    else:
        cfg = read_run_config(run_dir)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    cfg.data.test_subset = args.test_subset
    train, test = load_data(cfg)
    bs = cfg.data.eval_batch_size

    def ev(m, ds):
        return evaluate(m, ds, batch_size=bs, device=device, progress=not args.no_progress)

    if args.table:
        from ..techniques.qmoe.sweep import sweep

        command = f"moevision compress {run_dir} --table {args.table} --seeds {args.seeds}"
        for flag, value, default in (("--calib-images", args.calib_images, 1024), ("--test-subset", args.test_subset, None),
                                     ("--timing-images", args.timing_images, 1000), ("--device", args.device, "cpu")):
            if value != default:
                command += f" {flag} {value}"
        if args.note:
            command += f" --note '{args.note}'"
        path = sweep(model, train, test, base=opts, seeds=args.seeds, evaluate=ev, device=device,
                     out=args.table, command=command, note=args.note, log=print, progress=not args.no_progress,
                     timing_images=args.timing_images)
        print(f"\nwritten to {path}")
        return 0
    from ..techniques.qmoe.pipeline import run

    _, rep = run(model, train, test, opts, evaluate=ev, device=device, out_dir=args.out, log=print,
                 timing_images=args.timing_images)
    print(format_report(rep))
    (Path(args.out) / "compress_report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    print(f"\nwritten to {args.out}  (evaluate: moevision eval {args.out})")
    return 0


def format_report(r: dict) -> str:
    kb = lambda b: f"{b / 1024:.1f} KiB"  # noqa: E731
    what = f"{r['method']}" + (f" {r['bits']}" if r.get("bits") else "")
    if r.get("bits") == "ternary":
        what += f", zero threshold {r['zero_threshold']}" + (f", damping {r['percdamp']}" if r["method"] == "qmoe" else "")
        if "target_met" in r:
            what += f" (target {r['options']['target_bits']} bits {'met' if r['target_met'] else 'NOT met'})"
    lines = [f"{'method':<26}{what}  (calibration: {r['calib_images']} training images, seed {r['seed']})",
             f"{'bits per expert param':<26}{r['bits_per_expert_param']:.3f}  (codes plus metadata; fp32 = 32, bf16 = 16)"]
    if "code_bits_per_weight" in r:
        lines.append(f"{'  of which':<26}codes {r['code_bits_per_weight'] * r['expert_weight_entries'] / r['expert_params']:.3f}, "
                     f"per-row grids {r['grid_bits_per_param']:.3f}, biases {r['bias_bits_per_param']:.3f}")
    lines += [
        f"{'expert weights':<26}{kb(r['expert_bytes'])}  (fp32 {kb(r['expert_bytes_fp32'])}, bf16 {kb(r['expert_bytes_bf16'])}: "
        f"{r['expert_bytes_bf16'] / r['expert_bytes']:.1f}x smaller than bf16)",
        f"{'checkpoint':<26}{kb(r['checkpoint_bytes'])}  (fp32 {kb(r['checkpoint_bytes_fp32'])}, "
        f"bf16 {kb(r['checkpoint_bytes_bf16'])}; non-expert weights in {r['options']['dense_dtype']})",
        f"{'test accuracy':<26}{100 * r['accuracy_before']:.2f}% -> {100 * r['accuracy_after']:.2f}%  "
        f"({100 * (r['accuracy_after'] - r['accuracy_before']):+.2f} points; loss {r['loss_before']:.4f} -> {r['loss_after']:.4f})",
        f"{'inference time':<26}{r['ms_per_image_before']:.3f} -> {r['ms_per_image_after']:.3f} ms/image "
        f"({100 * r['decode_overhead']:+.1f}%, decoding every expert once: {r['decode_ms_all_experts']:.2f} ms)",
    ]
    return "\n".join(lines)
