"""A trap for host reads of device values (each one a GPU sync, and a CUDA-graph capture error).

``trap_host_syncs()`` records, for the duration of a block, every call that reads a tensor's
values on the host or whose output size depends on them: ``.item()``, ``.tolist()``, ``bool()`` /
``int()`` / ``float()`` / ``index()`` of a tensor, ``.cpu()``, ``.numpy()``, ``.to("cpu")``,
``nonzero`` / ``argwhere`` / ``masked_select`` / one-argument ``where``, ``unique``,
``repeat_interleave`` with tensor repeats and no ``output_size``, and indexing with a boolean
mask. With ``tables=False`` it also records ``torch.tensor`` / ``as_tensor`` / ``asarray`` with a
``device``: a copy of a host list to the device (on a warm call every table must come from a
cache). Launches of Triton's interpreter are exempt (it copies arguments to the host by design).

It replaces those functions for the block rather than using a ``TorchFunctionMode``: a mode is
switched off inside its own handler, so it never sees what a ``torch.library`` custom op's
implementation calls. On CPU tensors none of these syncs anything, so the trap is how a CPU test
sees what would stall a GPU.
"""
from __future__ import annotations

import contextlib
import traceback
from typing import List

import torch

_TENSOR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                 "argwhere", "masked_select", "unique", "unique_consecutive")
_TORCH_READS = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")
_FACTORIES = ("tensor", "as_tensor", "asarray")


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncTrap:
    def __init__(self, tables: bool):
        self.tables = tables
        self.calls: List[str] = []
        self.exempt = 0

    def record(self, what: str) -> None:
        if not self.exempt:
            self.exempt += 1  # formatting the stack must not record itself
            try:
                self.calls.append(what + "\n" + "".join(traceback.format_stack(limit=9)[:-2]))
            finally:
                self.exempt -= 1


@contextlib.contextmanager
def trap_host_syncs(*, tables: bool = True):
    """Yields a ``HostSyncTrap`` whose ``calls`` lists each host read in the block (with a stack)."""
    from triton.runtime import interpreter

    trap = HostSyncTrap(tables)
    saved = []

    def patch(owner, name, make):
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def always(name):
        def make(original):
            def wrapper(*args, **kwargs):
                trap.record(name)
                return original(*args, **kwargs)
            return wrapper
        return make

    for name in _TENSOR_READS:
        patch(torch.Tensor, name, always(f"Tensor.{name}"))
    for name in _TORCH_READS:
        patch(torch, name, always(f"torch.{name}"))

    def where(original):
        def wrapper(*args, **kwargs):
            if len(args) + len(kwargs) == 1:
                trap.record("torch.where(condition)")
            return original(*args, **kwargs)
        return wrapper

    def repeat_interleave(is_method):
        def make(original):
            def wrapper(*args, **kwargs):
                repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
                if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
                    trap.record("repeat_interleave with tensor repeats and no output_size")
                elif not is_method and len(args) == 1 and not kwargs:  # torch.repeat_interleave(repeats)
                    trap.record("torch.repeat_interleave(repeats)")
                return original(*args, **kwargs)
            return wrapper
        return make

    def indexing(name):
        def make(original):
            def wrapper(self, index, *rest):
                if _bool_index(index):
                    trap.record(f"Tensor.{name} with a boolean mask")
                return original(self, index, *rest)
            return wrapper
        return make

    def to(original):
        def wrapper(self, *args, **kwargs):
            dev = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
            if dev is not None and torch.device(dev).type == "cpu":
                trap.record("Tensor.to('cpu')")
            return original(self, *args, **kwargs)
        return wrapper

    def factory(name):
        def make(original):
            def wrapper(*args, **kwargs):
                if not trap.tables and kwargs.get("device") is not None:
                    trap.record(f"torch.{name}(..., device=...)")
                return original(*args, **kwargs)
            return wrapper
        return make

    patch(torch, "where", where)
    patch(torch, "repeat_interleave", repeat_interleave(False))
    patch(torch.Tensor, "repeat_interleave", repeat_interleave(True))
    patch(torch.Tensor, "__getitem__", indexing("__getitem__"))
    patch(torch.Tensor, "__setitem__", indexing("__setitem__"))
    patch(torch.Tensor, "to", to)
    for name in _FACTORIES:
        patch(torch, name, factory(name))

    def launch(original):
        def wrapper(self, *args, **kwargs):
            trap.exempt += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                trap.exempt -= 1
        return wrapper

    patch(interpreter.GridExecutor, "__call__", launch)
    try:
        yield trap
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
