"""CoLM / CoLM-Air models built from ``colm_kernels.nn``."""
from .colm import CoLM
from .config import CoLMConfig
from .expand import expand_chains, expanded_config, freeze_chains

__all__ = ["CoLM", "CoLMConfig", "expand_chains", "expanded_config", "freeze_chains"]
