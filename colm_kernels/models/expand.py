"""Chain expansion and chain tuning (spec section 5).

Expansion appends chains to a trained model: old parameters are copied into the first chains'
blocks, new blocks are freshly initialised, and the output head's new columns are zero, so the
expanded model's full-scale logits equal the original model's at initialisation. Tuning freezes the
first chains and trains the rest.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor, nn

from ..chains import Chains
from ..nn import ChainLinear, ChainRMSNorm
from .colm import CoLM
from .config import CoLMConfig

_CHAIN_BLOCK = re.compile(r"^(?P<module>.+)\.mlps\.(?P<chain>\d+)\.(?P<param>weight|bias)$")


def _scaled(value: int, new_total: int, old_total: int, name: str) -> int:
    if (value * new_total) % old_total:
        raise ValueError(
            f"{name}={value} cannot grow from sum(chains)={old_total} to {new_total} "
            f"exactly ({value} * {new_total} / {old_total} is not an integer)"
        )
    return value * new_total // old_total


def expanded_config(config: CoLMConfig, new_chains) -> CoLMConfig:
    """The config after appending ``new_chains``: widths grow in proportion, head dim unchanged."""
    new = Chains(new_chains, name="new_chains")
    old_total, total = config.chain_config.total, config.chain_config.total + new.total
    return config.replace(
        chains=tuple(config.chains) + new.sizes,
        dim=_scaled(config.dim, total, old_total, "dim"),
        n_heads=total,
        ffn_hidden_dim=_scaled(config.ffn_hidden_dim, total, old_total, "ffn_hidden_dim"),
        n_kv_heads=config.n_kv_heads if config.kv_sharing
        else _scaled(config.n_kv_heads, total, old_total, "n_kv_heads"),
    )


def expand_chains(state_dict: Mapping[str, Tensor], config: CoLMConfig, new_chains,
                  *, generator: torch.Generator | None = None):
    """Append ``new_chains`` to a trained model; returns ``(new_state_dict, new_config)``.

    ``state_dict`` is a CoLM state dict for ``config``; a dense LLaMA (one chain, plain
    ``wq.weight`` keys instead of ``wq.mlps.0.weight``) is accepted too.
    """
    new_config = expanded_config(config, new_chains)
    if generator is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            fresh = CoLM(new_config)
    else:
        fresh = CoLM(new_config)
    old = dict(state_dict)
    like = old.get("tok_embeddings.weight")
    if like is not None:  # keep the checkpoint's dtype and device: copies must be exact
        fresh = fresh.to(dtype=like.dtype, device=like.device)
    new_state = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
    # A dense model is one chain: its ``X.weight`` is ``X.mlps.0.weight``.
    for key in list(old):
        candidate = key.rsplit(".", 1)
        chain_key = f"{candidate[0]}.mlps.0.{candidate[1]}" if len(candidate) == 2 else None
        if key not in new_state and chain_key in new_state:
            old[chain_key] = old.pop(key)
    unknown = sorted(set(old) - set(new_state))
    if unknown:
        raise ValueError(f"state_dict has keys that a CoLM for this config lacks: {unknown[:5]}")
    missing = sorted(set(new_state) - set(old) - {
        k for k in new_state
        if (m := _CHAIN_BLOCK.match(k)) and int(m.group("chain")) >= config.n_chains
    })
    if missing:
        raise ValueError(f"state_dict lacks keys of the original model: {missing[:5]}")
    d_old = config.dim
    for key, value in old.items():
        target = new_state[key]
        if key == "output.weight":
            target.zero_()  # new chains add nothing to the logits at initialisation
            target[:, :d_old] = value
        elif key == "tok_embeddings.weight":
            target[:, :d_old] = value
        elif key.endswith("norm.weight"):
            target[:d_old] = value
        elif tuple(value.shape) == tuple(target.shape):
            target.copy_(value)  # a chain block (same shape by construction) or Air's wk / wv
        else:
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
    return new_state, new_config


def freeze_chains(model: nn.Module, k: int) -> list:
    """Chain tuning: freeze chains ``0..k-1`` of ``model`` (train only chains ``k..n-1``).

    Per-chain blocks (every ``ChainLinear``'s ``mlps.{i}``, and CoLM-Air's ``wk``/``wv``, which
    belong to chain 1) get ``requires_grad=False``, so their weight gradients are never computed.
    Tensors shared by all chains (embedding, norms, output head) keep ``requires_grad`` but a hook
    zeroes their frozen columns' gradient; returns those hook handles. Use ``weight_decay=0`` for
    them (decoupled weight decay would still move the frozen columns).
    """
    chains = model.chains if hasattr(model, "chains") else None
    if chains is None:
        raise TypeError("freeze_chains expects a CoLM model (with a .chains attribute)")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= chains.n:
        raise ValueError(f"k must be an int in [0, {chains.n}] (number of chains to freeze), got {k!r}")
    handles = []
    if k == 0:
        return handles
    for module in model.modules():
        if isinstance(module, ChainLinear):
            for i in range(k):
                module.mlps[i].requires_grad_(False)
    for layer in getattr(model, "layers", []):
        attn = layer.attention
        if attn.kv_sharing:
            attn.wk.requires_grad_(False)
            attn.wv.requires_grad_(False)
    width = chains.prefixes(model.config.dim)[k - 1]

    def zero_columns(grad: Tensor, dim: int) -> Tensor:
        grad = grad.clone()
        grad.narrow(dim, 0, width).zero_()
        return grad

    for module in model.modules():
        if isinstance(module, ChainRMSNorm):
            handles.append(module.weight.register_hook(lambda g: zero_columns(g, 0)))
    for param in (model.tok_embeddings.weight, model.output.weight):
        handles.append(param.register_hook(lambda g: zero_columns(g, 1)))
    return handles
