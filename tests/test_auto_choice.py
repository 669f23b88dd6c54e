"""``auto`` chooses by evidence (colm_kernels/auto_bounds.py, ops/<op>/bounds.py): the lowest H100
roofline bound among the backends that can run a call, measured timings where a table has them,
ties in fixed order; ``explain`` and ``python -m colm_kernels.info`` say why."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from colm_kernels import auto_bounds, backends
from colm_kernels.auto_bounds import Bound, choose
from colm_kernels.auto_cases import auto_choices

MODULE = sys.modules[__name__]


# ---- the rule --------------------------------------------------------------------------------
def test_lowest_bound_wins_and_ties_keep_the_fixed_order():
    fast, slow = Bound({"wgmma": 790e9}, 1e6), Bound({"mma_sync": 790e9}, 1e6)  # 1 ms vs 2 ms
    assert choose(["cuda", "triton"], {"cuda": slow, "triton": fast}).backend == "triton"
    assert choose(["cuda", "triton"], {"cuda": fast, "triton": slow}).backend == "cuda"
    near = Bound({"wgmma": 790e9 * 1.01}, 1e6)  # 1% slower: a tie
    c = choose(["cuda", "triton"], {"cuda": near, "triton": fast})
    assert c.backend == "cuda" and c.why.startswith("tie within 2%")
    assert "cuda 1010.0 us (compute-bound, wgmma)" in c.why


def test_bound_is_the_roofline_max_of_compute_and_memory():
    b = Bound({"wgmma": 790e12, "fp32_fma": 53.5e12}, 3.0e12)  # 1 s + 1 s of compute, 1 s of bytes
    assert b.compute_s == pytest.approx(2.0) and b.memory_s == pytest.approx(1.0)
    assert b.seconds == pytest.approx(2.0) and b.bound_by == "compute"
    assert Bound({}, 6e12).seconds == pytest.approx(2.0) and Bound({}, 6e12).bound_by == "memory"


def test_ceilings_are_the_benchmarks_ceilings():
    from colm_kernels.bench.report import H100_CEILINGS

    assert auto_bounds.H100["wgmma"] == H100_CEILINGS["bf16_tflops"] * 1e12
    assert auto_bounds.H100["hbm"] == H100_CEILINGS["hbm_tb_s"] * 1e12


def test_measured_timings_replace_bounds_only_when_complete():
    fast, slow = Bound({}, 1e6), Bound({}, 2e6)
    bounds = {"cuda": slow, "triton": fast}
    c = choose(["cuda", "triton"], bounds, {"cuda": 0.5, "triton": 0.7})
    assert c.backend == "cuda" and "measured on a GPU" in c.why and "cuda 0.5 ms" in c.why
    assert choose(["cuda", "triton"], bounds, {"cuda": 0.5}).backend == "triton"  # incomplete: bounds
    assert choose(["triton"], bounds).why == "the only backend that can run these inputs"
    assert choose(["cuda", "triton"], {"triton": fast}).backend == "cuda"  # no bound for cuda: order
    with pytest.raises(ValueError, match="at least one candidate"):
        choose([], bounds)


# ---- each op's bounds --------------------------------------------------------------------------
def _decode(sq, dtype=torch.bfloat16, paged=False):
    kw = dict(device="meta", dtype=dtype)
    q = torch.empty(8, sq, 32, 128, **kw)
    if paged:
        k = torch.empty(64, 256, 8, 128, **kw)
        table = torch.empty(8, 8, dtype=torch.int32, device="meta")
    else:
        k, table = torch.empty(8, 2048, 8, 128, **kw), None
    return backends.bounds_module("chain_attention_decode").bounds(
        q=q, k_cache=k, v_cache=k, cache_seqlens=None, kv_head_index=[h // 4 for h in range(32)],
        head_chain=[0] * 32, seq_chains=None, softmax_scale=0.1, block_table=table)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_cuda_only_where_its_bound_wins(paged):
    # one token x 4 query heads per kv head: both read K/V once (a tie: the CUDA kernel keeps it)
    one = _decode(1, paged=paged)
    assert one["cuda"].bytes == one["triton"].bytes
    assert choose(["cuda", "triton"], one).backend == "cuda"
    # 16 tokens x 4 heads = 64 rows: the CUDA kernel reads K/V once per 8 rows, Triton once
    many = _decode(16, paged=paged)
    kv = 2 * 8 * 8 * 2048 * 128 * 2
    assert many["cuda"].bytes - many["triton"].bytes == 7 * kv
    assert choose(["cuda", "triton"], many).backend == "triton"
    for sq in (4, 32, 128):
        assert choose(["cuda", "triton"], _decode(sq, paged=paged)).backend == "triton"


def test_decode_fp32_runs_on_fma_units_in_both():
    b = _decode(16, dtype=torch.float32)
    assert set(b["triton"].flops) == {"fp32_fma"} and set(b["cuda"].flops) == {"fp32_fma"}
    # fp32 Triton tiles hold 16 rows: 4 reads of K/V against the CUDA kernel's 8
    assert "K/V read 4x" in b["triton"].note and "K/V read 8x" in b["cuda"].note


def _attention(dtype=torch.bfloat16, grad=True, kv_head_index=None):
    kw = dict(device="meta", dtype=dtype)
    q = torch.empty(2, 1024, 8, 64, **kw).requires_grad_(grad)
    k = torch.empty(2, 1024, 2, 64, **kw).requires_grad_(grad)
    index = kv_head_index or [h // 4 for h in range(8)]
    return backends.bounds_module("chain_attention").bounds(
        q=q, k=k, v=k, kv_head_index=index, head_chain=[0] * 8, causal=True, seq_chains=None,
        softmax_scale=0.125)


def test_attention_bounds_weigh_the_mma_kind_and_head_permutation():
    b = _attention()
    assert b["triton"].flops == {"wgmma": b["cuda"].flops["mma_sync"]}  # same FLOPs, other unit
    assert b["cuda"].compute_s == pytest.approx(2 * b["triton"].compute_s)
    assert choose(["cuda", "triton"], b).backend == "triton"
    interleaved = _attention(kv_head_index=[h % 2 for h in range(8)])  # heads not in kv-head order
    assert interleaved["cuda"].bytes > interleaved["triton"].bytes and "permuted" in interleaved["cuda"].note
    f32 = _attention(torch.float32, grad=False)
    assert f32["cuda"].seconds == f32["triton"].seconds  # the same FMA work: a tie, fixed order


def test_linear_and_rmsnorm_bounds_count_what_the_kernels_move():
    kw = dict(device="meta", dtype=torch.float16)
    dense = torch.empty(512, 512, **kw).requires_grad_()
    views = [dense[i * 128:(i + 1) * 128, :(i + 1) * 128] for i in range(4)]
    blocks = [torch.empty(128, (i + 1) * 128, **kw).requires_grad_() for i in range(4)]
    x = torch.empty(256, 512, **kw).requires_grad_()
    lin = backends.bounds_module("chain_linear")
    on_views = lin.bounds(x=x, weights=views, biases=[], row_chains=None)
    on_blocks = lin.bounds(x=x, weights=blocks, biases=[], row_chains=None)
    assert on_views["cuda"].bytes == on_views["triton"].bytes
    # cuBLAS's dX over separate blocks re-reads and rewrites segment j (3 - j) times
    assert on_blocks["cuda"].bytes - on_blocks["triton"].bytes == sum((3 - j) * 2 * 256 * 128 * 2 for j in range(4))
    assert on_views["triton"].flops["wgmma"] == 3 * 2 * 256 * 128 * (128 + 256 + 384 + 512)
    with torch.no_grad():
        infer = lin.bounds(x=x, weights=views, biases=[], row_chains=None)
    assert infer["triton"].flops["wgmma"] * 3 == on_views["triton"].flops["wgmma"]
    norm = backends.bounds_module("chain_rmsnorm").bounds(
        x=torch.empty(512, 2048, **kw), weight=torch.empty(2048, **kw), offsets=[0, 512, 1024, 1536, 2048],
        eps=1e-5, row_chains=None)
    assert norm["cuda"].bytes > norm["triton"].bytes and not norm["cuda"].flops  # one pass against two
    assert choose(["cuda", "triton"], norm).backend == "triton"
    wide = backends.bounds_module("chain_rmsnorm").bounds(  # a chain of 8192: Triton's chunked path
        x=torch.empty(512, 8192, **kw), weight=torch.empty(8192, **kw), offsets=[0, 8192], eps=1e-5,
        row_chains=None)
    assert wide["cuda"].bytes == wide["triton"].bytes


# ---- through the registry, as a call makes it ----------------------------------------------------
def bounds(x, fast: str):
    return {name: Bound({}, 3e9 if name == fast else 4e9) for name in ("cuda", "triton")}


def shape_class(x, fast: str):
    return f"n{x.shape[0]}"


def fake_op(x, fast):
    return x


@pytest.fixture
def two_backend_op(monkeypatch):
    """A registered op whose cuda and triton backends both run CPU tensors here."""
    op = "test_auto_op"
    for name in ("cuda", "triton", "reference"):
        backends.register(op, name, __name__, "fake_op", availability=lambda: None)
    backends.register_bounds(op, __name__)
    for module in [backends._BOUNDS[op], *backends.registered(op).values()]:
        module.load()  # as backends.preload_available does: a trace never imports
    monkeypatch.setattr(backends, "_AUTO_ORDER_CPU", backends._AUTO_ORDER_CUDA)
    monkeypatch.setattr(backends, "device_reasons", lambda backend, tensors: [])
    yield op
    backends._REGISTRY.pop(op)
    backends._BOUNDS.pop(op)
    auto_bounds.set_timings_path(None)


def test_select_and_explain_take_the_lower_bound(two_backend_op):
    x = torch.randn(3)
    assert backends.select(two_backend_op, [x], x=x, fast="triton") == "triton"
    assert backends.select(two_backend_op, [x], x=x, fast="cuda") == "cuda"
    choice = backends.explain(two_backend_op, [x], x=x, fast="triton")
    assert "reference" not in choice.candidates  # the eager reference never rivals a kernel
    assert choice.why.startswith("lowest H100 roofline bound: cuda 1333.3 us (memory-bound); triton 1000.0 us")
    with backends.use_backend("cuda"):  # a named backend is taken as named
        assert backends.select(two_backend_op, [x], x=x, fast="triton") == "cuda"


def test_a_timing_table_replaces_the_bounds(two_backend_op, tmp_path):
    x = torch.randn(3)
    table = tmp_path / "auto_timings.json"
    table.write_text(json.dumps({"device": "NVIDIA H100", "timings": [
        {"op": two_backend_op, "shape_class": "n3", "backend": "cuda", "ms": 0.2},
        {"op": two_backend_op, "shape_class": "n3", "backend": "triton", "ms": 0.3}]}))
    auto_bounds.set_timings_path(str(table))
    assert backends.select(two_backend_op, [x], x=x, fast="triton") == "cuda"  # measured beats bound
    y = torch.randn(5)  # no entry for n5: bounds again
    assert backends.select(two_backend_op, [y], x=y, fast="triton") == "triton"
    table.write_text(json.dumps({"device": "x", "timings": [{"op": two_backend_op}]}))
    with pytest.raises(ValueError, match=r"timings\[0\] needs op, shape_class, backend and ms"):
        backends.select(two_backend_op, [x], x=x, fast="triton")


def test_the_choice_compiles_into_one_graph(two_backend_op):
    # torch.compile traces the choice: bounds are numbers on sizes, no graph break, no guard on data
    def f(x):
        out = backends.dispatch(two_backend_op, [x], x=x, fast="triton")(x, "triton")
        return out * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(4)
    torch.testing.assert_close(compiled(x), 2 * x)


def test_real_bounds_trace_under_compile():
    lin = backends.bounds_module("chain_linear")
    dense = torch.randn(64, 64, requires_grad=True)
    views = [dense[:32, :32], dense[32:, :]]

    def f(x):
        b = lin.bounds(x=x, weights=views, biases=[], row_chains=None)
        return x * (2.0 if choose(["cuda", "triton"], b).backend == "cuda" else 3.0)

    x = torch.randn(16, 64, requires_grad=True)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), 2 * x)


def test_info_lists_every_choice_with_its_reason():
    rows = auto_choices()
    assert {r["op"] for r in rows} >= {"chain_linear", "chain_rmsnorm", "chain_attention", "chain_attention_decode"}
    decode = {r["shape"].split(", ")[-1]: r for r in rows if r["op"] == "chain_attention_decode"}
    assert decode["1 new token"]["backend"] == "cuda" and decode["16 new tokens"]["backend"] == "triton"
    assert "K/V read 8x" in decode["16 new tokens"]["why"]
    from colm_kernels.info import report

    text = report()
    assert "auto on CUDA tensors" in text and "lowest H100 roofline bound" in text


def test_varlen_attention_without_flash_attn_counts_the_masked_call():
    from colm_kernels.ops.chain_attention import cuda_backend

    kw = dict(device="meta", dtype=torch.bfloat16)
    q, k = torch.empty(4096, 8, 64, **kw), torch.empty(4096, 2, 64, **kw)
    b = backends.bounds_module("chain_attention").bounds(
        q=q, k=k, v=k, kv_head_index=[h // 4 for h in range(8)], head_chain=[0] * 8, causal=True,
        seq_chains=None, softmax_scale=0.125, cu_seqlens_q=torch.empty(9, dtype=torch.int32, device="meta"),
        cu_seqlens_k=None, max_seqlen_q=512, max_seqlen_k=512)
    if cuda_backend.flash_attn_varlen_func is None:  # one call over all 4096 x 4096 packed pairs
        assert b["cuda"].flops["mma_sync"] == 4 * 4096 * 4096 * 8 * 64
        assert "masked call" in b["cuda"].note
    assert b["triton"].flops["wgmma"] == 4 * (4096 * 512 // 2) * 8 * 64
    assert choose(["cuda", "triton"], b).backend == "triton"
