"""``multi_chain_cross_entropy`` inputs that must give the same outcome on every backend:

* an out-of-range target with ``check_values=False`` is never read past the vocabulary and never
  gives a plausible number: NaN losses at every scale (every scale includes every row), NaN
  gradient rows for its row (and a NaN weight gradient), on the reference backend too (no
  ``IndexError``); with ``check_values=True`` a ``ValueError`` naming ``targets``;
* a weight or hidden whose last dim is not unit-stride (a ``W.T`` head, ``hidden[:, ::2]``) gives
  what the contiguous tensors give, with gradients back to the views;
* the models call the op without the host-syncing value check unless asked.
"""
import pytest
import torch

import colm_kernels as ck
from colm_kernels.models import CoLM, CoLMConfig
from numerics import assert_within_eager_error

pytestmark = pytest.mark.usefixtures("nan_empty")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]
CHAINS, D, V, N = (1, 2, 1), 40, 48, 17
BAD_ROWS = [5, 9]


def _inputs(dtype=torch.float32):
    hidden = torch.randn(N, D).to(DEVICE, dtype)
    weight = (torch.randn(V, D) / D ** 0.5 * 2).to(DEVICE, dtype)
    targets = torch.randint(0, V, (N,))
    targets[2] = -100
    return hidden, weight, targets.to(DEVICE)


def _loss_and_grads(backend, hidden, weight, targets, cot=None, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    with ck.use_backend(backend):
        loss = ck.multi_chain_cross_entropy(h, w, targets, CHAINS, **kw)
    (loss * (1.0 if cot is None else cot)).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_target_gives_nan(backend, reduction):
    hidden, weight, targets = _inputs()
    bad = targets.clone()
    bad[BAD_ROWS[0]] = V  # one past the vocabulary
    bad[BAD_ROWS[1]] = -3  # negative, not ignore_index
    cot = torch.randn(3, N).to(DEVICE) if reduction == "none" else None
    loss, dh, dw = _loss_and_grads(backend, hidden, weight, bad, cot, reduction=reduction,
                                   check_values=False, label_smoothing=0.1)
    good = [i for i in range(N) if i not in BAD_ROWS]
    if reduction == "none":
        assert torch.isnan(loss[:, BAD_ROWS]).all()
        # The other rows are the losses those rows have without the bad ones.
        ok = targets.clone()
        ok[BAD_ROWS] = -100
        ref, ref_dh, _ = _loss_and_grads(backend, hidden, weight, ok, cot, reduction=reduction,
                                         label_smoothing=0.1)
        torch.testing.assert_close(loss[:, good], ref[:, good])
        torch.testing.assert_close(dh[good], ref_dh[good])
    else:
        assert torch.isnan(loss).all()  # every scale includes the bad rows
        assert torch.isfinite(dh[good]).all()
    assert torch.isnan(dh[BAD_ROWS]).all()
    assert torch.isnan(dw).all()  # every vocabulary row sums over the NaN rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_checked_out_of_range_target_raises(backend):
    hidden, weight, targets = _inputs()
    targets[4] = V
    with ck.use_backend(backend), pytest.raises(ValueError, match="targets"):
        ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight_and_hidden(backend, dtype):
    """A ``(D, V)`` head passed as its ``.T`` view and ``hidden[:, ::2]``: the same losses and
    gradients (to the views) as contiguous copies, within the accuracy rule against float64."""
    hidden, weight, targets = _inputs(dtype)
    head_dv = weight.T.contiguous()  # stored (D, V), as a model that keeps the head transposed
    wide = torch.zeros(N, 2 * D, device=DEVICE, dtype=dtype)
    wide[:, ::2] = hidden
    h_view, w_view = wide[:, ::2], head_dv.T
    assert h_view.stride(-1) == 2 and w_view.stride(-1) == V
    got = _loss_and_grads(backend, h_view, w_view, targets, label_smoothing=0.1, softcap=4.0)
    plain = _loss_and_grads(backend, hidden, weight, targets, label_smoothing=0.1, softcap=4.0)
    for a, b in zip(got, plain):
        assert torch.equal(a, b)  # the API copies: the very same kernels run on the same values
    eager = _loss_and_grads("reference", hidden, weight, targets, label_smoothing=0.1, softcap=4.0)
    ref = _loss_and_grads("reference", hidden.double(), weight.double(), targets, label_smoothing=0.1,
                          softcap=4.0)
    for name, a, b, c, f in zip(("loss", "d_hidden", "d_weight"), got, eager, ref, (2, 3, 3)):
        assert_within_eager_error(a, b, c, factor=f, name=name)


def test_triton_backend_declines_strided_inputs_with_reasons():
    """Called directly (past the API's copy), the backend names the layout it needs."""
    from colm_kernels.ops.multi_chain_cross_entropy.triton_backend import not_supported_reasons

    hidden, weight, targets = _inputs()
    reasons = not_supported_reasons(hidden[:, ::2], weight.T.contiguous().T, targets, [0, 10, 20], -100)
    assert any("weight" in r and "unit-stride" in r for r in reasons)
    assert any("hidden" in r and "unit-stride" in r for r in reasons)
    assert not not_supported_reasons(hidden, weight, targets, [0, 10, 30, 40], -100)


def _model():
    cfg = CoLMConfig(dim=16, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=11, chains=(1, 2, 1),
                     ffn_hidden_dim=16)
    return CoLM(cfg).to(torch.float64)


def test_model_loss_skips_the_value_check_unless_asked(monkeypatch):
    import colm_kernels.models.colm as colm_module

    model = _model()
    tokens = torch.randint(0, 11, (2, 5))
    targets = tokens.clone()
    targets[1, 2] = 11  # past the vocabulary
    seen = []
    real = colm_module.multi_chain_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("check_values", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(colm_module, "multi_chain_cross_entropy", spy)
    losses = model.multi_chain_loss(tokens, targets)  # no host sync: the bad target makes NaN
    assert seen == [False] and losses.shape == (3,) and torch.isnan(losses).all()
    with pytest.raises(ValueError, match="targets"):
        model.multi_chain_loss(tokens, targets, check_values=True)
    assert seen == [False, True]
    good = model.multi_chain_loss(tokens, tokens)
    assert torch.isfinite(good).all()
