"""Where DTensor stops and the chain ops' local shards begin (and back): the boundaries of every
tensor-parallel region, built from DTensor's own ``redistribute`` / ``to_local`` / ``from_local``
so that autograd, activation checkpointing and ``torch.compile`` see ordinary DTensor code.

Inside a region the tensors are plain local tensors in the per-chain interleaved layout (each rank
holds its shard of every chain), which no DTensor placement describes; at the boundaries the
activations are DTensors with honest placements: the residual stream ``Shard(1)`` (sequence
parallel) or ``Replicate()``. Each function says what it communicates, forward and backward.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard


def replicated_local(x: DTensor) -> Tensor:
    """``x``'s full value as a local tensor on every rank, for a region in which each rank's use
    of it is a partial contribution (a column-parallel input, a replicated weight read by the rank's
    own heads, the sequence-parallel norm gain). Forward: all-gather when ``x`` is sharded (nothing
    when replicated); backward: the ranks' gradients are summed into ``x``'s placements
    (reduce-scatter for ``Shard``, all-reduce for ``Replicate``), so a replicated parameter gets a
    replicated gradient."""
    mesh = x.device_mesh
    return x.redistribute(mesh, [Replicate()] * mesh.ndim).to_local(grad_placements=[Partial()] * mesh.ndim)


def reduce_partial(y: Tensor, mesh: DeviceMesh, placements: Sequence[Placement]) -> DTensor:
    """Per-rank partial sums ``y`` (a row-parallel output, a vocabulary shard's embedding rows)
    reduced into a DTensor with ``placements``. Forward: reduce-scatter to ``Shard`` or all-reduce
    to ``Replicate``; backward: every rank gets the full gradient (all-gather from ``Shard``)."""
    return DTensor.from_local(y, mesh, [Partial()] * mesh.ndim).redistribute(mesh, placements)


def rowwise_local(x: DTensor) -> Tensor:
    """The local rows of a residual-stream DTensor for a per-token op (the chain norms): no
    communication either way."""
    return x.to_local()


def like(y: Tensor, x: DTensor) -> DTensor:
    """Local ``y`` of a per-token op on ``rowwise_local(x)`` as a DTensor laid out as ``x``."""
    return DTensor.from_local(y, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())


def all_gather_stack(t: Tensor, mesh: DeviceMesh) -> Tensor:
    """Every rank's ``t`` stacked along a new first dim ``(world, *t.shape)``, the same on every
    rank. Backward: each rank keeps its own slice of the (replicated) gradient."""
    return DTensor.from_local(t.unsqueeze(0), mesh, [Shard(0)]).full_tensor()


def all_reduce_sum(t: Tensor, mesh: DeviceMesh) -> Tensor:
    """The sum of every rank's ``t``, the same on every rank. Backward: the (replicated) gradient
    passes to every rank's ``t`` unchanged."""
    return DTensor.from_local(t, mesh, [Partial()]).full_tensor()
