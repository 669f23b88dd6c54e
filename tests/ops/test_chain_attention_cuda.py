"""``chain_attention``'s ``cuda`` backend (``ops/chain_attention/cuda_backend.py``: PyTorch's fused
SDPA over permuted query heads, flash-attn's varlen kernel when installed).

CPU (tier 1): the backend's own code on float64 CPU tensors through SDPA's math kernel, forward and
dq/dk/dv against the float64 reference backend, with the device check lifted (``cuda_on_cpu``):
per-chain GQA, shared KV (``tile``, ``chain_group``), every elastic scale, causal and not, Sq == Sk,
Sq < Sk, Sq > Sk (rows with no key), softmax_scale, odd head dims and lengths, strided inputs,
unequal kv groups and unused kv heads (op called directly), varlen under the block-diagonal mask,
the flash-attn varlen call and PyTorch's bottom-right flash op against fakes (argument building),
the declined inputs and their reasons, ``torch.compile(fullgraph=True)`` and opcheck.

GPU (skipped without CUDA): the real fused kernels in fp16/bf16 against float64 with the accuracy
rule of ``numerics.py`` (within 2x, 3x for gradients, of eager PyTorch's error in the same dtype),
and which SDPA kernel ran.
"""
import itertools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import colm_kernels as ck
from colm_kernels import BackendError, backends
from colm_kernels.ops.chain_attention import cuda_backend as cb
from colm_kernels.ops.chain_attention import reference
from numerics import assert_within_eager_error

F64 = torch.float64
OP = "chain_attention"


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """The public API's ``cuda`` backend on CPU tensors, SDPA's math kernel (float64)."""
    impl = backends.registered(OP)["cuda"]
    monkeypatch.setattr(impl, "availability", lambda: None)
    impl.load()  # as backends.preload_available does for an available backend: no import under compile
    real = backends.device_reasons
    monkeypatch.setattr(backends, "device_reasons",
                        lambda b, ts: [] if b == "cuda" else real(b, ts))
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _run(backend, tensors, cot, chains, **kw):
    q, k, v = _leaves(*tensors)
    with ck.use_backend(backend):
        out = ck.chain_attention(q, k, v, chains, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), cot))


def _assert_matches(tensors, chains, tol=1e-10, **kw):
    cot = torch.randn(tensors[0].shape, dtype=F64)
    ours = _run("cuda", tensors, cot, chains, **kw)
    ref = _run("reference", tensors, cot, chains, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{name} {kw}")
    return ours


# (chains, n_kv_heads of the full model, kv_sharing, kv_mapping, Sq, Sk, causal, head_dim, softmax_scale)
CASES = [
    ((1, 1), 2, False, "tile", 17, 17, True, 16, None),         # one head per chain, G = 1
    ((2, 2), 2, False, "tile", 13, 13, True, 24, 0.3),          # GQA G = 2 (identity permutation)
    ((1, 2, 1), 4, False, "tile", 3, 17, True, 16, None),       # Sq < Sk: bottom-right mask
    ((4,), 2, False, "tile", 1, 9, True, 8, None),              # decode-like Sq = 1
    ((2, 4), 2, True, "tile", 11, 11, True, 16, None),          # shared KV, tile: permuted heads
    ((2, 4), 2, True, "chain_group", 7, 19, False, 40, None),   # shared KV, chain_group, non-causal
    ((1, 2, 1), 1, True, "tile", 19, 6, True, 16, 0.5),         # Sq > Sk: rows with no key
    ((4, 2), 2, True, "chain_group", 9, 5, False, 12, None),    # non-causal Sq > Sk
    ((1, 1), 2, False, "tile", 1, 1, True, 16, None),           # length 1
]


def _case_id(case):
    chains, n_kv, sharing, mapping, sq, sk, causal, d, scale = case
    kv = f"shared-{mapping}" if sharing else "gqa"
    return (f"C{'.'.join(map(str, chains))}-kv{n_kv}-{kv}-Sq{sq}-Sk{sk}-D{d}-{'causal' if causal else 'full'}"
            + (f"-scale{scale}" if scale else ""))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_every_scale(case, cuda_on_cpu):
    chains, n_kv, sharing, mapping, sq, sk, causal, d, scale = case
    for n_q in itertools.accumulate(chains):  # q carries only the active chains' heads
        h_kv = n_kv if sharing else n_q * n_kv // sum(chains)
        tensors = [torch.randn(2, s, h, d, dtype=F64) for s, h in ((sq, n_q), (sk, h_kv), (sk, h_kv))]
        out, dq, _, _ = _assert_matches(tensors, chains, causal=causal, kv_sharing=sharing,
                                        kv_mapping=mapping, softmax_scale=scale)
        if causal and sq > sk:  # rows that see no key: exact zeros, no gradient
            assert not out[:, : sq - sk].any() and not dq[:, : sq - sk].any()


def test_strided_inputs(cuda_on_cpu):
    """q, k, v as views of fused projections (non-contiguous heads and rows)."""
    qkv = torch.randn(2, 9, 6 + 2 + 2, 16, dtype=F64)
    tensors = [qkv[:, :, :6], qkv[:, :, 6:8], qkv[:, :, 8:]]
    _assert_matches(tensors, (2, 4), kv_sharing=True, kv_mapping="tile")


def test_head_plan_permutes_only_where_needed():
    # plain GQA: already grouped, no copy of q, K/V or the output
    assert cb.head_plan([0, 0, 1, 1], [0, 0, 1, 1], 2) == (None, None, None, 2)
    # shared KV tile over chains (2, 4): heads 0, 2, 4 read kv 0
    perm, inv, kv_select, G = cb.head_plan([0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 1], 2)
    assert (perm, kv_select, G) == ([0, 2, 4, 1, 3, 5], None, 3)
    assert [perm[i] for i in inv] == list(range(6))
    # unequal groups 2 and 4: G = 2, kv head 1 read by two groups; kv head 2 unused: dropped
    perm, _, kv_select, G = cb.head_plan([1, 0, 1, 1, 0, 1], [0] * 6, 3)
    assert (perm, kv_select, G) == ([1, 4, 0, 2, 3, 5], [0, 1, 1], 2)
    # expanded (fp32, masks): K/V per query head, no permutation
    assert cb.head_plan([0, 1, 0, 1], [0, 0, 1, 1], 2, expand=True) == (None, None, [0, 1, 0, 1], 1)


@pytest.mark.parametrize("causal,sq,sk", [(True, 9, 9), (True, 4, 9), (False, 9, 4)])
def test_float32_repeats_kv(causal, sq, sk, cuda_on_cpu):
    """fp32: K/V repeated per query head (no fused GQA kernel takes fp32), against float64."""
    tensors = [torch.randn(2, s, h, 16, dtype=F64) for s, h in ((sq, 6), (sk, 2), (sk, 2))]
    cot = torch.randn(tensors[0].shape, dtype=F64)
    ours = _run("cuda", [t.float() for t in tensors], cot.float(), (2, 4), kv_sharing=True, causal=causal)
    ref = _run("reference", tensors, cot, (2, 4), kv_sharing=True, causal=causal)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


# (kv_head_index, head_chain, n_kv): mappings the public API never makes, through the op itself
IRREGULAR = [
    ([1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1], 2),  # groups 2 and 4: G = 2, one kv head repeated
    ([0, 0, 0, 1], [0, 0, 1, 1], 2),              # groups 3 and 1: G = 1 (MHA over repeated K/V)
    ([2, 0, 2, 0], [0, 0, 0, 0], 3),              # kv head 1 unused
]


@pytest.mark.parametrize("causal,sq,sk", [(True, 7, 7), (True, 4, 9), (False, 5, 8)])
@pytest.mark.parametrize("maps", IRREGULAR, ids=lambda m: "kv" + "".join(map(str, m[0])))
def test_irregular_groups_match_reference(maps, causal, sq, sk):
    kv_index, head_chain, n_kv = maps
    tensors = [torch.randn(2, s, h, 16, dtype=F64) for s, h in ((sq, len(kv_index)), (sk, n_kv), (sk, n_kv))]
    cot = torch.randn(tensors[0].shape, dtype=F64)
    results = []
    for fn in (cb.chain_attention_cuda, reference.chain_attention):
        q, k, v = _leaves(*tensors)
        with sdpa_kernel(SDPBackend.MATH):
            out = fn(q, k, v, kv_index, head_chain, causal, None, 0.3)
            results.append((out, *torch.autograd.grad(out, (q, k, v), cot)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _packed(lengths_q, lengths_k, n_q, n_kv, d):
    cu = [torch.tensor([0, *itertools.accumulate(ls)], dtype=torch.int32) for ls in (lengths_q, lengths_k)]
    tensors = [torch.randn(int(c[-1]), h, d, dtype=F64) for c, h in ((cu[0], n_q), (cu[1], n_kv), (cu[1], n_kv))]
    return tensors, cu, dict(cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], max_seqlen_q=max(lengths_q),
                             max_seqlen_k=max(lengths_k))


# (lengths_q, lengths_k, causal): empty sequences, Sq_b > Sk_b (rows with no key), Sq_b < Sk_b
VARLEN = [([5, 0, 7, 3], [5, 0, 7, 3], True), ([4, 2, 6], [1, 0, 9], True), ([3, 5], [6, 2], False)]


@pytest.mark.parametrize("lengths_q,lengths_k,causal", VARLEN)
def test_varlen_block_diagonal_mask(lengths_q, lengths_k, causal, cuda_on_cpu):
    # float64: the mask path even where flash-attn is installed (it takes fp16/bf16)
    for chains, n_kv, sharing, mapping in (((2, 4), 2, True, "tile"), ((2, 2), 2, False, "tile")):
        tensors, _, kw = _packed(lengths_q, lengths_k, sum(chains), n_kv if sharing else 2, 16)
        _assert_matches(tensors, chains, causal=causal, kv_sharing=sharing, kv_mapping=mapping, **kw)


def _fake_flash_varlen(calls):
    """flash-attn's ``flash_attn_varlen_func`` semantics on CPU: GQA ``h // G``, causal bottom-right
    per sequence, zeros for rows that see no key."""
    def fake(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
             deterministic=False, **extra):
        calls.append(dict(shapes=(q.shape, k.shape), max=(max_q, max_k), dropout_p=dropout_p,
                          deterministic=deterministic, extra=extra))
        assert q.shape[1] % k.shape[1] == 0 and cu_q.dtype == cu_k.dtype == torch.int32
        G = q.shape[1] // k.shape[1]
        outs = []
        for b in range(cu_q.shape[0] - 1):
            (q0, q1), (k0, k1) = cu_q[b:b + 2].tolist(), cu_k[b:b + 2].tolist()
            mask = reference.causal_mask(q1 - q0, k1 - k0, q.device) if causal else None
            outs.append(reference.attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                         [h // G for h in range(q.shape[1])], mask, None, softmax_scale)[0])
        return torch.cat(outs)
    return fake


@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_flash_attn_call(deterministic, monkeypatch, cuda_on_cpu):
    """The flash-attn path's argument building: permuted q heads, the kv heads each group reads,
    the lengths, scale, causal and deterministic passed through, the output un-permuted."""
    calls = []
    monkeypatch.setattr(cb, "flash_attn_varlen_func", _fake_flash_varlen(calls))
    monkeypatch.setattr(cb, "_FLASH_DETERMINISTIC", True)
    monkeypatch.setattr(cb, "_HALF", (F64,))  # flash-attn takes fp16/bf16; the fake takes float64
    tensors, _, kw = _packed([4, 2, 6], [1, 0, 9], 6, 2, 16)
    assert not cb.not_supported_reasons(*_leaves(*tensors), [0, 1] * 3, [0, 0, 1, 1, 1, 1], True, None, 0.25,
                                        deterministic=deterministic, **kw)
    _assert_matches(tensors, (2, 4), kv_sharing=True, softmax_scale=0.25, deterministic=deterministic, **kw)
    assert calls and all(c["max"] == (6, 9) and c["dropout_p"] == 0.0 and c["deterministic"] == deterministic
                         and not c["extra"] for c in calls)
    monkeypatch.setattr(cb, "_FLASH_DETERMINISTIC", False)  # a flash-attn without the argument
    reasons = cb.not_supported_reasons(*_leaves(*tensors), [0, 1] * 3, [0, 0, 1, 1, 1, 1], True, None, 0.25,
                                       deterministic=True, **kw)
    assert ("deterministic=True" in " ".join(reasons)) == deterministic or not deterministic


def test_bottom_right_flash_op_call(monkeypatch, cuda_on_cpu):
    """Causal Sq < Sk through PyTorch's flash op (faked): head dim padded to a multiple of 8, the
    scale of the real head dim kept, GQA heads unrepeated, the padding sliced off."""
    calls = []

    def fake(q, k, v, dropout_p, is_causal=False, scale=None):
        calls.append((q.shape, k.shape, is_causal, scale))
        assert q.shape[-1] % 8 == 0 and is_causal and dropout_p == 0.0
        G = q.shape[1] // k.shape[1]
        out = reference.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               [h // G for h in range(q.shape[1])],
                               reference.causal_mask(q.shape[2], k.shape[2], q.device), None, scale)
        return (out.transpose(1, 2),)
    monkeypatch.setattr(cb, "_flash_fwd", fake)
    monkeypatch.setattr(cb, "_flash_bottom_right_ok", lambda q, k, v: True)
    tensors = [torch.randn(2, s, h, 12, dtype=F64) for s, h in ((5, 6), (11, 2), (11, 2))]
    _assert_matches(tensors, (2, 4), kv_sharing=True, kv_mapping="chain_group", softmax_scale=0.4)
    assert calls == [((2, 6, 5, 16), (2, 2, 11, 16), True, 0.4)]


def test_sdpa_flash_check_builds_its_params():
    """SDPA's own flash check, called as the bottom-right path calls it (False on CPU tensors)."""
    q, k = torch.randn(1, 3, 4, 8, dtype=torch.float16), torch.randn(1, 7, 2, 8, dtype=torch.float16)
    assert cb._sdpa_flash_check(q, k, k) is False
    assert cb._flash_bottom_right_ok(q, k, k) is False


def _inputs(**over):
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    args = dict(q=q, k=k, v=v, kv_head_index=[0, 0, 1, 1], head_chain=[0, 0, 1, 1], causal=True,
                seq_chains=None, softmax_scale=0.25)
    args.update(over)
    return args


def test_declined_inputs_name_the_reason(monkeypatch):
    assert cb.not_supported_reasons(**_inputs()) == []
    assert "seq_chains" in cb.not_supported_reasons(**_inputs(seq_chains=torch.tensor([0, 1])))[0]
    q = torch.randn(2, 5, 4, 512)
    assert "head_dim 512" in cb.not_supported_reasons(**_inputs(q=q, k=q[:, :, :2], v=q[:, :, :2]))[0]
    grad_q = torch.randn(2, 5, 4, 16, requires_grad=True)
    assert "deterministic" in cb.not_supported_reasons(**_inputs(q=grad_q), deterministic=True)[0]
    with torch.no_grad():  # the forward is the same either way
        assert cb.not_supported_reasons(**_inputs(q=grad_q), deterministic=True) == []
    monkeypatch.setattr(cb, "MAX_MASK_ELEMENTS", 100)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    packed = dict(q=torch.randn(11, 4, 16), k=torch.randn(11, 2, 16), v=torch.randn(11, 2, 16))
    reasons = cb.not_supported_reasons(**_inputs(**packed), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                       max_seqlen_q=7, max_seqlen_k=7)
    assert "block-diagonal mask of total_q * total_k = 121 > 100" in reasons[0]


def test_backend_errors_and_auto(cuda_on_cpu):
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    with ck.use_backend("cuda"), pytest.raises(BackendError, match="seq_chains is not supported"):
        ck.chain_attention(q, k, v, (2, 2), seq_chains=torch.tensor([0, 1]))
    with ck.use_backend("cuda"), pytest.raises(BackendError, match="deterministic=True"):
        ck.chain_attention(q.requires_grad_(), k, v, (2, 2), deterministic=True)


def test_explicit_cuda_without_a_device_raises():
    if torch.cuda.is_available():
        pytest.skip("has a CUDA device")
    q = torch.randn(1, 3, 2, 16)
    with ck.use_backend("cuda"), pytest.raises(BackendError, match="no CUDA device"):
        ck.chain_attention(q, q, q, (1, 1))


def test_opcheck_and_compile(cuda_on_cpu):
    q, k, v = (torch.randn(2, 7, h, 16, dtype=F64, requires_grad=True) for h in (6, 2, 2))
    # aot_dispatch is the compile below (through the public API, fullgraph)
    torch.library.opcheck(cb.chain_attention_cuda, (q, k, v, [0, 1] * 3, [0, 0, 1, 1, 1, 1], True, None, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    fn = torch.compile(lambda q, k, v: ck.chain_attention(q, k, v, (2, 4), kv_sharing=True),
                       fullgraph=True, backend="aot_eager")  # tile: permuted heads, GQA 3
    with ck.use_backend("cuda"):
        out = fn(q, k, v)
        eager = ck.chain_attention(q, k, v, (2, 4), kv_sharing=True)
    torch.testing.assert_close(out, eager)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.testing.assert_close(grads, torch.autograd.grad(eager, (q, k, v), torch.ones_like(out)))


def test_bench_lists_ours_cuda(cuda_on_cpu):
    """colm-bench's chain_attention rows get an ``ours-cuda`` provider wherever the backend runs."""
    from colm_kernels.bench.ops import chain_attention_cases

    cases = [c for c in chain_attention_cases("tiny", "cpu", F64, passes=("fwd+bwd",))
             if c.provider == "ours-cuda"]
    assert {c.op for c in cases} == {"chain_attention", "chain_attention_elastic"}
    cases[0].run()


# -- GPU: the real fused kernels ----------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused SDPA kernels need a CUDA device")
GPU_DTYPES = [torch.float16, torch.bfloat16]
# as CASES: (chains, n_kv, kv_sharing, kv_mapping, Sq, Sk, causal, head_dim, softmax_scale)
GPU_CASES = [
    ((4, 4, 4, 4), 4, False, "tile", 257, 257, True, 128, None),     # per-chain GQA, the 1B layout
    ((8, 8), 4, True, "tile", 200, 200, True, 64, 0.1),            # CoLM-Air tile
    ((2, 4), 2, True, "chain_group", 77, 300, True, 80, None),      # Sq < Sk: bottom-right flash op, D padded
    ((1, 2, 1), 1, True, "tile", 130, 61, True, 32, None),           # Sq > Sk
    ((2, 2), 2, False, "tile", 65, 129, False, 96, None),            # non-causal
]


def _gpu_compare(tensors64, chains, dtype, **kw):
    cot = torch.randn(tensors64[0].shape, dtype=F64)

    def run(backend, dt, device):
        leaves = [t.to(device, dt).requires_grad_() for t in tensors64]
        kw_dev = {n: a.to(device) if torch.is_tensor(a) else a for n, a in kw.items()}  # cu_seqlens
        with ck.use_backend(backend):
            out = ck.chain_attention(*leaves, chains, **kw_dev)
        return (out, *torch.autograd.grad(out, leaves, cot.to(device, dt)))
    ref, eager, ours = run("reference", F64, "cpu"), run("reference", dtype, "cuda"), run("cuda", dtype, "cuda")
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_within_eager_error(ours[i], eager[i], ref[i], factor=2.0 if i == 0 else 3.0,
                                  atol=torch.finfo(dtype).eps, name=f"{name} {dtype}")


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_fused_kernels_match_float64(case, dtype):
    chains, n_kv, sharing, mapping, sq, sk, causal, d, scale = case
    for n_q in itertools.accumulate(chains):
        h_kv = n_kv if sharing else n_q * n_kv // sum(chains)
        tensors = [torch.randn(2, s, h, d, dtype=F64) for s, h in ((sq, n_q), (sk, h_kv), (sk, h_kv))]
        _gpu_compare(tensors, chains, dtype, causal=causal, kv_sharing=sharing, kv_mapping=mapping,
                     softmax_scale=scale)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_varlen_matches_float64(dtype):
    tensors, _, kw = _packed([100, 0, 37, 64], [100, 0, 90, 30], 6, 2, 64)
    _gpu_compare(tensors, (2, 4), dtype, kv_sharing=True, **kw)


@gpu
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
def test_gpu_which_sdpa_kernel_runs(backend):
    """Each fused SDPA kernel alone (the permuted-GQA call must be one it accepts, or SDPA raises);
    and the default choice never falls back to the math kernel for the 1B layout."""
    q = torch.randn(2, 256, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 256, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    with ck.use_backend("cuda"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = ck.chain_attention(q, k, v, (4, 4, 4, 4), kv_sharing=True)
                out.sum().backward()
        except RuntimeError as exc:  # e.g. no GQA in this kernel, or not built for this GPU
            pytest.skip(f"{backend} cannot run it here: {exc}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ck.chain_attention(q, k, v, (4, 4, 4, 4), kv_sharing=True).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in names, sorted(names)
    assert any(n.startswith(("aten::_scaled_dot_product_flash", "aten::_scaled_dot_product_cudnn",
                             "aten::_scaled_dot_product_efficient")) for n in names), sorted(names)
