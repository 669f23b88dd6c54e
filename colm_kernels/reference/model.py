"""Plain eager CoLM / CoLM-Air: the float64 correctness anchor for the optimized package.

Written straight from the paper's pseudo-code (arXiv 2505.11820, Algorithms 1-6) and
``/work/shared/COLM_SPEC.md``: per-chain Python loops, explicit softmax attention with the repeated
K/V materialised, RoPE in real arithmetic. Clarity and exactness beat speed here; nothing in this
file may depend on the optimized code (it imports only ``chains`` and ``CoLMConfig``).

Convention: ``chain`` is the 0-based index of the last active chain (``None``: all), so the
sub-model at ``chain=k`` spans the first ``P_(k+1)`` features of every width.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from colm_kernels.chains import Chains
from colm_kernels.models.config import CoLMConfig
from colm_kernels.models.decoding import check_tokens, plan_decoding

# One entry per layer: [K, V], each (batch, n_kv_heads_cached, cached_len, head_dim) or None.
KVCache = List[List[Optional[torch.Tensor]]]


class ChainLinear(nn.Module):
    """Algorithm 1: output chain i is ``mlps[i](x[..., :P_i_in])``; keys ``mlps.{i}.weight``."""

    def __init__(self, in_features: int, out_features: int, chains: Chains, bias: bool = False):
        super().__init__()
        self.chains = chains
        self.in_prefixes = chains.prefixes(in_features, name="in_features")
        out_widths = chains.widths(out_features, name="out_features")
        self.mlps = nn.ModuleList(
            nn.Linear(p_in, d_out, bias=bias) for p_in, d_out in zip(self.in_prefixes, out_widths)
        )

    def forward(self, x: torch.Tensor, chain=None) -> torch.Tensor:
        k = self.chains.check_chain(chain)
        # x may be wider than needed: each chain reads only the prefix it is allowed to see.
        return torch.cat([self.mlps[i](x[..., : self.in_prefixes[i]]) for i in range(k + 1)], dim=-1)


class ChainRMSNorm(nn.Module):
    """RMSNorm applied to every chain segment separately (so chain i never sees chain j > i)."""

    def __init__(self, dim: int, chains: Chains, eps: float):
        super().__init__()
        self.chains = chains
        self.eps = eps
        self.offsets = chains.offsets(dim)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, chain=None) -> torch.Tensor:
        k = self.chains.check_chain(chain)
        segments = []
        for i in range(k + 1):
            a, b = self.offsets[i], self.offsets[i + 1]
            x_i = x[..., a:b]
            rms = torch.sqrt(x_i.pow(2).mean(dim=-1, keepdim=True) + self.eps)
            segments.append(x_i / rms * self.weight[a:b])
        return torch.cat(segments, dim=-1)


def rope_cos_sin(head_dim: int, positions: torch.Tensor, theta: float, dtype: torch.dtype):
    """cos/sin of Meta's ``precompute_freqs_cis`` angles, shape (len(positions), head_dim // 2).

    Angles are formed in float64 (so a float64 model keeps full precision) and cast to ``dtype``.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(positions.to(torch.float64), freqs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2t, 2t+1) of ``x`` (batch, seq, heads, head_dim).

    Same as ``view_as_complex(x.reshape(..., -1, 2)) * freqs_cis``, in real arithmetic.
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # broadcast over batch and heads
    out0 = x0 * cos - x1 * sin
    out1 = x0 * sin + x1 * cos
    return torch.stack([out0, out1], dim=-1).reshape(x.shape)


class Attention(nn.Module):
    def __init__(self, config: CoLMConfig):
        super().__init__()
        chains = config.chain_config
        self.config = config
        self.chains = chains
        self.head_dim = config.head_dim
        dim = config.dim
        self.wq = ChainLinear(dim, dim, chains)
        self.wo = ChainLinear(dim, dim, chains)
        if config.kv_sharing:
            # CoLM-Air: K/V come from chain 1 only and are shared by every query head.
            self.p1 = chains.prefixes(dim)[0]
            self.wk = nn.Linear(self.p1, config.kv_dim, bias=False)
            self.wv = nn.Linear(self.p1, config.kv_dim, bias=False)
        else:
            self.wk = ChainLinear(dim, config.kv_dim, chains)
            self.wv = ChainLinear(dim, config.kv_dim, chains)

    def forward(self, x, chain: int, cos, sin, layer_cache=None):
        cfg = self.config
        bsz, seqlen, _ = x.shape
        hd = self.head_dim

        q = self.wq(x, chain).view(bsz, seqlen, -1, hd)
        if cfg.kv_sharing:
            k = self.wk(x[..., : self.p1]).view(bsz, seqlen, -1, hd)
            v = self.wv(x[..., : self.p1]).view(bsz, seqlen, -1, hd)
        else:
            # Only the kv heads owned by the active chains exist at this scale.
            k = self.wk(x, chain).view(bsz, seqlen, -1, hd)
            v = self.wv(x, chain).view(bsz, seqlen, -1, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        # (batch, heads, seq, head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        n_kv = k.shape[1]

        if layer_cache is not None:
            cached_k, cached_v = layer_cache
            if cached_k is not None:
                if cached_k.shape[1] < n_kv:
                    raise ValueError(
                        f"chain={chain} needs {n_kv} kv heads but the KV cache holds only "
                        f"{cached_k.shape[1]}: the KV cache would be incomplete"
                    )
                # A smaller scale uses the prefix of the cached kv heads; the cache then shrinks
                # to what every cached position has.
                k = torch.cat([cached_k[:, :n_kv], k], dim=2)
                v = torch.cat([cached_v[:, :n_kv], v], dim=2)
            layer_cache[0], layer_cache[1] = k, v

        # Materialise the repeated K/V, as the paper's code does (``repeat``).
        kv_map = self.chains.kv_head_map(
            cfg.n_kv_heads, kv_sharing=cfg.kv_sharing, kv_mapping=cfg.kv_mapping, chain=chain
        )
        index = torch.tensor(kv_map, dtype=torch.long, device=x.device)
        k_rep = k.index_select(1, index)
        v_rep = v.index_select(1, index)

        scores = q @ k_rep.transpose(-2, -1) * hd**-0.5
        # Causal mask, bottom-right aligned: query i sits at absolute position start + i.
        kv_len = k.shape[2]
        start = kv_len - seqlen
        q_pos = torch.arange(seqlen, device=x.device)[:, None] + start
        k_pos = torch.arange(kv_len, device=x.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = (probs @ v_rep).transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(out, chain)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` with chain linears."""

    def __init__(self, config: CoLMConfig):
        super().__init__()
        chains = config.chain_config
        self.w1 = ChainLinear(config.dim, config.ffn_hidden_dim, chains)
        self.w2 = ChainLinear(config.ffn_hidden_dim, config.dim, chains)
        self.w3 = ChainLinear(config.dim, config.ffn_hidden_dim, chains)

    def forward(self, x, chain: int):
        return self.w2(F.silu(self.w1(x, chain)) * self.w3(x, chain), chain)


class TransformerBlock(nn.Module):
    def __init__(self, config: CoLMConfig):
        super().__init__()
        chains = config.chain_config
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = ChainRMSNorm(config.dim, chains, config.norm_eps)
        self.ffn_norm = ChainRMSNorm(config.dim, chains, config.norm_eps)

    def forward(self, x, chain: int, cos, sin, layer_cache=None):
        h = x + self.attention(self.attention_norm(x, chain), chain, cos, sin, layer_cache)
        return h + self.feed_forward(self.ffn_norm(h, chain), chain)


class CoLM(nn.Module):
    """A LLaMA-style Chain-of-Model LM (TorchTitan llama3 parameter names)."""

    def __init__(self, config: CoLMConfig):
        super().__init__()
        if not isinstance(config, CoLMConfig):
            raise TypeError(f"config must be a CoLMConfig, got {type(config).__name__}")
        self.config = config
        self.chains = config.chain_config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = ChainRMSNorm(config.dim, self.chains, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for the embedding and every linear, ones for the norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, ChainRMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor, chain=None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) of the sub-model at ``chain``.

        ``cache`` (used by :meth:`generate`) is a per-layer list of ``[K, V]`` that is extended in
        place; the new tokens start at the position after the cached ones.
        """
        check_tokens(tokens, "tokens", self.config.vocab_size)
        k = self.chains.check_chain(chain)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache must have one [K, V] entry per layer ({len(self.layers)}), got {len(cache)}")
        width = self.chains.active_width(self.config.dim, k)  # P_(k+1)

        start = 0
        if cache is not None and cache[0][0] is not None:
            start = cache[0][0].shape[2]
        h = self.tok_embeddings(tokens)[..., :width]
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        cos, sin = rope_cos_sin(self.config.head_dim, positions, self.config.rope_theta, h.dtype)

        for l, layer in enumerate(self.layers):
            h = layer(h, k, cos, sin, None if cache is None else cache[l])
        h = self.norm(h, k)
        # Output head at scale k reads only the first P_(k+1) columns.
        return h @ self.output.weight[:, :width].T

    def new_cache(self) -> KVCache:
        return [[None, None] for _ in self.layers]

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        chain: Union[None, int, Sequence[int]] = None,
        prefill_chain: Optional[int] = None,
    ) -> torch.Tensor:
        """Greedy decoding with a KV cache; ``chain`` may give one scale per new token.

        ``prompt[:, :-1]`` is prefilled at ``prefill_chain`` (default: the first decode scale), then
        each step feeds one token at its scale. Without KV sharing the cache holds only the kv heads
        of the scales that computed it, so a step may not use a larger scale than any cached
        position was computed at.
        """
        check_tokens(prompt, "prompt", self.config.vocab_size)
        # The rules (one scale per step, prefill scale, complete KV cache) are shared with
        # models.CoLM so both models refuse and accept exactly the same requests.
        prefill, scales = plan_decoding(
            self.chains, self.config.kv_sharing, prompt.shape[1], max_new_tokens, chain, prefill_chain
        )

        tokens = prompt
        if not scales:
            return tokens.clone()
        cache = self.new_cache()
        if prompt.shape[1] > 1:
            self(prompt[:, :-1], prefill, cache=cache)
        for s in scales:
            logits = self(tokens[:, -1:], s, cache=cache)
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
        return tokens
