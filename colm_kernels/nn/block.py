"""``ChainTransformerBlock``: pre-norm LLaMA block built from chain modules."""
from __future__ import annotations

from typing import Callable, Optional

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

    def forward(self, x: Tensor, chain=None, cache: Optional[KVCache] = None, layer: int = 0,
                attend: Optional[Callable] = None, *, seq_chains: Optional[Tensor] = None,
                check_values: bool = True) -> Tensor:
        """``attend(attention, x_normed, chain)``, when given, replaces ``self.attention(...)``: the
        integrations (padded / packed batches, their own caches) run their attention layout through
        the block's ``__call__``, so FSDP, activation-checkpointing and compile wrappers still fire.

        ``seq_chains``: per-row scales for the norms and the FFN (a prefix of ``x``'s leading
        dims), and per sequence ``(B,)`` for ``self.attention`` too; an ``attend`` brings its own.
        Beyond a row's scale the attention and FFN add exact zeros: ``x`` passes through there."""
        rows = dict(seq_chains=seq_chains, check_values=check_values)
        normed = self.attention_norm(x, chain, **rows)
        rows["check_values"] = False  # checked once, by the first op
        if attend is None:
            h = x + self.attention(normed, chain, cache, layer, **rows)
        else:
            h = x + attend(self.attention, normed, chain)
        return h + self.feed_forward(self.ffn_norm(h, chain, **rows), chain, **rows)
