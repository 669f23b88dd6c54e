"""Shared Triton helpers for every colm_kernels kernel (chain linear, attention, SwiGLU, ...).

Host side:
- ``is_interpreter()``: whether kernels run under ``TRITON_INTERPRET=1`` (CPU tensors, numpy).
- ``small_tiles()``: whether kernels pick their small interpreter tiles (the interpreter, unless
  ``COLM_KERNELS_TILES=gpu`` asks for the H100 tiles there, to count the work they execute).
- ``TORCH_TO_TL`` / ``tl_dtype``: the floating dtypes kernels accept and their Triton types.
- ``int64_table`` / ``int32_table``: a small cached device table of per-chain ints (pointers,
  widths, strides, offsets; int32: index tables), one content-keyed cache for both.
- ``pointer_row``: the ``data_ptr()``s of a pointer table's tensors (declared to the GPU-semantics
  bounds checker, ``gpu_semantics``).
- ``table_aligned``: whether pointers and ints of a table are 16-byte friendly (enables hints).
- ``tile_count``: host-side count of the tiles of a list of per-chain extents.
- ``gemm_configs`` / ``register_gemm_layout`` / ``make_gemm_pruner``: autotune configs (H100 list,
  one small interpreter config; each with ``USE_TMA`` False, plus TMA twins) and a pruner that
  clamps blocks to the chain layout's extents, keeps configs within the measured shared-memory and
  register budgets, drops those that waste MMA work on partial tiles (never a function of the token
  count) and keeps TMA configs only where descriptors are legal (``tma_legal``).
- ``tma_mode``: which of the pointer / TMA configs the pruners offer (tests force either);
  ``tma_choices``: the ``USE_TMA`` values offered for one launch; ``tma_device``: whether a device
  has TMA; ``operands_tma_aligned``: whether activation operands can back TMA descriptors;
  ``strides_tma_aligned``: the same for every 2-D slice of N-D tensors (attention's K / V);
  ``ensure_tma_allocator``: the global scratch allocator device-side descriptors need on CUDA.
- ``autotune``: ``triton.autotune`` with an early pruner that ``COLM_KERNELS_AUTOTUNE=0`` reduces to
  one config (correctness runs on a GPU) and ``force_config(i)`` pins to the i-th (tests of every
  config).
- ``check_tensor``: uniform argument validation with errors that name the argument.
- ``device_guard``: make a tensor's CUDA device current around a launch.
- ``is_pow2_in`` / ``last_dim_contiguous``: head-dim check; a unit last-dim stride (copy if not).
- ``interpreter_dtype_reasons``: the dtypes the interpreter cannot run (bfloat16 ``tl.dot``).

Device side (``@triton.jit``):
- ``grouped_tile``: GROUP_M-swizzled (m, n) tile order for L2 reuse.
- ``segment_tile_count`` / ``find_segment``: map a flat tile id to (chain, tile within chain) from
  per-chain extents and constexpr block sizes (a static loop over the chains).
- ``load_ptr`` / ``load_int``: read a table entry as a typed pointer / int32 extent with optional
  divisibility hints.
- ``mma``: ``tl.dot`` with fp32 accumulation, IEEE precision for fp32 inputs.
- ``masked_k_loop``: a pointer-tile K loop of ``mma`` steps with masked loads (dW and CE dh GEMMs).
- ``tile_desc``: a TMA tensor descriptor of a row-major matrix (boxes past its edges read zeros).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .._tables import clear_table_cache, int32_table, int64_table
from .gpu_semantics import pointer_row

__all__ = [
    "is_interpreter",
    "small_tiles",
    "TORCH_TO_TL",
    "FLOAT_DTYPES",
    "tl_dtype",
    "int64_table",
    "int32_table",
    "pointer_row",
    "clear_table_cache",
    "table_aligned",
    "tile_count",
    "gemm_configs",
    "make_gemm_pruner",
    "register_gemm_layout",
    "gemm_waste",
    "tma_legal",
    "tma_mode",
    "operands_tma_aligned",
    "strides_tma_aligned",
    "tma_device",
    "tma_choices",
    "ensure_tma_allocator",
    "autotune",
    "autotune_enabled",
    "force_config",
    "autotuned_kernels",
    "ACCUMULATING_KERNELS",
    "check_tensor",
    "device_guard",
    "grouped_tile",
    "segment_tile_count",
    "find_segment",
    "load_ptr",
    "load_int",
    "mma",
    "masked_k_loop",
    "tile_desc",
]


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def is_interpreter() -> bool:
    """True when Triton kernels run in the numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def small_tiles() -> bool:
    """True when kernels use their small interpreter tiles and configs: under the interpreter,
    unless ``COLM_KERNELS_TILES=gpu`` (read at import, like ``TRITON_INTERPRET``) asks for the H100
    tiles there, so that the work accounting (``colm_kernels.bench.work``) counts what a GPU run
    executes."""
    return is_interpreter() and os.environ.get("COLM_KERNELS_TILES", "").strip().lower() != "gpu"


TORCH_TO_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}
FLOAT_DTYPES = tuple(TORCH_TO_TL)


def tl_dtype(dtype: torch.dtype):
    """The Triton type of a supported torch floating dtype; ``TypeError`` otherwise."""
    try:
        return TORCH_TO_TL[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype}: expected one of {FLOAT_DTYPES}") from None


def table_aligned(ptrs: Iterable[int], ints: Iterable[int], element_size: int) -> bool:
    """Whether every pointer is 16-byte aligned and every int (in elements) is a multiple of 16 B.

    When true a kernel may hint ``multiple_of(ptr, 16)`` and ``multiple_of(int, 16 // elsize)`` on
    values it reads from a table, which keeps its loads and stores vectorised.
    """
    step = max(1, 16 // element_size)
    return all(int(p) % 16 == 0 for p in ptrs) and all(int(v) % step == 0 for v in ints)


def tile_count(extents_a: Sequence[int], block_a: int,
               extents_b: Optional[Sequence[int]] = None, block_b: int = 1) -> int:
    """``sum_c cdiv(a_c, block_a) * cdiv(b_c, block_b)``: the same count ``segment_tile_count``
    computes in a kernel (host side, for the grid)."""
    if extents_b is None:
        return sum(triton.cdiv(a, block_a) for a in extents_a)
    return sum(triton.cdiv(a, block_a) * triton.cdiv(b, block_b) for a, b in zip(extents_a, extents_b))


# Autotune configurations. Block names are the GEMM roles: BLOCK_M x BLOCK_N output tile,
# BLOCK_K the reduction step. (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), GROUP_M = 8.
_H100_GEMM = (
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),  # fp32 inputs: fits shared memory where the 64-deep ones do not
    (64, 64, 32, 4, 3),
)
# TMA twins (``USE_TMA=True``): the same tiles with operands fetched by the Tensor Memory
# Accelerator (cp.async.bulk.tensor into swizzled shared memory, no per-thread addresses, zero fill
# past the edges instead of masks). 16-bit inputs only (``tma_legal``): fp32 dots are IEEE FMA
# loops, not wgmma, so the fp32-only 32-deep rows above have no twin.
_H100_GEMM_TMA = tuple(row for row in _H100_GEMM if row[2] == 64)
_INTERPRETER_GEMM = ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, 1, 1)


def gemm_configs(h100_table: Sequence[tuple] = _H100_GEMM,
                 tma_table: Sequence[tuple] = _H100_GEMM_TMA) -> List[triton.Config]:
    """Autotune configs for tiled GEMMs from ``h100_table`` rows (BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages; GROUP_M 8) with ``USE_TMA`` False, then the ``tma_table`` rows with
    ``USE_TMA`` True (pointer configs first: ``COLM_KERNELS_AUTOTUNE=0`` runs the first kept one).
    Under the interpreter one 16x16x16 config (GROUP_M 4; small tiles keep masking paths exercised
    and the interpreter fast) and its TMA twin, which the pruner offers only in
    ``tma_mode("only")``. An empty ``tma_table`` (a kernel without a ``USE_TMA`` parameter) gives
    configs without the ``USE_TMA`` key."""
    twins = (False, True) if tma_table else (None,)

    def tagged(kw, tma):
        return kw if tma is None else {**kw, "USE_TMA": tma}

    if small_tiles():
        kw, warps, stages = _INTERPRETER_GEMM
        return [triton.Config(tagged(kw, tma), num_warps=warps, num_stages=stages) for tma in twins]
    tables = ((h100_table, False), (tma_table, True)) if tma_table else ((h100_table, None),)
    return [
        triton.Config(tagged({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, tma),
                      num_warps=w, num_stages=s)
        for table, tma in tables
        for bm, bn, bk, w, s in table
    ]


_TMA_MODES = ("auto", "off", "only")
_tma_mode = "auto"


@contextlib.contextmanager
def tma_mode(mode: str):
    """Which configs the pruners (GEMM and attention) offer inside the block: ``"auto"`` (the
    default: the pointer configs and, where descriptors are legal, their TMA twins, so the
    autotuner chooses; under the interpreter's small tiles the pointer config only), ``"off"``
    (pointer configs only) or ``"only"`` (the TMA configs wherever they are legal, the interpreter
    included; pointer configs where not): tests of either path. Tuning caches are cleared on entry
    and exit."""
    global _tma_mode
    if mode not in _TMA_MODES:
        raise ValueError(f"tma_mode must be one of {_TMA_MODES}, got {mode!r}")
    saved = _tma_mode
    for kernel in _AUTOTUNED:
        kernel.cache.clear()
    _tma_mode = mode
    try:
        yield
    finally:
        _tma_mode = saved
        for kernel in _AUTOTUNED:
            kernel.cache.clear()


def tma_legal(args: Dict[str, object], element_size: int, device=None) -> bool:
    """Whether a GEMM launch with kernel arguments ``args`` may run a TMA config: 16-bit inputs
    (fp32 dots are IEEE FMA loops, not wgmma), an aligned table (``ALIGN > 1``: weight pointers,
    widths, offsets and row strides 16-byte multiples), activation operands that can back a
    descriptor (``TMA_OPERANDS``, see ``operands_tma_aligned``), no ``ROWS`` gather (TMA reads
    boxes, not rows through a pointer table) and, on CUDA, a GPU with TMA (sm_90 or newer)."""
    if element_size != 2 or int(args.get("ALIGN", 1)) <= 1 or not bool(args.get("TMA_OPERANDS", False)):
        return False
    if bool(args.get("ROWS", False)):
        return False
    return tma_device(device)


def tma_device(device=None) -> bool:
    """Whether launches on ``device`` may use TMA: on CUDA a GPU of sm_90 or newer; elsewhere (the
    interpreter, or the compile-only sm_90a driver of ``colm_kernels.bench.sm90``) True."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return True


def tma_choices(legal: bool) -> tuple:
    """The ``USE_TMA`` values a pruner offers for a launch whose descriptors are ``legal``, under
    the current ``tma_mode``: pointer configs always where TMA is illegal or off; TMA twins alone in
    ``"only"``; both in ``"auto"``, except under the interpreter's small tiles (pointer only)."""
    if not legal or _tma_mode == "off":
        return (False,)
    if _tma_mode == "only":
        return (True,)
    return (False,) if small_tiles() else (False, True)


_tma_choices = tma_choices  # the GEMM pruner's name for it (and its tests')


def operands_tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every row-major 2-D operand can back a TMA descriptor: a 16-byte aligned base and
    row stride (in bytes), and fewer than 2**31 rows (descriptor extents are int32)."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.shape[0] < 2**31
               for t in tensors)


def strides_tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether descriptors over any 2-D slice ``t[i, ..., :, j, :]`` of these tensors (rows along
    one dim, the unit-stride last dim as columns) are legal: a 16-byte aligned base, every stride
    but the last's a 16-byte multiple (so every slice's base and row stride are too), a unit last
    stride, and every dim below 2**31 (descriptor extents are int32)."""
    return all(t.data_ptr() % 16 == 0 and (t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1)
               and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               and all(n < 2**31 for n in t.shape) for t in tensors)


def _torch_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    # the current device (launchers run under device_guard) and its current stream, like the launch
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator(device) -> None:
    """On CUDA, make sure Triton can allocate the global scratch that device-side TMA descriptors
    (``tile_desc``) are written to at launch: set a torch-backed allocator unless one is set. The
    allocator is a context variable (one per thread: autograd's backward thread gets its own), so
    launchers call this before each launch that may pick a TMA config; an allocator the caller set
    is kept."""
    if torch.device(device).type != "cuda":
        return
    try:
        from triton.runtime import _allocation
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # a Triton without the context variable: set ours
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)


SMEM_BUDGET = 227 * 1024  # bytes of shared memory per block on H100 (sm_90)


# Per-thread register budgets of the pruner, measured on sm_90a with Triton's ptxas (``colm-bench
# --static``; tests/ops/test_static_report.py holds every kept config at zero spills):
# - fp32 accumulator registers per thread (all accumulators together): a 128 x 256 tile over 8 warps
#   (128 regs) compiles without spills with one accumulator; kernels with more live state pass a
#   smaller budget.
# - unaligned layouts (ALIGN == 1: no 16-byte hints, so operands are loaded element by element
#   through registers instead of asynchronous copies): at most 48 operand elements per thread per
#   stage and 64 accumulator registers; beyond that ptxas spills (up to 872 B seen).
MAX_ACC_REGS = 128
UNALIGNED_MAX_LOAD_ELEMS = 48
UNALIGNED_MAX_ACC_REGS = 64

_GEMM_LAYOUTS: "OrderedDict[int, tuple]" = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()
_GEMM_LAYOUTS_SIZE = 4096


def register_gemm_layout(key: int, blocks: Sequence[str], products: Iterable[Sequence[int]]) -> int:
    """Tell the GEMM pruner what the blocks of a launch with autotune key ``LAYOUT_KEY == key`` tile:
    ``products`` lists, for every (chain, segment) sub-GEMM, its extent along each of ``blocks``
    (e.g. ``("BLOCK_N", "BLOCK_K")`` and ``(d_i, P_i)`` per chain). Host ints only, so pruning
    never reads a device table. Returns ``key``."""
    with _LAYOUTS_LOCK:
        _GEMM_LAYOUTS[int(key)] = (tuple(blocks), tuple(tuple(int(e) for e in p) for p in products))
        _GEMM_LAYOUTS.move_to_end(int(key))
        while len(_GEMM_LAYOUTS) > _GEMM_LAYOUTS_SIZE:
            _GEMM_LAYOUTS.popitem(last=False)
    return key


def gemm_waste(blocks: Sequence[str], products: Sequence[Sequence[int]], kw: Dict[str, int]) -> float:
    """Executed over useful MMA work of a layout's tiles with block sizes ``kw``: every sub-GEMM
    runs whole tiles along each block (masked tiles still run on the tensor cores)."""
    useful = sum(_prod(p) for p in products)
    executed = sum(_prod(-(-e // kw[b]) * kw[b] for b, e in zip(blocks, p)) for p in products)
    return executed / max(1, useful)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def make_gemm_pruner(dtype_arg: str, *, n_acc: int = 1, n_b: int = 1, max_acc_regs: int = MAX_ACC_REGS,
                     smem_budget: int = SMEM_BUDGET) -> Callable:
    """An ``early_config_prune`` for GEMM kernels whose layout was registered with
    ``register_gemm_layout`` under their ``LAYOUT_KEY`` argument.

    ``n_acc`` fp32 accumulator tiles of BLOCK_M x BLOCK_N, and per pipeline stage one BLOCK_M x
    BLOCK_K operand tile plus ``n_b`` BLOCK_K x BLOCK_N tiles. Steps:
    1. every registered block is clamped to ``max(16, next_pow2(largest extent))``; duplicates go;
    2. configs over the shared-memory budget (per ``dtype_arg``'s element size) or the register
       budgets above (accumulators; operand staging when ``ALIGN == 1``) go;
    3. of the rest, only those within 2% of the least wasted MMA work (``gemm_waste``) stay, so a
       block that does not divide the chain widths is never picked over one that does.
    Before all that, configs whose ``USE_TMA`` the current ``tma_mode`` does not offer for this
    launch go (TMA only where ``tma_legal``). The smallest config survives if every one is dropped.
    Depends only on the autotune key (layout, ALIGN, TMA_OPERANDS, ROWS, dtype), never on the token
    count.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        es = args[dtype_arg].element_size()
        blocks, products = _GEMM_LAYOUTS.get(int(args["LAYOUT_KEY"]), ((), ()))
        unaligned = int(args.get("ALIGN", 1)) == 1
        offered = tma_choices(tma_legal(args, es, args[dtype_arg].device))
        sized, seen = [], set()
        for cfg in configs:
            kw = dict(cfg.kwargs)
            if bool(kw.get("USE_TMA", False)) not in offered:
                continue
            for block in blocks:
                largest = max((p[blocks.index(block)] for p in products), default=1)
                kw[block] = min(kw[block], max(16, triton.next_power_of_2(max(1, largest))))
            stages, warps = max(1, cfg.num_stages), cfg.num_warps
            key = (tuple(sorted(kw.items())), warps, stages)
            if key in seen:
                continue
            seen.add(key)
            smem = (kw["BLOCK_M"] + n_b * kw["BLOCK_N"]) * kw["BLOCK_K"] * es * stages
            acc_regs = n_acc * kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * warps)
            load_elems = (kw["BLOCK_M"] + n_b * kw["BLOCK_N"]) * kw["BLOCK_K"] // (32 * warps)
            fits = smem <= smem_budget and acc_regs <= max_acc_regs
            if unaligned:
                fits = fits and load_elems <= UNALIGNED_MAX_LOAD_ELEMS and acc_regs <= UNALIGNED_MAX_ACC_REGS
            waste = gemm_waste(blocks, products, kw) if products else 1.0
            sized.append((fits, waste, smem + 1024 * acc_regs,
                          triton.Config(kw, num_warps=warps, num_stages=cfg.num_stages)))
        if not sized:
            raise ValueError(f"no autotune config offers USE_TMA in {offered} (tma_mode {_tma_mode!r}): "
                             "a GEMM config list needs pointer configs")
        fitting = [t for t in sized if t[0]]
        if not fitting:
            return [min(sized, key=lambda t: (t[1], t[2]))[3]]
        least = min(t[1] for t in fitting)
        return [t[3] for t in fitting if t[1] <= least * 1.02]

    return prune


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
    # dQ += dS K by fp32 atomics from every key block into a zeroed buffer (DQ_ATOMIC; DQ is None
    # without it, so nothing else is ever zeroed)
    "_chain_attention_bwd_kernel": {"reset_to_zero": ("DQ",)},
    # row chunks of the cross-entropy dW: OUT = alpha G^T h + ACC (LOAD_ACC), OUT often ACC itself
    "_mcce_bwd_dw_kernel": {"restore_value": ("OUT",)},
}


def autotuned_kernels() -> List:
    """The autotuners ``autotune`` has made (one per kernel of every imported module)."""
    return list(_AUTOTUNED)


@contextlib.contextmanager
def force_config(index: int):
    """Within the block every autotuned kernel runs the ``index``-th config its pruner keeps (the last
    one when it keeps fewer). Tuning caches are cleared on entry and exit, so no choice leaks."""
    global _forced_index
    saved = _forced_index
    for kernel in _AUTOTUNED:
        kernel.cache.clear()
    _forced_index = int(index)
    try:
        yield
    finally:
        _forced_index = saved
        for kernel in _AUTOTUNED:
            kernel.cache.clear()


def device_guard(device: torch.device):
    """Make ``device`` current while launching (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, last_dim_contiguous: bool = True) -> torch.Tensor:
    """Validate one kernel argument; raise ``TypeError``/``ValueError`` naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the other inputs are {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if last_dim_contiguous and t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}"
        )
    return t


# ----------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------
@triton.jit
def grouped_tile(tile_id, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """Tile id -> (tile_m, tile_n), walking GROUP_M rows of tiles column by column (L2 reuse)."""
    width = GROUP_M * num_tiles_n
    group_id = tile_id // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_tiles_m - first_m, GROUP_M)
    local = tile_id % width
    return first_m + local % group_size, local // group_size


@triton.jit
def segment_tile_count(EXT_A, BLOCK_A: tl.constexpr, EXT_B, BLOCK_B: tl.constexpr, NUM: tl.constexpr):
    """``sum_s cdiv(EXT_A[s], BLOCK_A) * cdiv(EXT_B[s], BLOCK_B)`` (EXT_B may be None)."""
    total = tl.cdiv(tl.load(EXT_A).to(tl.int32), BLOCK_A)
    if EXT_B is not None:
        total = total * tl.cdiv(tl.load(EXT_B).to(tl.int32), BLOCK_B)
    for s in tl.static_range(1, NUM):
        n = tl.cdiv(tl.load(EXT_A + s).to(tl.int32), BLOCK_A)
        if EXT_B is not None:
            n = n * tl.cdiv(tl.load(EXT_B + s).to(tl.int32), BLOCK_B)
        total += n
    return total


@triton.jit
def find_segment(tile_id, EXT_A, BLOCK_A: tl.constexpr, EXT_B, BLOCK_B: tl.constexpr, NUM: tl.constexpr):
    """Flat tile id -> (segment, tile within segment, tiles along A, tiles along B).

    Segment ``s`` owns ``cdiv(EXT_A[s], BLOCK_A) * cdiv(EXT_B[s], BLOCK_B)`` consecutive tiles
    (``EXT_B`` None: one tile along B). Segments with no tiles are never returned.
    """
    na = tl.cdiv(tl.load(EXT_A).to(tl.int32), BLOCK_A)
    nb = na * 0 + 1
    if EXT_B is not None:
        nb = tl.cdiv(tl.load(EXT_B).to(tl.int32), BLOCK_B)
    seg = na * 0
    start = na * 0
    tiles_a = na
    tiles_b = nb
    total = na * nb
    for s in tl.static_range(1, NUM):
        na = tl.cdiv(tl.load(EXT_A + s).to(tl.int32), BLOCK_A)
        if EXT_B is not None:
            nb = tl.cdiv(tl.load(EXT_B + s).to(tl.int32), BLOCK_B)
        hit = tile_id >= total
        seg = tl.where(hit, s, seg)
        start = tl.where(hit, total, start)
        tiles_a = tl.where(hit, na, tiles_a)
        tiles_b = tl.where(hit, nb, tiles_b)
        total += na * nb
    return seg, tile_id - start, tiles_a, tiles_b


@triton.jit
def load_ptr(TABLE, idx, ELEM_TY: tl.constexpr, ALIGNED: tl.constexpr):
    """Table entry ``idx`` (an int64 ``data_ptr()``) as a pointer to ``ELEM_TY``."""
    p = tl.load(TABLE + idx).to(tl.pointer_type(ELEM_TY))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def load_int(TABLE, idx, MULTIPLE: tl.constexpr):
    """Table entry ``idx`` as int32 (widths, offsets), hinted a multiple of ``MULTIPLE``."""
    v = tl.load(TABLE + idx).to(tl.int32)
    if MULTIPLE > 1:
        v = tl.multiple_of(v, MULTIPLE)
    return v


@triton.jit
def mma(a, b, acc):
    """``acc + a @ b`` with fp32 accumulation; fp32 inputs use IEEE precision (matches torch)."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def masked_k_loop(acc, a_ptrs, b_ptrs, a_ok, b_ok, k_end, k_size, step_a, step_b, BLOCK_K: tl.constexpr):
    """``acc + A @ B`` over the K steps [0, k_end) of BLOCK_K, from pointer tiles: ``a_ptrs``
    (BLOCK_M, BLOCK_K) and ``b_ptrs`` (BLOCK_K, BLOCK_N) at step 0, advanced by ``step_a`` /
    ``step_b`` per step. Rows of A outside ``a_ok``, columns of B outside ``b_ok`` and K indices
    from ``k_size`` on read zeros."""
    rk = tl.arange(0, BLOCK_K)
    for k in range(0, k_end, BLOCK_K):
        k_ok = rk < k_size - k
        a = tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & b_ok[None, :], other=0.0)
        acc = mma(a, b, acc)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


@triton.jit
def tile_desc(base, rows, cols, row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A TMA descriptor of the row-major ``(rows, cols)`` matrix at ``base`` (row stride
    ``row_stride``, unit column stride), read in ``BLOCK_R x BLOCK_C`` boxes with ``.load([r, c])``.
    Legal (``tma_legal``) when ``base`` and the row stride in bytes are 16-byte multiples and box
    start columns are too. A box reaching past ``rows`` / ``cols`` reads zeros there, which replaces
    the masks: pass the extents the math may read, never more than the allocation holds."""
    return tl.make_tensor_descriptor(base, shape=[rows, cols], strides=[row_stride, 1],
                                     block_shape=[BLOCK_R, BLOCK_C])


# ----------------------------------------------------------------------------------------------
# Appended helpers (attention kernels)
# ----------------------------------------------------------------------------------------------
def is_pow2_in(n: int, lo: int, hi: int) -> bool:
    """``n`` is a power of two with ``lo <= n <= hi`` (head dims, block sizes)."""
    return isinstance(n, int) and lo <= n <= hi and n & (n - 1) == 0


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has a unit stride (or at most one element), else a
    contiguous copy: what kernels that read rows with any other strides need."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def interpreter_dtype_reasons(dtype: torch.dtype) -> List[str]:
    """Why the Triton interpreter cannot run a kernel with ``tl.dot`` on ``dtype`` inputs (empty:
    it can, or kernels run on a GPU): it computes bfloat16 dots wrongly."""
    if is_interpreter() and dtype == torch.bfloat16:
        return ["the Triton interpreter computes bfloat16 tl.dot wrongly: bfloat16 needs a GPU"]
    return []


def attention_input_reasons(op: str, q: torch.Tensor, min_head_dim: int, max_head_dim: int, *,
                            head_dim_reasons: Optional[Callable[[int], List[str]]] = None) -> List[str]:
    """Why a Triton attention kernel cannot take ``q``: its dtype (fp16 / bf16 / fp32, and what the
    interpreter cannot run) or its head dim (a power of two in ``[min_head_dim, max_head_dim]``,
    or the kernel's own rule ``head_dim_reasons(d)`` when given)."""
    reasons = []
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"triton {op} supports float16/bfloat16/float32, got {q.dtype}")
    reasons += interpreter_dtype_reasons(q.dtype)
    d = int(q.shape[-1])
    if head_dim_reasons is not None:
        reasons += head_dim_reasons(d)
    elif not is_pow2_in(d, min_head_dim, max_head_dim):
        reasons.append(f"head dim must be a power of two in [{min_head_dim}, {max_head_dim}], got {d}")
    return reasons


__all__ += ["is_pow2_in", "last_dim_contiguous", "interpreter_dtype_reasons", "attention_input_reasons"]
