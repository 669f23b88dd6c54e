"""Autotuned kernels that are not idempotent declare it (``_triton/autotuning.py``'s
``ACCUMULATING_KERNELS``): the autotuner benchmarks a new key by launching each kept config into
the live buffers, so a kernel that adds into an output must have it zeroed between runs
(``reset_to_zero``) and one that reads an output back must have it restored (``restore_value``).
Statically: every kernel whose code (its own or a ``@triton.jit`` helper's) uses ``tl.atomic_*``
is listed, and each listed kernel's autotuner carries exactly the declared names. Dynamically the
GPU-semantics mode (tests/gpu_semantics) checks every op's first call against float64."""
import inspect

import colm_kernels.ops.chain_attention.triton_kernels  # noqa: F401  (registers the kernels)
import colm_kernels.ops.chain_linear.triton_kernels  # noqa: F401
import colm_kernels.ops.chain_swiglu.triton_kernels  # noqa: F401
import colm_kernels.ops.multi_chain_cross_entropy.triton_bwd  # noqa: F401
import colm_kernels.ops.multi_chain_cross_entropy.triton_fwd  # noqa: F401
from colm_kernels._triton.autotuning import ACCUMULATING_KERNELS, autotuned_kernels
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_JIT = (JITFunction, InterpretedFunction)  # @triton.jit gives the second under TRITON_INTERPRET=1


def _jit_sources(fn, seen=None):
    """Source of ``fn`` and of every ``@triton.jit`` function it reaches through its globals."""
    seen = set() if seen is None else seen
    if fn in seen:
        return ""
    seen.add(fn)
    src = inspect.getsource(fn.fn)
    for name, value in fn.fn.__globals__.items():
        if isinstance(value, _JIT) and name in src:
            src += _jit_sources(value, seen)
    return src


def _package_kernels():
    """The package's autotuners (tests' own deliberately wrong kernels left out)."""
    return {k.base_fn.__name__: k for k in autotuned_kernels() if k.base_fn.__module__.startswith("colm_kernels.")}


def test_every_accumulating_kernel_declares_its_outputs():
    kernels = _package_kernels()
    assert set(ACCUMULATING_KERNELS) <= set(kernels), "a listed kernel is not autotuned"
    for name, tuner in kernels.items():
        declared = ACCUMULATING_KERNELS.get(name, {})
        assert list(tuner.reset_to_zero) == list(declared.get("reset_to_zero", ())), name
        assert list(tuner.restore_value) == list(declared.get("restore_value", ())), name
        jit = tuner.fn
        while not isinstance(jit, _JIT):
            jit = jit.fn
        if "atomic_" in _jit_sources(jit):
            assert declared.get("reset_to_zero"), f"{name} adds with atomics but declares no reset_to_zero"


def test_the_scan_sees_atomics():
    attention = _package_kernels()["_chain_attention_bwd_kernel"]
    assert "tl.atomic_add" in _jit_sources(attention.fn)  # in its helper _bwd_rows
