"""``CoLMHFConfig``: a ``transformers`` config (``model_type = "colm"``) over ``models.CoLMConfig``.

Field names follow transformers' LLaMA config (``hidden_size``, ``num_attention_heads``, ...) so
generic tooling reads them; ``chains``, ``kv_sharing`` and ``kv_mapping`` are CoLM's own. Every
check is ``CoLMConfig``'s: an impossible layout raises ``ValueError`` naming the field.
"""
from __future__ import annotations

from transformers import PreTrainedConfig

from ...models import CoLMConfig


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
