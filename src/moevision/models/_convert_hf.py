"""HF transformers ``ViTModel`` / ``ViTForImageClassification`` and ``Dinov2Model`` -> moevision ViT.

ViT: Dosovitskiy et al., ICLR 2021; DINOv2: Oquab et al., TMLR 2024 (a ViT with LayerScale, trained
at 518 px with a 37x37 position grid that is resized for other image sizes). The source is a
``save_pretrained`` directory (``config.json`` + ``model.safetensors``, a sharded
``model.safetensors.index.json`` or ``pytorch_model.bin``) or an in-memory state dict + config.

HF keys are renamed to timm's (moevision's) and ``_convert_timm.convert_timm_state_dict`` builds the
model. Both key generations are accepted: transformers 4 (``encoder.layer.N.attention.attention.query``,
``attention.output.dense``, ViT ``intermediate.dense`` / ``output.dense``) and transformers 5
(``attention.q_proj/k_proj/v_proj/o_proj``, ViT ``layers.N`` and ``mlp.fc1/fc2``). q, k and v are
stacked into ``attn.qkv`` (moevision splits qkv as [q; k; v], heads contiguous, as HF does).
Mapped from the config: heads, LayerNorm eps (HF ViT 1e-12, DINOv2 1e-6), the GELU variant
(``gelu`` exact; ``gelu_new``/``gelu_pytorch_tanh``/``gelu_fast`` the tanh approximation), image size.
``forward_features`` equals HF's ``last_hidden_state`` (after the final layernorm). DINOv2's position
grid is resized at conversion time with HF's own interpolation (bicubic, ``size=``, no antialias), so
a model converted for N px equals HF DINOv2 run on N px images; for HF ViT the same resizing equals
``interpolate_pos_encoding=True``.

Dropped on purpose (listed in the report): ``mask_token`` (masked-image pretraining only) and the ViT
``pooler`` (a tanh layer on the class token, not part of ``last_hidden_state``). Refused: DINOv2's
SwiGLU MLP (giant), register tokens, ``Dinov2ForImageClassification``'s head (it reads the class
token and the mean patch token; drop it with ``ignore_keys``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ._convert_timm import ConversionReport, convert_timm_state_dict, load_weights
from .vit import VisionTransformer

HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "relu": "relu", "silu": "silu", "swish": "silu"}
DEFAULT_EPS = {"vit": 1e-12, "dinov2": 1e-6}

# per-layer suffixes, both transformers generations -> (timm suffix, part) ; part q/k/v are stacked
_LAYER_MAP = [
    (r"attention\.attention\.query\.|attention\.q_proj\.", "attn.qkv.", "q"),
    (r"attention\.attention\.key\.|attention\.k_proj\.", "attn.qkv.", "k"),
    (r"attention\.attention\.value\.|attention\.v_proj\.", "attn.qkv.", "v"),
    (r"attention\.output\.dense\.|attention\.o_proj\.", "attn.proj.", None),
    (r"layernorm_before\.|norm1\.", "norm1.", None),
    (r"layernorm_after\.|norm2\.", "norm2.", None),
    (r"intermediate\.dense\.|mlp\.fc1\.", "mlp.fc1.", None),
    (r"output\.dense\.|mlp\.fc2\.", "mlp.fc2.", None),
    (r"layer_scale1\.lambda1$", "ls1.gamma", None),
    (r"layer_scale2\.lambda1$", "ls2.gamma", None),
]
_TOP_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_DROPPED = {
    "embeddings.mask_token": "mask token (masked-image pretraining only)",
    "pooler.dense.weight": "ViT pooler (tanh on the class token; not part of last_hidden_state)",
    "pooler.dense.bias": "ViT pooler (tanh on the class token; not part of last_hidden_state)",
}


def _hf_name(timm_key: str, mt: str) -> str:
    """The transformers 5 name of a timm key (for error messages)."""
    rev = {v: k for k, v in _TOP_MAP.items()}
    if timm_key in rev:
        return "HF " + rev[timm_key]
    if timm_key.startswith("head."):
        return "HF classifier." + timm_key.split(".")[1]
    m = re.match(r"blocks\.(\d+)\.(.+)$", timm_key)
    if not m:
        return "HF ?"
    layer = f"layers.{m.group(1)}." if mt == "vit" else f"encoder.layer.{m.group(1)}."
    names = {"attn.qkv": "attention.q_proj/k_proj/v_proj", "attn.proj": "attention.o_proj",
             "norm1": "layernorm_before" if mt == "vit" else "norm1",
             "norm2": "layernorm_after" if mt == "vit" else "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    for t, h in names.items():
        if m.group(2).startswith(t):
            return "HF " + layer + h + m.group(2)[len(t):]
    return "HF ?"


def _square(v: Any, name: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ConfigError(f"config {name}={list(v)}: only square sizes are supported")
        v = v[0]
    return int(v)


def _model_type(config: dict, keys: list[str]) -> str:
    mt = config.get("model_type")
    if mt is None:  # no config: guess from the key names
        mt = "dinov2" if any(".layer_scale1." in k or ".norm1." in k for k in keys) else "vit"
    if mt not in DEFAULT_EPS:
        raise ConfigError(f"model_type {mt!r} is not supported (HF ViT 'vit' and DINOv2 'dinov2' are)")
    return mt


def hf_to_timm(state: dict[str, torch.Tensor], config: dict | None = None):
    """Rename HF ViT/DINOv2 keys to timm's. Returns (timm state, provenance {timm key: [hf keys]},
    ignored [(hf key, why)], model_type, unknown hf keys)."""
    config = dict(config or {})
    mt = _model_type(config, list(state))
    out: dict[str, torch.Tensor] = {}
    prov: dict[str, list[str]] = {}
    ignored: list[tuple[str, str]] = []
    unknown: list[str] = []
    qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in state.items():
        k = re.sub(r"^(vit|dinov2)\.", "", key)
        if k in _DROPPED:
            ignored.append((key, _DROPPED[k]))
            continue
        if k in _TOP_MAP:
            out[_TOP_MAP[k]] = t
            prov[_TOP_MAP[k]] = [key]
            continue
        if k in ("classifier.weight", "classifier.bias"):
            if mt == "dinov2":
                unknown.append(key)  # its classifier reads [CLS, mean patch]: no moevision equivalent
            else:
                out["head." + k.split(".")[1]] = t
                prov["head." + k.split(".")[1]] = [key]
            continue
        m = re.match(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$", k)
        if m is None:
            unknown.append(key)
            continue
        i, rest = m.group(1), m.group(2)
        for pat, dst, part in _LAYER_MAP:
            mm = re.match(pat, rest)
            if mm:
                tk = f"blocks.{i}.{dst}" + rest[mm.end():]
                if part is None:
                    out[tk] = t
                    prov[tk] = [key]
                else:
                    qkv.setdefault(tk, {})[part] = (key, t)
                break
        else:
            unknown.append(key)
    for tk, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{tk}: found only the {sorted(parts)} parts of q/k/v ({[p[0] for p in parts.values()]})")
        out[tk] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
        prov[tk] = [parts[p][0] for p in "qkv"]
    return out, prov, ignored, mt, unknown


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: Any = None, *, img_size: int | None = None,
                          num_classes: int | None = None, num_heads: int | None = None, source: str = "<state dict>",
                          ignore_keys: tuple[str, ...] = (), **opts) -> tuple[VisionTransformer, ConversionReport]:
    """HF ViT/DINOv2 weights + config (a dict, a ``PretrainedConfig`` or None: then the architecture is
    read from the key names and shapes, heads default to width/64) -> (moevision ViT, report).
    ``opts`` go to ``convert_timm_state_dict`` (interpolation, in_chans, source_norm, ...)."""
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    config = dict(config or {})
    dropped = {k for k in state if any(re.search(p, k) for p in ignore_keys)}
    timm_state, prov, ignored, mt, unknown = hf_to_timm({k: v for k, v in state.items() if k not in dropped},
                                                        config)
    ignored = [(k, "matched --ignore-keys") for k in sorted(dropped)] + ignored
    if unknown:
        hint = (" (Dinov2ForImageClassification's classifier reads [CLS, mean patch tokens], which moevision's "
                "head does not; drop it with --ignore-keys classifier)" if any("classifier" in u for u in unknown)
                else "")
        raise CheckpointError(f"{source}: {len(unknown)} tensors are not part of an HF {mt} ViT: {unknown[:10]}"
                              + (" ..." if len(unknown) > 10 else "") + hint
                              + "; drop them on purpose with --ignore-keys REGEX")
    if config.get("use_swiglu_ffn"):
        raise ConfigError(f"{source}: DINOv2 with a SwiGLU MLP (use_swiglu_ffn=true) is not supported")
    if config.get("num_register_tokens"):
        raise ConfigError(f"{source}: register tokens are not supported")
    notes = []
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTS:
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported; supported: {sorted(HF_ACTS)}")
    eps = config.get("layer_norm_eps")
    if eps is None:
        eps = DEFAULT_EPS[mt]
        notes.append(f"layer_norm_eps={eps} ({mt} default; no config)")
    heads = num_heads if num_heads is not None else config.get("num_attention_heads")
    patch = _square(config.get("patch_size"), "patch_size")
    size = _square(config.get("image_size"), "image_size")
    D = config.get("hidden_size")
    if mt == "vit":
        hidden = config.get("intermediate_size")
    else:
        hidden = int(D * config["mlp_ratio"]) if D is not None and config.get("mlp_ratio") is not None else None
    expect = dict(embed_dim=D, depth=config.get("num_hidden_layers"), patch_size=patch,
                  in_chans=config.get("num_channels"), mlp_hidden=hidden, qkv_bias=config.get("qkv_bias"),
                  grid=size // patch if size and patch else None)
    if mt == "dinov2" and config:
        expect["layer_scale"] = True
    if "head.weight" in timm_state and config.get("num_labels") not in (None, timm_state["head.weight"].shape[0]):
        raise CheckpointError(f"{source}: num_labels={config['num_labels']} but classifier.weight has "
                              f"{timm_state['head.weight'].shape[0]} rows")
    model, report = convert_timm_state_dict(
        timm_state, num_heads=heads, img_size=img_size, num_classes=num_classes, norm_eps=float(eps),
        mlp_act=HF_ACTS[act], expect=expect, provenance=prov, ignored=ignored, source=source,
        format=f"hf-{mt}", source_name=lambda k: _hf_name(k, mt), **opts)
    report.notes[:0] = notes
    return model, report


def load_hf_directory(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config dict) of a ``save_pretrained`` directory."""
    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: no config.json (not a transformers save_pretrained directory)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (d / name).is_file():
            if name == "pytorch_model.bin.index.json":
                raise CheckpointError(f"{d}: sharded pytorch_model.bin is not supported; re-save with safetensors")
            return load_weights(d / name), config
    raise CheckpointError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def convert_hf(source: str | Path | dict, config: Any = None, **opts) -> tuple[VisionTransformer, ConversionReport]:
    """From a ``save_pretrained`` directory, a weight file (with ``config.json`` beside it if there is
    one) or an in-memory state dict + config."""
    if isinstance(source, dict):
        return convert_hf_state_dict(source, config, **opts)
    p = Path(source)
    if p.is_dir():
        state, cfg = load_hf_directory(p)
    else:
        state = load_weights(p)
        beside = p.parent / "config.json"
        cfg = json.loads(beside.read_text()) if config is None and beside.is_file() else config
    return convert_hf_state_dict(state, cfg if config is None else config, source=str(p), **opts)


def hf_reference_model(directory: str | Path):
    """The transformers model of a ``save_pretrained`` directory (``AutoModel``, offline), for checks."""
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"checking against transformers needs it installed: pip install transformers ({e})") from None
    try:
        return transformers.AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"transformers could not load {directory} as a reference ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def hf_features(hf_model, x: torch.Tensor) -> torch.Tensor:
    """HF ``last_hidden_state``; HF ViT gets ``interpolate_pos_encoding`` when ``x`` is not its size."""
    cfg = hf_model.config
    kw = {}
    if cfg.model_type == "vit" and x.shape[-1] != _square(cfg.image_size, "image_size"):
        kw["interpolate_pos_encoding"] = True
    with torch.no_grad():
        return hf_model(pixel_values=x, **kw).last_hidden_state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))

