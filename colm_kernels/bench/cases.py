"""What a benchmark row is, and how each pass of a differentiable op is timed.

A provider is a forward function over prepared inputs; the pass (``fwd``, ``bwd_x``, ``bwd_w``,
``fwd+bwd``) decides which inputs require grad, so every provider's backward computes exactly the
gradients the pass asks for (the same rule for our ops and their peers).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

PASSES = ("fwd", "bwd_x", "bwd_w", "fwd+bwd")


def chains_label(chains) -> str:
    """``(1, 1, 2)`` -> ``"C1.1.2"``: the chain layout in a row's shape label."""
    return "C" + ".".join(map(str, chains))


@dataclasses.dataclass
class Case:
    op: str                # e.g. "chain_linear"
    provider: str          # e.g. "ours-triton", "dense-cublas", "paper-naive"
    shape: str             # readable shape label
    pass_name: str         # one of PASSES, or "fwd" for ops without a backward row
    run: Callable[[], object]
    flops: float = 0.0     # useful FLOPs of one call (0: a bandwidth-bound op)
    bytes: float = 0.0     # bytes moved by one call, for GB/s
    peer: str | None = None  # provider this row's time is divided by ("ratio" column)
    note: str = ""
    # Time by CUDA-graph replay (timing.measure): short forward-only kernels whose launch
    # overhead would otherwise dominate.
    cudagraph: bool = False


def pass_runner(forward: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
                pass_name: str, *, grad_params_with_x: bool = False) -> Callable[[], object]:
    """A closure that runs one pass of ``forward(x, params)``.

    ``bwd_x``/``bwd_w`` run the forward once, outside the timed region, and time only
    ``autograd.grad`` of the input or of the parameters (the others do not require grad).
    ``grad_params_with_x``: ``bwd_x`` differentiates the params too (attention: dq, dk, dv).
    """
    if pass_name not in PASSES:
        raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")
    if pass_name == "fwd":
        x, params = x.detach(), [p.detach() for p in params]
        return lambda: forward(x, params)
    x = x.detach().requires_grad_(pass_name in ("bwd_x", "fwd+bwd"))
    params_grad = pass_name in ("bwd_w", "fwd+bwd") or (grad_params_with_x and pass_name == "bwd_x")
    params = [p.detach().requires_grad_(params_grad) for p in params]
    # Blocks of inactive chains (elastic rows) are unused: allow_unused below.
    wrt = ([x] if x.requires_grad else []) + [p for p in params if p.requires_grad]
    if pass_name == "fwd+bwd":
        def run():
            y = forward(x, params)
            return torch.autograd.grad(y, wrt, torch.ones_like(y), allow_unused=True)
        return run
    y = forward(x, params)
    dy = torch.randn_like(y)
    return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True, allow_unused=True)
