"""``colm-bench --static`` part ``kernels``: every Triton kernel and every autotune config its
pruner keeps at the default bench shapes, compiled for sm_90a with Triton's ``ptxas -v`` through
the compile-only driver (``colm_kernels.bench.sm90``): registers, spills, shared memory, resident
blocks, MMA kind with its ``mma.sync`` / ``wgmma`` instruction counts, TMA and ``cp.async``.
Runs without ``TRITON_INTERPRET`` (``static`` starts it in a subprocess)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List

import torch

from .cases import chains_label

DEFAULT_DTYPE = torch.bfloat16  # the timing dtype of the default bench cases

__all__ = ["DEFAULT_DTYPE", "compile_default_shapes"]


@contextlib.contextmanager
def _triton_backend_on_cpu_tensors():
    """Let the ``triton`` backend take CPU tensors without the interpreter: with the sm_90a driver
    installed every launch compiles and launches nothing, so the public ops (forward and autograd
    backward) drive exactly the kernels and configs a GPU run would."""
    from .. import backends

    saved = backends.triton_interpret, dict(backends._BACKEND_AVAILABILITY)
    backends.triton_interpret = lambda: True
    backends._BACKEND_AVAILABILITY["triton"] = lambda: None
    try:
        with backends.use_backend("triton"):
            yield
    finally:
        backends.triton_interpret = saved[0]
        backends._BACKEND_AVAILABILITY.clear()
        backends._BACKEND_AVAILABILITY.update(saved[1])


def _empty(*shape, dtype=DEFAULT_DTYPE, grad=False):
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def _backward(out):
    out.backward(torch.empty_like(out))


def _compile_cases(dtype) -> Iterator[tuple[str, str, Callable[[], None]]]:
    """(op, label, call) at the default bench shapes: the forward and the backward of each op."""
    import colm_kernels as ck
    from colm_kernels.chains import Chains

    from .ops import ATTN_SIZES, CE_SIZES, LINEAR_SIZES, NORM_SIZES, SWIGLU_SIZES

    for chains, out_f, in_f, m in LINEAR_SIZES["default"]:
        c = Chains(chains)

        def run(c=c, out_f=out_f, in_f=in_f, m=m):
            x, w = _empty(m, in_f, grad=True), _empty(out_f, in_f, grad=True)
            _backward(ck.chain_linear(x, w, None, c))
        yield "chain_linear", f"M{m}-{out_f}x{in_f}-{chains_label(chains)}", run
    for chains, dim, hidden, m in SWIGLU_SIZES["default"]:
        def run(chains=chains, dim=dim, hidden=hidden, m=m):
            x, w1, w3 = _empty(m, dim, grad=True), _empty(hidden, dim, grad=True), _empty(hidden, dim, grad=True)
            _backward(ck.chain_swiglu(x, w1, w3, chains))
        yield "chain_swiglu", f"M{m}-D{dim}-H{hidden}-{chains_label(chains)}", run
    for chains, dim, m in NORM_SIZES["default"]:
        def run(chains=chains, dim=dim, m=m):
            x, g = _empty(m, dim, grad=True), _empty(dim, grad=True)
            _backward(ck.chain_rmsnorm(x, g, chains))
        yield "chain_rmsnorm", f"M{m}-D{dim}-{chains_label(chains)}", run
    seen = set()
    for chains, n_kv, shared, seq, hd in ATTN_SIZES["default"]:
        # configs depend on the head dim, the heads per kv head and the dtype, not the length
        if (chains, shared) in seen:
            continue
        seen.add((chains, shared))

        def run(chains=chains, n_kv=n_kv, shared=shared, hd=hd):
            c = Chains(chains)
            q = _empty(1, 256, c.total, hd, grad=True)
            k, v = (_empty(1, 256, n_kv, hd, grad=True) for _ in range(2))
            _backward(ck.chain_attention(q, k, v, c, kv_sharing=shared))
        yield "chain_attention", f"S*-{chains_label(chains)}-KV{n_kv}-D{hd}-{'shared' if shared else 'gqa'}", run
    for chains, dim, vocab, m in CE_SIZES["default"]:
        def run(chains=chains, dim=dim, vocab=vocab, m=m):
            h, w = _empty(m, dim, grad=True), _empty(vocab, dim, grad=True)
            t = torch.zeros(m, dtype=torch.long)
            ck.multi_chain_cross_entropy(h, w, t, chains, check_values=False).sum().backward()
        yield "multi_chain_cross_entropy", f"N{m}-D{dim}-V{vocab}-{chains_label(chains)}", run


def compile_default_shapes(ops: List[str], dtype=DEFAULT_DTYPE) -> dict:
    """Compile every kernel config the pruners keep at the default bench shapes (this process must
    not run the interpreter). Returns ``{"kernels": rows, "failures": [...]}``."""
    from . import sm90

    sm90.install()
    sm90.full_sweep(True)
    with _triton_backend_on_cpu_tensors():
        for op, label, run in _compile_cases(dtype):
            if op not in ops:
                continue
            sm90.set_label(f"{op} {label}")
            try:
                run()
            except Exception as e:  # noqa: BLE001  a case that cannot compile is a failure row
                sm90.FAILURES.append(f"{op} {label}: {type(e).__name__}: {e}")
    rows = []
    for s in sm90.COMPILED:
        op, _, label = s.label.partition(" ")
        rows.append({"op": op, "shape": label, "kernel": s.kernel, "config": s.config,
                     "registers": s.registers, "spill_bytes": s.spill_bytes, "shared": s.shared,
                     "resident_blocks": s.resident_blocks, "mma": s.mma, "mma_sync": s.mma_sync,
                     "wgmma": s.wgmma, "tma": s.tma,
                     "cp_async": s.cp_async, "num_warps": s.num_warps, "num_stages": s.num_stages})
    return {"kernels": rows, "failures": list(sm90.FAILURES)}
