"""Building blocks shared by the model zoo (attention, MLP, patch embedding, stochastic depth)."""

from .attention import Attention
from .drop import DropPath
from .mlp import Mlp
from .patch_embed import ConvStem, PatchEmbed

__all__ = ["Attention", "DropPath", "Mlp", "ConvStem", "PatchEmbed"]
