"""GPU tests of ``chain_linear``'s ``cuda`` backend (cuBLAS grouped GEMMs), through the public API.

Every case runs ``colm_kernels.chain_linear`` three times on the same GPU values: the ``cuda``
backend, the ``reference`` backend in the same dtype ("eager"), and the ``reference`` backend in
float64. For the output and every gradient (x, weights, biases):

    max |cuda - float64| <= 2 * max |eager - float64| + eps(dtype)

Cases: chains (1,1,1,1), (1,2,1), (3,), 8 x (1); widths whose chain offsets are not 16-byte
aligned (per-GEMM cuBLAS calls) and aligned ones (grouped calls); M = 1, 17, 97; with and without
bias; one dense weight (upper blocks random: never read, zero gradient) and separate blocks;
frozen chains (no weight gradient); every elastic ``chain=k``; x wider than the chains read and
x with a row stride. Skipped without a CUDA device or without the built extension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

import colm_kernels as ck
from numerics import dtype_slack
from colm_kernels import _cuda

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or _cuda.unavailable_reason() is not None,
    reason=f"needs a CUDA device and the built extension ({_cuda.unavailable_reason()})",
)

DEVICE = "cuda"
F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dt(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


@dataclass(frozen=True)
class Case:
    chains: Tuple[int, ...]
    in_features: int
    out_features: int
    extra_in: int = 0  # x wider than the chains read

    def widths(self, dim):
        s = sum(self.chains)
        assert all(dim * c % s == 0 for c in self.chains)
        return [dim * c // s for c in self.chains]

    @property
    def ds(self):
        return self.widths(self.out_features)

    @property
    def ps(self):
        w = self.widths(self.in_features)
        return [sum(w[: i + 1]) for i in range(len(w))]

    @property
    def k(self):
        return self.in_features + self.extra_in

    def __str__(self):
        c = self.chains
        name = f"{len(c)}x{c[0]}" if len(c) >= 4 and len(set(c)) == 1 else ".".join(map(str, c))
        return f"C{name}-in{self.in_features}-out{self.out_features}" + (
            f"-xwide{self.extra_in}" if self.extra_in else ""
        )


CASES = [
    Case((1, 1, 1, 1), 64, 96),
    Case((1, 2, 1), 40, 24),  # widths 10/20/10 and 6/12/6: unaligned offsets
    Case((1, 2, 1), 128, 256, extra_in=8),  # aligned: grouped cuBLAS calls; x wider than P_last
    Case((3,), 20, 48),  # one chain
    Case((1,) * 8, 64, 72),  # many chains, odd output width 9
    Case((1,) * 8, 256, 512),  # many chains, aligned
]
MS = [1, 17, 97]


# ----------------------------------------------------------------------------------------------
# Inputs and the three runs
# ----------------------------------------------------------------------------------------------
def _params(case: Case, dense: bool, bias: bool, gen):
    """float64 CPU masters: (weight, bias) as one dense matrix / vector, or per-chain lists."""
    n_out, n_in = case.out_features, case.in_features
    w = torch.randn(n_out, n_in, generator=gen, dtype=F64) / math.sqrt(n_in)
    b = torch.randn(n_out, generator=gen, dtype=F64) if bias else None
    if dense:
        return w, b
    offs = [0] + [sum(case.ds[: i + 1]) for i in range(len(case.ds))]
    blocks = [w[offs[i]: offs[i + 1], : case.ps[i]].clone() for i in range(len(case.ds))]
    biases = [b[offs[i]: offs[i + 1]].clone() for i in range(len(case.ds))] if bias else None
    return blocks, biases


def _leaf(t, dtype, requires_grad=True):
    if t is None:
        return None
    if isinstance(t, list):
        return [_leaf(v, dtype, requires_grad) for v in t]
    return t.to(DEVICE, dtype).detach().requires_grad_(requires_grad)


def _grads(t):
    if t is None:
        return None
    if isinstance(t, list):
        return [v.grad for v in t]
    return t.grad


def _run(backend, dtype, x, w, b, grad, chains, chain=None, frozen=(), frozen_bias=(), x_cols=None):
    """Forward + backward in ``dtype`` with ``backend``: (y, dx, dW, db), grads as the inputs.
    ``x_cols``: x is a wider master and the leaf is its column slice (row stride > width)."""
    if x_cols is None:
        xs = _leaf(x, dtype)
    else:
        xs = x.to(DEVICE, dtype)[..., :x_cols].detach().requires_grad_(True)
        assert xs.stride(-2) == x.shape[-1]
    ws = _leaf(w, dtype)
    bs = _leaf(b, dtype)
    for i in frozen:
        ws[i].requires_grad_(False)
    for i in frozen_bias:
        bs[i].requires_grad_(False)
    with ck.use_backend(backend):
        y = ck.chain_linear(xs, ws, bs, chains, chain)
    y.backward(grad.to(DEVICE, dtype))
    return y.detach(), xs.grad, _grads(ws), _grads(bs)


def _err(a, ref) -> float:
    return 0.0 if ref.numel() == 0 else (a.double() - ref.double()).abs().max().item()


def _check(got, eager, ref, what, dtype):
    if ref is None:
        assert got is None and eager is None, f"{what}: expected no gradient"
        return
    if isinstance(ref, list):
        assert isinstance(got, list) and len(got) == len(ref), what
        for i, (g, e, r) in enumerate(zip(got, eager, ref)):
            _check(g, e, r, f"{what}[{i}]", dtype)
        return
    assert got is not None, f"{what}: gradient missing"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err, eager_err = _err(got, ref), _err(eager, ref)
    bound = 2 * eager_err + dtype_slack(dtype)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} (eager {_dt(dtype)}: {eager_err:.3e})"


def _compare(case, M, dtype, dense, bias, gen, chain=None, frozen=(), frozen_bias=(), x_shape=None,
             strided_x=False):
    """cuda vs eager vs float64 for one case; returns the cuda and float64 runs."""
    w, b = _params(case, dense, bias, gen)
    shape = x_shape or (M,)
    x = torch.randn(*shape, case.k + (5 if strided_x else 0), generator=gen, dtype=F64)
    k = len(case.chains) - 1 if chain is None else chain
    grad = torch.randn(*shape, sum(case.ds[: k + 1]), generator=gen, dtype=F64)
    kw = dict(chain=chain, frozen=frozen, frozen_bias=frozen_bias, x_cols=case.k if strided_x else None)
    got = _run("cuda", dtype, x, w, b, grad, case.chains, **kw)
    eager = _run("reference", dtype, x, w, b, grad, case.chains, **kw)
    ref = _run("reference", F64, x, w, b, grad, case.chains, **kw)
    for name, g, e, r in zip(("y", "dx", "dW", "db"), got, eager, ref):
        _check(g, e, r, name, dtype)
    return got, ref


# ----------------------------------------------------------------------------------------------
# Forward and every gradient
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "blocks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("M", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_grads(case, M, dtype, dense, bias, gen):
    got, ref = _compare(case, M, dtype, dense, bias, gen)
    dx = got[1]
    assert (dx[:, case.ps[-1]:] == 0).all(), "dx columns past P_last must be exact zeros"
    if dense:  # upper blocks of a dense weight are never read: exact zero gradient
        dw = got[2]
        offs = [0] + [sum(case.ds[: i + 1]) for i in range(len(case.ds))]
        for i in range(len(case.ds)):
            assert (dw[offs[i]: offs[i + 1], case.ps[i]:] == 0).all(), f"upper block of chain {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "blocks"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=str)
def test_one_gemm_per_chain_mode(case, dense, dtype, gen, monkeypatch):
    """``COLM_KERNELS_CHAIN_LINEAR_GEMM=loop``: the per-GEMM path also on aligned layouts."""
    monkeypatch.setenv("COLM_KERNELS_CHAIN_LINEAR_GEMM", "loop")
    _compare(case, 97, dtype, dense, True, gen)


def test_bad_gemm_mode(monkeypatch):
    monkeypatch.setenv("COLM_KERNELS_CHAIN_LINEAR_GEMM", "fast")
    x = torch.randn(3, 8, device=DEVICE)
    with ck.use_backend("cuda"), pytest.raises(ValueError, match="COLM_KERNELS_CHAIN_LINEAR_GEMM"):
        ck.chain_linear(x, torch.randn(8, 8, device=DEVICE), None, (1, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_elastic_every_chain(case, dtype, gen):
    for k in range(len(case.chains)):
        got, _ = _compare(case, 17, dtype, False, True, gen, chain=k)
        assert got[0].shape[-1] == sum(case.ds[: k + 1])
        # blocks of inactive chains take no part: no gradient at all
        assert all(g is None for g in got[2][k + 1:]) and all(g is None for g in got[3][k + 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize(
    "case, frozen, frozen_bias",
    [
        (CASES[0], (0, 2), (1,)),
        (CASES[1], (0, 1), (0, 1)),  # chain tuning: only the last chain trains
        (CASES[4], tuple(range(6)), tuple(range(7))),
        (CASES[3], (0,), ()),  # the only chain frozen: bias and x still get gradients
        (CASES[5], (1, 3, 5, 7), (0, 2, 4, 6)),
    ],
    ids=["C1.1.1.1", "C1.2.1-tuning", "C8x1-tuning", "C3-frozen", "C8x1-alternate"],
)
def test_frozen_chains(case, frozen, frozen_bias, dtype, gen):
    got, _ = _compare(case, 97, dtype, False, True, gen, frozen=frozen, frozen_bias=frozen_bias)
    for i in range(len(case.chains)):
        assert (got[2][i] is None) == (i in frozen), f"dW[{i}]"
        assert (got[3][i] is None) == (i in frozen_bias), f"db[{i}]"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_strided_and_batched_x(dtype, gen):
    _compare(CASES[2], 33, dtype, False, True, gen, strided_x=True)
    _compare(CASES[1], 33, dtype, True, True, gen, strided_x=True)
    _compare(CASES[0], None, dtype, False, True, gen, x_shape=(2, 17))


def test_no_grad_for_x():
    """x without requires_grad: no input-gradient work, weight gradients still right."""
    case = CASES[2]
    gen = torch.Generator().manual_seed(0)
    w, b = _params(case, False, True, gen)
    x = torch.randn(9, case.k, generator=gen, dtype=F64)
    grad = torch.randn(9, case.out_features, generator=gen, dtype=F64)
    out = {}
    for backend, dt in (("cuda", torch.float32), ("reference", F64)):
        ws, bs = _leaf(w, dt), _leaf(b, dt)
        with ck.use_backend(backend):
            y = ck.chain_linear(x.to(DEVICE, dt), ws, bs, case.chains)
        y.backward(grad.to(DEVICE, dt))
        out[backend] = [v.grad for v in ws + bs]
    for g, r in zip(out["cuda"], out["reference"]):
        assert _err(g, r) <= 1e-4


def test_empty_tokens():
    case = CASES[1]
    gen = torch.Generator().manual_seed(1)
    w, b = _params(case, False, True, gen)
    ws, bs = _leaf(w, torch.float32), _leaf(b, torch.float32)
    x = torch.zeros(0, case.k, device=DEVICE, requires_grad=True)
    with ck.use_backend("cuda"):
        y = ck.chain_linear(x, ws, bs, case.chains)
    assert y.shape == (0, case.out_features)
    y.sum().backward()
    assert x.grad.shape == (0, case.k)
    for v in ws + bs:
        assert v.grad.shape == v.shape and (v.grad == 0).all()


def test_deterministic():
    case = CASES[5]
    gen = torch.Generator().manual_seed(2)
    w, b = _params(case, False, True, gen)
    x = torch.randn(257, case.k, generator=gen, dtype=F64)
    grad = torch.randn(257, case.out_features, generator=gen, dtype=F64)
    runs = [_run("cuda", torch.bfloat16, x, w, b, grad, case.chains) for _ in range(2)]
    a, c = runs
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    for u, v in zip(a[2] + a[3], c[2] + c[3]):
        assert torch.equal(u, v)


# ----------------------------------------------------------------------------------------------
# Registered ops: opcheck, torch.compile, backend selection
# ----------------------------------------------------------------------------------------------
def test_opcheck():
    from colm_kernels.ops.chain_linear.cuda_backend import (
        chain_linear_cuda,
        chain_linear_cuda_bwd_dw,
        chain_linear_cuda_bwd_dx,
    )

    case = CASES[1]
    gen = torch.Generator().manual_seed(3)
    w, b = _params(case, False, True, gen)
    ws, bs = _leaf(w, torch.float32), _leaf(b, torch.float32)
    x = torch.randn(17, case.k, device=DEVICE, requires_grad=True)
    torch.library.opcheck(chain_linear_cuda, (x, ws, bs, None))
    torch.library.opcheck(chain_linear_cuda, (x, ws[:2], [], None))  # a prefix of chains, no bias
    rows = torch.randint(0, len(ws), (17,), device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(chain_linear_cuda, (x, ws, bs, rows))
    dy = torch.randn(17, case.out_features, device=DEVICE)
    wd = [v.detach() for v in ws]
    torch.library.opcheck(chain_linear_cuda_bwd_dx, (dy, wd, case.k + 3, None))
    torch.library.opcheck(chain_linear_cuda_bwd_dw, (dy, x.detach(), wd, [True, False, True], [False, True, True],
                                                     None))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    case = CASES[0]
    x = torch.randn(5, case.k, device=DEVICE, requires_grad=True)
    w = torch.randn(case.out_features, case.in_features, device=DEVICE, requires_grad=True)
    b = torch.randn(case.out_features, device=DEVICE, requires_grad=True)
    with ck.use_backend("cuda"):
        fn = lambda x, w, b: ck.chain_linear(x, w, b, case.chains, chain=2)  # noqa: E731
        expected = fn(x, w, b)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, b)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        g_exp = torch.autograd.grad(expected.sum(), [x, w, b])
        g_got = torch.autograd.grad(got.sum(), [x, w, b])
    for u, v in zip(g_got, g_exp):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    torch._dynamo.reset()


def test_auto_picks_cuda_and_reasons():
    from colm_kernels import backends
    from colm_kernels.ops.chain_linear.cuda_backend import not_supported_reasons

    x = torch.randn(4, 8, device=DEVICE)
    ws = [torch.randn(4, 4, device=DEVICE), torch.randn(4, 8, device=DEVICE)]
    assert not_supported_reasons(x, ws, []) == []
    with ck.use_backend("auto"):
        assert backends.select("chain_linear", [x, *ws], x=x, weights=ws, biases=[]) == "cuda"
    assert any("float64" in r for r in not_supported_reasons(x.double(), [w.double() for w in ws], []))
    assert any("one dtype" in r for r in not_supported_reasons(x, [ws[0].half(), ws[1]], []))
    with ck.use_backend("cuda"), pytest.raises(ck.BackendError, match="float64"):
        ck.chain_linear(x.double(), [w.double() for w in ws], None, (1, 1))


@pytest.mark.parametrize("chains", [(1, 1, 1, 1), (1, 2, 1)], ids=["C1.1.1.1", "C1.2.1"])
def test_bwd_dx_reads_separate_blocks_in_place(chains):
    """Separate weight blocks (ChainLinear's case) are read through their own pointers: the input
    gradient allocates dx and a pointer table, never a packed copy of the weights, and matches the
    dense-weight path (one GEMM per segment) within rounding."""
    from colm_kernels.ops.chain_linear import cuda_kernels

    dim, M = 2048, 64
    total = sum(chains)
    widths = [dim * c // total for c in chains]
    prefixes = [sum(widths[: i + 1]) for i in range(len(chains))]
    gen = torch.Generator().manual_seed(0)
    dense = (torch.randn(dim, dim, generator=gen) / dim ** 0.5).to(DEVICE, torch.float16)
    rows = [0] + [sum(widths[: i + 1]) for i in range(len(chains))]
    views = [dense[rows[i]:rows[i + 1], :prefixes[i]] for i in range(len(chains))]
    blocks = [v.contiguous() for v in views]
    dy = torch.randn(M, dim, generator=gen).to(DEVICE, torch.float16)
    weight_bytes = sum(b.numel() * b.element_size() for b in blocks)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dx = cuda_kernels.chain_linear_bwd_dx(dy, blocks, dim)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - dx.numel() * dx.element_size()
    assert extra < weight_bytes // 4, f"dx allocated {extra} B besides dx: a copy of the weights?"
    ref = sum(torch.nn.functional.pad(dy[:, rows[i]:rows[i + 1]].double() @ blocks[i].double(),
                                      (0, dim - prefixes[i])) for i in range(len(chains)))
    dense_dx = cuda_kernels.chain_linear_bwd_dx(dy, views, dim)
    eager = sum(torch.nn.functional.pad(dy[:, rows[i]:rows[i + 1]] @ blocks[i], (0, dim - prefixes[i]))
                for i in range(len(chains)))
    bound = 2 * (eager.double() - ref).abs().max().item() + dtype_slack(torch.float16)
    assert (dx.double() - ref).abs().max().item() <= bound
    assert (dense_dx.double() - ref).abs().max().item() <= bound
