"""Choosing the next token from logits: greedy (temperature 0) or sampling with temperature,
top-k and top-p (nucleus), in the order Hugging Face's ``generate`` applies them (temperature,
then top-k, then top-p), drawing from a ``torch.Generator`` when one is given."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def checked(cls, temperature, top_k, top_p, generator, device) -> "Sampling":
        """The arguments of ``generate`` checked (errors name the argument). ``top_k``, ``top_p``
        and ``generator`` do not change greedy decoding (temperature 0)."""
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != torch.device(device).type:
                raise ValueError(f"generator is on {generator.device} but the prompt is on {device}: "
                                 "sampling draws on the prompt's device")
        return cls(float(temperature), None if top_k is None else int(top_k),
                   None if top_p is None else float(top_p), generator)

    def filtered(self, logits: Tensor) -> Tensor:
        """``logits / temperature`` (at least float32) with every token outside top-k / top-p set
        to ``-inf``; the largest logit always survives."""
        scores = logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            # drop a token when the more likely ones already reach top_p (never the first)
            drop = probs.cumsum(dim=-1) - probs >= self.top_p
            scores = scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        return scores

    def __call__(self, logits: Tensor) -> Tensor:
        """The next token of each row of ``logits`` ``(B, vocab)``: ``(B,)`` int64."""
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = self.filtered(logits).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
