"""Tensor parallelism for CoLM on DTensor: per-chain interleaved shards, every local op a chain op.

``apply_tensor_parallel(model, tp_mesh)`` converts a ``models.CoLM`` (TorchTitan's
``CoLMTitanModel``) in place, before activation checkpointing, ``torch.compile`` and FSDP2
(``parallelize_colm`` does it in that order when ``parallel_dims.tp > 1``): see ``layout`` for
what each rank holds, ``modules`` / ``linear`` for the modules, ``regions`` for the DTensor
boundaries and ``loss`` for the vocabulary-parallel multi-chain loss.

Why local shards and not DTensor sharding rules for the custom ops: a column-parallel chain
layer's output on a rank is its piece of every chain, which is no DTensor placement of the global
tensor (``Shard`` is one contiguous block per rank; ``_StridedShard`` needs equal pieces, and
chains may be unequal), so no rule could state the op's output placement. The ops therefore run on
local tensors inside each module, between region boundaries where the activations are DTensors
with honest placements (the residual stream ``Shard(1)`` or ``Replicate``); parameters are
DTensors throughout and are never gathered in a training step.
"""
from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard

from ....models import CoLM
from .init import init_on_shards
from .layout import TensorParallelLayout
from .linear import ColumnChainLinear, RowChainLinear
from .loss import vocab_parallel_loss_sums
from .modules import (TPChainAttention, TPChainFeedForward, TPChainRMSNorm, VocabParallelEmbedding,
                      VocabParallelHead)


def apply_tensor_parallel(model: CoLM, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True) -> TensorParallelLayout:
    """Shard ``model`` over the 1-D mesh ``tp_mesh`` in place; returns its layout.

    Every rank must hold the same weights (a seeded init, a checkpoint, or a meta-device model that
    ``init_states`` fills after sharding). ``sequence_parallel``: the residual stream and the
    norms are split along the sequence between the attention and FFN regions (TorchTitan's default).
    """
    if not isinstance(model, CoLM):
        raise TypeError(f"model must be a colm_kernels.models.CoLM, got {type(model).__name__}")
    if not isinstance(tp_mesh, DeviceMesh) or tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be a 1-D DeviceMesh (the tensor-parallel ranks), got {tp_mesh!r}")
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel must be a bool, got {sequence_parallel!r}")
    layout = TensorParallelLayout.build(model.config, tp_mesh.size())
    residual = [Shard(1)] if sequence_parallel else [Replicate()]
    VocabParallelEmbedding.convert(model.tok_embeddings, tp_mesh, residual)
    for block in model.layers:
        TPChainRMSNorm.convert(block.attention_norm, tp_mesh, sequence_parallel, residual)
        TPChainRMSNorm.convert(block.ffn_norm, tp_mesh, sequence_parallel, residual)
        TPChainAttention.convert(block.attention, tp_mesh, layout)
        TPChainFeedForward.convert(block.feed_forward, tp_mesh, layout)
    TPChainRMSNorm.convert(model.norm, tp_mesh, sequence_parallel, [Replicate()])  # the head reads whole rows
    VocabParallelHead.convert(model.output, tp_mesh)
    model.tp_mesh = tp_mesh  # init_states draws the shards through init_on_shards
    return layout


__all__ = ["ColumnChainLinear", "RowChainLinear", "TPChainAttention", "TPChainFeedForward", "TPChainRMSNorm",
           "TensorParallelLayout", "VocabParallelEmbedding", "VocabParallelHead", "apply_tensor_parallel",
           "init_on_shards", "vocab_parallel_loss_sums"]
