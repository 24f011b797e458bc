"""``moevision``: train, evaluate and benchmark sparse MoE vision models.

Every user error (unknown recipe, bad --set, missing data, corrupt run directory) prints one line
``moevision: error: ...`` and exits with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from ..errors import MoEVisionError

EPILOG = """examples:
  moevision train                                   # the default recipe (MoE ViT on Fashion-MNIST)
  moevision train --recipe fmnist_dense --out runs/dense
  moevision train --set model.num_experts=8 --set train.epochs=3
  moevision train --resume runs/fmnist_moe-20261126-120000
  torchrun --nproc-per-node 2 -m moevision train --out runs/ep2 --set parallel.ep=2   # expert parallel
  moevision eval runs/fmnist_moe-20261126-120000
  moevision list-models 'moe_*'
  moevision bench moe-layer
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moevision", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a model from a recipe (or resume a run)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a recipe. The run directory gets config.json, metrics.jsonl, "
                                   "checkpoint.safetensors, model/ and summary.json. On several processes: "
                                   "torchrun --nproc-per-node N -m moevision train --out DIR --set parallel.ep=N "
                                   "(expert parallel; parallel.ep=1 is data parallel; docs/distributed.md).")
    t.add_argument("--recipe", default=None, help="recipe name (see list-recipes; default fmnist_moe)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. model.num_experts=8 or train.epochs=3 (repeatable)")
    t.add_argument("--data-dir", default=None, help="directory holding the data set files (Fashion-MNIST IDX)")
    t.add_argument("--download", action="store_true", help="download Fashion-MNIST if it is found nowhere")
    t.add_argument("--out", default=None, help="run directory (default runs/<recipe>-<time>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR", help="resume this run from its checkpoint")
    t.add_argument("--init", default=None, metavar="MODEL_DIR",
                   help="start from the weights AND model config of a model directory (save_pretrained, "
                        "`moevision upcycle`, a run's model/); --set may still change non-structural model fields")
    t.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's, auto)")
    t.add_argument("--overwrite", action="store_true",
                   help="allow --out to name an existing run directory: its previous run's checkpoint, model/, "
                        "metrics, summary, eval.json and analysis/ are deleted before the new run starts")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="evaluate a run directory (or a save_pretrained directory)")
    e.add_argument("run_dir", help="a run directory written by `moevision train`, or a model directory "
                                   "written by save_pretrained / `moevision merge`")
    e.add_argument("--dataset", default="fashion_mnist", help="data set for a model directory (run directories "
                                                              "use their own)")
    e.add_argument("--data-dir", default=None, help="directory holding the data set files")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--eval-capacity-factor", type=float, default=None,
                   help="override every MoE layer's evaluation capacity factor (e.g. 0.5 to test BPR)")
    e.add_argument("--edge-numerics", choices=("float", "fixed"), default=None,
                   help="hardware-parity evaluation with Edge-MoE's numerics: GELU by its lookup table and "
                        "attention by the single-pass softmax ('float'), plus ap_fixed<16,2> weights and "
                        "ap_fixed<32,10> features ('fixed'); prints the accuracy beside the float model's")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    mg = sub.add_parser("merge", help="EWA: average each MoE layer's experts into one FFN (a dense ViT)")
    mg.add_argument("run_dir", help="a run directory (its final model) or a model directory")
    mg.add_argument("--out", required=True, help="directory for the merged dense model (save_pretrained format)")
    mg.add_argument("--overwrite", action="store_true", help="allow --out to name a non-empty directory")

    rp = sub.add_parser("reproduce", help="a technique against its baselines over seeds; writes a Markdown table")
    rp.add_argument("name", help="experiment: momentum, ewa or moh")
    rp.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    rp.add_argument("--out", default="docs/results", help="directory for reproduce_<name>.md")

    lm = sub.add_parser("list-models", help="list registered models")
    lm.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'moe_*'")
    sub.add_parser("list-recipes", help="list recipes with what they reach")

    for mod in _plugin_modules():
        COMMANDS.update(mod.register(sub))

    from ..bench import CPU_SHAPES, GPU_SHAPES

    b = sub.add_parser(
        "bench", help="benchmarks: MoE layer vs dense FFN, MoE-ViT step vs dense twin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "moe-layer: forward and forward+backward of every dispatch implementation (and, on CPU, cpu_fused "
            "with its native C++ kernels off and with the router kept apart, as A/Bs) against a dense FFN on the "
            "T*k routed tokens, the same "
            "active FLOPs; ratios to it, measured interleaved in one process.", 100)
                    + "\n" + textwrap.fill("model: a training step (AdamW) of the MoE ViT over its dense twin.", 100)
                    + "\n\n"
                    "shapes (--shapes takes a name or its first word, e.g. vit-ti):\n"
                    + "\n".join(f"  cpu: {s.name}" for s in CPU_SHAPES)
                    + "\n" + "\n".join(f"  cuda: {s.name}" for s in GPU_SHAPES)
                    + "\n\nResults: docs/performance.md.")
    b.add_argument("what", choices=["moe-layer", "model"], help="what to time (see above)")
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    b.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    b.add_argument("--shapes", default=None, help="comma-separated shape names (default: all for the device)")
    b.add_argument("--repeats", type=positive_int, default=None,
                   help="timed repetitions per measurement (default 5 on CPU, 20 on CUDA)")
    b.add_argument("--batch", type=positive_int, default=None,
                   help="model benchmark batch size (default 64, the recipe's)")
    b.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    b.add_argument("--compile", action="store_true",
                   help="also time under torch.compile (moe-layer: compiled dense vs compiled fused layer; "
                        "model: every model compiled). Needs a C++ compiler on CPU, Triton on CUDA")
    b.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="CPU allocator: 'tuned' (default) keeps freed large blocks for reuse instead of "
                        "returning them to the OS: glibc's dynamic thresholds otherwise page-fault through "
                        "0 or ~10k pages a step depending on the heap's layout, noise that hits candidates "
                        "unevenly (docs/performance.md); 'default' leaves glibc's behaviour")
    return p


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_out_dir(out, *, overwrite: bool, source=None) -> Path:
    """Refuse an ``--out`` that would destroy data: always the source directory itself (or the run's
    model/ it was read from) and a regular file; a non-empty directory unless ``overwrite``."""
    out = Path(out)
    if source is not None:
        source = Path(source)
        final = source / "model"  # a run directory's final model
        if out.resolve() in (source.resolve(), final.resolve() if (final / "config.json").is_file() else None):
            where = "the source directory" if out.resolve() == source.resolve() else "the final model/ of"
            raise MoEVisionError(f"--out {out} is {where} {source}: writing there would replace the model it "
                                 f"was read from; pass another --out")
    if out.exists() and not out.is_dir():
        raise MoEVisionError(f"--out {out} is a file, not a directory; pass another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MoEVisionError(f"{out} already exists and is not empty; pass --overwrite to write over its files, "
                             f"or another --out")
    return out


def _cmd_train(args) -> int:
    from .. import config as C
    from ..recipes import DEFAULT_RECIPE, get_recipe
    from ..train import fit, format_summary, read_run_config

    from ..distributed.mesh import is_main_process, launched

    main_rank = is_main_process()  # under torchrun only rank 0 checks the run directory and prints
    say = print if main_rank else (lambda *a, **k: None)
    progress = not args.no_progress
    if args.resume:
        overrides = C.parse_overrides(args.overrides)
        if args.recipe or args.init or any(not k.startswith("parallel.") for k, _ in overrides):
            raise MoEVisionError("--resume takes the run's own config; drop --recipe/--set (only --device, "
                                 "--data-dir and --set parallel.* may change)")
        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise MoEVisionError(f"--resume {run_dir} continues the run in its own directory; drop --out {args.out} "
                                 f"(to branch it, copy the run directory and resume the copy)")
        if args.overwrite:
            raise MoEVisionError(f"--resume {run_dir} continues the run; drop --overwrite (to start it afresh "
                                 f"instead: moevision train --out {run_dir} --overwrite with its --recipe/--set)")
        cfg = read_run_config(run_dir)
        for key, value in overrides:  # a checkpoint loads at any world size: the layout may change
            C.set_by_path(cfg, key, value)
        if not launched() and getattr(cfg, "parallel", None) is not None and cfg.parallel.ep > 1 \
                and "parallel.ep" not in dict(overrides):
            say(f"note: the run used parallel.ep={cfg.parallel.ep}; resuming it on this one process (parallel.ep=1)")
            cfg.parallel.ep = 1
        if not ((run_dir / "checkpoint.safetensors").is_file() or (run_dir / "stages" / "progress.json").is_file()):
            raise MoEVisionError(f"{run_dir}/checkpoint.safetensors is missing: nothing to resume (the run stopped "
                                 f"before its first checkpoint); start it again with moevision train --recipe "
                                 f"{cfg.recipe} --out {run_dir} --overwrite and its --set options")
    else:
        cfg = get_recipe(args.recipe or DEFAULT_RECIPE)
        if args.init:
            from ..train.init_from import init_run_config

            init_run_config(cfg, args.init)
        for key, value in C.parse_overrides(args.overrides):
            C.set_by_path(cfg, key, value)
        if not args.out and launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MoEVisionError("under torchrun, name the run directory with --out (every rank must agree on it)")
        run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        if main_rank and run_dir.exists() and not run_dir.is_dir():
            raise MoEVisionError(f"--out {run_dir} is a file, not a directory; pass another --out")
        if main_rank and run_dir.is_dir() and any(run_dir.iterdir()) and not args.overwrite:
            if (run_dir / "checkpoint.safetensors").is_file() or (run_dir / "stages" / "progress.json").is_file():
                raise MoEVisionError(f"{run_dir} already exists; pass --resume {run_dir} to continue it, "
                                     f"--overwrite to replace it, or another --out")
            raise MoEVisionError(f"{run_dir} already exists and has no checkpoint to resume; pass --overwrite to "
                                 f"replace it (an earlier run's files in it are deleted), or another --out")
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    if args.download:
        cfg.data.download = True
    if args.device:
        cfg.train.device = args.device
    C.validate_config(cfg)
    if main_rank and not args.resume:
        if args.overwrite and run_dir.is_dir():  # here too, not only in fit(): a VLM run does not pass there
            from ..train.engine import clear_run_artifacts

            clear_run_artifacts(run_dir, getattr(getattr(cfg, "train", None), "init_from", None))
        try:  # before loading data: an unwritable --out fails now, not after minutes
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoEVisionError(f"cannot create the run directory {run_dir} ({e.strerror or e}); "
                                 f"pass another --out") from None
    say(f"moevision train: recipe {cfg.recipe}, model {cfg.model_name}, run directory {run_dir}", flush=True)
    try:
        summary = fit(cfg, run_dir, resume=bool(args.resume), progress=progress)
    except KeyboardInterrupt:
        return 130
    say()
    say(format_summary(summary))
    if getattr(cfg, "kind", None) == "vlm":
        say(f"\nrun directory: {run_dir}  (ask it: moevision vqa {run_dir} --image PATH --question \"...\")")
    else:
        say(f"\nrun directory: {run_dir}  (evaluate: moevision eval {run_dir})")
    return 0


def _cmd_eval(args) -> int:
    from ..train import RunConfig, evaluate, format_summary, read_run_config
    from ..train.engine import MODEL_DIR, load_data, make_summary, resolve_device

    run_dir = Path(args.run_dir)
    device = resolve_device(args.device)
    model = _load_final_model(run_dir)
    if getattr(model, "arch_name", None) == "vlm":
        raise MoEVisionError(f"{run_dir} holds a vision-language model: its evaluation is in the run's summary.json "
                             f"(moevision vlm-results re-creates it); ask it questions with moevision vqa")
    if _is_model_dir(run_dir):  # a save_pretrained directory: evaluate it on --dataset
        cfg = RunConfig(recipe="-", model_name=model.model_name or "?", model=model.config)
        cfg.data.dataset = args.dataset
        source = str(run_dir)
    else:
        cfg = read_run_config(run_dir)
        finished = (run_dir / MODEL_DIR / "config.json").is_file()
        source = str(run_dir / MODEL_DIR) if finished else f"{run_dir}/checkpoint.safetensors (unfinished run)"
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    if args.eval_capacity_factor is not None:
        if not args.eval_capacity_factor > 0:
            raise MoEVisionError(f"--eval-capacity-factor must be > 0, got {args.eval_capacity_factor}")
        for m in model.modules():
            if hasattr(m, "eval_capacity_factor") and m.__class__.__name__.endswith("Router"):
                m.eval_capacity_factor = args.eval_capacity_factor
    model.to(device)
    _, test = load_data(cfg)
    float_ev = None
    if args.edge_numerics:
        from ..techniques.edge_moe import edge_numerics

        float_ev = evaluate(model, test, batch_size=cfg.data.eval_batch_size, device=device,
                            progress=not args.no_progress)
        fixed = args.edge_numerics == "fixed"
        model = edge_numerics(model, weights=(16, 2) if fixed else None, features=(32, 10) if fixed else None)
    t0 = time.perf_counter()
    ev = evaluate(model, test, batch_size=cfg.data.eval_batch_size, device=device, progress=not args.no_progress)
    s = make_summary(cfg, model, ev, train_seconds=0.0, steps=0, images_seen=0, device=device)
    s["train_seconds"] = None
    s["eval_seconds"] = round(time.perf_counter() - t0, 2)
    s["eval_capacity_factor"] = args.eval_capacity_factor
    print(f"evaluated {source}")
    print(format_summary(s))
    if float_ev is not None:
        s["edge_numerics"] = {"mode": args.edge_numerics, "float_accuracy": float_ev["accuracy"],
                              "float_loss": float_ev["loss"]}
        gap = 100 * (ev["accuracy"] - float_ev["accuracy"])
        print(f"Edge-MoE numerics ({args.edge_numerics}): accuracy {100 * ev['accuracy']:.2f}% against "
              f"{100 * float_ev['accuracy']:.2f}% in floating point ({gap:+.2f} points); loss {ev['loss']:.4f} "
              f"against {float_ev['loss']:.4f}")
    out = run_dir / "eval.json"  # next to the model it evaluates
    out.write_text(json.dumps(s, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


def _is_model_dir(path: Path) -> bool:
    try:
        return "architecture" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _load_final_model(path: Path):
    """The final model of a run directory, or the model in a save_pretrained directory."""
    from ..errors import CheckpointError
    from ..models import from_pretrained
    from ..train import load_checkpoint, read_run_config
    from ..train.engine import MODEL_DIR, build_model

    if _is_model_dir(path):
        return from_pretrained(path)
    cfg = read_run_config(path)
    if (path / MODEL_DIR / "config.json").is_file():
        return from_pretrained(path / MODEL_DIR)
    if (path / "checkpoint.safetensors").is_file():
        model = build_model(cfg)
        load_checkpoint(path / "checkpoint.safetensors", model=model, restore_rng=False)
        return model
    raise CheckpointError(f"{path} has neither model/ nor checkpoint.safetensors")


def _cmd_merge(args) -> int:
    from ..techniques import merge_experts_to_dense

    check_out_dir(args.out, overwrite=args.overwrite, source=args.run_dir)
    model = _load_final_model(Path(args.run_dir))
    if not getattr(model, "moe_layers", ()):
        raise MoEVisionError(f"{args.run_dir} holds a dense model: nothing to merge")
    dense = merge_experts_to_dense(model)
    dense.save_pretrained(args.out)
    print(f"merged {len(model.moe_layers)} MoE layers into dense MLPs: {model.num_params() / 1e6:.3f}M -> "
          f"{dense.num_params() / 1e6:.3f}M parameters; written to {args.out} "
          f"(evaluate: moevision eval {args.out})")
    return 0


def _cmd_reproduce(args) -> int:
    from ..recipes.reproduce import run_experiment

    path = run_experiment(args.name, seeds=args.seeds, out_dir=args.out)
    print(f"\nwritten to {path}")
    return 0


def _cmd_list_models(args) -> int:
    from ..models import create_model, list_models

    names = list_models(args.pattern)
    if not names:
        raise MoEVisionError(f"no model matches {args.pattern!r}")
    for n in names:
        m = create_model(n)
        kind = f"MoE blocks {list(m.moe_layers)}, E={m.config.num_experts}" if m.moe_layers else "dense"
        print(f"{n:<28}{m.num_params() / 1e6:>8.3f}M params  {kind}")
    return 0


def _cmd_list_recipes(args) -> int:
    from ..recipes import list_recipes, recipe_doc

    for n in list_recipes():
        doc = recipe_doc(n)
        print(f"{n}\n    " + "\n    ".join(doc.splitlines()) + "\n")
    return 0


def _cmd_bench(args) -> int:
    from ..bench import run_bench
    from ..utils import malloc_state, tune_malloc

    if args.malloc == "tuned":
        tune_malloc()
    args.malloc_state = malloc_state()
    return run_bench(args)


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "merge": _cmd_merge, "reproduce": _cmd_reproduce, "list-models": _cmd_list_models,
            "list-recipes": _cmd_list_recipes, "bench": _cmd_bench}


# Commands that live in their own module (moevision.cli.<name>): each module has
# ``register(subparsers) -> {command: handler}``; handlers take the parsed args and return an exit code.
PLUGIN_COMMANDS: tuple[str, ...] = ("upcycle", "analyze", "convert", "compress", "vqa", "reproduce_upcycling",
                                    "multitask", "advmoe", "shiftadd", "uoe", "imp", "merv",
                                    "mova", "unimoe", "moai", "mousi")


def _plugin_modules():
    import importlib

    return [importlib.import_module(f"{__package__}.{name}") for name in PLUGIN_COMMANDS]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MoEVisionError as e:
        print(f"moevision: error: {e}", file=sys.stderr)
        return 2


def entrypoint() -> None:
    sys.exit(main())
