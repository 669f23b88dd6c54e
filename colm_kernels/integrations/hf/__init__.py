"""CoLM for Hugging Face ``transformers`` (``pip install -e ".[hf]"``).

``CoLMHFConfig`` (``model_type = "colm"``), ``CoLMForCausalLM`` (``PreTrainedModel`` +
``GenerationMixin``, on ``colm_kernels.nn``) and the base ``CoLMModel`` (hidden states); importing
this module registers them with ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoModel``, and a
saved checkpoint names them in its ``auto_map`` (``trust_remote_code=True`` loads it without the
import). ``to_hf`` / ``from_hf`` convert to and from
``colm_kernels.models.CoLM``; ``CoLMForCausalLM.from_llama`` grows a transformers LLaMA by chain
expansion.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import CoLMCache
from .config import CoLMHFConfig
from .convert import from_hf, from_llama, half_split_to_interleaved, interleaved_to_half_split, to_hf
from .modeling import CoLMForCausalLM, CoLMModel, CoLMPreTrainedModel

AutoConfig.register(CoLMHFConfig.model_type, CoLMHFConfig, exist_ok=True)
AutoModel.register(CoLMHFConfig, CoLMModel, exist_ok=True)
AutoModelForCausalLM.register(CoLMHFConfig, CoLMForCausalLM, exist_ok=True)

__all__ = ["CoLMCache", "CoLMForCausalLM", "CoLMHFConfig", "CoLMModel", "CoLMPreTrainedModel", "from_hf",
           "from_llama", "half_split_to_interleaved", "interleaved_to_half_split", "to_hf"]
