"""How ``multi_chain_cross_entropy``'s triton backend works, checked on any machine:

* no PyTorch matmul runs in forward or backward (CPU profiler: every GEMM is a Triton ``tl.dot``);
* autograd saves hidden, weight, targets and the per-row, per-scale logsumexp, nothing more
  (``saved_tensors_hooks``), and the backward never runs the forward kernel again;
* the forward splits the vocabulary so 4096 tokens fill an H100's 132 SMs, and the split merge
  gives the single-split answer;
* results are bitwise reproducible;
* the fp16 gradient workspace is scaled, so small upstream gradients keep their precision.
"""
import pytest
import torch
import triton

import colm_kernels as ck
from colm_kernels.ops.multi_chain_cross_entropy import triton_fwd as K
from colm_kernels.ops.multi_chain_cross_entropy.triton_tiles import _H100_LOGITS
from numerics import assert_within_eager_error

pytestmark = pytest.mark.usefixtures("nan_empty")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHAINS, D, V, N = (1, 2, 1), 40, 101, 37
OPTIONS = dict(label_smoothing=0.1, lse_square_scale=0.01, softcap=4.0)
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::bmm", "aten::baddbmm",
           "aten::linear", "aten::mv", "aten::dot", "aten::einsum", "aten::tensordot"}


def _inputs(dtype=torch.float32):
    hidden = torch.randn(N, D).to(DEVICE, dtype).requires_grad_(True)
    weight = (torch.randn(V, D) / D ** 0.5 * 2).to(DEVICE, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,))
    targets[[1, 7]] = -100
    return hidden, weight, targets.to(DEVICE)


def _loss(backend, hidden, weight, targets, **kw):
    with ck.use_backend(backend):
        return ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS, check_values=False, **kw)


def _profiled_ops(backend):
    hidden, weight, targets = _inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss, z = _loss(backend, hidden, weight, targets, return_z_loss=True, **OPTIONS)
        (loss.sum() + z.sum()).backward()
    return {e.name for e in prof.events()}


def test_no_torch_matmul_in_forward_or_backward():
    assert _profiled_ops("reference") & MATMULS  # the profiler does see matmuls when they run
    ran = _profiled_ops("triton")
    assert "colm_kernels::multi_chain_cross_entropy_triton_bwd" in ran
    assert not ran & MATMULS, sorted(ran & MATMULS)


def test_saved_for_backward_is_inputs_and_lse():
    hidden, weight, targets = _inputs()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = _loss("triton", hidden, weight, targets, reduction="none", **OPTIONS)
    n_scales = len(CHAINS)
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    budget = hidden.numel() * 4 + weight.numel() * 4 + 16 * N * n_scales  # hidden + weight + O(N x NS)
    assert nbytes <= budget, [(tuple(t.shape), t.dtype) for t in saved]
    assert any(t.shape == (N, n_scales) and t.dtype == torch.float32 for t in saved)  # the lse
    loss.sum().backward()
    assert hidden.grad is not None and weight.grad is not None


def test_backward_never_runs_the_forward_kernel(monkeypatch):
    hidden, weight, targets = _inputs()
    launches = []
    real = K._mcce_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(K, "_mcce_fwd_kernel", Spy())
    loss = _loss("triton", hidden, weight, targets, **OPTIONS)
    assert len(launches) == 1
    loss.sum().backward()
    assert len(launches) == 1, "the backward launched the forward kernel again"


@pytest.mark.parametrize("n", [512, 4096])
def test_forward_grid_fills_an_h100(n):
    """At the default bench shape (V 32000) the (row block, vocab split) grid of the H100 configs
    has a program for at least 95% of 132 SMs, and the plan is no worse than one split."""
    unit = max(c[1] for c in _H100_LOGITS)
    row_unit = max(c[0] for c in _H100_LOGITS)
    splits, cols = K._vocab_splits(n, 32000, 132, unit, row_unit)
    assert cols % unit == 0 and triton.cdiv(32000, cols) == splits
    programs = triton.cdiv(n, row_unit) * splits
    assert programs >= 0.95 * 132, (splits, programs)


def test_split_vocabulary_merges_to_the_single_split_answer(monkeypatch):
    assert K._vocab_splits(N, V, 132)[0] > 1  # the interpreter's shapes split too
    hidden, weight, targets = _inputs()
    many = _loss("triton", hidden, weight, targets, reduction="none", **OPTIONS)
    monkeypatch.setattr(K, "_MAX_SPLITS", 1)
    one = _loss("triton", hidden, weight, targets, reduction="none", **OPTIONS)
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)


def test_bitwise_reproducible():
    hidden, weight, targets = _inputs()
    runs = []
    for _ in range(2):
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        loss = _loss("triton", h, w, targets, **OPTIONS)
        loss.sum().backward()
        runs.append((loss, h.grad, w.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_fp16_small_upstream_gradient():
    """A 1e-4 cotangent on a sum: unscaled, the gradient workspace (about 1e-4 x softmax, ~1e-6)
    would sit in fp16's subnormals and lose percents; scaled by its maximum it keeps fp16's
    relative precision. Small hidden, large head: logits of order 1, d_hidden ~3e-4 (normal)."""
    hidden = (0.05 * torch.randn(N, D)).to(DEVICE, torch.float16)
    weight = (20 * torch.randn(V, D) / D ** 0.5).to(DEVICE, torch.float16)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    cot = torch.tensor([1e-4, -2e-4, 1e-4], dtype=torch.float64, device=DEVICE)
    runs = []
    for backend, dt in (("triton", torch.float16), ("reference", torch.float16), ("reference", torch.float64)):
        h = hidden.detach().to(dt).requires_grad_(True)
        loss = _loss(backend, h, weight.to(dt), targets, reduction="sum")
        (loss * cot.to(loss)).sum().backward()
        runs.append(h.grad)
    assert runs[2].abs().max() > 1e-4  # normal fp16 numbers
    assert_within_eager_error(*runs, factor=3, atol=0, name="d_hidden")
