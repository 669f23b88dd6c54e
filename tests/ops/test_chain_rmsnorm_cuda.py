"""GPU tests of ``chain_rmsnorm``'s ``cuda`` backend (csrc/chain_rmsnorm), through the public API.

Every case runs ``colm_kernels.chain_rmsnorm`` with the ``cuda`` backend, with the ``reference``
backend in the same dtype ("eager") and in float64, on the same GPU values. For y, dx and dweight:

    max |cuda - float64| <= 2 * max |eager - float64| + eps(dtype)

Cases: one chain, unequal chains, 64 chains; odd widths (scalar heads and tails around the vector
loads); rows whose stride or start is not 16-byte aligned; W > 16384 (dweight partial sums in the
global workspace instead of shared memory); elastic ``chain=k``; M = 1, 7, 300; bitwise
reproducible dweight. Skipped without a CUDA device or without the built extension.
"""
from __future__ import annotations

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
EPS = 1e-5


def _dt(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# (chains, dim): one chain, unequal chains, odd widths, 64 chains, W > 16384
CASES = [
    ((1,), 64),
    ((1,), 37),  # odd width: no vector loads
    ((1, 2, 1), 132),  # widths 33/66/33
    ((3, 1, 2), 600),  # unequal, 300/100/200
    ((1,) * 64, 64 * 24),  # 64 chains of 24
    ((1,) * 64, 64 * 5),  # 64 chains of 5 (odd)
    ((1, 1), 20000),  # W = 20000 > 16384: dweight rows in the global workspace
    ((5, 3), 16392),  # W just past 16384, widths 10245 / 6147 (odd)
]
MS = [1, 7, 300]


def _cid(case) -> str:
    chains, dim = case
    c = f"{len(chains)}x{chains[0]}" if len(chains) > 4 and len(set(chains)) == 1 else ".".join(map(str, chains))
    return f"C{c}-D{dim}"


def _widths(chains, dim):
    s = sum(chains)
    return [dim * c // s for c in chains]


def _width(chains, dim, chain):
    w = _widths(chains, dim)
    k = len(chains) - 1 if chain is None else chain
    return sum(w[: k + 1])


def _run(backend, dtype, x, weight, grad, chains, chain=None, layout="contiguous"):
    """(y, dx, dweight) in ``dtype``. ``layout``: ``contiguous``; ``stride`` (row stride W + 3);
    ``offset`` (rows start one element past a 16-byte boundary, row stride W + 8)."""
    W = x.shape[-1]
    if layout == "contiguous":
        xs = x.to(DEVICE, dtype).detach().requires_grad_(True)
    else:
        pad, start = (3, 0) if layout == "stride" else (8, 1)
        buf = torch.zeros(*x.shape[:-1], W + pad, dtype=dtype, device=DEVICE)
        buf[..., start:start + W] = x.to(DEVICE, dtype)
        xs = buf[..., start:start + W].detach().requires_grad_(True)
        assert xs.stride(-2) == W + pad
    ws = weight.to(DEVICE, dtype).detach().requires_grad_(True)
    with ck.use_backend(backend):
        y = ck.chain_rmsnorm(xs, ws, chains, EPS, chain=chain)
    y.backward(grad.to(DEVICE, dtype))
    return y.detach(), xs.grad, ws.grad


def _err(a, ref) -> float:
    return 0.0 if ref.numel() == 0 else (a.double() - ref.double()).abs().max().item()


def _compare(chains, dim, M, dtype, gen, chain=None, layout="contiguous", shape=None):
    W = _width(chains, dim, chain)
    lead = shape or (M,)
    x = 2 * torch.randn(*lead, W, generator=gen, dtype=F64) + 0.5
    weight = 1 + 0.2 * torch.randn(dim, generator=gen, dtype=F64)
    grad = torch.randn(*lead, W, generator=gen, dtype=F64)
    got = _run("cuda", dtype, x, weight, grad, chains, chain, layout)
    eager = _run("reference", dtype, x, weight, grad, chains, chain, layout)
    ref = _run("reference", F64, x, weight, grad, chains, chain, layout)
    for name, g, e, r in zip(("y", "dx", "dweight"), got, eager, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err, eager_err = _err(g, r), _err(e, r)
        bound = 2 * eager_err + dtype_slack(dtype)
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (eager {_dt(dtype)}: {eager_err:.3e})"
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("M", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_forward_and_grads(case, M, dtype, gen):
    chains, dim = case
    got = _compare(chains, dim, M, dtype, gen)
    # the gain's entries past the active width get zero gradient (chain=None: none past it)
    assert got[2].shape == (dim,)


@pytest.mark.parametrize("layout", ["stride", "offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5], CASES[7]], ids=_cid)
def test_misaligned_rows(case, dtype, layout, gen):
    chains, dim = case
    _compare(chains, dim, 7, dtype, gen, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4]], ids=_cid)
def test_elastic_every_chain(case, dtype, gen):
    chains, dim = case
    for k in range(0, len(chains), max(1, len(chains) // 8)):
        y, _, dweight = _compare(chains, dim, 7, dtype, gen, chain=k)
        W = _width(chains, dim, k)
        assert y.shape[-1] == W
        assert (dweight[W:] == 0).all(), "gain entries of inactive chains get zero gradient"


def test_leading_dims_and_empty(gen):
    _compare((1, 2, 1), 132, None, torch.bfloat16, gen, shape=(2, 3, 5))
    x = torch.zeros(0, 132, device=DEVICE, requires_grad=True)
    w = torch.ones(132, device=DEVICE, requires_grad=True)
    with ck.use_backend("cuda"):
        y = ck.chain_rmsnorm(x, w, (1, 2, 1), EPS)
    y.sum().backward()
    assert y.shape == (0, 132) and x.grad.shape == (0, 132)
    assert (w.grad == 0).all()


@pytest.mark.parametrize("case", [CASES[3], CASES[6]], ids=_cid)
def test_dweight_deterministic(case, gen):
    chains, dim = case
    x = torch.randn(1000, dim, generator=gen, dtype=F64)
    weight = torch.randn(dim, generator=gen, dtype=F64)
    grad = torch.randn(1000, dim, generator=gen, dtype=F64)
    runs = [_run("cuda", torch.bfloat16, x, weight, grad, chains) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), "cuda chain_rmsnorm must be bitwise reproducible"


@pytest.mark.parametrize("case", [CASES[3], CASES[6]], ids=_cid)
def test_frozen_gain_skips_dweight(case, gen):
    """A gain that needs no gradient launches no dweight work (empty dweight from the kernels) and
    leaves dx bitwise equal to the run that computes dweight."""
    from colm_kernels.ops.chain_rmsnorm import cuda_kernels

    chains, dim = case
    offsets = [0]
    for w in _widths(chains, dim):
        offsets.append(offsets[-1] + w)
    x = torch.randn(97, dim, generator=gen).to(DEVICE, torch.bfloat16)
    weight = (1 + 0.2 * torch.randn(dim, generator=gen)).to(DEVICE, torch.bfloat16)
    dy = torch.randn(97, dim, generator=gen).to(DEVICE, torch.bfloat16)
    _, rstd = cuda_kernels.chain_rmsnorm_fwd(x, weight, offsets, EPS)
    dx_full, dweight = cuda_kernels.chain_rmsnorm_bwd(dy, x, weight, rstd, offsets, True)
    dx_frozen, none = cuda_kernels.chain_rmsnorm_bwd(dy, x, weight, rstd, offsets, False)
    assert dweight.shape == (dim,) and none.numel() == 0
    assert torch.equal(dx_full, dx_frozen)
    # through the op: the frozen gain gets no gradient, x gets the reference's
    xs = x.double().cpu().requires_grad_(True)
    xg = x.detach().requires_grad_(True)
    with ck.use_backend("cuda"):
        ck.chain_rmsnorm(xg, weight, chains, EPS).backward(dy)
    ck.chain_rmsnorm(xs, weight.double().cpu(), chains, EPS).backward(dy.double().cpu())
    assert weight.grad is None
    torch.testing.assert_close(xg.grad.double().cpu(), xs.grad, rtol=2e-2, atol=2e-2)
