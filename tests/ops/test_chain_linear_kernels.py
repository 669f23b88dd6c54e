"""Kernel-level tests of the Chain-of-Linear Triton launchers, run under the Triton interpreter.

Each launcher is compared with a float64 per-chain loop of the same math (COLM_SPEC section 2):
the kernel's max error must be at most 2x the error of the same loop computed in the input dtype,
plus a small floor. bf16 is not tested here (the interpreter's ``tl.dot`` on bf16 is wrong); it is
a GPU-only case. ``torch.empty`` is NaN-filled during these tests so any output element a kernel
fails to write shows up, and dense weight matrices carry NaN in their upper (never read) blocks.
"""

import math
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

pytest.importorskip("triton")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_the_test_device():
    """Every tensor these tests make lives on DEVICE (CPU tensors for the interpreter), through the
    same default-device context on both, so the CPU run exercises the GPU run's code path."""
    with DEVICE:
        yield


def _randn(*shape, gen):
    """Standard normal from the seeded CPU generator (a CPU generator cannot draw on CUDA), moved
    to the test device: the same values on both."""
    return torch.randn(*shape, generator=gen, device="cpu").to(DEVICE)

# the interpreter converts 1-element arrays with int(); numpy >= 1.25 warns on every call
pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs are NaN

from colm_kernels.ops.chain_linear.triton_launch import (
    chain_linear_bwd_dw,
    chain_linear_bwd_dx,
    chain_linear_fwd,
)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
def _widths(dim: int, chains: Tuple[int, ...]) -> Tuple[int, ...]:
    total = sum(chains)
    assert all(dim * c % total == 0 for c in chains)
    return tuple(dim * c // total for c in chains)


@dataclass(frozen=True)
class Case:
    chains: Tuple[int, ...]
    in_features: int
    out_features: int
    extra_in: int = 0  # x wider than the chains read

    @property
    def ds(self):
        return _widths(self.out_features, self.chains)

    @property
    def ps(self):
        w = _widths(self.in_features, self.chains)
        return tuple(sum(w[: i + 1]) for i in range(len(w)))

    @property
    def k(self):
        return self.in_features + self.extra_in

    def __str__(self):
        c = ".".join(map(str, self.chains)) if len(set(self.chains)) > 1 or len(self.chains) < 4 \
            else f"{len(self.chains)}x{self.chains[0]}"
        s = f"C{c}-in{self.in_features}-out{self.out_features}"
        return s + (f"-xwide{self.extra_in}" if self.extra_in else "")


CASES = [
    Case((1, 1, 1, 1), 32, 32),
    Case((1, 2, 1), 40, 24),  # widths 10/20/10 and 6/12/6: not multiples of the 16 block
    Case((3,), 20, 48),  # one chain, several n-tiles
    Case((1,) * 8, 64, 72),  # many chains, odd output width 9
    Case((1, 2, 1), 40, 24, extra_in=7),  # x wider than P_last
]
MS = [1, 17, 67]
DTYPES = [torch.float32, torch.float16]
# (weights as views of one NaN-padded dense matrix, strided x / dy)
LAYOUTS = {"separate": False, "dense": True}

_TOL_EPS = {torch.float32: 16 * torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps}


def _dt(dtype):
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]



# ----------------------------------------------------------------------------------------------
# Inputs and references
# ----------------------------------------------------------------------------------------------
def _make_weights(case: Case, dtype, dense: bool, gen, bias: bool = True):
    ds, ps = case.ds, case.ps
    if dense:
        # one (N, P_last + 3) matrix: blocks above the chain diagonal and the pad are NaN
        stride = ps[-1] + 3
        full = torch.full((sum(ds), stride), float("nan"), dtype=dtype)
        bfull = torch.full((sum(ds),), float("nan"), dtype=dtype)
        ws, bs, o = [], [], 0
        for d, p in zip(ds, ps):
            full[o:o + d, :p] = (_randn(d, p, gen=gen) / math.sqrt(p)).to(dtype)
            bfull[o:o + d] = _randn(d, gen=gen).to(dtype)
            ws.append(full[o:o + d, :p])
            bs.append(bfull[o:o + d])
            o += d
        assert all(w.stride() == (stride, 1) for w in ws)
    else:
        ws = [(_randn(d, p, gen=gen) / math.sqrt(p)).to(dtype) for d, p in zip(ds, ps)]
        bs = [_randn(d, gen=gen).to(dtype) for d in ds]
    return ws, (bs if bias else [])


def _make_2d(m: int, n: int, dtype, strided: bool, gen):
    """(m, n) standard normal, optionally a view with row stride n + 5 (NaN in the gap)."""
    val = _randn(m, n, gen=gen).to(dtype)
    if not strided:
        return val
    buf = torch.full((m, n + 5), float("nan"), dtype=dtype)
    buf[:, :n] = val
    return buf[:, :n]


def _offsets(ds):
    return [sum(ds[:i]) for i in range(len(ds))]


def ref_fwd(x, ws, bs, dtype):
    x = x.to(dtype)
    ys = []
    for i, w in enumerate(ws):
        y = x[:, : w.shape[1]] @ w.to(dtype).T
        if bs:
            y = y + bs[i].to(dtype)
        ys.append(y)
    return torch.cat(ys, dim=1)


def ref_dx(dy, ws, k, dtype):
    dy = dy.to(dtype)
    dx = torch.zeros(dy.shape[0], k, dtype=dtype)
    for o, w in zip(_offsets([w.shape[0] for w in ws]), ws):
        d, p = w.shape
        dx[:, :p] += dy[:, o:o + d] @ w.to(dtype)
    return dx


def ref_dw(dy, x, ws, dtype):
    dy, x = dy.to(dtype), x.to(dtype)
    dws, dbs = [], []
    for o, w in zip(_offsets([w.shape[0] for w in ws]), ws):
        d, p = w.shape
        dws.append(dy[:, o:o + d].T @ x[:, :p])
        dbs.append(dy[:, o:o + d].sum(0))
    return dws, dbs


def assert_close(out, ref64, ref_low, dtype, what):
    """Kernel error <= 2 x (same math in ``dtype``) error + eps floor; NaN anywhere fails."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten or upper block read)"
    if out.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    low_err = (ref_low.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    bound = 2 * low_err + _TOL_EPS[dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (low-precision ref {low_err:.3e})"


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("M", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chain_linear_fwd(case, M, dtype, layout, bias):
    gen = torch.Generator().manual_seed(0)
    dense = LAYOUTS[layout]
    ws, bs = _make_weights(case, dtype, dense, gen, bias=bias)
    x = _make_2d(M, case.k, dtype, dense, gen)
    y = chain_linear_fwd(x, ws, bs)
    ref64 = ref_fwd(x.double(), [w.double() for w in ws], [b.double() for b in bs], torch.float64)
    assert_close(y, ref64, ref_fwd(x, ws, bs, dtype), dtype, "y")


# ----------------------------------------------------------------------------------------------
# Input gradient
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("M", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chain_linear_bwd_dx(case, M, dtype, layout):
    gen = torch.Generator().manual_seed(1)
    dense = LAYOUTS[layout]
    ws, _ = _make_weights(case, dtype, dense, gen, bias=False)
    dy = _make_2d(M, sum(case.ds), dtype, dense, gen)
    dx = chain_linear_bwd_dx(dy, ws, case.k)
    ref64 = ref_dx(dy.double(), [w.double() for w in ws], case.k, torch.float64)
    assert_close(dx, ref64, ref_dx(dy, ws, case.k, dtype), dtype, "dx")
    assert (dx[:, case.ps[-1]:] == 0).all(), "dx columns past P_last must be exact zeros"


# ----------------------------------------------------------------------------------------------
# Weight and bias gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("M", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chain_linear_bwd_dw(case, M, dtype):
    gen = torch.Generator().manual_seed(2)
    strided = M != 17
    ws, _ = _make_weights(case, dtype, True, gen)
    x = _make_2d(M, case.k, dtype, strided, gen)
    dy = _make_2d(M, sum(case.ds), dtype, strided, gen)
    n = len(case.chains)
    dws, dbs = chain_linear_bwd_dw(dy, x, ws, [True] * n, [True] * n)
    r64_w, r64_b = ref_dw(dy.double(), x.double(), ws, torch.float64)
    rlo_w, rlo_b = ref_dw(dy, x, ws, dtype)
    for i in range(n):
        assert dws[i].is_contiguous()
        assert_close(dws[i], r64_w[i], rlo_w[i], dtype, f"dW[{i}]")
        assert_close(dbs[i], r64_b[i], rlo_b[i], dtype, f"db[{i}]")


@pytest.mark.parametrize(
    "case, wflags, bflags",
    [
        (CASES[0], [False, True, False, True], [True, False, False, True]),
        (CASES[1], [False, True, True], [False, False, True]),
        (CASES[3], [False] * 6 + [True, True], [False] * 7 + [True]),
        (CASES[2], [False], [False]),
        (CASES[4], [True, False, False], [False, True, False]),
    ],
    ids=["C1.1.1.1", "C1.2.1", "C8x1-tuning", "C3-frozen", "C1.2.1-xwide"],
)
def test_chain_linear_bwd_dw_frozen(case, wflags, bflags):
    dtype = torch.float32
    gen = torch.Generator().manual_seed(3)
    ws, _ = _make_weights(case, dtype, False, gen)
    x = _make_2d(17, case.k, dtype, True, gen)
    dy = _make_2d(17, sum(case.ds), dtype, False, gen)
    dws, dbs = chain_linear_bwd_dw(dy, x, ws, wflags, bflags)
    assert len(dws) == len(dbs) == len(case.chains)
    r64_w, r64_b = ref_dw(dy.double(), x.double(), ws, torch.float64)
    rlo_w, rlo_b = ref_dw(dy, x, ws, dtype)
    for i, (wf, bf) in enumerate(zip(wflags, bflags)):
        if wf:
            assert_close(dws[i], r64_w[i], rlo_w[i], dtype, f"dW[{i}]")
        else:
            assert dws[i] is None
        if bf:
            assert_close(dbs[i], r64_b[i], rlo_b[i], dtype, f"db[{i}]")
        else:
            assert dbs[i] is None


# ----------------------------------------------------------------------------------------------
# Edge cases and validation
# ----------------------------------------------------------------------------------------------
def test_chain_linear_empty_tokens():
    case = CASES[1]
    gen = torch.Generator().manual_seed(4)
    ws, bs = _make_weights(case, torch.float32, False, gen)
    x = torch.zeros(0, case.k)
    dy = torch.zeros(0, sum(case.ds))
    assert chain_linear_fwd(x, ws, bs).shape == (0, sum(case.ds))
    assert chain_linear_bwd_dx(dy, ws, case.k).shape == (0, case.k)
    dws, dbs = chain_linear_bwd_dw(dy, x, ws, [True] * 3, [True] * 3)
    for w, dw, db in zip(ws, dws, dbs):
        assert dw.shape == w.shape and (dw == 0).all()
        assert db.shape == (w.shape[0],) and (db == 0).all()


def _bad_inputs():
    case = CASES[1]
    gen = torch.Generator().manual_seed(5)
    ws, bs = _make_weights(case, torch.float32, False, gen)
    x = _randn(5, case.k, gen=gen)
    dy = _randn(5, sum(case.ds), gen=gen)
    return case, ws, bs, x, dy


def test_chain_linear_validation_fwd():
    case, ws, bs, x, dy = _bad_inputs()
    with pytest.raises(TypeError, match=r"weights\[0\] has dtype torch.float32"):
        chain_linear_fwd(x.half(), ws, bs)
    with pytest.raises(TypeError, match=r"weights\[1\]"):
        chain_linear_fwd(x, [ws[0], ws[1].half(), ws[2]], bs)
    with pytest.raises(TypeError, match="x"):
        chain_linear_fwd(x.long(), ws, bs)
    with pytest.raises(ValueError, match="x"):
        chain_linear_fwd(x[None], ws, bs)
    with pytest.raises(ValueError, match="x"):
        chain_linear_fwd(x.t().contiguous().t(), ws, bs)  # non-contiguous last dim
    with pytest.raises(ValueError, match="non-decreasing"):
        chain_linear_fwd(x, [ws[1], ws[0]], [])
    with pytest.raises(ValueError, match="x has"):
        chain_linear_fwd(x[:, : case.ps[-1] - 1], ws, bs)
    with pytest.raises(ValueError, match=r"biases\[2\]"):
        chain_linear_fwd(x, ws, [bs[0], bs[1], bs[2][:-1]])
    with pytest.raises(ValueError, match="biases"):
        chain_linear_fwd(x, ws, bs[:2])
    with pytest.raises(TypeError, match="weights"):
        chain_linear_fwd(x, [], bs)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        chain_linear_fwd(x, [ws[0].t().contiguous().t()] + ws[1:], bs)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        chain_linear_fwd(x, [ws[0].to("meta")] + ws[1:], bs)  # device mismatch


def test_chain_linear_validation_bwd():
    case, ws, bs, x, dy = _bad_inputs()
    n = len(ws)
    with pytest.raises(ValueError, match="dy has width"):
        chain_linear_bwd_dx(dy[:, :-1], ws, case.k)
    with pytest.raises(ValueError, match="in_features"):
        chain_linear_bwd_dx(dy, ws, case.ps[-1] - 1)
    with pytest.raises(TypeError, match="in_features"):
        chain_linear_bwd_dx(dy, ws, float(case.k))
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        chain_linear_bwd_dx(dy, [ws[0].half()] + ws[1:], case.k)
    with pytest.raises(ValueError, match="dy has width"):
        chain_linear_bwd_dw(dy[:, 1:], x, ws, [True] * n, [True] * n)
    with pytest.raises(ValueError, match="rows"):
        chain_linear_bwd_dw(dy, x[:4], ws, [True] * n, [True] * n)
    with pytest.raises(TypeError, match="x"):
        chain_linear_bwd_dw(dy, x.half(), ws, [True] * n, [True] * n)
    with pytest.raises(ValueError, match="needs_weight_grad"):
        chain_linear_bwd_dw(dy, x, ws, [True] * (n - 1), [True] * n)
    with pytest.raises(TypeError, match="needs_bias_grad"):
        chain_linear_bwd_dw(dy, x, ws, [True] * n, [1] * n)
    with pytest.raises(ValueError, match="dy"):
        chain_linear_bwd_dw(dy.t().contiguous().t(), x, ws, [True] * n, [True] * n)


def test_shared_helpers():
    import triton

    from colm_kernels._triton.gemm_configs import gemm_waste, make_gemm_pruner, register_gemm_layout
    from colm_kernels._triton.tables import int64_table, table_aligned, tile_count

    t = int64_table([[1, 2, 3], [4, 5, 6]], "cpu")
    assert t.dtype == torch.int64 and t.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert int64_table([(1, 2, 3), (4, 5, 6)], "cpu") is t  # cached on content
    assert int64_table([[1, 2, 3], [4, 5, 7]], "cpu") is not t
    assert tile_count([10, 20, 10], 16) == 4
    assert tile_count([10, 20], 16, [40, 8], 16) == 3 + 2
    assert table_aligned([0, 64], [8, 16], 2) and not table_aligned([0, 66], [8], 2)
    assert not table_aligned([0], [4], 2) and table_aligned([0], [4], 4)

    def cfg(bm, bn, bk, w, s):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)

    def kept(out):
        return sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in out)

    cfgs = [cfg(128, 256, 64, 8, 3), cfg(128, 128, 64, 8, 3), cfg(64, 64, 64, 4, 4)]
    prune = make_gemm_pruner("X")
    fp16, fp32 = torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float32)
    small = register_gemm_layout(101, ("BLOCK_N", "BLOCK_K"), [(24, 24), (16, 40)])  # widths 24/16, P 24/40
    out = prune(cfgs, {"X": fp16, "LAYOUT_KEY": small, "ALIGN": 8})
    assert kept(out) == [(64, 32, 64, 4), (128, 32, 64, 8)]  # clamped to 32 / 64, duplicates merged
    # unaligned: operands staged through registers, only small per-thread footprints stay
    out = prune(cfgs, {"X": fp16, "LAYOUT_KEY": small, "ALIGN": 1})
    # per thread and stage (128*64 + 64*32) / 256 = 40 and (64*64 + 64*32) / 128 = 48 elements: kept
    assert kept(out) == [(64, 32, 64, 4), (128, 32, 64, 8)]
    wide = register_gemm_layout(104, ("BLOCK_N", "BLOCK_K"), [(64, 128)])
    out = prune([cfg(128, 64, 64, 4, 4), cfg(128, 64, 32, 4, 4)], {"X": fp16, "LAYOUT_KEY": wide, "ALIGN": 1})
    assert kept(out) == [(128, 64, 32, 4)]  # 128x64x64 over 4 warps stages 96 elements: spilled
    # fp32 tiles of 128x256x64 with 3 stages overflow shared memory and are dropped
    big = register_gemm_layout(102, ("BLOCK_N", "BLOCK_K"), [(4096, 4096)])
    out = prune(cfgs, {"X": fp32, "LAYOUT_KEY": big, "ALIGN": 4})
    assert all(c.kwargs["BLOCK_N"] != 256 for c in out) and len(out) == 2
    # widths that 256 does not divide: the 256-wide tile wastes MMA work, 128 does not
    odd = register_gemm_layout(103, ("BLOCK_N", "BLOCK_K"), [(384, 384), (384, 768)])
    assert gemm_waste(("BLOCK_N", "BLOCK_K"), [(384, 384)], {"BLOCK_N": 256, "BLOCK_K": 64}) == 512 / 384
    out = prune(cfgs, {"X": fp16, "LAYOUT_KEY": odd, "ALIGN": 8})
    assert kept(out) == [(64, 64, 64, 4), (128, 128, 64, 8)]
