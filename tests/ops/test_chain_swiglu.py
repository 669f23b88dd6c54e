"""``chain_swiglu`` (``silu(x W1^T) * x W3^T`` with chain-linear W1, W3) on the ``triton`` backend
(interpreter on CPU, real kernels on GPU): forward and the gradients of x, W1 and W3 against the
float64 reference with the accuracy rule of ``numerics.py`` (kernel error <= 2x the eager error in
the same dtype + a floor); every elastic scale, dense and per-chain weights, odd token counts,
frozen blocks (no weight-gradient tiles), gates stored only when autograd needs them, opcheck,
torch.compile, the reference backend's gradcheck, and ``ChainFeedForward`` on top of it.
``torch.empty`` is NaN-filled here, so any output element a kernel leaves unwritten fails.
"""

import pytest
import torch
import torch.nn.functional as F

import colm_kernels as ck
from colm_kernels.chains import Chains
from numerics import assert_within_eager_error
from utils import ref_chain_linear

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs are NaN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong in the interpreter: a GPU-only case.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LAYOUTS = [  # (chains, hidden, dim): W1, W3 are (hidden, dim)
    ((1, 1, 1, 1), 32, 32),
    ((1, 2, 1), 24, 40),  # chain widths 6/12/6 and 10/20/10: not multiples of the 16 block
    ((3,), 48, 21),  # one chain, several n-tiles, odd K
]


def _id(layout):
    chains, hidden, dim = layout
    return f"C{'.'.join(map(str, chains))}-H{hidden}-D{dim}"


def _dt(dtype):
    return str(dtype)[6:]



def _blocks(dense, chains):
    c = Chains(chains)
    rows, prefixes = c.offsets(dense.shape[0]), c.prefixes(dense.shape[1])
    return [dense[rows[i]:rows[i + 1], :prefixes[i]].clone() for i in range(c.n)]


def _inputs(chains, hidden, dim, m, dense, extra_in=0):
    """float64 x (m, dim + extra_in), W1, W3 (dense, or per-chain block lists)."""
    x = torch.randn(m, dim + extra_in, dtype=torch.float64)
    w1 = torch.randn(hidden, dim, dtype=torch.float64) / dim ** 0.5
    w3 = torch.randn(hidden, dim, dtype=torch.float64) / dim ** 0.5
    if not dense:
        w1, w3 = _blocks(w1, chains), _blocks(w3, chains)
    return x, w1, w3


def _cast(t, dtype, requires_grad=True):
    if isinstance(t, list):
        return [_cast(u, dtype, requires_grad) for u in t]
    return t.detach().to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def _leaves(x, w1, w3):
    return [x] + (w1 if isinstance(w1, list) else [w1]) + (w3 if isinstance(w3, list) else [w3])


def _run(backend, x, w1, w3, chains, chain, cot):
    with ck.use_backend(backend):
        h = ck.chain_swiglu(x, w1, w3, chains, chain)
    leaves = [t for t in _leaves(x, w1, w3) if t.requires_grad]
    grads = torch.autograd.grad(h, leaves, cot.to(device=h.device, dtype=h.dtype), allow_unused=True)
    return h, grads


def _floor(dtype, ref):
    """The absolute floor of the accuracy rule: a few ulps of the output's scale."""
    eps = {torch.float32: 16 * torch.finfo(torch.float32).eps}.get(dtype, torch.finfo(dtype).eps)
    return eps * max(1.0, float(ref.detach().abs().max())) if ref.numel() else eps


# ----------------------------------------------------------------------------------------------
# Forward and gradients against float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("m", [1, 17], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_matches_reference_every_scale(layout, m, dtype):
    chains, hidden, dim = layout
    for chain in range(len(chains)):
        for dense in (True, False):
            x, w1, w3 = _inputs(chains, hidden, dim, m, dense)
            width = Chains(chains).active_width(hidden, chain)
            cot = torch.randn(m, width, dtype=torch.float64)
            ref = _run("reference", *(_cast(t, torch.float64) for t in (x, w1, w3)), chains, chain, cot)
            eager = _run("reference", *(_cast(t, dtype) for t in (x, w1, w3)), chains, chain, cot)
            ours = _run("triton", *(_cast(t, dtype) for t in (x, w1, w3)), chains, chain, cot)
            tag = f"chain={chain} dense={dense}"
            assert ours[0].dtype == dtype
            assert_within_eager_error(ours[0], eager[0], ref[0], atol=_floor(dtype, ref[0]), name=f"h {tag}")
            for i, (g, ge, gr) in enumerate(zip(ours[1], eager[1], ref[1])):
                if gr is None:  # a block of an inactive chain: no gradient at all
                    assert g is None, f"grad[{i}] {tag}: inactive block got a gradient"
                    continue
                assert_within_eager_error(g, ge, gr, atol=_floor(dtype, gr), name=f"grad[{i}] {tag}")


def test_reference_matches_independent_float64_formula():
    """The reference backend is the spec's formula (dense masked matmuls of ``tests/utils``)."""
    chains, hidden, dim = (1, 2, 1), 24, 40
    x, w1, w3 = _inputs(chains, hidden, dim, 9, dense=True, extra_in=3)
    for chain in range(3):
        with ck.use_backend("reference"):
            h = ck.chain_swiglu(x, w1, w3, chains, chain)
        a = ref_chain_linear(x, w1, None, chains, chain)
        b = ref_chain_linear(x, w3, None, chains, chain)
        torch.testing.assert_close(h, a * torch.sigmoid(a) * b, rtol=1e-12, atol=1e-12)


def test_elastic_scale_is_a_prefix_of_the_full_run():
    chains, hidden, dim = (1, 2, 1), 24, 40
    x, w1, w3 = _inputs(chains, hidden, dim, 17, dense=False)
    xs, w1s, w3s = (_cast(t, torch.float32, requires_grad=False) for t in (x, w1, w3))
    with ck.use_backend("triton"):
        full = ck.chain_swiglu(xs, w1s, w3s, chains)
        for chain in range(3):
            part = ck.chain_swiglu(xs, w1s, w3s, chains, chain)
            width = Chains(chains).active_width(hidden, chain)
            assert part.shape == (17, width)
            torch.testing.assert_close(part, full[:, :width], rtol=0, atol=0)


def test_dense_upper_blocks_never_read_and_get_zero_grad():
    chains, hidden, dim = (1, 2, 1), 24, 40
    c = Chains(chains)
    x, w1, w3 = _inputs(chains, hidden, dim, 17, dense=True)
    rows, prefixes = c.offsets(hidden), c.prefixes(dim)
    w1p, w3p = w1.clone(), w3.clone()
    for i in range(c.n):
        w1p[rows[i]:rows[i + 1], prefixes[i]:] = float("nan")
        w3p[rows[i]:rows[i + 1], prefixes[i]:] = float("nan")
    xs, w1s, w3s = (_cast(t, torch.float32) for t in (x, w1p, w3p))
    with ck.use_backend("triton"):
        h = ck.chain_swiglu(xs, w1s, w3s, chains)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(xs.grad).all()
    for w in (w1s, w3s):
        assert torch.isfinite(w.grad).all()
        for i in range(c.n):
            upper = w.grad[rows[i]:rows[i + 1], prefixes[i]:]
            assert torch.equal(upper, torch.zeros_like(upper))


def test_leading_dims_wide_and_strided_input():
    chains, hidden, dim = (1, 2, 1), 24, 40
    base = torch.randn(2, 3, 47 + 5, device=DEVICE)
    x = base[..., :47]  # wider than dim=40 and rows strided
    w1, w3 = torch.randn(hidden, dim, device=DEVICE), torch.randn(hidden, dim, device=DEVICE)
    with ck.use_backend("triton"):
        h = ck.chain_swiglu(x, w1, w3, chains)
    with ck.use_backend("reference"):
        ref = ck.chain_swiglu(x, w1, w3, chains)
    assert h.shape == (2, 3, hidden)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-4)


def test_wide_input_gets_zero_grad_past_the_last_prefix():
    chains, hidden, dim = (1, 2, 1), 24, 40
    x, w1, w3 = _inputs(chains, hidden, dim, 17, dense=False, extra_in=7)
    xs, w1s, w3s = (_cast(t, torch.float32) for t in (x, w1, w3))
    xr, w1r, w3r = (_cast(t, torch.float32) for t in (x, w1, w3))
    cot = torch.randn(17, hidden, device=DEVICE)
    ours = _run("triton", xs, w1s, w3s, chains, None, cot)
    ref = _run("reference", xr, w1r, w3r, chains, None, cot)
    assert torch.equal(ours[1][0][:, dim:], torch.zeros(17, 7, device=DEVICE))
    for g, gr in zip(ours[1], ref[1]):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)


def test_empty_tokens():
    chains, hidden, dim = (1, 2, 1), 24, 40
    x = torch.zeros(0, dim, device=DEVICE, requires_grad=True)
    w1 = torch.randn(hidden, dim, device=DEVICE, requires_grad=True)
    w3 = torch.randn(hidden, dim, device=DEVICE, requires_grad=True)
    with ck.use_backend("triton"):
        h = ck.chain_swiglu(x, w1, w3, chains)
    assert h.shape == (0, hidden)
    gx, g1, g3 = torch.autograd.grad(h.sum(), [x, w1, w3])
    assert gx.shape == (0, dim)
    assert torch.equal(g1, torch.zeros_like(g1)) and torch.equal(g3, torch.zeros_like(g3))


# ----------------------------------------------------------------------------------------------
# What the backward launches
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """Record the chain-linear backward launchers' calls made by chain_swiglu's backward, and the
    forward's ``save_gates``."""
    from colm_kernels.ops.chain_linear import triton_launch as lin
    from colm_kernels.ops.chain_swiglu import triton_kernels as sw

    calls = {"dx": 0, "dw": [], "save_gates": []}
    dx_fn, dw_fn, fwd_fn = lin.chain_linear_bwd_dx, lin.chain_linear_bwd_dw, sw.chain_swiglu_fwd

    def dx(*args, **kwargs):
        calls["dx"] += 1
        return dx_fn(*args, **kwargs)

    def dw(dy, x, weights, needs_weight, needs_bias, row_chains=None):
        calls["dw"].append((list(needs_weight), list(needs_bias)))
        return dw_fn(dy, x, weights, needs_weight, needs_bias, row_chains)

    def fwd(x, w1, w3, save_gates, row_chains=None):
        calls["save_gates"].append(save_gates)
        return fwd_fn(x, w1, w3, save_gates, row_chains)

    monkeypatch.setattr(lin, "chain_linear_bwd_dx", dx)
    monkeypatch.setattr(lin, "chain_linear_bwd_dw", dw)
    monkeypatch.setattr(sw, "chain_swiglu_fwd", fwd)
    return calls


def test_frozen_blocks_get_no_grad_and_launch_no_weight_tiles(launches):
    chains, hidden, dim = (1, 1, 1, 1), 32, 32
    x, w1, w3 = _inputs(chains, hidden, dim, 17, dense=False)
    frozen1, frozen3 = {0, 1}, {0, 2}  # chain tuning: early chains frozen (W1 and W3 apart)
    cot = torch.randn(17, hidden, dtype=torch.float64)
    results = {}
    for backend in ("reference", "triton"):
        xs = _cast(x, torch.float32)
        w1s = [_cast(t, torch.float32, requires_grad=i not in frozen1) for i, t in enumerate(w1)]
        w3s = [_cast(t, torch.float32, requires_grad=i not in frozen3) for i, t in enumerate(w3)]
        with ck.use_backend(backend):
            h = ck.chain_swiglu(xs, w1s, w3s, chains)
        h.backward(cot.float().to(DEVICE))
        for i in range(4):
            assert (w1s[i].grad is None) == (i in frozen1) and (w3s[i].grad is None) == (i in frozen3)
        results[backend] = [xs.grad] + [w.grad for w in w1s + w3s if w.grad is not None]
    # one weight-grad launch; its flags (interleaved W1_0, W3_0, W1_1, ...) leave frozen blocks out
    assert launches["dw"] == [([False, False, False, True, True, False, True, True], [False] * 8)]
    assert launches["dx"] == 1 and launches["save_gates"] == [True]
    for ours, ref in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_all_weights_frozen_launches_only_dx_and_no_grad_mode_saves_no_gates(launches):
    chains, hidden, dim = (1, 2, 1), 24, 40
    x, w1, w3 = _inputs(chains, hidden, dim, 17, dense=False)
    xs = _cast(x, torch.float32)
    w1s, w3s = _cast(w1, torch.float32, False), _cast(w3, torch.float32, False)
    with ck.use_backend("triton"):
        h = ck.chain_swiglu(xs, w1s, w3s, chains)
        (gx,) = torch.autograd.grad(h.sum(), [xs])
        with torch.no_grad():
            ck.chain_swiglu(xs, w1s, w3s, chains)
        ck.chain_swiglu(xs.detach(), w1s, w3s, chains)  # nothing requires grad
    assert launches["dw"] == [] and launches["dx"] == 1
    assert launches["save_gates"] == [True, False, False]
    assert gx.shape == xs.shape and torch.isfinite(gx).all()


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_validation_names_the_argument(backend):
    chains = (1, 2, 1)
    x = torch.randn(5, 40)
    w = torch.randn(24, 40)
    blocks = _blocks(w, chains)
    with ck.use_backend(backend):
        with pytest.raises(ValueError, match="w1 and w3 layouts differ"):
            ck.chain_swiglu(x, w, torch.randn(48, 40), chains)
        with pytest.raises(ValueError, match="w1 and w3 layouts differ"):
            ck.chain_swiglu(x, torch.randn(24, 20), torch.randn(24, 40), chains)
        with pytest.raises(ValueError, match=r"w3\[1\] must be \(12, 30\), got \(12, 28\)"):
            ck.chain_swiglu(x, blocks, [blocks[0], blocks[1][:, :-2], blocks[2]], chains)
        with pytest.raises(ValueError, match=r"w1 must hold one block per chain"):
            ck.chain_swiglu(x, blocks[:2], blocks, chains)
        with pytest.raises(ValueError, match=r"w1\.shape\[0\]"):
            ck.chain_swiglu(x, torch.randn(25, 40), torch.randn(25, 40), chains)
        with pytest.raises(TypeError, match="w3 has dtype"):
            ck.chain_swiglu(x, w, w.double(), chains)
        with pytest.raises(TypeError, match="w3 must be"):
            ck.chain_swiglu(x, w, None, chains)
        with pytest.raises(TypeError, match="w1 has dtype"):
            ck.chain_swiglu(x.double(), w, w, chains)
        with pytest.raises(ValueError, match=r"x\.shape\[-1\]=39"):
            ck.chain_swiglu(x[:, :39], w, w, chains)
        with pytest.raises(ValueError, match="chain=3"):
            ck.chain_swiglu(x, w, w, chains, chain=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt)
def test_gates_layout_and_same_h_with_or_without_gates(dtype):
    """``gates`` is ``[a_1 | b_1 | a_2 | b_2 | ...]``; storing it does not change ``h``."""
    from colm_kernels.ops.chain_swiglu.triton_kernels import chain_swiglu_fwd

    chains, hidden, dim = (1, 2, 1), 24, 40
    x, w1, w3 = _inputs(chains, hidden, dim, 17, dense=False)
    xs, w1s, w3s = (_cast(t, dtype, requires_grad=False) for t in (x, w1, w3))
    h, gates = chain_swiglu_fwd(xs, w1s, w3s, True)
    h2, none = chain_swiglu_fwd(xs, w1s, w3s, False)
    assert none.numel() == 0 and gates.shape == (17, 2 * hidden)
    assert torch.equal(h, h2)
    col = 0
    for a_w, b_w in zip(w1, w3):
        d, p = a_w.shape
        for w in (a_w, b_w):
            ref = x[:, :p] @ w.T
            low = (xs[:, :p] @ _cast(w, dtype, False).T).double().cpu()
            assert_within_eager_error(gates[:, col:col + d], low, ref, atol=_floor(dtype, ref),
                                      name=f"gates[:, {col}:{col + d}]")
            col += d


def test_launcher_validation():
    from colm_kernels.ops.chain_swiglu.triton_kernels import chain_swiglu_bwd_gates, chain_swiglu_fwd

    x = torch.randn(5, 40)
    blocks = _blocks(torch.randn(24, 40), (1, 2, 1))
    with pytest.raises(ValueError, match="w1 and w3 layouts differ"):
        chain_swiglu_fwd(x, blocks, blocks[:2], True)
    with pytest.raises(TypeError, match=r"w3\[0\] has dtype"):
        chain_swiglu_fwd(x, blocks, [b.half() for b in blocks], True)
    with pytest.raises(TypeError, match="save_gates"):
        chain_swiglu_fwd(x, blocks, blocks, 1)
    with pytest.raises(ValueError, match="x has 30 features"):
        chain_swiglu_fwd(x[:, :30], blocks, blocks, True)
    with pytest.raises(ValueError, match="gates must have shape"):
        chain_swiglu_bwd_gates(torch.randn(5, 24), torch.randn(5, 47), [6, 12, 6])
    with pytest.raises(ValueError, match="dh has width"):
        chain_swiglu_bwd_gates(torch.randn(5, 23), torch.randn(5, 48), [6, 12, 6])


# ----------------------------------------------------------------------------------------------
# Registered ops: opcheck, compile; the reference backend's gradcheck
# ----------------------------------------------------------------------------------------------
def test_opcheck_triton_ops():
    from colm_kernels.ops.chain_swiglu.triton_backend import chain_swiglu_triton_bwd_gates, chain_swiglu_triton_fwd

    x = torch.randn(17, 40, device=DEVICE, requires_grad=True)
    w1 = [t.to(DEVICE).requires_grad_(True) for t in _blocks(torch.randn(24, 40) / 6, (1, 2, 1))]
    w3 = [t.to(DEVICE).requires_grad_(True) for t in _blocks(torch.randn(24, 40) / 6, (1, 2, 1))]
    torch.library.opcheck(chain_swiglu_triton_fwd, (x, w1, w3, True, None))
    torch.library.opcheck(chain_swiglu_triton_fwd, (x, w1[:2], w3[:2], True, None))  # a prefix of chains
    torch.library.opcheck(chain_swiglu_triton_fwd, (x.detach(), [w.detach() for w in w1],
                                                    [w.detach() for w in w3], False, None))
    rows = torch.tensor([2, 0, 1] * 5 + [1, 2], dtype=torch.int32, device=DEVICE)  # per-row scales
    torch.library.opcheck(chain_swiglu_triton_fwd, (x, w1, w3, True, rows))
    gates = torch.randn(17, 48, device=DEVICE)
    dh = torch.randn(17, 24, device=DEVICE)
    torch.library.opcheck(chain_swiglu_triton_bwd_gates, (dh, gates, [6, 12, 6]))


def test_compile_fullgraph_matches_eager(monkeypatch):
    monkeypatch.undo()  # compile with a plain torch.empty
    torch._dynamo.reset()
    chains = (1, 2, 1)
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    w1 = torch.randn(24, 40, device=DEVICE, requires_grad=True)
    w3 = torch.randn(24, 40, device=DEVICE, requires_grad=True)
    with ck.use_backend("triton"):
        fn = lambda x, w1, w3: ck.chain_swiglu(x, w1, w3, chains, chain=1)  # noqa: E731
        expected = fn(x, w1, w3)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w1, w3)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        g_exp = torch.autograd.grad(expected.sum(), [x, w1, w3])
        g_got = torch.autograd.grad(got.sum(), [x, w1, w3])
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "list"])
def test_reference_gradcheck_every_scale(dense):
    chains, hidden, dim = (1, 2, 1), 8, 12
    x, w1, w3 = _inputs(chains, hidden, dim, 3, dense, extra_in=1)
    leaves = _leaves(*(_cast(t, torch.float64) for t in (x, w1, w3)))
    n = 1 if dense else 3

    def fn(*ts):
        w1_, w3_ = ts[1:1 + n], ts[1 + n:]
        with ck.use_backend("reference"):
            return ck.chain_swiglu(ts[0], w1_[0] if dense else list(w1_), w3_[0] if dense else list(w3_),
                                   chains, chain)

    for chain in range(3):
        assert torch.autograd.gradcheck(fn, leaves)


def test_opcheck_reference_op():
    from colm_kernels.ops.chain_swiglu.api import chain_swiglu_reference

    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w1 = [t.requires_grad_(True) for t in _blocks(torch.randn(8, 12, dtype=torch.float64), (1, 2, 1))]
    w3 = [t.requires_grad_(True) for t in _blocks(torch.randn(8, 12, dtype=torch.float64), (1, 2, 1))]
    torch.library.opcheck(chain_swiglu_reference, (x, w1, w3, None))
    torch.library.opcheck(chain_swiglu_reference, (x, w1, w3, torch.tensor([0, 2, 1, 1, 2], dtype=torch.int32)))


# ----------------------------------------------------------------------------------------------
# ChainFeedForward on top of it
# ----------------------------------------------------------------------------------------------
def test_feed_forward_keys_and_formula():
    from colm_kernels.nn import ChainFeedForward

    chains, dim, hidden = (1, 2, 1), 40, 24
    ffn = ChainFeedForward(dim, hidden, chains).to(DEVICE)
    keys = sorted(f"{p}.mlps.{i}.weight" for p in ("w1", "w2", "w3") for i in range(3))
    assert sorted(ffn.state_dict()) == keys
    x = torch.randn(2, 9, dim, device=DEVICE)
    for chain in (None, 0, 1):
        with ck.use_backend("reference"):
            ref = ffn.w2(F.silu(ffn.w1(x, chain)) * ffn.w3(x, chain), chain)
            out_ref = ffn(x, chain)
        with ck.use_backend("triton"):
            out = ffn(x, chain)
        torch.testing.assert_close(out_ref, ref, rtol=0, atol=0)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # gradients reach every parameter through the fused op
    with ck.use_backend("triton"):
        ffn(x).square().sum().backward()
    grads = {k: p.grad for k, p in ffn.named_parameters()}
    with ck.use_backend("reference"):
        ffn.zero_grad(set_to_none=True)
        ffn(x).square().sum().backward()
    for k, p in ffn.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-5)
