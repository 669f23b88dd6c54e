"""Column- and row-parallel ``ChainLinear``: DTensor parameters on the TP mesh, a chain op on the
local shards.

Column-parallel: ``mlps.{i}.weight`` ``(d_i_out, P_i_in)`` is ``Shard(0)``: rank r holds its
``d_i_out / world`` rows of chain i, so the local layer is a ``ChainLinear(in, out / world)``.

Row-parallel: rank r needs its piece of every input chain of each prefix, columns that are not one
contiguous block of ``(d_i_out, P_i_in)`` (and, for unequal chains, no DTensor placement at all:
``Shard`` is one block per rank, ``_StridedShard`` needs equal pieces). So the parameter holds its
columns in rank-major order (rank 0's columns, then rank 1's, ...) and is ``Shard(1)`` of that:
the local layer is a ``ChainLinear(in / world, out)`` with no communication, and FSDP2 shards it
further along dim 0 as usual. ``state_dict()`` gives (and ``load_state_dict`` takes) the paper's
column order, so checkpoints (DCP, HF) are the same at every TP degree: the conversion gathers the
columns over the TP ranks at save and load time only, never in a training step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from ....nn import ChainLinear
from ....ops.chain_linear.api import chain_linear
from .layout import TensorParallelLayout


def distribute_parameter(module: nn.Module, name: str, mesh: DeviceMesh, placements,
                         value: Tensor | None = None) -> None:
    """Replace ``module.<name>`` by a DTensor parameter with ``placements``, each rank keeping its
    own piece of ``value`` (default: the current value; the same on every rank, as after a seeded
    init or a checkpoint load; meta tensors stay meta)."""
    param = getattr(module, name)
    if isinstance(param, DTensor):
        raise ValueError(f"{type(module).__name__}.{name} is already a DTensor: apply tensor parallelism once, "
                         "before FSDP")
    full = (param if value is None else value).detach()
    shard = distribute_tensor(full, mesh, placements, src_data_rank=None)
    module.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))


def _local_weights(module: ChainLinear) -> list[Tensor]:
    return [m.weight.to_local() for m in module.mlps]


def check_training_call(module: nn.Module, seq_chains) -> None:
    if seq_chains is not None:
        raise ValueError(f"{type(module).__name__}: seq_chains (per-row scales) is not supported under tensor "
                         "parallelism; pass one chain for the whole batch")


def _no_bias(module: ChainLinear) -> None:
    if module.mlps[0].bias is not None:
        raise ValueError("tensor parallelism shards ChainLinear layers without bias only (CoLM has none)")


class ColumnChainLinear(ChainLinear):
    """``forward(x)``: ``x`` local and full-width (a region's replicated input); returns this
    rank's features of every active output chain."""

    @classmethod
    def convert(cls, module: ChainLinear, mesh: DeviceMesh) -> "ColumnChainLinear":
        _no_bias(module)
        for m in module.mlps:
            distribute_parameter(m, "weight", mesh, [Shard(0)])
        module.__class__ = cls
        return module

    def local_weights(self) -> list[Tensor]:
        return _local_weights(self)

    def forward(self, x: Tensor, chain=None, *, seq_chains=None, check_values: bool = True) -> Tensor:
        check_training_call(self, seq_chains)
        return chain_linear(x, self.local_weights(), None, self.chains, chain)


class RowChainLinear(ChainLinear):
    """``forward(x)``: ``x`` local, this rank's features of every active input chain; returns the
    rank's partial sums of every active output chain (full width)."""

    tp_mesh: DeviceMesh
    columns: list[list[int]]  # chain i: the canonical column of each (rank-major) parameter column
    inverse: list[list[int]]  # chain i: the parameter column of each canonical column

    @classmethod
    def convert(cls, module: ChainLinear, mesh: DeviceMesh, layout: TensorParallelLayout) -> "RowChainLinear":
        _no_bias(module)
        columns = [layout.rank_major_columns(module.in_features, i) for i in range(module.chains.n)]
        for m, order in zip(module.mlps, columns):
            distribute_parameter(m, "weight", mesh, [Shard(1)], m.weight.detach()[:, order])
        module.__class__ = cls
        module.tp_mesh = mesh
        module.columns = columns
        module.inverse = [torch.argsort(torch.tensor(order)).tolist() for order in columns]
        module.register_state_dict_post_hook(_canonical_state_dict)
        module.register_load_state_dict_pre_hook(_rank_major_state_dict)
        return module

    def forward(self, x: Tensor, chain=None, *, seq_chains=None, check_values: bool = True) -> Tensor:
        check_training_call(self, seq_chains)
        return chain_linear(x, _local_weights(self), None, self.chains, chain)

    def _tp_dim(self, mesh: DeviceMesh) -> int:
        """The mesh dim of the TP ranks in ``mesh`` (FSDP2 puts its dim before the TP one)."""
        names, tp = mesh.mesh_dim_names, self.tp_mesh.mesh_dim_names
        if names and tp and tp[0] in names:
            return names.index(tp[0])
        return mesh.ndim - 1

    def _columns_replicated(self, t: DTensor, mesh: DeviceMesh) -> tuple[Tensor, list[Placement]]:
        """The local data of ``t`` with every column on this rank (gathered over the TP ranks),
        and its placements."""
        placements = list(t.placements)
        placements[self._tp_dim(mesh)] = Replicate()
        return t.redistribute(mesh, placements).to_local(), placements

    def canonical(self, chain: int, t: DTensor) -> DTensor:
        """``t`` (the parameter of ``mlps.{chain}``, or its gradient) in the paper's column order,
        replicated over the TP ranks (sharded over any other mesh dim as ``t`` is)."""
        mesh = t.device_mesh
        local, placements = self._columns_replicated(t, mesh)
        local = local[:, self.inverse[chain]]
        return DTensor.from_local(local, mesh, placements, shape=t.shape, stride=t.stride())

    def rank_major(self, chain: int, value: Tensor, param: DTensor) -> Tensor:
        """A canonical ``value`` for ``mlps.{chain}.weight`` laid out as ``param``; values of the
        wrong shape pass through (``load_state_dict`` reports them)."""
        if tuple(value.shape) != tuple(param.shape):
            return value
        order = self.columns[chain]
        if not isinstance(value, DTensor):
            full = value.detach().to(param.device)[:, order]
            return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        mesh = param.device_mesh
        local, placements = self._columns_replicated(value.detach(), mesh)
        full = DTensor.from_local(local[:, order], mesh, placements, shape=param.shape, stride=param.stride())
        return full.redistribute(mesh, param.placements)


@torch.no_grad()
def _canonical_state_dict(module: RowChainLinear, state_dict, prefix, local_metadata) -> None:
    for i, m in enumerate(module.mlps):
        key = f"{prefix}mlps.{i}.weight"
        if key in state_dict:
            state_dict[key] = module.canonical(i, state_dict[key].detach())


@torch.no_grad()
def _rank_major_state_dict(module: RowChainLinear, state_dict, prefix, *args) -> None:
    for i, m in enumerate(module.mlps):
        key = f"{prefix}mlps.{i}.weight"
        if key in state_dict:
            state_dict[key] = module.rank_major(i, state_dict[key], m.weight)
