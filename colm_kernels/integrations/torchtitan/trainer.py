"""``CoLMTrainer``: TorchTitan's ``Trainer`` with the multi-chain loss computed inside the model.

``__init__`` gives ``MultiChainLoss``'s weights to the model (``CoLMTitanModel.loss_weights``:
its forward then returns the weighted sum, whose head gradients are computed in the forward).
Two more overrides: ``post_dataloading_process`` hands the labels to the model (whose forward returns
every scale's summed cross-entropy, ``MultiChainLoss`` weights them) and drops the dataloader's
per-document ``positions`` (CoLM trains causally over whole rows); ``forward_backward_step`` zeroes
the frozen chains' gradient columns after backward when chain tuning is on.
"""
from __future__ import annotations

import dataclasses

from torchtitan.trainer import Trainer


class CoLMTrainer(Trainer):
    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        from .loss import MultiChainLoss

        # The weights go to the model, so its forward returns one scalar and the head's gradients
        # are computed there (multi_chain_cross_entropy's weights=: 3 logit-sized GEMMs, not 4).
        if isinstance(self.loss_fn, MultiChainLoss):
            for part in self.model_parts:
                if hasattr(part, "chains") and hasattr(type(part), "loss_weights"):
                    part.loss_weights = self.loss_fn.scale_weights(len(part.chains))

    def post_dataloading_process(self, input_dict, labels):
        input_dict = {k: v for k, v in input_dict.items() if k != "positions"}
        inputs, labels, extra = super().post_dataloading_process(input_dict, labels)
        extra["labels"] = labels
        return inputs, labels, extra

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        loss = super().forward_backward_step(input_dict=input_dict, labels=labels,
                                             global_valid_tokens=global_valid_tokens)
        for part in self.model_parts:
            frozen = getattr(part, "frozen_columns", None)
            if frozen is not None:
                frozen.zero_grads()
        return loss
