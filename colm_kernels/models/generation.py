"""``CoLM.generate``: batched, left-padded prompts, a scale per sequence and per step, greedy or
sampled tokens, per-sequence stopping.

Every step runs on ``models.ragged``: the prompt (``prompt[:, :-1]``) is prefilled once over its
unpadded tokens (varlen attention, padding neither computed nor cached), each sequence's K/V packed
from slot 0 of a ``KVCache`` (contiguous or paged); each decode step feeds one token per sequence
at that sequence's own position and reads the cache through ``chain_attention_decode`` with
per-sequence lengths. So row ``b`` of a batch gets the tokens of ``prompt[b]`` generated alone.

Host syncs: a few while checking and planning (token ids, the mask, the scales); none per decode
step, except the check that every sequence has finished when ``eos_token_id`` is given.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..chains import Chains
from .decoding import check_complete_cache, check_max_new_tokens, check_tokens
from .ragged import PackedKVCache, decode_layout, ragged_hidden, ragged_layout
from .sampling import Sampling
from .scales import Scale, check_chain_tensor


def prompt_lengths(prompt: Tensor, attention_mask: Optional[Tensor]) -> tuple[Optional[Tensor], Tensor, int, int]:
    """``(valid, lengths, longest, total)``: the bool mask (None: no padding), each prompt's
    length ``(B,)`` and, on the host, the longest and the sum. The mask must be left-padded
    (zeros, then ones) with a token in every row."""
    batch, cols = prompt.shape
    if attention_mask is None:
        return None, torch.full((batch,), cols, dtype=torch.int64, device=prompt.device), cols, batch * cols
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor of 0/1 (or bool) of shape {(batch, cols)}, got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be a bool or integer tensor of 0/1, got dtype {attention_mask.dtype}")
    if tuple(attention_mask.shape) != (batch, cols):
        raise ValueError(f"attention_mask must have the prompt's shape {(batch, cols)}, got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.device != prompt.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but prompt is on {prompt.device}")
    mask = attention_mask.long()
    lengths = mask.sum(1)
    rising = (mask[:, 1:] < mask[:, :-1]).any(1) if cols > 1 else torch.zeros_like(lengths, dtype=torch.bool)
    lo, hi, right, right_row, empty, empty_row, longest, total = torch.stack([
        mask.min(), mask.max(), rising.any().long(), rising.long().argmax(), (lengths == 0).any().long(),
        (lengths == 0).long().argmax(), lengths.max(), lengths.sum()]).tolist()  # one host sync
    if lo < 0 or hi > 1:
        raise ValueError(f"attention_mask must hold 0 (padding) and 1 (tokens), got values in [{lo}, {hi}]")
    if empty:
        raise ValueError(f"attention_mask row {empty_row} is all zeros: every prompt needs at least one token")
    if right:
        raise ValueError(f"attention_mask row {right_row} has padding after a token: generate takes LEFT "
                         "padding (zeros before the tokens), so that every prompt ends at the last column")
    return mask.bool(), lengths, int(longest), int(total)


def _step_specs(chain, max_new_tokens: int) -> list[tuple[str, object]]:
    """``(name, spec)`` per step, a spec an int, None or a tensor."""
    if isinstance(chain, (list, tuple)):
        if len(chain) != max_new_tokens:
            raise ValueError(f"chain is a list of {len(chain)} scales but max_new_tokens={max_new_tokens}: "
                             "give one scale per new token")
        return [(f"chain[{t}]", c) for t, c in enumerate(chain)]
    return [("chain", chain)] * max_new_tokens


def plan_scales(chains: Chains, kv_sharing: bool, lengths: Tensor, max_new_tokens: int, chain,
                prefill_chain) -> tuple[Scale, list[Scale]]:
    """``(prefill scale, scale of each step)``, every scale an int or a ``(B,)`` tensor. Checks
    (errors name the argument) the specs, their values, and without KV sharing that no sequence's
    step needs kv heads its cache lacks: a few host syncs, once."""
    batch, device = lengths.shape[0], lengths.device
    specs = _step_specs(chain, max_new_tokens)
    prefill_spec = ("prefill_chain", prefill_chain) if prefill_chain is not None else (
        specs[0] if specs else ("chain", None))
    rows = []  # one (B,) int64 row per spec: the prefill's, then each step's
    for name, spec in [prefill_spec] + specs:
        if isinstance(spec, Tensor):
            check_chain_tensor(chains, spec, batch, device, name=name, check_values=False)
            rows.append(spec.to(torch.int64))
        else:
            rows.append(torch.full((batch,), chains.check_chain(spec, name=name), dtype=torch.int64, device=device))
    table = torch.stack(rows)  # (1 + T, B)
    bounds = torch.stack([table.amin(1), table.amax(1)], 1).tolist()  # one host sync
    for (name, spec), (lo, hi) in zip([prefill_spec] + specs, bounds):
        if lo < 0 or hi >= chains.n:  # only a tensor can get here
            raise ValueError(f"{name} values must be in [0, {chains.n - 1}] (the last active chain of each "
                             f"sequence, chains={chains.sizes}), got values in [{lo}, {hi}]")
    if not kv_sharing:
        check_complete_cache(
            table[0], table[1:], lengths > 1,
            lambda t, b, s, cached: (
                f"chain={s} for sequence {b} at decode step {t} is larger than the scale {cached} that "
                f"computed its earlier positions (prefill_chain={_describe(prefill_spec[1])}, "
                f"chain={_describe(chain)}): without kv_sharing the KV cache would be incomplete"),
        )
    scales = []
    for (name, spec), (lo, hi) in zip([prefill_spec] + specs, bounds):
        # one scale for every sequence runs without per-row scales (no row sorting in the kernels)
        scales.append(Scale(hi, spec if isinstance(spec, Tensor) and lo != hi else None))
    return scales[0], scales[1:]


def _describe(spec) -> str:
    if isinstance(spec, Tensor):
        return "tensor"
    if isinstance(spec, (list, tuple)):
        return "[" + ", ".join(_describe(s) for s in spec) + "]"
    return repr(spec)


def stop_tokens(eos_token_id, pad_token_id, vocab_size: int, device) -> tuple[Optional[Tensor], Optional[int]]:
    """``(eos ids tensor, pad id)``, or ``(None, None)`` without ``eos_token_id``; ``pad_token_id``
    defaults to the first eos id."""
    def check_id(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < vocab_size:
            raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
        return int(value)

    if pad_token_id is not None:
        pad_token_id = check_id("pad_token_id", pad_token_id)
    if eos_token_id is None:
        return None, pad_token_id
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not ids:
        raise ValueError("eos_token_id must be an id or a non-empty list of ids, got []")
    ids = [check_id("eos_token_id", i) for i in ids]
    return torch.tensor(ids, device=device), ids[0] if pad_token_id is None else pad_token_id


def decode_logits(model, last: Tensor, scale: Scale, cache: PackedKVCache, past: Tensor, max_past: int,
                  sum_past: int) -> Tensor:
    """One decode step: the logits ``(B, vocab)`` after ``last`` ``(B, 1)``, fed at positions
    ``past`` ``(B,)`` (each sequence's cached length; ``max_past`` and ``sum_past`` its largest
    and sum, known on the host) at ``scale``, its K/V written into ``cache``. No host sync."""
    layout = decode_layout(past, 1, max_past, sum_past)
    h = ragged_hidden(model, last, scale.chain, layout, cache, seq_chains=scale.seq)[:, -1]
    # per-sequence scales: h is zero beyond each sequence's scale, so the whole active head gives
    # each sequence its own scale's logits
    return F.linear(h, model.output.weight[:, : h.shape[-1]])


def generate(model, prompt: Tensor, max_new_tokens: int, chain=None, prefill_chain=None, *,
             attention_mask: Optional[Tensor] = None, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
             eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
             page_size: Optional[int] = None) -> Tensor:
    """``CoLM.generate`` (its docstring says what the arguments mean)."""
    cfg = model.config
    check_tokens(prompt, "prompt", cfg.vocab_size)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    batch, cols = prompt.shape
    device = prompt.device
    valid, lengths, longest, total = prompt_lengths(prompt, attention_mask)
    sampling = Sampling.checked(temperature, top_k, top_p, generator, device)
    eos, pad = stop_tokens(eos_token_id, pad_token_id, cfg.vocab_size, device)
    prefill, steps = plan_scales(model.chains, cfg.kv_sharing, lengths, max_new_tokens, chain, prefill_chain)
    tokens = prompt.clone()
    if not steps:
        return tokens
    cache = PackedKVCache(model.new_cache(batch, longest + len(steps), page_size=page_size))
    if longest > 1:  # the prompt's last token is the first decode step's input
        layout = ragged_layout(batch, cols - 1, device, None if valid is None else valid[:, :-1])
        ragged_hidden(model, prompt[:, :-1], prefill.chain, layout, cache, seq_chains=prefill.seq)
    past = (lengths - 1).to(torch.int32)
    max_past, sum_past = longest - 1, total - batch  # host copies: no sync per step
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for t, scale in enumerate(steps):
        nxt = sampling(decode_logits(model, tokens[:, -1:], scale, cache, past, max_past, sum_past))
        if eos is not None:
            nxt = torch.where(finished, pad, nxt)
            finished = finished | torch.isin(nxt, eos)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        past = past + 1
        max_past, sum_past = max_past + 1, sum_past + batch
        if eos is not None and t + 1 < len(steps) and bool(finished.all()):
            break
    return tokens
