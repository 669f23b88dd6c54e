"""What a new user hits first: errors that blame the argument that is wrong (with what was
expected), subpackages reachable as attributes, and valid inputs in layouts some kernels cannot read
(strided, empty) giving every backend the reference's answer."""
import re
import subprocess
import sys

import pytest
import torch

import colm_kernels as ck
from colm_kernels.models import CoLM, CoLMConfig
from colm_kernels.reference import CoLM as ReferenceCoLM
from utils import F64

BACKENDS = ["reference", "triton"]


# -- errors name the wrong argument -------------------------------------------------------------
def test_rmsnorm_gain_too_short_blames_weight_with_expected_length():
    x, gain = torch.randn(3, 128, dtype=F64), torch.ones(64, dtype=F64)
    with pytest.raises(ValueError, match=r"weight\.shape\[0\]=64 .*length 128"):
        ck.chain_rmsnorm(x, gain, (1, 1))


def test_rmsnorm_width_not_a_prefix_names_the_gain_length():
    with pytest.raises(ValueError, match=r"x\.shape\[-1\]=50 is not a prefix width of weight\.shape\[0\]=64"):
        ck.chain_rmsnorm(torch.randn(3, 50, dtype=F64), torch.ones(64, dtype=F64), (1, 1))


@pytest.mark.parametrize("shapes,bad,expected", [
    # the last block is wrong: it must not redefine in_features for the others
    ([(4, 8), (4, 8)], 1, (4, 16)),
    ([(4, 8), (4, 16), (3, 3)], 2, (4, 24)),
    # the first block is wrong, the two others agree
    ([(2, 8), (4, 16), (4, 24)], 0, (4, 8)),
], ids=["last-block", "odd-block", "first-block"])
def test_chain_linear_blocks_error_names_expected_block_shapes(shapes, bad, expected):
    blocks = [torch.randn(*s, dtype=F64) for s in shapes]
    x = torch.randn(3, 8 * len(shapes), dtype=F64)
    pattern = re.escape(f"weight[{bad}] must be {expected}, got {shapes[bad]}")
    with pytest.raises(ValueError, match=pattern) as info:
        ck.chain_linear(x, blocks, None, (1,) * len(shapes))
    for i, s in enumerate(shapes):  # only the wrong block is blamed
        if i != bad:
            assert f"weight[{i}] must be" not in str(info.value)


def test_chain_linear_blocks_with_no_consistent_layout_explain_the_rule():
    blocks = [torch.randn(1, 1, dtype=F64), torch.randn(1, 1, dtype=F64)]  # fit no (out, in) of (2, 1)
    with pytest.raises(ValueError, match=r"\(d_i_out, P_i_in\) = \(out \* c_i / S"):
        ck.chain_linear(torch.randn(2, 4, dtype=F64), blocks, None, (2, 1))


def _tiny_config():
    return CoLMConfig(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=11, chains=(2, 2),
                      ffn_hidden_dim=32)


@pytest.mark.parametrize("model_cls", [CoLM, ReferenceCoLM], ids=["models", "reference"])
@pytest.mark.parametrize("bad", [11, -1, 1000])
def test_token_out_of_vocabulary_is_a_value_error_naming_tokens(model_cls, bad):
    model = model_cls(_tiny_config()).to(F64)
    tokens = torch.tensor([[1, 2, bad, 3]])
    lo, hi = min(bad, 1), max(bad, 3)
    with pytest.raises(ValueError, match=rf"tokens values must be in \[0, 10\].*got values in \[{lo}, {hi}\]"):
        model(tokens)
    with pytest.raises(ValueError, match=r"prompt values must be in \[0, 10\]"):
        model.generate(tokens, 2)


def test_multi_chain_loss_checks_token_ids():
    model = CoLM(_tiny_config()).to(F64)
    with pytest.raises(ValueError, match=r"tokens values must be in \[0, 10\]"):
        model.multi_chain_loss(torch.tensor([[1, 11]]), torch.tensor([[1, 2]]))


# -- subpackages as attributes --------------------------------------------------------------------
def test_subpackages_are_attributes_and_imported_lazily():
    code = ("import sys, colm_kernels as ck\n"
            "assert 'colm_kernels.nn' not in sys.modules and 'colm_kernels.models' not in sys.modules\n"
            "assert ck.nn.ChainLinear.__name__ == 'ChainLinear'\n"
            "assert ck.models.CoLM.__name__ == 'CoLM' and ck.reference.CoLM.__name__ == 'CoLM'\n"
            "assert {'nn', 'models', 'reference'} <= set(dir(ck))\n"
            "try:\n    ck.no_such_thing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- valid layouts every backend takes --------------------------------------------------------------
def _on(backend, fn):
    with ck.use_backend(backend):
        return fn()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_linear_strided_bias(backend):
    x, w = torch.randn(5, 8), torch.randn(8, 8)
    bias = torch.randn(16)[::2]  # stride 2
    expected = _on("reference", lambda: ck.chain_linear(x.double(), w.double(), bias.double(), (1, 2, 1)))
    y = _on(backend, lambda: ck.chain_linear(x, w, bias, (1, 2, 1)))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["chain_linear", "chain_swiglu"])
def test_empty_x_with_strided_last_dim(backend, op):
    x = torch.randn(0, 16)[:, ::2]  # zero elements: PyTorch keeps the stride 2 through .contiguous()
    assert x.stride(-1) == 2
    w = torch.randn(8, 8)
    if op == "chain_linear":
        y = _on(backend, lambda: ck.chain_linear(x, w, None, (1, 2, 1)))
    else:
        y = _on(backend, lambda: ck.chain_swiglu(x, w, w, (1, 2, 1)))
    assert y.shape == (0, 8)
    # and the backward of an empty batch: zero weight gradient
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    fn = ck.chain_linear if op == "chain_linear" else (lambda x, w, b, c: ck.chain_swiglu(x, w, w, c))
    out = _on(backend, lambda: fn(xg, wg, None, (1, 2, 1)))
    out.sum().backward()
    assert wg.grad is not None and torch.count_nonzero(wg.grad) == 0
