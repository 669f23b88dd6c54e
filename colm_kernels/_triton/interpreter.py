"""Triton's CPU interpreter (``TRITON_INTERPRET=1``), made faster for kernels built from many small
``@triton.jit`` helpers.

The interpreter re-patches ``triton.language`` (``inspect.getmembers`` over the whole module, a
wrapper per builtin) on every call of a device function, although the launch around it has patched
the same modules already. Kernels that call helpers in loops (the attention kernels' recursive
diagonal, the tile helpers) spent most of their interpreter time there. ``skip_repatching()``
keeps that work to once per launch per language module (a nested call whose modules the launch
has patched runs as is) and caches the dtype table's answers. Results are unchanged (the patches are the same functions); the test suite
and colm-bench's interpreter counts opt in, the package itself never patches Triton on import.
"""
from __future__ import annotations

import inspect
from typing import Dict, FrozenSet, List

__all__ = ["skip_repatching"]

_installed = False


def skip_repatching() -> None:
    """Install the once-per-launch patching of ``triton.language`` (idempotent)."""
    global _installed
    if _installed:
        return
    from triton.runtime import interpreter as interp

    tl = interp.tl
    patched: List[set] = []  # per active launch: the language modules patched so far
    langs_of: Dict[object, FrozenSet[int]] = {}
    original_patch = interp._patch_lang
    original_call = interp.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return original_call(self, *args, **kwargs)
        finally:
            patched.pop()

    def patch_lang(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = frozenset(id(v) for v in fn.__globals__.values()
                              if inspect.ismodule(v) and v in (tl, tl.core))
            langs_of[fn] = langs
        if patched and langs <= patched[-1]:
            return interp._LangPatchScope()  # nothing new to patch, nothing to restore
        scope = original_patch(fn)
        if patched:
            patched[-1].update(langs)
        return scope

    np_dtypes: Dict[object, object] = {}
    original_np_dtype = interp._get_np_dtype

    def np_dtype(tt_dtype):  # the original builds its whole table on each of its many calls
        try:
            return np_dtypes[tt_dtype]
        except KeyError:
            np_dtypes[tt_dtype] = out = original_np_dtype(tt_dtype)
            return out
        except TypeError:  # unhashable: not cached
            return original_np_dtype(tt_dtype)

    interp.GridExecutor.__call__ = launch
    interp._patch_lang = patch_lang
    interp._get_np_dtype = np_dtype
    _installed = True
