"""The TMA configs of the training attention kernels (the forward and the deterministic dQ pass).

Each pointer config of the kernels that stream K / V tiles has a ``USE_TMA`` twin whose K / V tiles
come from device-side tensor descriptors over one (sequence, kv head)'s ``(Sk, D)`` slice (zero fill
past Sk rows and D columns instead of masks); the pruner offers the twins only where they are legal
(16-bit inputs, K / V bases and strides 16-byte multiples). Triton's interpreter implements tensor
descriptors, zero fill and their alignment rules included, so ``tma_mode("only")`` runs the TMA
branch there at the interpreter's tiles: against float64 (2x the error of the same math in fp16,
3x for gradients) and bit for bit against the pointer branch, for GQA, shared KV, seq_chains,
varlen, causal and not, padded head dims (40, 80) and Sq != Sk, with NaN in every element of q, k
and v the kernels must not read (extra rows past each sequence, an extra kv head, columns past D)
and NaN-filled outputs. Launches where descriptors are illegal (fp32, an unaligned K base, strides
that are not 16-byte multiples) run the pointer configs under ``tma_mode("only")`` too. On a GPU
every kept TMA config runs forward and backward against float64 in bf16 and fp16
(``force_config``, the 2x-eager rule of ``numerics.py``).
"""
import itertools

import pytest
import torch

import colm_kernels as ck
from colm_kernels._triton import tma as TMA
from colm_kernels._triton.autotuning import autotuned_kernels, force_config
from colm_kernels._triton.device import is_interpreter
from colm_kernels._triton.tma import tma_mode
from colm_kernels.ops.chain_attention import triton_kernels as K
from colm_kernels.ops.chain_attention import triton_tiles as T
from numerics import assert_within_eager_error, check_against_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64
TMA_KERNELS = {"_chain_attention_fwd_kernel", "_chain_attention_bwd_dq_kernel"}
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled TMA configs need a GPU")


def _chosen_tma() -> dict:
    """``{kernel: [USE_TMA of each config it ran]}`` of the K / V streaming kernels since the
    tuning caches were last cleared."""
    return {k.base_fn.__name__: [bool(c.kwargs.get("USE_TMA", False)) for c in k.cache.values()]
            for k in autotuned_kernels() if k.base_fn.__name__ in TMA_KERNELS and k.cache}


# ----------------------------------------------------------------------------------------------
# Inputs: every element the kernels must not read is NaN
# ----------------------------------------------------------------------------------------------
def _nan_padded(values: torch.Tensor, dtype) -> torch.Tensor:
    """``values`` ((B, S, H, D) or varlen (T, H, D)) in ``dtype`` as a view of a NaN buffer with 5
    more rows per sequence (varlen: at the end), one more head and 8 more columns: every stride
    stays a multiple of 16 bytes in 16-bit dtypes (D is a multiple of 8), so TMA stays legal."""
    pad = [(0, 0)] * values.dim()
    pad[-1], pad[-2], pad[-3] = (0, 8), (0, 1), (0, 5)
    buf = torch.full([n + p for n, (_, p) in zip(values.shape, pad)], float("nan"), dtype=dtype)
    view = buf[tuple(slice(0, n) for n in values.shape)]
    view.copy_(values)
    return view.to(DEVICE)


def _cu(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=DEVICE)


# name -> (chains, n_kv of the full model, kv_sharing, kv_mapping, q lengths, k lengths, causal,
#          head dim, seq_chains, varlen); padded batches use the first q / k length for every sequence
CASES = {
    # GQA (G = 2), Sq > Sk: causal rows with no key; D 40 padded to 64
    "gqa-G2-causal-Sq37-Sk19-D40": ((2, 2), 2, False, "tile", [37], [19], True, 40, None, False),
    # shared KV (chain_group: G = 3), non-causal, Sq < Sk, D 80 padded to 128
    "shared-group-G3-full-Sq11-Sk29-D80": ((2, 4), 2, True, "chain_group", [11], [29], False, 80, None, False),
    # shared KV (tile, G = 4), mixed seq_chains: active prefixes 1 and 3
    "shared-tile-G4-sc01-causal-Sq21-D16": ((1, 2, 1), 1, True, "tile", [21], [21], True, 16, [0, 1], False),
    # varlen GQA, causal per sequence, an empty query and KV longer than Q
    "varlen-gqa-causal-D40": ((2, 2), 2, False, "tile", [5, 0, 19, 3], [9, 2, 19, 11], True, 40, None, True),
    # varlen shared KV, non-causal, seq_chains, D 24 padded to 32
    "varlen-shared-sc-full-D24": ((1, 2, 1), 1, True, "tile", [7, 16, 1], [13, 4, 17], False, 24, [2, 0, 1], True),
}


def _inputs(case, gen):
    chains, n_kv, sharing, _, lq, lk, _, d, seq, varlen = case
    n_q = sum(chains)
    h_kv = n_kv if sharing else n_q * n_kv // sum(chains)
    if varlen:
        shapes = ((sum(lq), n_q), (sum(lk), h_kv), (sum(lk), h_kv))
    else:
        b = len(seq) if seq else 2
        shapes = ((b, lq[0], n_q), (b, lk[0], h_kv), (b, lk[0], h_kv))
    tensors = [torch.randn(*s, d, generator=gen, dtype=F64) for s in shapes]
    cot = torch.randn(*shapes[0], d, generator=gen, dtype=F64)
    return tensors, cot


def _run(backend, tensors, cot, case, dtype, deterministic, padded):
    chains, _, sharing, mapping, lq, lk, causal, _, seq, varlen = case
    kw = dict(causal=causal, kv_sharing=sharing, kv_mapping=mapping, deterministic=deterministic)
    if seq is not None:
        kw["seq_chains"] = torch.tensor(seq, device=DEVICE if backend == "triton" else "cpu")
    if varlen:
        dev = DEVICE if backend == "triton" else "cpu"
        kw.update(cu_seqlens_q=_cu(lq).to(dev), cu_seqlens_k=_cu(lk).to(dev), max_seqlen_q=max(lq),
                  max_seqlen_k=max(lk))
    if padded:
        leaves = [_nan_padded(t, dtype).requires_grad_(True) for t in tensors]
    else:  # the references: plain CPU tensors
        leaves = [t.to(dtype).requires_grad_(True) for t in tensors]
    with ck.use_backend(backend):
        out = ck.chain_attention(*leaves, chains, **kw)
    grads = torch.autograd.grad(out, leaves, cot.to(device=out.device, dtype=out.dtype))
    return [out, *grads]


# every case with the deterministic backward (its dQ pass streams K / V too); two with the atomic-dQ
# backward, whose key-block kernel has no TMA twin, beside the forward's
RUNS = [(name, True) for name in CASES] + [("gqa-G2-causal-Sq37-Sk19-D40", False),
                                           ("varlen-shared-sc-full-D24", False)]


@pytest.mark.parametrize("name,deterministic", RUNS,
                         ids=[f"{n}-{'dq-pass' if d else 'atomic-dq'}" for n, d in RUNS])
def test_tma_branch_matches_float64_and_pointer_branch(name, deterministic, nan_empty, gen):
    case = CASES[name]
    dt = torch.float16
    tensors, cot = _inputs(case, gen)
    with tma_mode("off"):
        pointer = _run("triton", tensors, cot, case, dt, deterministic, padded=True)
        assert not any(any(v) for v in _chosen_tma().values())
    with tma_mode("only"):
        tma = _run("triton", tensors, cot, case, dt, deterministic, padded=True)
        chosen = _chosen_tma()
    want = TMA_KERNELS if deterministic else {"_chain_attention_fwd_kernel"}
    assert set(chosen) == want and all(all(v) for v in chosen.values()), chosen

    ref = _run("reference", tensors, cot, case, F64, deterministic, padded=False)
    eager = _run("reference", tensors, cot, case, dt, deterministic, padded=False)
    for i, (label, out, e, r, ptr) in enumerate(zip(("out", "dq", "dk", "dv"), tma, eager, ref, pointer)):
        assert_within_eager_error(out, e, r, factor=2.0 if i == 0 else 3.0, atol=torch.finfo(dt).eps,
                                  name=f"{name} {label}")
        if is_interpreter():  # the same dots in the same order: the branches differ only in K / V loads
            assert torch.equal(out, ptr), f"{name} {label}: TMA and pointer branches differ"


def _aligned_kv(b, s, h, d, dtype, gen):
    return [torch.randn(b, s, h, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]


def test_tma_configs_only_where_legal(gen):
    """Under ``tma_mode("only")`` every launch whose K / V cannot back descriptors runs its pointer
    configs, and stays right (equal to ``tma_mode("off")``)."""
    b, s, d, dt = 2, 19, 40, torch.float16
    q = torch.randn(b, s, 4, d, generator=gen).to(dt).to(DEVICE)
    k, v = _aligned_kv(b, s, 2, d, dt, gen)
    flat = torch.randn(b * s * 2 * d + 1, generator=gen).to(dt).to(DEVICE)
    shifted = flat[1:].view(b, s, 2, d)  # base off by one element (2 bytes)
    wide = torch.randn(b, s, 2, d + 4, generator=gen).to(dt).to(DEVICE)[..., :d]  # head stride 88 B
    cases = {
        "fp32": (q.float(), k.float(), v.float()),
        "unaligned k base": (q, shifted, v),
        "v strides not 16-byte multiples": (q, k, wide),
    }
    assert TMA.strides_tma_aligned(k, v) and not TMA.strides_tma_aligned(shifted) and not TMA.strides_tma_aligned(wide)
    for label, (qq, kk, vv) in cases.items():
        def call():
            leaves = [t.detach().requires_grad_(True) for t in (qq, kk, vv)]
            with ck.use_backend("triton"):
                out = ck.chain_attention(*leaves, (2, 2), deterministic=True)
            return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]
        with tma_mode("only"):
            got = call()
            chosen = _chosen_tma()
        assert chosen == {kernel: [False] for kernel in TMA_KERNELS}, (label, chosen)
        with tma_mode("off"):
            for a, e in zip(got, call()):
                assert torch.equal(a, e), label


def test_config_lists_put_twins_after_pointer_configs(monkeypatch):
    """At the H100 tiles (forced here, whatever tiles this process's kernels use): the config lists
    hold the pointer configs, then their TMA twins (forward and dQ pass; the key-block backward has
    no ``USE_TMA`` key); the pruner keeps the head-dim class's pointer configs first and adds their
    twins only where legal, so ``COLM_KERNELS_AUTOTUNE=0`` runs a pointer config."""
    monkeypatch.setattr(T, "small_tiles", lambda: False)
    monkeypatch.setattr(TMA, "small_tiles", lambda: False)

    def shapes(cfgs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cfgs]

    assert all("USE_TMA" not in c.kwargs for c in T._configs("bwd"))
    for kind, prune in (("fwd", T.prune_fwd), ("dq", T.prune_dq)):
        configs = T._configs(kind)
        flags = [c.kwargs["USE_TMA"] for c in configs]
        n = flags.index(True)
        assert not any(flags[:n]) and all(flags[n:]), flags
        assert set(shapes(configs[n:])) <= set(shapes(configs[:n]))
        for dp, (dtype, kv_ok, mode, twins) in itertools.product(
                (16, 64, 128, 256),
                [(torch.float16, True, "auto", True), (torch.bfloat16, True, "auto", True),
                 (torch.float16, False, "auto", False), (torch.float32, True, "auto", False),
                 (torch.bfloat16, True, "off", False), (torch.bfloat16, True, "only", True)]):
            x = torch.empty(1, dtype=dtype)
            args = {"Q": x, "K": x, "HEAD_DIM_P2": dp, "G": 2, "TMA_KV": kv_ok}
            with tma_mode(mode):
                kept = prune(configs, args)
            ptr = [c for c in kept if not c.kwargs["USE_TMA"]]
            tma = [c for c in kept if c.kwargs["USE_TMA"]]
            assert kept[:len(ptr)] == ptr, "pointer configs first"
            if mode == "only":
                assert not ptr and shapes(tma) == list(T._table(kind, dp, 2, True)), (kind, dp)
                continue
            table = list(T._table(kind, dp, dtype.itemsize))
            if dtype == torch.float32:  # the class of twice the head dim, within shared memory
                assert ptr and shapes(ptr) == [s for s in table if s in shapes(ptr)], (kind, dp)
            else:
                assert shapes(ptr) == table, (kind, dp, dtype)
            assert bool(tma) == twins, (kind, dp, dtype, kv_ok, mode)
            if twins:
                assert shapes(tma) == list(T._table(kind, dp, 2, True))
                assert all(t.kwargs["SUB_M"] == p.kwargs["SUB_M"] and t.kwargs["SUB_N"] == p.kwargs["SUB_N"]
                           for t, p in zip(tma, ptr) if shapes([t]) == shapes([p]))


# ----------------------------------------------------------------------------------------------
# GPU: every kept TMA config, forward and backward, against float64
# ----------------------------------------------------------------------------------------------
def _randn64(*shape):
    return torch.randn(*shape, dtype=F64)


@requires_gpu
@pytest.mark.parametrize("index", range(max(len(t) for table in T._TMA_TABLES.values() for t in table.values())))
def test_every_tma_config_matches_reference(index):
    # (head dim, causal, kv_sharing, Sq, Sk): chains (2, 2), 4 query heads over 2 kv heads
    shapes = ((64, True, False, 200, 200), (128, False, True, 131, 260), (80, True, False, 97, 150))
    with tma_mode("only"), force_config(index):
        for dtype in (torch.bfloat16, torch.float16):
            for d, causal, sharing, sq, sk in shapes:
                check_against_reference(
                    f"chain_attention hd{d} causal={causal}",
                    lambda q, k, v: ck.chain_attention(q, k, v, (2, 2), causal=causal, kv_sharing=sharing,
                                                       deterministic=True),
                    [_randn64(2, sq, 4, d), _randn64(2, sk, 2, d), _randn64(2, sk, 2, d)], dtype)
            lq, lk = [77, 1, 130], [90, 5, 130]
            cu_q, cu_k = _cu(lq), _cu(lk)
            check_against_reference(
                "chain_attention varlen hd128",
                lambda q, k, v: ck.chain_attention(q, k, v, (2, 2), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                   max_seqlen_q=max(lq), max_seqlen_k=max(lk), deterministic=True),
                [_randn64(sum(lq), 4, 128), _randn64(sum(lk), 2, 128), _randn64(sum(lk), 2, 128)], dtype)
        chosen = _chosen_tma()
    assert set(chosen) == TMA_KERNELS and all(all(v) for v in chosen.values()), chosen
