"""colm_kernels: kernels for Chain-of-Model language models (CoLM, CoLM-Air; arXiv 2505.11820).

Ops: ``chain_linear``, ``chain_swiglu``, ``chain_rmsnorm``, ``chain_attention``,
``chain_attention_decode`` (KV-cache decoding), ``multi_chain_cross_entropy``.
Backends: ``set_backend`` / ``use_backend`` / ``COLM_KERNELS_BACKEND`` with ``auto``, ``cuda``,
``triton``, ``reference``. Modules in ``colm_kernels.nn``, models in ``colm_kernels.models``, the
plain reference model in ``colm_kernels.reference``.
"""
from .backends import BackendError, get_backend, set_backend, use_backend
from .chains import Chains
from .ops.chain_attention.api import chain_attention
from .ops.chain_attention_decode.api import chain_attention_decode
from .ops.chain_linear.api import chain_linear
from .ops.chain_rmsnorm.api import chain_rmsnorm
from .ops.chain_swiglu.api import chain_swiglu
from .ops.multi_chain_cross_entropy.api import multi_chain_cross_entropy

__version__ = "0.1.0"

# Subpackages reachable as attributes (``ck.nn.ChainLinear``, as ``torch.nn``), imported on first
# use so that ``import colm_kernels`` stays as light as the ops.
_LAZY_SUBMODULES = ("nn", "models", "reference")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

__all__ = [
    "BackendError",
    "Chains",
    "chain_attention",
    "chain_attention_decode",
    "chain_linear",
    "chain_rmsnorm",
    "chain_swiglu",
    "get_backend",
    "multi_chain_cross_entropy",
    "set_backend",
    "use_backend",
]
