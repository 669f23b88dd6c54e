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
from ..ops.multi_chain_cross_entropy.api import multi_chain_cross_entropy
from .config import CoLMConfig
from .decoding import check_tokens, plan_decoding


class CoLM(nn.Module):
    def __init__(self, config: CoLMConfig):
        super().__init__()
        if not isinstance(config, CoLMConfig):
            raise TypeError(f"config must be a CoLMConfig, got {type(config).__name__}")
        self.config = config
        self.chains = config.chain_config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(ChainTransformerBlock(config) for _ in range(config.n_layers))
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
        """Final normed hidden states ``(B, S, P_(chain+1))`` of the sub-model at ``chain``."""
        check_tokens(tokens, "tokens", self.config.vocab_size)
        return self._hidden(tokens, self.chains.check_chain(chain), cache)

    def _hidden(self, tokens: Tensor, k: int, cache: Optional[KVCache]) -> Tensor:
        """``hidden`` without the checks (token values are checked once, by the caller)."""
        width = self.chains.active_width(self.config.dim, k)
        h = self.tok_embeddings(tokens)[..., :width]
        for index, layer in enumerate(self.layers):
            h = layer(h, k, cache, index)
        if cache is not None:
            cache.advance(tokens.shape[1], k)
        return self.norm(h, k)

    def forward(self, tokens: Tensor, chain=None) -> Tensor:
        """Logits ``(B, S, vocab)`` at scale ``chain``: the head reads the first ``P`` columns."""
        h = self.hidden(tokens, chain)
        return F.linear(h, self.output.weight[:, : h.shape[-1]])

    def multi_chain_loss(self, tokens: Tensor, targets: Tensor, ignore_index: int = -100, *,
                         check_values: bool = False) -> Tensor:
        """Mean cross-entropy at every scale ``(n_chains,)`` from one full-scale pass, without
        materialising a logit tensor per scale. ``targets`` are not checked on the host by
        default (no GPU sync per step): a target outside ``[0, vocab_size)`` that is not
        ``ignore_index`` makes every scale's loss NaN; ``check_values=True`` raises instead."""
        h = self.hidden(tokens)
        return multi_chain_cross_entropy(h, self.output.weight, targets, self.chains, ignore_index,
                                         check_values=check_values)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.config
        w = self.tok_embeddings.weight
        return KVCache(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim,
                       kv_sharing=cfg.kv_sharing, dtype=w.dtype, device=w.device)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        chain: Union[None, int, Sequence[int]] = None,
        prefill_chain: Optional[int] = None,
    ) -> Tensor:
        """Greedy decoding with a KV cache; returns ``(B, S + max_new_tokens)`` tokens.

        ``chain``: one scale for every new token, or a list with one per token (switching scale
        while decoding). ``prompt[:, :-1]`` is prefilled at ``prefill_chain`` (default: the first
        decode scale). CoLM-Air's K/V depend on chain 1 only, so ``prefill_chain=0`` gives the full
        prefill's tokens; without KV sharing a decode scale above any cached position's scale
        raises ``ValueError`` (the cache would lack those chains' kv heads).
        """
        check_tokens(prompt, "prompt", self.config.vocab_size)
        prefill, scales = plan_decoding(self.chains, self.config.kv_sharing, prompt.shape[1],
                                        max_new_tokens, chain, prefill_chain)
        tokens = prompt.clone()
        if not scales:
            return tokens
        cache = self.new_cache(prompt.shape[0], prompt.shape[1] + len(scales))
        if prompt.shape[1] > 1:
            self._hidden(prompt[:, :-1], prefill, cache)
        for s in scales:
            h = self._hidden(tokens[:, -1:], s, cache)
            logits = F.linear(h[:, -1], self.output.weight[:, : h.shape[-1]])
            tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
        return tokens
