"""Building blocks shared by the model zoo (attention, MLP, patch embedding, stochastic depth)."""

from .attention import Attention
from .drop import DropPath
from .mlp import Mlp
from .patch_embed import ConvStem, PatchEmbed

ATTENTION_LAYERS: dict[str, type] = {"mha": Attention}


def register_attention(name: str, cls: type) -> None:
    """Register an attention layer class taking (dim, num_heads, *, qkv_bias, attn_drop, proj_drop, **options)."""
    ATTENTION_LAYERS[name] = cls


def get_attention(name: str) -> type:
    if name not in ATTENTION_LAYERS:
        from .. import techniques  # noqa: F401  (techniques register their attention layers)
    if name not in ATTENTION_LAYERS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown attention {name!r}; known: {sorted(ATTENTION_LAYERS)}")
    return ATTENTION_LAYERS[name]


__all__ = ["Attention", "DropPath", "Mlp", "ConvStem", "PatchEmbed", "ATTENTION_LAYERS", "register_attention",
           "get_attention"]
