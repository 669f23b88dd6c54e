"""``chain_attention`` through the public API on the ``triton`` backend (interpreter on CPU, real
kernels on GPU): forward and dq/dk/dv against the float64 reference backend with the accuracy rule
of ``numerics.py``, for both backwards (``deterministic=False``: dQ by atomics in the key-block
pass; ``True``: a separate dQ pass); chains, GQA and shared KV (both mappings), every elastic
scale, Sq == Sk and Sq != Sk (decode-like and rows with no visible key), odd lengths, non-causal,
softmax_scale, seq_chains (exact zeros and zero gradients for inactive heads), strided inputs,
every multiple-of-8 head dim class (padded tiles), bitwise reproducibility of the deterministic
backward, the modules' pass-through of the flag, opcheck."""

import itertools

import pytest
import torch

import colm_kernels as ck
from colm_kernels import BackendError
from colm_kernels.ops.chain_attention.api import head_maps
from numerics import assert_within_eager_error

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
# bf16 tl.dot is wrong in the interpreter: a GPU-only dtype there.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

# (chains, n_kv_heads of the full model, kv_sharing, kv_mapping, Sq, Sk, causal, head_dim, softmax_scale)
CASES = [
    ((1, 1), 2, False, "tile", 17, 17, True, 16, None),         # one head per chain, G = 1
    ((2, 2), 2, False, "tile", 33, 33, True, 32, 0.3),          # GQA G = 2, softmax_scale
    ((1, 2, 1), 4, False, "tile", 3, 17, True, 16, None),       # Sq < Sk (KV cache)
    ((4,), 2, False, "tile", 1, 17, True, 16, None),            # one chain, decode Sq = 1, G = 2
    ((2, 4), 2, True, "tile", 17, 17, True, 16, None),          # shared KV, tile: G = 1 then 3
    ((2, 4), 2, True, "chain_group", 17, 33, False, 16, None),  # shared KV, chain_group, non-causal
    ((1, 2, 1), 1, True, "tile", 33, 17, True, 16, 0.5),        # Sq > Sk: rows with no key; G = 4
    ((1, 1), 2, False, "tile", 1, 1, True, 16, None),           # length 1
]


def _case_id(case):
    chains, n_kv, sharing, mapping, sq, sk, causal, d, scale = case
    kv = f"shared-{mapping}" if sharing else "gqa"
    tags = ["causal" if causal else "full"] + ([f"scale{scale}"] if scale else [])
    return f"C{'.'.join(map(str, chains))}-kv{n_kv}-{kv}-Sq{sq}-Sk{sk}-D{d}-" + "-".join(tags)


def _active_kv_heads(chains, n_kv, sharing, n_q):
    return n_kv if sharing else n_q * n_kv // sum(chains)


def _leaf(t, dtype, device=DEVICE):
    return t.detach().to(device=device, dtype=dtype).requires_grad_(True)


def _run(backend, q, k, v, cot, chains, **kw):
    with ck.use_backend(backend):
        out = ck.chain_attention(q, k, v, chains, **kw)
    grads = torch.autograd.grad(out, (q, k, v), cot.to(device=out.device, dtype=out.dtype))
    return out, grads


def _compare(tensors64, cot, chains, dtype, tag, **kw):
    """Run float64 reference, same-dtype reference (eager) and triton; check the accuracy rule.
    Returns the triton ``(out, (dq, dk, dv))``."""
    ref = _run("reference", *(_leaf(t, F64, "cpu") for t in tensors64), cot, chains, **kw)
    eager = _run("reference", *(_leaf(t, dtype) for t in tensors64), cot, chains, **kw)
    ours = _run("triton", *(_leaf(t, dtype) for t in tensors64), cot, chains, **kw)
    assert_within_eager_error(ours[0], eager[0], ref[0], name=f"out {tag}")
    for name, g, ge, gr in zip(("dq", "dk", "dv"), ours[1], eager[1], ref[1]):
        assert_within_eager_error(g, ge, gr, factor=3.0, name=f"{name} {tag}")
    return ours


BACKWARDS = [False, True]  # deterministic: atomics in one pass, or a separate dQ pass


def _bwd_id(deterministic):
    return "deterministic" if deterministic else "atomic-dq"


@pytest.mark.parametrize("deterministic", BACKWARDS, ids=_bwd_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_every_scale(case, dtype, deterministic):
    chains, n_kv, sharing, mapping, sq, sk, causal, d, scale = case
    B = 2
    for n_q in itertools.accumulate(chains):  # q carries only the active chains' heads
        h_kv = _active_kv_heads(chains, n_kv, sharing, n_q)
        q, k, v = (torch.randn(B, s, h, d, dtype=F64) for s, h in ((sq, n_q), (sk, h_kv), (sk, h_kv)))
        cot = torch.randn(B, sq, n_q, d, dtype=F64)
        out, grads = _compare((q, k, v), cot, chains, dtype, f"Hq={n_q}", causal=causal,
                              kv_sharing=sharing, kv_mapping=mapping, softmax_scale=scale,
                              deterministic=deterministic)
        if causal and sq > sk:  # rows that see no key: exact zeros, no gradient, no NaN
            blind = sq - sk
            assert torch.equal(out[:, :blind], torch.zeros_like(out[:, :blind]))
            assert torch.equal(grads[0][:, :blind], torch.zeros_like(grads[0][:, :blind]))


# (chains, n_kv, kv_sharing, kv_mapping, Sq, Sk, seq_chains, softmax_scale)
SEQ_CHAIN_CASES = [
    ((1, 2, 1), 1, True, "tile", 17, 17, [0, 2, 1, 0], 0.4),           # G = 4: active prefixes 1, 4, 3, 1
    ((2, 4), 2, True, "chain_group", 5, 17, [1, 0, 1], None),          # G = 3, Sq < Sk
    ((2, 2), 2, False, "tile", 17, 17, [0, 1, 0], None),               # GQA: whole kv groups inactive
    ((1, 2, 1), 4, False, "tile", 3, 17, [2, 0], None),                # G = 1: single-member groups
]


@pytest.mark.parametrize("deterministic", BACKWARDS, ids=_bwd_id)
@pytest.mark.parametrize("case", SEQ_CHAIN_CASES,
                         ids=lambda c: f"C{'.'.join(map(str, c[0]))}-{'shared-' + c[3] if c[2] else 'gqa'}"
                                       f"-Sq{c[4]}-Sk{c[5]}-sc{''.join(map(str, c[6]))}")
def test_seq_chains_mixed_scales(case, deterministic):
    chains, n_kv, sharing, mapping, sq, sk, seq, scale = case
    dtype, d, B = torch.float32, 16, len(seq)
    n_q = sum(chains)
    h_kv = _active_kv_heads(chains, n_kv, sharing, n_q)
    q, k, v = (torch.randn(B, s, h, d, dtype=F64) for s, h in ((sq, n_q), (sk, h_kv), (sk, h_kv)))
    cot = torch.randn(B, sq, n_q, d, dtype=F64)
    seq_chains = torch.tensor(seq, device=DEVICE)
    out, (dq, dk, dv) = _compare((q, k, v), cot, chains, dtype, f"seq_chains={seq}", kv_sharing=sharing,
                                 kv_mapping=mapping, seq_chains=seq_chains, softmax_scale=scale,
                                 deterministic=deterministic)
    _, kv_index, head_chain = head_maps(chains, n_q, h_kv, sharing, mapping)
    for b, c in enumerate(seq):
        inactive = [h for h in range(n_q) if head_chain[h] > c]
        assert torch.equal(out[b][:, inactive], torch.zeros_like(out[b][:, inactive]))
        assert torch.equal(dq[b][:, inactive], torch.zeros_like(dq[b][:, inactive]))
        active_kv = {kv_index[h] for h in range(n_q) if head_chain[h] <= c}
        idle_kv = [g for g in range(h_kv) if g not in active_kv]  # no active head reads them
        assert torch.equal(dk[b][:, idle_kv], torch.zeros_like(dk[b][:, idle_kv]))
        assert torch.equal(dv[b][:, idle_kv], torch.zeros_like(dv[b][:, idle_kv]))


# Head dims: every class of padded tile (16 for 8, 64 for 40, 128 for 80..112, 256 for 160..256).
HEAD_DIMS = [8, 40, 80, 96, 112, 160, 192, 256]


@pytest.mark.parametrize("deterministic", BACKWARDS, ids=_bwd_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_head_dims_multiple_of_8(head_dim, dtype, deterministic):
    """Head dims that are not powers of two run on padded tiles: GQA (G = 2), causal with
    Sq < Sk and a second, non-causal scale with Sq > Sk."""
    chains, B = (2, 2), 2
    for n_q, sq, sk, causal in ((4, 13, 21, True), (2, 19, 9, False)):
        n_kv = n_q // 2
        q, k, v = (torch.randn(B, s, h, head_dim, dtype=F64) for s, h in ((sq, n_q), (sk, n_kv), (sk, n_kv)))
        cot = torch.randn(B, sq, n_q, head_dim, dtype=F64)
        _compare((q, k, v), cot, chains, dtype, f"D={head_dim} Hq={n_q}", causal=causal,
                 deterministic=deterministic)


def test_deterministic_backward_is_bitwise_reproducible():
    """``deterministic=True``: two backward runs give bitwise equal dq, dk, dv (on a GPU the
    default's atomic dQ may differ in the last bits; the interpreter is sequential anyway, so
    only the deterministic path's claim is checked here)."""
    chains, B, sq, sk, d = (1, 2, 1), 2, 37, 45, 64
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q, k, v = (torch.randn(B, s, h, d, device=DEVICE, dtype=dtype) for s, h in ((sq, 4), (sk, 1), (sk, 1)))
    cot = torch.randn(B, sq, 4, d, device=DEVICE, dtype=dtype)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with ck.use_backend("triton"):
            out = ck.chain_attention(*leaves, chains, kv_sharing=True, deterministic=True)
        runs.append((out, *torch.autograd.grad(out, leaves, cot)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


def test_modules_pass_deterministic_through(monkeypatch):
    """``ChainAttention(deterministic=...)`` and ``CoLMConfig.deterministic_attention`` reach the
    op's training call (the decode branch has no backward and ignores it)."""
    import colm_kernels.nn.attention as attention_module
    from colm_kernels.models import CoLM, CoLMConfig
    from colm_kernels.nn import ChainAttention

    seen = []
    real = attention_module.chain_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "chain_attention", spy)
    x = torch.randn(1, 5, 32)
    for flag in (False, True):
        ChainAttention(32, 4, 2, (2, 2), deterministic=flag)(x)
        assert seen[-1] is flag
    assert ChainAttention(32, 4, 2, (2, 2)).deterministic is False
    with pytest.raises(TypeError, match="deterministic"):
        ChainAttention(32, 4, 2, (2, 2), deterministic=1)
    cfg = CoLMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=11, chains=(2, 2),
                     ffn_hidden_dim=64, deterministic_attention=True)
    model = CoLM(cfg)
    assert all(layer.attention.deterministic for layer in model.layers)
    seen.clear()
    model(torch.randint(0, 11, (1, 5)))
    assert seen == [True, True]
    with pytest.raises(ValueError, match="deterministic_attention"):
        cfg.replace(deterministic_attention="yes")
    with pytest.raises(TypeError, match="deterministic"):
        ck.chain_attention(x.view(1, 5, 4, 8), x.view(1, 5, 4, 8)[:, :, :2], x.view(1, 5, 4, 8)[:, :, :2],
                           (2, 2), deterministic=None)


def test_strided_inputs():
    """q transposed from (B, H, S, D); k and v views of one packed kv tensor; a strided gradient."""
    chains, B, sq, sk, d, n_q, h_kv = (2, 2), 2, 17, 19, 16, 4, 2
    q64 = torch.randn(B, n_q, sq, d, dtype=F64).transpose(1, 2)
    kv64 = torch.randn(B, sk, 2, h_kv, d, dtype=F64)
    cot = torch.randn(B, n_q, sq, d, dtype=F64).transpose(1, 2)
    results = {}
    for backend, dtype, dev in (("reference", F64, "cpu"), ("triton", torch.float32, DEVICE)):
        q = q64.detach().to(dev, dtype).requires_grad_(True)
        kv = kv64.detach().to(dev, dtype).requires_grad_(True)
        k, v = kv[:, :, 0], kv[:, :, 1]
        assert not q.is_contiguous() and not k.is_contiguous()
        with ck.use_backend(backend):
            out = ck.chain_attention(q, k, v, chains)
        out.backward(cot.to(dev, dtype))
        results[backend] = (out, q.grad, kv.grad)
    for name, ours, ref in zip(("out", "dq", "dkv"), results["triton"], results["reference"]):
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-4, atol=1e-5, msg=name)


def test_opcheck_and_compile():
    from colm_kernels.ops.chain_attention.triton_backend import (
        chain_attention_triton, chain_attention_triton_bwd, chain_attention_triton_fwd)

    def mk(*shape):
        return torch.randn(*shape, device=DEVICE, requires_grad=True)

    q, k, v = mk(2, 5, 3, 16), mk(2, 7, 1, 16), mk(2, 7, 1, 16)
    kv_index, head_chain = [0, 0, 0], [0, 1, 1]
    seq_chains = torch.tensor([0, 1], device=DEVICE)
    for sc in (None, seq_chains):
        args = (q, k, v, kv_index, head_chain, True, sc, 0.25)
        torch.library.opcheck(chain_attention_triton, args)
        torch.library.opcheck(chain_attention_triton_fwd, args)
        out, lse = chain_attention_triton_fwd(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
        for need_dq, need_dkv in ((True, True), (False, True), (True, False)):
            bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, kv_index,
                     head_chain, True, sc, 0.25, need_dq, need_dkv)
            torch.library.opcheck(chain_attention_triton_bwd, bargs)
        # the deterministic backward (its own dQ kernel) through the same op
        torch.library.opcheck(chain_attention_triton_bwd, bargs[:11] + (True, True, None, None, 0, 0, True))
    with ck.use_backend("triton"):
        fn = torch.compile(lambda q, k, v: ck.chain_attention(q, k, v, (1, 2), kv_sharing=True),
                           fullgraph=True, backend="aot_eager")
        out = fn(q, k, v)
        out.sum().backward()
        eager = ck.chain_attention(q, k, v, (1, 2), kv_sharing=True)
    torch.testing.assert_close(out, eager)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_unsupported_inputs_raise_with_reasons():
    from colm_kernels.ops.chain_attention.triton_backend import not_supported_reasons

    for d in (12, 4, 264):  # not a multiple of 8, below 8, above 256
        q = torch.randn(1, 3, 2, d, device=DEVICE)
        with ck.use_backend("triton"):
            with pytest.raises(BackendError, match=f"head dim must be a multiple of 8 in \\[8, 256\\], got {d}"):
                ck.chain_attention(q, q, q, (1, 1))
    if DEVICE == "cpu":
        qb = torch.randn(1, 3, 2, 16, dtype=torch.bfloat16)
        with ck.use_backend("triton"):
            with pytest.raises(BackendError, match="bfloat16"):
                ck.chain_attention(qb, qb, qb, (1, 1))
    q16 = torch.randn(1, 3, 3, 16)
    reasons = not_supported_reasons(q16, q16[:, :, :2], q16[:, :, :2], [0, 0, 1], [0, 0, 0], True, None, 0.25)
    assert any("same number of query heads" in r for r in reasons)


def test_frozen_kv_or_q_skips_their_gradients():
    """Chain tuning with shared KV: k/v frozen, only dq is computed (and the reverse)."""
    q64 = torch.randn(2, 9, 4, 16, dtype=F64)
    k64, v64 = torch.randn(2, 9, 2, 16, dtype=F64), torch.randn(2, 9, 2, 16, dtype=F64)
    with ck.use_backend("reference"):
        q, k, v = (t.clone().requires_grad_(True) for t in (q64, k64, v64))
        ck.chain_attention(q, k, v, (2, 2), kv_sharing=True).sum().backward()
        ref = (q.grad, k.grad, v.grad)
    for frozen_q in (False, True):
        q = q64.to(DEVICE, torch.float32).requires_grad_(not frozen_q)
        k, v = (t.to(DEVICE, torch.float32).requires_grad_(frozen_q) for t in (k64, v64))
        with ck.use_backend("triton"):
            ck.chain_attention(q, k, v, (2, 2), kv_sharing=True).sum().backward()
        for t, r in zip((q, k, v), ref):
            if t.requires_grad:
                torch.testing.assert_close(t.grad.double().cpu(), r, rtol=1e-4, atol=1e-5)
            else:
                assert t.grad is None
