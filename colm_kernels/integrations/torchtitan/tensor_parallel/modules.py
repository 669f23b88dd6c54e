"""The CoLM modules under tensor parallelism: each ``convert`` turns a module of
``colm_kernels.nn`` (or the embedding / head of ``models.CoLM``) into its TP version in place
(parameters become DTensors on the TP mesh; state-dict keys stay), and its ``forward`` runs the
same chain op on this rank's local shards between two region boundaries (``regions``).

The residual stream between them is a DTensor: ``Shard(1)`` over the sequence with sequence
parallelism (as TorchTitan's llama3), else ``Replicate()``. Only training calls are supported
(one ``chain`` for the whole batch, no KV cache, no per-row scales).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ....chains import Chains
from ....nn import ChainAttention, ChainFeedForward, ChainRMSNorm
from ....nn.rope import apply_rotary, rope_angles
from ....ops.chain_attention.api import chain_attention
from ....ops.chain_rmsnorm.api import chain_rmsnorm
from ....ops.chain_swiglu.api import chain_swiglu
from .layout import TensorParallelLayout
from .linear import ColumnChainLinear, RowChainLinear, check_training_call, distribute_parameter
from .loss import vocab_parallel_loss_sums
from .regions import like, reduce_partial, replicated_local, rowwise_local


def _local_rows_start(param: DTensor) -> int:
    """The first global row of ``param``'s local shard (vocabulary offset of a ``Shard(0)`` table)."""
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0]


class TPChainRMSNorm(ChainRMSNorm):
    """Per-token: runs on the local rows of the residual stream. Sequence parallel: the gain's
    gradient is summed over the ranks' tokens; otherwise every rank computes the same rows and
    the gain's gradient is already complete. ``out_placements``: where the normed stream goes
    (the final norm hands the head replicated rows)."""

    sequence_parallel: bool
    out_placements: list[Placement]

    @classmethod
    def convert(cls, module: ChainRMSNorm, mesh: DeviceMesh, sequence_parallel: bool,
                out_placements) -> "TPChainRMSNorm":
        distribute_parameter(module, "weight", mesh, [Replicate()])
        module.__class__ = cls
        module.sequence_parallel = sequence_parallel
        module.out_placements = list(out_placements)
        return module

    def forward(self, x: DTensor, chain=None, *, seq_chains=None, check_values: bool = True) -> DTensor:
        check_training_call(self, seq_chains)
        gain = replicated_local(self.weight) if self.sequence_parallel else self.weight.to_local()
        y = like(chain_rmsnorm(rowwise_local(x), gain, self.chains, self.eps, chain), x)
        if list(y.placements) != self.out_placements:
            y = y.redistribute(y.device_mesh, self.out_placements)
        return y


class TPChainAttention(ChainAttention):
    """Rank r: its ``c_i / world`` query heads of every chain (and their kv heads), ``wq`` / ``wk``
    / ``wv`` column-parallel, ``wo`` row-parallel. CoLM-Air's shared ``wk`` / ``wv``: split or
    replicated (``layout``); a replicated one computes only the kv heads this rank reads."""

    local_heads: Chains  # query heads of each chain on this rank
    kv_split: bool
    kv_rows: tuple[int, int]  # CoLM-Air, replicated wk / wv: the rows (kv heads * head_dim) this rank uses

    @classmethod
    def convert(cls, module: ChainAttention, mesh: DeviceMesh, layout: TensorParallelLayout) -> "TPChainAttention":
        ColumnChainLinear.convert(module.wq, mesh)
        RowChainLinear.convert(module.wo, mesh, layout)
        rows = (0, 0)
        if module.kv_sharing:
            start, stop = layout.shared_kv_heads(mesh.get_local_rank())
            rows = (start * module.head_dim, stop * module.head_dim)
            for proj in (module.wk, module.wv):
                distribute_parameter(proj, "weight", mesh, [Shard(0)] if layout.kv_split else [Replicate()])
        else:
            ColumnChainLinear.convert(module.wk, mesh)
            ColumnChainLinear.convert(module.wv, mesh)
        module.__class__ = cls
        module.local_heads = layout.local_heads
        module.kv_split = layout.kv_split
        module.kv_rows = rows
        return module

    def _shared_weight(self, proj: nn.Linear) -> Tensor:
        if self.kv_split:
            return proj.weight.to_local()  # exactly this rank's kv heads
        start, stop = self.kv_rows  # replicated: each rank's use of it is a partial gradient
        return replicated_local(proj.weight)[start:stop]

    def _local_kv(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self.kv_sharing:
            shared = x[..., : self.shared_width]
            return F.linear(shared, self._shared_weight(self.wk)), F.linear(shared, self._shared_weight(self.wv))
        return self.wk(x, k), self.wv(x, k)

    def forward(self, x: DTensor, chain=None, cache=None, layer: int = 0, *, seq_chains: Optional[Tensor] = None,
                check_values: bool = True) -> DTensor:
        if cache is not None:
            raise ValueError("TPChainAttention: a KV cache (decoding) is not supported under tensor parallelism")
        check_training_call(self, seq_chains)
        k = self.chains.check_chain(chain)
        xl = replicated_local(x)
        angles = rope_angles(self.head_dim, 0, xl.shape[1], self.rope_theta, xl.device)
        q = apply_rotary(self.wq(xl, k).unflatten(-1, (-1, self.head_dim)), angles)
        keys, values = self._local_kv(xl, k)
        keys = apply_rotary(keys.unflatten(-1, (-1, self.head_dim)), angles)
        values = values.unflatten(-1, (-1, self.head_dim))
        out = chain_attention(q, keys, values, self.local_heads, causal=True, kv_sharing=self.kv_sharing,
                              kv_mapping=self.kv_mapping, check_values=False, deterministic=self.deterministic)
        return reduce_partial(self.wo(out.flatten(-2), k), x.device_mesh, x.placements)


class TPChainFeedForward(ChainFeedForward):
    """``w1`` / ``w3`` column-parallel (one fused ``chain_swiglu`` over this rank's hidden features of every
    chain), ``w2`` row-parallel."""

    @classmethod
    def convert(cls, module: ChainFeedForward, mesh: DeviceMesh, layout: TensorParallelLayout) -> "TPChainFeedForward":
        ColumnChainLinear.convert(module.w1, mesh)
        ColumnChainLinear.convert(module.w3, mesh)
        RowChainLinear.convert(module.w2, mesh, layout)
        module.__class__ = cls
        return module

    def forward(self, x: DTensor, chain=None, *, seq_chains=None, check_values: bool = True) -> DTensor:
        check_training_call(self, seq_chains)
        xl = replicated_local(x)
        h = chain_swiglu(xl, self.w1.local_weights(), self.w3.local_weights(), self.chains, chain)
        return reduce_partial(self.w2(h, chain), x.device_mesh, x.placements)


class VocabParallelEmbedding(nn.Embedding):
    """``Shard(0)``: rank r holds a contiguous block of the vocabulary; each rank looks up the
    tokens it holds (zeros elsewhere) and the rows are summed into the residual stream."""

    out_placements: list[Placement]
    vocab_start: int

    @classmethod
    def convert(cls, module: nn.Embedding, mesh: DeviceMesh, out_placements) -> "VocabParallelEmbedding":
        distribute_parameter(module, "weight", mesh, [Shard(0)])
        module.__class__ = cls
        module.out_placements = list(out_placements)
        module.vocab_start = _local_rows_start(module.weight)
        return module

    def forward(self, tokens: Tensor) -> DTensor:
        weight = self.weight.to_local()
        local = tokens - self.vocab_start
        mine = (local >= 0) & (local < weight.shape[0])
        rows = F.embedding(torch.where(mine, local, torch.zeros_like(local)), weight)
        rows = torch.where(mine[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        return reduce_partial(rows, self.weight.device_mesh, self.out_placements)


class VocabParallelHead(nn.Linear):
    """``Shard(0)``: rank r holds a contiguous block of the vocabulary. ``CoLM.forward``'s
    ``F.linear(h, weight[:, :P])`` on DTensors gives ``Shard(-1)`` logits (TorchTitan's
    ``cross_entropy_loss`` takes them as they are); ``loss_sums`` is the multi-chain loss."""

    vocab_start: int

    @classmethod
    def convert(cls, module: nn.Linear, mesh: DeviceMesh) -> "VocabParallelHead":
        if module.bias is not None:
            raise ValueError("the vocabulary-parallel head has no bias (CoLM's has none)")
        distribute_parameter(module, "weight", mesh, [Shard(0)])
        module.__class__ = cls
        module.vocab_start = _local_rows_start(module.weight)
        return module

    def loss_sums(self, hidden: DTensor, labels: Tensor, chains, ignore_index: int) -> Tensor:
        return vocab_parallel_loss_sums(hidden, self.weight, self.vocab_start, labels, chains, ignore_index)
