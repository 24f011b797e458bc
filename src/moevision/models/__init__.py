"""The model zoo: dense and MoE ViTs (registered by name), MoE CNNs (``cnn.py``) and the MoE VLM."""

from ._builder import ModelOutput, create_model, from_pretrained, list_models, register_model, save_pretrained
from .vit import Block, ViTConfig, VisionTransformer
from ._convert_auto import convert_checkpoint  # HF / timm / ONNX dense ViTs -> moevision
from .cnn import CNNConfig, MoECNN, MoEConv2d, build_cnn

__all__ = ["ModelOutput", "create_model", "from_pretrained", "list_models", "register_model", "save_pretrained",
           "Block", "ViTConfig", "VisionTransformer", "convert_checkpoint", "CNNConfig", "MoECNN", "MoEConv2d",
           "build_cnn"]
from . import vlm  # noqa: E402,F401  (registers the vision-language models)
