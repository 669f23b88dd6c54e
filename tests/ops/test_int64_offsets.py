"""Every kernel at a size whose element count passes 2**31 (GPU, where memory allows): the element
offsets of the far rows only fit in int64.

Each op runs once at full size on each kernel backend. The float64 reference cannot hold such
tensors, so it runs chunk by chunk along the batch dimension (rows, or sequences): the outputs and
input gradients of the first and the last chunk (the last lies past 2**31) are compared, and weight
gradients, sums over all rows, are accumulated over the chunks in float64. The yardstick of the
accuracy rule is eager PyTorch in the same dtype: full size where it fits, per chunk for attention.

The same code runs at a small size on every machine (``small``), which tests the chunking itself.
"""
import gc

import pytest
import torch

import colm_kernels as ck
from colm_kernels.backends import backend_unavailable_reason, registered
from numerics import assert_within_eager_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # interpreter: no bf16 tl.dot
BIG = 2**31
SIZES = ["small", "over-2^31"]


def _kernel_backends(op):
    return [b for b in ("triton", "cuda") if b in registered(op) and backend_unavailable_reason(b) is None]


def _need(size, gib):
    if size == "small":
        return
    if DEVICE != "cuda":
        pytest.skip("tensors of more than 2**31 elements: GPU only")
    gc.collect()
    torch.cuda.empty_cache()  # what this process cached for an earlier big test is free again
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs about {gib} GiB of free GPU memory, {free / 2**30:.0f} free")


def _rows(size, width, small):
    """Rows of ``width`` elements: past 2**31 elements in all at full size (an odd count)."""
    return small if size == "small" else (BIG // width + 2) | 1


def _randn(*shape, scale=1.0, dtype=None):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype or DTYPE)


def _cotangent(shape, seed):
    """Rows of the cotangent, rounded to the test dtype so every run sees the very same values."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, device=DEVICE, generator=gen).to(DTYPE)


def _run(backend, fn, batched, params, dtype, bounds, spans, *, mean, backward):
    """Run ``fn(*batched[a:b], *params)`` for each span (the whole batch, or each chunk).

    Returns the outputs and batched-input gradients of the first and last chunk (``bounds``), and
    the parameter gradients summed over the spans in float64. ``mean``: the output is a mean over
    the batch (cross-entropy), weighted by the span's share and summed instead.
    """
    n = bounds[-1]
    ends = [(bounds[0], bounds[1]), (bounds[-2], bounds[-1])]
    outs, in_grads, param_grads, total = {}, {}, None, 0.0
    for a, b in spans:
        inputs = [t[a:b] for t in batched] + params
        inputs = [t.detach().to(dtype if t.is_floating_point() else t.dtype)
                  .requires_grad_(backward and t.is_floating_point()) for t in inputs]
        with ck.use_backend(backend):
            out = fn(*inputs)
        if mean:
            out = out * ((b - a) / n)
            cot = _cotangent(out.shape, 0)
            total = total + out.detach().double()
        else:  # one block of cotangent rows per chunk, whatever the span
            cot = torch.cat([_cotangent((d - c,) + tuple(out.shape[1:]), c)
                             for c, d in zip(bounds[:-1], bounds[1:]) if a <= c and d <= b])
        if backward:
            (out * cot.to(out.dtype)).sum().backward()
            step = [t.grad.double() if t.grad is not None else None for t in inputs[len(batched):]]
            param_grads = step if param_grads is None else [
                None if p is None else p + q for p, q in zip(param_grads, step)]
        for c, d in ends:
            if a <= c and d <= b:
                # copies, so the full-size tensors are freed before the next run
                outs[(c, d)] = total if mean else out.detach()[c - a:d - a].clone()
                in_grads[(c, d)] = [t.grad[c - a:d - a].clone() if t.grad is not None else None
                                    for t in inputs[:len(batched)]]
    if mean:
        outs = {e: total for e in ends}
    return [outs[e] for e in ends], [in_grads[e] for e in ends], param_grads or []


def _check(name, fn, batched, params, *, backend, n_chunks=8, eager_full=True, mean=False, backward=True):
    """``fn(*batched, *params)`` on ``backend`` at full size against the chunked float64 reference,
    with eager PyTorch in the test dtype (full size, or chunked when ``eager_full`` is False) as the
    yardstick; ``batched`` tensors are split along dim 0, ``params`` are shared by every chunk."""
    n = batched[0].shape[0]
    bounds = sorted(set(torch.linspace(0, n, n_chunks + 1).round().long().tolist()))
    chunks = list(zip(bounds[:-1], bounds[1:]))
    whole = [(0, n)]
    kw = dict(mean=mean, backward=backward)
    ours = _run(backend, fn, batched, params, DTYPE, bounds, whole, **kw)
    ref = _run("reference", fn, batched, params, torch.float64, bounds, chunks, **kw)
    eager = _run("reference", fn, batched, params, DTYPE, bounds, whole if eager_full else chunks, **kw)
    where = ("first rows", "last rows")
    for i in range(2):
        assert_within_eager_error(ours[0][i], eager[0][i], ref[0][i], name=f"{name} {backend} output, {where[i]}")
        for j, (o, e, r) in enumerate(zip(ours[1][i], eager[1][i], ref[1][i])):
            if r is not None:
                assert_within_eager_error(o, e, r, name=f"{name} {backend} grad of input {j}, {where[i]}")
    for j, (o, e, r) in enumerate(zip(ours[2], eager[2], ref[2])):
        if r is not None:
            assert_within_eager_error(o, e, r, name=f"{name} {backend} grad of parameter {j}")


def _params(op):
    # xdist_group: with `pytest -n N --dist loadgroup` (benchmarks/gpu_run.sh) the full-size cases
    # run one after another in one worker, never side by side.
    return [pytest.param(size, backend, id=f"{size}-{backend}",
                         marks=[pytest.mark.xdist_group("over-2^31")] if size != "small" else [])
            for size in SIZES for backend in _kernel_backends(op)]


@pytest.mark.parametrize("size, backend", _params("chain_linear"))
def test_chain_linear(size, backend):
    _need(size, 40)
    d = 64 if size == "small" else 2048
    x = _randn(_rows(size, d, 37), d)
    w, b = _randn(d, d, scale=d ** -0.5), _randn(d)
    _check("chain_linear", lambda x, w, b: ck.chain_linear(x, w, b, (1, 1, 1, 1)), [x], [w, b], backend=backend)


@pytest.mark.parametrize("size, backend", _params("chain_swiglu"))
def test_chain_swiglu(size, backend):
    _need(size, 48)
    d = 64 if size == "small" else 2048
    x = _randn(_rows(size, 2 * d, 37), d)  # the gates (a | b) hold 2 x d values a row
    w1, w3 = _randn(d, d, scale=d ** -0.5), _randn(d, d, scale=d ** -0.5)
    _check("chain_swiglu", lambda x, w1, w3: ck.chain_swiglu(x, w1, w3, (1, 2, 1)), [x], [w1, w3], backend=backend)


@pytest.mark.parametrize("size, backend", _params("chain_rmsnorm"))
def test_chain_rmsnorm(size, backend):
    _need(size, 40)
    d = 64 if size == "small" else 2048
    x = _randn(_rows(size, d, 37), d)
    w = 1 + _randn(d, scale=0.1)
    _check("chain_rmsnorm", lambda x, w: ck.chain_rmsnorm(x, w, (1, 2, 1), 1e-5), [x], [w], backend=backend)


@pytest.mark.parametrize("size, backend", _params("multi_chain_cross_entropy"))
def test_multi_chain_cross_entropy(size, backend):
    _need(size, 60)
    d, v = (64, 64) if size == "small" else (2048, 2048)
    n = _rows(size, d, 37)
    hidden, weight = _randn(n, d), _randn(v, d, scale=d ** -0.5)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    _check("multi_chain_cross_entropy",
           lambda h, t, w: ck.multi_chain_cross_entropy(h, w, t, (1, 1)),
           [hidden, targets], [weight], backend=backend, n_chunks=16, mean=True)


@pytest.mark.parametrize("size, backend", _params("chain_attention"))
def test_chain_attention(size, backend):
    _need(size, 48)
    s, d = (17, 16) if size == "small" else (1024, 128)
    b = _rows(size, s * 4 * d, 3)  # q: (b, s, 4 heads, d)
    q, k, v = _randn(b, s, 4, d), _randn(b, s, 2, d), _randn(b, s, 2, d)
    _check("chain_attention", lambda q, k, v: ck.chain_attention(q, k, v, (2, 2), kv_sharing=True),
           [q, k, v], [], backend=backend, n_chunks=64, eager_full=False)


@pytest.mark.parametrize("size, backend", _params("chain_attention_decode"))
def test_chain_attention_decode(size, backend):
    _need(size, 24)
    b, d = (4, 16) if size == "small" else (64, 128)
    s_max = 37 if size == "small" else (BIG // (b * 2 * d)) + 64  # k/v caches: (b, s_max, 2, d)
    q, k, v = _randn(b, 1, 4, d), _randn(b, s_max, 2, d), _randn(b, s_max, 2, d)
    lengths = torch.randint(max(1, s_max - 1000), s_max + 1, (b,), device=DEVICE, dtype=torch.int32)
    lengths[-1] = s_max  # the last sequence reads the cache's last rows
    _check("chain_attention_decode",
           lambda q, k, v, n: ck.chain_attention_decode(q, k, v, n, (2, 2), kv_sharing=True),
           [q, k, v, lengths], [], backend=backend, n_chunks=8, eager_full=False, backward=False)
