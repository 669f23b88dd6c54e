"""``CoLMStateDictAdapter``: TorchTitan's CoLM keys <-> ``integrations.hf.CoLMForCausalLM`` keys
(``model.`` + the same names), so TorchTitan saves and loads checkpoints in the HF model's
safetensors layout (``checkpoint.last_save_in_hf`` / ``initial_load_in_hf``)."""
from __future__ import annotations

from typing import Any

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

PREFIX = "model."


class CoLMStateDictAdapter(StateDictAdapter):
    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {PREFIX + key: value for key, value in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        foreign = [k for k in hf_state_dict if not k.startswith(PREFIX)]
        if foreign:
            raise ValueError(f"hf_state_dict has keys that are not a CoLMForCausalLM's ('{PREFIX}...'): "
                             f"{foreign[:5]}")
        return {key[len(PREFIX):]: value for key, value in hf_state_dict.items()}
