"""The GPU-semantics emulation's own detectors (``colm_kernels._triton.gpu_semantics``), on kernels
written wrong on purpose: a race, a read of another program's output, an out-of-bounds access, and
a kernel whose rerun by the autotuner doubles its output. Each must be caught; the correct twins
must pass. Runs in the interpreter at any tiles (tier 1)."""
import pytest
import torch
import triton
import triton.language as tl

from colm_kernels._triton import gpu_semantics as gs
from colm_kernels._triton.autotuning import autotune
from colm_kernels._triton.device import is_interpreter

pytestmark = pytest.mark.skipif(not is_interpreter(), reason="the emulation patches Triton's CPU interpreter")

BLOCK = 16


@triton.jit
def _copy(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _copy_unmasked(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # no mask: the last block reads past n
    tl.store(Y + offs, tl.load(X + offs), mask=offs < n)


@triton.jit
def _sum_racy(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y, tl.sum(tl.load(X + offs, mask=offs < n, other=0.0)))  # every program writes Y[0]


@triton.jit
def _sum_atomic(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(Y, tl.sum(tl.load(X + offs, mask=offs < n, other=0.0)))


@triton.jit
def _sum_mixed(X, Y, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    part = tl.sum(tl.load(X + offs, mask=offs < n, other=0.0))
    if pid == 0:
        tl.store(Y, part)  # a plain write where the others add atomically
    else:
        tl.atomic_add(Y, part)


@triton.jit
def _shift_reads_neighbour(X, Y, n, BLOCK: tl.constexpr):
    # Y[i] = X[i] then Y[i] += Y[i + BLOCK]: reads what the next program writes
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)
    nxt = offs + BLOCK
    extra = tl.load(Y + nxt, mask=nxt < n, other=0.0)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) + extra, mask=offs < n)


@triton.jit
def _ticket(ORDER, COUNTER):
    # each program takes a ticket: ORDER[ticket] = its id (reads only through atomics)
    t = tl.atomic_add(COUNTER, 1)
    tl.store(ORDER + t, tl.program_id(0))


def _configs():
    return [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]


@autotune(configs=_configs(), key=["n"], prune=lambda configs, named_args, **kw: configs)
@triton.jit
def _sum_atomic_tuned_unsafe(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(Y, tl.sum(tl.load(X + offs, mask=offs < n, other=0.0)))


@autotune(configs=_configs(), key=["n"], prune=lambda configs, named_args, **kw: configs, reset_to_zero=["Y"])
@triton.jit
def _sum_atomic_tuned(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(Y, tl.sum(tl.load(X + offs, mask=offs < n, other=0.0)))


def _run(kernel, n=100, grid=None):
    x = torch.randn(n)
    y = torch.zeros(n)
    kernel[grid or (triton.cdiv(n, BLOCK),)](x, y, n, BLOCK=BLOCK)
    return x, y


def test_clean_kernels_pass():
    with gs.emulate(seed=1):
        x, y = _run(_copy)
        assert torch.equal(x, y)
        x, y = _run(_sum_atomic)
        torch.testing.assert_close(y[0], x.sum())


def test_out_of_bounds_read_is_caught_and_not_performed():
    with gs.emulate(seed=1):
        with pytest.raises(gs.OutOfBoundsError, match="past the end of X"):
            _run(_copy_unmasked, n=100)  # 7 blocks of 16 read up to X[111]
    with gs.emulate(seed=1):
        _run(_copy_unmasked, n=96)  # whole blocks: clean


@triton.jit
def _copy_through_table(TABLE, Y, n, BLOCK: tl.constexpr):
    # X's address comes from a table, as the chain GEMMs read their per-chain weights
    X = tl.load(TABLE).to(tl.pointer_type(tl.float32))
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def test_pointer_table_tensors_are_in_bounds_once_declared():
    x, y = torch.randn(40), torch.zeros(40)
    with gs.emulate(seed=1):
        with pytest.raises(gs.OutOfBoundsError, match="no tensor argument|past the end|before the start"):
            _copy_through_table[(3,)](torch.tensor([x.data_ptr()]), y, 40, BLOCK=BLOCK)
        _copy_through_table[(3,)](torch.tensor(gs.pointer_row([x])), y, 40, BLOCK=BLOCK)
    assert torch.equal(y, x)


def test_out_of_bounds_write_is_caught_and_not_performed():
    x, y = torch.randn(112), torch.zeros(100)
    with gs.emulate(seed=1):
        with pytest.raises(gs.OutOfBoundsError, match=r"(?s)12 out-of-bounds .*past the end of Y"):
            _copy[(7,)](x, y, 112, BLOCK=BLOCK)  # n says 112: stores reach Y[111]
    assert torch.equal(y, x[:100])  # the lanes in bounds ran, the others were not performed


def test_plain_write_race_is_caught():
    with gs.emulate(seed=2):
        with pytest.raises(gs.RaceError, match=r"written by programs \[0, 1"):
            _run(_sum_racy)


def test_plain_and_atomic_write_race_is_caught():
    with gs.emulate(seed=2):
        with pytest.raises(gs.RaceError, match="plainly by program 0 and atomically"):
            _run(_sum_mixed)


def test_read_of_another_programs_output_is_caught():
    with gs.emulate(seed=3):
        with pytest.raises(gs.RaceError, match="reads the byte at .* which program .* writes"):
            _run(_shift_reads_neighbour)


def test_atomics_synchronised_kernel_can_be_declared():
    order, counter = torch.full((6,), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    with gs.emulate(seed=4):
        _ticket[(6,)](order, counter)
    assert sorted(order.tolist()) == list(range(6))
    assert order.tolist() != list(range(6))  # seed 4 shuffles the programs
    records = [r for r in gs.launch_log() if r.kernel == "_ticket"]
    assert records[-1].shuffled and records[-1].grid == (6, 1, 1)


def test_program_order_is_seeded():
    def order_of(seed):
        order, counter = torch.full((12,), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        with gs.emulate(seed=seed):
            _ticket[(12,)](order, counter)
        return order.tolist()

    assert order_of(5) == order_of(5)
    assert order_of(5) != order_of(6)
    with gs.emulate(seed=5, shuffle=False):
        order, counter = torch.full((12,), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        _ticket[(12,)](order, counter)
    assert order.tolist() == list(range(12))


def test_autotuner_reruns_expose_an_undeclared_accumulator():
    x = torch.randn(100, dtype=torch.float64).float()
    for kernel, ok in ((_sum_atomic_tuned_unsafe, False), (_sum_atomic_tuned, True)):
        kernel.cache.clear()
        y = torch.zeros(1)
        with gs.emulate(seed=7):
            kernel[lambda m: (triton.cdiv(100, m["BLOCK"]),)](x, y, 100)
        runs = [r for r in gs.launch_log() if r.kernel == kernel.base_fn.__name__]
        assert sum(r.benchmark for r in runs[-(2 * gs.RERUNS + 1):]) == 2 * gs.RERUNS
        # 2 configs x RERUNS benchmark runs, then the call: 7 sums without reset_to_zero
        expected = x.sum() * (1 if ok else 2 * gs.RERUNS + 1)
        torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-5)
