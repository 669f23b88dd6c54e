"""``chain_linear`` through the public API on the ``triton`` backend (interpreter on CPU, real
kernels on GPU): forward and every gradient against the float64 reference, with the accuracy rule
of ``numerics.py``; elastic scales, frozen chains, both weight layouts, opcheck, torch.compile,
and the modules and model running on it."""

import pytest
import torch

import colm_kernels as ck
from colm_kernels.chains import Chains
from numerics import assert_within_eager_error

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong in the interpreter: a GPU-only case.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LAYOUTS = [  # (chains, out_features, in_features)
    ((1, 1, 1, 1), 32, 32),
    ((1, 2, 1), 24, 40),
    ((3,), 48, 21),
    ((1,) * 8, 72, 64),
]


def _id(layout):
    chains, out_f, in_f = layout
    return f"C{'.'.join(map(str, chains))}-{out_f}x{in_f}"


def _inputs(chains, out_f, in_f, m, bias, dense, requires_grad=True):
    c = Chains(chains)
    x = torch.randn(m, in_f, dtype=torch.float64)
    w = torch.randn(out_f, in_f, dtype=torch.float64) / in_f ** 0.5
    b = torch.randn(out_f, dtype=torch.float64) if bias else None
    if not dense:
        rows, prefixes = c.offsets(out_f), c.prefixes(in_f)
        w = [w[rows[i]:rows[i + 1], :prefixes[i]].clone() for i in range(c.n)]
        b = None if b is None else list(b.split(c.widths(out_f)))
    return x, w, b


def _cast(t, dtype, requires_grad=True):
    if t is None:
        return None
    if isinstance(t, list):
        return [_cast(u, dtype, requires_grad) for u in t]
    return t.detach().to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def _leaves(x, w, b):
    out = [x] + (w if isinstance(w, list) else [w])
    if b is not None:
        out += b if isinstance(b, list) else [b]
    return out


def _run(backend, x, w, b, chains, chain, cot):
    with ck.use_backend(backend):
        y = ck.chain_linear(x, w, b, chains, chain)
    leaves = [t for t in _leaves(x, w, b) if t.requires_grad]
    grads = torch.autograd.grad(y, leaves, cot.to(y.dtype).to(y.device), allow_unused=True)
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_matches_reference_every_scale(layout, m, dtype):
    chains, out_f, in_f = layout
    for chain in range(len(chains)):
        for dense, bias in ((True, True), (False, False)):
            x, w, b = _inputs(chains, out_f, in_f, m, bias, dense)
            width = Chains(chains).active_width(out_f, chain)
            cot = torch.randn(m, width, dtype=torch.float64)
            ref = _run("reference", *(_cast(t, torch.float64) for t in (x, w, b)), chains, chain, cot)
            eager = _run("reference", *(_cast(t, dtype) for t in (x, w, b)), chains, chain, cot)
            ours = _run("triton", *(_cast(t, dtype) for t in (x, w, b)), chains, chain, cot)
            tag = f"chain={chain} dense={dense}"
            assert_within_eager_error(ours[0], eager[0], ref[0], name=f"y {tag}")
            for i, (g, ge, gr) in enumerate(zip(ours[1], eager[1], ref[1])):
                if gr is None:  # a block of an inactive chain: no gradient at all
                    assert g is None
                    continue
                assert_within_eager_error(g, ge, gr, name=f"grad[{i}] {tag}")


@pytest.mark.parametrize("dtype", [torch.float32], ids=lambda d: str(d)[6:])
def test_dense_upper_blocks_never_read_and_get_zero_grad(dtype):
    chains, out_f, in_f = (1, 2, 1), 24, 40
    c = Chains(chains)
    x, w, b = _inputs(chains, out_f, in_f, 17, True, dense=True)
    rows, prefixes = c.offsets(out_f), c.prefixes(in_f)
    poisoned = w.clone()
    for i in range(c.n):
        poisoned[rows[i]:rows[i + 1], prefixes[i]:] = float("nan")
    xs, ws, bs = (_cast(t, dtype) for t in (x, poisoned, b))
    with ck.use_backend("triton"):
        y = ck.chain_linear(xs, ws, bs, chains)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(xs.grad).all()
    for i in range(c.n):
        upper = ws.grad[rows[i]:rows[i + 1], prefixes[i]:]
        assert torch.equal(upper, torch.zeros_like(upper))


def test_frozen_chains_get_no_weight_grad_and_others_match():
    chains, out_f, in_f = (1, 1, 1, 1), 32, 32
    x, w, _ = _inputs(chains, out_f, in_f, 17, False, dense=False)
    cot = torch.randn(17, out_f, dtype=torch.float64)
    results = {}
    for backend in ("reference", "triton"):
        xs = _cast(x, torch.float32)
        ws = [_cast(t, torch.float32, requires_grad=i >= 2) for i, t in enumerate(w)]
        with ck.use_backend(backend):
            y = ck.chain_linear(xs, ws, None, chains)
        y.backward(cot.float())
        assert ws[0].grad is None and ws[1].grad is None
        results[backend] = [xs.grad, ws[2].grad, ws[3].grad]
    for ours, ref in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_leading_dims_and_wide_input():
    chains = (1, 2, 1)
    x = torch.randn(2, 3, 47, device=DEVICE)  # wider than in_features=40
    w = torch.randn(24, 40, device=DEVICE)
    with ck.use_backend("triton"):
        y = ck.chain_linear(x, w, None, chains)
    with ck.use_backend("reference"):
        ref = ck.chain_linear(x, w, None, chains)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile():
    from colm_kernels.ops.chain_linear.triton_backend import chain_linear_triton

    x = torch.randn(17, 40, device=DEVICE, requires_grad=True)
    ws = [torch.randn(6, 10, device=DEVICE, requires_grad=True),
          torch.randn(12, 30, device=DEVICE, requires_grad=True),
          torch.randn(6, 40, device=DEVICE, requires_grad=True)]
    bs = [torch.randn(6, device=DEVICE, requires_grad=True), torch.randn(12, device=DEVICE, requires_grad=True),
          torch.randn(6, device=DEVICE, requires_grad=True)]
    torch.library.opcheck(chain_linear_triton, (x, ws, bs, None))
    torch.library.opcheck(chain_linear_triton, (x, ws, [], None))
    rows = torch.tensor([2, 0, 1] * 5 + [1, 2], dtype=torch.int32, device=DEVICE)  # per-row scales
    torch.library.opcheck(chain_linear_triton, (x, ws, bs, rows))
    with ck.use_backend("triton"):
        compiled = torch.compile(lambda x: ck.chain_linear(x, ws, bs, (1, 2, 1)), fullgraph=True,
                                 backend="aot_eager")
        torch.testing.assert_close(compiled(x), ck.chain_linear(x, ws, bs, (1, 2, 1)))
