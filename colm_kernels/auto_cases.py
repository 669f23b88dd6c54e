"""``auto``'s choices at representative shapes of each op (what ``python -m colm_kernels.info``
prints): the backend an H100 with every backend built would take for CUDA tensors, and why.

Inputs are meta tensors (nothing is allocated or run); the choice is ``auto_bounds.choose`` over
the bounds each op's ``bounds`` module gives, as ``backends.explain`` makes it at a real call.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch

from . import auto_bounds, backends
from .chains import Chains

__all__ = ["auto_choices"]

META = dict(device="meta")


def _t(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, dtype=dtype, **META).requires_grad_(grad)


def _linear(label, chains, dim, m, dtype, grad, dense):
    c = Chains(chains)
    w = _t(dim, dim, dtype=dtype, grad=grad)
    blocks = [w[o:o + d, :p] for o, d, p in zip(c.offsets(dim), c.widths(dim), c.prefixes(dim))]
    if not dense:
        blocks = [_t(*b.shape, dtype=dtype, grad=grad) for b in blocks]
    return label, dict(x=_t(m, dim, dtype=dtype, grad=grad), weights=blocks, biases=[], row_chains=None)


def _cases() -> Iterator[Tuple[str, str, dict]]:
    bf16, f32 = torch.bfloat16, torch.float32
    for label, dtype, grad, dense in (("bf16 train, dense weight", bf16, True, True),
                                      ("bf16 train, ChainLinear blocks", bf16, True, False),
                                      ("fp32 inference", f32, False, True)):
        yield ("chain_linear",) + _linear(f"M8192 4096x4096 C=(1,1,1,1) {label}", (1, 1, 1, 1), 4096, 8192,
                                          dtype, grad, dense)
    for grad in (False, True):
        yield ("chain_rmsnorm", f"M8192 W4096 C=(1,1,1,1) bf16 {'train' if grad else 'inference'}",
               dict(x=_t(8192, 4096, grad=grad), weight=_t(4096, grad=grad), offsets=[0, 1024, 2048, 3072, 4096],
                    eps=1e-5, row_chains=None))
    kv_index = [h // 4 for h in range(32)]
    for dtype, grad in ((bf16, True), (f32, False)):
        yield ("chain_attention", f"B2 S4096 H32 KV8 D128 causal {str(dtype)[6:]} {'train' if grad else 'inference'}",
               dict(q=_t(2, 4096, 32, 128, dtype=dtype, grad=grad), k=_t(2, 4096, 8, 128, dtype=dtype, grad=grad),
                    v=_t(2, 4096, 8, 128, dtype=dtype, grad=grad), kv_head_index=kv_index, head_chain=[0] * 32,
                    causal=True, seq_chains=None, softmax_scale=128 ** -0.5))
    for sq in (1, 2, 4, 16, 128):
        yield ("chain_attention_decode", f"B64 L4096 H32 KV8 D128 bf16, {sq} new token{'s' * (sq > 1)}",
               dict(q=_t(64, sq, 32, 128), k_cache=_t(64, 4096, 8, 128), v_cache=_t(64, 4096, 8, 128),
                    cache_seqlens=torch.empty(64, dtype=torch.int32, **META), kv_head_index=kv_index,
                    head_chain=[0] * 32, seq_chains=None, softmax_scale=128 ** -0.5))


def auto_choices() -> List[dict]:
    """One row per case: op, shape, the backend ``auto`` takes on an H100 and why."""
    rows = []
    for op, label, inputs in _cases():
        candidates = [b for b in ("cuda", "triton") if b in backends.registered(op)]
        bounds = backends.bounds_module(op).bounds(**inputs)
        choice = auto_bounds.choose(candidates, bounds)
        rows.append({"op": op, "shape": label, "backend": choice.backend, "why": choice.why})
    return rows
