"""moevision: sparse Mixture-of-Experts vision models in PyTorch."""

from .errors import CheckpointError, ConfigError, DataError, MoEVisionError
from .models import ModelOutput, ViTConfig, VisionTransformer, create_model, from_pretrained, list_models
from .moe import MoE, MoEOutput, RoutingStats, compute_capacity

__version__ = "0.1.0"

__all__ = [
    "MoE", "MoEOutput", "RoutingStats", "compute_capacity", "create_model", "list_models", "from_pretrained",
    "ModelOutput", "ViTConfig", "VisionTransformer", "MoEVisionError", "ConfigError", "DataError",
    "CheckpointError", "__version__",
]
