"""``chain_attention`` on variable-length packed batches (flash-attn's ``cu_seqlens`` convention),
``reference`` and ``triton`` backends (the interpreter on CPU, real kernels on GPU).

The expected values come from an independent path: a per-sequence loop of the public function on
the padded (non-varlen) layout, batch of one, ``reference`` backend in float64 (and in the kernel's
dtype for the accuracy rule of ``numerics.py``). Covered: empty and length-1 sequences, equal
lengths and KV longer than Q per sequence (bottom-right causal per sequence), a sequence with keys
but no query (its dK/dV rows must be written as zeros), GQA and shared KV with both mappings, two
elastic scales, mixed ``seq_chains`` (exact zeros for inactive heads), non-causal, float16; bad
``cu_seqlens`` / ``max_seqlen`` raise naming the argument; opcheck of the extended ops. The
triton backend runs both backwards (``deterministic`` False and True). Kernel
outputs are allocated NaN-filled here, so a row that no program writes fails the test."""

import itertools

import pytest
import torch

import colm_kernels as ck
from colm_kernels.ops.chain_attention.api import head_maps
from numerics import assert_within_eager_error


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
D = 16

# name -> (q lengths, k lengths) per sequence
LENGTHS = {
    "eq-0.1.17.5": ([0, 1, 17, 5], [0, 1, 17, 5]),
    "kvlonger-q1.3.0.2-k4.3.0.9": ([1, 3, 0, 2], [4, 3, 0, 9]),
    "keys-no-query-q2.0.3-k2.5.3": ([2, 0, 3], [2, 5, 3]),
}
# name -> (chains, kv heads of the full model, kv_sharing, kv_mapping)
LAYOUTS = {
    "C2.2-gqa-kv2": ((2, 2), 2, False, "tile"),              # G = 2 at every scale
    "C1.2.1-shared1-tile": ((1, 2, 1), 1, True, "tile"),     # G = 1, 3, 4
    "C2.4-shared2-group": ((2, 4), 2, True, "chain_group"),  # G = 1 then 3
}



def _cu(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=DEVICE)


def _inputs(lq, lk, n_q, n_kv):
    q = torch.randn(sum(lq), n_q, D, dtype=F64)
    k, v = (torch.randn(sum(lk), n_kv, D, dtype=F64) for _ in range(2))
    return q, k, v, torch.randn(sum(lq), n_q, D, dtype=F64)


def _leaf(t, dtype, device=DEVICE):
    return t.detach().to(device=device, dtype=dtype).requires_grad_(True)


def _grads(out, leaves, cot):
    return torch.autograd.grad(out, leaves, cot.to(device=out.device, dtype=out.dtype))


def _per_sequence(tensors, cot, lq, lk, chains, dtype, seq_chains=None, **kw):
    """Independent expectation: every non-empty query sequence through the padded layout (batch of
    one) on the reference backend, in ``dtype``; gradients through the slices (keys no query reads
    get zeros)."""
    q, k, v = (_leaf(t, dtype, "cpu") for t in tensors)
    cq, ck_ = _cu(lq).tolist(), _cu(lk).tolist()
    outs = []
    with ck.use_backend("reference"):
        for b in range(len(lq)):
            if lq[b] == 0:
                continue
            sc = None if seq_chains is None else seq_chains[b:b + 1].cpu()
            qs = q[cq[b]:cq[b + 1]][None]
            ks, vs = (t[ck_[b]:ck_[b + 1]][None] for t in (k, v))
            outs.append(ck.chain_attention(qs, ks, vs, chains, seq_chains=sc, **kw)[0])
    out = torch.cat(outs)
    return out, _grads(out, (q, k, v), cot)


def _varlen(backend, tensors, cot, lq, lk, chains, dtype, max_pad=0, **kw):
    q, k, v = (_leaf(t, dtype) for t in tensors)
    with ck.use_backend(backend):
        out = ck.chain_attention(q, k, v, chains, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                                 max_seqlen_q=max(lq) + max_pad, max_seqlen_k=max(lk) + max_pad, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    return out, _grads(out, (q, k, v), cot)


def _check(backend, lq, lk, layout, n_q, dtype=torch.float32, seq_chains=None, max_pad=0, **kw):
    """Varlen on ``backend`` vs the per-sequence loop; returns the varlen ``(out, grads)`` and the
    head maps."""
    chains, n_kv_full, sharing, mapping = layout
    n_kv = n_kv_full if sharing else n_q * n_kv_full // sum(chains)
    *tensors, cot = _inputs(lq, lk, n_q, n_kv)
    kw = dict(kv_sharing=sharing, kv_mapping=mapping, **kw)
    ref = _per_sequence(tensors, cot, lq, lk, chains, F64, seq_chains=seq_chains, **kw)
    ours = _varlen(backend, tensors, cot, lq, lk, chains, dtype, max_pad=max_pad, seq_chains=seq_chains, **kw)
    tag = f"{backend} Hq={n_q} {dtype}"
    if dtype == F64:  # the reference backend: same math, only the summation order may differ
        for name, a, r in zip(("out", "dq", "dk", "dv"), (ours[0], *ours[1]), (ref[0], *ref[1])):
            torch.testing.assert_close(a.cpu(), r, rtol=1e-12, atol=1e-12, msg=f"{name} {tag}")
    else:
        sc = None if seq_chains is None else seq_chains.cpu()
        eager = _per_sequence(tensors, cot, lq, lk, chains, dtype, seq_chains=sc, **kw)
        assert_within_eager_error(ours[0], eager[0], ref[0], name=f"out {tag}")
        for name, g, ge, gr in zip(("dq", "dk", "dv"), ours[1], eager[1], ref[1]):
            assert_within_eager_error(g, ge, gr, factor=3.0, name=f"{name} {tag}")
    return ours, head_maps(chains, n_q, n_kv, sharing, mapping)


BACKENDS = [("reference", F64), ("triton", torch.float32)]
# (backend, dtype, deterministic): the triton backend with both backwards (dQ by atomics in the
# key-block pass, or a separate dQ pass)
RUNS = [("reference", F64, False), ("triton", torch.float32, False), ("triton", torch.float32, True)]
RUN_IDS = ["reference", "triton", "triton-deterministic"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("backend,dtype,deterministic", RUNS, ids=RUN_IDS)
def test_varlen_matches_per_sequence_loop(backend, dtype, deterministic, lengths, layout, nan_empty):
    lq, lk = LENGTHS[lengths]
    chains = LAYOUTS[layout][0]
    for n_q in (chains[0], sum(chains)):  # two elastic scales: the smallest and the full model
        _check(backend, lq, lk, LAYOUTS[layout], n_q, dtype=dtype, causal=True, deterministic=deterministic)


@pytest.mark.parametrize("backend,dtype,deterministic", RUNS, ids=RUN_IDS)
def test_varlen_non_causal_softmax_scale_bucketed_max(backend, dtype, deterministic, nan_empty):
    """Non-causal, an explicit softmax_scale, and max_seqlen above the real maximum (a bucket)."""
    lq, lk = LENGTHS["kvlonger-q1.3.0.2-k4.3.0.9"]
    _check(backend, lq, lk, LAYOUTS["C2.4-shared2-group"], 6, dtype=dtype, causal=False,
           softmax_scale=0.4, max_pad=13, deterministic=deterministic)


@pytest.mark.parametrize("lengths,seq", [("eq-0.1.17.5", [1, 0, 2, 1]),
                                         ("kvlonger-q1.3.0.2-k4.3.0.9", [0, 2, 1, 1])],
                         ids=["eq-sc1021", "kvlonger-sc0211"])
@pytest.mark.parametrize("backend,dtype,deterministic", RUNS, ids=RUN_IDS)
def test_varlen_seq_chains_mixed(backend, dtype, deterministic, lengths, seq, nan_empty):
    lq, lk = LENGTHS[lengths]
    layout = LAYOUTS["C1.2.1-shared1-tile"]
    seq_chains = torch.tensor(seq, device=DEVICE)
    (out, (dq, dk, dv)), (_, kv_index, head_chain) = _check(
        backend, lq, lk, layout, 4, dtype=dtype, seq_chains=seq_chains, deterministic=deterministic)
    cq = _cu(lq).tolist()
    for b, c in enumerate(seq):
        inactive = [h for h in range(4) if head_chain[h] > c]
        rows = slice(cq[b], cq[b + 1])
        assert torch.equal(out[rows][:, inactive], torch.zeros_like(out[rows][:, inactive]))
        assert torch.equal(dq[rows][:, inactive], torch.zeros_like(dq[rows][:, inactive]))


def test_varlen_gqa_float16_triton(nan_empty):
    lq, lk = LENGTHS["eq-0.1.17.5"]
    _check("triton", lq, lk, LAYOUTS["C2.2-gqa-kv2"], 4, dtype=torch.float16, seq_chains=torch.tensor(
        [1, 1, 0, 1], device=DEVICE))


def test_varlen_output_rows_of_keyless_sequences():
    """A sequence with queries but no key (causal or not) outputs zeros and passes zero dq."""
    lq, lk = [2, 3], [0, 4]
    for backend, dtype in BACKENDS:
        for causal in (True, False):
            q, k, v = (_leaf(t, dtype) for t in _inputs(lq, lk, 2, 1)[:3])
            with ck.use_backend(backend):
                out = ck.chain_attention(q, k, v, (1, 1), causal=causal, kv_sharing=True,
                                         cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=3,
                                         max_seqlen_k=4)
            out.sum().backward()
            assert torch.equal(out[:2], torch.zeros_like(out[:2])), (backend, causal)
            assert torch.equal(q.grad[:2], torch.zeros_like(q.grad[:2])), (backend, causal)
            assert torch.isfinite(out).all() and torch.isfinite(k.grad).all()


# ---------------------------------------------------------------------------------------------
# bad inputs
def _bad_call(lq=(2, 3), lk=(2, 3), **kw):
    q = torch.randn(sum(lq), 2, D)
    k = torch.randn(sum(lk), 1, D)
    args = dict(cu_seqlens_q=_cu(lq).cpu(), cu_seqlens_k=_cu(lk).cpu(), max_seqlen_q=3, max_seqlen_k=3)
    args.update(kw)
    q = args.pop("q", q)
    k = args.pop("k", k)
    return lambda: ck.chain_attention(q, k, k, (1, 1), kv_sharing=True, **args)


def _i32(*vals):
    return torch.tensor(vals, dtype=torch.int32)


BAD = [
    ("cu-q-int64", _bad_call(cu_seqlens_q=torch.tensor([0, 2, 5])), TypeError, "cu_seqlens_q"),
    ("cu-k-float", _bad_call(cu_seqlens_k=torch.tensor([0.0, 2.0, 5.0])), TypeError, "cu_seqlens_k"),
    ("cu-q-not-a-tensor", _bad_call(cu_seqlens_q=[0, 2, 5]), TypeError, "cu_seqlens_q"),
    ("cu-q-2d", _bad_call(cu_seqlens_q=_i32(0, 2, 5)[None]), ValueError, "cu_seqlens_q"),
    ("cu-k-empty", _bad_call(cu_seqlens_k=_i32()), ValueError, "cu_seqlens_k"),
    ("cu-q-not-from-0", _bad_call(cu_seqlens_q=_i32(1, 2, 5)), ValueError, "cu_seqlens_q.*start at 0"),
    ("cu-k-decreasing", _bad_call(cu_seqlens_k=_i32(0, 4, 3, 5), cu_seqlens_q=_i32(0, 1, 2, 5)),
     ValueError, "cu_seqlens_k.*non-decreasing"),
    ("cu-q-last-not-total", _bad_call(cu_seqlens_q=_i32(0, 2, 4)), ValueError,
     r"cu_seqlens_q\[-1\]=4.*q\.shape\[0\]=5"),
    ("cu-k-last-not-total", _bad_call(cu_seqlens_k=_i32(0, 2, 6)), ValueError, r"cu_seqlens_k\[-1\]"),
    ("cu-different-n-seq", _bad_call(cu_seqlens_k=_i32(0, 5)), ValueError, "cu_seqlens_q and cu_seqlens_k"),
    ("cu-q-only", _bad_call(cu_seqlens_k=None), ValueError, "cu_seqlens_k"),
    ("cu-k-only", _bad_call(cu_seqlens_q=None), ValueError, "cu_seqlens_q"),
    ("cu-q-other-device", _bad_call(cu_seqlens_q=_i32(0, 2, 5).to("meta")), ValueError, "cu_seqlens_q"),
    ("max-q-missing", _bad_call(max_seqlen_q=None), ValueError, "max_seqlen_q"),
    ("max-k-missing", _bad_call(max_seqlen_k=None), ValueError, "max_seqlen_k"),
    ("max-q-too-small", _bad_call(max_seqlen_q=2), ValueError, "max_seqlen_q=2.*longest"),
    ("max-k-too-small", _bad_call(max_seqlen_k=1), ValueError, "max_seqlen_k=1"),
    ("max-q-float", _bad_call(max_seqlen_q=3.0), TypeError, "max_seqlen_q"),
    ("max-k-negative", _bad_call(lq=(0, 0), lk=(0, 0), max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    ("max-without-cu", _bad_call(cu_seqlens_q=None, cu_seqlens_k=None, q=torch.randn(1, 5, 2, D),
                                 k=torch.randn(1, 5, 1, D), max_seqlen_k=None), ValueError, "max_seqlen_q"),
    ("q-4d-with-cu", _bad_call(q=torch.randn(1, 5, 2, D)), ValueError, r"\bq\b.*3-D"),
    ("k-4d-with-cu", _bad_call(k=torch.randn(1, 5, 1, D)), ValueError, r"\bk\b.*3-D"),
    ("q-heads-not-a-scale", _bad_call(q=torch.randn(5, 3, D)), ValueError, r"q\.shape\[1\]"),
    ("seq-chains-per-token", _bad_call(seq_chains=torch.zeros(5, dtype=torch.long)), ValueError, "seq_chains"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_varlen_inputs_raise_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# registered ops
def _tiny_varlen(requires_grad=True):
    lq, lk = [2, 0, 3], [2, 1, 4]
    q = torch.randn(sum(lq), 3, D, device=DEVICE, requires_grad=requires_grad)
    k, v = (torch.randn(sum(lk), 1, D, device=DEVICE, requires_grad=requires_grad) for _ in range(2))
    return q, k, v, _cu(lq), _cu(lk), max(lq), max(lk)


def test_opcheck_reference_op_varlen():
    from colm_kernels.ops.chain_attention.api import chain_attention_reference

    q, k, v, cq, ck_, mq, mk = _tiny_varlen()
    q, k, v = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    cq, ck_ = cq.cpu(), ck_.cpu()
    for sc in (None, torch.tensor([1, 0, 0])):
        torch.library.opcheck(chain_attention_reference,
                              (q, k, v, [0, 0, 0], [0, 1, 1], True, sc, 0.25, cq, ck_, mq, mk))


def test_opcheck_triton_ops_varlen():
    from colm_kernels.ops.chain_attention.triton_backend import (
        chain_attention_triton, chain_attention_triton_bwd, chain_attention_triton_fwd)

    q, k, v, cq, ck_, mq, mk = _tiny_varlen()
    kv_index, head_chain = [0, 0, 0], [0, 1, 1]
    for sc in (None, torch.tensor([1, 0, 0], device=DEVICE)):
        args = (q, k, v, kv_index, head_chain, True, sc, 0.25, cq, ck_, mq, mk)
        torch.library.opcheck(chain_attention_triton, args)
        torch.library.opcheck(chain_attention_triton_fwd, args)
        out, lse = chain_attention_triton_fwd(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
        assert lse.shape == (3, q.shape[0])
        for need_dq, need_dkv in ((True, True), (False, True), (True, False)):
            bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, kv_index,
                     head_chain, True, sc, 0.25, need_dq, need_dkv, cq, ck_, mq, mk)
            torch.library.opcheck(chain_attention_triton_bwd, bargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_varlen(backend):
    q, k, v, cq, ck_, mq, mk = _tiny_varlen()

    def fn(q, k, v):
        return ck.chain_attention(q, k, v, (1, 2), kv_sharing=True, cu_seqlens_q=cq, cu_seqlens_k=ck_,
                                  max_seqlen_q=mq, max_seqlen_k=mk)

    with ck.use_backend(backend):
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
        out.sum().backward()
        eager = fn(q, k, v)
    torch.testing.assert_close(out, eager)
    assert q.grad is not None and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
