"""What ``colm-bench --static`` reports, held in CI (no GPU): at the default bench shapes no kept
autotune config spills registers on sm_90a, every tensor-core kernel compiles to wgmma alone (no
``mma.sync`` instruction; decode has no default-shape case here) and the chain
GEMMs and the attention forward keep TMA configs that compile to TMA loads; the
chain GEMMs execute exactly their useful tensor-core FLOPs (within 2%) when chain widths are
multiples of 128, in the interpreter at the H100 tiles and for every config the pruners keep.
These bounds may not be loosened to pass: fix the kernel or prune the config."""
import pytest
import torch

import triton

from colm_kernels._triton.gemm_configs import (
    _H100_GEMM,
    _H100_GEMM_TMA,
    gemm_waste,
    make_gemm_pruner,
    register_gemm_layout,
)
from colm_kernels._triton.tma import tma_mode
from colm_kernels.chains import Chains
from utils import kernel_subprocess_env, require_sm90_ptxas, run_reporting, work_env

MARK = "COLM_STATIC_JSON"  # the report line of colm_kernels.bench.static
# Kernels that use tl.dot and are allowed mma.sync at the default shapes, with the reason.
MMA_SYNC_ALLOWED: dict = {}


def _static(part, ops, env, *extra):
    return run_reporting(["-m", "colm_kernels.bench.static", part, ",".join(ops), *extra], MARK, env)


# Every op, in groups of about equal compile time (one subprocess each, so ``pytest -n 2`` splits them).
GROUPS = (("chain_linear",), ("chain_swiglu", "chain_rmsnorm"), ("chain_attention", "multi_chain_cross_entropy"))
GEMM_KERNELS = {"chain_linear": {"_chain_linear_fwd_kernel", "_chain_linear_bwd_dx_kernel",
                                 "_chain_linear_bwd_dw_kernel"},
                "chain_swiglu": {"_chain_swiglu_fwd_kernel"}}


def test_groups_cover_every_op():
    from colm_kernels.bench.static_compile import DEFAULT_DTYPE, _compile_cases
    assert sorted(op for group in GROUPS for op in group) == sorted({op for op, *_ in _compile_cases(DEFAULT_DTYPE)})


@pytest.mark.static
@pytest.mark.skipif(torch.cuda.is_available(), reason="compile-only driver: on a GPU the real kernels run")
@pytest.mark.parametrize("ops", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_default_shapes_no_spills_and_wgmma(ops):
    require_sm90_ptxas()
    report = _static("compile", ops, kernel_subprocess_env())
    assert not report["failures"], report["failures"]
    rows = report["kernels"]
    assert {r["op"] for r in rows} == set(ops), "every op compiled at its default shapes"
    spilling = [f"{r['kernel']} {r['config']} ({r['shape']}): {r['spill_bytes']} B" for r in rows if r["spill_bytes"]]
    assert not spilling, "kept configs that spill registers on sm_90a:\n" + "\n".join(spilling)
    tensor_core = [r for r in rows if r["mma"] != "none"]
    assert tensor_core
    # not one mma.sync instruction (counted in the PTX): a kernel with some wgmma and some
    # mma.sync runs part of its products at the Ampere rate
    on_mma_sync = [f"{r['kernel']} {r['config']} ({r['shape']}): {r['mma_sync']} mma.sync, {r['wgmma']} wgmma"
                   for r in tensor_core if r["mma_sync"] and r["kernel"] not in MMA_SYNC_ALLOWED]
    assert not on_mma_sync, "tensor-core kernels with mma.sync at the default shapes:\n" + "\n".join(on_mma_sync)
    assert all(r["wgmma"] for r in tensor_core if r["kernel"] not in MMA_SYNC_ALLOWED)
    gemm_kernels = set().union(*(GEMM_KERNELS.get(op, set()) for op in ops))
    assert gemm_kernels <= {r["kernel"] for r in tensor_core}
    assert all(r["resident_blocks"] >= 1 for r in rows)
    # the TMA twins (USE_TMA) of the chain GEMMs are kept at the default shapes (bf16, aligned) and
    # compile to TMA loads (cp.async.bulk.tensor) feeding wgmma, without spills; pointer configs never
    for kernel in sorted(gemm_kernels):
        mine = [r for r in rows if r["kernel"] == kernel]
        tma = [r for r in mine if r["config"].endswith("USE_TMA")]
        assert tma, f"{kernel}: no TMA config kept at the default shapes"
        bad = [f"{r['config']} ({r['shape']}): tma={r['tma']} mma={r['mma']} spill={r['spill_bytes']} B"
               for r in tma if not (r["tma"] and r["mma"] == "wgmma" and r["spill_bytes"] == 0)]
        assert not bad, f"{kernel}: TMA configs that do not compile to TMA + wgmma without spills:\n" + "\n".join(bad)
        assert not [r["config"] for r in mine if r["tma"] and r not in tma], f"{kernel}: TMA in a pointer config"
    # the attention forward's TMA twins (K / V tiles by descriptors) are kept at the default shapes
    # too and compile to TMA loads on the MMA kind of their pointer twins, without spills
    if "chain_attention" not in ops:
        return
    attention = [r for r in rows if r["op"] == "chain_attention"]
    attention_tma = [r for r in attention if r["config"].endswith("USE_TMA")]
    assert attention_tma, "chain_attention: no TMA config kept at the default shapes"
    pointer_mma = {(r["kernel"], r["shape"], r["config"]): r["mma"] for r in attention if r not in attention_tma}
    bad = [f"{r['kernel']} {r['config']} ({r['shape']}): tma={r['tma']} mma={r['mma']} spill={r['spill_bytes']} B"
           for r in attention_tma
           if not (r["tma"] and r["spill_bytes"] == 0
                   and r["mma"] == pointer_mma.get((r["kernel"], r["shape"], r["config"][:-len(" USE_TMA")])))]
    assert not bad, ("chain_attention TMA configs without TMA, off their pointer twin's MMA, or spilling:\n"
                     + "\n".join(bad))
    assert not [r["config"] for r in attention if r["tma"] and r not in attention_tma], "TMA in a pointer config"


@pytest.mark.static
def test_chain_gemms_execute_their_useful_flops():
    """First kept config, counted in the interpreter at H100 tiles (4, 8 and unequal chains; the
    fused SwiGLU forward and its backward on the chain-linear kernels)."""
    report = _static("work", ["chain_linear", "chain_swiglu"], work_env(), "first")
    assert not report["failures"], report["failures"]
    rows = report["work"]
    assert len(rows) == 3 * 3 + 2
    for r in rows:
        assert r["executed_flops"] > 0
        assert 1.0 <= r["ratio_first_config"] <= 1.02, r


@pytest.mark.parametrize("chains", [(1, 1, 1, 1), (1,) * 8, (1, 2, 1), (3, 1), (2, 1, 1, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_kept_gemm_config_wastes_nothing_at_widths_of_128(chains, dtype):
    """The pruner's promise, for every config it keeps (what the interpreter count checks for the
    first): chain widths that are multiples of 128 get tiles that divide them."""
    c = Chains(chains)
    dim = 128 * c.total
    d, p = c.widths(dim), c.prefixes(dim)
    layouts = {
        "fwd": (("BLOCK_N", "BLOCK_K"), list(zip(d, p))),
        "dx": (("BLOCK_N", "BLOCK_K"), [(d[j], d[i]) for j in range(c.n) for i in range(j, c.n)]),
        "dw": (("BLOCK_M", "BLOCK_N"), list(zip(d, p))),
    }
    from colm_kernels.ops.chain_swiglu.triton_kernels import (_DUAL_MAX_ACC_REGS, _H100_DUAL_GEMM,
                                                              _H100_DUAL_GEMM_TMA)

    def h100(table, tma=False):  # the GPU configs, whatever tiles this process's kernels use
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": tma},
                              num_warps=w, num_stages=st) for bm, bn, bk, w, st in table]

    x = torch.empty(1, dtype=dtype)
    args = {"X": x, "ALIGN": 8, "TMA_OPERANDS": True, "ROWS": False}
    for kind, (blocks, products) in layouts.items():
        for n_acc, max_regs, table, tma_table in ((1, 128, _H100_GEMM, _H100_GEMM_TMA),
                                                  (2, _DUAL_MAX_ACC_REGS, _H100_DUAL_GEMM, _H100_DUAL_GEMM_TMA)):
            key = register_gemm_layout(hash((kind, chains, n_acc)) & 0xFFFFFFF, blocks, products)
            prune = make_gemm_pruner("X", n_acc=n_acc, n_b=n_acc, max_acc_regs=max_regs)
            # the pointer configs, then the TMA twins alone: bf16 keeps them (legal), fp32 never
            for mode in ("off", "only"):
                with tma_mode(mode):
                    kept = prune(h100(table) + h100(tma_table, True), {**args, "LAYOUT_KEY": key})
                tma = mode == "only" and dtype == torch.bfloat16
                assert all(c.kwargs["USE_TMA"] == tma for c in kept), (mode, dtype)
                assert len(kept) >= 2 and max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept) >= 128 * 64
                for cfg in kept:
                    assert gemm_waste(blocks, products, cfg.kwargs) <= 1.02, (kind, cfg)
