"""Executed tensor-core work of ``chain_attention`` at the H100 tiles, without a GPU.

``colm_kernels.bench.work.count_mma_flops`` counts ``2 * M * N * K`` for every ``tl.dot`` that
Triton's interpreter executes, which is what a GPU executes (a masked tile costs the whole tile);
``COLM_KERNELS_TILES=gpu`` makes the kernels pick their H100 configs under the interpreter and
``COLM_KERNELS_AUTOTUNE=0`` the first config each pruner keeps (what runs untuned). The useful work
is ``attention_flops``: the visible (query, key) pairs, 2 matmuls forward and FlashAttention-2's 5
backward. Measured at causal 512 tokens (where a tile straddling the diagonal weighs most), for GQA
and shared KV at G = 1, 2 and 4 query heads per kv head, forward and the default (atomic-dQ)
backward.

The bound is a roofline time, not a FLOP count: each product's FLOPs at its MMA kind's rate, over
the useful FLOPs at Hopper's wgmma rate. A ``tl.dot`` whose M is below a warpgroup tile (not a
multiple of 64 rows) lowers to ``mma.sync``, which runs at half wgmma's rate or less on an H100, so
its FLOPs count twice. Why not FLOPs alone: the causal diagonal can be cut finer than 64 rows to
execute fewer masked FLOPs (16-row x 16-key forward and 32-key backward sub-blocks executed 1.03x
and 1.06x, the bounds were 1.05x and 1.10x), but those products ran on mma.sync, and so did the
dQ of the backward's 32-row steps: a roofline time of 1.03x-1.31x (forward, G = 4 to 1) and 1.52x
(backward). With every product on >= 64-row (or 64-key) warpgroup tiles (what
``test_triton_compiles_for_sm90`` holds on the compiled kernels) they execute 1.03x-1.12x and
1.12x, all at the wgmma rate: ``MAX_FWD`` / ``MAX_BWD`` (1.15) fail the old layout at G = 1 and 2
and in the backward. The same run requires no mma.sync-sized product at head dim 64 and checks
the outputs and gradients against the float64 reference (the accuracy rule of ``numerics.py``):
these are the only interpreter runs of the H100 configs (large tiles, several diagonal
sub-blocks).

The counting runs in a subprocess: the tile choice is read when the kernels are imported.
"""
import json

import pytest

from utils import run_reporting, work_env

pytestmark = pytest.mark.static  # second tier: H100-tile work counts in a subprocess


MAX_FWD, MAX_BWD = 1.15, 1.15  # roofline time over the useful FLOPs at the wgmma rate
WGMMA_M = 64  # a tl.dot whose M is not a multiple of this runs on mma.sync
SEQ = 512
# name -> (chains, kv heads, kv_sharing, kv_mapping): 4 query heads, G = 4 / n_kv
LAYOUTS = {
    "gqa-G2": ((2, 2), 2, False, "tile"),
    "shared-G4": ((1, 3), 1, True, "tile"),
    "mha-G1": ((2, 2), 4, False, "tile"),
}

_SCRIPT = r"""
import contextlib, json, math, sys
import torch
import colm_kernels as ck
from colm_kernels.bench.work import attention_flops, count_mma_flops
from numerics import max_err


@contextlib.contextmanager
def by_mma_kind(wgmma_m):
    # FLOPs of the executed dots by the MMA kind their M lowers to on sm_90a (inside count_mma_flops)
    from triton.runtime import interpreter
    cls = interpreter.InterpreterBuilder
    inner, kinds = cls.create_dot, {"wgmma": 0, "mma.sync": 0}

    def create_dot(self, a, b, *args, **kwargs):
        *batch, m, k = a.data.shape
        kinds["mma.sync" if m % wgmma_m else "wgmma"] += 2 * m * b.data.shape[-1] * k * math.prod(batch)
        return inner(self, a, b, *args, **kwargs)

    cls.create_dot = create_dot
    try:
        yield kinds
    finally:
        cls.create_dot = inner

torch.manual_seed(0)
torch.set_num_threads(1)
layouts, seq, head_dim, wgmma_m = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
report = {}
for name, (chains, n_kv, sharing, mapping) in layouts.items():
    n_q = sum(chains)
    q, k, v = (torch.randn(1, seq, h, head_dim, dtype=torch.float64) for h in (n_q, n_kv, n_kv))
    cot = torch.randn(1, seq, n_q, head_dim, dtype=torch.float64)

    def run(backend, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        with ck.use_backend(backend), count_mma_flops() as fwd, by_mma_kind(wgmma_m) as fwd_kinds:
            out = ck.chain_attention(*leaves, tuple(chains), kv_sharing=sharing, kv_mapping=mapping)
        with count_mma_flops() as bwd, by_mma_kind(wgmma_m) as bwd_kinds:
            grads = torch.autograd.grad(out, leaves, cot.to(dtype))
        assert fwd.total == sum(fwd_kinds.values()) and bwd.total == sum(bwd_kinds.values())
        return [out, *grads], fwd_kinds, bwd_kinds

    ours, fwd, bwd = run("triton", torch.float16)
    ref, _, _ = run("reference", torch.float64)
    eager, _, _ = run("reference", torch.float16)
    useful = {p: attention_flops(1, n_q, seq, seq, head_dim, True, matmuls=m) for p, m in (("fwd", 2), ("bwd", 5))}
    report[name] = dict(
        **{p: sum(kinds.values()) / useful[p] for p, kinds in (("fwd", fwd), ("bwd", bwd))},
        **{p + "_roofline": (kinds["wgmma"] + 2 * kinds["mma.sync"]) / useful[p]
           for p, kinds in (("fwd", fwd), ("bwd", bwd))},
        mma_sync_flops=fwd["mma.sync"] + bwd["mma.sync"],
        err=[max_err(a, r) for a, r in zip(ours, ref)], eager_err=[max_err(e, r) for e, r in zip(eager, ref)])
print("WORK " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def work_report():
    return run_reporting(["-c", _SCRIPT, json.dumps(LAYOUTS), str(SEQ), "64", str(WGMMA_M)], "WORK", work_env(),
                         timeout=600)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_causal_attention_work_is_near_flash_attention_ideal(work_report, layout):
    r = work_report[layout]
    assert r["mma_sync_flops"] == 0, f"{layout}: {r['mma_sync_flops']} FLOPs in products of M < {WGMMA_M} (mma.sync)"
    assert r["fwd_roofline"] <= MAX_FWD, (f"{layout}: forward costs {r['fwd_roofline']:.3f}x the useful FLOPs at "
                                          f"the wgmma rate (> {MAX_FWD}; executed {r['fwd']:.3f}x)")
    assert r["bwd_roofline"] <= MAX_BWD, (f"{layout}: backward costs {r['bwd_roofline']:.3f}x the FA2 ideal at the "
                                          f"wgmma rate (> {MAX_BWD}; executed {r['bwd']:.3f}x)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_h100_tiles_match_reference(work_report, layout):
    """float16 output and dq/dk/dv at the H100 configs: within 2x (3x for gradients) the eager
    float16 error against float64, plus 1e-5."""
    r = work_report[layout]
    for i, (name, err, base) in enumerate(zip(("out", "dq", "dk", "dv"), r["err"], r["eager_err"])):
        factor = 2.0 if i == 0 else 3.0
        assert err <= factor * base + 1e-5, f"{layout} {name}: error {err:.3e} > {factor} x eager {base:.3e}"
