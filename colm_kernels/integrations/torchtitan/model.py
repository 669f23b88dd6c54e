"""``CoLMTitanModel``: ``models.CoLM`` as a TorchTitan model (``BaseModel``, built from its
``Config`` by the trainer on the meta device, initialised by ``init_states``).

It is a ``models.CoLM`` (same modules from ``colm_kernels.nn``, same state-dict keys, ``generate``
and ``multi_chain_loss``), so a TorchTitan checkpoint loads into ``models.CoLM`` and the HF model
through the state-dict adapter. ``forward(tokens)`` returns full-scale logits (what TorchTitan's
validator and generic losses expect); ``forward(tokens, labels=labels)`` returns the summed
next-token cross-entropy at every scale ``(n_chains,)`` from one pass, through
``multi_chain_cross_entropy`` (no logit tensor per scale), which ``MultiChainLoss`` weights.
Under tensor parallelism (``tensor_parallel``) the logits are a ``Shard(-1)`` DTensor over the
vocabulary and the per-scale loss comes from the vocabulary-parallel head.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor
from torchtitan.models.utils import get_dense_model_nparams_and_flops
from torchtitan.protocols.model import BaseModel

from ...models import CoLM, CoLMConfig
from ...ops.multi_chain_cross_entropy.api import multi_chain_cross_entropy
from .tensor_parallel import TensorParallelLayout, VocabParallelHead, init_on_shards

IGNORE_INDEX = -100


class CoLMTitanModel(BaseModel, CoLM):
    # One weight per scale (``CoLMTrainer`` sets ``MultiChainLoss``'s): forward(tokens, labels) then
    # returns their weighted sum. None: the per-scale sums.
    loss_weights = None

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        """``CoLMConfig``'s fields, plus ``init_std`` and ``freeze_chains`` (chain tuning: the
        first ``freeze_chains`` chains keep their weights; see ``integrations.torchtitan.tuning``)."""

        dim: int
        n_layers: int
        n_heads: int
        n_kv_heads: int
        vocab_size: int
        chains: tuple[int, ...]
        ffn_hidden_dim: int
        norm_eps: float = 1e-5
        rope_theta: float = 500000.0
        kv_sharing: bool = False
        kv_mapping: str = "tile"
        init_std: float = 0.02
        freeze_chains: int = 0

        def colm_config(self) -> CoLMConfig:
            return CoLMConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                              n_kv_heads=self.n_kv_heads, vocab_size=self.vocab_size, chains=tuple(self.chains),
                              ffn_hidden_dim=self.ffn_hidden_dim, norm_eps=self.norm_eps,
                              rope_theta=self.rope_theta, kv_sharing=self.kv_sharing, kv_mapping=self.kv_mapping)

        def update_from_config(self, *, config, **kwargs) -> None:
            """Checks against the trainer's config, before anything is built."""
            self.colm_config()
            n = len(self.chains)
            if isinstance(self.freeze_chains, bool) or not isinstance(self.freeze_chains, int) \
                    or not 0 <= self.freeze_chains < n:
                raise ValueError(f"freeze_chains={self.freeze_chains!r} must be an int in [0, {n - 1}] "
                                 f"(chains to freeze out of chains={tuple(self.chains)})")
            parallelism = getattr(config, "parallelism", None)
            if parallelism is not None:
                check_parallelism(parallelism)
                tp = getattr(parallelism, "tensor_parallel_degree", 1)
                if tp > 1:
                    TensorParallelLayout.build(self.colm_config(), tp)

        def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
            # Chain linears hold only their lower-triangular blocks, so the 6 * params term counts
            # useful GEMM FLOPs (spec section 2); attention counts every head, as TorchTitan does.
            return get_dense_model_nparams_and_flops(model, self.n_layers, self.n_heads,
                                                     2 * (self.dim // self.n_heads), seq_len)

    def __init__(self, config: Config):
        CoLM.__init__(self, config.colm_config())
        self.titan_config = config

    def init_states(self, *, buffer_device: Optional[torch.device] = None) -> None:
        """``models.CoLM``'s initialisation (normal(0, init_std) linears and embedding, unit gains);
        runs on DTensor shards after FSDP too, and under tensor parallelism through
        ``init_on_shards`` (independent shards, replicated parameters equal on every rank)."""
        titan = self.__dict__.get("titan_config")
        std = titan.init_std if titan is not None else 0.02
        tp_mesh = self.__dict__.get("tp_mesh")
        if tp_mesh is None:
            CoLM.init_weights(self, std=std)
        else:
            init_on_shards(self, tp_mesh, lambda: CoLM.init_weights(self, std=std))

    def verify_module_protocol(self) -> None:
        """The blocks are ``colm_kernels.nn`` modules, not TorchTitan ``Module`` s: TorchTitan's
        per-module sharding protocol is not used (``parallelize_colm`` applies FSDP2 itself)."""

    def forward(self, tokens: Tensor, labels: Optional[Tensor] = None, positions: Optional[Tensor] = None,
                chain=None) -> Tensor:
        """``positions`` (per-document RoPE positions of TorchTitan's packing dataloader) are not
        used: CoLM trains causally over each whole row, RoPE from 0 (as TorchTitan's llama3 does
        with SDPA's plain causal mask). With labels: every scale's summed cross-entropy
        ``(n_chains,)``, or, when ``loss_weights`` (one per scale) is set on the model (``CoLMTrainer``
        sets ``MultiChainLoss``'s), their weighted sum, a scalar (``multi_chain_cross_entropy``'s
        ``weights``: the head's gradients are computed in the forward, 3 logit-sized GEMMs instead of
        4). The tensor-parallel head always returns the vector."""
        if labels is None:
            return CoLM.forward(self, tokens, chain)
        hidden = self.hidden(tokens, chain)
        if isinstance(self.output, VocabParallelHead):
            return self.output.loss_sums(hidden, labels, self.chains, IGNORE_INDEX)
        weights = getattr(self, "loss_weights", None)
        if weights is not None:  # one scalar: the head's gradients come from the forward (3 GEMMs)
            return multi_chain_cross_entropy(hidden, self.output.weight, labels, self.chains, IGNORE_INDEX,
                                             reduction="sum", weights=weights)
        means = multi_chain_cross_entropy(hidden, self.output.weight, labels, self.chains, IGNORE_INDEX)
        count = (labels != IGNORE_INDEX).sum()
        # sums (what TorchTitan divides by the global token count); a row of ignored labels adds 0
        return torch.where(count > 0, means * count, torch.zeros_like(means))


def check_parallelism(parallelism) -> None:
    """CoLM composes with data parallelism (FSDP2 / HSDP) and tensor parallelism (``parallelize_colm``
    checks the chains against the TP degree), not with context, pipeline or expert parallelism."""
    asked = [f"{name}={getattr(parallelism, name)}" for name in (
        "context_parallel_degree", "pipeline_parallel_degree",
        "expert_parallel_degree") if getattr(parallelism, name, 1) not in (1, None)]
    backend = getattr(parallelism, "spmd_backend", "partial_dtensor")
    if backend != "partial_dtensor":
        asked.append(f"spmd_backend={backend!r}")
    if asked:
        raise ValueError(f"CoLM on TorchTitan supports data parallelism (FSDP2 / HSDP) and tensor parallelism, "
                         f"with spmd_backend='partial_dtensor'; the config asks for {', '.join(asked)}")
