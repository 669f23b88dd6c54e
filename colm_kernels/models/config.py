"""``CoLMConfig``: the hyper-parameters of a CoLM / CoLM-Air model, validated at construction."""
from __future__ import annotations

import dataclasses
from typing import Tuple

from ..chains import KV_MAPPINGS, Chains


@dataclasses.dataclass(frozen=True)
class CoLMConfig:
    """A LLaMA-style model whose every width is split into ``chains``.

    ``n_heads`` must equal ``sum(chains)`` (chain i owns ``c_i`` query heads); ``dim``,
    ``ffn_hidden_dim`` and (without KV sharing) ``n_kv_heads`` must split exactly. With
    ``kv_sharing=True`` (CoLM-Air) keys and values come from chain 1 only and every ``c_i`` must be
    a multiple of ``n_kv_heads``. ``deterministic_attention``: every attention layer's backward
    is bitwise reproducible run to run (``chain_attention(..., deterministic=True)``: one more
    QK^T and dP recompute); False (default) adds dQ by atomics, the faster FlashAttention-2 pass.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    chains: Tuple[int, ...]
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    kv_sharing: bool = False
    kv_mapping: str = "tile"
    deterministic_attention: bool = False

    def __post_init__(self):
        object.__setattr__(self, "chains", Chains(self.chains).sizes)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CoLMConfig.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"CoLMConfig.norm_eps must be a positive float, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"CoLMConfig.rope_theta must be a positive float, got {self.rope_theta!r}")
        if not isinstance(self.deterministic_attention, bool):
            raise ValueError(f"CoLMConfig.deterministic_attention must be a bool, got {self.deterministic_attention!r}")
        if self.kv_mapping not in KV_MAPPINGS:
            raise ValueError(f"CoLMConfig.kv_mapping must be one of {KV_MAPPINGS}, got {self.kv_mapping!r}")
        chains = self.chain_config
        chains.check_heads(self.n_heads, name="CoLMConfig.n_heads")
        if self.dim % self.n_heads:
            raise ValueError(
                f"CoLMConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim / n_heads) must be even for RoPE")
        chains.widths(self.dim, name="CoLMConfig.dim")
        chains.widths(self.ffn_hidden_dim, name="CoLMConfig.ffn_hidden_dim")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"CoLMConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
            )
        if self.kv_sharing:
            chains.check_kv_sharing(self.n_kv_heads, name="CoLMConfig.n_kv_heads")
        else:
            chains.kv_head_counts(self.n_kv_heads, name="CoLMConfig.n_kv_heads")

    @property
    def chain_config(self) -> Chains:
        return Chains(self.chains)

    @property
    def n_chains(self) -> int:
        return len(self.chains)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection output: ``n_kv_heads * head_dim``."""
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes) -> "CoLMConfig":
        return dataclasses.replace(self, **changes)
