"""Executed tensor-core FLOPs of ``multi_chain_cross_entropy``'s fused path (``weights=``, or one
scale) at the H100 tiles, without a GPU (``colm_kernels.bench.work.count_mma_flops`` in the
interpreter, ``COLM_KERNELS_TILES=gpu``, the first kept config): forward (with the gradients) plus
backward execute at most 3.05 logit GEMMs ``2 N V D`` (D the width the GEMM reads), for one scale
and for 4 weighted scales; the per-scale path (a loss vector) executes 4. Chain widths are
multiples of 128 so the count is the GEMMs' and not tile padding. In a subprocess: the tile
choice is read when the kernels are imported.
"""
import json

import pytest

from utils import run_reporting, work_env

MAX_RATIO = 3.05

_SCRIPT = r"""
import json
import torch
import colm_kernels as ck
from colm_kernels.bench.work import count_mma_flops

torch.manual_seed(0)
torch.set_num_threads(1)
n, v = 256, 512
report = {}
for name, chains, d, weights in (("one-scale", (1,), 256, None), ("weighted-4", (1, 1, 1, 1), 512, [1.0, 0.5, 0.5, 2.0]),
                                 ("per-scale-4", (1, 1, 1, 1), 512, "vector")):
    h = torch.randn(n, d).half().requires_grad_(True)
    w = (torch.randn(v, d) / d ** 0.5).half().requires_grad_(True)
    t = torch.randint(0, v, (n,))
    with ck.use_backend("triton"), count_mma_flops() as fwd:
        kw = {} if weights in (None, "vector") else dict(weights=weights)
        loss = ck.multi_chain_cross_entropy(h, w, t, chains, check_values=False, **kw)
    with count_mma_flops() as bwd:
        (loss.sum() * 3.7).backward()
    gemm = 2 * n * v * d
    report[name] = dict(fwd=fwd.total / gemm, bwd=bwd.total / gemm, kernels={**fwd.by_kernel, **bwd.by_kernel})
print("CE_FUSED_WORK " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def work():
    return run_reporting(["-c", _SCRIPT], "CE_FUSED_WORK", work_env(), timeout=600)


@pytest.mark.static
@pytest.mark.parametrize("case", ["one-scale", "weighted-4"])
def test_fused_path_executes_three_logit_gemms(work, case):
    r = work[case]
    total = r["fwd"] + r["bwd"]
    assert total <= MAX_RATIO, f"{case}: forward + backward execute {total:.3f} logit GEMMs ({r['kernels']})"
    assert r["bwd"] == 0, f"{case}: the backward ran tensor-core work ({r['kernels']})"


@pytest.mark.static
def test_per_scale_path_still_executes_four(work):
    r = work["per-scale-4"]
    assert 3.95 <= r["fwd"] + r["bwd"] <= 4.05, r
