"""A QMoE-compressed model: swap the experts for ``CompressedExperts``, count the bits, and write /
read the compressed checkpoint directory (spec §1 B4).

Directory layout: ``config.json`` (the model config as ``save_pretrained`` writes it, plus
``"format": "qmoe"``, ``"format_module"`` naming this module, and ``"compression"``: the QMoE options
and each compressed layer's description) and ``model.safetensors`` (dense weights, and per MoE layer
the codes, offsets, grids and biases as integer / low-precision tensors). ``moevision.from_pretrained``
and ``moevision eval`` load it (the format is registered with the model builder).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from ...errors import CheckpointError
from ...models._builder import FORMAT_VERSION, load_state_file, read_model_config, register_format
from ...utils import atomic_write
from .calibrate import DTYPES, QMoEConfig, moe_layers
from .compressed import CompressedExperts

FORMAT = "qmoe"


def compress_model(model: torch.nn.Module, results: dict[str, tuple], cfg: QMoEConfig, *,
                   cache_size: int = 0) -> torch.nn.Module:
    """A copy of ``model`` whose MoE layers hold ``CompressedExperts`` built from ``results``
    (``quantize_model``'s output)."""
    model = copy.deepcopy(model)
    for name, moe in moe_layers(model):
        res, _ = results[name]
        p_zero = {p: _p_zero(r.codes, cfg) for p, r in res.items()}
        moe.experts = CompressedExperts.from_codes(
            moe.experts, {p: r.codes for p, r in res.items()}, {p: r.grid for p, r in res.items()}, cfg.bits,
            layout=cfg.layout, p_zero=p_zero, scale_dtype=DTYPES[cfg.scale_dtype],
            bias_dtype=DTYPES[cfg.bias_dtype], cache_size=cache_size)
        _pin_impl(moe)
    return model


def _pin_impl(moe) -> None:
    """Compressed experts run the ``sorted`` dispatch (which decodes only the experts in use) unless
    the layer names another; the automatic choice would look at the weights' dtype (a full decode)."""
    if getattr(moe, "impl", None) == "auto":
        moe.impl = "sorted"


def _p_zero(codes: torch.Tensor, cfg: QMoEConfig) -> float:
    if cfg.dictionary == "fixed" or cfg.bits != "ternary":
        return 0.885
    return min(max(round(float((codes == 0).float().mean()), 3), 0.5), 0.99)


def expert_param_count(model: torch.nn.Module) -> int:
    """Parameters of all experts as the uncompressed model stores them (weights and biases)."""
    n = 0
    for _, moe in moe_layers(model):
        ex = moe.experts
        E, D, F = ex.num_experts, ex.dim, ex.hidden_dim
        n += E * (D * F * (3 if ex.swiglu else 2) + ((F + D) if ex.has_bias else 0))
    return n


def compression_stats(model: torch.nn.Module) -> dict:
    """Bits of a compressed model's experts: codes (incl. offsets), grids (per-row scales), biases;
    per expert parameter and per weight-matrix entry."""
    codes = grids = biases = weights = 0
    for _, moe in moe_layers(model):
        ex = moe.experts
        if not isinstance(ex, CompressedExperts):
            raise CheckpointError("compression_stats needs a model with CompressedExperts")
        for k, b in ex.named_buffers():
            nbytes = b.numel() * b.element_size()
            if k.endswith("_grid"):
                grids += nbytes
            elif k in ("b1", "b2"):
                biases += nbytes
            else:
                codes += nbytes
        weights += sum(s.rows * s.cols for s in ex.specs.values()) * ex.num_experts
    params = expert_param_count(model)
    total = codes + grids + biases
    return {"expert_params": params, "expert_weight_entries": weights, "expert_bytes": total,
            "bits_per_expert_param": 8 * total / params, "code_bits_per_weight": 8 * codes / weights,
            "grid_bits_per_param": 8 * grids / params, "bias_bits_per_param": 8 * biases / params,
            "expert_bytes_fp32": 4 * params, "expert_bytes_bf16": 2 * params}


def save_compressed(model: torch.nn.Module, directory: str | os.PathLike, cfg: QMoEConfig, *,
                    dense_dtype: str = "float32", extra: dict | None = None) -> Path:
    """Write the compressed checkpoint directory; non-expert floating tensors are cast to
    ``dense_dtype`` (they are loaded back into the fp32 model)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, moe in moe_layers(model):
        if not isinstance(moe.experts, CompressedExperts):
            raise CheckpointError(f"{name} is not compressed")
        layers[f"{name}.experts"] = moe.experts.describe()
    dt = DTYPES[dense_dtype]
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point() and not any(k.startswith(p + ".") for p in layers):
            v = v.to(dt)
        state[k] = v.contiguous()
    meta = {"format_version": FORMAT_VERSION, "architecture": model.arch_name,
            "model_name": getattr(model, "model_name", None), "config": model.config.to_dict(),
            "format": FORMAT, "format_module": __name__,
            "compression": {"method": "qmoe", "options": cfg.to_dict(), "dense_dtype": dense_dtype,
                            "layers": layers, **(extra or {})}}
    atomic_write(d / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(d / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return d


def load_compressed(directory: str | os.PathLike, *, map_location="cpu", cache_size: int = 0) -> torch.nn.Module:
    """Rebuild a model written by ``save_compressed``: the architecture from its config, the experts of
    every compressed layer as ``CompressedExperts``; every tensor must be used."""
    d = Path(directory)
    model_cls, cfg, meta = read_model_config(d)
    try:
        layers = meta["compression"]["layers"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{d / 'config.json'}: format {FORMAT!r} without a 'compression' section") from None
    model = model_cls(cfg)
    model.model_name = meta.get("model_name")
    state = load_state_file(d / "model.safetensors")
    modules = dict(model.named_modules())
    for path, desc in layers.items():
        parent, _, attr = path.rpartition(".")
        if parent not in modules or not hasattr(modules[parent], attr):
            raise CheckpointError(f"{d}: compressed layer {path!r} does not exist in the model")
        try:
            setattr(modules[parent], attr, CompressedExperts.from_state(state, path + ".", desc, cache_size=cache_size))
            _pin_impl(modules[parent])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{d}: compressed layer {path!r} does not match its description ({e})") from None
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{d}: tensors do not match the config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    model.load_state_dict(state)
    return model.to(map_location)


register_format(FORMAT, load_compressed)
