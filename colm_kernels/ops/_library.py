"""Registering ops with ``torch.library``.

Every backend of every op is a custom op ``colm_kernels::<op>_<backend>`` with a fake (meta)
implementation and autograd, so it runs under ``torch.compile`` (opaque to the compiler) and
passes ``torch.library.opcheck``. The reference backend's gradients come from ``torch.func.vjp``
of the plain PyTorch forward, inside a second custom op ``<op>_reference_backward``, so the
compiler never traces through it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .autocast import autocast_off

NAMESPACE = "colm_kernels"

# Argument kinds, read off the schema: a tensor (or optional tensor), a tensor list, anything else.
TENSOR, TENSOR_LIST, VALUE = "tensor", "tensor_list", "value"


def argument_kinds(schema: str) -> list[str]:
    parsed = torch._C.parse_schema(f"{NAMESPACE}::_probe{schema}")
    kinds = []
    for arg in parsed.arguments:
        t = str(arg.type)
        if t in ("Tensor", "Optional[Tensor]", "Tensor?"):
            kinds.append(TENSOR)
        elif t in ("List[Tensor]", "Tensor[]"):
            kinds.append(TENSOR_LIST)
        else:
            kinds.append(VALUE)
    return kinds


def flat_tensors(args, kinds) -> list[Tensor]:
    out = []
    for a, kind in zip(args, kinds):
        if kind == TENSOR and a is not None:
            out.append(a)
        elif kind == TENSOR_LIST:
            out.extend(a)
    return out


def rebuild(args, kinds, flat: Sequence, *, keep_values: bool = True) -> list:
    """Put ``flat`` (one entry per tensor in ``args``) back into the argument structure; the
    non-tensor arguments stay (or become None, for a gradient structure)."""
    it = iter(flat)
    out = []
    for a, kind in zip(args, kinds):
        if kind == TENSOR and a is not None:
            out.append(next(it))
        elif kind == TENSOR_LIST:
            out.append([next(it) for _ in a])
        else:
            out.append(a if kind == VALUE and keep_values else None)
    return out


def _differentiable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def vjp(fn: Callable, args: Sequence, kinds: Sequence[str], grad: Tensor) -> list[Tensor]:
    """Gradients of ``fn(*args)`` w.r.t. every tensor in ``args`` (flattened), by
    ``torch.func.vjp`` (plain autograd is switched off inside a custom op's implementation);
    zeros for integer tensors and for tensors the output does not depend on."""
    flat = flat_tensors(args, kinds)
    diff_idx = [i for i, t in enumerate(flat) if _differentiable(t)]

    def call(*primals):
        leaves = list(flat)
        for i, p in zip(diff_idx, primals):
            leaves[i] = p
        return fn(*rebuild(args, kinds, leaves))

    _, pullback = torch.func.vjp(call, *[flat[i] for i in diff_idx])
    grads = dict(zip(diff_idx, pullback(grad)))
    return [grads[i].contiguous() if i in grads else torch.zeros_like(t) for i, t in enumerate(flat)]


def register_reference_op(name: str, fn: Callable, fake: Callable, schema: str):
    """Register ``colm_kernels::<name>`` running ``fn`` (plain PyTorch), with fake and autograd.

    ``schema`` is the forward's arguments and return, e.g.
    ``"(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor"``; the op returns one tensor.
    """
    qualname = f"{NAMESPACE}::{name}"
    kinds = argument_kinds(schema)
    args_schema = schema.split("->")[0].strip()

    def forward_impl(*args):
        with torch.no_grad(), autocast_off(flat_tensors(args, kinds)):  # inputs were cast by ops/autocast.py
            return fn(*args).contiguous()

    forward = torch.library.custom_op(qualname, forward_impl, mutates_args=(), schema=schema)
    forward.register_fake(fake)

    def backward_impl(grad, *args):
        with autocast_off([grad]):  # a backward run inside an autocast region must not recast
            return vjp(fn, args, kinds, grad)

    backward = torch.library.custom_op(
        qualname + "_backward",
        backward_impl,
        mutates_args=(),
        schema="(Tensor grad, " + args_schema[1:] + " -> Tensor[]",
    )

    @backward.register_fake
    def _(grad, *args):
        return [torch.empty_like(t) for t in flat_tensors(args, kinds)]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*flat_tensors(inputs, kinds))
        ctx.inputs = [a if kind == VALUE else (len(a) if kind == TENSOR_LIST else a is None)
                      for a, kind in zip(inputs, kinds)]

    def backward_fn(ctx, grad):
        # Rebuild the call: saved tensors back in place of the tensor arguments.
        saved = iter(ctx.saved_tensors)
        args = []
        for meta, kind in zip(ctx.inputs, kinds):
            if kind == TENSOR:
                args.append(None if meta else next(saved))
            elif kind == TENSOR_LIST:
                args.append([next(saved) for _ in range(meta)])
            else:
                args.append(meta)
        grads = backward(grad.contiguous(), *args)
        needs = []  # one flag per tensor in ``flat``
        for a, kind, n in zip(args, kinds, ctx.needs_input_grad):
            if kind == TENSOR and a is not None:
                needs.append(bool(n))
            elif kind == TENSOR_LIST:
                needs.extend(n if isinstance(n, (list, tuple)) else [n] * len(a))
        flat = flat_tensors(args, kinds)
        grads = [g if need and _differentiable(t) else None for g, need, t in zip(grads, needs, flat)]
        return tuple(rebuild(args, kinds, grads, keep_values=False))

    forward.register_autograd(backward_fn, setup_context=setup_context)
    return forward
