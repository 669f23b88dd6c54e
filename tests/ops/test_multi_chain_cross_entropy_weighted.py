"""``multi_chain_cross_entropy(..., weights=)``: the weighted total of the per-scale losses, and the
fused path it takes when hidden or weight needs a gradient (gradients computed in the forward, 3
logit-sized GEMMs, the backward scales them by the upstream scalar).

Against float64 references written in the option and row test modules (one ``F.cross_entropy``
per scale on materialised logits, weighted here), forward and backward with an upstream gradient
of 3.7, under the accuracy rule of ``numerics.py`` (fp32 and fp16 in the interpreter; bf16 on a
GPU). Also: the fused path is the one taken and saves only the two gradients; several row chunks;
weights that need a gradient, ``return_z_loss`` and no-grad calls take the per-scale path; bad
``weights`` name the argument; the chunk plan at a 128K vocabulary (the README's byte count).
``torch.empty`` is NaN-filled, so an unwritten output element fails.
"""
import pytest
import torch

import colm_kernels as ck
from ce_options import CHAINS, DEVICE, LOW, V
from numerics import assert_within_eager_error
from test_multi_chain_cross_entropy_options import ref64
from test_multi_chain_cross_entropy_rows import ref64 as rows_ref64

pytestmark = pytest.mark.usefixtures("nan_empty")

UPSTREAM = 3.7
D = 64  # chain widths 16/32/16: 16-byte aligned, so softcap stays on the fused path (``fusable``)
W3 = [0.5, -1.25, 2.0]
OPTIONS = [
    ("mean", dict()),
    ("sum", dict(reduction="sum")),
    ("all-mean", dict(label_smoothing=0.2, lse_square_scale=0.02, softcap=3.0)),
    ("all-sum", dict(label_smoothing=0.1, lse_square_scale=0.05, softcap=2.5, reduction="sum")),
]


def _inputs(n=29, d=D, v=V, width=None, dtype=torch.float64, ignore=(2, 11), seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width or d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) / d ** 0.5 * 2
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[list(ignore)] = -100
    return hidden, weight, targets


def _run(backend, hidden, weight, targets, dtype, chains=CHAINS, **kw):
    h = hidden.to(DEVICE, dtype, copy=True).requires_grad_(True)
    w = weight.to(DEVICE, dtype, copy=True).requires_grad_(True)
    with ck.use_backend(backend):
        loss = ck.multi_chain_cross_entropy(h, w, targets.to(DEVICE), chains, **kw)
    (loss * UPSTREAM).backward()
    return loss.detach(), h.grad, w.grad


def _ref(hidden, weight, targets, weights, chains=CHAINS, **options):
    """float64 weighted loss and gradients from the independent per-scale reference."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    losses, _ = ref64(h, w, targets, chains, **options)
    loss = (losses * torch.tensor(weights, dtype=torch.float64)).sum()
    (loss * UPSTREAM).backward()
    return loss.detach(), h.grad, w.grad


def _check(got, eager, ref):
    # the loss's floor: 8 fp32 ulps at its magnitude (a sum over rows and scales, added in another
    # order than eager PyTorch's, which may land within a fraction of an ulp by chance)
    floor = 8 * torch.finfo(torch.float32).eps * float(ref[0].abs()) if ref[0].isfinite() else 0.0
    for name, a, b, c, factor in zip(("loss", "d_hidden", "d_weight"), got, eager, ref, (2, 3, 3)):
        atol = max(1e-5, floor) if name == "loss" else 1e-5
        assert_within_eager_error(a, b, c.to(a.device), factor=factor, atol=atol, name=name)


@pytest.mark.parametrize("name,options", [OPTIONS[-1]], ids=[OPTIONS[-1][0]])
def test_reference_backend_float64(name, options):
    hidden, weight, targets = _inputs()
    got = _run("reference", hidden, weight, targets, torch.float64, weights=W3, **options)
    ref = _ref(hidden, weight, targets, W3, **options)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


# tier 1: every option at fp16; the other cases in the second tier (interpreter time)
FUSED_CASES = [pytest.param(name, options, dtype, id=f"{name}-{str(dtype)[6:]}",
                            marks=() if (name, dtype) == ("all-mean", torch.float16) else pytest.mark.static)
               for name, options in OPTIONS for dtype in LOW]


@pytest.mark.parametrize("name,options,dtype", FUSED_CASES)
def test_triton_fused_within_eager_error(name, options, dtype, monkeypatch):
    from colm_kernels.ops.multi_chain_cross_entropy import triton_fused

    calls = []
    real = triton_fused.mcce_fused
    monkeypatch.setattr(triton_fused, "mcce_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, targets = _inputs()
    got = _run("triton", hidden, weight, targets, dtype, weights=W3, **options)
    assert calls, "the fused path did not run"
    eager = _run("reference", hidden, weight, targets, dtype, weights=W3, **options)
    assert got[0].shape == () and got[1].dtype == dtype and got[2].dtype == dtype
    _check(got, eager, _ref(hidden, weight, targets, W3, **options))


@pytest.mark.static  # second tier (interpreter time)
@pytest.mark.parametrize("case", ["one-chain", "prefix-width", "tensor-weights", "ignore-index-7",
                                  "unaligned-softcap"])
def test_shapes_and_forms(case):
    """One chain (the unweighted single scale takes the fused path by itself), a prefix width
    (2 of 3 scales), weights as a tensor, another ignore_index; odd sizes throughout."""
    dtype = torch.float16
    chains, kw, weights = CHAINS, {}, W3
    hidden, weight, targets = _inputs(n=23, v=53)
    if case == "one-chain":
        chains, weights = (4,), [1.0]
        hidden, weight, targets = _inputs(n=23, d=24, v=53)
    elif case == "prefix-width":
        weights = [0.75, 1.5]
        hidden, weight, targets = _inputs(n=23, v=53, width=48)
    elif case == "tensor-weights":
        kw["weights"] = torch.tensor(W3)
    elif case == "unaligned-softcap":  # widths 10/20/10: the per-scale kernels inside the fused op
        hidden, weight, targets = _inputs(n=23, d=40, v=53)
        kw["softcap"] = 3.0
    else:
        targets[targets == -100] = 7
        targets[5] = 7
        kw["ignore_index"] = 7
    kw.setdefault("weights", weights)
    ref_kw = {k: kw[k] for k in ("ignore_index", "softcap") if k in kw}
    got = _run("triton", hidden, weight, targets, dtype, chains, **kw)
    eager = _run("reference", hidden, weight, targets, dtype, chains, **kw)
    _check(got, eager, _ref(hidden, weight, targets, weights, chains, **ref_kw))
    if case == "one-chain":  # no weights: a (1,) loss, same numbers, same path
        plain = _run("triton", hidden, weight, targets, dtype, chains)
        assert plain[0].shape == (1,)
        for a, b in zip(plain, got):
            torch.testing.assert_close(a.reshape(b.shape), b, rtol=0, atol=0)


@pytest.mark.static  # second tier (interpreter time)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_elastic_rows(reduction):
    """Per-row scales: each scale's loss over the rows that reach it, weighted."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) / D ** 0.5 * 2
    targets = torch.randint(0, V, (3, 7), generator=gen)
    targets[1, 2] = -100
    seq = torch.tensor([2, 0, 1])
    opts = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=0.01)
    runs = [_run(b, hidden, weight, targets, dt, seq_chains=seq, weights=W3, **opts)
            for b, dt in (("triton", torch.float32), ("reference", torch.float32))]
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    losses, _ = rows_ref64(h, w, targets, seq, **opts)
    loss = (losses * torch.tensor(W3, dtype=torch.float64)).sum()
    (loss * UPSTREAM).backward()
    _check(*runs, (loss.detach(), h.grad, w.grad))


@pytest.mark.static  # second tier (interpreter time)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_row_ignored(backend):
    hidden, weight, targets = _inputs(n=9, ignore=range(9))
    loss, dh, dw = _run(backend, hidden, weight, targets, torch.float32, weights=W3)
    assert torch.isnan(loss) and (dh == 0).all() and (dw == 0).all()
    loss, dh, dw = _run(backend, hidden, weight, targets, torch.float32, weights=W3, reduction="sum")
    assert loss == 0 and (dh == 0).all() and (dw == 0).all()


def test_fused_path_saves_only_the_gradients_and_runs_no_backward_kernel(monkeypatch):
    from colm_kernels.ops.multi_chain_cross_entropy import triton_kernels

    hidden, weight, targets = _inputs()
    h, w = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    saved = []
    monkeypatch.setattr(triton_kernels, "mcce_bwd", lambda *a, **k: pytest.fail("per-scale backward ran"))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with ck.use_backend("triton"):
            loss = ck.multi_chain_cross_entropy(h, w, targets, CHAINS, weights=W3)
    assert sorted(tuple(t.shape) for t in saved) == sorted([tuple(h.shape), tuple(w.shape)])
    assert all(t.dtype == torch.float32 for t in saved)  # one rounding, after the upstream scalar
    loss.backward()
    assert h.grad is not None and w.grad is not None


@pytest.mark.static  # second tier (interpreter time)
def test_backward_twice_is_pytorchs_error_and_retain_graph_adds_up():
    hidden, weight, targets = _inputs()
    h, w = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    with ck.use_backend("triton"):
        loss = ck.multi_chain_cross_entropy(h, w, targets, CHAINS, weights=W3) * UPSTREAM
    loss.backward(retain_graph=True)
    once = h.grad.clone(), w.grad.clone()
    loss.backward()  # the saved gradients are scaled out of place: the same contribution again
    torch.testing.assert_close(h.grad, 2 * once[0])
    torch.testing.assert_close(w.grad, 2 * once[1])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.static  # second tier (interpreter time)
def test_per_scale_paths_weighted_the_same(monkeypatch):
    """weights needing a gradient, return_z_loss and no-grad calls run the per-scale op; only a
    frozen head (hidden alone needs a gradient) stays fused. All give the fused path's numbers."""
    hidden, weight, targets = _inputs()
    opts = dict(lse_square_scale=0.02)
    fused = _run("triton", hidden, weight, targets, torch.float32, weights=W3, **opts)
    wt = torch.tensor(W3, requires_grad=True)
    h, w = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    with ck.use_backend("triton"):
        loss = ck.multi_chain_cross_entropy(h, w, targets, CHAINS, weights=wt, **opts)
        (loss * UPSTREAM).backward()
        per_scale = ck.multi_chain_cross_entropy(hidden.float(), weight.float(), targets, CHAINS, **opts)
        torch.testing.assert_close(wt.grad, UPSTREAM * per_scale)
        for a, b in zip((loss, h.grad, w.grad), fused):
            torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
        loss, z = ck.multi_chain_cross_entropy(hidden.float(), weight.float(), targets, CHAINS, weights=W3,
                                               return_z_loss=True, **opts)
        torch.testing.assert_close(loss, fused[0], rtol=1e-5, atol=1e-6)
        assert z.shape == () and z > 0
        with torch.no_grad():
            nograd = ck.multi_chain_cross_entropy(hidden.float(), weight.float(), targets, CHAINS, weights=W3, **opts)
        torch.testing.assert_close(nograd, fused[0], rtol=1e-5, atol=1e-6)
        h = hidden.float().requires_grad_(True)
        ck.multi_chain_cross_entropy(h, weight.float(), targets, CHAINS, weights=W3, **opts).mul(UPSTREAM).backward()
        torch.testing.assert_close(h.grad, fused[1], rtol=1e-5, atol=1e-6)


@pytest.mark.static  # second tier (interpreter time)
@pytest.mark.parametrize("rows", [False, True], ids=["rows", "elastic"])
def test_several_row_chunks(monkeypatch, rows):
    from colm_kernels.ops.multi_chain_cross_entropy import triton_bwd

    hidden, weight, targets = _inputs(n=45)
    kw = dict(weights=W3, label_smoothing=0.1)
    if rows:
        kw["seq_chains"] = torch.arange(45) % 3
    one = _run("triton", hidden, weight, targets, torch.float32, **kw)
    monkeypatch.setattr(triton_bwd, "_WORKSPACE_BYTES", 3 * 16 * V * 4)  # 16 rows a chunk
    monkeypatch.setattr(triton_bwd, "_ACC_RATIO", 0)
    assert triton_bwd.chunk_rows(45, 3, V, D, 4) == 16
    three = _run("triton", hidden, weight, targets, torch.float32, **kw)
    for a, b in zip(three, one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,error,match", [
    ([1.0, 2.0], ValueError, "one weight per scale"),
    ([1.0, float("nan"), 1.0], ValueError, "finite"),
    ([1.0, True, 1.0], TypeError, "real numbers"),
    ("abc", TypeError, "weights must be a sequence"),
    (2.0, TypeError, "weights must be a sequence"),
    (torch.ones(3, 1), TypeError, "1-D real tensor"),
    (torch.ones(3, dtype=torch.bool), TypeError, "1-D real tensor"),
    (torch.tensor([1.0, float("inf"), 1.0]), ValueError, "finite"),
    (torch.ones(4), ValueError, "one weight per scale"),
])
def test_bad_weights_name_the_argument(bad, error, match):
    hidden, weight, targets = _inputs(n=13)
    with pytest.raises(error, match=match) as info:
        ck.multi_chain_cross_entropy(hidden.float(), weight.float(), targets, CHAINS, weights=bad)
    assert "weights" in str(info.value)
    with pytest.raises(ValueError, match="weights needs a reduced loss"):
        ck.multi_chain_cross_entropy(hidden.float(), weight.float(), targets, CHAINS, weights=W3, reduction="none")


def test_chunk_plan_at_a_128k_vocabulary(monkeypatch):
    """The README's byte count (bf16, V 128256, D 2048, 16K tokens, 4 scales) from the launcher's
    own chunk plan at the H100 tiles (128-row blocks), without allocating anything."""
    from colm_kernels.ops.multi_chain_cross_entropy import triton_bwd, triton_fused

    monkeypatch.setattr(triton_bwd, "_row_unit", lambda: 128)
    n, v, p, ns = 16384, 128256, 2048, 4
    chunk = triton_bwd.chunk_rows(n, ns, v, p, triton_fused.WORKSPACE_BYTES)
    assert chunk == 1024  # 2 x the fp32 dW accumulator = 2.1 GB of fp32 logits workspace
    assert ns * chunk * v * 4 <= max(triton_bwd._WORKSPACE_BYTES, 2 * 4 * v * p)
    bytes_ = triton_fused.step_bytes(n, v, [0, 512, 1024, 1536, 2048], 2)
    assert bytes_["chunks"] == 16 and bytes_["chunk_rows"] == 1024
    assert bytes_["dw_accumulation"] == 4 * v * p * 31 == 32_570_867_712
    # the accumulator's traffic is at most one write of the fp32 logits over all rows
    assert bytes_["dw_accumulation"] <= ns * n * v * 4
    assert round(bytes_["total"] / 1e9, 1) == 169.3


@pytest.mark.static  # second tier (compile time)
def test_compile_fullgraph_matches_eager():
    hidden, weight, targets = _inputs()

    def step(h, w):
        return ck.multi_chain_cross_entropy(h, w, targets, CHAINS, weights=W3, check_values=False)

    with ck.use_backend("triton"):
        eager = _run("triton", hidden, weight, targets, torch.float32, weights=W3, check_values=False)
        h = hidden.float().requires_grad_(True)
        w = weight.float().requires_grad_(True)
        loss = torch.compile(step, backend="aot_eager", fullgraph=True)(h, w)
        (loss * UPSTREAM).backward()
    for a, b in zip((loss.detach(), h.grad, w.grad), eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.static  # second tier (opcheck runs the op many times in the interpreter)
def test_opcheck_fused_op():
    from colm_kernels.ops.multi_chain_cross_entropy.triton_backend import multi_chain_cross_entropy_triton_fused

    hidden, weight, targets = _inputs(n=13)
    args = (hidden.float().requires_grad_(), weight.float().requires_grad_(), targets, torch.tensor(W3), [0, 16, 48, 64], -100, "mean", 0.1, 0.01,
            3.0, None, True, True)
    torch.library.opcheck(multi_chain_cross_entropy_triton_fused, args)


def test_fusable_declines_softcap_on_unaligned_operands():
    from colm_kernels.ops.multi_chain_cross_entropy.triton_fused import fusable

    h, w = torch.empty(4, 64, dtype=torch.float16), torch.empty(11, 64, dtype=torch.float16)
    assert fusable(h, w, [0, 16, 48, 64], 3.0) and fusable(h, w, [0, 10, 30, 40], 0.0)
    assert not fusable(h, w, [0, 10, 30, 40], 3.0)  # tiles through registers: the store spilled
    assert not fusable(h[:, 1:], w, [0, 16, 48, 63], 3.0)
    assert not fusable(h, torch.empty(2**23, 1, dtype=torch.float16).expand(-1, 64), [0, 64], 0.0)
