"""``CoLMCheckpointManager``: TorchTitan's DCP checkpoint manager whose HF-format save
(``--checkpoint.last_save_in_hf``) also writes the ``config.json`` of ``CoLMForCausalLM``
(``model_type="colm"``, the flavour's layout, ``dtype`` = ``--checkpoint.export_dtype``; token ids
from ``<hf_assets_path>/config.json`` when it has them), so the folder loads with
``transformers.AutoModelForCausalLM.from_pretrained`` (after ``import colm_kernels.integrations.hf``,
which registers the model type).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch.distributed as dist
from torchtitan.components.checkpoint import CheckpointManager

TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _token_ids(hf_assets_path: str | None) -> dict:
    path = os.path.join(hf_assets_path, "config.json") if hf_assets_path else None
    if path is None or not os.path.isfile(path):
        return {}
    with open(path) as f:
        config = json.load(f)
    return {k: config[k] for k in TOKEN_IDS if config.get(k) is not None}


def write_hf_config(model_config, folder: str, *, dtype=None, hf_assets_path: str | None = None) -> str:
    """Write ``folder/config.json`` for the ``CoLMTitanModel.Config`` ``model_config``; returns its path."""
    from ..hf import CoLMHFConfig

    config = CoLMHFConfig.from_colm_config(model_config.colm_config(), architectures=["CoLMForCausalLM"],
                                           dtype=dtype, **_token_ids(hf_assets_path))
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    return os.path.join(folder, "config.json")


class CoLMCheckpointManager(CheckpointManager):
    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    def __init__(self, config: Config, **kwargs):
        if config.enable and config.last_save_in_hf:
            try:
                import transformers  # noqa: F401
            except ImportError as e:
                raise ImportError("checkpoint.last_save_in_hf writes the HF config.json with transformers: "
                                  'pip install -e ".[hf]"') from e
        super().__init__(config, **kwargs)

    def dcp_save(self, state_dict, checkpoint_id, async_mode, enable_garbage_collection=False, to_hf=False):
        result = super().dcp_save(state_dict, checkpoint_id, async_mode,
                                  enable_garbage_collection=enable_garbage_collection, to_hf=to_hf)
        if to_hf and (not dist.is_initialized() or dist.get_rank() == 0):
            write_hf_config(self.sd_adapter.model_config, checkpoint_id, dtype=self.export_dtype,
                            hf_assets_path=self.sd_adapter.hf_assets_path)
        return result
