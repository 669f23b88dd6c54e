"""CoLM for Hugging Face ``transformers`` (``pip install -e ".[hf]"``).

``CoLMHFConfig`` (``model_type = "colm"``) and ``CoLMForCausalLM`` (``PreTrainedModel`` +
``GenerationMixin``, on ``colm_kernels.nn``); importing this module registers both with
``AutoConfig`` / ``AutoModelForCausalLM``. ``to_hf`` / ``from_hf`` convert to and from
``colm_kernels.models.CoLM``; ``CoLMForCausalLM.from_llama`` grows a transformers LLaMA by chain
expansion.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .cache import CoLMCache
from .config import CoLMHFConfig
from .convert import from_hf, from_llama, half_split_to_interleaved, interleaved_to_half_split, to_hf
from .modeling import CoLMForCausalLM, CoLMPreTrainedModel

AutoConfig.register(CoLMHFConfig.model_type, CoLMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(CoLMHFConfig, CoLMForCausalLM, exist_ok=True)

__all__ = ["CoLMCache", "CoLMForCausalLM", "CoLMHFConfig", "CoLMPreTrainedModel", "from_hf", "from_llama",
           "half_split_to_interleaved", "interleaved_to_half_split", "to_hf"]
