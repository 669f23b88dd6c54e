"""The flash-attention accuracy rule, shared by the kernel tests.

A kernel's error against the float64 reference must be at most ``factor`` times the error of the
eager PyTorch (reference backend) computation in the same low dtype, plus a small absolute floor.
"""
import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - ref.detach().double().cpu()).abs().max()) if a.numel() else 0.0


def assert_within_eager_error(kernel: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor,
                              *, factor: float = 2.0, atol: float = 1e-5, name: str = "output") -> None:
    """``|kernel - ref64| <= factor * |eager - ref64| + atol`` (max norms)."""
    assert kernel.shape == ref64.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(kernel.detach().float()).all(), f"{name}: non-finite values"
    err, base = max_err(kernel, ref64), max_err(eager, ref64)
    assert err <= factor * base + atol, (
        f"{name}: kernel error {err:.3e} > {factor} x eager error {base:.3e} + {atol:.1e}")


def dtype_slack(dtype: torch.dtype) -> float:
    """The absolute floor added to the 2x-eager bound: one unit in the last place at magnitude 1 of
    ``dtype`` (fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3), so an fp32 kernel cannot hide a TF32-sized
    error behind a floor sized for half precision."""
    return torch.finfo(dtype).eps


def check_against_reference(name: str, fn, inputs, dtype: torch.dtype, device="cuda") -> None:
    """``fn(*inputs)`` on the triton backend in ``dtype`` against the float64 reference backend
    (output and every input gradient, one random cotangent), with eager PyTorch (the reference
    backend) in ``dtype`` as the error yardstick of ``assert_within_eager_error``. ``inputs`` are
    float64 CPU tensors."""
    import colm_kernels as ck

    def run(backend, dt):
        leaves = [t.detach().to(device, dt).requires_grad_() for t in inputs]
        with ck.use_backend(backend):
            out = fn(*leaves)
        out.backward(cot.to(out.dtype))
        return [out] + [t.grad for t in leaves]

    with ck.use_backend("reference"):
        shape = fn(*[t.to(device) for t in inputs]).shape
    cot = torch.randn(shape, dtype=torch.float64, device=device)
    ref, eager, ours = run("reference", torch.float64), run("reference", dtype), run("triton", dtype)
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        assert_within_eager_error(o, e, r, name=f"{name} {dtype} {'output' if i == 0 else f'grad {i - 1}'}")
