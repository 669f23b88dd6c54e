"""Optimizer state of row-parallel parameters in the paper's column order.

A row-parallel parameter holds its columns rank-major (``linear``), and so does every optimizer
state tensor of its shape (momentum, Adam's moments). The hooks here give ``optimizer.state_dict()``
those tensors in the canonical order (as ``state_dict()`` gives the parameters) and take them back
in ``load_state_dict``, so a full training checkpoint (TorchTitan's DCP checkpoints hold the
optimizer) resumes at another TP degree too. The live state is never modified.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor, nn
from torch.optim import Optimizer

from .linear import RowChainLinear


def _row_parallel_owners(model_parts: Iterable[nn.Module]) -> dict[int, tuple[RowChainLinear, int]]:
    """``id(parameter)`` -> (its row-parallel module, chain), looked up when a hook runs (FSDP2
    registers its own sharded parameters, which are the ones the optimizer holds)."""
    owners = {}
    for part in model_parts:
        for module in part.modules():
            if isinstance(module, RowChainLinear):
                for chain, linear in enumerate(module.mlps):
                    owners[id(linear.weight)] = (module, chain)
    return owners


def _convert(optimizer: Optimizer, state_dict: dict, model_parts, fn: Callable) -> dict:
    owners = _row_parallel_owners(model_parts)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's indices
    state = dict(state_dict["state"])
    for index, param in enumerate(params):
        owner = owners.get(id(param))
        if owner is None or index not in state:
            continue
        state[index] = {key: fn(owner, param, value)
                        if isinstance(value, Tensor) and tuple(value.shape) == tuple(param.shape) else value
                        for key, value in state[index].items()}
    return {**state_dict, "state": state}


def attach_canonical_state(optimizer: Optimizer, model_parts: Iterable[nn.Module]) -> None:
    """Register the hooks on ``optimizer`` (a ``torch.optim.Optimizer`` over ``model_parts``)."""
    parts = list(model_parts)
    optimizer.register_state_dict_post_hook(lambda opt, sd: _convert(
        opt, sd, parts, lambda owner, param, value: owner[0].canonical(owner[1], value.detach())))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: _convert(
        opt, sd, parts, lambda owner, param, value: owner[0].rank_major(owner[1], value, param)))
