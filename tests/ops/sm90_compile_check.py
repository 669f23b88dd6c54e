"""Compile every Triton kernel of ``colm_kernels`` for an H100 (sm_90) on a machine without a GPU.

Run as a script (``python tests/ops/sm90_compile_check.py``) in a process WITHOUT
``TRITON_INTERPRET`` (``tests/ops/test_triton_compiles_for_sm90.py`` spawns it so). It

* installs a fake Triton driver whose current target is ``GPUTarget("cuda", 90, 32)`` and whose
  device / stream queries return dummies, so ``JITFunction.run`` binds, specialises and compiles
  exactly as a real launch on an H100 would (same signature, constexprs, divisibility attributes,
  ``num_warps`` / ``num_stages``);
* wraps ``triton.compiler.compile``: each kernel goes through the full pipeline down to a cubin
  with Triton's bundled ``ptxas``, its shared memory is checked against the H100's limit, and a
  stub that launches nothing is returned in place of the loaded kernel;
* replaces the autotuners' benchmark with a call that only compiles, so every config surviving
  ``early_config_prune`` is compiled (``triton.autotune`` would otherwise swallow
  ``OutOfResources`` / ``PTXASError`` of a config; here they are failures);
* calls the public launchers of every op on small CPU tensors (fp16 / bf16, aligned and
  unaligned shapes, varlen, several decode splits).

Nothing runs on a device. Exit status 0 iff every compile succeeded and every ``@triton.jit``
kernel module was covered; the last line is ``SM90_COMPILE_SUMMARY <json>``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
    sys.exit("sm90_compile_check must run without TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton.compiler as _tc  # noqa: E402
from triton.backends import DriverBase  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver as _driver  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_MAX_SHARED = 232448  # bytes: opt-in shared memory per block on sm_90 (227 KiB)
KERNEL_MODULES = (
    "colm_kernels.ops.chain_linear.triton_kernels",
    "colm_kernels.ops.chain_swiglu.triton_kernels",
    "colm_kernels.ops.chain_attention.triton_kernels",
    "colm_kernels.ops.chain_attention_decode.triton_kernels",
)

COMPILED = []  # dicts: kernel, module, num_warps, num_stages, shared, constexprs
FAILURES = []  # strings


# ----------------------------------------------------------------------------------------------
# Fake driver: target sm_90, dummy device / stream, compile-only "benchmark"
# ----------------------------------------------------------------------------------------------
def _compile_only_bench(kernel_call, quantiles=None, **_):
    kernel_call()  # compiles (the launch itself is stubbed); distinct timings are irrelevant
    return [1.0, 1.0, 1.0] if quantiles else 1.0


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": H100_MAX_SHARED, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}

    def load_binary(self, *args, **kwargs):
        raise RuntimeError("sm90_compile_check: nothing may be loaded on a device")


class Sm90CompileOnlyDriver(DriverBase):
    @classmethod
    def is_active(cls):
        return False

    def __init__(self):
        self.utils = _Utils()

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        raise RuntimeError("sm90_compile_check: no device interface")

    def get_benchmarker(self):
        return _compile_only_bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError


class _NoLaunch:
    """Stands in for the loaded ``CompiledKernel``: ``JITFunction.run`` launches through it."""

    function = None
    packed_metadata = None

    def __init__(self, compiled):
        self.compiled = compiled
        self.metadata = compiled.metadata

    def launch_metadata(self, *args, **kwargs):
        return None

    def run(self, *args, **kwargs):
        pass


_real_compile = _tc.compile


def _compile_for_sm90(src, target=None, options=None, _env_vars=None):
    fn = getattr(src, "fn", None)
    name = getattr(fn, "__name__", repr(src))
    module = getattr(fn, "module", getattr(fn, "__module__", "?"))
    consts = {".".join(map(str, k)) if isinstance(k, tuple) else str(k): v
              for k, v in getattr(src, "constants", {}).items()}
    opts = dict(options or {})
    tag = f"{module}.{name} warps={opts.get('num_warps')} stages={opts.get('num_stages')} {consts}"
    if target != TARGET:
        FAILURES.append(f"{tag}: compiled for {target}, expected {TARGET}")
    t0 = time.time()
    try:
        ck = _real_compile(src, target=TARGET, options=options)
    except Exception as e:  # noqa: BLE001  (autotune would swallow PTXASError / OutOfResources)
        FAILURES.append(f"{tag}: {type(e).__name__}: {e}")
        raise
    shared = int(ck.metadata.shared)
    if shared > H100_MAX_SHARED:
        FAILURES.append(f"{tag}: needs {shared} B of shared memory > {H100_MAX_SHARED} (H100)")
    if "cubin" not in ck.asm:
        FAILURES.append(f"{tag}: no cubin produced")
    COMPILED.append(dict(kernel=name, module=module, num_warps=opts.get("num_warps"),
                         num_stages=opts.get("num_stages"), shared=shared,
                         seconds=round(time.time() - t0, 2)))
    return _NoLaunch(ck)


# Autotuned kernels: every config surviving ``early_config_prune`` is compiled, unless a case asks
# for the reduced sweep (the first config and the one with the largest tiles), used where a full
# sweep of the same kernels already ran for another dtype.
SWEEP = {"full": True}


def _tile_size(cfg):
    blocks = 1
    for k, v in cfg.kwargs.items():
        if k.startswith("BLOCK_") and isinstance(v, int):
            blocks *= v
    return (blocks * max(1, cfg.num_stages or 1), cfg.num_warps or 0)


def _install_autotune_sweep():
    from triton.runtime.autotuner import Autotuner
    real_prune = Autotuner.prune_configs

    def prune_configs(self, kwargs):
        configs = real_prune(self, kwargs)
        if SWEEP["full"] or len(configs) <= 2:
            return configs
        largest = max(configs, key=_tile_size)
        return [configs[0]] + ([largest] if largest is not configs[0] else [])

    Autotuner.prune_configs = prune_configs


def install():
    _driver.set_active(Sm90CompileOnlyDriver())
    _install_autotune_sweep()
    _tc.compile = _compile_for_sm90  # JITFunction.create_binder imports it from triton.compiler
    import triton.compiler.compiler as _tcc
    _tcc.compile = _compile_for_sm90


# ----------------------------------------------------------------------------------------------
# Launcher calls
# ----------------------------------------------------------------------------------------------
def _t(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def _unaligned(rows, cols, dtype):
    """A (rows, cols) view at an element offset of 1 with an odd row stride (no 16-B alignment)."""
    base = _t(rows * (cols + 1) + 1, dtype=dtype)
    return base[1:].view(rows, cols + 1)[:, :cols]


def run_chain_linear(dtype, aligned):
    from colm_kernels.ops.chain_linear import triton_kernels as K
    ps, ds = ((64, 128), (64, 64)) if aligned else ((24, 40), (40, 24))
    M = 64 if aligned else 37
    x = _t(M, ps[-1], dtype=dtype) if aligned else _unaligned(M, ps[-1], dtype)
    ws = [_t(d, p, dtype=dtype) for d, p in zip(ds, ps)]
    bs = [_t(d, dtype=dtype) for d in ds]
    K.chain_linear_fwd(x, ws, bs if aligned else ())
    dy = _t(M, sum(ds), dtype=dtype) if aligned else _unaligned(M, sum(ds), dtype)
    K.chain_linear_bwd_dx(dy, ws, ps[-1])
    K.chain_linear_bwd_dw(dy, x, ws, [True] * len(ws), [True] * len(ws))


def run_chain_swiglu(dtype, aligned):
    from colm_kernels.ops.chain_swiglu import triton_kernels as K
    ps, ds = ((64, 128), (64, 64)) if aligned else ((24, 40), (40, 24))
    M = 64 if aligned else 37
    x = _t(M, ps[-1], dtype=dtype) if aligned else _unaligned(M, ps[-1], dtype)
    w1 = [_t(d, p, dtype=dtype) for d, p in zip(ds, ps)]
    w3 = [_t(d, p, dtype=dtype) for d, p in zip(ds, ps)]
    h, gates = K.chain_swiglu_fwd(x, w1, w3, True)
    K.chain_swiglu_fwd(x, w1, w3, False)
    K.chain_swiglu_bwd_gates(_t(M, sum(ds), dtype=dtype), _t(M, 2 * sum(ds), dtype=dtype), list(ds))


def run_chain_attention(dtype, head_dim, varlen, causal, seq_chains):
    from colm_kernels.ops.chain_attention import triton_kernels as K
    kv_index, head_chain = [0, 0, 1, 1], [0, 1, 0, 1]
    Hq, Hkv, D = 4, 2, head_dim
    if varlen:
        lens = [5, 11]
        tot = sum(lens)
        cu = torch.tensor([0, 5, 16], dtype=torch.int32)
        q, k, v = (_t(tot, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=11, max_seqlen_k=11)
        B = 2
    else:
        B, S = 2, 13
        q, k, v = (_t(B, S, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
        kw = {}
    sc = torch.tensor([1, 0][:B]) if seq_chains else None
    out, lse = K.chain_attention_fwd(q, k, v, kv_index, head_chain, causal, sc, 0.125, **kw)
    for deterministic in (False, True):  # dQ by atomics, or by its own kernel
        K.chain_attention_bwd(torch.randn_like(out), q, k, v, out, lse, kv_index, head_chain, causal, sc,
                              0.125, deterministic=deterministic, **kw)


def run_chain_attention_decode(dtype, head_dim, sq, num_splits, seq_chains):
    from colm_kernels.ops.chain_attention_decode import triton_kernels as K
    kv_index, head_chain = [0, 0, 1, 1], [0, 1, 0, 1]
    B, Hq, Hkv, S, D = 2, 4, 2, 300, head_dim
    q = _t(B, sq, Hq, D, dtype=dtype)
    kc, vc = _t(B, S, Hkv, D, dtype=dtype), _t(B, S, Hkv, D, dtype=dtype)
    lens = torch.tensor([S, 77], dtype=torch.int32)
    sc = torch.tensor([1, 0]) if seq_chains else None
    K.chain_attention_decode_fwd(q, kc, vc, lens, kv_index, head_chain, sc, 0.125, num_splits=num_splits)


def run_multi_chain_cross_entropy(dtype, aligned):
    from colm_kernels.ops.multi_chain_cross_entropy import triton_kernels as K
    offsets, N, V, D = ((0, 64, 128), 64, 256, 128) if aligned else ((0, 24, 40), 37, 101, 41)
    hidden = _t(N, offsets[-1], dtype=dtype) if aligned else _unaligned(N, offsets[-1], dtype)
    weight = _t(V, D, dtype=dtype)
    targets = torch.randint(0, V, (N,))
    targets[3] = -100
    K.mcce_fwd(hidden, weight, targets, offsets, -100)
    K.mcce_bwd(torch.ones(len(offsets) - 1), hidden, weight, targets, offsets, -100)


def run_chain_rmsnorm(dtype, aligned):
    from colm_kernels.ops.chain_rmsnorm import triton_kernels as K
    offsets, M = ((0, 64, 128, 256), 64) if aligned else ((0, 17, 51), 37)
    x = _t(M, offsets[-1], dtype=dtype) if aligned else _unaligned(M, offsets[-1], dtype)
    weight = _t(offsets[-1], dtype=dtype)
    y, rstd = K.chain_rmsnorm_fwd(x, weight, offsets, 1e-5)
    K.chain_rmsnorm_bwd(torch.randn_like(y), x, weight, rstd, offsets, True, True)


def cases():
    """(label, launcher call, args, full autotune sweep?): fp16 sweeps every pruned config, bf16
    the first and the largest."""
    for dtype in (torch.float16, torch.bfloat16):
        full = dtype == torch.float16
        for aligned in (True, False):
            yield f"chain_linear {dtype} aligned={aligned}", run_chain_linear, (dtype, aligned), full
            yield f"chain_swiglu {dtype} aligned={aligned}", run_chain_swiglu, (dtype, aligned), full
            yield (f"multi_chain_cross_entropy {dtype} aligned={aligned}",
                   run_multi_chain_cross_entropy, (dtype, aligned), full)
            yield f"chain_rmsnorm {dtype} aligned={aligned}", run_chain_rmsnorm, (dtype, aligned), full
        for d, varlen, causal, sc in ((64, False, True, False), (128, True, False, True)):
            yield (f"chain_attention {dtype} D={d} varlen={varlen} causal={causal} sc={sc}",
                   run_chain_attention, (dtype, d, varlen, causal, sc), full)
        for d, sq, splits, sc in ((64, 1, 4, False), (128, 2, 1, True)):
            yield (f"chain_attention_decode {dtype} D={d} Sq={sq} splits={splits} sc={sc}",
                   run_chain_attention_decode, (dtype, d, sq, splits, sc), full)


def discover_kernels():
    """``{module: {kernel names}}`` for every module of ``colm_kernels`` that defines a
    ``@triton.jit`` function and launches it (``name[grid](...)`` in its own source)."""
    import importlib
    import re

    import colm_kernels
    from triton.runtime.jit import JITFunction

    root = os.path.dirname(os.path.abspath(colm_kernels.__file__))
    found = {}
    for dirpath, _, files in sorted(os.walk(root)):  # not pkgutil: op folders are namespace packages
        for fname in sorted(files):
            path = os.path.join(dirpath, fname)
            if not fname.endswith(".py"):
                continue
            with open(path) as fh:
                src = fh.read()
            if "triton.jit" not in src:
                continue
            rel = os.path.relpath(path[:-3], os.path.dirname(root)).replace(os.sep, ".")
            mod_name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
            try:
                mod = importlib.import_module(mod_name)
            except Exception as e:  # noqa: BLE001
                FAILURES.append(f"cannot import {mod_name} (defines @triton.jit code): {e!r}")
                continue
            for attr, obj in vars(mod).items():
                fn = obj
                while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                    fn = fn.fn
                if (isinstance(fn, JITFunction) and fn.module == mod_name
                        and re.search(r"\b%s\s*\[" % re.escape(attr), src)):
                    found.setdefault(mod_name, set()).add(fn.__name__)
    return found


def main(argv):
    only = argv[1] if len(argv) > 1 else None
    install()
    t0 = time.time()
    for label, fn, args, full in cases():
        if only and only not in label:
            continue
        SWEEP["full"] = full
        t = time.time()
        n = len(COMPILED)
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            FAILURES.append(f"{label}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
        print(f"[sm90] {label}: {len(COMPILED) - n} kernels in {time.time() - t:.1f}s", flush=True)
    compiled_names = {c["kernel"] for c in COMPILED}
    launched = discover_kernels()
    missing = {}
    for m in KERNEL_MODULES:
        if m not in launched:
            FAILURES.append(f"no launched @triton.jit kernel found in {m}")
    for m, want in sorted(launched.items()):
        if not only and want - compiled_names:
            missing[m] = sorted(want - compiled_names)
    if missing:
        FAILURES.append(f"kernels never compiled: {missing}")
    per_kernel = {}
    for c in COMPILED:
        per_kernel.setdefault(c["kernel"], []).append(
            f"w{c['num_warps']}s{c['num_stages']} smem={c['shared']}")
    for f in FAILURES:
        print("[sm90] FAIL", f, flush=True)
    summary = dict(compiled=len(COMPILED), failures=len(FAILURES), seconds=round(time.time() - t0, 1),
                   modules=sorted({c["module"] for c in COMPILED}),
                   kernel_modules={m: sorted(v) for m, v in sorted(launched.items())},
                   kernels={k: len(v) for k, v in sorted(per_kernel.items())})
    print("SM90_COMPILE_SUMMARY " + json.dumps(summary), flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
