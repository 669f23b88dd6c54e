"""``CoLM``: a CoLM / CoLM-Air language model built from ``colm_kernels.nn``.

Key names follow TorchTitan's llama3 model (``tok_embeddings``, ``layers.{l}.attention.wq``, ...),
with ``mlps.{i}`` inside every chain linear, so checkpoints of code written from the paper load.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ChainRMSNorm, ChainTransformerBlock, KVCache
from ..ops.autocast import autocast_dtype
from ..ops.multi_chain_cross_entropy.api import multi_chain_cross_entropy
from .config import CoLMConfig
from .decoding import check_tokens
from .generation import generate
from .scales import resolve_chain


class CoLM(nn.Module):
    # The block every layer is built from; integrations subclass it (the Hugging Face model adds
    # transformers' activation checkpointing) without changing a parameter or key.
    block_class = ChainTransformerBlock

    def __init__(self, config: CoLMConfig):
        super().__init__()
        if not isinstance(config, CoLMConfig):
            raise TypeError(f"config must be a CoLMConfig, got {type(config).__name__}")
        self.config = config
        self.chains = config.chain_config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(self.block_class(config) for _ in range(config.n_layers))
        self.norm = ChainRMSNorm(config.dim, self.chains, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for the embedding and every linear, ones for the norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, ChainRMSNorm):
                nn.init.ones_(module.weight)

    def hidden(self, tokens: Tensor, chain=None, cache: Optional[KVCache] = None) -> Tensor:
        """Final normed hidden states of the sub-model at ``chain``: ``(B, S, P_(chain+1))``.

        ``chain``: an int, None (the whole model) or an integer tensor ``(B,)``, one scale per
        sequence: then ``(B, S, dim)``, each row equal to its sequence run alone at its scale, its
        features beyond that scale exact zeros. Without KV sharing a ``cache`` refuses
        (``ValueError``) a step that needs kv heads a sequence's cached positions lack."""
        check_tokens(tokens, "tokens", self.config.vocab_size)
        scale = resolve_chain(self.chains, chain, tokens.shape[0], tokens.device)
        return self._hidden(tokens, scale.chain, cache, scale.seq)

    def _hidden(self, tokens: Tensor, k: int, cache: Optional[KVCache],
                seq_chains: Optional[Tensor] = None) -> Tensor:
        """``hidden`` without the checks (token values and ``seq_chains`` are checked once, by the
        caller): every op trusts them."""
        width = self.chains.active_width(self.config.dim, k)
        if cache is not None:
            cache.check_scale(k, seq_chains)  # once per step (the layers' writes reuse it)
        # The embedding's columns beyond a row's scale stay in the residual stream, but no op reads
        # a column of a later chain for an earlier one, and the final norm zeroes them.
        h = self.tok_embeddings(tokens)[..., :width]
        rows = dict(seq_chains=seq_chains, check_values=False)
        for index, layer in enumerate(self.layers):
            h = layer(h, k, cache, index, **rows)
        if cache is not None:
            cache.advance(tokens.shape[1], k, seq_chains)
        return self.norm(h, k, **rows)

    def forward(self, tokens: Tensor, chain=None) -> Tensor:
        """Logits ``(B, S, vocab)`` at scale ``chain`` (an int, None, or a ``(B,)`` integer tensor
        of per-sequence scales): the head reads the first ``P`` columns (per-sequence scales: all
        of them, and the hidden states' zeros beyond each sequence's scale add nothing)."""
        h = self.hidden(tokens, chain)
        return F.linear(h, self.output.weight[:, : h.shape[-1]])

    def multi_chain_loss(self, tokens: Tensor, targets: Tensor, ignore_index: int = -100, *,
                         check_values: bool = False, weights=None) -> Tensor:
        """Mean cross-entropy at every scale ``(n_chains,)`` from one full-scale pass, without
        materialising a logit tensor per scale; with ``weights`` (one per scale) their weighted
        sum, a scalar whose head gradients the kernels compute in the forward (3 logit-sized GEMMs
        instead of 4: prefer it to weighting the vector). ``targets`` are not checked on the host by
        default (no GPU sync per step): a target outside ``[0, vocab_size)`` that is not
        ``ignore_index`` makes every scale's loss NaN; ``check_values=True`` raises instead."""
        h = self.hidden(tokens)
        return multi_chain_cross_entropy(h, self.output.weight, targets, self.chains, ignore_index,
                                         check_values=check_values, weights=weights)

    def new_cache(self, batch: int, max_len: int, *, page_size: Optional[int] = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions, contiguous or
        (``page_size``) paged in flash-attn's ``block_table`` layout. Its dtype is the weights', or
        under ``torch.autocast`` the autocast dtype the keys and values are computed in (so no
        decode step casts the cache)."""
        cfg = self.config
        w = self.tok_embeddings.weight
        dtype = autocast_dtype(w.device.type) if w.dtype != torch.float64 else None
        return KVCache(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim,
                       kv_sharing=cfg.kv_sharing, dtype=dtype or w.dtype, device=w.device, page_size=page_size)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        chain=None,
        prefill_chain=None,
        *,
        attention_mask: Optional[Tensor] = None,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        eos_token_id: Union[None, int, Sequence[int]] = None,
        pad_token_id: Optional[int] = None,
        page_size: Optional[int] = None,
    ) -> Tensor:
        """Decoding with a KV cache; returns ``(B, S + steps)`` tokens, ``steps`` at most
        ``max_new_tokens`` (fewer when every sequence has emitted ``eos_token_id``).

        Args:
            chain: the scale of the new tokens: an int (None: the whole model), a ``(B,)`` integer
                tensor (one per sequence), or a list of ``max_new_tokens`` of either (one per step:
                switching scale while decoding).
            prefill_chain: the scale ``prompt[:, :-1]`` is prefilled at (an int or a ``(B,)``
                tensor; default: the first step's). CoLM-Air's K/V depend on chain 1 only, so
                ``prefill_chain=0`` gives the full prefill's tokens at the smallest sub-model's
                cost, and each sequence may then decode at any scale. Without KV sharing a step
                above a scale that computed an earlier position of the same sequence raises
                ``ValueError`` (its cache would lack those chains' kv heads).
            attention_mask: ``(B, S)``, 1 for tokens, 0 for padding, LEFT padding only: each
                sequence is computed exactly as if alone (padding is neither computed nor cached,
                every token has its own position), so a batch gives each prompt's own tokens.
            temperature: 0 (the default): greedy; above 0, sampling from ``softmax(logits /
                temperature)`` after ``top_k`` (keep the k largest) and ``top_p`` (keep the
                smallest set of largest probabilities reaching p), with ``generator``.
            eos_token_id: an id (or ids) that ends a sequence; finished sequences then emit
                ``pad_token_id`` (default: the first eos id) and decoding stops once all finished.
            page_size: decode over a paged KV cache (``new_cache(..., page_size=...)``).
        """
        return generate(self, prompt, max_new_tokens, chain, prefill_chain, attention_mask=attention_mask,
                        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, page_size=page_size)
