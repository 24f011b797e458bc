"""Building blocks shared by the model zoo (attention, MLP, patch embedding, stochastic depth)."""

from ..registry import Registry
from .attention import Attention
from .drop import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import ConvStem, PatchEmbed

ATTENTION_LAYERS = Registry("attention")
ATTENTION_LAYERS.register("mha", Attention)
# register_attention(name, cls): cls(dim, num_heads, *, qkv_bias, attn_drop, proj_drop, **options)
register_attention = ATTENTION_LAYERS.register
get_attention = ATTENTION_LAYERS.get

__all__ = ["Attention", "DropPath", "LayerScale", "Mlp", "ConvStem", "PatchEmbed", "ATTENTION_LAYERS", "register_attention",
           "get_attention"]
