"""Ops, one subpackage each (``ops/<op>/api.py`` holds the public function).

Importing this package registers every op's backends. The public functions are re-exported from
``colm_kernels`` itself; here the names stay bound to the subpackages, so
``import colm_kernels.ops.chain_linear.triton_kernels`` keeps working.
"""
from .. import backends as _backends
from .chain_attention import api as _chain_attention_api  # noqa: F401
from .chain_attention_decode import api as _chain_attention_decode_api  # noqa: F401
from .chain_linear import api as _chain_linear_api  # noqa: F401
from .chain_rmsnorm import api as _chain_rmsnorm_api  # noqa: F401
from .chain_swiglu import api as _chain_swiglu_api  # noqa: F401
from .multi_chain_cross_entropy import api as _multi_chain_cross_entropy_api  # noqa: F401

_backends.preload_available()
