"""The plain references every fast path is tested against (``loop``: per-expert masks;
``einsum``: GShard/V-MoE one-hot dispatch and combine tensors). See ``moe/dispatch.py``."""

from ..moe.dispatch import dispatch_einsum, dispatch_loop  # noqa: F401
