"""Public functional ops; each dispatches to a backend (``reference``, ``triton``, ``cuda``)."""
from .chain_attention.api import chain_attention
from .chain_linear.api import chain_linear
from .chain_rmsnorm.api import chain_rmsnorm
from .multi_chain_cross_entropy.api import multi_chain_cross_entropy
from .. import backends as _backends

_backends.preload_available()

__all__ = ["chain_attention", "chain_linear", "chain_rmsnorm", "multi_chain_cross_entropy"]
