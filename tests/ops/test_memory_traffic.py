"""Global-memory traffic of the kernels, counted in Triton's interpreter (``colm_kernels.bench.work.
count_memory_traffic``: every load / store / atomic instruction of every program counts the distinct
addresses its active lanes touch times the element size; masked-off lanes and the zero fill of TMA
boxes move nothing).

First tier: the counter itself, exactly, on toy kernels (masks, a broadcast address, atomics, a TMA
box past the tensor's end, under the GPU-semantics emulation too).

Second tier (``static``, one subprocess at the H100 tiles, ``COLM_KERNELS_TILES=gpu``): the op
gates, at the bench's default chains and widths (reduced token counts):

- RMSNorm reads each row once: forward and backward move at most 1.10x the minimum (inputs read
  once, outputs written once; ``rmsnorm_min_bytes``), and compute what the reference computes;
- decode reads each kv head's K and V exactly once (bytes loaded from the caches == the K/V
  minimum), contiguous and paged; 1 and 16 new tokens move at most 1.10x the minimum in all.
  Split-K's own cost (each split reads q, ``(splits - 1) * |q|`` more, and writes fp32 partials,
  output rows and lse, that the reduce kernel reads back: ``2 * splits * B * Sq * Hq * (D + 1) * 4``
  bytes) is bounded by the launch plan (``split_min_blocks``: at most 10% of the K/V a split
  reads); everything else is held to 1.01x of the minimum;
- cross-entropy: every tiled GEMM launch that reads both hidden and the head weight (forward
  logits, backward dlogits) reads them no more than its tiling requires,
  ``gemm_tiled_read_bytes``: hidden once per column of BLOCK_N vocabulary programs, the weight
  once per row of BLOCK_M token programs, at the tiles the launcher chose (read off the launch).
"""
import json

import pytest
import torch

from colm_kernels._triton.device import is_interpreter
from utils import run_reporting, work_env

MAX_RATIO = 1.10

interpreter_only = pytest.mark.skipif(not is_interpreter(), reason="counts in Triton's interpreter")


# ----------------------------------------------------------------------------------------------
# First tier: the counter
# ----------------------------------------------------------------------------------------------
def _toy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _toy(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(X + offs, mask=m)
        s = tl.load(X + offs * 0)  # every lane one address: one element a program
        tl.store(Y + offs, x.to(tl.float32) + s.to(tl.float32), mask=m)
        tl.atomic_add(Y + N + offs * 0, 1.0, mask=offs == 0)  # one lane of program 0

    return _toy


@interpreter_only
@pytest.mark.parametrize("emulated", [False, True], ids=["plain", "gpu-semantics"])
def test_counter_is_exact_on_a_masked_kernel(emulated):
    import contextlib

    from colm_kernels._triton import gpu_semantics
    from colm_kernels.bench.work import count_memory_traffic

    toy = _toy_kernel()
    x, y = torch.arange(100, dtype=torch.float16), torch.zeros(101, dtype=torch.float32)
    with (gpu_semantics.emulate(seed=3) if emulated else contextlib.nullcontext()):
        with count_memory_traffic({"x": x, "y": y}) as t:
            toy[(4,)](x, y, 100, BLOCK=32)  # 128 lanes, 100 in bounds
    assert t.loads == {"_toy": 100 * 2 + 4 * 2}  # the masked load, then one broadcast element a program
    assert t.stores == {"_toy": 100 * 4}
    assert t.atomics == {"_toy": 4}
    assert t.total == 612 and t.by_kernel == {"_toy": 612}
    (launch,) = t.launches
    assert launch["kernel"] == "_toy" and launch["grid"] == (4, 1, 1) and launch["meta"]["BLOCK"] == 32
    assert launch["bytes"] == 612 and launch["reads"] == {"x": 208}
    assert y[100] == 1.0 and torch.equal(y[:100], (x + x[0]).float())


@interpreter_only
def test_counter_counts_tma_boxes_within_bounds_and_composes_with_the_flop_counter():
    import triton
    import triton.language as tl

    from colm_kernels._triton.tma import ensure_tma_allocator
    from colm_kernels.bench.work import count_memory_traffic, count_mma_flops

    @triton.jit
    def _box(A, OUT, rows, cols, R: tl.constexpr, C: tl.constexpr):
        desc = tl.make_tensor_descriptor(A, shape=[rows, cols], strides=[cols, 1], block_shape=[R, C])
        a = desc.load([8, 16])  # rows 8..23, columns 16..31 of a 10 x 24 tensor: 2 x 8 inside
        acc = tl.dot(a, tl.trans(a))  # 16 x 16 x 16
        tl.store(OUT + tl.arange(0, R)[:, None] * R + tl.arange(0, R)[None, :], acc)

    ensure_tma_allocator(torch.device("cpu"))
    a = torch.randn(10, 24, dtype=torch.float32)
    out = torch.empty(16, 16, dtype=torch.float32)
    with count_mma_flops() as work, count_memory_traffic({"a": a}) as t:
        _box[(1,)](a, out, 10, 24, R=16, C=16)
    assert t.loads == {"_box": 2 * 8 * 4} and t.launches[0]["reads"] == {"a": 64}
    assert t.stores == {"_box": 16 * 16 * 4}
    assert work.by_kernel == {"_box": 2 * 16 * 16 * 16}
    inside = a[8:10, 16:24]
    torch.testing.assert_close(out[:2, :2], inside @ inside.T)


# ----------------------------------------------------------------------------------------------
# Second tier: the op gates, in one subprocess at the H100 tiles
# ----------------------------------------------------------------------------------------------
_SCRIPT = r"""
import json
import torch
import colm_kernels as ck
from colm_kernels.bench.static_work import decode_traffic_case, rmsnorm_traffic_case
from colm_kernels.bench.work import count_memory_traffic, gemm_tiled_read_bytes
from numerics import max_err

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
rnd = lambda *shape: torch.randn(*shape, generator=gen).to(torch.float16)
report = {}
with ck.use_backend("triton"):
    norm = rmsnorm_traffic_case(rnd)
    with count_memory_traffic() as t:
        norm["run"]()
    def outputs(backend, dtype):  # y, dx, dgain
        x, w = (norm[k].detach().to(dtype).requires_grad_() for k in ("x", "weight"))
        with ck.use_backend(backend):
            y = ck.chain_rmsnorm(x, w, norm["chains"])
        y.backward(norm["dy"].to(dtype))
        return [y, x.grad, w.grad]
    ref, eager = outputs("reference", torch.float64), outputs("reference", torch.float16)
    report["rmsnorm"] = dict(label=norm["label"], fwd=t.by_kernel["_chain_rmsnorm_fwd_kernel"] / norm["fwd"],
                             bwd=t.by_kernel["_chain_rmsnorm_bwd_kernel"] / norm["bwd"],
                             err=[max_err(a, r) for a, r in zip(outputs("triton", torch.float16), ref)],
                             eager_err=[max_err(e, r) for e, r in zip(eager, ref)])
    for paged in (False, True):
        for new in (1, 16):
            case = decode_traffic_case(rnd, paged, new)
            with count_memory_traffic({"k": case["k"], "v": case["v"]}) as t:
                case["run"]()
            (split,) = [l for l in t.launches if l["kernel"] == "_decode_split_kernel"]
            b, sq, hq, d = case["q"].shape
            splits = split["grid"][0]
            # split-K: every split reads q and writes fp32 partials (output row and lse) that the
            # reduce kernel reads back
            split_cost = 0
            if splits > 1:
                split_cost = (splits - 1) * case["q"].numel() * 2 + 2 * splits * b * sq * hq * (d + 1) * 4
            kv_read = sum(l["reads"].get("k", 0) + l["reads"].get("v", 0) for l in t.launches)
            report[case["label"]] = dict(ratio=t.total / case["min_bytes"], splits=splits, kv_read=kv_read,
                                         without_split=(t.total - split_cost) / case["min_bytes"],
                                         kv_bytes=case["kv_bytes"])
    n, dim, vocab = 256, 256, 2048
    h, wo = rnd(n, dim).requires_grad_(), (rnd(vocab, dim) / 16).requires_grad_()
    tgt = torch.randint(0, vocab, (n,), generator=gen)
    with count_memory_traffic({"hidden": h, "weight": wo}) as t:
        ck.multi_chain_cross_entropy(h, wo, tgt, (4, 4, 4, 4)).sum().backward()
    # the tiled GEMM launches (a BLOCK_M x BLOCK_N config) that read both operands of the logits
    gemms = [l for l in t.launches
             if {"BLOCK_M", "BLOCK_N"} <= set(l["meta"]) and {"hidden", "weight"} <= set(l["reads"])]
    # the fused path (weights=: gradients in the forward) reads them in its logits GEMM
    with count_memory_traffic({"hidden": h, "weight": wo}) as t:
        ck.multi_chain_cross_entropy(h, wo, tgt, (4, 4, 4, 4), weights=[0.1, 0.2, 0.3, 0.4]).backward()
    gemms += [l for l in t.launches
              if {"BLOCK_M", "BLOCK_N"} <= set(l["meta"]) and {"hidden", "weight"} <= set(l["reads"])]
    report["cross_entropy"] = [
        dict(kernel=l["kernel"], read=l["reads"]["hidden"] + l["reads"]["weight"],
             bound=gemm_tiled_read_bytes(n, vocab, dim, l["meta"]["BLOCK_M"], l["meta"]["BLOCK_N"], 2, 2))
        for l in gemms]
print("TRAFFIC " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def traffic():
    return run_reporting(["-c", _SCRIPT], "TRAFFIC", work_env(), timeout=900)


@pytest.mark.static
def test_rmsnorm_reads_each_row_once(traffic):
    r = traffic["rmsnorm"]
    assert r["fwd"] <= MAX_RATIO, f"{r['label']}: forward moves {r['fwd']:.3f}x the minimum bytes"
    assert r["bwd"] <= MAX_RATIO, f"{r['label']}: backward moves {r['bwd']:.3f}x the minimum bytes"
    # y, dx, dgain at the H100 tiles against float64: within twice eager fp16 PyTorch's error
    for name, err, eager in zip(("y", "dx", "dgain"), r["err"], r["eager_err"]):
        assert err <= 2 * eager + 1e-3, f"{name}: error {err:.3g}, eager fp16 {eager:.3g}"


DECODE = [f"B2-L2048-Sq{sq}-C4.4.4.4-KV4-D128-shared-{kind}" for kind in ("contiguous", "paged16") for sq in (1, 16)]


@pytest.mark.static
@pytest.mark.parametrize("label", DECODE)
def test_decode_reads_k_and_v_once_per_kv_head(traffic, label):
    r = traffic[label]
    print(label, json.dumps(r))
    assert r["kv_read"] == r["kv_bytes"], f"{label}: K/V bytes read {r['kv_read']}, once per kv head is {r['kv_bytes']}"
    assert r["without_split"] <= 1.01, f"{label}: {r['without_split']:.3f}x the minimum besides split-K's cost"
    assert r["ratio"] <= MAX_RATIO, f"{label}: {r['ratio']:.3f}x the minimum bytes ({r['splits']} splits)"


@pytest.mark.static
def test_cross_entropy_gemms_read_hidden_and_weight_as_their_tiling_requires(traffic):
    gemms = traffic["cross_entropy"]
    assert len(gemms) >= 3, "the logits GEMMs of the forward, the backward's dlogits and the fused forward"
    over = [g for g in gemms if g["read"] > g["bound"]]
    assert not over, f"GEMM launches reading hidden / weight beyond their tiling: {over}"
    print(json.dumps(gemms))
