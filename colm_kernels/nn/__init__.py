"""Drop-in modules with the paper's constructors, ``forward(x, chain=None)`` and state-dict keys."""
from .attention import ChainAttention
from .block import ChainTransformerBlock
from .feed_forward import ChainFeedForward
from .kv_cache import KVCache
from .linear import ChainLinear
from .norm import ChainRMSNorm

__all__ = ["ChainAttention", "ChainFeedForward", "ChainLinear", "ChainRMSNorm",
           "ChainTransformerBlock", "KVCache"]
