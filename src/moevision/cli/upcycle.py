"""``moevision upcycle SOURCE --experts E --top-k k --out DIR``: sparse upcycling of a dense checkpoint
(Komatsuzaki et al., ICLR 2023): every expert a copy of the dense MLP, new routers, a step-0 check."""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

from ..errors import CheckpointError, MoEVisionError

DESCRIPTION = """Turn a dense moevision ViT into an MoE ViT whose experts are copies of the dense MLPs
(sparse upcycling). SOURCE is a model directory (save_pretrained, `moevision convert`, `moevision merge`)
or a run directory of `moevision train` (its final model/). The output is a model directory; fine-tune it
with `moevision train --init DIR`.

With the defaults (top-k gates renormalised to sum to 1, dropless, no expert noise) the upcycled model
computes exactly what the dense model computes at step 0; the command checks this on random images and
prints the largest logit difference."""

EXAMPLES = """examples:
  moevision upcycle runs/dense --experts 4 --top-k 2 --out models/upcycled
  moevision upcycle runs/dense --experts 8 --top-k 2 --layers last_2 --router-init zero --out up8
  moevision upcycle runs/dense --experts 4 --top-k 1 --no-normalize --capacity-factor 1.25 --out up_vmoe
  moevision upcycle runs/dense --experts 4 --top-k 2 --copy-optimizer-state --out up
  moevision train --init models/upcycled --recipe fmnist_dense --set train.epochs=1 --set train.lr=3e-4
"""


def _float_or_none(s: str):
    if s.lower() in ("none", "null", "dropless"):
        return None
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {s!r}") from None
    return v


def _layers(s: str):
    s = s.strip()
    if s and (s[0].isdigit() or s[0] == "["):
        try:
            return [int(v) for v in s.strip("[]").split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--layers: expected block indices like 1,3 or a name, got {s!r}") \
                from None
    return s


def register(subparsers) -> dict:
    from ..techniques.upcycling import ROUTER_INITS

    p = subparsers.add_parser("upcycle", help="sparse upcycling: a dense ViT -> an MoE ViT with copied experts",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="dense model directory or `moevision train` run directory")
    p.add_argument("--out", required=True, help="output model directory (config.json + model.safetensors)")
    p.add_argument("--experts", type=int, required=True, help="experts E per MoE layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token k (topk router)")
    p.add_argument("--layers", type=_layers, default="every_2",
                   help="which MLPs become MoE: every_2 (default, every other block: 1, 3, ...), last_N, "
                        "last_odd_N, all, or block indices such as 1,3")
    p.add_argument("--router", default="topk", choices=["topk", "expert_choice", "soft", "random", "hash"],
                   help="routing (default topk; expert_choice is the paper's vision choice [R] but its combine "
                        "weights are not renormalised, so it is not exact at step 0)")
    p.add_argument("--router-init", default="lecun", choices=ROUTER_INITS,
                   help="router weight init: lecun (std 1/sqrt(D), default), normal (--router-init-std), zero "
                        "(uniform), linear (nn.Linear default)")
    p.add_argument("--router-init-std", type=float, default=None, help="std for --router-init normal (0.02)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="expert noise: add noise*std(W)*N(0,1) to each expert's weights (default 0: exact copies)")
    p.add_argument("--no-normalize", action="store_true",
                   help="V-MoE gates (top-k softmax probabilities, not renormalised); scales the MLP branch")
    p.add_argument("--capacity-factor", type=_float_or_none, default=None,
                   help="training capacity factor; 'none' (default) = dropless")
    p.add_argument("--eval-capacity-factor", type=_float_or_none, default=None,
                   help="evaluation capacity factor (default: the training one)")
    p.add_argument("--router-noise", type=float, default=None,
                   help="router logit noise std in training, as a multiple of 1/E (default: the router's, 1.0 for topk)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="another MoE field of the model config, e.g. load_loss_weight=0.01 (repeatable)")
    p.add_argument("--copy-optimizer-state", action="store_true",
                   help="SOURCE is a run directory: copy its Adam moments into every expert slot "
                        "(writes optimizer.safetensors; train with --set train.init_optimizer_state=true)")
    p.add_argument("--seed", type=int, default=0, help="seed for the router init and expert noise")
    p.add_argument("--overwrite", action="store_true", help="allow --out to name an existing directory")
    return {"upcycle": _cmd_upcycle}


def load_source(path: Path):
    """The dense model of SOURCE (model directory or run directory) and the run directory, if any."""
    from ..models import from_pretrained

    if not path.exists():
        raise CheckpointError(f"SOURCE {path} does not exist")
    if (path / "config.json").is_file():
        try:
            meta = json.loads((path / "config.json").read_text())
        except ValueError:
            meta = {}
        if "architecture" in meta:
            return from_pretrained(path), None
    if (path / "model" / "config.json").is_file():
        return from_pretrained(path / "model"), path
    raise CheckpointError(f"SOURCE {path} is neither a model directory (config.json + model.safetensors) nor a "
                          f"finished run directory (model/)")


def _cmd_upcycle(args) -> int:
    import torch

    from .. import config as C
    from ..models import ViTConfig
    from ..techniques.upcycling import MOE_OPTIONS, expected_num_params, step0_gap, upcycle, upcycle_optimizer_state
    from ..train.init_from import run_optimizer_state, save_optimizer_state

    from .main import check_out_dir

    out = check_out_dir(args.out, overwrite=args.overwrite, source=args.source)
    dense, run_dir = load_source(Path(args.source))
    if args.copy_optimizer_state and run_dir is None:
        raise MoEVisionError("--copy-optimizer-state needs SOURCE to be a run directory (with checkpoint.safetensors)")
    opts = {"router": args.router, "normalize_topk": not args.no_normalize, "capacity_factor": args.capacity_factor,
            "eval_capacity_factor": args.eval_capacity_factor, "noise_std": args.router_noise}
    for key, value in C.parse_overrides(args.options):
        if key not in MOE_OPTIONS:
            raise MoEVisionError(f"--set {key}: not an upcycle option; valid: {', '.join(MOE_OPTIONS)}")
        opts[key] = C.convert(typing.get_type_hints(ViTConfig)[key], value, key)
    moe = upcycle(dense, num_experts=args.experts, top_k=args.top_k, moe_layers=args.layers,
                  router_init=args.router_init, router_init_std=args.router_init_std, expert_noise=args.noise,
                  seed=args.seed, **opts)
    cfg = moe.config
    moe.save_pretrained(out)
    if args.copy_optimizer_state:
        save_optimizer_state(out, upcycle_optimizer_state(run_optimizer_state(run_dir), cfg))
    torch.manual_seed(args.seed)
    x = torch.randn(8, cfg.in_chans, cfg.img_size, cfg.img_size)
    gap = step0_gap(dense, moe, x)
    exact = args.noise == 0 and cfg.router == "topk" and cfg.normalize_topk and cfg.eval_capacity_factor is None
    print(f"upcycled {args.source}: blocks {list(cfg.moe_block_indices)} -> MoE with E={cfg.num_experts}, "
          f"{cfg.router} k={cfg.top_k}; parameters {dense.num_params() / 1e6:.3f}M -> {moe.num_params() / 1e6:.3f}M "
          f"(expected {expected_num_params(dense.num_params(), cfg) / 1e6:.3f}M), "
          f"{moe.num_active_params() / 1e6:.3f}M active per token")
    print(f"step-0 check on 8 random images: max |logit difference| {gap['max_abs']:.2e} "
          f"(relative {gap['max_rel']:.2e}); " + ("expected ~0 (exact upcycling)" if exact else
                                                  "not expected to be 0 with these options"))
    print(f"written to {out}" + (" (with optimizer.safetensors)" if args.copy_optimizer_state else "") +
          f"\nfine-tune: moevision train --init {out} --recipe RECIPE --set train.epochs=N")
    return 0
