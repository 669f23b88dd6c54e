"""``CoLMForCausalLM`` and ``CoLMModel``: ``models.CoLM`` as a ``transformers`` causal LM
(``PreTrainedModel`` + ``GenerationMixin``) and as the base model (``AutoModel``: hidden states).

The backbone is ``self.model``, a ``colm_kernels.models.CoLM`` (its modules are ``colm_kernels.nn``
on this package's ops and backends), so state-dict keys are ``model.`` + CoLM's own (TorchTitan
llama3 names, ``mlps.{i}`` inside every chain linear; ``model.output.weight`` is the head), in both.

``chain`` (forward and ``generate``) selects the scale, the 0-based index of the last active chain
(``None``: the whole model). Padding (``attention_mask`` zeros) and per-sequence cache lengths run
through ``integrations.ragged``: every sequence is computed exactly as if it were alone.

Training: ``gradient_checkpointing_enable()`` recomputes each block in the backward (the blocks are
transformers' ``GradientCheckpointingLayer``s); with ``Trainer``'s ``num_items_in_batch`` the loss is
the sum of token losses divided by it, so accumulated micro-batches add up to the batch's mean;
under ``torch.autocast`` every op casts as PyTorch casts its dense counterpart (``ops/autocast.py``).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from ...models import CoLM
from ...models.decoding import check_tokens
from ...nn import ChainTransformerBlock
from ...ops.multi_chain_cross_entropy.api import multi_chain_cross_entropy
from ..ragged import ragged_hidden, ragged_layout
from .cache import CoLMCache
from .config import CoLMHFConfig

logger = logging.get_logger(__name__)

# What ``attn_implementation`` may say: the model has one attention, and each of these names it.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


class CoLMDecoderLayer(ChainTransformerBlock, GradientCheckpointingLayer):
    """``ChainTransformerBlock`` (same parameters and keys) whose ``forward`` transformers'
    ``gradient_checkpointing_enable()`` runs under ``torch.utils.checkpoint``."""


class CoLMBackbone(CoLM):
    """``models.CoLM`` built from ``CoLMDecoderLayer`` blocks."""

    block_class = CoLMDecoderLayer


class CoLMPreTrainedModel(PreTrainedModel):
    config_class = CoLMHFConfig
    config: CoLMHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CoLMDecoderLayer"]

    def __init__(self, config: CoLMHFConfig):
        super().__init__(config)
        self.model = CoLMBackbone(config.to_colm_config())
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint whose weights do not fit
        the config (transformers would re-initialise mismatched weights with a warning): a
        ``chains`` (or width) override that the checkpoint was not trained with raises
        ``ValueError``."""
        want_info = kwargs.pop("output_loading_info", False)
        where = str(pretrained_model_name_or_path)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except RuntimeError as e:  # transformers' size-mismatch error: say which argument caused it
            if "mismatch" not in str(e):
                raise
            asked = kwargs.get("chains", getattr(kwargs.get("config"), "chains", None))
            raise ValueError(f"checkpoint {where!r} does not fit chains={asked} (or the widths given with "
                             "them): its weights have other shapes; load it with the chains it was saved "
                             f"with. transformers said: {str(e)[:300]}") from None
        info = info if isinstance(info, dict) else vars(info)
        keys = ("missing_keys", "unexpected_keys") + (() if kwargs.get("ignore_mismatched_sizes") else ("mismatched_keys",))
        bad = {k: sorted(map(str, info.get(k) or ()))[:3] for k in keys if info.get(k)}
        if bad:
            c = model.config
            raise ValueError(
                f"checkpoint {where!r} does not fit chains={c.chains} "
                f"(hidden_size={c.hidden_size}, num_attention_heads={c.num_attention_heads}, "
                f"num_key_value_heads={c.num_key_value_heads}, kv_sharing={c.kv_sharing}): {bad}; load it "
                "with the chains it was saved with"
            )
        return (model, info) if want_info else model

    def _check_and_adjust_attn_implementation(self, attn_implementation: Optional[str], is_init_check: bool = False,
                                              allow_all_kernels: bool = False) -> str:
        """``attn_implementation``: None, ``"eager"`` or ``"sdpa"``, which all mean the model's one
        attention (colm_kernels' ``chain_attention`` / ``chain_attention_decode``); anything else
        is refused, saying what the model uses."""
        if attn_implementation is None:
            return "eager"
        if attn_implementation in ATTN_IMPLEMENTATIONS:
            return attn_implementation
        raise ValueError(
            f"attn_implementation={attn_implementation!r}: {type(self).__name__} always computes attention "
            "with colm_kernels' own kernels (chain_attention, chain_attention_decode: heads owned by chains, "
            "KV sharing, elastic scales) on the backend colm_kernels.set_backend selects (auto: the Triton "
            "FlashAttention-2 kernels on a GPU, plain PyTorch on a CPU); attn_implementation may be None or one "
            f"of {ATTN_IMPLEMENTATIONS}, which all mean that attention"
        )

    @property
    def chains(self):
        return self.model.chains

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own CoLMCache (per-sequence lengths, per-scale kv heads)

    def new_cache(self) -> CoLMCache:
        return CoLMCache.for_model(self.config)

    # ------------------------------------------------------------------------------------------
    def _inputs(self, input_ids, attention_mask, position_ids, cache, past_key_values, chain, use_cache,
                inputs_embeds, kwargs) -> tuple[int, Optional[CoLMCache], Tensor, bool]:
        """The checks both forwards make; returns ``(scale, cache, valid, use_cache)``."""
        name = type(self).__name__
        if inputs_embeds is not None:
            raise ValueError(f"inputs_embeds is not supported by {name}: pass input_ids")
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True is not supported by {name}")
        if past_key_values is not None and cache is not None and past_key_values is not cache:
            raise ValueError("pass the KV cache as either cache or past_key_values, not both")
        cache = cache if cache is not None else past_key_values
        check_tokens(input_ids, "input_ids", self.config.vocab_size)  # an id past the table: ValueError
        k = self.chains.check_chain(chain)
        if cache is not None and not isinstance(cache, CoLMCache):
            raise ValueError(f"cache must be a CoLMCache ({name}.new_cache()), got {type(cache).__name__}")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.training and torch.is_grad_enabled() and self.is_activation_checkpointing:
            # The backward recomputes every block: a cache would be written twice.
            if cache is not None:
                raise ValueError("a KV cache cannot be filled by a training step under gradient checkpointing "
                                 "(the backward recomputes every block and would write it again)")
            if use_cache:
                logger.warning_once("use_cache=True is incompatible with gradient checkpointing: use_cache=False")
                use_cache = False
        batch, cols = input_ids.shape
        valid = self._new_token_mask(attention_mask, cache, batch, cols)
        if position_ids is not None and tuple(position_ids.shape) != (batch, cols):
            raise ValueError(f"position_ids must have shape {(batch, cols)}, got {tuple(position_ids.shape)}")
        return k, cache, valid, use_cache

    def _new_token_mask(self, attention_mask, cache, batch, cols) -> Tensor:
        if attention_mask is None:
            return torch.ones(batch, cols, dtype=torch.bool, device=self.device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
            raise ValueError(
                f"attention_mask must be 2-D (batch={batch}, seen + new columns), got shape "
                f"{tuple(attention_mask.shape)}"
            )
        seen = 0 if cache is None else cache.columns
        if attention_mask.shape[1] not in (cols, seen + cols):
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; expected {seen + cols} "
                f"(cached {seen} + new {cols}) or {cols} (the new columns only)"
            )
        return attention_mask[:, -cols:].to(torch.bool)

    def _hidden(self, input_ids, valid, position_ids, chain, cache) -> Tensor:
        batch, cols = input_ids.shape
        past = None if cache is None else cache.past_lengths(batch)
        layout = ragged_layout(batch, cols, input_ids.device, valid, past, position_ids)
        if layout.n_tokens == 0:
            raise ValueError("attention_mask masks every new token: nothing to compute")
        if cache is not None:
            cache.check_scale(chain)
        hidden = ragged_hidden(self.model, input_ids, chain, layout, cache)
        if cache is not None:
            cache.advance(layout, chain)
        return hidden



class CoLMModel(CoLMPreTrainedModel):
    """The base model (``AutoModel``): final normed hidden states, no head. Same keys as
    ``CoLMForCausalLM`` (the head's weight included, unused), so either loads the other's checkpoint."""

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values: Optional[CoLMCache] = None,
        use_cache: Optional[bool] = None,
        chain: Optional[int] = None,
        cache: Optional[CoLMCache] = None,
        return_dict: Optional[bool] = None,
        inputs_embeds: Optional[Tensor] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``last_hidden_state`` ``(B, S, P_(chain+1))`` at scale ``chain`` (masked positions:
        zeros); the arguments are ``CoLMForCausalLM.forward``'s."""
        k, cache, valid, use_cache = self._inputs(input_ids, attention_mask, position_ids, cache, past_key_values,
                                                  chain, use_cache, inputs_embeds, kwargs)
        if cache is None and use_cache:
            cache = self.new_cache()
        hidden = self._hidden(input_ids, valid, position_ids, k, cache)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()


class CoLMForCausalLM(CoLMPreTrainedModel, GenerationMixin):
    # ``forward`` divides the summed token losses by ``Trainer``'s ``num_items_in_batch``.
    accepts_loss_kwargs = True

    def get_output_embeddings(self):
        return self.model.output

    def set_output_embeddings(self, value):
        self.model.output = value

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values: Optional[CoLMCache] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        chain: Optional[int] = None,
        prefill_chain: Optional[int] = None,
        cache: Optional[CoLMCache] = None,
        chain_weights: Optional[Sequence[float]] = None,
        return_dict: Optional[bool] = None,
        inputs_embeds: Optional[Tensor] = None,
        num_items_in_batch: Optional[Union[int, Tensor]] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``(B, S, vocab)`` at scale ``chain`` (masked positions: zeros).

        Args:
            input_ids: ``(B, S)`` token ids in ``[0, vocab_size)`` (others: ``ValueError``).
            attention_mask: ``(B, cached + S)`` or ``(B, S)``, 1 for tokens, 0 for padding; masked
                tokens are neither computed nor cached, so a padded batch equals its prompts alone.
            position_ids: RoPE positions ``(B, S)`` (default: each token's place in its own
                sequence, padding excluded, which is what ``generate`` passes too).
            past_key_values / cache: a ``CoLMCache`` (two names for one argument: ``generate`` of
                transformers 5 says ``cache``).
            labels: ``(B, S)``; the loss is the mean next-token cross-entropy at scale ``chain``
                (targets ``labels[:, 1:]``, positions whose input is padding or whose label is
                -100 left out), from the hidden states without a logit tensor per scale.
            num_items_in_batch: ``Trainer``'s count of target tokens in the whole (accumulated)
                batch: the loss is then the sum of this micro-batch's token losses divided by it
                (per scale, before ``chain_weights``), so micro-batches add up to the batch mean.
            chain_weights: one weight per scale ``0..chain``: the loss is then the weighted sum of
                the per-scale losses (the paper's multi-chain training loss).
            prefill_chain: with an empty cache and ``S > 1``, columns ``0..S-2`` run at this
                scale and the last column at ``chain`` (CoLM-Air: the same cache as a full
                prefill; without KV sharing a larger ``chain`` raises ``ValueError``).
            logits_to_keep: ``> 0`` keeps the last that many columns' logits only.
        """
        k, cache, valid, use_cache = self._inputs(input_ids, attention_mask, position_ids, cache, past_key_values,
                                                  chain, use_cache, inputs_embeds, kwargs)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, numbers.Integral) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        cols = input_ids.shape[1]
        split = prefill_chain is not None and cols > 1 and (cache is None or cache.columns == 0)
        if split:
            prefill = self.chains.check_chain(prefill_chain, name="prefill_chain")
            cache = cache if cache is not None else self.new_cache()
            head = self._hidden(input_ids[:, :-1], valid[:, :-1], _cols(position_ids, 0, -1), prefill, cache)
            tail = self._hidden(input_ids[:, -1:], valid[:, -1:], _cols(position_ids, -1, None), k, cache)
            if logits_to_keep == 1:
                logits = self._logits(tail, 0)
            else:  # the prompt's logits come from the prefill scale
                logits = torch.cat([self._logits(head, 0), self._logits(tail, 0)], dim=1)
                logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
            hidden = None
        else:
            if cache is None and use_cache:
                cache = self.new_cache()
            hidden = self._hidden(input_ids, valid, position_ids, k, cache)
            logits = self._logits(hidden, logits_to_keep)

        loss = None
        if labels is not None:
            if hidden is None:
                raise ValueError("labels cannot be combined with prefill_chain (the prompt runs at two scales)")
            # one scalar with weights (the last scale alone: one-hot), so the head's gradients are
            # computed in the forward (3 logit-sized GEMMs instead of 4)
            n_scales = k + 1
            weights = [0.0] * (n_scales - 1) + [1.0] if chain_weights is None else _chain_weights(chain_weights, n_scales)
            if num_items_in_batch is None:
                loss = self._scale_losses(hidden, labels, valid, weights=weights)
            else:
                loss = self._scale_losses(hidden, labels, valid, reduction="sum", weights=weights) / num_items_in_batch
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache or split else None)
        return out if return_dict is not False else out.to_tuple()

    def multi_chain_loss(self, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None,
                         chain: Optional[int] = None) -> Tensor:
        """Next-token cross-entropy at every scale ``0..chain`` ``(chain + 1,)`` from one pass at
        ``chain`` (``labels`` as in ``forward``), without a logit tensor per scale."""
        check_tokens(input_ids, "input_ids", self.config.vocab_size)
        k = self.chains.check_chain(chain)
        valid = self._new_token_mask(attention_mask, None, *input_ids.shape)
        hidden = self._hidden(input_ids, valid, None, k, None)
        return self._scale_losses(hidden, labels, valid)

    # ------------------------------------------------------------------------------------------
    def _logits(self, hidden: Tensor, keep: int) -> Tensor:
        if keep:
            hidden = hidden[:, -keep:]
        return torch.nn.functional.linear(hidden, self.model.output.weight[:, : hidden.shape[-1]])

    def _scale_losses(self, hidden: Tensor, labels: Tensor, valid: Tensor, reduction: str = "mean",
                      weights=None) -> Tensor:
        if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"labels must be a tensor of shape {tuple(hidden.shape[:2])} (like input_ids), "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")
        targets = labels[:, 1:].masked_fill(~valid[:, :-1], -100)
        return multi_chain_cross_entropy(hidden[:, :-1], self.model.output.weight, targets, self.chains,
                                         reduction=reduction, weights=weights)

    # -- generate --------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None,
                                      past_key_values=None, attention_mask=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.columns > 0:
            input_ids = input_ids[:, cache.columns:]
        elif next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, cache=cache)
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, -input_ids.shape[1]:]
        for key in ("labels", "next_sequence_length", "is_first_iteration", "inputs_embeds"):
            kwargs.pop(key, None)
        inputs.update(kwargs)
        return inputs

    def generate(self, *args, chain: Optional[int] = None, prefill_chain: Optional[int] = None, **kwargs):
        """``GenerationMixin.generate`` with one scale for the whole call (``chain``) and, for
        CoLM-Air, ``prefill_chain`` (prompt prefilled at that scale; ``0`` gives the same tokens as
        a full prefill, at the cost of the smallest sub-model)."""
        k = self.chains.check_chain(chain)
        if prefill_chain is not None:
            self.chains.check_chain(prefill_chain, name="prefill_chain")
            if not self.config.kv_sharing and prefill_chain < k:
                raise ValueError(
                    f"prefill_chain={prefill_chain} < chain={k} without kv_sharing: the KV cache "
                    "would lack the kv heads of the larger chains"
                )
        return super().generate(*args, chain=k, prefill_chain=prefill_chain, **kwargs)


def _cols(t: Optional[Tensor], start, stop) -> Optional[Tensor]:
    return None if t is None else t[:, start:stop]


def _chain_weights(weights, n_scales: int) -> list:
    values = list(weights.tolist() if isinstance(weights, Tensor) else weights)
    if len(values) != n_scales:
        raise ValueError(f"chain_weights must hold one weight per scale 0..chain ({n_scales}), got {values!r}")
    return [float(w) for w in values]
