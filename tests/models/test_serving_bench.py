"""``colm-bench``'s serving case (``colm_serving_decode``): a decode step of a batch mixing four
scales against one batch per scale. Its providers compute the same tokens, its useful FLOPs and
bytes add up, its roofline rows exist, it runs through the CPU timing harness, and in the
interpreter at the H100 tiles the mixed batch executes at most 1.05x the tensor-core FLOPs of the
per-scale batches (``colm-bench --static``'s work accounting)."""
import dataclasses
import json

import pytest
import torch

import colm_kernels as ck
from colm_kernels.bench import cli
from colm_kernels.bench.models import (SERVE_SIZES, SERVE_WORK, decode_bytes, decode_flops, serving_batch,
                                       serving_runs)
from colm_kernels.bench.roofline import roofline
from utils import run_reporting, work_env

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.mark.parametrize("air", [True, False], ids=["air", "gqa"])
def test_serving_providers_give_the_same_tokens(air):
    """Each sequence's next token is the same whether its scale shares a batch with the others
    (mixed) or gets its own batch; the full-scale batch agrees on the full-scale sequences."""
    case = dataclasses.replace(SERVE_SIZES["tiny"][0], kv_sharing=air, batch=12,
                               layout=dict(SERVE_SIZES["tiny"][0].layout, n_kv_heads=1 if air else 4))
    scales, _ = serving_batch(case)
    with ck.use_backend("reference"):
        runs = serving_runs(case, "cpu", torch.float64)
        mixed, per_scale, full = runs["ours-mixed"](), runs["ours-per-scale"](), runs["ours-full-scale"]()
    for k, tokens in enumerate(per_scale):
        assert torch.equal(mixed[scales == k], tokens), k
    top = scales == len(case.chains) - 1
    assert torch.equal(full[top], mixed[top])


def test_serving_flops_bytes_and_roofline_rows():
    case = SERVE_SIZES["default"][0]
    cfg, n = case.config(), len(case.chains)
    scales, past = serving_batch(case)
    assert sorted(torch.bincount(scales).tolist()) == [case.batch // n] * n  # an equal share per scale
    assert case.seq // 2 <= int(past.min()) and int(past.max()) < case.seq
    useful = decode_flops(cfg, scales, past)
    by_scale = sum(decode_flops(cfg, scales[scales == k], past[scales == k]) for k in range(n))
    assert useful == pytest.approx(by_scale)
    full = decode_flops(cfg, [n - 1] * case.batch, past)
    assert 0.5 * full < useful < full  # four scales: on average well below the full model
    mixed, separate = decode_bytes(cfg, [n - 1], scales, past), decode_bytes(cfg, range(n), scales, past)
    assert mixed < separate  # the mixed batch reads each active weight once
    rows = [r for r in roofline(["colm_serving_decode"]) if r["op"] == "colm_serving_decode"]
    assert {r["pass"] for r in rows} == {"decode mixed", "decode per-scale", "decode full-scale"}
    assert len(rows) == 3 * len(SERVE_SIZES["default"]) and all(r["bound_ms"] > 0 for r in rows)


def test_serving_case_runs_in_the_cpu_timing_harness(tmp_path):
    rc = cli.main(["--device", "cpu", "--sizes", "tiny", "--warmup", "0", "--rep", "1", "--no-plots",
                   "--out", str(tmp_path), "--ops", "colm_serving_decode"])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"ours-mixed", "ours-per-scale", "ours-full-scale"}
    assert all(r["ms"] > 0 and r["error"] is None and r["flops"] > 0 and r["bytes"] > 0 for r in rows)
    assert all(r["peer"] == "ours-per-scale" for r in rows)


@pytest.mark.static
def test_mixed_decode_executes_no_more_tensor_core_flops_than_per_scale_batches():
    """Counted in the interpreter at the H100 tiles (first kept config), through ``colm-bench
    --static``'s work part: one decode step, 64 sequences at 4 scales."""
    report = run_reporting(["-m", "colm_kernels.bench.static", "work", "colm_serving_decode", "first"],
                           "COLM_STATIC_JSON", work_env())
    assert not report["failures"], report["failures"]
    rows = {r["pass"].split()[1]: r for r in report["work"]}
    mixed, separate = rows["mixed"], rows["per-scale"]
    assert mixed["shape"] == separate["shape"] == SERVE_WORK[0].label
    assert mixed["useful_flops"] == separate["useful_flops"] > 0
    assert separate["executed_flops"] >= separate["useful_flops"] and mixed["executed_flops"] >= mixed["useful_flops"]
    assert mixed["executed_flops"] <= 1.05 * separate["executed_flops"], (mixed, separate)
