"""Conversions: ``models.CoLM`` <-> ``CoLMForCausalLM`` (``to_hf`` / ``from_hf``), and a
``transformers`` LLaMA grown into a CoLM by the paper's chain expansion (``from_llama``).

LLaMA in transformers rotates half-split pairs (feature ``t`` with ``t + hd/2``, ``rotate_half``);
this package rotates interleaved pairs (``2t`` with ``2t + 1``, Meta / TorchTitan, spec section 3).
transformers' ``convert_llama_weights_to_hf`` permutes the rows of ``wq`` / ``wk`` of every head from
the interleaved order to the half-split one; ``from_llama`` applies the inverse permutation, so
every query/key dot product, and so every logit, is unchanged.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import Tensor

from ...chains import Chains
from ...models import CoLM, CoLMConfig, expand_chains
from .config import CoLMHFConfig
from .modeling import CoLMForCausalLM


def to_hf(model: CoLM) -> CoLMForCausalLM:
    """A ``CoLMForCausalLM`` holding a copy of ``model``'s weights (same dtype and device)."""
    if not isinstance(model, CoLM):
        raise TypeError(f"model must be a colm_kernels.models.CoLM, got {type(model).__name__}")
    weight = model.tok_embeddings.weight
    hf = CoLMForCausalLM(CoLMHFConfig.from_colm_config(model.config)).to(dtype=weight.dtype, device=weight.device)
    hf.model.load_state_dict(model.state_dict(), strict=True)
    return hf


def from_hf(hf_model: CoLMForCausalLM) -> CoLM:
    """A ``models.CoLM`` holding a copy of ``hf_model``'s weights (same dtype and device)."""
    if not isinstance(hf_model, CoLMForCausalLM):
        raise TypeError(f"hf_model must be a CoLMForCausalLM, got {type(hf_model).__name__}")
    weight = hf_model.model.tok_embeddings.weight
    model = CoLM(hf_model.config.to_colm_config()).to(dtype=weight.dtype, device=weight.device)
    model.load_state_dict(hf_model.model.state_dict(), strict=True)
    return model


# -- LLaMA -------------------------------------------------------------------------------------
def half_split_to_interleaved(weight: Tensor, n_heads: int) -> Tensor:
    """Rows of a ``(n_heads * hd, in)`` projection from transformers' LLaMA order (per head: the
    first halves of the rotary pairs, then the second halves) to interleaved pairs."""
    rows, cols = weight.shape
    hd = rows // n_heads
    return weight.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_half_split(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of ``half_split_to_interleaved`` (what ``convert_llama_weights_to_hf`` does)."""
    rows, cols = weight.shape
    hd = rows // n_heads
    return weight.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_KEYS = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_KEYS = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}


def _llama_fields(config) -> dict:
    """The LLaMA hyper-parameters a CoLM can represent; ``ValueError`` for the rest."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    n_heads, dim = get("num_attention_heads"), get("hidden_size")
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
    theta = (rope.get("rope_theta") if isinstance(rope, Mapping) else None) or get("rope_theta") or 10000.0
    problems = []
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only plain RoPE: 'default')")
    if get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r} (SwiGLU needs 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag, False):
            problems.append(f"{flag}=True (CoLM's projections have no bias)")
    head_dim = get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        problems.append(f"head_dim={head_dim} * num_attention_heads={n_heads} != hidden_size={dim}")
    if problems:
        raise ValueError("llama cannot be represented as a CoLM: " + "; ".join(problems))
    return dict(dim=dim, n_layers=get("num_hidden_layers"), n_heads=n_heads,
                n_kv_heads=get("num_key_value_heads") or n_heads, vocab_size=get("vocab_size"),
                ffn_hidden_dim=get("intermediate_size"), norm_eps=get("rms_norm_eps"), rope_theta=float(theta),
                tie=bool(get("tie_word_embeddings", False)),
                hf_fields={k: get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                               "max_position_embeddings")})


def _llama_state_to_colm(state: Mapping[str, Tensor], f: dict, kv_sharing: bool) -> dict:
    """transformers LLaMA keys -> a one-chain CoLM's keys (``mlps.0`` inside chain linears)."""
    out, unknown = {}, []
    for key, value in state.items():
        m = _LAYER.match(key)
        if m and m.group(2) in _LAYER_KEYS:
            name = _LAYER_KEYS[m.group(2)]
            if name == "attention.wq.weight":
                value = half_split_to_interleaved(value, f["n_heads"])
            elif name == "attention.wk.weight":
                value = half_split_to_interleaved(value, f["n_kv_heads"])
            if name.endswith("norm.weight") or (kv_sharing and name in ("attention.wk.weight", "attention.wv.weight")):
                out[f"layers.{m.group(1)}.{name}"] = value
            else:
                out[f"layers.{m.group(1)}.{name[:-len('weight')]}mlps.0.weight"] = value
        elif key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif not key.endswith("rotary_emb.inv_freq"):
            unknown.append(key)
    if unknown:
        raise ValueError(f"llama state dict has keys a LLaMA of this config lacks: {unknown[:5]}")
    if "output.weight" not in out and "tok_embeddings.weight" in out and f["tie"]:
        out["output.weight"] = out["tok_embeddings.weight"]  # tied head: a CoLM keeps its own copy
    return {k: v.detach().clone() for k, v in out.items()}


def from_llama(llama, chains, *, config=None, kv_sharing: bool = False, kv_mapping: Optional[str] = None,
               generator: Optional[torch.Generator] = None) -> CoLMForCausalLM:
    """Grow a transformers ``LlamaForCausalLM`` (or its state dict, with ``config``) into a CoLM.

    The LLaMA becomes chain 1: ``chains[0]`` must equal its ``num_attention_heads``; chains
    ``chains[1:]`` are appended by ``models.expand_chains`` (widths grow in proportion, new blocks
    freshly initialised, the head's new columns zero), so at initialisation every scale's logits
    equal the LLaMA's. ``kv_sharing=True`` makes a CoLM-Air whose shared K/V are the LLaMA's
    (``kv_mapping`` ``chain_group``: GQA inside each chain, as the LLaMA's). ``generator`` seeds the
    new chains' initialisation.
    """
    if isinstance(llama, Mapping):
        if config is None:
            raise ValueError("config (the LLaMA's LlamaConfig) is required when llama is a state dict")
        state = llama
    elif isinstance(llama, torch.nn.Module):
        config = llama.config if config is None else config
        state = llama.state_dict()
    else:
        raise TypeError(f"llama must be a LlamaForCausalLM or its state dict, got {type(llama).__name__}")
    f = _llama_fields(config)
    chains = Chains(chains, name="chains")
    if chains.sizes[0] != f["n_heads"]:
        raise ValueError(
            f"chains={chains.sizes}: chains[0] must equal the LLaMA's num_attention_heads={f['n_heads']} "
            "(chain i owns c_i heads, and the LLaMA becomes chain 1)"
        )
    if kv_mapping is None:
        kv_mapping = "chain_group" if kv_sharing else "tile"
    if kv_sharing and kv_mapping == "tile" and f["n_kv_heads"] not in (1, f["n_heads"]):
        raise ValueError(
            f"kv_mapping='tile' reads kv head j mod {f['n_kv_heads']} but the LLaMA's query head j reads "
            f"j // {f['n_heads'] // f['n_kv_heads']}: use kv_mapping='chain_group'"
        )
    base = CoLMConfig(dim=f["dim"], n_layers=f["n_layers"], n_heads=f["n_heads"], n_kv_heads=f["n_kv_heads"],
                      vocab_size=f["vocab_size"], chains=chains.sizes[:1], ffn_hidden_dim=f["ffn_hidden_dim"],
                      norm_eps=f["norm_eps"], rope_theta=f["rope_theta"], kv_sharing=kv_sharing,
                      kv_mapping=kv_mapping)
    colm_state = _llama_state_to_colm(state, f, kv_sharing)
    if chains.n > 1:
        try:
            colm_state, new_config = expand_chains(colm_state, base, chains.sizes[1:], generator=generator)
        except ValueError as e:
            raise ValueError(f"chains={chains.sizes} cannot grow this LLaMA: {e}") from None
    else:
        new_config = base
    hf_config = CoLMHFConfig.from_colm_config(new_config, **{k: v for k, v in f["hf_fields"].items() if v is not None})
    like = colm_state["tok_embeddings.weight"]
    model = CoLMForCausalLM(hf_config).to(dtype=like.dtype, device=like.device)
    model.model.load_state_dict(colm_state, strict=True)
    return model


CoLMForCausalLM.from_llama = staticmethod(from_llama)
