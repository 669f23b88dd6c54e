"""Bad inputs raise ValueError / TypeError naming the offending argument (spec section 1: never a
silent floor, never a wrong-width tensor). One readable id per case."""
import pytest
import torch

import colm_kernels as ck
from colm_kernels.models import CoLM, CoLMConfig, expand_chains, freeze_chains
from colm_kernels.nn import ChainAttention, ChainLinear, ChainRMSNorm
from utils import F64, chain_blocks

C = (1, 2, 1)  # widths of 8: 2, 4, 2 -> prefixes 2, 6, 8; heads 1, 3, 4


def _gen():
    return torch.Generator().manual_seed(0)


def x8(*lead, dtype=F64, device="cpu"):
    return torch.randn(*lead, 8, dtype=dtype, generator=_gen()).to(device)


def w8(dtype=F64, device="cpu"):
    return torch.randn(8, 8, dtype=dtype, generator=_gen()).to(device)


def qkv(n_q=4, n_kv=4, B=2, S=3, D=4, dtype=F64):
    g = _gen()
    return (torch.randn(B, S, n_q, D, dtype=dtype, generator=g),
            torch.randn(B, S, n_kv, D, dtype=dtype, generator=g),
            torch.randn(B, S, n_kv, D, dtype=dtype, generator=g))


def attn(**kw):
    q, k, v = kw.pop("q", None), kw.pop("k", None), kw.pop("v", None)
    dq, dk, dv = qkv()
    return ck.chain_attention(dq if q is None else q, dk if k is None else k, dv if v is None else v,
                              kw.pop("chains", C), **kw)


def ce(hidden=None, weight=None, targets=None, chains=C, **kw):
    hidden = x8(5) if hidden is None else hidden
    weight = torch.randn(7, 8, dtype=F64) if weight is None else weight
    targets = torch.zeros(5, dtype=torch.long) if targets is None else targets
    return ck.multi_chain_cross_entropy(hidden, weight, targets, chains, **kw)


def cfg(**kw):
    base = dict(dim=16, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=11, chains=C, ffn_hidden_dim=16)
    base.update(kw)
    return CoLMConfig(**base)


def tiny_model(**kw):
    return CoLM(cfg(**kw)).to(F64)


PROMPT = torch.zeros(2, 4, dtype=torch.long)

# (id, call, exception type, regex naming the argument)
CASES = [
    # --- chains ---------------------------------------------------------------------------
    ("linear-chains-empty", lambda: ck.chain_linear(x8(3), w8(), None, ()), ValueError, "chains"),
    ("linear-chains-zero", lambda: ck.chain_linear(x8(3), w8(), None, (1, 0)), ValueError, "chains"),
    ("linear-chains-negative", lambda: ck.chain_linear(x8(3), w8(), None, (2, -1, 3)), ValueError, "chains"),
    ("linear-chains-float", lambda: ck.chain_linear(x8(3), w8(), None, (1.0, 1)), TypeError, "chains"),
    ("linear-chains-bool", lambda: ck.chain_linear(x8(3), w8(), None, (True, 1)), TypeError, "chains"),
    ("linear-chains-bare-int", lambda: ck.chain_linear(x8(3), w8(), None, 2), TypeError, "chains"),
    ("linear-chains-string", lambda: ck.chain_linear(x8(3), w8(), None, "11"), TypeError, "chains"),
    ("rmsnorm-chains-empty", lambda: ck.chain_rmsnorm(x8(3), torch.ones(8, dtype=F64), []), ValueError, "chains"),
    ("attention-chains-bare-int", lambda: attn(chains=4), TypeError, "chains"),
    ("ce-chains-zero", lambda: ce(chains=(0, 4)), ValueError, "chains"),
    # --- indivisible widths ---------------------------------------------------------------
    ("linear-out-features-indivisible", lambda: ck.chain_linear(x8(3), torch.zeros(7, 8, dtype=F64), None, C),
     ValueError, r"out_features"),
    ("linear-in-features-indivisible", lambda: ck.chain_linear(torch.zeros(3, 9, dtype=F64), torch.zeros(8, 9, dtype=F64), None, C),
     ValueError, r"in_features"),
    ("rmsnorm-weight-indivisible", lambda: ck.chain_rmsnorm(torch.zeros(3, 7, dtype=F64), torch.ones(7, dtype=F64), C),
     ValueError, r"weight\.shape\[0\]"),
    ("ce-weight-indivisible", lambda: ce(hidden=torch.zeros(5, 9, dtype=F64), weight=torch.zeros(7, 9, dtype=F64)),
     ValueError, r"weight\.shape\[1\]"),
    ("module-linear-in-indivisible", lambda: ChainLinear(9, 8, C), ValueError, "in_features"),
    ("module-linear-out-indivisible", lambda: ChainLinear(8, 10, C), ValueError, "out_features"),
    ("module-rmsnorm-dim-indivisible", lambda: ChainRMSNorm(10, C), ValueError, "dim"),
    # --- chain out of range ----------------------------------------------------------------
    ("linear-chain-too-big", lambda: ck.chain_linear(x8(3), w8(), None, C, chain=3), ValueError, "chain"),
    ("linear-chain-negative", lambda: ck.chain_linear(x8(3), w8(), None, C, chain=-1), ValueError, "chain"),
    ("linear-chain-float", lambda: ck.chain_linear(x8(3), w8(), None, C, chain=1.0), TypeError, "chain"),
    ("rmsnorm-chain-too-big", lambda: ck.chain_rmsnorm(x8(3), torch.ones(8, dtype=F64), C, chain=5), ValueError, "chain"),
    ("model-forward-chain-too-big", lambda: tiny_model()(PROMPT, chain=3), ValueError, "chain"),
    # --- dtype / device mismatch -------------------------------------------------------------
    ("linear-x-weight-dtype", lambda: ck.chain_linear(x8(3, dtype=torch.float32), w8(), None, C), TypeError, "weight"),
    ("linear-x-weight-device", lambda: ck.chain_linear(x8(3, device="meta"), w8(), None, C), ValueError, "weight"),
    ("linear-bias-dtype", lambda: ck.chain_linear(x8(3), w8(), torch.zeros(8, dtype=torch.float32), C), TypeError, "bias"),
    ("linear-blocks-mixed-dtype", lambda: ck.chain_linear(
        x8(3), [b.float() if i == 1 else b for i, b in enumerate(chain_blocks(8, 8, C, _gen()))], None, C),
     TypeError, r"weight\[1\]"),
    ("rmsnorm-x-weight-dtype", lambda: ck.chain_rmsnorm(x8(3), torch.ones(8), C), TypeError, "weight"),
    ("rmsnorm-x-weight-device", lambda: ck.chain_rmsnorm(x8(3), torch.ones(8, dtype=F64, device="meta"), C),
     ValueError, "weight"),
    ("attention-k-dtype", lambda: attn(k=qkv()[1].float()), TypeError, r"\bk\b"),
    ("attention-v-dtype", lambda: attn(v=qkv()[2].float()), TypeError, r"\bv\b"),
    ("attention-k-device", lambda: attn(k=qkv()[1].to("meta")), ValueError, r"\bk\b"),
    ("attention-v-device", lambda: attn(v=qkv()[2].to("meta")), ValueError, r"\bv\b"),
    ("ce-weight-dtype", lambda: ce(weight=torch.zeros(7, 8)), TypeError, "weight"),
    ("ce-targets-device", lambda: ce(targets=torch.zeros(5, dtype=torch.long, device="meta")), ValueError, "targets"),
    # --- wrong ranks / types ----------------------------------------------------------------
    ("linear-x-0d", lambda: ck.chain_linear(torch.tensor(1.0, dtype=F64), w8(), None, C), ValueError, r"\bx\b"),
    ("linear-x-int", lambda: ck.chain_linear(torch.zeros(3, 8, dtype=torch.long), w8(), None, C), TypeError, r"\bx\b"),
    ("linear-x-not-tensor", lambda: ck.chain_linear([[1.0] * 8], w8(), None, C), TypeError, r"\bx\b"),
    ("linear-weight-3d", lambda: ck.chain_linear(x8(3), torch.zeros(1, 8, 8, dtype=F64), None, C), ValueError, "weight"),
    ("linear-weight-wrong-type", lambda: ck.chain_linear(x8(3), "W", None, C), TypeError, "weight"),
    ("linear-weight-list-length", lambda: ck.chain_linear(x8(3), chain_blocks(8, 8, C, _gen())[:2], None, C),
     ValueError, "weight"),
    ("linear-weight-block-shape", lambda: ck.chain_linear(
        x8(3), [torch.zeros(2, 2, dtype=F64), torch.zeros(4, 5, dtype=F64), torch.zeros(2, 8, dtype=F64)], None, C),
     ValueError, r"weight\[1\]"),
    ("linear-bias-shape", lambda: ck.chain_linear(x8(3), w8(), torch.zeros(7, dtype=F64), C), ValueError, "bias"),
    ("linear-bias-list-length", lambda: ck.chain_linear(x8(3), w8(), [torch.zeros(2, dtype=F64)], C), ValueError, "bias"),
    ("linear-x-too-narrow", lambda: ck.chain_linear(torch.zeros(3, 6, dtype=F64), w8(), None, C), ValueError, r"x\.shape"),
    ("rmsnorm-weight-2d", lambda: ck.chain_rmsnorm(x8(3), torch.ones(1, 8, dtype=F64), C), ValueError, "weight"),
    ("rmsnorm-x-not-a-prefix-width", lambda: ck.chain_rmsnorm(torch.zeros(3, 5, dtype=F64), torch.ones(8, dtype=F64), C),
     ValueError, r"x\.shape\[-1\]"),
    ("rmsnorm-x-width-vs-chain", lambda: ck.chain_rmsnorm(torch.zeros(3, 6, dtype=F64), torch.ones(8, dtype=F64), C, chain=2),
     ValueError, r"x\.shape\[-1\]"),
    ("rmsnorm-eps-zero", lambda: ck.chain_rmsnorm(x8(3), torch.ones(8, dtype=F64), C, eps=0.0), ValueError, "eps"),
    ("rmsnorm-eps-nan", lambda: ck.chain_rmsnorm(x8(3), torch.ones(8, dtype=F64), C, eps=float("nan")), ValueError, "eps"),
    ("attention-q-3d", lambda: attn(q=qkv()[0][0]), ValueError, r"\bq\b"),
    ("attention-k-5d", lambda: attn(k=qkv()[1][None]), ValueError, r"\bk\b"),
    ("attention-kv-shape-differ", lambda: attn(v=qkv(n_kv=2)[2]), ValueError, r"\bv\b"),
    ("attention-batch-mismatch", lambda: attn(k=qkv(B=3)[1], v=qkv(B=3)[2]), ValueError, r"k\.shape\[0\]"),
    ("attention-head-dim-mismatch", lambda: attn(k=qkv(D=6)[1], v=qkv(D=6)[2]), ValueError, r"k\.shape\[3\]"),
    ("attention-causal-not-bool", lambda: attn(causal=1), TypeError, "causal"),
    ("attention-kv-sharing-not-bool", lambda: attn(kv_sharing="yes"), TypeError, "kv_sharing"),
    ("attention-softmax-scale-negative", lambda: attn(softmax_scale=-1.0), ValueError, "softmax_scale"),
    ("attention-softmax-scale-nan", lambda: attn(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("attention-kv-zero-heads", lambda: attn(k=qkv(n_kv=0)[1], v=qkv(n_kv=0)[2]), ValueError, r"k\.shape\[2\]"),
    # --- attention head layouts --------------------------------------------------------------
    ("attention-nq-not-a-prefix", lambda: attn(q=qkv(n_q=2)[0]), ValueError, r"q\.shape\[2\]"),
    ("attention-nq-too-many", lambda: attn(q=qkv(n_q=5)[0], k=qkv(n_kv=5)[1], v=qkv(n_kv=5)[2]),
     ValueError, r"q\.shape\[2\]"),
    ("attention-kv-not-dividing-q", lambda: attn(k=qkv(n_kv=3)[1], v=qkv(n_kv=3)[2]), ValueError, r"k\.shape\[2\]"),
    ("attention-kv-not-splitting-chains", lambda: attn(k=qkv(n_kv=2)[1], v=qkv(n_kv=2)[2]),
     ValueError, r"k\.shape\[2\]"),
    ("attention-air-kv-not-dividing-chain", lambda: attn(k=qkv(n_kv=2)[1], v=qkv(n_kv=2)[2], kv_sharing=True),
     ValueError, r"k\.shape\[2\]"),
    ("attention-bad-kv-mapping", lambda: attn(kv_mapping="repeat"), ValueError, "kv_mapping"),
    # --- seq_chains ------------------------------------------------------------------------
    ("seq-chains-wrong-length", lambda: attn(seq_chains=torch.tensor([0, 1, 2])), ValueError, "seq_chains"),
    ("seq-chains-too-big", lambda: attn(seq_chains=torch.tensor([0, 3])), ValueError, "seq_chains"),
    ("seq-chains-above-q-scale", lambda: attn(q=qkv(n_q=3)[0], k=qkv(n_kv=3)[1], v=qkv(n_kv=3)[2],
                                              seq_chains=torch.tensor([2, 0])), ValueError, "seq_chains"),
    ("seq-chains-negative", lambda: attn(seq_chains=torch.tensor([-1, 0])), ValueError, "seq_chains"),
    ("seq-chains-float", lambda: attn(seq_chains=torch.tensor([0.0, 1.0])), TypeError, "seq_chains"),
    ("seq-chains-bool", lambda: attn(seq_chains=torch.tensor([True, False])), TypeError, "seq_chains"),
    ("seq-chains-2d", lambda: attn(seq_chains=torch.zeros(2, 1, dtype=torch.long)), ValueError, "seq_chains"),
    ("seq-chains-device", lambda: attn(seq_chains=torch.zeros(2, dtype=torch.long, device="meta")), ValueError,
     "seq_chains"),
    # --- cross-entropy ---------------------------------------------------------------------
    ("ce-targets-shape", lambda: ce(targets=torch.zeros(4, dtype=torch.long)), ValueError, "targets"),
    ("ce-targets-2d", lambda: ce(targets=torch.zeros(5, 1, dtype=torch.long)), ValueError, "targets"),
    ("ce-targets-float", lambda: ce(targets=torch.zeros(5, dtype=F64)), TypeError, "targets"),
    ("ce-target-past-vocab", lambda: ce(targets=torch.tensor([0, 1, 7, 2, 3])), ValueError, "targets"),
    ("ce-target-negative", lambda: ce(targets=torch.tensor([0, -1, 2, 2, 3])), ValueError, "targets"),
    ("ce-hidden-not-a-prefix", lambda: ce(hidden=torch.zeros(5, 5, dtype=F64)), ValueError, r"hidden\.shape\[-1\]"),
    ("ce-weight-1d", lambda: ce(weight=torch.zeros(8, dtype=F64)), ValueError, "weight"),
    ("ce-ignore-index-float", lambda: ce(ignore_index=-100.0), TypeError, "ignore_index"),
    # --- CoLMConfig ------------------------------------------------------------------------
    ("config-n-heads-not-sum-chains", lambda: cfg(n_heads=8, n_kv_heads=8), ValueError, "n_heads"),
    ("config-dim-not-divisible-by-heads", lambda: cfg(dim=18), ValueError, "dim"),
    ("config-odd-head-dim", lambda: cfg(dim=12), ValueError, "head_dim"),
    ("config-ffn-indivisible", lambda: cfg(ffn_hidden_dim=10), ValueError, "ffn_hidden_dim"),
    ("config-air-chain-not-multiple-of-kv", lambda: cfg(n_kv_heads=2, kv_sharing=True), ValueError, "n_kv_heads"),
    ("config-gqa-kv-not-splitting-chains", lambda: cfg(n_kv_heads=2), ValueError, "n_kv_heads"),
    ("config-kv-more-than-heads", lambda: cfg(n_kv_heads=8), ValueError, "n_kv_heads"),
    ("config-bad-kv-mapping", lambda: cfg(kv_mapping="interleave"), ValueError, "kv_mapping"),
    ("config-zero-layers", lambda: cfg(n_layers=0), ValueError, "n_layers"),
    ("config-chains-zero", lambda: cfg(chains=(2, 0, 2)), ValueError, "chains"),
    ("config-negative-eps", lambda: cfg(norm_eps=-1e-5), ValueError, "norm_eps"),
    ("module-attention-n-heads", lambda: ChainAttention(16, 8, 8, C), ValueError, "n_heads"),
    ("module-attention-kv-mapping", lambda: ChainAttention(16, 4, 4, C, kv_mapping="x"), ValueError, "kv_mapping"),
    ("model-config-not-a-config", lambda: CoLM(dict(dim=16)), TypeError, "config"),
    # --- generate --------------------------------------------------------------------------
    ("generate-prompt-1d", lambda: tiny_model().generate(PROMPT[0], 2), ValueError, "prompt"),
    ("generate-prompt-float", lambda: tiny_model().generate(PROMPT.double(), 2), TypeError, "prompt"),
    ("generate-prompt-empty", lambda: tiny_model().generate(PROMPT[:, :0], 2), ValueError, "prompt"),
    ("generate-prompt-not-tensor", lambda: tiny_model().generate([[1, 2]], 2), TypeError, "prompt"),
    ("generate-chain-list-length", lambda: tiny_model().generate(PROMPT, 3, chain=[0, 0]), ValueError, "chain"),
    ("generate-chain-list-out-of-range", lambda: tiny_model().generate(PROMPT, 2, chain=[0, 3]), ValueError,
     r"chain\[1\]"),
    ("generate-prefill-below-decode-non-air", lambda: tiny_model().generate(PROMPT, 2, chain=2, prefill_chain=0),
     ValueError, "prefill_chain"),
    ("generate-prefill-out-of-range", lambda: tiny_model().generate(PROMPT, 2, chain=0, prefill_chain=3),
     ValueError, "prefill_chain"),
    ("generate-max-new-tokens-negative", lambda: tiny_model().generate(PROMPT, -1), ValueError, "max_new_tokens"),
    ("generate-max-new-tokens-float", lambda: tiny_model().generate(PROMPT, 2.0), TypeError, "max_new_tokens"),
    # --- expansion / tuning ------------------------------------------------------------------
    ("expand-new-chains-empty", lambda: expand_chains(tiny_model().state_dict(), cfg(), ()), ValueError, "new_chains"),
    ("expand-unknown-key", lambda: expand_chains({**tiny_model().state_dict(), "extra.weight": torch.zeros(1)}, cfg(), (4,)),
     ValueError, "state_dict"),
    ("freeze-k-too-big", lambda: freeze_chains(tiny_model(), 4), ValueError, r"\bk\b"),
    ("freeze-k-bool", lambda: freeze_chains(tiny_model(), True), ValueError, r"\bk\b"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with ck.use_backend("reference"):
        with pytest.raises(exc, match=match):
            call()


def test_case_ids_are_unique_and_many():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


def test_ce_ignore_index_is_not_out_of_range():
    loss = ce(targets=torch.tensor([0, -100, 6, 2, -100]))
    assert loss.shape == (3,) and torch.isfinite(loss).all()


def test_cuda_backends_report_why_they_cannot_run_here():
    """Named explicitly on CPU tensors, every cuda backend raises BackendError with a reason."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the cuda backends can run")
    with ck.use_backend("cuda"):
        with pytest.raises(ck.BackendError, match="chain_rmsnorm: backend 'cuda' cannot run"):
            ck.chain_rmsnorm(x8(3), torch.ones(8, dtype=F64), C)



# --- head dim 0 with the default softmax_scale: a ValueError, not a ZeroDivisionError ---------
def _zero_head_dim_decode():
    z = torch.zeros(2, 3, 4, 0, dtype=F64)
    with torch.no_grad():
        return ck.chain_attention_decode(z[:, :1], z, z, torch.tensor([3, 2]), C)


HEAD_DIM_ZERO_CASES = [
    ("attention-head-dim-zero", lambda: attn(q=qkv(D=0)[0], k=qkv(D=0)[1], v=qkv(D=0)[2]), ValueError,
     r"head dim q\.shape\[-1\]=0"),
    ("decode-head-dim-zero", _zero_head_dim_decode, ValueError, r"head dim q\.shape\[-1\]=0"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in HEAD_DIM_ZERO_CASES], ids=[c[0] for c in HEAD_DIM_ZERO_CASES])
def test_head_dim_zero_raises_naming_the_head_dim(call, exc, match):
    with ck.use_backend("reference"):
        with pytest.raises(exc, match=match):
            call()


# --- chain_attention_decode: contiguous and paged caches ------------------------------------
def decode(q=None, k=None, v=None, seqlens=None, **kw):
    """Decode over a paged cache by default: 5 blocks of 2 positions, 4 kv heads, D = 4; two
    sequences of lengths 3 and 4 on blocks [0, 1] and [2, 3]."""
    g = _gen()
    q = torch.randn(2, 1, 4, 4, dtype=F64, generator=g) if q is None else q
    k = torch.randn(5, 2, 4, 4, dtype=F64, generator=g) if k is None else k
    v = torch.randn(5, 2, 4, 4, dtype=F64, generator=g) if v is None else v
    seqlens = torch.tensor([3, 4]) if seqlens is None else seqlens
    kw.setdefault("block_table", torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    with torch.no_grad():
        return ck.chain_attention_decode(q, k, v, seqlens, C, **kw)


def _table(*rows):
    return torch.tensor(rows, dtype=torch.int32)


DECODE_CASES = [
    ("decode-cache-batch-without-table", lambda: decode(block_table=None), ValueError, r"k_cache\.shape\[0\]"),
    ("decode-block-table-int64", lambda: decode(block_table=torch.tensor([[0, 1], [2, 3]])), TypeError,
     "block_table must be an int32"),
    ("decode-block-table-not-tensor", lambda: decode(block_table=[[0, 1], [2, 3]]), TypeError, "block_table"),
    ("decode-block-table-1d", lambda: decode(block_table=_table(0, 1)), ValueError, r"block_table must have shape"),
    ("decode-block-table-batch", lambda: decode(block_table=_table([0, 1], [2, 3], [4, 4])), ValueError,
     r"block_table must have shape \(batch=2"),
    ("decode-block-table-device", lambda: decode(block_table=_table([0, 1], [2, 3]).to("meta")), ValueError,
     "block_table is on meta"),
    ("decode-block-table-past-num-blocks", lambda: decode(block_table=_table([0, 5], [2, 3])), ValueError,
     r"block_table entries in use \(k_cache\.shape\[0\]=5 blocks\) values must be in \[0, 4\]"),
    ("decode-block-table-negative", lambda: decode(block_table=_table([0, 1], [-1, 3])), ValueError,
     "block_table entries in use"),
    ("decode-block-table-too-few-blocks", lambda: decode(seqlens=torch.tensor([5, 4])), ValueError,
     r"cache_seqlens values must be in \[0, 4\].*too few blocks, block_table\.shape\[1\]=2 blocks of page_size=2"),
    ("decode-page-size-zero", lambda: decode(k=torch.zeros(5, 0, 4, 4, dtype=F64), v=torch.zeros(5, 0, 4, 4, dtype=F64)),
     ValueError, r"page_size >= 1"),
    ("decode-too-many-new-tokens", lambda: decode(q=torch.zeros(2, 129, 4, 4, dtype=F64), seqlens=torch.tensor([3, 4])),
     ValueError, r"q\.shape\[1\]=129 new tokens must be in \[1, 128\]"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_decode_bad_input_raises_naming_the_argument(call, exc, match):
    with ck.use_backend("reference"):
        with pytest.raises(exc, match=match):
            call()


def test_decode_checks_only_the_block_table_entries_in_use():
    """Entries past a sequence's pages are never read, so they are not checked (-7, 99 here);
    head dim 0 with an explicit softmax_scale is a valid empty attention."""
    out = decode(block_table=_table([0, 1], [2, -7]), seqlens=torch.tensor([3, 2]))
    assert out.shape == (2, 1, 4, 4) and torch.isfinite(out).all()
    out = decode(block_table=_table([4, 99], [2, 3]), seqlens=torch.tensor([1, 4]))
    assert torch.isfinite(out).all()
    empty = decode(q=torch.zeros(2, 1, 4, 0, dtype=F64), k=torch.zeros(5, 2, 4, 0, dtype=F64),
                   v=torch.zeros(5, 2, 4, 0, dtype=F64), softmax_scale=0.5)
    assert empty.shape == (2, 1, 4, 0)
