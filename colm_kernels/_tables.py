"""Small read-only device tables of host ints (per-chain widths, offsets, pointers, head maps),
built once per content and device and cached, so that a hot path never copies a host list to the
device (or reads one back) on every call.

- ``int64_table`` / ``int32_table``: a ``(fields, entries)`` table (kernels read field ``f`` of
  entry ``c`` at ``TABLE + f * NUM + c``); ``index_vector``: one int64 row, for indexing in PyTorch
  code (the reference backend, the CUDA backends' masks).
- ``clear_table_cache``: drop them all (tests, or after freeing many layers).

On CUDA a miss copies from pinned host memory without blocking the host (the pinned buffer is
kept with the table); a hit costs a dictionary lookup.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Sequence

import torch

__all__ = ["int64_table", "int32_table", "index_vector", "clear_table_cache"]

_TABLE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 512
_TABLE_LOCK = threading.Lock()


def _device_table(rows: Sequence[Iterable[int]], dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous ``dtype`` tensor of shape ``(len(rows), len(rows[0]))`` on ``device``, from
    one content-keyed LRU cache shared by every table (``int64_table``, ``int32_table``)."""
    name = "int32_table" if dtype == torch.int32 else "int64_table"
    content = tuple(tuple(int(v) for v in r) for r in rows)
    if not content or not content[0] or any(len(r) != len(content[0]) for r in content):
        raise ValueError(f"{name}: rows must be non-empty and of equal length, got {content}")
    if dtype == torch.int32 and any(not -2**31 <= v < 2**31 for r in content for v in r):
        raise ValueError("int32_table: every entry must fit in int32")
    dev = torch.device(device)
    key = (dev, dtype, content)
    with _TABLE_LOCK:
        hit = _TABLE_CACHE.get(key)
        if hit is not None:
            _TABLE_CACHE.move_to_end(key)
            return hit[0]
    # built on the host, then copied: no ``torch.tensor(list, device=...)`` (a blocking copy)
    host = torch.tensor(content, dtype=dtype, pin_memory=dev.type == "cuda")
    if dev.type == "cpu":
        table, host = host, None
    else:
        table = host.to(dev, non_blocking=True)
    with _TABLE_LOCK:
        _TABLE_CACHE[key] = (table, host)
        while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    return table


def int64_table(rows: Sequence[Iterable[int]], device) -> torch.Tensor:
    """A contiguous int64 tensor of shape ``(len(rows), len(rows[0]))`` on ``device``.

    Row ``f`` holds field ``f`` for every chain (a kernel reads field ``f`` of chain ``c`` at
    ``TABLE + f * NUM + c``). Rows usually hold ``data_ptr()``s, widths, row strides and offsets.
    Tables are cached on their full content (pointers included) and device, so a layer whose
    parameters are updated in place builds its tables once; the content is the key, so a hit is
    always exact. On CUDA a miss copies from pinned host memory without blocking the host (the
    pinned buffer is kept with the table). Tables are read-only: never write into one.
    """
    return _device_table(rows, torch.int64, device)


def int32_table(rows: Sequence[Iterable[int]], device) -> torch.Tensor:
    """Like ``int64_table`` but int32 (small index tables read once per program, e.g. the query
    heads of each kv head); every entry must fit in int32. Same cache; read-only."""
    return _device_table(rows, torch.int32, device)


def clear_table_cache() -> None:
    """Drop every cached table (tests, or after freeing many layers)."""
    with _TABLE_LOCK:
        _TABLE_CACHE.clear()


def index_vector(values: Iterable[int], device) -> torch.Tensor:
    """``values`` as a cached int64 vector on ``device`` (read-only), e.g. an ``index_select`` index."""
    return _device_table([list(values)], torch.int64, device)[0]

