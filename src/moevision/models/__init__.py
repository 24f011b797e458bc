"""The model zoo: dense and MoE ViTs, registered by name."""

from ._builder import ModelOutput, create_model, from_pretrained, list_models, register_model, save_pretrained
from .vit import Block, ViTConfig, VisionTransformer

__all__ = ["ModelOutput", "create_model", "from_pretrained", "list_models", "register_model", "save_pretrained",
           "Block", "ViTConfig", "VisionTransformer"]
