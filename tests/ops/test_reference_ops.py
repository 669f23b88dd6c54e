"""The ``reference`` backend of every op against independent float64 computations (tests/utils.py):
dense masked matmul, explicit per-row RMSNorm, per-head attention loop, per-scale F.cross_entropy.
Forward and backward (gradcheck through the public functions), odd sizes, every elastic scale,
``torch.library.opcheck`` on the registered ops and ``torch.compile(fullgraph=True)``."""
import pytest
import torch
import torch.nn.functional as F

import colm_kernels as ck
from colm_kernels.ops.chain_attention.api import chain_attention_reference
from colm_kernels.ops.chain_linear.api import chain_linear_reference
from colm_kernels.ops.chain_rmsnorm.api import chain_rmsnorm_reference
from colm_kernels.ops.multi_chain_cross_entropy.api import multi_chain_cross_entropy_reference
from utils import (
    F64,
    blocks_to_dense,
    chain_blocks,
    cid,
    dense_to_blocks,
    head_chain,
    head_prefix,
    kv_map,
    lower_mask,
    offsets,
    prefix,
    randn,
    ref_chain_attention,
    ref_chain_linear,
    ref_chain_rmsnorm,
    ref_multi_chain_ce,
    shape_id,
    widths,
)

TOL = dict(rtol=1e-12, atol=1e-12)  # float64 vs float64: only summation order differs


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def scales(chains):
    return list(range(len(chains))) + [None]


# =============================================================================================
# chain_linear
# (chains, in_features, out_features, leading dims of x)
LINEAR_CASES = [
    ((1, 2, 1), 8, 12, (17,)),
    ((1, 2, 1), 8, 12, (1,)),
    ((1,), 5, 7, (17,)),
    ((1,) * 8, 16, 24, (17,)),
    ((2, 3), 10, 15, (2, 3, 5)),
    ((3, 1), 12, 4, ()),
]
LINEAR_IDS = [f"{cid(c)}-K{i}-N{o}-M{shape_id(m)}" for c, i, o, m in LINEAR_CASES]


def make_linear(chains, in_f, out_f, lead, gen, layout, bias_kind, requires_grad=False):
    blocks = chain_blocks(out_f, in_f, chains, gen)
    dense = blocks_to_dense(blocks, chains, out_f, in_f)
    x = randn(*lead, in_f, gen=gen, requires_grad=requires_grad)
    b = randn(out_f, gen=gen)
    if layout == "dense":
        weight = dense.clone().requires_grad_(requires_grad)
    else:
        weight = [w.detach().clone().requires_grad_(requires_grad) for w in blocks]
    if bias_kind == "none":
        bias = None
    elif bias_kind == "dense":
        bias = b.clone().requires_grad_(requires_grad)
    else:
        bias = [t.clone().requires_grad_(requires_grad) for t in b.split(widths(out_f, chains))]
    return x, weight, bias, dense, (None if bias_kind == "none" else b)


@pytest.mark.parametrize("bias_kind", ["nobias", "bias", "biaslist"])
@pytest.mark.parametrize("layout", ["dense", "list"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=LINEAR_IDS)
def test_chain_linear_forward_every_scale(case, layout, bias_kind, gen):
    chains, in_f, out_f, lead = case
    kind = {"nobias": "none", "bias": "dense", "biaslist": "list"}[bias_kind]
    x, weight, bias, dense, b = make_linear(chains, in_f, out_f, lead, gen, layout, kind)
    for k in scales(chains):
        y = ck.chain_linear(x, weight, bias, chains, chain=k)
        expected = ref_chain_linear(x, dense, b, chains, chain=k)
        assert y.shape == (*lead, prefix(out_f, chains, k))
        assert y.dtype == F64
        torch.testing.assert_close(y, expected, **TOL)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=LINEAR_IDS)
def test_chain_linear_dense_and_list_layouts_identical(case, gen):
    chains, in_f, out_f, lead = case
    x, blocks, bias, dense, _ = make_linear(chains, in_f, out_f, lead, gen, "list", "dense",
                                            requires_grad=True)
    dense = dense.clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    for k in scales(chains):
        y_list = ck.chain_linear(x, blocks, bias, chains, chain=k)
        y_dense = ck.chain_linear(x2, dense, bias, chains, chain=k)
        assert torch.equal(y_list, y_dense), k
    gy = torch.randn(*lead, out_f, dtype=F64)
    ck.chain_linear(x, blocks, bias, chains).backward(gy)
    ck.chain_linear(x2, dense, bias, chains).backward(gy)
    assert torch.equal(x.grad, x2.grad)
    for w_block, g_block in zip(blocks, dense_to_blocks(dense.grad, chains)):
        # dW = dy^T @ x lands in a strided view of the dense grad: BLAS may round 1 ulp apart.
        torch.testing.assert_close(w_block.grad, g_block, **TOL)


@pytest.mark.parametrize("layout", ["dense", "list"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=LINEAR_IDS)
def test_chain_linear_backward_matches_dense_masked_autograd(case, layout, gen):
    chains, in_f, out_f, lead = case
    x, weight, bias, dense, b = make_linear(chains, in_f, out_f, lead, gen, layout, "dense",
                                            requires_grad=True)
    gy = randn(*lead, out_f, gen=gen)
    ck.chain_linear(x, weight, bias, chains).backward(gy)

    xr = x.detach().clone().requires_grad_(True)
    wr = dense.clone().requires_grad_(True)
    br = b.clone().requires_grad_(True)
    ref_chain_linear(xr, wr, br, chains).backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(bias.grad, br.grad, **TOL)
    # The reference grad of the masked matmul is already zero on the upper blocks.
    got = weight.grad if layout == "dense" else blocks_to_dense([w.grad for w in weight], chains, out_f, in_f)
    torch.testing.assert_close(got, wr.grad, **TOL)


@pytest.mark.parametrize("bias_kind", ["none", "dense", "list"])
@pytest.mark.parametrize("layout", ["dense", "list"])
@pytest.mark.parametrize("chains", [(1, 2, 1), (1,), (1, 1)], ids=cid)
def test_chain_linear_gradcheck_every_scale(chains, layout, bias_kind, gen):
    in_f, out_f = 2 * sum(chains), sum(chains)
    x, weight, bias, _, _ = make_linear(chains, in_f, out_f, (3,), gen, layout, bias_kind, True)
    w_list = weight if isinstance(weight, list) else [weight]
    b_list = [] if bias is None else (bias if isinstance(bias, list) else [bias])
    n_w = len(w_list)

    for k in scales(chains):
        def fn(x, *params):
            w = list(params[:n_w]) if layout == "list" else params[0]
            rest = params[n_w:]
            bb = None if bias is None else (list(rest) if bias_kind == "list" else rest[0])
            return ck.chain_linear(x, w, bb, chains, chain=k)

        assert torch.autograd.gradcheck(fn, (x, *w_list, *b_list))


@pytest.mark.parametrize("chains", [(1, 2, 1), (2, 2, 2, 2)], ids=cid)
def test_chain_linear_dense_upper_blocks_zero_grad_and_never_read(chains, gen):
    in_f, out_f = 2 * sum(chains), 3 * sum(chains)
    blocks = chain_blocks(out_f, in_f, chains, gen)
    x = randn(5, in_f, gen=gen, requires_grad=True)
    b = randn(out_f, gen=gen)
    mask = lower_mask(out_f, in_f, chains)
    gy = randn(5, out_f, gen=gen)

    w0 = blocks_to_dense(blocks, chains, out_f, in_f, fill=0.0).requires_grad_(True)
    wnan = blocks_to_dense(blocks, chains, out_f, in_f, fill=float("nan")).requires_grad_(True)
    assert torch.isnan(wnan[~mask]).all() and (~mask).any()
    x_nan = x.detach().clone().requires_grad_(True)
    y0 = ck.chain_linear(x, w0, b, chains)
    ynan = ck.chain_linear(x_nan, wnan, b, chains)
    assert torch.equal(y0, ynan)
    y0.backward(gy)
    ynan.backward(gy)
    assert torch.equal(x.grad, x_nan.grad)
    for w in (w0, wnan):
        assert torch.equal(w.grad[~mask], torch.zeros_like(w.grad[~mask]))
        assert (w.grad[mask] != 0).all()
    assert torch.equal(w0.grad, wnan.grad)


@pytest.mark.parametrize("layout", ["dense", "list"])
def test_chain_linear_x_wider_than_needed(layout, gen):
    chains, in_f, out_f = (1, 2, 1), 8, 12
    x, weight, bias, dense, b = make_linear(chains, in_f, out_f, (7,), gen, layout, "dense")
    wide = torch.cat([x, randn(7, 5, gen=gen)], dim=-1).requires_grad_(True)
    for k in scales(chains):
        y = ck.chain_linear(wide, weight, bias, chains, chain=k)
        torch.testing.assert_close(y, ref_chain_linear(x, dense, b, chains, chain=k), **TOL)
        # Same values, but a different row stride of x: BLAS may round differently (1 ulp).
        torch.testing.assert_close(y, ck.chain_linear(x, weight, bias, chains, chain=k), **TOL)
    ck.chain_linear(wide, weight, bias, chains).sum().backward()
    assert torch.equal(wide.grad[:, in_f:], torch.zeros(7, 5, dtype=F64))
    # At chain=k, x only needs the P_(k+1) input columns; columns past it get zero gradient.
    for k in range(len(chains)):
        p_in = prefix(in_f, chains, k)
        narrow = x[:, :p_in].detach().clone().requires_grad_(True)
        y = ck.chain_linear(narrow, weight, bias, chains, chain=k)
        torch.testing.assert_close(y, ref_chain_linear(x, dense, b, chains, chain=k), **TOL)
        xx = x.detach().clone().requires_grad_(True)
        ck.chain_linear(xx, weight, bias, chains, chain=k).sum().backward()
        assert torch.equal(xx.grad[:, p_in:], torch.zeros(7, in_f - p_in, dtype=F64))


def test_chain_linear_strided_input(gen):
    chains, in_f, out_f = (1, 2, 1), 8, 12
    x, weight, bias, dense, b = make_linear(chains, in_f, out_f, (9,), gen, "list", "dense")
    xt = x.T.contiguous().T  # same values, column-major
    assert not xt.is_contiguous()
    y = ck.chain_linear(xt, weight, bias, chains)
    torch.testing.assert_close(y, ref_chain_linear(x, dense, b, chains), **TOL)


@pytest.mark.parametrize("frozen", [0, 1, 2])
def test_chain_linear_frozen_block_gets_no_grad(frozen, gen):
    chains, in_f, out_f = (1, 2, 1), 8, 12
    x, weight, bias, dense, b = make_linear(chains, in_f, out_f, (6,), gen, "list", "list", True)
    weight[frozen].requires_grad_(False)
    bias[frozen].requires_grad_(False)
    gy = randn(6, out_f, gen=gen)
    ck.chain_linear(x, weight, bias, chains).backward(gy)

    wr = dense.clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref_chain_linear(xr, wr, b, chains).backward(gy)
    ref_blocks = dense_to_blocks(wr.grad, chains)
    for i in range(len(chains)):
        if i == frozen:
            assert weight[i].grad is None and bias[i].grad is None
        else:
            torch.testing.assert_close(weight[i].grad, ref_blocks[i], **TOL)
    torch.testing.assert_close(x.grad, xr.grad, **TOL)


# =============================================================================================
# chain_rmsnorm
# (chains, dim, leading dims)
NORM_CASES = [
    ((1, 2, 1), 8, (17,)),
    ((1, 2, 1), 8, (1,)),
    ((1,), 7, (17,)),
    ((2, 2, 2, 2), 12, (2, 3, 5)),
    ((3, 1), 12, ()),
]
NORM_IDS = [f"{cid(c)}-D{d}-M{shape_id(m)}" for c, d, m in NORM_CASES]


@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("case", NORM_CASES, ids=NORM_IDS)
def test_chain_rmsnorm_forward_every_scale(case, eps, gen):
    chains, dim, lead = case
    weight = 1 + 0.3 * randn(dim, gen=gen)
    x_full = randn(*lead, dim, gen=gen, scale=2.0)
    for k in scales(chains):
        x = x_full[..., : prefix(dim, chains, k)]
        expected = ref_chain_rmsnorm(x, weight, chains, eps)
        y_explicit = ck.chain_rmsnorm(x, weight, chains, eps=eps, chain=k)
        y_inferred = ck.chain_rmsnorm(x, weight, chains, eps=eps)  # scale read off the width
        assert y_explicit.shape == x.shape and y_explicit.dtype == F64
        torch.testing.assert_close(y_explicit, expected, **TOL)
        assert torch.equal(y_explicit, y_inferred)


@pytest.mark.parametrize("chains", [(1, 2, 1), (1,), (2, 1)], ids=cid)
def test_chain_rmsnorm_gradcheck_every_scale(chains, gen):
    dim = 2 * sum(chains)
    weight = (1 + 0.3 * randn(dim, gen=gen)).requires_grad_(True)
    for k in scales(chains):
        x = randn(3, prefix(dim, chains, k), gen=gen, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w: ck.chain_rmsnorm(x, w, chains, eps=1e-5, chain=k), (x, weight))


@pytest.mark.parametrize("case", NORM_CASES, ids=NORM_IDS)
def test_chain_rmsnorm_backward_matches_reference_autograd(case, gen):
    chains, dim, lead = case
    for k in range(len(chains)):
        width = prefix(dim, chains, k)
        weight = (1 + 0.3 * randn(dim, gen=gen)).requires_grad_(True)
        x = randn(*lead, width, gen=gen, requires_grad=True)
        gy = randn(*lead, width, gen=gen)
        ck.chain_rmsnorm(x, weight, chains, chain=k).backward(gy)
        xr = x.detach().clone().requires_grad_(True)
        wr = weight.detach().clone().requires_grad_(True)
        # Vectorised float64 formula (the explicit loop is not differentiable through float()).
        bounds = offsets(dim, chains)[: k + 2]
        segs = [xr[..., a:b] / torch.sqrt(xr[..., a:b].pow(2).mean(-1, keepdim=True) + 1e-5)
                for a, b in zip(bounds[:-1], bounds[1:])]
        (torch.cat(segs, -1) * wr[:width]).backward(gy)
        torch.testing.assert_close(x.grad, xr.grad, **TOL)
        torch.testing.assert_close(weight.grad, wr.grad, **TOL)
        # Gain entries of inactive chains are never read: exactly zero gradient.
        assert torch.equal(weight.grad[width:], torch.zeros(dim - width, dtype=F64))


def test_chain_rmsnorm_strided_input(gen):
    chains, dim = (1, 2, 1), 8
    weight = 1 + 0.3 * randn(dim, gen=gen)
    x = randn(dim, 9, gen=gen).T  # non-contiguous (9, dim)
    assert not x.is_contiguous()
    torch.testing.assert_close(ck.chain_rmsnorm(x, weight, chains), ref_chain_rmsnorm(x, weight, chains, 1e-5), **TOL)


# =============================================================================================
# chain_attention
# (B, Sq, Sk, chains, n_kv_total, kv_sharing, kv_mapping, head_dim)
ATTN_CASES = {
    "B2-S9-C1.2.1-MHA-D8": (2, 9, 9, (1, 2, 1), 4, False, "tile", 8),
    "B2-S7-C2.2-GQA-D5": (2, 7, 7, (2, 2), 2, False, "tile", 5),
    "B1-S7-C4.4-air-tile-D4": (1, 7, 7, (4, 4), 2, True, "tile", 4),
    "B1-S7-C4.4-air-group-D4": (1, 7, 7, (4, 4), 2, True, "chain_group", 4),
    "B2-S6-C1.2.1-air-D6": (2, 6, 6, (1, 2, 1), 1, True, "tile", 6),
    "B3-S5-C1-D8": (3, 5, 5, (1,), 1, False, "tile", 8),
    "B2-Sq1-Sk7-C2.2-GQA-decode": (2, 1, 7, (2, 2), 2, False, "tile", 8),
    "B1-Sq3-Sk8-C2.4.2-air-group": (1, 3, 8, (2, 4, 2), 2, True, "chain_group", 4),
    "B2-Sq5-Sk3-C2.2-rows-see-nothing": (2, 5, 3, (2, 2), 4, False, "tile", 4),
    "B1-Sq17-Sk17-C2.1-D3": (1, 17, 17, (2, 1), 3, False, "tile", 3),
}


def attn_inputs(case, k, gen, requires_grad=False):
    B, Sq, Sk, chains, n_kv, sharing, mapping, D = case
    n_q = head_prefix(chains, k)
    kv_here = n_kv if sharing else n_kv * n_q // sum(chains)
    q = randn(B, Sq, n_q, D, gen=gen, requires_grad=requires_grad)
    kk = randn(B, Sk, kv_here, D, gen=gen, requires_grad=requires_grad)
    v = randn(B, Sk, kv_here, D, gen=gen, requires_grad=requires_grad)
    return q, kk, v, kv_map(chains, n_q, kv_here, sharing, mapping)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_chain_attention_forward_every_scale(name, causal, gen):
    case = ATTN_CASES[name]
    B, Sq, Sk, chains, n_kv, sharing, mapping, D = case
    for k in range(len(chains)):
        q, kk, v, mp = attn_inputs(case, k, gen)
        out = ck.chain_attention(q, kk, v, chains, causal=causal, kv_sharing=sharing, kv_mapping=mapping)
        assert out.shape == q.shape and out.dtype == F64
        torch.testing.assert_close(out, ref_chain_attention(q, kk, v, mp, causal=causal), **TOL)
        if causal and Sq > Sk:  # queries that see no key: exact zeros, not NaN
            assert torch.equal(out[:, : Sq - Sk], torch.zeros_like(out[:, : Sq - Sk]))
            assert not torch.isnan(out).any()


@pytest.mark.parametrize("name", ["B2-S7-C2.2-GQA-D5", "B1-S7-C4.4-air-tile-D4",
                                  "B1-Sq3-Sk8-C2.4.2-air-group", "B2-Sq5-Sk3-C2.2-rows-see-nothing"])
def test_chain_attention_backward_matches_reference_autograd(name, gen):
    case = ATTN_CASES[name]
    chains, sharing, mapping = case[3], case[5], case[6]
    k = len(chains) - 1
    q, kk, v, mp = attn_inputs(case, k, gen, requires_grad=True)
    gy = randn(*q.shape, gen=gen)
    ck.chain_attention(q, kk, v, chains, kv_sharing=sharing, kv_mapping=mapping).backward(gy)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, kk, v)]
    ref_chain_attention(*leaves, mp).backward(gy)
    for got, ref in zip((q, kk, v), leaves):
        torch.testing.assert_close(got.grad, ref.grad, **TOL)


@pytest.mark.parametrize("case", [
    (1, 3, 3, (1, 2), 3, False, "tile", 2),
    (1, 2, 4, (2, 2), 2, True, "chain_group", 2),
    (2, 3, 2, (1, 1), 2, False, "tile", 2),
], ids=["C1.2-MHA", "C2.2-air-group-decode", "C1.1-Sq3-Sk2"])
def test_chain_attention_gradcheck(case, gen):
    chains, sharing, mapping = case[3], case[5], case[6]
    for k in range(len(chains)):
        q, kk, v, _ = attn_inputs(case, k, gen, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda q, kk, v: ck.chain_attention(q, kk, v, chains, kv_sharing=sharing, kv_mapping=mapping),
            (q, kk, v))


def test_chain_attention_kv_mappings_really_differ(gen):
    """(4, 4) with 2 shared kv heads: tile reads 0,1,0,1,... and chain_group 0,0,1,1,..."""
    case = ATTN_CASES["B1-S7-C4.4-air-tile-D4"]
    q, kk, v, _ = attn_inputs(case, 1, gen)
    tile = ck.chain_attention(q, kk, v, (4, 4), kv_sharing=True, kv_mapping="tile")
    group = ck.chain_attention(q, kk, v, (4, 4), kv_sharing=True, kv_mapping="chain_group")
    torch.testing.assert_close(tile, ref_chain_attention(q, kk, v, [0, 1, 0, 1, 0, 1, 0, 1]), **TOL)
    torch.testing.assert_close(group, ref_chain_attention(q, kk, v, [0, 0, 1, 1, 0, 0, 1, 1]), **TOL)
    assert (tile - group).abs().max() > 1e-3
    # Head 0 reads kv head 0 under both mappings.
    assert torch.equal(tile[:, :, 0], group[:, :, 0])


@pytest.mark.parametrize("scale", [0.37, 2.0])
def test_chain_attention_softmax_scale(scale, gen):
    case = ATTN_CASES["B2-S7-C2.2-GQA-D5"]
    q, kk, v, mp = attn_inputs(case, 1, gen)
    out = ck.chain_attention(q, kk, v, (2, 2), softmax_scale=scale)
    torch.testing.assert_close(out, ref_chain_attention(q, kk, v, mp, softmax_scale=scale), **TOL)
    default = ck.chain_attention(q, kk, v, (2, 2))
    assert (out - default).abs().max() > 1e-6


@pytest.mark.parametrize("name,seq_chains,k", [
    ("B2-S9-C1.2.1-MHA-D8", [0, 2], 2),
    ("B2-S6-C1.2.1-air-D6", [1, 0], 2),
    ("B2-S6-C1.2.1-air-D6", [1, 1], 1),
    ("B2-Sq1-Sk7-C2.2-GQA-decode", [1, 0], 1),
    ("B1-S7-C4.4-air-group-D4", [0], 1),
], ids=["MHA-0.2", "air-1.0", "air-scale1-1.1", "decode-1.0", "air-group-0"])
def test_chain_attention_seq_chains(name, seq_chains, k, gen):
    case = ATTN_CASES[name]
    chains, sharing, mapping = case[3], case[5], case[6]
    q, kk, v, mp = attn_inputs(case, k, gen, requires_grad=True)
    sc = torch.tensor(seq_chains)
    hc = torch.tensor(head_chain(chains)[: q.shape[2]])
    active = hc[None, :] <= sc[:, None]  # (B, H)
    out = ck.chain_attention(q, kk, v, chains, kv_sharing=sharing, kv_mapping=mapping, seq_chains=sc)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, kk, v)]
    ref = ref_chain_attention(*leaves, mp, active=active)
    torch.testing.assert_close(out, ref, **TOL)
    inactive = ~active
    assert torch.equal(out.permute(0, 2, 1, 3)[inactive], torch.zeros_like(out.permute(0, 2, 1, 3)[inactive]))
    # Without seq_chains the same heads are nonzero: the zeros come from seq_chains.
    plain = ck.chain_attention(q, kk, v, chains, kv_sharing=sharing, kv_mapping=mapping)
    assert torch.equal(out.permute(0, 2, 1, 3)[active], plain.permute(0, 2, 1, 3)[active])
    gy = randn(*q.shape, gen=gen)
    out.backward(gy)
    ref.backward(gy)
    for got, r in zip((q, kk, v), leaves):
        torch.testing.assert_close(got.grad, r.grad, **TOL)
    g = q.grad.permute(0, 2, 1, 3)[inactive]
    assert torch.equal(g, torch.zeros_like(g))


def test_chain_attention_seq_chains_gradcheck(gen):
    case = (2, 3, 3, (1, 2), 3, False, "tile", 2)
    q, kk, v, _ = attn_inputs(case, 1, gen, requires_grad=True)
    sc = torch.tensor([0, 1])
    assert torch.autograd.gradcheck(
        lambda q, kk, v: ck.chain_attention(q, kk, v, (1, 2), seq_chains=sc), (q, kk, v))


# =============================================================================================
# multi_chain_cross_entropy
# (chains, dim, vocab, leading dims)
CE_CASES = [
    ((1, 2, 1), 8, 11, (17,)),
    ((1, 2, 1), 8, 11, (1,)),
    ((1,), 5, 7, (9,)),
    ((2, 2, 2, 2), 12, 13, (2, 5)),
]
CE_IDS = [f"{cid(c)}-D{d}-V{v}-M{shape_id(m)}" for c, d, v, m in CE_CASES]


def ce_inputs(case, gen, width=None, ignore_index=-100, requires_grad=False):
    chains, dim, vocab, lead = case
    hidden = randn(*lead, dim if width is None else width, gen=gen, requires_grad=requires_grad)
    weight = randn(vocab, dim, gen=gen, requires_grad=requires_grad)
    targets = torch.randint(0, vocab, lead, generator=gen)
    flat = targets.view(-1)
    if flat.numel() > 2:
        flat[::3] = ignore_index  # some ignored, never all
    return hidden, weight, targets


@pytest.mark.parametrize("ignore_index", [-100, 3], ids=["ign-100", "ign3"])
@pytest.mark.parametrize("case", CE_CASES, ids=CE_IDS)
def test_multi_chain_ce_forward_every_prefix(case, ignore_index, gen):
    chains, dim, vocab, lead = case
    hidden, weight, targets = ce_inputs(case, gen, ignore_index=ignore_index)
    for k in range(len(chains)):
        h = hidden[..., : prefix(dim, chains, k)]
        losses = ck.multi_chain_cross_entropy(h, weight, targets, chains, ignore_index=ignore_index)
        assert losses.shape == (k + 1,) and losses.dtype == F64
        expected = ref_multi_chain_ce(h, weight, targets, chains, ignore_index)
        torch.testing.assert_close(losses, expected, **TOL)
        # Equals plain per-scale cross-entropy on the logits built by hand.
        for j in range(k + 1):
            p = prefix(dim, chains, j)
            logits = (hidden[..., :p] @ weight[:, :p].T).reshape(-1, vocab)
            plain = F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)
            torch.testing.assert_close(losses[j], plain, **TOL)


def test_multi_chain_ce_ignore_index_really_ignores(gen):
    case = CE_CASES[0]
    hidden, weight, targets = ce_inputs(case, gen)
    keep = targets != -100
    assert (~keep).any()
    full = ck.multi_chain_cross_entropy(hidden, weight, targets, case[0])
    kept = ck.multi_chain_cross_entropy(hidden[keep], weight, targets[keep], case[0])
    torch.testing.assert_close(full, kept, **TOL)


@pytest.mark.parametrize("case", CE_CASES[:3] + [((2, 1), 6, 5, (2, 3))], ids=CE_IDS[:3] + ["C2.1-D6-V5-M2x3"])
def test_multi_chain_ce_gradcheck(case, gen):
    chains, dim = case[0], case[1]
    hidden, weight, targets = ce_inputs(case, gen, requires_grad=True)
    for k in range(len(chains)):
        h = hidden[..., : prefix(dim, chains, k)].detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda h, w: ck.multi_chain_cross_entropy(h, w, targets, chains), (h, weight))


def test_multi_chain_ce_backward_matches_per_scale_ce(gen):
    case = CE_CASES[3]
    chains = case[0]
    hidden, weight, targets = ce_inputs(case, gen, requires_grad=True)
    coef = torch.tensor([0.5, 1.0, -2.0, 3.0], dtype=F64)
    (ck.multi_chain_cross_entropy(hidden, weight, targets, chains) * coef).sum().backward()
    hr = hidden.detach().clone().requires_grad_(True)
    wr = weight.detach().clone().requires_grad_(True)
    (ref_multi_chain_ce(hr, wr, targets, chains) * coef).sum().backward()
    torch.testing.assert_close(hidden.grad, hr.grad, **TOL)
    torch.testing.assert_close(weight.grad, wr.grad, **TOL)


# =============================================================================================
# registered custom ops: opcheck
def _opcheck(op, args):
    torch.library.opcheck(op, args)  # raises on failure


def test_opcheck_chain_linear_reference(gen):
    chains, in_f, out_f = (1, 2, 1), 8, 12
    x = randn(5, in_f, gen=gen, requires_grad=True)
    ws = chain_blocks(out_f, in_f, chains, gen, requires_grad=True)
    bs = [randn(d, gen=gen, requires_grad=True) for d in widths(out_f, chains)]
    _opcheck(chain_linear_reference, (x, ws, bs, None))
    _opcheck(chain_linear_reference, (x, ws[:2], [], None))  # a prefix of chains, no bias
    _opcheck(chain_linear_reference, (x, ws, bs, torch.tensor([2, 0, 1, 1, 2], dtype=torch.int32)))
    assert torch.ops.colm_kernels.chain_linear_reference.default is not None


def test_opcheck_chain_rmsnorm_reference(gen):
    x = randn(5, 8, gen=gen, requires_grad=True)
    w = (1 + 0.3 * randn(8, gen=gen)).requires_grad_(True)
    _opcheck(chain_rmsnorm_reference, (x, w, [0, 2, 6, 8], 1e-5, None))
    _opcheck(chain_rmsnorm_reference, (x, w, [0, 2, 6, 8], 1e-5, torch.tensor([2, 0, 1, 1, 2], dtype=torch.int32)))
    assert torch.ops.colm_kernels.chain_rmsnorm_reference.default is not None


def test_opcheck_chain_attention_reference(gen):
    q = randn(2, 3, 4, 4, gen=gen, requires_grad=True)
    k = randn(2, 5, 2, 4, gen=gen, requires_grad=True)
    v = randn(2, 5, 2, 4, gen=gen, requires_grad=True)
    _opcheck(chain_attention_reference, (q, k, v, [0, 0, 1, 1], [0, 1, 1, 2], True, None, 0.5))
    _opcheck(chain_attention_reference,
             (q, k, v, [0, 1, 0, 1], [0, 1, 1, 2], True, torch.tensor([2, 1]), 0.5))
    assert torch.ops.colm_kernels.chain_attention_reference.default is not None


def test_opcheck_multi_chain_cross_entropy_reference(gen):
    h = randn(7, 8, gen=gen, requires_grad=True)
    w = randn(5, 8, gen=gen, requires_grad=True)
    t = torch.randint(0, 5, (7,), generator=gen)
    t[2] = -100
    _opcheck(multi_chain_cross_entropy_reference, (h, w, t, [0, 2, 6, 8], -100))
    assert torch.ops.colm_kernels.multi_chain_cross_entropy_reference.default is not None


# =============================================================================================
# torch.compile(fullgraph=True) of each public function equals eager, forward and backward
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_matches_eager(fn, inputs):
    eager_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    comp_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    expected = fn(*eager_in)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*comp_in)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    gy = torch.randn_like(expected)
    expected.backward(gy)
    got.backward(gy)
    for a, b in zip(comp_in, eager_in):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_compile_chain_linear(gen, fresh_dynamo):
    chains = (1, 2, 1)
    x = randn(5, 8, gen=gen, requires_grad=True)
    w = blocks_to_dense(chain_blocks(12, 8, chains, gen), chains, 12, 8).requires_grad_(True)
    b = randn(12, gen=gen, requires_grad=True)
    _compiled_matches_eager(lambda x, w, b: ck.chain_linear(x, w, b, chains, chain=1), [x, w, b])


def test_compile_chain_rmsnorm(gen, fresh_dynamo):
    x = randn(5, 6, gen=gen, requires_grad=True)
    w = (1 + 0.3 * randn(8, gen=gen)).requires_grad_(True)
    _compiled_matches_eager(lambda x, w: ck.chain_rmsnorm(x, w, (1, 2, 1), chain=1), [x, w])


def test_compile_chain_attention(gen, fresh_dynamo):
    q = randn(2, 3, 4, 4, gen=gen, requires_grad=True)
    k = randn(2, 5, 2, 4, gen=gen, requires_grad=True)
    v = randn(2, 5, 2, 4, gen=gen, requires_grad=True)
    sc = torch.tensor([1, 0])
    _compiled_matches_eager(
        lambda q, k, v: ck.chain_attention(q, k, v, (2, 2), kv_sharing=True, kv_mapping="tile",
                                           seq_chains=sc), [q, k, v])


def test_compile_multi_chain_cross_entropy(gen, fresh_dynamo):
    h = randn(7, 8, gen=gen, requires_grad=True)
    w = randn(5, 8, gen=gen, requires_grad=True)
    t = torch.randint(0, 5, (7,), generator=gen)
    _compiled_matches_eager(lambda h, w: ck.multi_chain_cross_entropy(h, w, t, (1, 2, 1)), [h, w])


# =============================================================================================
# dtypes, layouts and sizes beyond the float64 happy path
LOW = {"f32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 3e-2)}


@pytest.mark.parametrize("dt", list(LOW))
def test_low_precision_inputs_keep_dtype_and_stay_close(dt, gen):
    """Outputs come back in the input dtype (losses in float32) and within that dtype's rounding
    of the float64 result computed from the same (rounded) inputs."""
    dtype, tol = LOW[dt]
    chains = (1, 2, 1)
    x = randn(9, 8, gen=gen).to(dtype)
    blocks = [w.to(dtype) for w in chain_blocks(12, 8, chains, gen)]
    y = ck.chain_linear(x, blocks, None, chains)
    assert y.dtype == dtype
    dense = blocks_to_dense([w.double() for w in blocks], chains, 12, 8)
    torch.testing.assert_close(y.double(), ref_chain_linear(x.double(), dense, None, chains), rtol=tol, atol=tol)

    g = (1 + 0.3 * randn(8, gen=gen)).to(dtype)
    y = ck.chain_rmsnorm(x, g, chains)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref_chain_rmsnorm(x.double(), g.double(), chains, 1e-5), rtol=tol, atol=tol)

    q, k, v = (randn(2, 5, 4, 4, gen=gen).to(dtype) for _ in range(3))
    out = ck.chain_attention(q, k, v, chains)
    assert out.dtype == dtype
    ref = ref_chain_attention(q.double(), k.double(), v.double(), [0, 1, 2, 3])
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)

    w = randn(7, 8, gen=gen).to(dtype)
    t = torch.randint(0, 7, (9,), generator=gen)
    losses = ck.multi_chain_cross_entropy(x, w, t, chains)
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), ref_multi_chain_ce(x.double(), w.double(), t, chains),
                               rtol=1e-5, atol=1e-5)  # float32 math on the same rounded inputs


def test_chain_linear_column_major_dense_weight(gen):
    chains = (1, 2, 1)
    dense = blocks_to_dense(chain_blocks(12, 8, chains, gen), chains, 12, 8)
    col_major = dense.T.contiguous().T
    assert col_major.stride(-1) != 1
    x = randn(5, 8, gen=gen)
    for k in scales(chains):
        torch.testing.assert_close(ck.chain_linear(x, col_major, None, chains, chain=k),
                                   ref_chain_linear(x, dense, None, chains, chain=k), **TOL)


def test_chain_linear_zero_rows(gen):
    chains = (1, 2, 1)
    x = torch.zeros(0, 8, dtype=F64, requires_grad=True)
    w = blocks_to_dense(chain_blocks(12, 8, chains, gen), chains, 12, 8).requires_grad_(True)
    y = ck.chain_linear(x, w, None, chains)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("tdtype", [torch.int32, torch.int16, torch.uint8], ids=["int32", "int16", "uint8"])
def test_multi_chain_ce_accepts_any_integer_targets(tdtype, gen):
    """The API accepts any integer ``targets`` (it rejects only non-integer ones), so a narrower
    integer dtype must give the same losses as int64."""
    hidden, weight, targets = ce_inputs(((1, 2, 1), 8, 11, (6,)), gen)
    targets = targets.clamp(min=0)  # no ignore_index: uint8 cannot hold -100
    expected = ck.multi_chain_cross_entropy(hidden, weight, targets, (1, 2, 1))
    got = ck.multi_chain_cross_entropy(hidden, weight, targets.to(tdtype), (1, 2, 1))
    assert torch.equal(got, expected)
