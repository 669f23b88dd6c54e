"""What each tensor-parallel rank holds of a CoLM: per-chain interleaved shards, and the checks.

Column-parallel projections (``wq``, ``wk``, ``wv``, ``w1``, ``w3``) split every output chain's
features evenly: rank r holds the r-th of ``world`` equal pieces of each chain, so its local layer
is again a chain layer (output chain i of width ``d_i / world`` reading the full prefix ``P_i``).
Row-parallel projections (``wo``, ``w2``) split every input chain the same way: rank r's local
layer reads its piece of every chain of the prefix, and the ranks' outputs are summed. Attention
heads follow: rank r holds ``c_i / world`` query heads of chain i (and, without KV sharing, that
chain's kv heads read by them), so its local attention is a chain attention with chains
``c_i / world``. An elastic scale ``chain=k`` is the same prefix of chains on every rank.

CoLM-Air's shared kv heads (all computed from chain 1): with ``kv_mapping='chain_group'`` and
``n_kv_heads`` a multiple of ``world`` they are split (rank r's query heads read only its kv heads);
otherwise ``wk`` / ``wv`` are replicated (a ``P_1 x n_kv_heads * head_dim`` matrix each) and each
rank computes the kv heads its query heads read: all of them for ``tile``, one for ``chain_group``
with fewer kv heads than ranks.
"""
from __future__ import annotations

import dataclasses

from ....chains import Chains
from ....models import CoLMConfig

WORLD_NAME = "tensor_parallel_degree"


@dataclasses.dataclass(frozen=True)
class TensorParallelLayout:
    """The layout of ``config`` over ``world`` TP ranks (``build`` checks that it exists)."""

    config: CoLMConfig
    world: int
    local_heads: Chains  # query heads of each chain on one rank: c_i / world
    kv_split: bool  # CoLM-Air: the shared kv heads are split across ranks (else replicated)

    @classmethod
    def build(cls, config: CoLMConfig, world: int) -> "TensorParallelLayout":
        """Raises ``ValueError`` naming ``tensor_parallel_degree`` and the config field whose
        chains cannot be split evenly across ``world`` ranks."""
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"{WORLD_NAME} must be a positive int, got {world!r}")
        chains = config.chain_config
        split = dict(world=world, world_name=WORLD_NAME)
        local_heads = Chains(chains.shard_widths(config.n_heads, name="n_heads (query heads per chain)", **split))
        chains.shard_widths(config.ffn_hidden_dim, name="ffn_hidden_dim", **split)
        if config.vocab_size < world:
            raise ValueError(f"{WORLD_NAME}={world} is larger than vocab_size={config.vocab_size}: "
                             "every rank must hold some rows of the vocabulary-parallel head")
        kv_split = False
        if not config.kv_sharing:
            chains.shard_widths(config.n_kv_heads, name="n_kv_heads (kv heads per chain)", **split)
        else:
            kv_split = _shared_kv_split(config, world, local_heads)
        return cls(config, world, local_heads, kv_split)

    def shared_kv_heads(self, rank: int) -> tuple[int, int]:
        """CoLM-Air: the ``[start, stop)`` range of shared kv heads that rank ``rank``'s query
        heads read (and that it computes)."""
        n_kv = self.config.n_kv_heads
        if self.kv_split:
            per = n_kv // self.world
            return rank * per, (rank + 1) * per
        if self.config.kv_mapping == "chain_group" and n_kv < self.world:
            head = rank // (self.world // n_kv)  # a rank's heads lie inside one GQA group
            return head, head + 1
        return 0, n_kv

    def row_columns(self, in_features: int, chain: int, rank: int) -> list[int]:
        """The columns of a row-parallel ``mlps.{chain}.weight`` (``in_features`` split by the
        chains) that rank ``rank`` holds: its piece of every input chain ``0..chain``, in order."""
        ranges = self.config.chain_config.shard_ranges(in_features, self.world, rank, name="in_features",
                                                       world_name=WORLD_NAME)
        return [c for start, stop in ranges[: chain + 1] for c in range(start, stop)]

    def rank_major_columns(self, in_features: int, chain: int) -> list[int]:
        """The column order of a row-parallel parameter: rank 0's columns, then rank 1's, ...
        (so that rank r's columns are the r-th of ``world`` equal contiguous blocks)."""
        return [c for r in range(self.world) for c in self.row_columns(in_features, chain, r)]


def _shared_kv_split(config: CoLMConfig, world: int, local_heads: Chains) -> bool:
    n_kv, mapping = config.n_kv_heads, config.kv_mapping
    if mapping == "chain_group":
        if n_kv % world == 0:
            return True
        if world % n_kv == 0:
            return False
        raise ValueError(
            f"{WORLD_NAME}={world} and n_kv_heads={n_kv} with kv_sharing and kv_mapping='chain_group': one "
            "must divide the other (the shared kv heads are split across the ranks, or each rank's "
            "query heads read one of them)")
    bad = [c for c in local_heads.sizes if c % n_kv]
    if bad:
        raise ValueError(
            f"{WORLD_NAME}={world} with kv_sharing and kv_mapping='tile': every rank reads all "
            f"n_kv_heads={n_kv} shared kv heads, so each chain's query heads per rank "
            f"{local_heads.sizes} must be a multiple of {n_kv} (use kv_mapping='chain_group' to "
            "split the kv heads instead)")
    return False


