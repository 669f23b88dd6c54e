"""``autotune``: ``triton.autotune`` as every kernel of the package uses it, and what its
benchmark runs may and may not do to a kernel's buffers.

- ``autotune``: the early pruner of the config list, ``COLM_KERNELS_AUTOTUNE=0`` (first kept
  config only), ``force_config(i)`` (tests of every config), ``reset_to_zero`` / ``restore_value``
  for kernels whose launches are not idempotent (``ACCUMULATING_KERNELS`` lists them and why),
  and the interpreter's benchmark stand-in (reruns under ``gpu_semantics``).
- ``autotuned_kernels`` / ``clear_tuning_caches``: every autotuner made here.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional, Sequence

import triton

from .device import is_interpreter

__all__ = ["autotune", "autotune_enabled", "force_config", "autotuned_kernels", "clear_tuning_caches",
           "ACCUMULATING_KERNELS"]


_AUTOTUNED: List = []  # every kernel made by ``autotune`` below, for ``force_config``
_forced_index: Optional[int] = None


def autotune_enabled() -> bool:
    """False when ``COLM_KERNELS_AUTOTUNE=0``: each autotuned kernel then runs the first config its
    pruner keeps. The GPU test suite sets it (tuning every small test layout would spend its time
    compiling); ``tests/ops/test_triton_configs.py`` checks every config instead."""
    return os.environ.get("COLM_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _interpreter_bench(kernel_call, quantiles=None, **kw):
    """The interpreter's "benchmark". Normally nothing to time, and the kernel is not run for it,
    so every kept config ties and the first runs (needed where a list of several configs is pruned
    to one: Triton 3.6 benchmarks even a single survivor). Under the GPU-semantics emulation
    (``gpu_semantics``) the kernel is rerun into the live buffers, as ``do_bench`` does on a GPU."""
    from colm_kernels._triton import gpu_semantics  # late: it patches the interpreter

    if gpu_semantics.active():
        return gpu_semantics.rerun_bench(kernel_call, quantiles=quantiles, **kw)
    return [1.0, 1.0, 1.0] if quantiles else 1.0


def autotune(configs: List[triton.Config], key: List[str], prune: Callable, *,
             reset_to_zero: Sequence[str] = (), restore_value: Sequence[str] = ()):
    """``triton.autotune(configs, key)`` with ``prune`` as its early pruner, narrowed to one config
    when autotuning is off or a config is forced.

    The autotuner benchmarks a new key by launching every kept config many times into the live
    argument buffers (Triton 3.6: even a single kept config). A kernel that accumulates into an
    output (atomics) must name it in ``reset_to_zero``; one that reads an output back (``+=`` of
    a previous launch's partial sum) must name it in ``restore_value``. The list of such kernels,
    and why each is safe, is ``ACCUMULATING_KERNELS`` below; a test holds every kernel to it."""

    def narrowed(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs)
        if _forced_index is not None:
            kept = [kept[min(_forced_index, len(kept) - 1)]]
        elif not autotune_enabled():
            kept = kept[:1]
        if len(kept) == 1 and is_interpreter():
            from colm_kernels._triton import gpu_semantics

            if gpu_semantics.active():  # Triton 3.6 (the GPUs') benchmarks a single survivor too
                kept = kept * 2
        return kept

    def wrap(fn):
        tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": narrowed},
                                reset_to_zero=list(reset_to_zero) or None,
                                restore_value=list(restore_value) or None,
                                do_bench=_interpreter_bench if is_interpreter() else None)(fn)
        _AUTOTUNED.append(tuned)
        return tuned

    return wrap


# Autotuned kernels whose launches are not idempotent, i.e. that would give a wrong result if the
# autotuner's benchmark runs went into the same buffers first, and what makes each safe. Every
# other autotuned kernel only writes its outputs (each element by one program, from inputs it does
# not write), so rerunning it rewrites the same values. ``tests/ops/test_autotune_safety.py``
# checks that each kernel with ``tl.atomic_*`` or a read of an output is listed here with the
# declaration, and the GPU-semantics mode (``gpu_semantics``) checks the results of first calls.
ACCUMULATING_KERNELS = {
    # dQ += dS K by fp32 atomics from every key block into a zeroed buffer (DQ_ATOMIC; without it
    # DQ is a one-element stand-in, so nothing else is ever zeroed)
    "_chain_attention_bwd_kernel": {"reset_to_zero": ("DQ",)},
    # row chunks of the cross-entropy dW: OUT = alpha G^T h + ACC (LOAD_ACC), OUT often ACC itself
    "_mcce_bwd_dw_kernel": {"restore_value": ("OUT",)},
}


def autotuned_kernels() -> List:
    """The autotuners ``autotune`` has made (one per kernel of every imported module)."""
    return list(_AUTOTUNED)


def clear_tuning_caches() -> None:
    """Forget every tuned choice (the next launch of each key tunes again)."""
    for kernel in _AUTOTUNED:
        kernel.cache.clear()


@contextlib.contextmanager
def force_config(index: int):
    """Within the block every autotuned kernel runs the ``index``-th config its pruner keeps (the last
    one when it keeps fewer). Tuning caches are cleared on entry and exit, so no choice leaks."""
    global _forced_index
    saved = _forced_index
    clear_tuning_caches()
    _forced_index = int(index)
    try:
        yield
    finally:
        _forced_index = saved
        clear_tuning_caches()
