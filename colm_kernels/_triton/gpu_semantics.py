"""GPU execution semantics for Triton's CPU interpreter (``TRITON_INTERPRET=1``).

An H100 launch differs from the interpreter's in ways that hide whole classes of bugs:

- the autotuner benchmarks every kept config of a new key by launching it many times into the
  live argument buffers (the interpreter's stand-in, ``autotuning._interpreter_bench``, runs nothing),
  so a kernel that accumulates into an output returns a multiple of the answer on first call;
- the programs of a launch run concurrently and in no fixed order (the interpreter: one after
  another, in grid order), so two programs writing one element, or one reading what another
  writes, give an answer that depends on timing;
- an access past a buffer is a fault, or silently reads and corrupts other memory (the
  interpreter reads host memory and returns whatever lies there).

Under ``emulate()`` (or process-wide with ``start()``: ``COLM_KERNELS_GPU_SEMANTICS=1`` in the
test suite, see ``tests/conftest.py``) the interpreter behaves like the GPU in these respects:

- **reruns**: ``rerun_bench`` is the autotuner's ``do_bench``: it calls the kernel ``RERUNS``
  times into the live buffers through Triton's own ``Autotuner._bench`` (so ``reset_to_zero`` /
  ``restore_value`` apply exactly as on a GPU) and returns a seeded random time, so any kept
  config may win;
- **shuffled programs**: each launch runs its grid in a seeded random permutation;
- **race detector**: per launch it records which program wrote (plainly or by atomics) and read
  each byte, and raises ``RaceError`` when two programs write a byte without atomics, when a byte
  is written plainly by one program and atomically by another, or when a program reads a byte
  another program of the launch writes (unless the kernel is declared with
  ``syncs_through_atomics``);
- **bounds checker**: every address a load, store or atomic touches (masked-off lanes and the
  zero fill of TMA boxes excluded) must lie in the storage of one of the launch's tensor arguments
  or of a tensor declared with ``pointer_row`` (tables of pointers); lanes outside are not
  accessed and the launch raises ``OutOfBoundsError``, as compute-sanitizer's memcheck would.

What it cannot show: timing, the GPU's own floating-point rounding (tensor-core accumulation
order, bf16 dots, which the interpreter computes wrongly), warp-level and shared-memory races
inside one program, memory-model effects between programs that do synchronise, and anything of
the CUDA (``csrc/``) kernels.

The same hooks, outside the emulation too, feed ``observe_accesses`` and ``track_launches``: the
byte and FLOP counters of ``colm_kernels.bench.work``.

The H100 tiles and config lists themselves are chosen at import (``COLM_KERNELS_TILES=gpu``) and
autotuning must be on; ``tests/conftest.py`` sets both in the GPU-semantics test mode.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "RERUNS",
    "GpuSemanticsError",
    "RaceError",
    "OutOfBoundsError",
    "env_enabled",
    "active",
    "emulate",
    "start",
    "stop",
    "reseed",
    "seed",
    "rerun_bench",
    "pointer_row",
    "syncs_through_atomics",
    "LaunchRecord",
    "launch_log",
    "clear_launch_log",
    "observe_accesses",
    "track_launches",
    "current_kernel",
]

RERUNS = 3  # kernel calls per benchmarked config (a real do_bench makes hundreds)
_MAX_REPORTED = 4  # bad addresses quoted per error


class GpuSemanticsError(AssertionError):
    """A launch did something that is wrong or undefined on a GPU."""


class RaceError(GpuSemanticsError):
    """Two programs of one launch touched one byte in an order-dependent way."""


class OutOfBoundsError(GpuSemanticsError):
    """A launch touched memory outside its tensor arguments and declared buffers."""


def env_enabled() -> bool:
    """Whether ``COLM_KERNELS_GPU_SEMANTICS`` asks for the emulation (the test mode)."""
    return os.environ.get("COLM_KERNELS_GPU_SEMANTICS", "").strip().lower() in ("1", "true", "yes", "on")


class _Settings:
    def __init__(self, seed: int, shuffle: bool, races: bool, bounds: bool):
        self.seed, self.shuffle, self.races, self.bounds = int(seed), shuffle, races, bounds
        self.rng = np.random.default_rng(self.seed)


_settings: Optional[_Settings] = None
_launch: Optional["_Launch"] = None
_declared: List[weakref.ref] = []  # tensors whose data_ptr() went into a pointer table
_atomic_sync: set = set()  # kernels (function names) that synchronise programs through atomics
# callbacks ``(kernel, kind, addresses, element size)`` for every access the interpreter executes,
# emulation or not (``bench.work.count_memory_traffic``): one hooking layer for both
_observers: list = []
_launch_observers: list = []  # callbacks ``(kernel, grid, scalar keyword arguments)`` after each launch
_trackers = 0  # open ``track_launches`` blocks (the FLOP counter's: it needs the running kernel only)


class LaunchRecord(NamedTuple):
    kernel: str  # the @triton.jit function's name
    grid: Tuple[int, int, int]
    shuffled: bool  # programs ran in a random permutation
    benchmark: bool  # an autotuner benchmark run (``rerun_bench``), not the call's own launch
    meta: Tuple[Tuple[str, object], ...]  # the launch's scalar keyword arguments (its config among them)


_log: List[LaunchRecord] = []  # the most recent launches under the emulation
_LOG_SIZE = 4096
_benchmarking = 0


def active() -> bool:
    """Whether launches run under the emulation now."""
    return _settings is not None


def seed() -> Optional[int]:
    """The seed of the current emulation (None when inactive)."""
    return None if _settings is None else _settings.seed


def start(seed: int = 0, *, shuffle: bool = True, races: bool = True, bounds: bool = True) -> None:
    """Run every launch of the process under the emulation from now on (``stop`` ends it)."""
    global _settings
    _install()
    _settings = _Settings(seed, shuffle, races, bounds)


def stop() -> None:
    global _settings
    _settings = None


def reseed(new_seed: int) -> None:
    """Restart the emulation's random stream (program orders, benchmark times) from ``new_seed``:
    the test mode reseeds per test, so a failure reproduces alone."""
    if _settings is not None:
        _settings.seed = int(new_seed)
        _settings.rng = np.random.default_rng(_settings.seed)


@contextlib.contextmanager
def emulate(seed: int = 0, *, shuffle: bool = True, races: bool = True, bounds: bool = True):
    """Run the launches inside the block under the emulation (restoring the previous state)."""
    global _settings
    saved = _settings
    start(seed, shuffle=shuffle, races=races, bounds=bounds)
    try:
        yield
    finally:
        _settings = saved


def rerun_bench(kernel_call, quantiles=None, **_):
    """``do_bench`` as the GPU's autotuner runs it, minus the timing: ``RERUNS`` launches into the
    live buffers, then a seeded random time (so which kept config wins varies with the seed)."""
    global _benchmarking
    _benchmarking += 1
    try:
        for _ in range(RERUNS):
            kernel_call()
    finally:
        _benchmarking -= 1
    t = float(_settings.rng.uniform(1.0, 2.0)) if _settings is not None else 1.0
    return [t, t, t] if quantiles else t


def pointer_row(tensors: Iterable[Optional[torch.Tensor]]) -> List[int]:
    """``[t.data_ptr() for t in tensors]`` (None: 0), the row of a pointer table a kernel reads its
    operands through. Under the emulation the bounds checker also admits these tensors' storage
    (they are not launch arguments themselves)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(0)
            continue
        out.append(t.data_ptr())
        if _settings is not None:
            _declared.append(weakref.ref(t))
    if len(_declared) > 1024:
        _declared[:] = [r for r in _declared if r() is not None][-512:]
    return out


def syncs_through_atomics(kernel):
    """Declare that the programs of ``kernel`` (a ``@triton.jit`` function, or an autotuner of
    one) read what other programs write, ordered by atomics (a semaphore, a counter): the race
    detector then checks its writes only. Returns ``kernel`` (usable as a decorator)."""
    _atomic_sync.add(_kernel_name(kernel))
    return kernel


def launch_log() -> List[LaunchRecord]:
    """The most recent launches under the emulation, oldest first (tests read what ran)."""
    return list(_log)


def clear_launch_log() -> None:
    _log.clear()


@contextlib.contextmanager
def observe_accesses(callback, on_launch=None):
    """Call ``callback(kernel, kind, addrs, size)`` inside the block for every global-memory access
    the interpreter executes: ``kind`` is ``"load"``, ``"store"`` or ``"atomic"`` (atomic loads and
    stores too), ``addrs`` the uint64 start addresses of the lanes that access memory (masked-off
    lanes, the zero fill of TMA boxes and, under the emulation, out-of-bounds lanes excluded),
    ``size`` the element size in bytes; and ``on_launch(kernel, grid, meta)`` after each launch
    (``meta``: its scalar keyword arguments, the autotuner's config among them)."""
    _install()
    _observers.append(callback)
    if on_launch is not None:
        _launch_observers.append(on_launch)
    try:
        yield
    finally:
        _observers.remove(callback)
        if on_launch is not None:
            _launch_observers.remove(on_launch)


@contextlib.contextmanager
def track_launches():
    """Inside the block ``current_kernel()`` names the kernel whose programs the interpreter runs
    (``bench.work.count_mma_flops`` attributes its dots with it)."""
    global _trackers
    _install()
    _trackers += 1
    try:
        yield
    finally:
        _trackers -= 1


def current_kernel() -> str:
    """The running kernel's function name ("?" outside a launch seen by these hooks)."""
    return "?" if _launch is None else _launch.name


def _kernel_name(fn) -> str:
    while not callable(getattr(fn, "__code__", None)) and hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", str(fn))


# ----------------------------------------------------------------------------------------------
# One launch's record
# ----------------------------------------------------------------------------------------------
def _storage_ranges(named: Sequence[Tuple[str, object]]) -> List[Tuple[int, int, str]]:
    """``(first byte, end byte, label)`` of the storage of every tensor among ``named`` arguments
    (tuples and TMA host descriptors searched too) and of the declared pointer-table tensors."""
    ranges = []

    def add(label, arg):
        if isinstance(arg, torch.Tensor):
            st = arg.untyped_storage()
            if st.nbytes():
                ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes(), label))
        elif isinstance(arg, (tuple, list)):
            for i, a in enumerate(arg):
                add(f"{label}[{i}]", a)
        elif hasattr(arg, "base") and isinstance(getattr(arg, "base"), torch.Tensor):
            add(f"{label}.base", arg.base)

    for name, arg in named:
        add(name, arg)
    for ref in _declared:
        t = ref()
        if t is not None:
            add("a pointer-table tensor", t)
    return ranges


class _Launch:
    """One launch: ``settings`` None when only observers watch it (no checks, no log)."""

    def __init__(self, name: str, ranges: List[Tuple[int, int, str]], settings: Optional[_Settings]):
        self.name = name
        self.ranges = ranges
        self.settings = settings
        self.dims = (1, 1, 1)
        self.perm: Optional[np.ndarray] = None
        self.pid = 0
        self.atomic_depth = 0
        # per program: lists of (element start addresses, element size)
        self.reads: Dict[int, list] = {}
        self.writes: Dict[int, list] = {}
        self.atomics: Dict[int, list] = {}
        self.atomic_reads: Dict[int, list] = {}
        self.out_of_bounds: List[str] = []  # the first few, described
        self.n_out_of_bounds = 0
        starts = np.array([r[0] for r in ranges], dtype=np.uint64)
        order = np.argsort(starts, kind="stable")
        self._starts = starts[order]
        self._ends = np.array([r[1] for r in ranges], dtype=np.uint64)[order]
        self._labels = [ranges[i][2] for i in order]

    # -- bounds --------------------------------------------------------------------------------
    def in_bounds(self, addrs: np.ndarray, size: int) -> np.ndarray:
        """Whether each access ``[addr, addr + size)`` lies inside one recorded storage."""
        if not len(self._starts):
            return np.zeros(addrs.shape, dtype=bool)
        ok = np.zeros(addrs.shape, dtype=bool)
        end = addrs + np.uint64(size)
        for s, e in zip(self._starts, self._ends):  # few ranges; storages may nest (views)
            ok |= (addrs >= s) & (end <= e)
        return ok

    def describe(self, addr: int) -> str:
        """Where ``addr`` lies relative to the nearest recorded storage."""
        best = None
        for s, e, label in zip(self._starts, self._ends, self._labels):
            s, e = int(s), int(e)
            dist = 0 if s <= addr < e else (s - addr if addr < s else addr - e + 1)
            if best is None or dist < best[0]:
                where = (f"{addr - e} bytes past the end of {label} ({e - s} bytes)" if addr >= e
                         else f"{s - addr} bytes before the start of {label}")
                best = (dist, where)
        return best[1] if best else "no tensor argument at all"

    # -- races ---------------------------------------------------------------------------------
    def record(self, table: Dict[int, list], addrs: np.ndarray, size: int) -> None:
        if addrs.size:
            table.setdefault(self.pid, []).append((addrs, size))

    def check(self) -> None:
        if self.out_of_bounds:
            raise OutOfBoundsError(
                f"{self.name}: {self.n_out_of_bounds} out-of-bounds access(es) (grid {self.dims}, "
                f"seed {self.settings.seed}):\n  " + "\n  ".join(self.out_of_bounds[:_MAX_REPORTED]))
        if not self.settings.races:
            return
        plain_b, plain_p = _owned_bytes(self.writes)
        dup = _multi_owner(plain_b, plain_p)
        if dup is not None:
            raise RaceError(self._race("written by programs", dup, plain_b, plain_p, "without atomics"))
        atom_b, atom_p = _owned_bytes(self.atomics)
        if atom_b.size and plain_b.size:
            clash = _other_owner(atom_b, atom_p, plain_b, plain_p)
            if clash is not None:
                raise RaceError(f"{self.name}: byte at {self.describe(int(clash[0]))} written plainly by program "
                                f"{clash[2]} and atomically by program {clash[1]} (seed {self.settings.seed})")
        if self.name in _atomic_sync:
            return
        # only reads inside a storage that the launch writes can race: filter before expanding
        written = self._written_ranges(plain_b, atom_b)
        read_b, read_p = _owned_bytes(self.reads, within=written)
        for wb, wp, how in ((plain_b, plain_p, "writes"), (atom_b, atom_p, "adds to (atomics)")):
            clash = _other_owner(read_b, read_p, wb, wp)
            if clash is not None:
                raise RaceError(
                    f"{self.name}: program {clash[1]} reads the byte at {self.describe(int(clash[0]))}, which "
                    f"program {clash[2]} of the same launch {how} (grid {self.dims}, seed {self.settings.seed}); "
                    "declare the kernel with syncs_through_atomics if atomics order them")

    def _written_ranges(self, *written: np.ndarray) -> List[Tuple[int, int]]:
        """The recorded storages that hold a written byte."""
        out = []
        for s, e in zip(self._starts, self._ends):
            if any(w.size and np.searchsorted(w, s) < np.searchsorted(w, e) for w in written):
                out.append((s, e))
        return out

    def _race(self, what, byte, b, p, tail) -> str:
        owners = sorted(set(int(x) for x in p[b == byte]))
        return (f"{self.name}: the byte at {self.describe(int(byte))} is {what} {owners} {tail} "
                f"(grid {self.dims}, seed {self.settings.seed})")


def _owned_bytes(table: Dict[int, list], within: Optional[List[Tuple[int, int]]] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """``(bytes, program)``: every byte each program touched (inside the ``within`` byte ranges,
    when given), once per program, sorted by byte."""
    parts_b, parts_p = [], []
    for pid, items in table.items():
        spans = []
        for a, size in items:
            if within is not None:
                keep = np.zeros(a.shape, dtype=bool)
                for lo, hi in within:
                    keep |= (a >= lo) & (a < hi)
                a = a[keep]
            if a.size:
                a = np.unique(a)
                spans.append((a[:, None] + np.arange(size, dtype=np.uint64)[None, :]).ravel())
        if not spans:
            continue
        b = np.unique(np.concatenate(spans))
        parts_b.append(b)
        parts_p.append(np.full(b.shape, pid, dtype=np.int64))
    if not parts_b:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    b, p = np.concatenate(parts_b), np.concatenate(parts_p)
    order = np.argsort(b, kind="stable")
    return b[order], p[order]


def _multi_owner(b: np.ndarray, p: np.ndarray):
    """A byte that two programs own (``b`` sorted, each (byte, program) once), or None."""
    same = np.nonzero(b[1:] == b[:-1])[0]
    return None if not same.size else b[same[0]]


def _other_owner(qb, qp, wb, wp):
    """``(byte, querying program, other owner)`` for a byte of ``qb`` that some program other
    than its querier owns in ``(wb, wp)`` (sorted by byte), or None."""
    lo = np.searchsorted(wb, qb, side="left")
    hi = np.searchsorted(wb, qb, side="right")
    hit = hi > lo
    if not hit.any():
        return None
    # owners of each hit byte: a different one exists iff the run holds two owners or its single
    # owner is not the querier
    idx = np.nonzero(hit)[0]
    first = wp[lo[idx]]
    several = (hi[idx] - lo[idx]) > 1
    bad = several | (first != qp[idx])
    if not bad.any():
        return None
    j = idx[np.nonzero(bad)[0][0]]
    owners = wp[lo[j]:hi[j]]
    other = next(int(o) for o in owners if o != qp[j])
    return qb[j], int(qp[j]), other


# ----------------------------------------------------------------------------------------------
# Interpreter patches
# ----------------------------------------------------------------------------------------------
_installed = False


def _install() -> None:
    """Wrap the interpreter's launch, grid and memory operations (idempotent; a no-op outside the
    emulation: every wrapper defers to the original when no launch is recorded)."""
    global _installed
    if _installed:
        return
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    np_dtype = interp._get_np_dtype
    TensorHandle = interp.TensorHandle

    original_call = interp.GridExecutor.__call__

    def launch(self, *args_dev, **kwargs):
        global _launch
        if _launch is not None or (_settings is None and not _observers and not _trackers):
            return original_call(self, *args_dev, **kwargs)
        if _settings is None:  # observed or tracked only
            record = _Launch(_kernel_name(self.fn), [], None)
        else:
            named = list(zip(self.arg_names, args_dev)) + list(kwargs.items())
            record = _Launch(_kernel_name(self.fn), _storage_ranges(named), _settings)
        _launch = record
        try:
            out = original_call(self, *args_dev, **kwargs)
        finally:
            _launch = None
        meta = tuple(sorted((k, v) for k, v in kwargs.items() if v is None or isinstance(v, (bool, int, float))))
        for observe in _launch_observers:
            observe(record.name, record.dims, dict(meta))
        if record.settings is None:
            return out
        _log.append(LaunchRecord(record.name, record.dims, record.perm is not None, _benchmarking > 0, meta))
        del _log[:-_LOG_SIZE]
        record.check()
        return out

    interp.GridExecutor.__call__ = launch

    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx

    def grid_dim(nx, ny, nz):
        if _launch is not None:
            _launch.dims = (nx, ny, nz)
            n = nx * ny * nz
            if _launch.settings is not None and _launch.settings.shuffle and n > 1:
                _launch.perm = _launch.settings.rng.permutation(n)
        return set_grid_dim(nx, ny, nz)

    def grid_idx(x, y, z):
        if _launch is None:
            return set_grid_idx(x, y, z)
        _, ny, nz = _launch.dims
        k = (x * ny + y) * nz + z
        if _launch.perm is not None:
            k = int(_launch.perm[k])
            x, y, z = k // (ny * nz), (k // nz) % ny, k % nz
        _launch.pid = k
        return set_grid_idx(x, y, z)

    builder.set_grid_dim, builder.set_grid_idx = grid_dim, grid_idx

    def checked(ptrs, mask, table_of, kind):
        """The lanes of ``mask`` (broadcast to ``ptrs``) that stay in bounds, recording them and
        any that do not, and passing them to the observers. Returns the mask to run with."""
        rec, settings = _launch, _launch.settings
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
        addrs = np.asarray(ptrs.data, dtype=np.uint64)[m]
        size = np.dtype(np_dtype(ptrs.get_element_ty())).itemsize
        if settings is not None and settings.bounds:
            ok = rec.in_bounds(addrs, size)
            if not ok.all():
                bad = addrs[~ok]
                rec.n_out_of_bounds += bad.size
                for a in bad[:max(0, _MAX_REPORTED - len(rec.out_of_bounds))]:
                    rec.out_of_bounds.append(f"program {rec.pid}: {size}-byte access at {rec.describe(int(a))}")
                m = m.copy()
                m[m] = ok  # the lanes outside are not accessed: no garbage read, no corruption
                addrs = addrs[ok]
        if settings is not None and settings.races:
            rec.record(table_of(rec), addrs, size)
        for observe in _observers:
            observe(rec.name, "atomic" if rec.atomic_depth else kind, addrs, size)
        return TensorHandle(m, mask.dtype)

    def _unwatched():  # no launch recorded, or one only tracked: the original runs
        return _launch is None or (_launch.settings is None and not _observers)

    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store

    def load(ptrs, mask, other, cache_policy, is_volatile):
        if _unwatched():
            return masked_load(ptrs, mask, other, cache_policy, is_volatile)
        # an atomic load is how programs synchronise: bounds-checked, never a racy read
        mask = checked(ptrs, mask, lambda r: r.atomic_reads if r.atomic_depth else r.reads, "load")
        return masked_load(ptrs, mask, other, cache_policy, is_volatile)

    def store(ptrs, value, mask, cache_policy):
        if _unwatched():
            return masked_store(ptrs, value, mask, cache_policy)
        mask = checked(ptrs, mask, lambda r: r.atomics if r.atomic_depth else r.writes, "store")
        return masked_store(ptrs, value, mask, cache_policy)

    builder.create_masked_load, builder.create_masked_store = load, store

    atomic_rmw, atomic_cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def rmw(op, ptr, val, mask, sem, scope):
        if _unwatched():
            return atomic_rmw(op, ptr, val, mask, sem, scope)
        mask = checked(ptr, mask, lambda r: r.atomics, "atomic")
        return atomic_rmw(op, ptr, val, mask, sem, scope)

    def cas(ptr, cmp, val, sem, scope):
        if not _unwatched():
            ones = TensorHandle(np.ones(np.shape(ptr.data), dtype=bool), None)
            kept = checked(ptr, ones, lambda r: r.atomics, "atomic")
            if not np.all(kept.data):
                raise OutOfBoundsError(f"{_launch.name}: atomic_cas out of bounds: "
                                       + "; ".join(_launch.out_of_bounds[:_MAX_REPORTED]))
        return atomic_cas(ptr, cmp, val, sem, scope)

    builder.create_atomic_rmw, builder.create_atomic_cas = rmw, cas

    for name in ("create_atomic_load", "create_atomic_store"):
        original = getattr(builder, name)

        def as_atomic(*args, _original=original):
            if _launch is None:
                return _original(*args)
            _launch.atomic_depth += 1
            try:
                return _original(*args)
            finally:
                _launch.atomic_depth -= 1

        setattr(builder, name, as_atomic)
    _installed = True
