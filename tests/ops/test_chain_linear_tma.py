"""The TMA configs of the chain GEMM kernels (chain_linear forward, dX, dW; the fused SwiGLU forward).

Each pointer config has a ``USE_TMA`` twin whose operand tiles come from device-side tensor
descriptors (zero fill past the descriptor's extents instead of masks); the pruner offers the twins
only where they are legal (``tma_legal``: 16-bit inputs, aligned table and operands, no per-row
gather). Triton's interpreter implements tensor descriptors, zero fill included, so
``tma_mode("only")`` runs the TMA branch there at the interpreter's 16x16x16 tiles: against float64
(2x the error of the same math in fp16) and bit for bit against the pointer branch, on layouts that
end mid-tile, with NaN in every element the math must not read. On a GPU every kept TMA config runs
forward and backward against float64 in bf16 and fp16 (``force_config``, the 2x-eager rule).
"""
import contextvars
import math

import pytest
import torch

import colm_kernels as ck
from colm_kernels._triton import device as DEV
from colm_kernels._triton import gemm_configs as GEMM
from colm_kernels._triton import tma as TMA
from colm_kernels._triton.autotuning import autotuned_kernels, force_config
from colm_kernels._triton.device import is_interpreter
from colm_kernels._triton.tma import tma_legal, tma_mode
from colm_kernels.ops.chain_linear.triton_launch import chain_linear_bwd_dw, chain_linear_bwd_dx, chain_linear_fwd
from colm_kernels.ops.chain_swiglu.triton_kernels import _H100_DUAL_GEMM_TMA, chain_swiglu_fwd
from numerics import assert_within_eager_error, check_against_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GEMM_KERNELS = {"_chain_linear_fwd_kernel", "_chain_linear_bwd_dx_kernel", "_chain_linear_bwd_dw_kernel",
                "_chain_swiglu_fwd_kernel"}
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled TMA configs need a GPU")


def _chosen_tma() -> dict:
    """``{kernel: [USE_TMA of each config it ran]}`` since the caches were last cleared."""
    return {k.base_fn.__name__: [bool(c.kwargs.get("USE_TMA", False)) for c in k.cache.values()]
            for k in autotuned_kernels() if k.base_fn.__name__ in GEMM_KERNELS and k.cache}


# ----------------------------------------------------------------------------------------------
# Inputs: every element the math must not read is NaN
# ----------------------------------------------------------------------------------------------
def _padded(m, n, pad, dtype, gen):
    """(m, n) standard normal as a view of an (m, n + pad) buffer whose pad columns are NaN."""
    buf = torch.full((m, n + pad), float("nan"), dtype=dtype)
    buf[:, :n] = torch.randn(m, n, generator=gen).to(dtype)
    return buf[:, :n].to(DEVICE)


def _blocks(ds, ps, dtype, gen):
    """Per-chain weights as views of one dense matrix (row stride P_last + 8): the blocks above the
    chain diagonal and the pad are NaN."""
    stride = ps[-1] + 8
    full = torch.full((sum(ds), stride), float("nan"), dtype=dtype)
    out, o = [], 0
    for d, p in zip(ds, ps):
        full[o:o + d, :p] = (torch.randn(d, p, generator=gen) / math.sqrt(p)).to(dtype)
        o += d
    full = full.to(DEVICE)
    o = 0
    for d, p in zip(ds, ps):
        out.append(full[o:o + d, :p])
        o += d
    return out


def _ref_linear(x, ws, bs, dy, k):
    """(y, dx, dW...) of the chain linear by a per-chain loop in x's dtype."""
    ys, dws, dx, o = [], [], torch.zeros_like(x[:, :k]), 0
    for w, b in zip(ws, bs):
        d, p = w.shape
        ys.append(x[:, :p] @ w.T + b)
        dx[:, :p] += dy[:, o:o + d] @ w
        dws.append(dy[:, o:o + d].T @ x[:, :p])
        o += d
    return [torch.cat(ys, 1), dx] + dws


def _ref_swiglu(x, w1, w3):
    hs, gs = [], []
    for a_w, b_w in zip(w1, w3):
        p = a_w.shape[1]
        a, b = x[:, :p] @ a_w.T, x[:, :p] @ b_w.T
        hs.append(torch.nn.functional.silu(a) * b)
        gs += [a, b]
    return [torch.cat(hs, 1), torch.cat(gs, 1)]


def _run_linear(x, ws, bs, dy, k):
    y = chain_linear_fwd(x, ws, bs)
    dx = chain_linear_bwd_dx(dy, ws, k)
    dws, _ = chain_linear_bwd_dw(dy, x, ws, [True] * len(ws), [False] * len(ws))
    return [y, dx] + dws


# (chains' output widths, prefix widths, extra x columns): every width a multiple of 8 (16 bytes in
# fp16, so TMA is legal) but not of the 16-wide interpreter tile, so boxes cross every edge.
LAYOUTS = {
    "C1.3": ((8, 24), (8, 32), 8),
    "C1.2.1": ((8, 16, 8), (16, 40, 56), 0),
    "C1": ((40,), (24,), 16),
}


@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tma_branch_matches_float64_and_pointer_branch(layout, M):
    ds, ps, extra = LAYOUTS[layout]
    dt = torch.float16
    gen = torch.Generator().manual_seed(11)
    k = ps[-1] + extra
    x = _padded(M, k, 8, dt, gen)  # NaN pad past column k; columns past P_i are real data
    dy = _padded(M, sum(ds), 16, dt, gen)
    ws = _blocks(ds, ps, dt, gen)
    bs = [torch.randn(d, generator=gen).to(dt).to(DEVICE) for d in ds]
    w3 = _blocks(ds, ps, dt, gen)

    with tma_mode("off"):
        pointer = _run_linear(x, ws, bs, dy, k) + list(chain_swiglu_fwd(x, ws, w3, True))
        assert not any(any(v) for v in _chosen_tma().values())
    with tma_mode("only"):
        tma = _run_linear(x, ws, bs, dy, k) + list(chain_swiglu_fwd(x, ws, w3, True))
        chosen = _chosen_tma()
    assert set(chosen) == GEMM_KERNELS and all(all(v) for v in chosen.values()), chosen

    r64 = _ref_linear(x.double(), [w.double() for w in ws], [b.double() for b in bs], dy.double(), k)
    r64 += _ref_swiglu(x.double(), [w.double() for w in ws], [w.double() for w in w3])
    low = _ref_linear(x, ws, bs, dy, k) + _ref_swiglu(x, ws, w3)  # the same loops in fp16
    names = ["y", "dx"] + [f"dW[{i}]" for i in range(len(ds))] + ["h", "gates"]
    for name, out, ref, eager, ptr in zip(names, tma, r64, low, pointer):
        assert_within_eager_error(out, eager, ref, atol=torch.finfo(dt).eps, name=f"{layout} M{M} {name}")
        if is_interpreter():  # the same dots in the same order: the branches differ only in loads
            assert torch.equal(out, ptr), f"{name}: TMA and pointer branches differ"
    assert (tma[1][:, ps[-1]:] == 0).all(), "dx past P_last must be exact zeros"


def test_tma_configs_only_where_legal():
    """Under ``tma_mode("only")`` every launch that cannot use descriptors runs its pointer config,
    and stays right: unaligned x, an unaligned weight table, per-row scales (ROWS), fp32."""
    gen = torch.Generator().manual_seed(12)
    ds, ps = (8, 24), (8, 32)
    dt = torch.float16
    ws = _blocks(ds, ps, dt, gen)
    x = _padded(37, 40, 8, dt, gen)
    shifted = _padded(37, 41, 7, dt, gen)[:, 1:]  # base off by one element (row stride 48: aligned)
    odd = _blocks((8, 24), (9, 33), dt, gen)  # prefix widths 9, 33 and row stride 41: ALIGN 1
    row_chains = torch.randint(1, 3, (37,), generator=gen, dtype=torch.int32).to(DEVICE)
    cases = {
        "unaligned x": lambda: chain_linear_fwd(shifted, ws, ()),
        "unaligned table": lambda: chain_linear_fwd(x, odd, ()),
        "rows": lambda: chain_linear_fwd(x, ws, (), row_chains=row_chains),
        "fp32": lambda: chain_linear_fwd(x.float(), [w.float() for w in ws], ()),
    }
    for name, call in cases.items():
        with tma_mode("only"):
            y = call()
            assert _chosen_tma() == {"_chain_linear_fwd_kernel": [False]}, name
        with tma_mode("off"):
            assert torch.equal(y, call()), name


def test_tma_legal_and_mode():
    base = {"ALIGN": 8, "TMA_OPERANDS": True, "ROWS": False}
    assert tma_legal(base, 2) and tma_legal(base, 2, "cpu")
    assert not tma_legal(base, 4), "fp32: IEEE dots, no wgmma"
    assert not tma_legal({**base, "ALIGN": 1}, 2)
    assert not tma_legal({**base, "TMA_OPERANDS": False}, 2)
    assert not tma_legal({**base, "ROWS": True}, 2)
    assert not tma_legal({"ALIGN": 8}, 2), "no TMA_OPERANDS argument: not a TMA-capable kernel"
    with pytest.raises(ValueError, match="tma_mode"):
        with tma_mode("always"):
            pass
    # the interpreter's small tiles: the TMA twin is offered in "only" mode alone
    if DEV.small_tiles():
        assert TMA.tma_choices(True) == (False,)
        with tma_mode("only"):
            assert TMA.tma_choices(True) == (True,) and TMA.tma_choices(False) == (False,)
        with tma_mode("off"):
            assert TMA.tma_choices(True) == (False,)
    import triton
    only_tma = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "USE_TMA": True})]
    key = GEMM.register_gemm_layout(301, ("BLOCK_N", "BLOCK_K"), [(64, 64)])
    with pytest.raises(ValueError, match="pointer configs"):  # illegal here, and nothing else to run
        GEMM.make_gemm_pruner("X")(only_tma, {"X": torch.empty(1), "LAYOUT_KEY": key, **base})
    x = torch.empty(4, 16, dtype=torch.float16)
    assert TMA.operands_tma_aligned(x) and not TMA.operands_tma_aligned(x[:, 1:])
    assert not TMA.operands_tma_aligned(torch.empty(4, 17, dtype=torch.float16)[:, :16])  # row stride 34 B


def test_ensure_tma_allocator_sets_one_only_where_none_is_set():
    """Device-side descriptors need Triton's scratch allocator at launch on CUDA: launchers set a
    torch-backed one when the thread has none and keep one the caller set (no CUDA call is made,
    so this runs anywhere; each case in a fresh context, as a new thread would have)."""
    from triton.runtime import _allocation

    def current():
        return _allocation._allocator.get()

    def fresh(fn):
        ctx = contextvars.Context()
        return ctx.run(fn)

    def cpu_then_cuda():
        TMA.ensure_tma_allocator(torch.device("cpu"))
        before = current()
        TMA.ensure_tma_allocator(torch.device("cuda", 0))
        return before, current()

    before, after = fresh(cpu_then_cuda)
    assert isinstance(before, _allocation.NullAllocator), "CPU launches set nothing"
    assert after is TMA._torch_scratch

    def custom():
        def mine(size, alignment, stream):
            raise AssertionError("not called here")
        import triton
        triton.set_allocator(mine)
        TMA.ensure_tma_allocator(torch.device("cuda", 0))
        return current() is mine

    assert fresh(custom), "a caller's allocator is kept"


# ----------------------------------------------------------------------------------------------
# GPU: every kept TMA config, forward and backward, against float64
# ----------------------------------------------------------------------------------------------
def _randn64(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


@requires_gpu
@pytest.mark.parametrize("index", range(max(len(GEMM._H100_GEMM_TMA), len(_H100_DUAL_GEMM_TMA))))
def test_every_tma_config_matches_reference(index):
    chains = (1, 2, 1)
    m, k_in, n_out, hidden = 301, 320, 192, 448  # chain widths 80/160/80, 48/96/48, 112/224/112
    with tma_mode("only"), force_config(index):
        for dtype in (torch.bfloat16, torch.float16):
            check_against_reference("chain_linear", lambda x, w, b: ck.chain_linear(x, w, b, chains),
                                    [_randn64(m, k_in), _randn64(n_out, k_in, scale=k_in ** -0.5),
                                     _randn64(n_out)], dtype)
            check_against_reference("chain_swiglu", lambda x, w1, w3: ck.chain_swiglu(x, w1, w3, chains),
                                    [_randn64(m, k_in), _randn64(hidden, k_in, scale=k_in ** -0.5),
                                     _randn64(hidden, k_in, scale=k_in ** -0.5)], dtype)
        chosen = _chosen_tma()
    assert set(chosen) == GEMM_KERNELS and all(all(v) for v in chosen.values()), chosen
