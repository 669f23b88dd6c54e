"""``multi_chain_cross_entropy``'s options on every backend against a float64 reference written
here, independently of the package: one ``F.cross_entropy`` per scale on materialised logits
(``reduction``, ``label_smoothing`` as PyTorch defines them), the z-loss ``scale * lse^2`` reduced
like the loss and added to it, ``softcap * tanh(logits / softcap)`` before the softmax. Losses,
z-losses and the gradients of hidden and weight (from cotangents on both outputs).

The reference backend runs in float64 and must match to rounding; the triton backend runs in
float32 and float16 (bfloat16 on a GPU) under the accuracy rule of ``numerics.py`` (2x the eager
error of the reference backend in the same dtype for losses, 3x for gradients). Every target
ignored: ``mean`` is NaN with zero gradients (PyTorch), ``sum`` 0, ``none`` zeros.
"""
import pytest
import torch
import torch.nn.functional as F

import colm_kernels as ck
from ce_options import CHAINS, D, DEVICE, LOW, OPTIONS, V
from numerics import assert_within_eager_error

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs are NaN


def _offsets(d, chains):
    out = [0]
    for c in chains:
        out.append(out[-1] + d * c // sum(chains))
    return out


def ref64(hidden, weight, targets, chains, ignore_index=-100, *, reduction="mean", label_smoothing=0.0,
          lse_square_scale=0.0, softcap=None):
    """``(loss, z_loss)`` in float64 from plain PyTorch, one scale at a time."""
    width = hidden.shape[-1]
    prefixes = _offsets(weight.shape[1], chains)[1:]
    h = hidden.double().reshape(-1, width)
    t = targets.reshape(-1)
    keep = (t != ignore_index).double()
    losses, zs = [], []
    for p in prefixes[: prefixes.index(width) + 1]:
        logits = h[:, :p] @ weight.double()[:, :p].T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        ce = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing)
        z = lse_square_scale * torch.logsumexp(logits, dim=-1) ** 2 * keep
        z = {"mean": lambda: z.sum() / keep.sum(), "sum": z.sum, "none": lambda: z}[reduction]()
        losses.append(ce + z)
        zs.append(z)
    shape = (-1, *targets.shape) if reduction == "none" else (-1,)
    return torch.stack(losses).reshape(shape), torch.stack(zs).reshape(shape)


def _inputs(n, dtype, width=D, ignore=(0, 3)):
    hidden = torch.randn(n, width).to(DEVICE, dtype)
    weight = (torch.randn(V, D) / D ** 0.5 * 2).to(DEVICE, dtype)
    targets = torch.randint(0, V, (n,))
    targets[list(ignore)] = -100
    return hidden, weight, targets.to(DEVICE)


def _run(fn, hidden, weight, cot, cot_z):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss, z = fn(h, w)
    ((loss * cot.to(loss)).sum() + (z * cot_z.to(z)).sum()).backward()
    return loss.detach(), z.detach(), h.grad, w.grad


def _ours(backend, targets, options):
    def fn(h, w):
        with ck.use_backend(backend):
            return ck.multi_chain_cross_entropy(h, w, targets, CHAINS, return_z_loss=True, **options)
    return fn


def _cotangents(hidden, targets, options):
    ns = _offsets(D, CHAINS)[1:].index(hidden.shape[-1]) + 1
    shape = (ns, *targets.shape) if options.get("reduction") == "none" else (ns,)
    return torch.randn(shape, dtype=torch.float64).to(DEVICE), torch.randn(shape, dtype=torch.float64).to(DEVICE)


@pytest.mark.parametrize("name, options", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_reference_backend_float64(name, options):
    hidden, weight, targets = _inputs(17, torch.float64)
    cot, cot_z = _cotangents(hidden, targets, options)
    got = _run(_ours("reference", targets, options), hidden, weight, cot, cot_z)
    want = _run(lambda h, w: ref64(h, w, targets, CHAINS, **options), hidden.double(), weight.double(), cot, cot_z)
    for what, a, b in zip(("loss", "z_loss", "d_hidden", "d_weight"), got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape, what
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=what)


# Every option in float32; float16 (and bfloat16 on a GPU) on the plain and the combined ones.
CASES = [(name, options, torch.float32) for name, options in OPTIONS] + [
    (name, options, dtype) for name, options in OPTIONS if name in ("mean", "all-mean", "all-none")
    for dtype in LOW[1:]]


@pytest.mark.parametrize("name, options, dtype", CASES, ids=[f"{c[0]}-{str(c[2])[6:]}" for c in CASES])
def test_triton_backend_within_eager_error(name, options, dtype):
    hidden, weight, targets = _inputs(37, dtype)
    cot, cot_z = _cotangents(hidden, targets, options)
    got = _run(_ours("triton", targets, options), hidden, weight, cot, cot_z)
    eager = _run(_ours("reference", targets, options), hidden, weight, cot, cot_z)
    want = _run(lambda h, w: ref64(h, w, targets, CHAINS, **options), hidden.double(), weight.double(), cot, cot_z)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
    if options.get("reduction") == "none":
        assert got[0].shape == (3, 37)
        assert (got[0][:, [0, 3]] == 0).all() and (got[1][:, [0, 3]] == 0).all()  # ignored rows
    for what, a, b, c, factor in zip(("loss", "z_loss", "d_hidden", "d_weight"), got, eager, want, (2, 2, 3, 3)):
        assert_within_eager_error(a, b, c, factor=factor, name=f"{name} {what}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_options_at_a_prefix_width_and_leading_dims(backend):
    """Fewer scales (hidden of width P_2) with ``(2, 9)`` leading dims: ``none`` keeps them."""
    options = dict(label_smoothing=0.1, lse_square_scale=0.03, softcap=4.0, reduction="none")
    hidden, weight, targets = _inputs(18, torch.float32, width=30, ignore=(4,))
    hidden, targets = hidden.reshape(2, 9, 30), targets.reshape(2, 9)
    cot, cot_z = _cotangents(hidden, targets, options)
    assert cot.shape == (2, 2, 9)
    got = _run(_ours(backend, targets, options), hidden, weight, cot, cot_z)
    want = _run(lambda h, w: ref64(h, w, targets, CHAINS, **options), hidden.double(), weight.double(), cot, cot_z)
    for what, a, b in zip(("loss", "z_loss", "d_hidden", "d_weight"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=what)
    assert (got[3][:, 30:] == 0).all()  # head columns of the inactive chain


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_target_ignored(backend, reduction):
    """``mean``: NaN losses (0/0) and zero gradients, as ``F.cross_entropy``; ``sum``/``none``: 0."""
    options = dict(label_smoothing=0.1, lse_square_scale=0.01, softcap=5.0, reduction=reduction)
    hidden, weight, targets = _inputs(5, torch.float32, ignore=range(5))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with ck.use_backend(backend):
        loss, z = ck.multi_chain_cross_entropy(h, w, targets, CHAINS, return_z_loss=True, **options)
    expected, _ = ref64(hidden, weight, targets, CHAINS, **options)
    if reduction == "mean":
        assert torch.isnan(expected).all() and torch.isnan(loss).all() and torch.isnan(z).all()
    else:
        assert (expected == 0).all() and (loss == 0).all() and (z == 0).all()
    (loss.sum() + z.sum()).backward()  # cotangent 1 even where the loss is NaN
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("bad, error, match", [
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-30.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(return_z_loss=1), TypeError, "return_z_loss"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_bad_options_name_the_argument(bad, error, match):
    hidden, weight, targets = _inputs(3, torch.float32, ignore=())
    with pytest.raises(error, match=match):
        ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS, **bad)


def test_positional_signature_kept_and_options_keyword_only():
    hidden, weight, targets = _inputs(4, torch.float64, ignore=())
    targets[1] = 7
    a = ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS, 7)
    b = ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS, ignore_index=7, check_values=True)
    assert torch.equal(a, b) and a.shape == (3,)
    with pytest.raises(TypeError):
        ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS, -100, "sum")
