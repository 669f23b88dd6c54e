"""Chain tuning under FSDP2 (spec section 5): the first ``k`` chains keep their weights exactly.

``models.freeze_chains`` turns off the gradients of the frozen chains' blocks (every chain
linear's ``mlps.{i}``, CoLM-Air's ``wk`` / ``wv``); that carries over to FSDP2's sharded
parameters when it runs before ``fully_shard``. Its gradient hooks on the tensors every chain shares
(embedding, norm gains, output head) do not: FSDP2 replaces those parameters and writes their
gradients itself. ``FrozenColumns`` does that part on whatever the parameters are (plain or
DTensor shards): it zeroes the frozen columns' gradients after backward (so gradient clipping and
the optimizer's moments never see them) and puts the frozen columns back after every optimizer
step (decoupled weight decay would move them otherwise).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ...models import freeze_chains
from ...nn import ChainRMSNorm


def _local_prefix(param: Tensor, dim: int, width: int) -> Tensor | None:
    """A view of the local data of ``param`` holding its global indices ``[0, width)`` along
    ``dim`` (FSDP2 shards dim 0: a rank holds one contiguous row range), or None if it holds none."""
    local, offset = param, 0
    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local, offset = param.to_local(), offsets[dim]
    start, stop = max(0, -offset), min(local.shape[dim], width - offset)
    return local.narrow(dim, start, stop - start) if stop > start else None


class FrozenColumns:
    """The frozen chains' columns of the tensors every chain shares."""

    def __init__(self, model, k: int):
        self.width = model.chains.prefixes(model.config.dim)[k - 1]
        # Modules, not parameters: FSDP2 replaces each module's ``weight`` by its sharded version.
        self.owners = [(model.tok_embeddings, 1), (model.output, 1)]
        self.owners += [(m, 0) for m in model.modules() if isinstance(m, ChainRMSNorm)]
        self.saved: list | None = None

    def _views(self, grads: bool):
        for module, dim in self.owners:
            p = module.weight
            t = p.grad if grads else p
            if t is not None:
                yield _local_prefix(t, dim, self.width)

    @torch.no_grad()
    def zero_grads(self) -> None:
        for v in self._views(grads=True):
            if v is not None:
                v.zero_()

    @torch.no_grad()
    def snapshot(self) -> None:
        self.saved = [None if v is None else v.clone() for v in self._views(grads=False)]

    @torch.no_grad()
    def restore(self) -> None:
        for v, s in zip(self._views(grads=False), self.saved):
            if v is not None:
                v.copy_(s)

    def attach(self, optimizer) -> None:
        """Snapshot the frozen columns before the first step (after any checkpoint load), restore
        them after every step."""
        def pre(*_):
            if self.saved is None:
                self.snapshot()

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(lambda *_: self.restore())


def apply_chain_tuning(model, k: int) -> FrozenColumns | None:
    """Freeze chains ``0..k-1`` of ``model`` before FSDP wraps it; returns the shared tensors'
    ``FrozenColumns`` (None for ``k == 0``)."""
    if k == 0:
        return None
    for handle in freeze_chains(model, k):
        handle.remove()  # FrozenColumns does their job on FSDP's own parameters
    model.frozen_columns = FrozenColumns(model, k)
    return model.frozen_columns
