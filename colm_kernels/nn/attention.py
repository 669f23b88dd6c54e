"""``ChainAttention``: LLaMA attention whose query heads are owned by chains, over ``chain_attention``.

Chain i owns ``c_i`` consecutive query heads (``n_heads == sum(chains)``). Without KV sharing
``wk``/``wv`` are ``ChainLinear`` (chain i owns ``c_i * n_kv_heads / S`` kv heads, ordinary GQA);
with KV sharing (CoLM-Air) they are plain ``nn.Linear(P_1, n_kv_heads * head_dim)`` on the first
chain, and every query head reads the shared kv heads through ``kv_mapping``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..chains import KV_MAPPINGS, ChainsLike, as_chains
from ..ops.chain_attention.api import chain_attention
from ..ops.chain_attention_decode.api import MAX_DECODE_TOKENS, chain_attention_decode
from .kv_cache import KVCache
from .linear import ChainLinear
from .rope import apply_rotary, rope_angles


class ChainAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        chains: ChainsLike,
        kv_sharing: bool = False,
        kv_mapping: str = "tile",
        rope_theta: float = 500000.0,
        deterministic: bool = False,
    ):
        """``deterministic``: the training attention's backward (``chain_attention``'s flag):
        False adds dQ by atomics (fastest; not bitwise reproducible run to run on a GPU), True
        recomputes QK^T and dP in a separate dQ pass (bitwise reproducible)."""
        super().__init__()
        self.chains = chains = as_chains(chains)
        chains.check_heads(n_heads)
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        if kv_mapping not in KV_MAPPINGS:
            raise ValueError(f"kv_mapping must be one of {KV_MAPPINGS}, got {kv_mapping!r}")
        self.dim, self.n_heads, self.n_kv_heads = dim, n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.kv_sharing, self.kv_mapping, self.rope_theta = kv_sharing, kv_mapping, rope_theta
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
        self.deterministic = deterministic
        kv_dim = n_kv_heads * self.head_dim
        self.wq = ChainLinear(dim, dim, chains, bias=False)
        if kv_sharing:
            chains.check_kv_sharing(n_kv_heads)
            self.shared_width = chains.prefixes(dim)[0]
            self.wk = nn.Linear(self.shared_width, kv_dim, bias=False)
            self.wv = nn.Linear(self.shared_width, kv_dim, bias=False)
        else:
            chains.kv_head_counts(n_kv_heads)
            self.wk = ChainLinear(dim, kv_dim, chains, bias=False)
            self.wv = ChainLinear(dim, kv_dim, chains, bias=False)
        self.wo = ChainLinear(dim, dim, chains, bias=False)

    def project_kv(self, x: Tensor, chain: int, *, seq_chains=None,
                   check_values: bool = True) -> tuple[Tensor, Tensor]:
        """Keys (before RoPE) and values of the kv heads that exist at scale ``chain`` (with
        ``seq_chains``, a row's kv heads beyond its scale are zeros; CoLM-Air's are never)."""
        if self.kv_sharing:
            shared = x[..., : self.shared_width]  # CoLM-Air: chain 1 only, at every scale
            return self.wk(shared), self.wv(shared)
        rows = dict(seq_chains=seq_chains, check_values=check_values)
        return self.wk(x, chain, **rows), self.wv(x, chain, **rows)

    def forward(self, x: Tensor, chain=None, cache: Optional[KVCache] = None, layer: int = 0, *,
                seq_chains: Optional[Tensor] = None, check_values: bool = True) -> Tensor:
        """``x``: ``(B, S, >= P_(chain+1))``. With ``cache``, the new tokens follow the cached
        ones (their K/V are appended to layer ``layer`` of it). A decode step (a non-empty cache,
        at most ``MAX_DECODE_TOKENS`` = 128 new tokens, no gradient needed) reads the cache in
        place (contiguous or paged) through ``chain_attention_decode``.

        ``seq_chains``: optional integer ``(B,)``, the last active chain of each sequence (at most
        ``chain``): its heads (and output features) beyond it are exact zeros, as if the
        sequence ran alone at its scale. ``check_values=False`` skips the host check of its
        values (the caller guarantees them)."""
        k = self.chains.check_chain(chain)
        seqlen = x.shape[1]
        start = 0 if cache is None else cache.length
        angles = rope_angles(self.head_dim, start, seqlen, self.rope_theta, x.device)
        rows = dict(seq_chains=seq_chains, check_values=check_values)
        q = apply_rotary(self.wq(x, k, **rows).unflatten(-1, (-1, self.head_dim)), angles)
        rows["check_values"] = False  # wq checked them
        keys, values = self.project_kv(x, k, **rows)
        keys = apply_rotary(keys.unflatten(-1, (-1, self.head_dim)), angles)
        values = values.unflatten(-1, (-1, self.head_dim))
        if cache is not None:
            # The decode op is inference-only: a step that needs gradients takes chain_attention.
            decode = (cache.length > 0 and seqlen <= MAX_DECODE_TOKENS
                      and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad)))
            if decode:
                cache.write(layer, keys, values, k, seq_chains)
                k_cache, v_cache, seqlens = cache.layer_cache(layer, seqlen)
                # Lengths and pages come from the cache, valid by construction: no host sync.
                out = chain_attention_decode(
                    q, k_cache, v_cache, seqlens, self.chains, kv_sharing=self.kv_sharing,
                    kv_mapping=self.kv_mapping, seq_chains=seq_chains, block_table=cache.block_table,
                    check_values=False,
                )
                return self.wo(out.flatten(-2), k, **rows)
            keys, values = cache.update(layer, keys, values, k, seq_chains)
        out = chain_attention(
            q, keys, values, self.chains, causal=True, kv_sharing=self.kv_sharing,
            kv_mapping=self.kv_mapping, seq_chains=seq_chains, check_values=False,
            deterministic=self.deterministic,
        )
        return self.wo(out.flatten(-2), k, **rows)
