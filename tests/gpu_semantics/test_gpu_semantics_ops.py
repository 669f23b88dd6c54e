"""Every Triton op, forward and backward, fp16 and fp32, launched as an H100 launches it
(``COLM_KERNELS_GPU_SEMANTICS=1``: H100 tiles and config lists, every kept config benchmarked by
reruns into the live buffers, programs in a seeded random order, race detector, bounds checker;
``colm_kernels/_triton/gpu_semantics.py``).

Each case:
1. runs the op once on the triton backend in a fresh state (no tuned config cached: its first call
   tunes every kernel) and checks output and every gradient against the float64 reference, with
   the flash-attention rule (at most 2x the eager PyTorch error in the same dtype);
2. runs it again with the programs in grid order (the configs the first call tuned) and requires
   bit-identical results, except the gradients a kernel sums with float atomics (within the rule);
3. checks that the shapes did what the mode is for: every launch had several programs, and the
   kernels named for the case benchmarked several kept configs.

Shapes are small (seconds per case) yet give several programs per launch at the H100 tiles.
Outputs are allocated NaN-filled (``nan_empty``), so an element no program writes fails.
"""
from __future__ import annotations

import collections
from typing import Callable, Optional, Sequence

import pytest
import torch

import colm_kernels as ck
from colm_kernels._triton import gpu_semantics as gs
from colm_kernels._triton.autotuning import autotuned_kernels
from numerics import assert_within_eager_error, dtype_slack

pytestmark = [pytest.mark.gpu_semantics, pytest.mark.usefixtures("nan_empty"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

F64 = torch.float64
DTYPES = [torch.float16, torch.float32]
H, S = torch.float16, torch.float32


def _cases(*pairs):
    """``(variant, dtype)`` parameters: every op runs in both dtypes, its variants spread over them
    (each case tunes every kernel afresh: the mode's cost is per case)."""
    return [pytest.param(v, d, id=f"{v}-{str(d).replace('torch.', '')}") for v, d in pairs]


def _run(fn: Callable, inputs: Sequence[torch.Tensor], grads: Sequence[bool], backend: str, dtype, cot):
    leaves = [t.detach().to(dtype if t.is_floating_point() else t.dtype).requires_grad_(g)
              for t, g in zip(inputs, grads)]
    with ck.use_backend(backend):
        out = fn(*leaves)
    results = [out.detach()]
    if out.requires_grad:
        wanted = [t for t in leaves if t.requires_grad]
        results += list(torch.autograd.grad(out, wanted, cot.to(out.dtype)))
    return results


def first_call_then_in_order(name: str, fn: Callable, inputs: Sequence[torch.Tensor], dtype, *,
                             grads: Optional[Sequence[bool]] = None, atomic: Sequence[int] = (),
                             several: Sequence[str] = (), slack: Optional[float] = None):
    """Steps 1-3 of the module docstring for ``fn(*inputs)`` (``inputs`` float64 CPU tensors, or
    integer ones passed through; ``grads``: which inputs get a gradient, default every floating
    one). ``atomic``: indices of results (0 the output, then the gradients in input order) that
    float atomics sum; ``several``: kernels that must have benchmarked at least two distinct
    configs (every autotuned kernel must have been benchmarked: the GPU's Triton 3.6 benchmarks
    even a single kept config). ``slack``: the rule's absolute floor in ulps of ``dtype`` at each
    result's magnitude."""
    grads = [t.is_floating_point() for t in inputs] if grads is None else list(grads)
    with ck.use_backend("reference"):
        shape = fn(*inputs).shape
    cot = torch.randn(shape, dtype=F64)
    ref = _run(fn, inputs, grads, "reference", F64, cot)
    eager = _run(fn, inputs, grads, "reference", dtype, cot)

    gs.clear_launch_log()
    first = _run(fn, inputs, grads, "triton", dtype, cot)
    launches = gs.launch_log()
    labels = ["output"] + [f"grad {i}" for i, g in enumerate(grads) if g]
    # The rule's floor: ``slack`` ulps of ``dtype`` at each result's own magnitude. In fp32 eager
    # PyTorch is itself within an ulp or two, so the floor, not 2x its error, bounds a kernel whose
    # H100 tiles add in another order and whose softmax runs in exp2 with a rescaled running sum:
    # 8 ulps (the rounding of a few-dozen-term fp32 reduction); in fp16 one ulp.
    slack = (8.0 if dtype == torch.float32 else 1.0) if slack is None else slack
    atols = [slack * dtype_slack(dtype) * max(1.0, float(r.abs().max())) if r.numel() else 0.0 for r in ref]
    for label, o, e, r, atol in zip(labels, first, eager, ref, atols):
        assert_within_eager_error(o, e, r, atol=atol, name=f"{name} {dtype} first call {label}")

    with gs.emulate(gs.seed() or 0, shuffle=False):
        in_order = _run(fn, inputs, grads, "triton", dtype, cot)
    for i, (label, a, b) in enumerate(zip(labels, first, in_order)):
        if i in atomic:
            assert_within_eager_error(b, eager[i], ref[i], atol=atols[i], name=f"{name} in order {label}")
        else:
            assert torch.equal(a, b), f"{name} {dtype} {label}: shuffled and in-order programs differ"

    assert launches and all(r.shuffled for r in launches), f"{name}: some launch ran in grid order"
    few = sorted({(r.kernel, r.grid) for r in launches if r.grid[0] * r.grid[1] * r.grid[2] < 2})
    assert not few, f"{name}: launches with a single program {few}"
    tuned = {k.base_fn.__name__ for k in autotuned_kernels()}
    configs = collections.defaultdict(set)
    for r in launches:
        if r.benchmark:
            configs[r.kernel].add(r.meta)
    unbenched = sorted({r.kernel for r in launches if r.kernel in tuned} - set(configs))
    assert not unbenched, f"{name}: autotuned kernels never benchmarked: {unbenched}"
    for kernel in several:
        assert len(configs[kernel]) >= 2, (
            f"{name}: {kernel} benchmarked {len(configs[kernel])} config(s), expected several; "
            f"benchmarked: { {k: len(v) for k, v in configs.items()} }")
    return launches


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=F64) * scale


# ----------------------------------------------------------------------------------------------
# chain_linear, chain_swiglu (the chain GEMMs), chain_rmsnorm
# ----------------------------------------------------------------------------------------------
CHAINS = (1, 1, 2)
GEMM_KERNELS = ("_chain_linear_fwd_kernel", "_chain_linear_bwd_dx_kernel", "_chain_linear_bwd_dw_kernel")


@pytest.mark.parametrize("variant, dtype", _cases(("plain", H), ("bias-frozen", S), ("seq_chains", H)))
def test_chain_linear(variant, dtype):
    x = _randn(2, 65, 256, scale=0.5)
    blocks = [_randn(64, 64), _randn(64, 128), _randn(128, 256)]
    bias = [_randn(64), _randn(64), _randn(128)] if variant == "bias-frozen" else []
    sc = torch.tensor([0, 2]) if variant == "seq_chains" else None
    grads = [True, variant != "bias-frozen", True, True] + [True] * len(bias)

    def fn(x, w0, w1, w2, *b):
        return ck.chain_linear(x, [w0, w1, w2], list(b) or None, CHAINS, seq_chains=sc)

    first_call_then_in_order(f"chain_linear {variant}", fn, [x, *blocks, *bias], dtype, grads=grads,
                             several=GEMM_KERNELS)


@pytest.mark.parametrize("variant, dtype", _cases(("plain", H), ("frozen", S), ("seq_chains", H)))
def test_chain_swiglu(variant, dtype):
    x = _randn(130, 256, scale=0.5)
    w1 = [_randn(96, 64, scale=0.2), _randn(96, 128, scale=0.2), _randn(192, 256, scale=0.2)]
    w3 = [_randn(96, 64, scale=0.2), _randn(96, 128, scale=0.2), _randn(192, 256, scale=0.2)]
    sc = torch.tensor([2, 0, 1, 2, 1] * 26) if variant == "seq_chains" else None
    grads = [True] + [not (variant == "frozen" and i == 0) for i in range(3)] * 2

    def fn(x, a0, a1, a2, b0, b1, b2):
        return ck.chain_swiglu(x, [a0, a1, a2], [b0, b1, b2], CHAINS, seq_chains=sc)

    first_call_then_in_order(f"chain_swiglu {variant}", fn, [x, *w1, *w3], dtype, grads=grads,
                             several=("_chain_swiglu_fwd_kernel", "_chain_linear_bwd_dw_kernel"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "seq_chains"])
def test_chain_rmsnorm(variant, dtype):
    x = _randn(2, 150, 512)
    w = 1.0 + 0.1 * _randn(512)
    sc = torch.tensor([1, 2]) if variant == "seq_chains" else None
    first_call_then_in_order(f"chain_rmsnorm {variant}",
                             lambda x, w: ck.chain_rmsnorm(x, w, CHAINS, 1e-5, seq_chains=sc), [x, w], dtype)


# ----------------------------------------------------------------------------------------------
# chain_attention (training) and chain_attention_decode
# ----------------------------------------------------------------------------------------------
D = 64
ATTN_KERNELS = ("_chain_attention_fwd_kernel", "_chain_attention_bwd_kernel")


def _attention(chains, n_kv, sharing, mapping="tile", *, causal=True, seq_chains=None, cu=None,
               deterministic=False):
    def fn(q, k, v):
        kw = {}
        if cu is not None:
            kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=int((cu[1:] - cu[:-1]).max()),
                      max_seqlen_k=int((cu[1:] - cu[:-1]).max()))
        return ck.chain_attention(q, k, v, chains, causal=causal, kv_sharing=sharing, kv_mapping=mapping,
                                  seq_chains=seq_chains, deterministic=deterministic, **kw)

    return fn


ATTENTION = {  # name -> (chains, kv heads, kv_sharing, kv_mapping, extra)
    "gqa-causal": ((2, 2), 2, False, "tile", {}),
    "gqa-noncausal-deterministic": ((2, 2), 2, False, "tile", {"causal": False, "deterministic": True}),
    "shared-kv": ((2, 4), 2, True, "chain_group", {}),
    "seq_chains": ((2, 2), 2, False, "tile", {"seq_chains": torch.tensor([0, 1])}),
    "varlen": ((2, 2), 2, False, "tile", {"cu": torch.tensor([0, 50, 51, 141, 141], dtype=torch.int32)}),
}


@pytest.mark.parametrize("case, dtype", _cases(("gqa-causal", H), ("gqa-causal", S), ("gqa-noncausal-deterministic", S),
                                               ("shared-kv", H), ("seq_chains", S), ("varlen", H)))
def test_chain_attention(case, dtype):
    chains, n_kv, sharing, mapping, extra = ATTENTION[case]
    n_q = sum(chains)
    if "cu" in extra:
        total = int(extra["cu"][-1])
        q, k, v = _randn(total, n_q, D), _randn(total, n_kv, D), _randn(total, n_kv, D)
    else:
        q, k, v = _randn(2, 40, n_q, D), _randn(2, 40, n_kv, D), _randn(2, 40, n_kv, D)
    deterministic = extra.get("deterministic", False)
    several = ATTN_KERNELS + (("_chain_attention_bwd_dq_kernel",) if deterministic else ())
    first_call_then_in_order(f"chain_attention {case}", _attention(chains, n_kv, sharing, mapping, **extra),
                             [q, k, v], dtype, atomic=() if deterministic else (1,), several=several)


@pytest.mark.parametrize("seqlen, dtype", _cases((1, H), (2, H), (5, H), (1, S), (2, S)))
def test_chain_attention_large_scores_short_sequences(seqlen, dtype):
    """flash-attn's ``test_flash_attn_bwd_overflow`` at GPU semantics: q x5, k and v x3, 5 heads.
    With one key dQ is exactly 0 in float64 and in eager PyTorch; the kernel's dP - delta rounds
    at the scale of dP (about |dO| |v| sqrt(D) = 50 here): the floor is 100 ulps."""
    q, k, v = _randn(2, seqlen, 5, 32, scale=5.0), _randn(2, seqlen, 5, 32, scale=3.0), _randn(2, seqlen, 5, 32, scale=3.0)
    fn = lambda q, k, v: ck.chain_attention(q, k, v, (2, 3), causal=False)  # noqa: E731
    first_call_then_in_order(f"attention overflow S={seqlen}", fn, [q, k, v], dtype, atomic=(1,), slack=100.0)


def _cache(B, cap, n_kv, lengths):
    k, v = _randn(B, cap, n_kv, D), _randn(B, cap, n_kv, D)
    for b, n in enumerate(lengths):
        k[b, n:] = float("nan")  # never read
        v[b, n:] = float("nan")
    return k, v


def _paged(k, v, lengths, page):
    B, cap, H, d = k.shape
    n_pages = cap // page
    table = torch.randperm(B * n_pages).view(B, n_pages)
    pools = []
    for t in (k, v):
        pool = torch.full((B * n_pages + 2, page, H, d), float("nan"), dtype=t.dtype)
        pool[table.flatten()] = t.reshape(B * n_pages, page, H, d)
        pools.append(pool)
    for b, n in enumerate(lengths):
        table[b, -(-n // page):] = B * n_pages + 7  # past a sequence's pages: never read
    return pools[0], pools[1], table.to(torch.int32)


DECODE = {  # name -> (kv heads of the cache, kv_sharing, query heads, lengths, seq_chains); the split
    # heuristic (the H100's 132 SMs) splits the key axis of these few (sequence, kv head) programs
    "air": (1, True, 4, [500, None], [1, 0]),
    "gqa-scale0": (2, False, 2, [300, 77], [0, 0]),  # the first chain's heads: one kv head read
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("new_tokens", [1, 16])
@pytest.mark.parametrize("layout", list(DECODE))
def test_chain_attention_decode(layout, new_tokens, paged, dtype, monkeypatch):
    from colm_kernels.ops.chain_attention_decode import triton_kernels

    # these short caches would not split under split-K's traffic budget (split_min_blocks): lift it,
    # so that the split and reduce kernels run as an H100 runs them
    monkeypatch.setattr(triton_kernels, "SPLIT_TRAFFIC", 1e6)
    n_kv, sharing, n_q, lengths, sc = DECODE[layout]
    lengths = [new_tokens if n is None else n for n in lengths]  # a sequence that is all new tokens
    chains, cap, B = (2, 2), 512, len(lengths)
    q = _randn(B, new_tokens, n_q, D)
    k, v = _cache(B, cap, n_kv, lengths)
    table = None
    if paged:
        k, v, table = _paged(k, v, lengths, 64)
    seqlens, sc = torch.tensor(lengths, dtype=torch.int32), torch.tensor(sc)

    def fn(q, k, v):
        return ck.chain_attention_decode(q, k, v, seqlens, chains, kv_sharing=sharing, seq_chains=sc,
                                         block_table=table)

    launches = first_call_then_in_order(f"decode {layout} Sq={new_tokens} paged={paged}", fn, [q, k, v], dtype,
                                        grads=[False] * 3)  # inference only
    assert any(r.kernel == "_decode_reduce_kernel" for r in launches), "the key axis was not split"


# ----------------------------------------------------------------------------------------------
# multi_chain_cross_entropy
# ----------------------------------------------------------------------------------------------
CE_KERNELS = ("_mcce_fwd_kernel", "_mcce_bwd_dlogits_kernel", "_mcce_bwd_dh_kernel", "_mcce_bwd_dw_kernel")


@pytest.mark.parametrize("variant, dtype", _cases(("plain", S), ("seq_chains", H), ("weighted", H)))
def test_multi_chain_cross_entropy_row_chunks(variant, dtype, monkeypatch):
    from colm_kernels.ops.multi_chain_cross_entropy import triton_bwd

    monkeypatch.setattr(triton_bwd, "_WORKSPACE_BYTES", 1)  # one row block per chunk: several chunks
    monkeypatch.setattr(triton_bwd, "_ACC_RATIO", 0)
    n, v, dim = 300, 384, 128
    h, w = _randn(n, dim, scale=0.5), _randn(v, dim, scale=0.1)
    t = torch.randint(0, v, (n,))
    t[::7] = -100
    sc = torch.randint(0, 3, (n,)) if variant == "seq_chains" else None
    # weighted: the fused path (gradients in the forward, G written over the fp32 logits)
    weights = [0.5, 1.0, 2.0] if variant == "weighted" else None
    fn = lambda h, w: ck.multi_chain_cross_entropy(h, w, t, CHAINS, seq_chains=sc, weights=weights)  # noqa: E731
    several = CE_KERNELS if dtype == torch.float16 else ()  # fp32: the budgets keep one config each
    if weights is not None:  # no dlogits kernel on the fused path
        several = tuple(k for k in several if k != "_mcce_bwd_dlogits_kernel")
    launches = first_call_then_in_order(f"cross entropy {variant}", fn, [h, w], dtype, several=several)
    dw_calls = [r for r in launches if r.kernel == "_mcce_bwd_dw_kernel" and not r.benchmark]
    assert len(dw_calls) >= 3, "the backward ran in fewer than 3 row chunks"
