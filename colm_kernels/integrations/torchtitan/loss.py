"""``MultiChainLoss``: the paper's training loss, a weighted sum of every scale's cross-entropy.

``CoLMTrainer`` passes the labels to the model, whose forward returns the summed cross-entropy of
every scale ``(n_chains,)`` (``multi_chain_cross_entropy``: no logit tensor per scale), or their
weighted sum when ``CoLMTrainer`` has set ``scale_weights`` on the model; this loss weights them and divides by TorchTitan's global valid-token count (its convention: sum over the
rank's tokens / tokens of all ranks and micro-batches). Given logits (TorchTitan's validator calls
the model without labels) it is the full-scale cross-entropy.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torchtitan.components.loss import BaseLoss, cross_entropy_loss
from torchtitan.config import CompileConfig


class MultiChainLoss(BaseLoss):
    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        weights: list[float] | None = None
        """One weight per scale (None: 1 for every scale, the paper's sum)."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        if config.weights is not None and (not config.weights or any(w < 0 for w in config.weights)):
            raise ValueError(f"MultiChainLoss weights must be non-negative, one per scale, got {config.weights!r}")
        self.weights = config.weights

    def scale_weights(self, n_scales: int) -> list[float]:
        """The weight of each of ``n_scales`` scales (1 each without ``weights``): ``CoLMTrainer``
        sets them on the model, whose forward then returns the weighted sum."""
        if self.weights is None:
            return [1.0] * n_scales
        if len(self.weights) != n_scales:
            raise ValueError(f"MultiChainLoss weights={self.weights} must hold one weight per scale "
                             f"({n_scales} chains)")
        return [float(w) for w in self.weights]

    def __call__(self, pred: Tensor, labels: Tensor, global_valid_tokens: Tensor | None = None,
                 **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if pred.dim() == 0:  # already weighted: CoLMTitanModel.forward with loss_weights (scale_weights)
            loss = pred
        elif pred.dim() == 1:  # per-scale summed losses from CoLMTitanModel.forward(tokens, labels)
            if self.weights is None:
                loss = pred.sum()
            else:
                if len(self.weights) != pred.shape[0]:
                    raise ValueError(f"MultiChainLoss weights={self.weights} must hold one weight per scale "
                                     f"({pred.shape[0]} chains)")
                loss = (torch.tensor(self.weights, dtype=pred.dtype, device=pred.device) * pred).sum()
        else:
            loss = cross_entropy_loss(pred, labels)
        if global_valid_tokens is not None:
            loss = loss / global_valid_tokens
        return loss, {}
