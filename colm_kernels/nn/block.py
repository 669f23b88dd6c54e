"""``ChainTransformerBlock``: pre-norm LLaMA block built from chain modules."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .attention import ChainAttention
from .feed_forward import ChainFeedForward
from .kv_cache import KVCache
from .norm import ChainRMSNorm


class ChainTransformerBlock(nn.Module):
    """``h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))``.

    ``config`` is a :class:`colm_kernels.models.CoLMConfig`.
    """

    def __init__(self, config):
        super().__init__()
        chains = config.chain_config
        self.attention = ChainAttention(
            config.dim, config.n_heads, config.n_kv_heads, chains, config.kv_sharing,
            config.kv_mapping, config.rope_theta, deterministic=config.deterministic_attention,
        )
        self.attention_norm = ChainRMSNorm(config.dim, chains, config.norm_eps)
        self.feed_forward = ChainFeedForward(config.dim, config.ffn_hidden_dim, chains)
        self.ffn_norm = ChainRMSNorm(config.dim, chains, config.norm_eps)

    def forward(self, x: Tensor, chain=None, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x, chain), chain, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h, chain), chain)
