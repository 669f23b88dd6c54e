"""LoRA with PEFT on CoLM (``pip install -e ".[hf]"`` installs peft).

``ChainLinear`` honours PEFT's LoRA layers on its ``mlps.{i}`` children (``colm_kernels.nn.adapters``):
child i reads ``x[..., :P_i]``, so its adapter keeps the layer block-lower-triangular and every
scale a sub-model after fine-tuning. ``target_modules="all-linear"`` (every ``mlps.{i}``, CoLM-Air's
plain ``wk``/``wv``, never the output head) needs nothing from here.

Names that match a ``ChainLinear`` itself (``target_modules=["wq", "wo"]``) need PEFT's custom-module
API, since PEFT only adapts the layer types it knows: ``register_chain_lora(config)`` maps
``ChainLinear`` to ``chain_linear_lora``, which gives each of its children PEFT's own LoRA layer
(the same adapters ``"all-linear"`` gives them, so merging, saving and loading are PEFT's). PEFT
keeps custom modules out of ``adapter_config.json``: register the config again to load such an
adapter (``PeftModel.from_pretrained(model, path, config=register_chain_lora(LoraConfig.from_pretrained(path)))``).
"""
from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer, dispatch_default
from torch import nn

from ..nn import ChainLinear


def chain_linear_lora(target: ChainLinear, adapter_name: str, config: LoraConfig, **kwargs) -> nn.Module:
    """PEFT's custom-module hook for a targeted ``ChainLinear``: a LoRA layer (PEFT's
    ``lora.Linear``, rank ``config.r``) on each ``mlps.{i}`` child, or one more adapter on children
    that already have one. Returns ``target`` itself, which PEFT puts back in place."""
    if not isinstance(target, ChainLinear):
        raise TypeError(f"chain_linear_lora adapts a ChainLinear, got {type(target).__name__}")
    key = kwargs.pop("target_name", None) or "ChainLinear"
    for i, child in enumerate(target.mlps):
        name = f"{key}.mlps.{i}"
        if isinstance(child, LoraLayer):
            child.update_layer(adapter_name, kwargs["r"], lora_alpha=kwargs["lora_alpha"], config=config,
                               target_name=name)
        else:
            target.mlps[i] = dispatch_default(child, adapter_name, config=config, target_name=name, **kwargs)
    return target


def register_chain_lora(config: LoraConfig) -> LoraConfig:
    """Let ``config``'s ``target_modules`` name ``ChainLinear`` layers (``wq``, ``w1``, ...): each
    gets per-chain LoRA adapters on its ``mlps`` children. Returns ``config``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({ChainLinear: chain_linear_lora})
    return config


__all__ = ["chain_linear_lora", "register_chain_lora"]
