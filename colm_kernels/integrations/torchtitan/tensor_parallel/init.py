"""Random initialisation of a tensor-parallel model, the same whether or not DTensor can drive the RNG.

On CUDA, DTensor's RNG tracker draws every shard as a piece of one global random tensor and every
replicated parameter identically on all ranks. Without it (CPU meshes) each rank draws from its own
generator: equal seeds give every rank the same shards (heads of different ranks start identical)
and, once the ranks' shards differ in size (an uneven vocabulary split), different replicated
parameters, which the ranks would then train apart. ``init_on_shards`` covers that case: each rank
draws its shards from its own seed, and every parameter replicated over a mesh dim is then
broadcast from that dim's first rank.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._random import is_rng_supported_mesh


@torch.no_grad()
def broadcast_replicated(model: nn.Module) -> None:
    """Every DTensor parameter's value on the first rank of each mesh dim it is replicated over."""
    for param in model.parameters():
        if not isinstance(param, DTensor):
            continue
        mesh = param.device_mesh
        for dim, placement in enumerate(param.placements):
            if placement.is_replicate() and mesh.size(dim) > 1:
                dist.broadcast(param.to_local(), group=mesh.get_group(dim), group_src=0)


def init_on_shards(model: nn.Module, tp_mesh: DeviceMesh, init: Callable[[], None]) -> None:
    """Run ``init()`` (which fills ``model``'s DTensor parameters in place from torch's RNG)."""
    if is_rng_supported_mesh(tp_mesh):
        init()  # DTensor's RNG tracker
        return
    seed = int(torch.randint(2 ** 62, ()))  # the same draw on every rank: the ranks' seeds differ by rank
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + dist.get_rank())
        init()
    broadcast_replicated(model)
