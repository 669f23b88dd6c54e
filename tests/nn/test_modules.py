"""``colm_kernels.nn`` modules: state-dict keys and shapes, strict loading of checkpoints written by
paper-style modules built here (Algorithm 1's ``mlps`` ModuleList of ``nn.Linear(P_i_in, d_i_out)``),
and forward(x, chain=k) equal to the paper-style forward at every scale."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import colm_kernels as ck
from colm_kernels.models import CoLMConfig
from colm_kernels.nn import (
    ChainAttention,
    ChainFeedForward,
    ChainLinear,
    ChainRMSNorm,
    ChainTransformerBlock,
    KVCache,
)
from utils import F64, cid, offsets, randn, widths

TOL = dict(rtol=1e-12, atol=1e-12)  # float64; the paper modules use other (exact-in-math) kernels


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1 and not isinstance(module, PaperChainLinear):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=F64))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) / math.sqrt(p.shape[-1]))
    return module


def n_scales(chains):
    return list(range(len(chains))) + [None]


def last(chains, k):
    return len(chains) - 1 if k is None else k


# =============================================================================================
# Paper-style modules (Algorithms 1-3), written here without colm_kernels
class PaperChainLinear(nn.Module):
    def __init__(self, in_f, out_f, chains, bias=True):
        super().__init__()
        self.chains = chains
        self.p_in = offsets(in_f, chains)[1:]
        self.mlps = nn.ModuleList(nn.Linear(p, d, bias=bias) for p, d in zip(self.p_in, widths(out_f, chains)))

    def forward(self, x, chain=None):
        k = last(self.chains, chain)
        return torch.cat([self.mlps[i](x[..., : self.p_in[i]]) for i in range(k + 1)], dim=-1)


class PaperRMSNorm(nn.Module):
    def __init__(self, dim, chains, eps=1e-5):
        super().__init__()
        self.bounds, self.eps = offsets(dim, chains), eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, chain=None):
        segs = []
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            if a >= x.shape[-1]:
                break
            s = x[..., a:b]
            segs.append(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight[a:b])
        return torch.cat(segs, dim=-1)


class PaperFeedForward(nn.Module):
    def __init__(self, dim, hidden, chains):
        super().__init__()
        self.w1 = PaperChainLinear(dim, hidden, chains, bias=False)
        self.w2 = PaperChainLinear(hidden, dim, chains, bias=False)
        self.w3 = PaperChainLinear(dim, hidden, chains, bias=False)

    def forward(self, x, chain=None):
        return self.w2(F.silu(self.w1(x, chain)) * self.w3(x, chain), chain)


def meta_rope(x, start, theta):
    """Meta's complex ``precompute_freqs_cis`` RoPE on interleaved pairs, in float64."""
    B, S, H, hd = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=F64) / hd))
    angles = torch.outer(torch.arange(start, start + S, dtype=F64), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.reshape(B, S, H, hd // 2, 2).contiguous())
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)


class PaperAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv, chains, kv_sharing=False, kv_mapping="tile", theta=10000.0):
        super().__init__()
        self.chains, self.n_kv, self.hd = chains, n_kv, dim // n_heads
        self.sharing, self.mapping, self.theta = kv_sharing, kv_mapping, theta
        self.wq = PaperChainLinear(dim, dim, chains, bias=False)
        self.wo = PaperChainLinear(dim, dim, chains, bias=False)
        kv_dim = n_kv * self.hd
        if kv_sharing:
            self.p1 = offsets(dim, chains)[1]
            self.wk = nn.Linear(self.p1, kv_dim, bias=False)
            self.wv = nn.Linear(self.p1, kv_dim, bias=False)
        else:
            self.wk = PaperChainLinear(dim, kv_dim, chains, bias=False)
            self.wv = PaperChainLinear(dim, kv_dim, chains, bias=False)

    def forward(self, x, chain=None):
        k = last(self.chains, chain)
        B, S, _ = x.shape
        q = self.wq(x, k).view(B, S, -1, self.hd)
        if self.sharing:
            keys, vals = self.wk(x[..., : self.p1]), self.wv(x[..., : self.p1])
        else:
            keys, vals = self.wk(x, k), self.wv(x, k)
        keys, vals = keys.view(B, S, -1, self.hd), vals.view(B, S, -1, self.hd)
        q, keys = meta_rope(q, 0, self.theta), meta_rope(keys, 0, self.theta)
        n_q = q.shape[2]
        if not self.sharing:
            keys = keys.repeat_interleave(n_q // keys.shape[2], dim=2)
            vals = vals.repeat_interleave(n_q // vals.shape[2], dim=2)
        elif self.mapping == "tile":  # Algorithm 3: k.repeat(1, 1, n_rep, 1)
            keys, vals = keys.repeat(1, 1, n_q // self.n_kv, 1), vals.repeat(1, 1, n_q // self.n_kv, 1)
        else:
            active = self.chains[: k + 1]
            keys = torch.cat([keys.repeat_interleave(c // self.n_kv, dim=2) for c in active], dim=2)
            vals = torch.cat([vals.repeat_interleave(c // self.n_kv, dim=2) for c in active], dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1), k)


class PaperBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg.chains
        self.attention = PaperAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, c, cfg.kv_sharing,
                                        cfg.kv_mapping, cfg.rope_theta)
        self.attention_norm = PaperRMSNorm(cfg.dim, c, cfg.norm_eps)
        self.feed_forward = PaperFeedForward(cfg.dim, cfg.ffn_hidden_dim, c)
        self.ffn_norm = PaperRMSNorm(cfg.dim, c, cfg.norm_eps)

    def forward(self, x, chain=None):
        h = x + self.attention(self.attention_norm(x, chain), chain)
        return h + self.feed_forward(self.ffn_norm(h, chain), chain)


def load_from_paper(ours, paper):
    """Write a checkpoint with the paper module, load it strict into ours; keys/shapes must agree."""
    state = paper.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in state.items()}
    ours.load_state_dict(state, strict=True)
    return ours


def check_grads_equal(ours, paper):
    mine = dict(ours.named_parameters())
    for name, p in paper.named_parameters():
        if p.grad is None:
            assert mine[name].grad is None or torch.equal(mine[name].grad, torch.zeros_like(p)), name
        else:
            torch.testing.assert_close(mine[name].grad, p.grad, **TOL, msg=name)


# =============================================================================================
# ChainLinear
LINEAR = [((1, 2, 1), 8, 12), ((1,) * 8, 16, 8), ((3,), 5, 7), ((2, 3), 10, 5)]
LINEAR_IDS = [f"{cid(c)}-K{i}-N{o}" for c, i, o in LINEAR]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", LINEAR, ids=LINEAR_IDS)
def test_chain_linear_keys_and_shapes(case, bias):
    chains, in_f, out_f = case
    sd = ChainLinear(in_f, out_f, chains, bias=bias).state_dict()
    p_in, d_out = offsets(in_f, chains)[1:], widths(out_f, chains)
    expected = {f"mlps.{i}.weight": (d_out[i], p_in[i]) for i in range(len(chains))}
    if bias:
        expected.update({f"mlps.{i}.bias": (d_out[i],) for i in range(len(chains))})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", LINEAR, ids=LINEAR_IDS)
def test_chain_linear_loads_paper_checkpoint_and_matches(case, bias, gen):
    chains, in_f, out_f = case
    paper = randomize(PaperChainLinear(in_f, out_f, chains, bias).to(F64), gen)
    ours = load_from_paper(ChainLinear(in_f, out_f, chains, bias=bias).to(F64), paper)
    x = randn(2, 7, in_f + 3, gen=gen)  # wider than needed: both slice
    for k in n_scales(chains):
        torch.testing.assert_close(ours(x, chain=k), paper(x, chain=k), **TOL)
    gy = randn(2, 7, out_f, gen=gen)
    ours(x).backward(gy)
    paper(x).backward(gy)
    check_grads_equal(ours, paper)


def test_chain_linear_frozen_chain_gets_no_grad(gen):
    ours = ChainLinear(8, 12, (1, 2, 1)).to(F64)
    ours.mlps[0].requires_grad_(False)
    x = randn(4, 8, gen=gen, requires_grad=True)
    ours(x).sum().backward()
    assert ours.mlps[0].weight.grad is None and ours.mlps[0].bias.grad is None
    assert ours.mlps[1].weight.grad is not None and x.grad is not None


# =============================================================================================
# ChainRMSNorm
@pytest.mark.parametrize("chains,dim", [((1, 2, 1), 8), ((2, 2, 2, 2), 12), ((1,), 7)], ids=["C1.2.1", "C2.2.2.2", "C1"])
def test_chain_rmsnorm_keys_load_and_forward(chains, dim, gen):
    assert {k: tuple(v.shape) for k, v in ChainRMSNorm(dim, chains).state_dict().items()} == {"weight": (dim,)}
    paper = randomize(PaperRMSNorm(dim, chains, 1e-5).to(F64), gen)
    ours = load_from_paper(ChainRMSNorm(dim, chains, eps=1e-5).to(F64), paper)
    x_full = randn(3, 5, dim, gen=gen)
    for k in range(len(chains)):
        x = x_full[..., : offsets(dim, chains)[k + 1]]
        torch.testing.assert_close(ours(x, chain=k), paper(x), **TOL)
        torch.testing.assert_close(ours(x), paper(x), **TOL)


# =============================================================================================
# ChainFeedForward
@pytest.mark.parametrize("chains,dim,hidden", [((1, 2, 1), 8, 16), ((3, 1), 8, 12)], ids=["C1.2.1", "C3.1"])
def test_chain_feed_forward_keys_load_and_forward(chains, dim, hidden, gen):
    paper = randomize(PaperFeedForward(dim, hidden, chains).to(F64), gen)
    ours = load_from_paper(ChainFeedForward(dim, hidden, chains).to(F64), paper)
    assert set(ours.state_dict()) == {f"w{j}.mlps.{i}.weight" for j in (1, 2, 3) for i in range(len(chains))}
    x_full = randn(2, 5, dim, gen=gen)
    for k in range(len(chains)):
        x = x_full[..., : offsets(dim, chains)[k + 1]]
        torch.testing.assert_close(ours(x, chain=k), paper(x, chain=k), **TOL)


# =============================================================================================
# ChainAttention
# (chains, dim, n_kv, kv_sharing, kv_mapping)
ATTN = {
    "C1.2.1-MHA": ((1, 2, 1), 16, 4, False, "tile"),
    "C2.2-GQA": ((2, 2), 16, 2, False, "tile"),
    "C1.2.1-air": ((1, 2, 1), 16, 1, True, "tile"),
    "C4.4-air-tile": ((4, 4), 32, 2, True, "tile"),
    "C4.4-air-group": ((4, 4), 32, 2, True, "chain_group"),
}


def attn_pair(name, gen):
    chains, dim, n_kv, sharing, mapping = ATTN[name]
    paper = randomize(PaperAttention(dim, sum(chains), n_kv, chains, sharing, mapping, 10000.0).to(F64), gen)
    ours = ChainAttention(dim, sum(chains), n_kv, chains, kv_sharing=sharing, kv_mapping=mapping,
                          rope_theta=10000.0).to(F64)
    return load_from_paper(ours, paper), paper


@pytest.mark.parametrize("name", list(ATTN))
def test_chain_attention_keys_load_and_forward(name, gen):
    chains, dim, n_kv, sharing, _ = ATTN[name]
    ours, paper = attn_pair(name, gen)
    keys = set(ours.state_dict())
    if sharing:
        assert {"wk.weight", "wv.weight"} <= keys
        assert tuple(ours.state_dict()["wk.weight"].shape) == (n_kv * dim // sum(chains), offsets(dim, chains)[1])
    else:
        assert {f"wk.mlps.{i}.weight" for i in range(len(chains))} <= keys
    x_full = randn(2, 7, dim, gen=gen)
    for k in range(len(chains)):
        x = x_full[..., : offsets(dim, chains)[k + 1]]
        out = ours(x, chain=k)
        assert out.shape == x.shape
        torch.testing.assert_close(out, paper(x, chain=k), **TOL)
    gy = randn(2, 7, dim, gen=gen)
    ours(x_full).backward(gy)
    paper(x_full).backward(gy)
    check_grads_equal(ours, paper)


def _new_cache(attn, batch, max_len):
    return KVCache(1, batch, max_len, attn.n_kv_heads, attn.head_dim, kv_sharing=attn.kv_sharing,
                   dtype=F64)


@pytest.mark.parametrize("name", ["C1.2.1-MHA", "C4.4-air-group"])
def test_chain_attention_with_kv_cache_equals_full_forward(name, gen):
    chains, dim = ATTN[name][0], ATTN[name][1]
    ours, _ = attn_pair(name, gen)
    x_full = randn(2, 6, dim, gen=gen)
    for k in range(len(chains)):
        x = x_full[..., : offsets(dim, chains)[k + 1]]
        full = ours(x, chain=k)
        cache = _new_cache(ours, 2, 6)
        pieces = []
        for a, b in ((0, 3), (3, 4), (4, 5), (5, 6)):  # a prefill of 3, then one token at a time
            pieces.append(ours(x[:, a:b], chain=k, cache=cache))
            cache.advance(b - a, k)
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


def test_kv_cache_refuses_incomplete_and_overflow(gen):
    ours, _ = attn_pair("C1.2.1-MHA", gen)
    cache = _new_cache(ours, 1, 3)
    x = randn(1, 2, 16, gen=gen)
    ours(x[..., :4], chain=0, cache=cache)
    cache.advance(2, 0)
    with pytest.raises(ValueError, match="incomplete"):
        ours(x[:, :1], chain=2, cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        ours(x[..., :4], chain=0, cache=cache)


# =============================================================================================
# ChainTransformerBlock
@pytest.mark.parametrize("name", ["C1.2.1-MHA", "C1.2.1-air", "C4.4-air-group"])
def test_chain_transformer_block_keys_load_and_forward(name, gen):
    chains, dim, n_kv, sharing, mapping = ATTN[name]
    cfg = CoLMConfig(dim=dim, n_layers=1, n_heads=sum(chains), n_kv_heads=n_kv, vocab_size=5, chains=chains,
                     ffn_hidden_dim=2 * dim, rope_theta=10000.0, kv_sharing=sharing, kv_mapping=mapping)
    paper = randomize(PaperBlock(cfg).to(F64), gen)
    ours = load_from_paper(ChainTransformerBlock(cfg).to(F64), paper)
    x_full = randn(2, 5, dim, gen=gen)
    for k in range(len(chains)):
        x = x_full[..., : offsets(dim, chains)[k + 1]]
        torch.testing.assert_close(ours(x, chain=k), paper(x, chain=k), **TOL)


# =============================================================================================
# Per-sequence scales (seq_chains): every row equals its sequence run alone at its scale
def _check_rows(out, alone_of, seq, widths_of, x=None):
    """Row b of ``out``: the first ``widths_of(s)`` features equal ``alone_of(b, s)``; the rest are
    exact zeros (or, for a block, the residual input ``x`` passed through)."""
    for b, s in enumerate(seq.tolist()):
        p = widths_of(s)
        torch.testing.assert_close(out[b:b + 1, ..., :p], alone_of(b, s), **TOL)
        rest = out[b, ..., p:]
        assert torch.equal(rest, torch.zeros_like(rest) if x is None else x[b, ..., p:]), b


@pytest.mark.parametrize("per_token", [False, True], ids=["per-seq", "per-token"])
def test_chain_linear_norm_ffn_take_seq_chains(per_token, gen):
    chains, dim, hidden = (1, 2, 1), 8, 16
    seq = torch.tensor([2, 0, 1])
    rows = seq[:, None].expand(3, 5) if per_token else seq  # (B, S) or (B,)
    x = randn(3, 5, dim, gen=gen)
    linear = load_from_paper(ChainLinear(dim, hidden, chains).to(F64),
                             randomize(PaperChainLinear(dim, hidden, chains).to(F64), gen))
    _check_rows(linear(x, seq_chains=rows), lambda b, s: linear(x[b:b + 1], chain=s), seq,
                lambda s: offsets(hidden, chains)[s + 1])
    norm = load_from_paper(ChainRMSNorm(dim, chains).to(F64), randomize(PaperRMSNorm(dim, chains).to(F64), gen))
    _check_rows(norm(x, seq_chains=rows), lambda b, s: norm(x[b:b + 1, :, : offsets(dim, chains)[s + 1]], chain=s),
                seq, lambda s: offsets(dim, chains)[s + 1])
    paper = randomize(PaperFeedForward(dim, hidden, chains).to(F64), gen)
    ffn = load_from_paper(ChainFeedForward(dim, hidden, chains).to(F64), paper)
    _check_rows(ffn(x, seq_chains=rows), lambda b, s: paper(x[b:b + 1, :, : offsets(dim, chains)[s + 1]], chain=s),
                seq, lambda s: offsets(dim, chains)[s + 1])
    with pytest.raises(ValueError, match=r"seq_chains values must be in \[0, 1\]"):
        ffn(x, 1, seq_chains=seq)  # a row's scale above the call's


@pytest.mark.parametrize("name", ["C1.2.1-MHA", "C2.2-GQA", "C1.2.1-air", "C4.4-air-group"])
def test_chain_attention_and_block_take_seq_chains(name, gen):
    chains, dim, n_kv, sharing, mapping = ATTN[name]
    ours, paper = attn_pair(name, gen)
    seq = torch.tensor([len(chains) - 1, 0, len(chains) // 2])
    x = randn(3, 6, dim, gen=gen)
    width = lambda s: offsets(dim, chains)[s + 1]  # noqa: E731
    _check_rows(ours(x, seq_chains=seq), lambda b, s: paper(x[b:b + 1, :, : width(s)], chain=s), seq, width)
    cfg = CoLMConfig(dim=dim, n_layers=1, n_heads=sum(chains), n_kv_heads=n_kv, vocab_size=5, chains=chains,
                     ffn_hidden_dim=2 * dim, rope_theta=10000.0, kv_sharing=sharing, kv_mapping=mapping)
    paper_block = randomize(PaperBlock(cfg).to(F64), gen)
    block = load_from_paper(ChainTransformerBlock(cfg).to(F64), paper_block)
    # beyond a row's scale the ops add exact zeros: the residual stream passes through unchanged
    _check_rows(block(x, seq_chains=seq), lambda b, s: paper_block(x[b:b + 1, :, : width(s)], chain=s), seq,
                width, x=x)
    with pytest.raises(ValueError, match="seq_chains must have a prefix of x's leading shape"):
        ours(x[:1], seq_chains=seq)
    with pytest.raises(ValueError, match="seq_chains must be 1-D"):  # attention: one scale per sequence
        ours(x, seq_chains=seq[:, None].expand(3, 6))


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", ["C1.2.1-MHA", "C4.4-air-group"])
def test_chain_attention_cache_with_seq_chains_equals_full_forward(name, page_size, gen):
    """Prefill and decode steps with per-sequence scales (the decode op reads only each
    sequence's active heads) equal one forward at those scales; the scales may go down."""
    chains, dim = ATTN[name][0], ATTN[name][1]
    ours, _ = attn_pair(name, gen)
    n = len(chains)
    x = randn(3, 6, dim, gen=gen)
    first, later = torch.tensor([n - 1, 0, 1]), torch.tensor([n - 1, 0, 0])
    cache = KVCache(1, 3, 6, ours.n_kv_heads, ours.head_dim, kv_sharing=ours.kv_sharing, dtype=F64,
                    page_size=page_size)
    with torch.no_grad():
        pieces = [ours(x[:, :3], cache=cache, seq_chains=first)]
        cache.advance(3, n - 1, first)
        for t in range(3, 6):
            pieces.append(ours(x[:, t:t + 1], cache=cache, seq_chains=later))
            cache.advance(1, n - 1, later)
        for b, s in enumerate(later.tolist()):  # row b from its own scales alone
            p = offsets(dim, chains)[s + 1]
            alone = KVCache(1, 1, 6, ours.n_kv_heads, ours.head_dim, kv_sharing=ours.kv_sharing, dtype=F64)
            want = [ours(x[b:b + 1, :3, : offsets(dim, chains)[int(first[b]) + 1]], chain=int(first[b]), cache=alone)]
            alone.advance(3, int(first[b]))
            for t in range(3, 6):
                want.append(ours(x[b:b + 1, t:t + 1, :p], chain=s, cache=alone))
                alone.advance(1, s)
            got = torch.cat(pieces, dim=1)[b]
            torch.testing.assert_close(got[:3, : want[0].shape[-1]], want[0][0], **TOL)
            torch.testing.assert_close(got[3:, :p], torch.cat(want[1:], dim=1)[0], **TOL)
            assert torch.equal(got[3:, p:], torch.zeros_like(got[3:, p:]))


def test_kv_cache_tracks_completeness_per_sequence(gen):
    ours, _ = attn_pair("C1.2.1-MHA", gen)
    x = randn(2, 4, 16, gen=gen)
    cache = _new_cache(ours, 2, 4)
    seq = torch.tensor([2, 0])
    with torch.no_grad():
        ours(x[:, :2], cache=cache, seq_chains=seq)
        cache.advance(2, 2, seq)
        with pytest.raises(ValueError, match="chain=seq_chains: sequence 1 needs the kv heads of chains 0..1.*incomplete"):
            ours(x[:, 2:3], cache=cache, seq_chains=torch.tensor([2, 1]))
        with pytest.raises(ValueError, match="chain=1: sequence 1 needs.*incomplete"):
            ours(x[:, 2:3, :12], chain=1, cache=cache)  # an int scale is checked per sequence too
        ours(x[:, 2:3], cache=cache, seq_chains=torch.tensor([1, 0]))  # going down is fine
        cache.advance(1, 2, torch.tensor([1, 0]))
        with pytest.raises(ValueError, match="sequence 0 needs the kv heads of chains 0..2"):
            ours(x[:, 3:4], cache=cache, seq_chains=torch.tensor([2, 0]))
        ours(x[:, 3:4, :4], chain=0, cache=cache)
    shared, _ = attn_pair("C1.2.1-air", gen)  # CoLM-Air: complete at every scale
    cache = _new_cache(shared, 2, 4)
    with torch.no_grad():
        shared(x[:, :2], cache=cache, seq_chains=torch.tensor([0, 0]))
        cache.advance(2, 2, torch.tensor([0, 0]))
        shared(x[:, 2:3], cache=cache, seq_chains=torch.tensor([2, 1]))
