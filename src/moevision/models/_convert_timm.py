"""timm-keyed ViT state dicts -> moevision ``VisionTransformer`` (no timm import), and the pieces every
converter shares: loading weight files, the conversion report, position-embedding resizing and folding
input normalisation into the patch embedding.

moevision's ViT uses timm's key names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.ls1.gamma``,
``blocks.N.norm2``, ``blocks.N.mlp.fc1/fc2``, ``blocks.N.ls2.gamma``, ``norm``, ``head``), so timm keys
are the canonical form: the HF and ONNX converters rename into it and call ``convert_timm_state_dict``.
Width, depth, patch size, channels, MLP width, qkv bias, class token, LayerScale and the position grid
are read from the tensors' shapes; the number of heads cannot be, so it is an argument (default: head
width 64, the ViT-Ti/S/B/L convention, stated in the report).

Position embeddings of another grid are resized as DINOv2 does (``F.interpolate`` bicubic, no
antialias, ``align_corners=False``); mode, antialias and DINOv2's original ``+0.1`` scale-factor
offset are options. timm's ``no_embed_class`` layout (no position for the class token) becomes a zero
position for it, which is the same function. Not supported (refused with a message): register tokens,
``fc_norm``/average-pool heads, SwiGLU MLPs, non-square patches or grids.

Shape legend: D width, C input channels, P patch size, G grid side, N tokens.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from .vit import MLP_ACTS, ViTConfig, VisionTransformer

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area")
_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
               "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma")
_TOP_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight",
             "norm.bias", "head.weight", "head.bias")


@dataclass
class ConversionReport:
    """What a converter did: ``mapped`` (source keys, target key), ``ignored`` (source key, why) and
    notes (inferred settings, transformations)."""

    source: str
    format: str
    mapped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The mapping with block indices collapsed (``blocks.N``), one line per pattern."""
        def pat(s: str) -> str:
            return re.sub(r"(?<=[./])\d+(?=[./])", "N", s)

        counts = Counter((pat(s), pat(d)) for s, d in self.mapped)
        out = [f"{self.format} {self.source}: {len(self.mapped)} tensors mapped"]
        out += [f"  {s} -> {d}" + (f"  (x{n})" if n > 1 else "") for (s, d), n in counts.items()]
        if self.ignored:
            by_reason: dict[str, list[str]] = {}
            for k, why in self.ignored:
                by_reason.setdefault(why, []).append(k)
            out.append(f"ignored {len(self.ignored)} tensors:")
            for why, keys in by_reason.items():
                shown = ", ".join(keys[:4]) + (f" ... ({len(keys)} tensors)" if len(keys) > 4 else "")
                out.append(f"  {shown}: {why}")
        out += [f"note: {n}" for n in self.notes]
        return out


# ---- weight files ------------------------------------------------------------------------------
def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, a sharded ``*.safetensors.index.json``, or a torch file
    (``.pth/.pt/.bin``, read with ``weights_only=True``: no arbitrary unpickling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    try:
        if p.name.endswith(".index.json"):
            weight_map = json.loads(p.read_text())["weight_map"]
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load_weights(p.parent / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(f"{p}: shards lack {len(missing)} indexed tensors, e.g. {missing[:3]}")
            return state
        if p.suffix == ".safetensors":
            return load_file(str(p))
        if p.suffix in (".pth", ".pt", ".bin"):
            try:
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError,
                    ImportError, IndexError, KeyError, zipfile.BadZipFile) as e:
                # not the message: torch's asks to retry with weights_only=False, i.e. to run the file's code
                raise CheckpointError(f"{p} is not a PyTorch state dict that loads without running code "
                                      f"({type(e).__name__}): it is corrupt, not a .pth file, or holds Python "
                                      f"objects besides tensors; re-save it with torch.save(model.state_dict()) "
                                      f"or as .safetensors") from None
            for k in ("state_dict", "model"):  # training checkpoints nest the weights
                if isinstance(obj, dict) and isinstance(obj.get(k), dict):
                    obj = obj[k]
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(f"{p}: not a state dict of tensors")
            return dict(obj)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{p} is corrupt or not a weight file ({type(e).__name__}: {e})") from None
    raise CheckpointError(f"{p}: unknown weight file type {p.suffix!r} (expected .safetensors, "
                          f"*.safetensors.index.json, .pth, .pt or .bin)")


# ---- position embeddings and input normalisation -----------------------------------------------
def resize_pos_embed(pos_1ND: torch.Tensor, num_prefix: int, new_grid: int, *, mode: str = "bicubic",
                     antialias: bool = False, offset: float | None = None) -> torch.Tensor:
    """Resize the grid part of a (1, prefix + G*G, D) position embedding to ``new_grid``; prefix rows
    (class token) are kept. ``offset`` (e.g. 0.1) uses DINOv2's original ``scale_factor=(new+offset)/G``
    instead of ``size=new``. Computed in float32, returned in the input dtype."""
    if mode not in INTERPOLATIONS:
        raise ConfigError(f"pos-embed interpolation {mode!r} is not one of {INTERPOLATIONS}")
    prefix, grid = pos_1ND[:, :num_prefix], pos_1ND[:, num_prefix:]
    G = math.isqrt(grid.shape[1])
    if G * G != grid.shape[1]:
        raise ConfigError(f"pos_embed has {grid.shape[1]} grid positions: not a square grid")
    if new_grid == G:
        return pos_1ND
    D = grid.shape[-1]
    x = grid.reshape(1, G, G, D).permute(0, 3, 1, 2).float()
    kw: dict[str, Any] = {"size": (new_grid, new_grid)}
    if offset is not None:
        kw = {"scale_factor": ((new_grid + offset) / G,) * 2}
    if mode in ("bicubic", "bilinear"):
        kw.update(align_corners=False, antialias=antialias)
    x = F.interpolate(x, mode=mode, **kw)
    if x.shape[-2:] != (new_grid, new_grid):
        raise ConfigError(f"interpolation offset {offset} gave a {tuple(x.shape[-2:])} grid, not {new_grid}")
    x = x.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_1ND.dtype)
    return torch.cat([prefix, x], dim=1)


def fold_input_normalization(w_DCPP: torch.Tensor, b_D: torch.Tensor, source_mean, source_std,
                             data_mean=None, data_std=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-embedding weights that take ``(x - data_mean) / data_std`` (default: raw x) and compute
    what the source computes on ``(x - source_mean) / source_std``: W' = W data_std / source_std,
    b' = b + sum W (data_mean - source_mean) / source_std. Per-channel stats; one value broadcasts."""
    C = w_DCPP.shape[1]

    def vec(v, default: float, name: str) -> torch.Tensor:
        t = torch.as_tensor([default] if v is None else list(v), dtype=torch.float64).flatten()
        if t.numel() not in (1, C):
            raise ConfigError(f"{name} has {t.numel()} values; the source has {C} input channels")
        return t.expand(C)

    sm, ss = vec(source_mean, 0.0, "source mean"), vec(source_std, 1.0, "source std")
    dm, ds = vec(data_mean, 0.0, "data mean"), vec(data_std, 1.0, "data std")
    if (ss <= 0).any() or (ds <= 0).any():
        raise ConfigError("normalisation std values must be > 0")
    w = w_DCPP.double()
    w_new = w * (ds / ss)[None, :, None, None]
    b_new = b_D.double() + (w * ((dm - sm) / ss)[None, :, None, None]).sum((1, 2, 3))
    return w_new.to(w_DCPP.dtype), b_new.to(b_D.dtype)


# ---- timm keys -> moevision --------------------------------------------------------------------
def _block_indices(state: dict[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})


def convert_timm_state_dict(
    state: dict[str, torch.Tensor], *, num_heads: int | None = None, img_size: int | None = None,
    num_classes: int | None = None, in_chans: int | None = None, norm_eps: float = 1e-6, mlp_act: str = "gelu",
    interpolation: str = "bicubic", antialias: bool = False, interpolate_offset: float | None = None,
    source_norm: tuple | None = None, data_norm: tuple | None = None, ignore_keys: tuple[str, ...] = (),
    expect: dict[str, Any] | None = None, provenance: dict[str, list[str]] | None = None,
    ignored: list[tuple[str, str]] | None = None, source: str = "<state dict>", format: str = "timm",
    source_name: Callable[[str], str] | None = None,
) -> tuple[VisionTransformer, ConversionReport]:
    """Build a dense moevision ViT from timm-keyed weights.

    ``img_size`` (default: the source grid x patch) resizes the position grid; ``num_classes`` (default:
    the source head, else 10) keeps or replaces the head; ``in_chans=1`` sums a 3-channel patch
    embedding over channels (exact for grey images replicated to 3 channels); ``source_norm`` /
    ``data_norm`` = (mean, std) fold input normalisation into the patch embedding
    (``fold_input_normalization``). ``ignore_keys`` are regexes of source keys to drop on purpose; any
    other key the model does not use is an error. ``expect`` cross-checks inferred fields (from a
    config file). ``provenance`` maps a timm key to the source keys it came from (for the report);
    ``source_name`` names a missing tensor in the source's terms."""
    report = ConversionReport(source=source, format=format, ignored=list(ignored or []))
    provenance = provenance or {}
    state = dict(state)
    for k in list(state):
        if any(re.search(p, k) for p in ignore_keys):
            report.ignored.append((provenance.get(k, [k])[0], "matched --ignore-keys"))
            del state[k]
    required = ["patch_embed.proj.weight", "pos_embed", "norm.weight", "blocks.0.attn.qkv.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not a ViT state dict in {format} layout: missing {missing} "
                              f"(found e.g. {sorted(state)[:5]})")
    w_pe = state["patch_embed.proj.weight"]
    if w_pe.dim() != 4 or w_pe.shape[2] != w_pe.shape[3]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {tuple(w_pe.shape)}; expected "
                              f"(D, C, P, P) with square patches")
    D, C, P = w_pe.shape[0], w_pe.shape[1], w_pe.shape[2]
    blocks = _block_indices(state)
    depth = len(blocks)
    if blocks != list(range(depth)):
        raise CheckpointError(f"{source}: block indices {blocks} are not 0..{depth - 1}")
    Fh = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else None
    if Fh is None:
        raise CheckpointError(f"{source}: blocks.0.mlp.fc1.weight is missing (SwiGLU MLPs are not supported)")
    qkv_bias = "blocks.0.attn.qkv.bias" in state
    class_token = "cls_token" in state
    layer_scale = "blocks.0.ls1.gamma" in state
    for bad, why in (("reg_token", "register tokens"), ("fc_norm.weight", "an fc_norm (average-pool) head")):
        if bad in state:
            raise CheckpointError(f"{source}: {bad} found: {why} are not supported by moevision's ViT")

    pos = state["pos_embed"]
    if pos.dim() == 2:
        pos = pos[None]
    n_pos = pos.shape[1]
    n_prefix = 1 if class_token else 0
    if class_token and math.isqrt(n_pos) ** 2 == n_pos and n_pos > 1:  # timm no_embed_class layout
        pos = torch.cat([pos.new_zeros(1, 1, D), pos], dim=1)
        report.notes.append("pos_embed has no class-token row (timm no_embed_class): a zero row was added")
    G = math.isqrt(pos.shape[1] - n_prefix)
    if G * G != pos.shape[1] - n_prefix or pos.shape[-1] != D:
        raise CheckpointError(f"{source}: pos_embed has shape {tuple(state['pos_embed'].shape)}; expected "
                              f"(1, {n_prefix} + G*G, {D})")
    src_img = G * P
    img = src_img if img_size is None else img_size
    if img % P:
        raise ConfigError(f"image size {img} must be a multiple of the patch size {P}")
    if img != src_img:
        pos = resize_pos_embed(pos, n_prefix, img // P, mode=interpolation, antialias=antialias,
                               offset=interpolate_offset)
        report.notes.append(f"pos_embed resized from a {G}x{G} grid ({src_img} px) to {img // P}x{img // P} "
                            f"({img} px), {interpolation}, antialias={antialias}, offset={interpolate_offset}")
    if num_heads is None:
        if D % 64:
            raise ConfigError(f"width {D} is not a multiple of 64: pass num_heads (--num-heads)")
        num_heads = D // 64
        report.notes.append(f"num_heads={num_heads} assumed (head width 64); pass --num-heads to set it")
    if D % num_heads:
        raise ConfigError(f"num_heads={num_heads} does not divide the width {D}")
    if mlp_act not in MLP_ACTS:
        raise ConfigError(f"activation {mlp_act!r} is not one of {tuple(MLP_ACTS)}")
    inferred = dict(embed_dim=D, depth=depth, patch_size=P, in_chans=C, mlp_hidden=Fh, qkv_bias=qkv_bias,
                    layer_scale=layer_scale, grid=G)
    for k, v in (expect or {}).items():
        if v is not None and inferred.get(k) != v:
            raise CheckpointError(f"{source}: the config says {k}={v} but the weights have {k}={inferred.get(k)}")

    # head: keep the source's, or a new one
    src_classes = state["head.weight"].shape[0] if "head.weight" in state else None
    classes = num_classes if num_classes is not None else (src_classes or 10)
    keep_head = src_classes is not None and classes == src_classes
    if src_classes is not None and not keep_head:
        for k in ("head.weight", "head.bias"):
            if k in state:
                report.ignored.append((provenance.get(k, [k])[0], f"replaced by a new {classes}-class head"))
                del state[k]
    if not keep_head:
        report.notes.append(f"head: new {classes}-class linear layer (random init)"
                            + ("" if num_classes is not None else "; set --num-classes"))

    # patch embedding: fold normalisation (per source channel), then reduce channels
    w_pe, b_pe = state["patch_embed.proj.weight"], state.get("patch_embed.proj.bias")
    if b_pe is None:
        raise CheckpointError(f"{source}: patch_embed.proj.bias is missing")
    if source_norm is not None or data_norm is not None:
        sm, ss = source_norm or (None, None)
        dm, ds = data_norm or (None, None)
        w_pe, b_pe = fold_input_normalization(w_pe, b_pe, sm, ss, dm, ds)
        report.notes.append(f"input normalisation folded into patch_embed: source mean/std {sm}/{ss}, "
                            f"inputs normalised by {dm}/{ds}")
    chans = C if in_chans is None else in_chans
    if chans != C:
        if chans != 1:
            raise ConfigError(f"in_chans={chans}: only 1 (sum over the source's {C} channels) is supported")
        w_pe = w_pe.sum(1, keepdim=True)
        report.notes.append(f"patch_embed summed over its {C} input channels (exact for grey images "
                            f"replicated to {C} channels)")

    cfg = ViTConfig(img_size=img, in_chans=chans, num_classes=classes, stem="patch", patch_size=P, embed_dim=D,
                    depth=depth, num_heads=num_heads, mlp_ratio=Fh / D, qkv_bias=qkv_bias, class_token=class_token,
                    global_pool="token", norm_eps=norm_eps, mlp_act=mlp_act,
                    layer_scale_init=1.0 if layer_scale else None)
    model = VisionTransformer(cfg)
    if model.blocks[0].mlp.fc1.out_features != Fh:
        raise CheckpointError(f"{source}: MLP width {Fh} is not representable as mlp_ratio * {D}")
    target = model.state_dict()
    new = dict(state, pos_embed=pos, **{"patch_embed.proj.weight": w_pe, "patch_embed.proj.bias": b_pe})
    known = set(target)
    unknown = sorted(k for k in new if k not in known)
    if unknown:
        shown = [provenance.get(k, [k])[0] for k in unknown]
        raise CheckpointError(f"{source}: {len(unknown)} tensors have no place in moevision's ViT: {shown[:10]}"
                              + (" ..." if len(shown) > 10 else "")
                              + "; drop them on purpose with --ignore-keys REGEX")
    needed = [k for k in target if not (k.startswith("head.") and not keep_head)]
    absent = [k for k in needed if k not in new]
    if absent:
        shown = [f"{k} ({source_name(k)})" if source_name else k for k in absent[:10]]
        raise CheckpointError(f"{source}: {len(absent)} tensors the model needs are missing: {shown}")
    for k in needed:
        if tuple(new[k].shape) != tuple(target[k].shape):
            raise CheckpointError(f"{source}: {provenance.get(k, [k])[0]} has shape {tuple(new[k].shape)}, "
                                  f"{k} needs {tuple(target[k].shape)}")
        target[k] = new[k].detach().to(torch.float32)
        report.mapped.append(("+".join(provenance.get(k, [k])), k))
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()} - {"float32"})
    if dtypes:
        report.notes.append(f"weights cast from {dtypes} to float32")
    model.load_state_dict(target)
    return model.eval(), report
