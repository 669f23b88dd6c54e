"""Correctness checks that run anywhere: every backend that can run here against the float64
reference, forward and gradients, on small odd-sized inputs with unequal chains."""
from __future__ import annotations

from typing import Callable

import torch

from ..chains import Chains
from .. import (backends, chain_attention, chain_attention_decode, chain_linear, chain_rmsnorm, chain_swiglu,
               multi_chain_cross_entropy)

FORWARD_ONLY = {"chain_attention_decode"}  # inference ops: no gradient to check
TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


def _inputs(op: str, gen: torch.Generator):
    """float64 inputs and a function ``(inputs) -> output`` for each op."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if op == "chain_linear":
        c = Chains((1, 2, 1))
        w, b = rnd(24, 40), rnd(24)
        return [rnd(37, 40), w, b], lambda x, w, b: chain_linear(x, w, b, c)
    if op == "chain_swiglu":
        c = Chains((1, 2, 1))
        w1, w3 = rnd(24, 40) / 4, [rnd(d, p) / 4 for d, p in ((6, 10), (12, 30), (6, 40))]
        return [rnd(37, 40), w1, *w3], lambda x, w1, *w3: chain_swiglu(x, w1, list(w3), c)
    if op == "chain_rmsnorm":
        c = Chains((1, 2, 1))
        return [rnd(37, 48), rnd(48)], lambda x, g: chain_rmsnorm(x, g, c)
    if op == "chain_attention":
        c = Chains((2, 2))
        return ([rnd(2, 17, 4, 16), rnd(2, 21, 2, 16), rnd(2, 21, 2, 16)],
                lambda q, k, v: chain_attention(q, k, v, c, kv_sharing=True, kv_mapping="chain_group"))
    if op == "multi_chain_cross_entropy":
        c = Chains((1, 2, 1))
        t = torch.randint(0, 53, (37,), generator=gen)
        t[::7] = -100
        # every option at once: per-row losses (z-loss included), smoothing, softcap
        return [rnd(37, 48), rnd(53, 48) / 4], lambda h, w: multi_chain_cross_entropy(
            h, w, t, c, reduction="none", label_smoothing=0.1, lse_square_scale=1e-2, softcap=8.0)
    if op == "chain_attention_decode":
        c = Chains((2, 2))
        lengths = torch.tensor([5, 40, 17], dtype=torch.int32)  # cache of 40, uneven lengths
        return ([rnd(3, 2, 4, 16), rnd(3, 40, 2, 16), rnd(3, 40, 2, 16)],
                lambda q, k, v: chain_attention_decode(q, k, v, lengths, c, kv_sharing=True))
    raise ValueError(f"unknown op {op!r}")


def _run(fn: Callable, inputs, cotangent_seed: int, grads: bool = True):
    if not grads:
        with torch.no_grad():
            return fn(*inputs), ()
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(cotangent_seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, cot.to(out.device))
    return out, grads


def check(op: str, backend: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    inputs, fn = _inputs(op, gen)
    with_grads = op not in FORWARD_ONLY
    with backends.use_backend("reference"):
        ref_out, ref_grads = _run(fn, inputs, seed, with_grads)
    with backends.use_backend(backend):
        out, grads = _run(fn, [t.to(device=device, dtype=dtype) for t in inputs], seed, with_grads)

    def rel_err(a, b):
        a, b = a.detach().double().cpu(), b.detach()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    err_fwd = rel_err(out, ref_out)
    # A forward-only op has no gradient error: None (null in JSON, n/a in the table), never 0.
    err_grad = max(rel_err(g, r) for g, r in zip(grads, ref_grads)) if with_grads else None
    tol = TOLERANCE[dtype]
    return {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
            "max_rel_err_fwd": err_fwd, "max_rel_err_grad": err_grad, "tolerance": tol,
            "ok": err_fwd <= tol and (err_grad is None or err_grad <= tol)}


def runnable_backends(op: str, device: str, dtype: torch.dtype) -> dict[str, str | None]:
    """Every registered backend of ``op`` -> None if it can run here, else why not."""
    probe = torch.empty(1, device=device, dtype=dtype)
    out = {}
    impls = backends.registered(op)
    for name in ("reference", "triton", "cuda"):
        if name not in impls:
            out[name] = f"no {name} kernel for this op yet"
            continue
        reasons = impls[name].not_supported_reasons([probe])
        out[name] = "; ".join(reasons) if reasons else None
    return out
