"""The model zoo: dense and MoE ViTs, registered by name."""

from ._builder import ModelOutput, create_model, from_pretrained, list_models, register_model, save_pretrained
from .vit import Block, ViTConfig, VisionTransformer
from ._convert_auto import convert_checkpoint  # HF / timm / ONNX dense ViTs -> moevision

__all__ = ["ModelOutput", "create_model", "from_pretrained", "list_models", "register_model", "save_pretrained",
           "Block", "ViTConfig", "VisionTransformer", "convert_checkpoint"]
from . import vlm  # noqa: E402,F401  (registers the vision-language models)
