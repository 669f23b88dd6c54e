"""``chain_rmsnorm``'s ``triton`` backend against the float64 reference, through the public API.

Every case runs ``colm_kernels.chain_rmsnorm`` with the ``triton`` backend, with the ``reference``
backend in the same dtype ("eager") and in float64, on the same values, and applies
``numerics.assert_within_eager_error`` to y (2x) and to dx, dweight (3x). Cases: one chain,
unequal chains, eight chains; widths that are not powers of two (17, 6, 10); M = 1, 17, 97;
every elastic scale (x at the prefix width); a strided x (a column slice of a wider tensor); a
frozen gain (no dweight work at all); empty input; deterministic dweight; opcheck on the
registered ops; torch.compile(fullgraph=True). ``torch.empty`` is NaN-filled here, so any output
element a kernel leaves unwritten fails. Without a GPU the kernels run in Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

import colm_kernels as ck
from numerics import assert_within_eager_error

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs are NaN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
EPS = 1e-5

# (chains, dim): two equal chains, unequal chains, one chain of odd width, eight narrow chains
CASES = [((1, 1), 48), ((1, 2, 1), 40), ((3,), 17 * 3), ((1,) * 8, 48)]
MS = [1, 17, 97]


def _dt(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _cid(case) -> str:
    chains, dim = case
    c = f"{len(chains)}x{chains[0]}" if len(chains) > 4 and len(set(chains)) == 1 else ".".join(map(str, chains))
    return f"C{c}-D{dim}"


def _prefix(chains, dim, k) -> int:
    s = sum(chains)
    return sum(dim * c // s for c in chains[: k + 1])



def _run(backend, dtype, x, weight, grad, chains, chain=None, pad=0, weight_grad=True):
    """(y, dx, dweight) of ``backend`` in ``dtype``; ``pad`` > 0: x is a column slice of a wider
    tensor (row stride W + pad, rows not starting at column 0)."""
    W = x.shape[-1]
    if pad:
        buf = torch.zeros(*x.shape[:-1], W + pad, dtype=dtype, device=DEVICE)
        buf[..., 1:1 + W] = x.to(DEVICE, dtype)
        xs = buf[..., 1:1 + W].detach().requires_grad_(True)
        assert xs.stride(-1) == 1 and xs.stride(0) == W + pad
    else:
        xs = x.to(DEVICE, dtype).detach().requires_grad_(True)
    ws = weight.to(DEVICE, dtype).detach().requires_grad_(weight_grad)
    with ck.use_backend(backend):
        y = ck.chain_rmsnorm(xs, ws, chains, EPS, chain=chain)
    y.backward(grad.to(DEVICE, dtype))
    return y.detach(), xs.grad, ws.grad


def _inputs(chains, dim, m, k, gen):
    W = _prefix(chains, dim, len(chains) - 1 if k is None else k)
    x = 2 * torch.randn(m, W, generator=gen, dtype=F64) + 0.5
    weight = 1 + 0.2 * torch.randn(dim, generator=gen, dtype=F64)
    grad = torch.randn(m, W, generator=gen, dtype=F64)
    return x, weight, grad


def _compare(chains, dim, m, dtype, gen, chain=None, pad=0, weight_grad=True):
    x, weight, grad = _inputs(chains, dim, m, chain, gen)
    got = _run("triton", dtype, x, weight, grad, chains, chain, pad, weight_grad)
    eager = _run("reference", dtype, x, weight, grad, chains, chain, pad, weight_grad)
    ref = _run("reference", F64, x, weight, grad, chains, chain, pad, weight_grad)
    for name, g, e, r, factor in zip(("y", "dx", "dweight"), got, eager, ref, (2.0, 3.0, 3.0)):
        if r is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        assert g.dtype == dtype, name
        assert_within_eager_error(g, e, r, factor=factor, name=f"{name} ({_dt(dtype)})")
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_matches_reference_every_scale(case, m, dtype, gen):
    chains, dim = case
    for k in range(len(chains)):
        y, _, dweight = _compare(chains, dim, m, dtype, gen, chain=k)
        W = _prefix(chains, dim, k)
        assert y.shape == (m, W) and dweight.shape == (dim,)
        assert (dweight[W:] == 0).all(), "gain entries of inactive chains get zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=_cid)
def test_strided_rows(case, dtype, gen):
    chains, dim = case
    _compare(chains, dim, 17, dtype, gen, pad=5)


@pytest.fixture
def bwd_calls(monkeypatch):
    """Records ``(needs_x, needs_weight)`` of every Triton backward launch."""
    from colm_kernels.ops.chain_rmsnorm import triton_kernels as kernels

    calls = []
    orig = kernels.chain_rmsnorm_bwd

    def spy(dy, x2d, weight, rstd, offsets, needs_x, needs_weight, row_chains=None):
        calls.append((needs_x, needs_weight))
        return orig(dy, x2d, weight, rstd, offsets, needs_x, needs_weight, row_chains)

    monkeypatch.setattr(kernels, "chain_rmsnorm_bwd", spy)
    return calls


def test_frozen_weight_does_no_dweight_work(bwd_calls, gen):
    _, dx, dweight = _compare((1, 2, 1), 40, 17, torch.float32, gen, weight_grad=False)
    assert dweight is None and dx is not None
    assert bwd_calls == [(True, False)]


def test_frozen_input_does_no_dx_work(bwd_calls, gen):
    x, weight, grad = _inputs((1, 1), 48, 17, None, gen)
    ws = weight.float().requires_grad_(True)
    with ck.use_backend("triton"):
        y = ck.chain_rmsnorm(x.float(), ws, (1, 1), EPS)
    y.backward(grad.float())
    ref = weight.clone().requires_grad_(True)
    with ck.use_backend("reference"):
        ck.chain_rmsnorm(x, ref, (1, 1), EPS).backward(grad)
    torch.testing.assert_close(ws.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
    assert bwd_calls == [(False, True)]


def test_dweight_deterministic_and_rstd_layout(gen):
    from colm_kernels.ops.chain_rmsnorm import triton_kernels as kernels

    x, weight, grad = _inputs((1, 2, 1), 40, 97, None, gen)
    x, weight, grad = (t.float().to(DEVICE) for t in (x, weight, grad))
    offsets = [0, 10, 30, 40]
    y, rstd = kernels.chain_rmsnorm_fwd(x, weight, offsets, EPS)
    assert rstd.dtype == torch.float32 and rstd.shape == (97, 3)
    expect = torch.stack([x[:, a:b].double().pow(2).mean(-1).add(EPS).rsqrt()
                          for a, b in zip(offsets, offsets[1:])], dim=1)
    torch.testing.assert_close(rstd.double(), expect, rtol=1e-5, atol=0)
    a = kernels.chain_rmsnorm_bwd(grad, x, weight, rstd, offsets, True, True)
    b = kernels.chain_rmsnorm_bwd(grad, x, weight, rstd, offsets, True, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_rows():
    x = torch.zeros(0, 48, device=DEVICE, requires_grad=True)
    w = torch.ones(48, device=DEVICE, requires_grad=True)
    with ck.use_backend("triton"):
        y = ck.chain_rmsnorm(x, w, (1, 1), EPS)
    y.sum().backward()
    assert y.shape == (0, 48) and x.grad.shape == (0, 48)
    assert torch.equal(w.grad, torch.zeros(48, device=DEVICE))


def test_launcher_validation():
    from colm_kernels.ops.chain_rmsnorm import triton_kernels as kernels

    x = torch.randn(3, 8, device=DEVICE)
    w = torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="offsets"):
        kernels.chain_rmsnorm_fwd(x, w, [0, 4, 7], EPS)
    with pytest.raises(ValueError, match="weight"):
        kernels.chain_rmsnorm_fwd(x, w[:6], [0, 4, 8], EPS)
    with pytest.raises(TypeError, match="weight"):
        kernels.chain_rmsnorm_fwd(x, w.half(), [0, 4, 8], EPS)


# ----------------------------------------------------------------------------------------------
# Registered ops: opcheck, compile
# ----------------------------------------------------------------------------------------------
def test_opcheck_triton_ops():
    from colm_kernels.ops.chain_rmsnorm.triton_backend import chain_rmsnorm_triton_bwd, chain_rmsnorm_triton_fwd

    offsets = [0, 10, 30, 40]
    x = torch.randn(17, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(chain_rmsnorm_triton_fwd, (x, w, offsets, EPS, None))
    wide = torch.randn(17, 45, device=DEVICE)[:, 2:42].requires_grad_(True)  # strided rows
    torch.library.opcheck(chain_rmsnorm_triton_fwd, (wide, w, offsets, EPS, None))
    rows = torch.tensor([2, 0, 1] * 5 + [1, 2], dtype=torch.int32, device=DEVICE)  # per-row scales
    torch.library.opcheck(chain_rmsnorm_triton_fwd, (x, w, offsets, EPS, rows))
    _, rstd = chain_rmsnorm_triton_fwd(x.detach(), w.detach(), offsets, EPS, None)
    dy = torch.randn(17, 40, device=DEVICE)
    for needs_x, needs_w in ((True, True), (True, False), (False, True)):
        for r in (None, rows):
            torch.library.opcheck(chain_rmsnorm_triton_bwd,
                                  (dy, x.detach(), w.detach(), rstd, offsets, needs_x, needs_w, r))


def test_compile_fullgraph_matches_eager(monkeypatch):
    monkeypatch.undo()  # compile with a plain torch.empty
    torch._dynamo.reset()
    chains = (1, 2, 1)
    x = torch.randn(5, 30, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    with ck.use_backend("triton"):
        fn = lambda x, w: ck.chain_rmsnorm(x, w, chains, EPS, chain=1)  # noqa: E731
        expected = fn(x, w)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        g_exp = torch.autograd.grad(expected.sum(), [x, w])
        g_got = torch.autograd.grad(got.sum(), [x, w])
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()
