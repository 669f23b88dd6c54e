"""Every autotune config of ``multi_chain_cross_entropy``'s Triton kernels against float64 (GPU only;
the interpreter has one config). ``force_config(i)`` pins every autotuned kernel to the i-th config
its pruner keeps; forward and both gradients follow the accuracy rule of ``numerics.py``, at sizes
that span several tiles of the largest blocks and end mid-tile, with and without every option.
"""
import pytest
import torch

import colm_kernels as ck
from colm_kernels._triton.autotuning import force_config
from colm_kernels.ops.multi_chain_cross_entropy import triton_bwd, triton_fwd
from numerics import assert_within_eager_error

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="autotune configs are GPU-only (the interpreter has one)")

KERNELS = [triton_fwd._mcce_fwd_kernel, triton_bwd._mcce_bwd_dlogits_kernel, triton_bwd._mcce_bwd_dh_kernel,
           triton_bwd._mcce_bwd_dw_kernel]
N_CONFIGS = max(len(k.configs) for k in KERNELS)
CHAINS, D, V, N = (1, 2, 1), 384, 1000, 301  # chain widths 96/192/96
OPTIONS = [dict(), dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=20.0, reduction="none")]


def _run(backend, hidden, weight, targets, dtype, cot, options):
    h = hidden.detach().to(dtype).requires_grad_(True)
    w = weight.detach().to(dtype).requires_grad_(True)
    with ck.use_backend(backend):
        loss = ck.multi_chain_cross_entropy(h, w, targets, CHAINS, check_values=False, **options)
    (loss * cot.to(loss)).sum().backward()
    return loss, h.grad, w.grad


@requires_gpu
@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_every_config_matches_reference(index):
    gen = torch.Generator().manual_seed(index)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64).cuda()
    weight = (torch.randn(V, D, generator=gen, dtype=torch.float64) * D ** -0.5 * 2).cuda()
    targets = torch.randint(0, V, (N,), generator=gen).cuda()
    targets[::7] = -100
    with force_config(index):
        for options in OPTIONS:
            shape = (3, N) if options.get("reduction") == "none" else (3,)
            cot = torch.randn(shape, generator=gen, dtype=torch.float64).cuda()
            ref = _run("reference", hidden, weight, targets, torch.float64, cot, options)
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                got = _run("triton", hidden, weight, targets, dtype, cot, options)
                eager = _run("reference", hidden, weight, targets, dtype, cot, options)
                for name, a, b, c, f in zip(("loss", "d_hidden", "d_weight"), got, eager, ref, (2, 3, 3)):
                    assert_within_eager_error(a, b, c, factor=f, name=f"config {index} {dtype} {options} {name}")
        not_run = [k.base_fn.__name__ for k in KERNELS if not k.cache]
        assert not not_run, f"kernels never launched: {not_run}"


@requires_gpu
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "all-options"])
def test_default_bench_shape_bf16(options):
    """The bench case itself (N 4096, V 32000, D 2048, chains (4, 4, 4, 4), bf16) with the configs
    the suite runs, against float64 under the accuracy rule."""
    chains, d, v, n = (4, 4, 4, 4), 2048, 32000, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, device="cuda", generator=gen, dtype=torch.float64) * d ** -0.5 * 2
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::11] = -100
    shape = (4, n) if options.get("reduction") == "none" else (4,)
    cot = torch.randn(shape, device="cuda", generator=gen, dtype=torch.float64)

    def run(backend, dtype):
        h = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        with ck.use_backend(backend):
            loss = ck.multi_chain_cross_entropy(h, w, targets, chains, check_values=False, **options)
        (loss * cot.to(loss)).sum().backward()
        return loss.detach(), h.grad, w.grad

    ref = run("reference", torch.float64)
    eager = run("reference", torch.bfloat16)
    got = run("triton", torch.bfloat16)
    for name, a, b, c, f in zip(("loss", "d_hidden", "d_weight"), got, eager, ref, (2, 3, 3)):
        assert_within_eager_error(a, b, c, factor=f, name=name)
