"""LoRA adapters (PEFT's) on ``ChainLinear``'s per-chain children ``mlps.{i}``.

PEFT replaces an adapted ``nn.Linear`` by a LoRA layer that keeps the original as ``base_layer`` and
adds ``lora_B(lora_A(dropout(x))) * scaling`` per active adapter. ``ChainLinear`` keeps one fused
block-lower-triangular ``chain_linear`` over the base weights and adds each adapted child's
low-rank term to that child's chain only. Child i reads ``x[..., :P_i]``, so its adapter keeps the
layer block-lower-triangular: output chain i still sees input chains 1..i only, and every scale
stays a sub-model after fine-tuning.

PEFT's layer is read by its attributes (``get_base_layer``, ``lora_A``/``lora_B``/``lora_dropout``/
``scaling`` per adapter, ``active_adapters``, ``merged``, ``disable_adapters``), so ``nn`` never
imports peft. Plain LoRA only: an adapter kind or LoRA variant this does not compute (DoRA, IA3,
...), or PEFT's per-request adapters (``adapter_names=``, forward hooks on the layer), raises
``NotImplementedError`` naming the child instead of being skipped silently.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def is_adapted(module: nn.Module) -> bool:
    """``module`` is a PEFT tuner layer wrapping a base layer."""
    return hasattr(module, "get_base_layer") and hasattr(module, "active_adapters")


def base_linear(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` under a PEFT layer (or ``module`` itself)."""
    return module.get_base_layer() if is_adapted(module) else module


def lora_delta(module: nn.Module, x: Tensor, name: str) -> Optional[Tensor]:
    """The sum of the active LoRA terms of the PEFT layer ``module`` for input ``x``, as PEFT's
    own ``lora.Linear.forward`` adds them to the base output, or None when none applies (no
    adapter, adapters disabled or merged into the base weight). ``name`` labels errors."""
    if not is_adapted(module):
        return None
    if not hasattr(module, "lora_A"):
        raise NotImplementedError(
            f"{name} is a {type(module).__name__} adapter layer: ChainLinear computes LoRA adapters "
            "(peft.LoraConfig) on its mlps children only")
    if module._forward_pre_hooks:
        raise NotImplementedError(
            f"{name} has forward hooks (PEFT's per-request adapters, adapter_names=...): ChainLinear "
            "adds its children's LoRA terms without calling them; use one set of active adapters")
    if module.disable_adapters:
        if module.merged:
            module.unmerge()  # what PEFT's own forward does
        return None
    if module.merged:
        return None
    delta = None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A.keys():
            continue
        if adapter in getattr(module, "lora_variant", {}):
            raise NotImplementedError(
                f"{name}: adapter {adapter!r} is a LoRA variant ({type(module.lora_variant[adapter]).__name__}, "
                "e.g. DoRA); ChainLinear computes plain LoRA only")
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        xa = x.to(lora_a.weight.dtype) if getattr(module, "cast_input_dtype_enabled", True) else x
        term = lora_b(lora_a(module.lora_dropout[adapter](xa))) * module.scaling[adapter]
        delta = term if delta is None else delta + term
    return delta


def add_chain_deltas(y: Tensor, mlps: nn.ModuleList, x: Tensor, k: int, in_prefixes, out_offsets,
                     seq_chains: Optional[Tensor]) -> Tensor:
    """``y``, the fused base output of chains ``0..k``, plus each adapted child's LoRA term on its
    own output columns (child i reads ``x[..., :in_prefixes[i]]``). ``seq_chains``: per-row
    scales; a row's terms of chains beyond its scale are dropped, so its outputs there stay exact
    zeros."""
    parts, changed = [], False
    for i in range(k + 1):
        part = y[..., out_offsets[i]: out_offsets[i + 1]]
        delta = lora_delta(mlps[i], x[..., : in_prefixes[i]], f"mlps[{i}]")
        if delta is not None:
            if seq_chains is not None:
                reach = (seq_chains >= i).reshape(*seq_chains.shape, *([1] * (x.dim() - seq_chains.dim())))
                delta = torch.where(reach, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
            part = (part + delta).to(y.dtype)
            changed = True
        parts.append(part)
    return torch.cat(parts, dim=-1) if changed else y
