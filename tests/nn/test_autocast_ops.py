"""``torch.autocast`` on every public op (``colm_kernels/ops/autocast.py``).

Activations arrive in the autocast dtype and parameters stay float32, as in mixed-precision
training. For each op, under autocast:
- the output dtype is what PyTorch's dense counterpart returns under the same autocast
  (``F.linear``, SDPA, ``F.layer_norm``, ``F.linear`` + ``F.cross_entropy``);
- output and gradients are exactly those of the op called without autocast on the inputs cast by
  the op's policy (the autocast dtype for chain_linear / SwiGLU / attention, float32 for RMSNorm and
  the cross-entropy), and every gradient has its input's dtype (fp32 parameters: fp32 gradients);
- they are close to the float32 run;
- ``torch.compile(fullgraph=True)`` gives the same, and so does a backward run inside the region.
On CPU bf16 on the reference backend, fp16 on the Triton kernels (the interpreter: its bf16 dot is
wrong, see tests/conftest.py); on a GPU (skipped without one) CUDA bf16 autocast on every backend
of each op, where RMSNorm returns float32 as ``layer_norm`` does there."""
import pytest
import torch
import torch.nn.functional as F

import colm_kernels as ck
from colm_kernels import backends
from colm_kernels.backends import backend_unavailable_reason

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Max abs difference from the float32 run, for O(1) outputs and gradients.
TOL = {BF16: 6e-2, FP16: 8e-3}
CUDA = torch.cuda.is_available()


def _rand(*shape, scale=1.0):
    return torch.randn(*shape) * scale


# name: builder(device) -> (op, dense counterpart, inputs, differentiable); inputs[0] is the activation.
def _linear(device):
    chains = (1, 2, 1)
    x, w, b = _rand(2, 5, 32), _rand(48, 32, scale=32 ** -0.5), _rand(48)
    return (lambda x, w, b: ck.chain_linear(x, w, b, chains)), F.linear, [x, w, b], True


def _linear_blocks_elastic(device):
    chains = (1, 2, 1)
    x = _rand(2, 5, 32)
    blocks = [_rand(d, p, scale=p ** -0.5) for d, p in ((8, 8), (16, 24), (8, 32))]
    op = lambda x, *ws: ck.chain_linear(x, list(ws), None, chains, chain=1)  # noqa: E731
    dense = lambda x, *ws: F.linear(x[..., :24], ws[1])  # noqa: E731
    return op, dense, [x, *blocks], True


def _swiglu(device):
    chains = (2, 2)
    x, w1, w3 = _rand(2, 5, 32), _rand(48, 32, scale=32 ** -0.5), _rand(48, 32, scale=32 ** -0.5)
    op = lambda x, w1, w3: ck.chain_swiglu(x, w1, w3, chains)  # noqa: E731
    return op, (lambda x, w1, w3: F.linear(x, w1)), [x, w1, w3], True


def _attention(device):
    q, k, v = _rand(1, 6, 4, 16), _rand(1, 6, 2, 16), _rand(1, 6, 2, 16)
    dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    return (lambda q, k, v: ck.chain_attention(q, k, v, (2, 2))), dense, [q, k, v], True


def _decode(device):
    q, k, v = _rand(2, 1, 4, 16), _rand(2, 8, 2, 16), _rand(2, 8, 2, 16)
    lens = torch.tensor([5, 8], dtype=torch.int32, device=device)
    op = lambda q, k, v: ck.chain_attention_decode(q, k, v, lens, (2, 2))  # noqa: E731
    return op, (lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), [q, k, v], False


def _rmsnorm(device):
    x, g = _rand(2, 5, 32), 1 + 0.2 * _rand(32)
    return (lambda x, g: ck.chain_rmsnorm(x, g, (1, 2, 1))), (lambda x, g: F.layer_norm(x, (32,), g)), [x, g], True


def _cross_entropy(device):
    h, w, t = _rand(2, 5, 32), _rand(23, 32, scale=32 ** -0.5), torch.randint(0, 23, (2, 5), device=device)
    op = lambda h, w: ck.multi_chain_cross_entropy(h, w, t, (1, 2, 1))  # noqa: E731
    dense = lambda h, w: F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten())  # noqa: E731
    return op, dense, [h, w], True


CASES = {"chain_linear": _linear, "chain_linear-blocks-chain1": _linear_blocks_elastic, "chain_swiglu": _swiglu,
         "chain_attention": _attention, "chain_attention_decode": _decode, "chain_rmsnorm": _rmsnorm,
         "multi_chain_cross_entropy": _cross_entropy}
FP32_OPS = ("chain_rmsnorm", "multi_chain_cross_entropy")
# CPU: bf16 on the reference backend, fp16 on Triton (interpreter; the mixed case only, for time).
# CUDA: bf16 on every backend that implements the op (skipped without a GPU).
RUNS = ([(case, "cpu", "reference", BF16, act) for case in CASES for act in ("low", "fp32")]
        + [(case, "cpu", "triton", FP16, "low") for case in CASES]
        + [(case, "cuda", backend, BF16, "low") for case in CASES
           for backend in sorted(backends.registered(case.split("-")[0]))])


def _leaves(inputs, act_dtype, device, grad=True):
    """The activation in ``act_dtype``, the other inputs (parameters) float32, requiring grad."""
    return [t.to(device, act_dtype if i == 0 else FP32).requires_grad_(grad) for i, t in enumerate(inputs)]


def _run(op, leaves, cot, differentiable):
    out = op(*leaves)
    if not differentiable:
        return out, []
    return out, list(torch.autograd.grad(out, leaves, cot.to(out.dtype), allow_unused=True))


@pytest.mark.parametrize("case,device,backend,dtype,act", RUNS,
                         ids=[f"{c}-{d}-{b}-{str(t)[6:]}-act-{a}" for c, d, b, t, a in RUNS])
def test_op_under_autocast(case, device, backend, dtype, act):
    if device == "cuda" and not CUDA:
        pytest.skip("CUDA autocast needs a CUDA GPU")
    reason = backend_unavailable_reason(backend)
    if reason:
        pytest.skip(reason)
    op, dense, inputs, differentiable = CASES[case](device)
    act_dtype = dtype if act == "low" else FP32
    leaves = _leaves(inputs, act_dtype, device, differentiable)
    with torch.autocast(device, dtype=dtype):
        want_dtype = dense(*leaves).dtype
    with ck.use_backend("reference"):
        cot = torch.randn(op(*[t.detach().to(device, FP32) for t in inputs]).shape, device=device)
    with ck.use_backend(backend):
        with torch.autocast(device, dtype=dtype):
            out, grads = _run(op, leaves, cot, differentiable)
        # The op's policy spelled out: its inputs cast, the op run without autocast.
        target = FP32 if case in FP32_OPS else dtype
        manual = _leaves(inputs, act_dtype, device, differentiable)
        want = op(*[t.to(target) for t in manual])
        if case == "chain_rmsnorm" and device == "cpu":  # CPU autocast leaves layer_norm in its input's dtype
            want = want.to(act_dtype)
        want_grads = torch.autograd.grad(want, manual, cot.to(want.dtype), allow_unused=True) if differentiable else []
        out32, grads32 = _run(op, _leaves(inputs, FP32, device, differentiable), cot, differentiable)

    assert out.dtype == want_dtype, f"{case}: {out.dtype}, PyTorch's dense counterpart gives {want_dtype}"
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), out32, rtol=TOL[dtype], atol=TOL[dtype])
    for i, (g, wg, g32, leaf) in enumerate(zip(grads, want_grads, grads32, leaves)):
        if g is None:  # a block of a chain beyond ``chain``
            assert wg is None and g32 is None, f"{case}: gradient {i}"
            continue
        assert g.dtype == leaf.dtype, f"{case}: gradient {i} is {g.dtype} for a {leaf.dtype} input"
        torch.testing.assert_close(g, wg, rtol=0, atol=0)
        torch.testing.assert_close(g.float(), g32, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("case", [c for c in CASES if c != "chain_attention_decode"])
def test_compile_and_backward_inside_the_region(case):
    """``torch.compile(fullgraph=True)`` traces the casts (reference backend, bf16); a backward run
    inside the autocast region (where the reference op's backward must not recast) gives the same
    gradients as one outside it."""
    op, _, inputs, _ = CASES[case]("cpu")
    leaves = _leaves(inputs, BF16, "cpu")
    cot = torch.randn(op(*[t.detach().float() for t in inputs]).shape)
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    with ck.use_backend("reference"):
        with torch.autocast("cpu", dtype=BF16):
            out = op(*leaves)
            inside = torch.autograd.grad(out, leaves, cot.to(out.dtype), retain_graph=True, allow_unused=True)
            got = compiled(*leaves)
        outside = torch.autograd.grad(out, leaves, cot.to(out.dtype), allow_unused=True)
        got_grads = torch.autograd.grad(got, leaves, cot.to(got.dtype), allow_unused=True)
    torch.testing.assert_close(got, out, rtol=0, atol=0)
    assert sum(g is not None for g in outside) >= 2
    for a, b, c in zip(inside, outside, got_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_float64_and_other_devices_are_left_alone():
    """Autocast never casts float64 (as PyTorch's), and an autocast region of another device type
    leaves CPU tensors alone."""
    x, w = torch.randn(3, 16, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
    with ck.use_backend("reference"):
        plain = ck.chain_linear(x, w, None, (1, 1))
        with torch.autocast("cpu", dtype=BF16):
            assert ck.chain_linear(x, w, None, (1, 1)).dtype == torch.float64
            assert ck.chain_rmsnorm(x, torch.ones(16, dtype=torch.float64), (1, 1)).dtype == torch.float64
        with torch.autocast("cuda", dtype=BF16, enabled=torch.cuda.is_available()):
            assert torch.equal(ck.chain_linear(x, w, None, (1, 1)), plain)
