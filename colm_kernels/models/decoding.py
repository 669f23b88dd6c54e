"""What ``generate`` will do, checked before any compute: one scale per new token, the prefill
scale, and (without KV sharing) that no step needs kv heads its cache lacks. Shared by
``models.CoLM`` and ``reference.CoLM`` so the two agree on every rule."""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..chains import Chains
from ..ops._checks import check_int_values


def check_tokens(tokens, name: str, vocab_size: Optional[int] = None) -> None:
    """A non-empty ``(batch, seq)`` LongTensor; with ``vocab_size`` also every id in
    ``[0, vocab_size)`` (one host sync; an id outside would index past the embedding)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor of shape (batch, seq), got {type(tokens).__name__}")
    if tokens.dtype != torch.long:
        raise TypeError(f"{name} must be a LongTensor (torch.int64), got dtype {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq), got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(tokens.shape)}")
    if vocab_size is not None:
        check_int_values(name, tokens, 0, vocab_size - 1, what=f"token ids of a vocabulary of {vocab_size}")


def check_max_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return int(max_new_tokens)


def check_complete_cache(prefill: Tensor, steps: Tensor, prefilled: Tensor, describe: Callable) -> None:
    """Without KV sharing a position computed at scale ``s`` holds the kv heads of chains
    ``0..s`` only, so no step may exceed a scale that computed an earlier position of the same
    sequence. ``prefill`` ``(B,)``: the prompt's scale, counted where ``prefilled`` (the sequence
    has prompt tokens before its last); ``steps`` ``(T, B)``: each step's scale per sequence.
    Raises ``ValueError(describe(step, sequence, scale, cached_scale))`` at the first violation
    (one host sync)."""
    if steps.shape[0] == 0:
        return
    never = torch.iinfo(torch.int64).max  # no cached position yet
    first = torch.where(prefilled, prefill.long(), torch.full_like(prefill, never, dtype=torch.int64))
    cached = torch.cat([first[None], steps[:-1].long()]).cummin(0).values  # smallest scale before step t
    bad = (steps > cached).flatten()
    found, index = torch.stack([bad.any().long(), bad.long().argmax()]).tolist()
    if found:
        t, b = divmod(index, steps.shape[1])
        raise ValueError(describe(t, b, int(steps[t, b]), int(cached[t, b])))


def plan_decoding(
    chains: Chains,
    kv_sharing: bool,
    prompt_len: int,
    max_new_tokens: int,
    chain: Union[None, int, Sequence[int]],
    prefill_chain: Optional[int],
) -> tuple[int, list[int]]:
    """``(prefill_scale, scale_of_each_step)`` for one int scale per step (``reference.CoLM``;
    ``models.CoLM.generate`` plans per-sequence scales in ``models.generation``). The prompt's last
    token is the first decode step, so prefill covers ``prompt[:, :-1]``; it raises
    ``ValueError`` for an incomplete KV cache."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if isinstance(chain, (list, tuple)):
        if len(chain) != max_new_tokens:
            raise ValueError(
                f"chain is a list of {len(chain)} scales but max_new_tokens={max_new_tokens}: "
                "give one scale per new token"
            )
        scales = [chains.check_chain(c, name=f"chain[{t}]") for t, c in enumerate(chain)]
    else:
        scales = [chains.check_chain(chain)] * int(max_new_tokens)
    if prefill_chain is None:
        prefill = scales[0] if scales else chains.n - 1
    else:
        prefill = chains.check_chain(prefill_chain, name="prefill_chain")
    if not kv_sharing:
        check_complete_cache(
            torch.tensor([prefill]), torch.tensor(scales, dtype=torch.int64).view(-1, 1),
            torch.tensor([prompt_len > 1]),
            lambda t, b, s, cached: (
                f"chain={s} at decode step {t} is larger than the scale {cached} that computed "
                f"earlier positions (prefill_chain={prefill}, chain={chain!r}): without "
                "kv_sharing the KV cache would be incomplete"
            ),
        )
    return prefill, scales
