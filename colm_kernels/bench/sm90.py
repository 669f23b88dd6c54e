"""Compile Triton kernels for an H100 (sm_90a) on a machine without a GPU, and read what ptxas says.

``install()`` (in a process WITHOUT ``TRITON_INTERPRET``, before any kernel is launched):

* sets a fake Triton driver whose current target is ``GPUTarget("cuda", 90, 32)`` and whose device
  and stream queries return dummies, so ``JITFunction.run`` binds, specialises and compiles exactly
  as a real launch on an H100 would (signature, constexprs, divisibility of pointers and ints,
  ``num_warps`` / ``num_stages``);
* wraps ``triton.compiler.compile``: each kernel goes through the whole pipeline down to a cubin
  with Triton's bundled ``ptxas -v``; what ptxas reports (registers, spill bytes) and what the PTX
  holds (``wgmma`` / ``mma.sync``, TMA, ``cp.async``) is recorded per compiled config in
  ``COMPILED``, and a stub that launches nothing stands in for the loaded kernel. The ptxas log is
  kept in Triton's cache beside the cubin, so a cache hit reports the same numbers;
* makes the autotuners "benchmark" by compiling only, so every config surviving
  ``early_config_prune`` is compiled (``triton.autotune`` would otherwise swallow a config's
  ``OutOfResources`` / ``PTXASError``: here they are recorded in ``FAILURES``).

Launchers then run on CPU tensors (``torch.empty`` is enough: nothing is read). Shared memory
comes from the compiled kernel's metadata; resident blocks per SM from registers, shared memory
and warps with the H100's limits (``resident_blocks``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import threading
import time
from typing import Dict, List, Optional

__all__ = ["TARGET", "H100", "KernelStats", "COMPILED", "FAILURES", "install", "full_sweep",
           "resident_blocks", "mma_kind", "mma_counts", "parse_ptxas"]

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
    raise RuntimeError("colm_kernels.bench.sm90 compiles for sm_90a: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton.compiler as _tc  # noqa: E402
from triton.backends import DriverBase  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver as _driver  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# The H100 SXM's per-SM limits (CUDA occupancy calculator, compute capability 9.0).
H100 = {
    "sms": 132,
    "max_shared_per_block": 232448,   # 227 KiB opt-in
    "shared_per_sm": 233472,          # 228 KiB
    "reserved_shared_per_block": 1024,
    "registers_per_sm": 65536,
    "register_alloc_unit": 256,       # per warp
    "max_registers_per_thread": 255,
    "max_warps_per_sm": 64,
    "max_blocks_per_sm": 32,
}


@dataclasses.dataclass
class KernelStats:
    """One compiled config of one kernel."""

    kernel: str
    module: str
    num_warps: int
    num_stages: int
    constexprs: Dict[str, object]
    registers: int
    spill_bytes: int          # spill stores + spill loads
    shared: int               # bytes of shared memory per block
    mma: str                  # "wgmma", "mma.sync" or "none" (wgmma wins if both appear)
    tma: bool                 # cp.async.bulk.tensor (TMA)
    cp_async: bool            # cp.async (Ampere-style asynchronous copies)
    resident_blocks: int      # per SM
    label: str = ""           # the launcher case that compiled it
    mma_sync: int = 0         # mma.sync instructions in the PTX (Ampere tensor-core path)
    wgmma: int = 0            # wgmma.mma_async instructions in the PTX (Hopper warpgroup path)
    seconds: float = 0.0

    @property
    def config(self) -> str:
        blocks = " ".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()) if k.startswith("BLOCK"))
        tma = " USE_TMA" if self.constexprs.get("USE_TMA") else ""  # the TMA twin of a pointer config
        return f"{blocks} w{self.num_warps} s{self.num_stages}{tma}".strip()


COMPILED: List[KernelStats] = []
FAILURES: List[str] = []
_CURRENT_LABEL = [""]


def set_label(label: str) -> None:
    """Name the launcher case whose compiles follow (kept in ``KernelStats.label``)."""
    _CURRENT_LABEL[0] = label


# ----------------------------------------------------------------------------------------------
# What ptxas and the PTX say
# ----------------------------------------------------------------------------------------------
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> tuple[int, int]:
    """``(registers, spill bytes)`` of the (one) entry function in a ``ptxas -v`` log."""
    regs = [int(m) for m in _USED.findall(log)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(log)]
    if not regs:
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    return max(regs), max(spills, default=0)


_WGMMA = re.compile(r"^\s*(?:@\S+\s+)?wgmma\.mma_async\b", re.M)
_MMA_SYNC = re.compile(r"^\s*(?:@\S+\s+)?mma\.sync\b", re.M)


def mma_counts(ptx: str) -> tuple[int, int]:
    """``(mma.sync, wgmma.mma_async)`` instructions in the PTX (each unrolled product counts: a
    kernel mixing both runs part of its tensor-core work at the Ampere rate)."""
    return len(_MMA_SYNC.findall(ptx)), len(_WGMMA.findall(ptx))


def mma_kind(ptx: str) -> str:
    sync, wg = mma_counts(ptx)
    if wg:
        return "wgmma"
    if sync:
        return "mma.sync"
    return "none"


def resident_blocks(registers: int, shared: int, num_warps: int, limits=H100) -> int:
    """Blocks of one kernel resident on one SM, from its registers, shared memory and warps."""
    per_warp = -(-registers * 32 // limits["register_alloc_unit"]) * limits["register_alloc_unit"]
    by_regs = limits["registers_per_sm"] // max(1, per_warp * num_warps)
    by_warps = limits["max_warps_per_sm"] // num_warps
    smem = shared + limits["reserved_shared_per_block"]
    by_smem = limits["shared_per_sm"] // smem
    return max(0, min(by_regs, by_warps, by_smem, limits["max_blocks_per_sm"]))


# ptxas runs inside Triton's compile; its ``-v`` log goes to a temporary file that is deleted right
# after. Reading it there costs nothing (a second ptxas run is the fallback).
_PTXAS_LOG = threading.local()
real_subprocess_run = subprocess.run


def _capture_ptxas_logs() -> None:
    if getattr(subprocess.run, "_colm_capture", False):
        return
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        result = real_run(cmd, *args, **kwargs)
        log_file = kwargs.get("stderr")
        if isinstance(cmd, (list, tuple)) and cmd and str(cmd[0]).endswith("ptxas") and hasattr(log_file, "name"):
            with open(log_file.name) as fh:
                _PTXAS_LOG.text = fh.read()
        return result

    run._colm_capture = True
    subprocess.run = run


def _ptxas_log(ptx: str) -> str:
    """Fallback: run Triton's ptxas ourselves on the PTX (same flags Triton uses)."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = real_subprocess_run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                                    src, "-o", src + ".o"], capture_output=True, text=True)
    return proc.stdout + proc.stderr


_LOG_FILE = "colm_ptxas_v.log"


def _kept_ptxas_log(compiled, fresh: Optional[str], ptx: str) -> str:
    """The ptxas ``-v`` log of a compiled kernel, kept beside its cubin in Triton's cache: a fresh
    compile writes it there, a cache hit (another process, or another test shard sharing the cache
    directory, compiled the same kernel) reads it back instead of running ptxas again."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    if fresh:
        cache.put(fresh, _LOG_FILE, binary=False)
        return fresh
    path = cache.get_file(_LOG_FILE)
    if path:
        with open(path) as fh:
            return fh.read()
    log = _ptxas_log(ptx)
    cache.put(log, _LOG_FILE, binary=False)
    return log


# ----------------------------------------------------------------------------------------------
# Fake driver: target sm_90, dummy device / stream, compile-only "benchmark"
# ----------------------------------------------------------------------------------------------
def _compile_only_bench(kernel_call, quantiles=None, **_):
    kernel_call()  # compiles (the launch itself is stubbed); timings are irrelevant
    return [1.0, 1.0, 1.0] if quantiles else 1.0


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": H100["max_shared_per_block"], "multiprocessor_count": H100["sms"],
                "max_num_regs": H100["registers_per_sm"], "warpSize": 32, "sm_clock_rate": 1,
                "mem_clock_rate": 1, "mem_bus_width": 1}

    def load_binary(self, *args, **kwargs):
        raise RuntimeError("sm90: nothing may be loaded on a device")


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
        raise RuntimeError("sm90: no device interface")

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


def _const_name(fn, key) -> str:
    """A constexpr's argument name (Triton keys them by argument index tuples)."""
    names = getattr(fn, "arg_names", None)
    if isinstance(key, tuple) and len(key) == 1 and isinstance(key[0], int) and names:
        return names[key[0]]
    return ".".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _compile_for_sm90(src, target=None, options=None, _env_vars=None):
    fn = getattr(src, "fn", None)
    name = getattr(fn, "__name__", repr(src))
    module = getattr(fn, "module", getattr(fn, "__module__", "?"))
    consts = {_const_name(fn, k): v for k, v in getattr(src, "constants", {}).items()}
    opts = dict(options or {})
    tag = f"{module}.{name} warps={opts.get('num_warps')} stages={opts.get('num_stages')} {consts}"
    if target != TARGET:
        FAILURES.append(f"{tag}: compiled for {target}, expected {TARGET}")
    t0 = time.time()
    _PTXAS_LOG.text = None
    try:
        ck = _real_compile(src, target=TARGET, options=options)
    except Exception as e:  # noqa: BLE001  (autotune would swallow PTXASError / OutOfResources)
        FAILURES.append(f"{tag}: {type(e).__name__}: {e}")
        raise
    shared = int(ck.metadata.shared)
    if shared > H100["max_shared_per_block"]:
        FAILURES.append(f"{tag}: needs {shared} B of shared memory > {H100['max_shared_per_block']} (H100)")
    if "cubin" not in ck.asm:
        FAILURES.append(f"{tag}: no cubin produced")
    ptx = ck.asm.get("ptx", "")
    log = _kept_ptxas_log(ck, getattr(_PTXAS_LOG, "text", None), ptx)
    try:
        regs, spills = parse_ptxas(log)
    except ValueError as e:
        FAILURES.append(f"{tag}: {e}")
        regs, spills = 0, 0
    warps = int(ck.metadata.num_warps)
    n_sync, n_wgmma = mma_counts(ptx)
    COMPILED.append(KernelStats(
        kernel=name, module=module, num_warps=warps, num_stages=int(ck.metadata.num_stages),
        constexprs={k: v for k, v in consts.items() if isinstance(v, (int, bool, str))},
        registers=regs, spill_bytes=spills, shared=shared, mma=mma_kind(ptx),
        tma="cp.async.bulk.tensor" in ptx, cp_async=bool(re.search(r"\bcp\.async\.c[ag]\b", ptx)),
        resident_blocks=resident_blocks(regs, shared, warps), label=_CURRENT_LABEL[0],
        seconds=round(time.time() - t0, 2), mma_sync=n_sync, wgmma=n_wgmma))
    return _NoLaunch(ck)


# Autotuned kernels: every config surviving ``early_config_prune`` is compiled, unless a case asks
# for the reduced sweep (the first config and the one with the largest tiles), used where a full
# sweep of the same kernels already ran for another dtype.
SWEEP = {"full": True}


def full_sweep(full: bool) -> None:
    """Compile every pruned config (True) or only the first and the largest (False)."""
    SWEEP["full"] = bool(full)


def _tile_size(cfg):
    blocks = 1
    for k, v in cfg.kwargs.items():
        if k.startswith("BLOCK_") and isinstance(v, int):
            blocks *= v
    return (blocks * max(1, cfg.num_stages or 1), cfg.num_warps or 0)


def _install_autotune_sweep():
    from triton.runtime.autotuner import Autotuner
    if getattr(Autotuner.prune_configs, "_colm_sweep", False):
        return
    real_prune = Autotuner.prune_configs

    def prune_configs(self, kwargs):
        configs = real_prune(self, kwargs)
        if SWEEP["full"] or len(configs) <= 2:
            return configs
        largest = max(configs, key=_tile_size)
        return [configs[0]] + ([largest] if largest is not configs[0] else [])

    prune_configs._colm_sweep = True
    Autotuner.prune_configs = prune_configs


def install() -> None:
    """Route every Triton compile of this process to sm_90a (see the module docstring)."""
    _driver.set_active(Sm90CompileOnlyDriver())
    _install_autotune_sweep()
    _capture_ptxas_logs()
    _tc.compile = _compile_for_sm90  # JITFunction.create_binder imports it from triton.compiler
    import triton.compiler.compiler as _tcc
    _tcc.compile = _compile_for_sm90


def kernel_table(stats: Optional[List[KernelStats]] = None) -> List[dict]:
    """One JSON-friendly dict per compiled config."""
    out = []
    for s in COMPILED if stats is None else stats:
        d = dataclasses.asdict(s)
        d["config"] = s.config
        out.append(d)
    return out
