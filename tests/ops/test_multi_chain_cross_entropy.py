"""``multi_chain_cross_entropy`` on the ``triton`` backend (interpreter on CPU, real kernels on GPU):
the losses at every scale and the gradients of hidden and weight against the float64 reference
backend with the accuracy rule of ``numerics.py`` (kernel error <= 2x, gradients 3x, the error of
the reference backend in the same dtype + a floor); one chain, equal and unequal chains, prefix
widths (fewer scales), a vocabulary that is not a multiple of the block, N = 1 / 17 / 37, ignored
rows (a whole row block of them, every row), several backward chunks, opcheck and torch.compile
(with the options; the options themselves: ``test_multi_chain_cross_entropy_options.py``).
``torch.empty`` is NaN-filled here, so any output element a kernel leaves unwritten fails.
"""

import pytest
import torch

import colm_kernels as ck
from colm_kernels.backends import BackendError
from numerics import assert_within_eager_error

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs are NaN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong in the interpreter: a GPU-only case.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LAYOUTS = [  # (chains, D, V)
    ((1, 1), 32, 48),
    ((1, 2, 1), 40, 101),  # chain widths 10/20/10, V not a multiple of the vocab block
    ((4,), 24, 101),
]


def _dt(dtype):
    return str(dtype)[6:]


def _lid(layout):
    chains, d, v = layout
    return f"C{'.'.join(map(str, chains))}-D{d}-V{v}"



def _offsets(d, chains):
    out = [0]
    for c in chains:
        out.append(out[-1] + d * c // sum(chains))
    return out


def _inputs(chains, d, v, n, dtype, scale=None, ignore=()):
    """hidden (n, P_(scale+1)), weight (v, d), targets (n,) with ``ignore`` rows set to -100."""
    k = len(chains) - 1 if scale is None else scale
    width = _offsets(d, chains)[k + 1]
    hidden = torch.randn(n, width).to(DEVICE, dtype)
    weight = (torch.randn(v, d) / d ** 0.5 * 2).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,))
    targets[list(ignore)] = -100
    return hidden, weight, targets.to(DEVICE)


def _run(backend, hidden, weight, targets, chains, upstream, ignore_index=-100):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    with ck.use_backend(backend):
        loss = ck.multi_chain_cross_entropy(h, w, targets, chains, ignore_index)
    (loss * upstream.to(loss)).sum().backward()
    return loss.detach(), h.grad, w.grad


def _check_against_reference(hidden, weight, targets, chains, ignore_index=-100):
    ns = [i for i, p in enumerate(_offsets(weight.shape[1], chains)[1:]) if p == hidden.shape[1]][0] + 1
    upstream = torch.randn(ns, dtype=torch.float64).to(DEVICE)
    got = _run("triton", hidden, weight, targets, chains, upstream, ignore_index)
    eager = _run("reference", hidden, weight, targets, chains, upstream, ignore_index)
    ref = _run("reference", hidden.double(), weight.double(), targets, chains, upstream, ignore_index)
    assert got[0].dtype == torch.float32 and got[0].shape == (ns,)
    assert got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype
    for name, a, b, c, factor in zip(("loss", "d_hidden", "d_weight"), got, eager, ref, (2, 3, 3)):
        assert_within_eager_error(a, b, c, factor=factor, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("n", [1, 17, 37])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_lid)
def test_matches_reference(layout, n, dtype):
    chains, d, v = layout
    ignore = [0, 3] if n > 3 else []
    _check_against_reference(*_inputs(chains, d, v, n, dtype, ignore=ignore), chains)


@pytest.mark.parametrize("scale", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt)
def test_prefix_width_fewer_scales(scale, dtype):
    chains, d, v = (1, 2, 1), 40, 101
    hidden, weight, targets = _inputs(chains, d, v, 17, dtype, scale=scale, ignore=[5])
    _check_against_reference(hidden, weight, targets, chains)
    # the weight's columns past the prefix get an exact zero gradient
    _, _, dw = _run("triton", hidden, weight, targets, chains, torch.ones(scale + 1))
    assert (dw[:, _offsets(d, chains)[scale + 1]:] == 0).all()


def test_whole_row_block_ignored():
    # rows 0..31 ignored: whole 16-row blocks in the interpreter, part of a 64-row block on a GPU
    chains, d, v = (1, 2, 1), 40, 101
    _check_against_reference(*_inputs(chains, d, v, 37, torch.float32, ignore=range(32)), chains)


def test_other_ignore_index_and_strided_hidden():
    chains, d, v = (1, 1), 32, 48
    hidden, weight, targets = _inputs(chains, d, v, 17, torch.float32)
    targets[::3] = 7  # class 7 is the ignored one
    wide = torch.randn(17, 2 * d, device=DEVICE)
    wide[:, 1::2] = hidden
    _check_against_reference(wide[:, 1::2], weight, targets, chains, ignore_index=7)


def test_every_row_ignored_is_nan_like_reference():
    chains, d, v = (1, 1), 32, 48
    hidden, weight, targets = _inputs(chains, d, v, 5, torch.float32, ignore=range(5))
    with ck.use_backend("triton"):
        got = ck.multi_chain_cross_entropy(hidden, weight, targets, chains)
    with ck.use_backend("reference"):
        ref = ck.multi_chain_cross_entropy(hidden, weight, targets, chains)
    assert torch.isnan(got).all() and torch.isnan(ref).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_several_backward_chunks(monkeypatch, reduction):
    """Three row chunks of 16 (first, middle, last dW pass; per-row weights sliced per chunk)."""
    from colm_kernels.ops.multi_chain_cross_entropy import triton_bwd

    chains, d, v = (1, 2, 1), 40, 101
    monkeypatch.setattr(triton_bwd, "_WORKSPACE_BYTES", 3 * 16 * v * 4)  # fp32: 16 rows a chunk
    monkeypatch.setattr(triton_bwd, "_ACC_RATIO", 0)  # not grown for the dW accumulator
    hidden, weight, targets = _inputs(chains, d, v, 37, torch.float32, ignore=[2, 20])
    if reduction == "mean":
        _check_against_reference(hidden, weight, targets, chains)
        return
    upstream = torch.randn(3, 37, dtype=torch.float64).to(DEVICE)
    runs = []
    for backend, dt in (("triton", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        h = hidden.detach().to(dt).requires_grad_(True)
        w = weight.detach().to(dt).requires_grad_(True)
        with ck.use_backend(backend):
            loss = ck.multi_chain_cross_entropy(h, w, targets, chains, reduction="none",
                                                label_smoothing=0.1, softcap=3.0)
        (loss * upstream.to(loss)).sum().backward()
        runs.append((loss.detach(), h.grad, w.grad))
    for name, a, b, c in zip(("loss", "d_hidden", "d_weight"), *runs):
        assert_within_eager_error(a, b, c, factor=2 if name == "loss" else 3, name=name)


def test_leading_dims_and_frozen_weight():
    chains, d, v = (1, 2, 1), 40, 101
    hidden = torch.randn(2, 9, d, device=DEVICE, requires_grad=True)
    weight = torch.randn(v, d, device=DEVICE) / 4
    targets = torch.randint(0, v, (2, 9), device=DEVICE)
    with ck.use_backend("triton"):
        loss = ck.multi_chain_cross_entropy(hidden, weight, targets, chains)
    (dh,) = torch.autograd.grad(loss.sum(), [hidden])
    h64 = hidden.detach().double().requires_grad_(True)
    with ck.use_backend("reference"):
        ref = ck.multi_chain_cross_entropy(h64, weight.double(), targets, chains)
    (dh64,) = torch.autograd.grad(ref.sum(), [h64])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), dh64, rtol=1e-5, atol=1e-6)


def test_unsupported_inputs_raise_with_reasons():
    chains = (1, 1)
    hidden, weight, targets = _inputs(chains, 32, 48, 3, torch.float32)
    with ck.use_backend("triton"), pytest.raises(BackendError, match="float16/bfloat16/float32"):
        ck.multi_chain_cross_entropy(hidden.double(), weight.double(), targets, chains)
    if DEVICE == "cpu":
        with ck.use_backend("triton"), pytest.raises(BackendError, match="bfloat16"):
            ck.multi_chain_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, chains)


def test_opcheck():
    from colm_kernels.ops.multi_chain_cross_entropy.triton_backend import (
        multi_chain_cross_entropy_triton_bwd, multi_chain_cross_entropy_triton_fwd)

    options = ("none", 0.1, 0.02, 3.0)  # reduction, label_smoothing, lse_square_scale, softcap
    hidden, weight, targets = _inputs((1, 2, 1), 16, 33, 9, torch.float32, ignore=[1])
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(multi_chain_cross_entropy_triton_fwd, (hidden, weight, targets, [0, 4, 12, 16], -100, *options))
    torch.library.opcheck(multi_chain_cross_entropy_triton_fwd, (hidden[:, :12], weight, targets, [0, 4, 12], -100,
                                                                 "mean", 0.0, 0.0, 0.0))
    out, lse = multi_chain_cross_entropy_triton_fwd(hidden.detach(), weight.detach(), targets, [0, 4, 12, 16], -100,
                                                    *options)
    torch.library.opcheck(multi_chain_cross_entropy_triton_bwd,
                          (torch.randn_like(out), hidden.detach(), weight.detach(), targets, lse, [0, 4, 12, 16],
                           -100, *options, True, False))


def test_compile_fullgraph_matches_eager(monkeypatch):
    monkeypatch.undo()  # compile with a plain torch.empty
    torch._dynamo.reset()
    chains = (1, 2, 1)
    hidden, weight, targets = _inputs(chains, 40, 101, 17, torch.float32, ignore=[4])
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with ck.use_backend("triton"):
        def fn(h, w):
            loss, z = ck.multi_chain_cross_entropy(h, w, targets, chains, check_values=False, reduction="none",
                                                   label_smoothing=0.1, lse_square_scale=0.01, softcap=4.0,
                                                   return_z_loss=True)
            return loss.sum(1) + 2 * z.sum(1)

        expected = fn(hidden, weight)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(hidden, weight)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        g_exp = torch.autograd.grad(expected.sum(), [hidden, weight])
        g_got = torch.autograd.grad(got.sum(), [hidden, weight])
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()
