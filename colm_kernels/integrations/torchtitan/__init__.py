"""CoLM on TorchTitan (``pip install -e ".[torchtitan]"``; TorchTitan 0.3.0's model API).

``model_registry(flavor)`` returns the ``ModelSpec`` (model config, ``parallelize_colm``: FSDP2 and
tensor parallelism, chain tuning hook, ``CoLMStateDictAdapter``); ``config_registry`` holds the
trainer configs ``torchrun ... -m torchtitan.train --module colm_kernels.integrations.torchtitan
--config <name>`` selects. Flavours: ``debugmodel`` / ``debugmodel_air`` (tiny), and the paper's
LLaMA-3.2-1B layout (16 layers, dim 2048, 32 heads, 8 kv heads) with chains 2 x 16 or 4 x 8, as
CoLM or CoLM-Air.
"""
from __future__ import annotations

from torchtitan.protocols.model_spec import ModelSpec

from .checkpoint import CoLMCheckpointManager
from .loss import MultiChainLoss
from .model import CoLMTitanModel
from .parallelize import parallelize_colm, post_optimizer_build
from .state_dict_adapter import CoLMStateDictAdapter
from .trainer import CoLMTrainer

_DEBUG = dict(dim=256, n_layers=6, n_heads=16, n_kv_heads=4, vocab_size=2048, chains=(8, 8),
              ffn_hidden_dim=768, rope_theta=500000.0)
_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_hidden_dim=8192,
           rope_theta=500000.0)

colm_configs = {
    "debugmodel": dict(_DEBUG),
    "debugmodel_air": dict(_DEBUG, kv_sharing=True, kv_mapping="chain_group"),
    "1B_c16x2": dict(_1B, chains=(16, 16)),
    "1B_c8x4": dict(_1B, chains=(8, 8, 8, 8)),
    "1B_air_c16x2": dict(_1B, chains=(16, 16), kv_sharing=True, kv_mapping="chain_group"),
    "1B_air_c8x4": dict(_1B, chains=(8, 8, 8, 8), kv_sharing=True, kv_mapping="chain_group"),
}


def model_registry(flavor: str, **overrides) -> ModelSpec:
    """The ``ModelSpec`` of a flavour; ``overrides`` replace config fields (e.g. ``freeze_chains=1``)."""
    if flavor not in colm_configs:
        raise ValueError(f"flavor={flavor!r} is not a CoLM flavour: expected one of {sorted(colm_configs)}")
    config = CoLMTitanModel.Config(**{**colm_configs[flavor], **overrides})
    config.colm_config()  # layout checks now, not at build time
    return ModelSpec(name="colm", flavor=flavor, model=config, parallelize_fn=parallelize_colm,
                     pipelining_fn=None, post_optimizer_build_fn=post_optimizer_build,
                     state_dict_adapter=CoLMStateDictAdapter)


__all__ = ["CoLMCheckpointManager", "CoLMStateDictAdapter", "CoLMTitanModel", "CoLMTrainer", "MultiChainLoss",
           "colm_configs", "model_registry", "parallelize_colm", "post_optimizer_build"]
