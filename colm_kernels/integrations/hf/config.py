"""``CoLMHFConfig``: a ``transformers`` config (``model_type = "colm"``) over ``models.CoLMConfig``.

Field names follow transformers' LLaMA config (``hidden_size``, ``num_attention_heads``,
``max_position_embeddings``, ...) so generic tooling reads them; ``chains``, ``kv_sharing`` and
``kv_mapping`` are CoLM's own. Every check is ``CoLMConfig``'s: an impossible layout raises
``ValueError`` naming the field.

``save_pretrained`` (of the config, so of the model too) writes ``colm_auto.py`` beside
``config.json`` and an ``auto_map`` naming it: ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` then loads the folder in a process that never imported colm_kernels (the
file imports the installed package's classes; it holds no model code of its own).
"""
from __future__ import annotations

import os

from transformers import PreTrainedConfig

from ...models import CoLMConfig

AUTO_MODULE = "colm_auto"
AUTO_MAP = {
    "AutoConfig": f"{AUTO_MODULE}.CoLMHFConfig",
    "AutoModel": f"{AUTO_MODULE}.CoLMModel",
    "AutoModelForCausalLM": f"{AUTO_MODULE}.CoLMForCausalLM",
}
AUTO_SOURCE = '''"""Loads this checkpoint with the installed colm_kernels package (pip install "colm-kernels[hf]"):
AutoModelForCausalLM.from_pretrained(<this folder>, trust_remote_code=True) imports its classes from
here. Written by CoLMHFConfig.save_pretrained; the model code lives in colm_kernels.integrations.hf."""
from colm_kernels.integrations.hf import CoLMForCausalLM, CoLMHFConfig, CoLMModel  # noqa: F401
'''


class CoLMHFConfig(PreTrainedConfig):
    model_type = "colm"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    chains: list[int] | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    kv_sharing: bool = False
    kv_mapping: str = "tile"
    initializer_range: float = 0.02
    use_cache: bool = True
    # The longest sequence the checkpoint is meant for, which tools (eval harnesses, serving engines)
    # read; RoPE itself has no limit and the model does not enforce it. LlamaConfig's default.
    max_position_embeddings: int = 2048
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.chains is None:
            self.chains = [self.num_attention_heads]  # one chain: a plain LLaMA
        if isinstance(self.chains, tuple):
            self.chains = list(self.chains)  # JSON round trip: config.json stores a list
        if self.tie_word_embeddings:
            raise ValueError("CoLMHFConfig.tie_word_embeddings must be False: a CoLM's output head has "
                             "its own weights (the new chains' head columns start at zero)")
        super().__post_init__(**kwargs)
        self.to_colm_config()  # every layout check, at construction

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """``PreTrainedConfig.save_pretrained``, plus ``colm_auto.py`` and the ``auto_map`` naming it."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory!r}")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, f"{AUTO_MODULE}.py"), "w", encoding="utf-8") as f:
            f.write(AUTO_SOURCE)  # before the upload a push_to_hub makes
        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_colm_config(self) -> CoLMConfig:
        try:
            chains = tuple(self.chains)
        except TypeError:
            raise TypeError(f"CoLMHFConfig.chains must be a list of positive ints, got {self.chains!r}") from None
        return CoLMConfig(
            dim=self.hidden_size, n_layers=self.num_hidden_layers, n_heads=self.num_attention_heads,
            n_kv_heads=self.num_key_value_heads, vocab_size=self.vocab_size, chains=chains,
            ffn_hidden_dim=self.intermediate_size, norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            kv_sharing=self.kv_sharing, kv_mapping=self.kv_mapping,
        )

    @classmethod
    def from_colm_config(cls, config: CoLMConfig, **kwargs) -> "CoLMHFConfig":
        if not isinstance(config, CoLMConfig):
            raise TypeError(f"config must be a CoLMConfig, got {type(config).__name__}")
        return cls(
            vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_hidden_dim,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads, chains=list(config.chains), rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_theta, kv_sharing=config.kv_sharing, kv_mapping=config.kv_mapping,
            **kwargs,
        )
