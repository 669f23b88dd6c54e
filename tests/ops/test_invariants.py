"""The spec's one invariant at op level (COLM_SPEC section 1): output chain i depends only on input
chains 1..i. Causality (perturbing input chain j changes no output chain i < j) and elasticity
(``chain=k`` gives the first ``P_(k+1)`` features of the full run). Exact equality wherever the
same values go through the same arithmetic."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import colm_kernels as ck
from utils import (
    blocks_to_dense,
    chain_blocks,
    cid,
    head_chain,
    head_prefix,
    offsets,
    prefix,
    randn,
)

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None)
chains_st = st.lists(st.integers(1, 3), min_size=1, max_size=5).map(tuple)


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def perturb_segment(x, lo, hi, gen):
    """A copy of ``x`` with features ``lo:hi`` replaced by fresh random values."""
    y = x.clone()
    y[..., lo:hi] = randn(*x.shape[:-1], hi - lo, gen=gen, scale=3.0)
    return y


# =============================================================================================
# chain_linear
def _linear_causality(chains, in_mult, out_mult, m, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    s = sum(chains)
    in_f, out_f = in_mult * s, out_mult * s
    blocks = chain_blocks(out_f, in_f, chains, gen)
    weight = blocks if layout == "list" else blocks_to_dense(blocks, chains, out_f, in_f)
    bias = randn(out_f, gen=gen)
    x = randn(m, in_f, gen=gen)
    y = ck.chain_linear(x, weight, bias, chains)
    in_off, out_off = offsets(in_f, chains), offsets(out_f, chains)
    for j in range(len(chains)):
        for hi in (in_off[j + 1], in_f):  # input chain j alone, then chains j..n-1 together
            y2 = ck.chain_linear(perturb_segment(x, in_off[j], hi, gen), weight, bias, chains)
            assert torch.equal(y[..., : out_off[j]], y2[..., : out_off[j]]), (j, hi)
            # ...while output chain j does read input chain j.
            assert not torch.equal(y[..., out_off[j]: out_off[j + 1]], y2[..., out_off[j]: out_off[j + 1]])


@SETTINGS
@given(chains=chains_st, in_mult=st.integers(1, 3), out_mult=st.integers(1, 3),
       m=st.sampled_from([1, 5]), layout=st.sampled_from(["dense", "list"]), seed=st.integers(0, 2**16))
def test_chain_linear_causality_random_layouts(chains, in_mult, out_mult, m, layout, seed):
    _linear_causality(chains, in_mult, out_mult, m, layout, seed)


@pytest.mark.parametrize("layout", ["dense", "list"])
@pytest.mark.parametrize("chains", [(1, 2, 1), (1,) * 8, (3, 1)], ids=cid)
def test_chain_linear_causality(chains, layout, seed):
    _linear_causality(chains, 2, 3, 17, layout, seed)


@pytest.mark.parametrize("chains", [(1, 2, 1), (2, 2, 2, 2)], ids=cid)
def test_chain_linear_jacobian_is_block_lower_triangular(chains, gen):
    """d y_i / d x_j is exactly zero for j > i (the backward pass respects causality too)."""
    s = sum(chains)
    in_f, out_f = 2 * s, 3 * s
    weight = chain_blocks(out_f, in_f, chains, gen)
    x = randn(in_f, gen=gen)
    jac = torch.autograd.functional.jacobian(lambda x: ck.chain_linear(x, weight, None, chains), x)
    assert jac.shape == (out_f, in_f)
    in_off, out_off = offsets(in_f, chains), offsets(out_f, chains)
    for i in range(len(chains)):
        rows = jac[out_off[i]: out_off[i + 1]]
        assert torch.equal(rows[:, in_off[i + 1]:], torch.zeros_like(rows[:, in_off[i + 1]:]))
        assert (rows[:, : in_off[i + 1]] != 0).all()


def _linear_elasticity(chains, in_mult, out_mult, layout, seed, lead=(5,)):
    gen = torch.Generator().manual_seed(seed)
    s = sum(chains)
    in_f, out_f = in_mult * s, out_mult * s
    blocks = chain_blocks(out_f, in_f, chains, gen)
    weight = blocks if layout == "list" else blocks_to_dense(blocks, chains, out_f, in_f)
    bias = randn(out_f, gen=gen)
    x = randn(*lead, in_f, gen=gen)
    full = ck.chain_linear(x, weight, bias, chains)
    for k in range(len(chains)):
        part = ck.chain_linear(x, weight, bias, chains, chain=k)
        # The same per-chain products on the same x: bit-identical.
        assert torch.equal(part, full[..., : prefix(out_f, chains, k)]), k


@SETTINGS
@given(chains=chains_st, in_mult=st.integers(1, 3), out_mult=st.integers(1, 3),
       layout=st.sampled_from(["dense", "list"]), seed=st.integers(0, 2**16))
def test_chain_linear_elasticity_random_layouts(chains, in_mult, out_mult, layout, seed):
    _linear_elasticity(chains, in_mult, out_mult, layout, seed)


@pytest.mark.parametrize("layout", ["dense", "list"])
@pytest.mark.parametrize("chains", [(1, 2, 1), (1,) * 8, (2, 3)], ids=cid)
def test_chain_linear_elasticity(chains, layout, seed):
    _linear_elasticity(chains, 2, 3, layout, seed, lead=(2, 17))


# =============================================================================================
# chain_rmsnorm
def _norm_causality(chains, mult, m, seed):
    gen = torch.Generator().manual_seed(seed)
    dim = mult * sum(chains)
    weight = 1 + 0.3 * randn(dim, gen=gen)
    x = randn(m, dim, gen=gen)
    y = ck.chain_rmsnorm(x, weight, chains)
    off = offsets(dim, chains)
    for j in range(len(chains)):
        y2 = ck.chain_rmsnorm(perturb_segment(x, off[j], off[j + 1], gen), weight, chains)
        assert torch.equal(y[..., : off[j]], y2[..., : off[j]]), j
        # Each segment is normalised alone, so later chains do not move either.
        assert torch.equal(y[..., off[j + 1]:], y2[..., off[j + 1]:]), j
        assert not torch.equal(y[..., off[j]: off[j + 1]], y2[..., off[j]: off[j + 1]])


@SETTINGS
@given(chains=chains_st, mult=st.integers(1, 4), m=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_chain_rmsnorm_causality_random(chains, mult, m, seed):
    _norm_causality(chains, mult, m, seed)


@pytest.mark.parametrize("chains", [(1, 2, 1), (2, 2, 2, 2), (1,)], ids=cid)
def test_chain_rmsnorm_causality(chains, seed):
    _norm_causality(chains, 3, 17, seed)


@pytest.mark.parametrize("chains", [(1, 2, 1), (2, 2, 2, 2), (3, 1)], ids=cid)
def test_chain_rmsnorm_elasticity(chains, gen):
    dim = 3 * sum(chains)
    weight = 1 + 0.3 * randn(dim, gen=gen)
    x = randn(2, 17, dim, gen=gen)
    full = ck.chain_rmsnorm(x, weight, chains)
    for k in range(len(chains)):
        p = prefix(dim, chains, k)
        # Segment-local arithmetic on the same values: bit-identical.
        assert torch.equal(ck.chain_rmsnorm(x[..., :p], weight, chains, chain=k), full[..., :p]), k
        assert torch.equal(ck.chain_rmsnorm(x[..., :p].contiguous(), weight, chains), full[..., :p]), k


# =============================================================================================
# chain_attention
# (chains, n_kv_total, kv_sharing, kv_mapping)
ATTN_LAYOUTS = {
    "C1.2.1-MHA": ((1, 2, 1), 4, False, "tile"),
    "C2.2-GQA": ((2, 2), 2, False, "tile"),
    "C2.4.2-GQA": ((2, 4, 2), 4, False, "tile"),
    "C4.4-air-tile": ((4, 4), 2, True, "tile"),
    "C4.4-air-group": ((4, 4), 2, True, "chain_group"),
    "C1.2.1-air": ((1, 2, 1), 1, True, "tile"),
}


def _attn(name, gen, B=2, Sq=7, Sk=7, D=4):
    chains, n_kv, sharing, mapping = ATTN_LAYOUTS[name]
    q = randn(B, Sq, sum(chains), D, gen=gen)
    k = randn(B, Sk, n_kv, D, gen=gen)
    v = randn(B, Sk, n_kv, D, gen=gen)

    def run(q, k, v, **kw):
        return ck.chain_attention(q, k, v, chains, kv_sharing=sharing, kv_mapping=mapping, **kw)

    return chains, n_kv, sharing, q, k, v, run


def _head_bounds(chains):
    return [sum(chains[:i]) for i in range(len(chains) + 1)]


@pytest.mark.parametrize("sq_sk", [(7, 7), (1, 6), (3, 8)], ids=["S7", "decode-Sq1-Sk6", "Sq3-Sk8"])
@pytest.mark.parametrize("name", list(ATTN_LAYOUTS))
def test_chain_attention_causality_query_heads(name, sq_sk, gen):
    chains, n_kv, sharing, q, k, v, run = _attn(name, gen, Sq=sq_sk[0], Sk=sq_sk[1])
    out = run(q, k, v)
    hb = _head_bounds(chains)
    for j in range(len(chains)):
        q2 = q.clone()
        q2[:, :, hb[j]: hb[j + 1]] = randn(*q2[:, :, hb[j]: hb[j + 1]].shape, gen=gen, scale=3.0)
        out2 = run(q2, k, v)
        assert torch.equal(out[:, :, : hb[j]], out2[:, :, : hb[j]]), j
        # Heads are independent: later chains' heads do not move either.
        assert torch.equal(out[:, :, hb[j + 1]:], out2[:, :, hb[j + 1]:]), j
        assert not torch.equal(out[:, :, hb[j]: hb[j + 1]], out2[:, :, hb[j]: hb[j + 1]])


@pytest.mark.parametrize("name", [n for n, l in ATTN_LAYOUTS.items() if not l[2]])
def test_chain_attention_causality_kv_heads_without_sharing(name, gen):
    """Without sharing chain j owns c_j * n_kv / S kv heads; changing them moves no head of a
    chain i < j."""
    chains, n_kv, sharing, q, k, v, run = _attn(name, gen)
    out = run(q, k, v)
    hb = _head_bounds(chains)
    s = sum(chains)
    kvb = [n_kv * b // s for b in hb]
    for j in range(len(chains)):
        for which in ("k", "v"):
            t2 = (k if which == "k" else v).clone()
            t2[:, :, kvb[j]: kvb[j + 1]] += 1.5
            out2 = run(q, t2, v) if which == "k" else run(q, k, t2)
            assert torch.equal(out[:, :, : hb[j]], out2[:, :, : hb[j]]), (which, j)
            assert not torch.equal(out[:, :, hb[j]: hb[j + 1]], out2[:, :, hb[j]: hb[j + 1]])


@pytest.mark.parametrize("sq_sk", [(7, 7), (1, 6)], ids=["S7", "decode-Sq1-Sk6"])
@pytest.mark.parametrize("name", list(ATTN_LAYOUTS))
def test_chain_attention_elasticity(name, sq_sk, gen):
    chains, n_kv, sharing, q, k, v, run = _attn(name, gen, Sq=sq_sk[0], Sk=sq_sk[1])
    full = run(q, k, v)
    s = sum(chains)
    for c in range(len(chains)):
        h = head_prefix(chains, c)
        kv = n_kv if sharing else n_kv * h // s
        part = run(q[:, :, :h], k[:, :, :kv], v[:, :, :kv])
        # Per-head arithmetic on the same values; only the batched head count differs.
        assert torch.equal(part, full[:, :, :h]), c


@pytest.mark.parametrize("name", list(ATTN_LAYOUTS))
def test_chain_attention_mixed_scales_equal_per_sequence_runs(name, gen):
    """Elastic serving: a batch whose sequences carry different scales (seq_chains) gives, for each
    sequence, its own scale's run in the active heads and exact zeros elsewhere."""
    n = len(ATTN_LAYOUTS[name][0])
    chains, n_kv, sharing, q, k, v, run = _attn(name, gen, B=n + 1)
    seq_chains = torch.tensor([b % n for b in range(n + 1)])
    mixed = run(q, k, v, seq_chains=seq_chains)
    s = sum(chains)
    for b in range(n + 1):
        c = int(seq_chains[b])
        h = head_prefix(chains, c)
        kv = n_kv if sharing else n_kv * h // s
        alone = run(q[b:b + 1, :, :h], k[b:b + 1, :, :kv], v[b:b + 1, :, :kv])
        torch.testing.assert_close(mixed[b:b + 1, :, :h], alone, rtol=1e-12, atol=1e-12)  # batch size differs
        assert torch.equal(mixed[b, :, h:], torch.zeros_like(mixed[b, :, h:]))
    assert head_chain(chains)[-1] == n - 1


# =============================================================================================
# multi_chain_cross_entropy
@pytest.mark.parametrize("chains", [(1, 2, 1), (2, 2, 2, 2)], ids=cid)
def test_multi_chain_ce_causality_and_elasticity(chains, gen):
    dim, vocab = 2 * sum(chains), 11
    hidden = randn(17, dim, gen=gen)
    weight = randn(vocab, dim, gen=gen)
    targets = torch.randint(0, vocab, (17,), generator=gen)
    full = ck.multi_chain_cross_entropy(hidden, weight, targets, chains)
    off = offsets(dim, chains)
    for k in range(len(chains)):
        part = ck.multi_chain_cross_entropy(hidden[:, : off[k + 1]], weight, targets, chains)
        assert torch.equal(part, full[: k + 1]), k  # the same logits, built the same way
    for j in range(1, len(chains)):
        h2 = perturb_segment(hidden, off[j], off[j + 1], gen)
        w2 = weight.clone()
        w2[:, off[j]:] += randn(vocab, dim - off[j], gen=gen)  # head columns of chains >= j
        for hh, ww in ((h2, weight), (hidden, w2)):
            changed = ck.multi_chain_cross_entropy(hh, ww, targets, chains)
            assert torch.equal(changed[:j], full[:j]), j
            assert not torch.equal(changed[j], full[j])
