"""Tests of the plain eager reference CoLM (float64, CPU, tiny models)."""

import pytest
import torch
import torch.nn.functional as F

from colm_kernels.models.config import CoLMConfig
from colm_kernels.reference import CoLM
from utils import randomize

VOCAB = 37
DTYPE = torch.float64

# (chains, dim, n_kv_heads, kv_sharing, kv_mapping, ffn_hidden_dim, rope_theta)
CONFIGS = {
    "c11": ((1, 1), 16, 2, False, "tile", 32, 500000.0),
    "c11-air": ((1, 1), 16, 1, True, "tile", 32, 10000.0),
    "c22-gqa": ((2, 2), 32, 2, False, "tile", 48, 10000.0),
    "c22-air-group": ((2, 2), 32, 2, True, "chain_group", 48, 500000.0),
    "c121": ((1, 2, 1), 32, 4, False, "tile", 32, 10000.0),
    "c121-air": ((1, 2, 1), 32, 1, True, "tile", 32, 10000.0),
    "c4-gqa": ((4,), 32, 2, False, "tile", 48, 10000.0),
    "c4-air-tile": ((4,), 32, 2, True, "tile", 48, 10000.0),
    "c4-air-group": ((4,), 32, 2, True, "chain_group", 48, 10000.0),
    "c2222": ((2, 2, 2, 2), 48, 4, False, "tile", 64, 10000.0),
    "c2222-air": ((2, 2, 2, 2), 48, 2, True, "tile", 64, 500000.0),
    "c44-gqa": ((4, 4), 48, 2, False, "tile", 64, 10000.0),
    # With c_i / n_kv > 1 and n_kv > 1 the two mappings really differ.
    "c44-air-tile": ((4, 4), 48, 2, True, "tile", 64, 10000.0),
    "c44-air-group": ((4, 4), 48, 2, True, "chain_group", 64, 10000.0),
}
MULTI = [name for name, c in CONFIGS.items() if len(c[0]) > 1]
AIR = [name for name, c in CONFIGS.items() if c[3]]


def make_config(name):
    chains, dim, n_kv, air, mapping, hidden, theta = CONFIGS[name]
    return CoLMConfig(
        dim=dim, n_layers=2, n_heads=sum(chains), n_kv_heads=n_kv, vocab_size=VOCAB, chains=chains,
        ffn_hidden_dim=hidden, rope_theta=theta, kv_sharing=air, kv_mapping=mapping,
    )




def make_model(name, seed=0):
    return randomize(CoLM(make_config(name)).to(DTYPE), seed)


def tokens(batch=2, seq=9, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def final_hidden(model, toks):
    """Full-scale hidden state after the final norm, captured with a hook."""
    out = {}
    handle = model.norm.register_forward_hook(lambda mod, inp, o: out.__setitem__("h", o))
    with torch.no_grad():
        model(toks)
    handle.remove()
    return out["h"]


# ---------------------------------------------------------------------------------------------
# An independent dense LLaMA: chain linears scattered into block-lower-triangular dense weights,
# Meta's complex-number RoPE, SDPA, and the K/V repeat written from the spec's words.


def _dense_weight(sd, prefix, chains, d_in, d_out):
    s = sum(chains)
    w = torch.zeros(d_out, d_in, dtype=DTYPE)
    row = 0
    for i, c in enumerate(chains):
        block = sd[f"{prefix}.mlps.{i}.weight"]
        assert block.shape == (d_out * c // s, sum(chains[: i + 1]) * d_in // s)
        w[row : row + block.shape[0], : block.shape[1]] = block
        row += block.shape[0]
    assert row == d_out
    return w


def dense_forward(model, toks):
    cfg = model.config
    sd = model.state_dict()
    chains, D, H, hd = cfg.chains, cfg.dim, cfg.ffn_hidden_dim, cfg.head_dim
    s, n_kv = sum(chains), cfg.n_kv_heads
    bounds = [D * sum(chains[:i]) // s for i in range(len(chains) + 1)]
    p1 = bounds[1]

    def norm(x, g):
        segs = [x[..., a:b] * torch.rsqrt(x[..., a:b].pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
                for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(segs, -1) * g

    T = toks.shape[1]
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64),
                            torch.outer(torch.arange(T, dtype=torch.float64), freqs))

    def rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def repeat_kv(x):  # x: (B, n_kv, T, hd) -> (B, n_heads, T, hd)
        if not cfg.kv_sharing:
            return x.repeat_interleave(cfg.n_heads // n_kv, dim=1)
        if cfg.kv_mapping == "tile":  # the paper's k.repeat(1, 1, n_rep, 1)
            return x.repeat(1, cfg.n_heads // n_kv, 1, 1)
        return torch.cat([x.repeat_interleave(c // n_kv, dim=1) for c in chains], dim=1)

    h = sd["tok_embeddings.weight"][toks]
    B = toks.shape[0]
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q = x @ _dense_weight(sd, p + "attention.wq", chains, D, D).T
        if cfg.kv_sharing:
            k, v = x[..., :p1] @ sd[p + "attention.wk.weight"].T, x[..., :p1] @ sd[p + "attention.wv.weight"].T
        else:
            k = x @ _dense_weight(sd, p + "attention.wk", chains, D, cfg.kv_dim).T
            v = x @ _dense_weight(sd, p + "attention.wv", chains, D, cfg.kv_dim).T
        q, k = rope(q.view(B, T, -1, hd)), rope(k.view(B, T, -1, hd))
        v = v.view(B, T, -1, hd)
        q, k, v = q.transpose(1, 2), repeat_kv(k.transpose(1, 2)), repeat_kv(v.transpose(1, 2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        h = h + a @ _dense_weight(sd, p + "attention.wo", chains, D, D).T
        x = norm(h, sd[p + "ffn_norm.weight"])
        w1 = _dense_weight(sd, p + "feed_forward.w1", chains, D, H)
        w2 = _dense_weight(sd, p + "feed_forward.w2", chains, H, D)
        w3 = _dense_weight(sd, p + "feed_forward.w3", chains, D, H)
        h = h + (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_independent_dense_llama(name):
    model = make_model(name)
    toks = tokens()
    with torch.no_grad():
        logits = model(toks)
        expected = dense_forward(model, toks)
    assert logits.shape == (2, 9, VOCAB)
    assert logits.std() > 0.1  # not degenerate
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)


def test_rope_makes_attention_order_aware():
    """One layer: without RoPE the last position's logits would not change when the earlier
    tokens are permuted (attention over a set); with RoPE they must."""
    model = randomize(CoLM(make_config("c22-gqa").replace(n_layers=1)).to(DTYPE))
    toks = tokens(batch=1, seq=6)
    permuted = torch.cat([toks[:, :5].flip(1), toks[:, 5:]], dim=1)
    assert not torch.equal(toks, permuted)
    with torch.no_grad():
        a, b = model(toks)[0, -1], model(permuted)[0, -1]
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Causality and elasticity


def _chain_only_params(model, j):
    """Every parameter block that belongs only to chains >= j (feature slices or mlps.i, i >= j)."""
    cfg = model.config
    s = sum(cfg.chains)
    start = cfg.dim * sum(cfg.chains[:j]) // s
    blocks = []
    for name, p in model.named_parameters():
        if ".mlps." in name:
            if int(name.split(".mlps.")[1].split(".")[0]) >= j:
                blocks.append((name, p))
        elif name.endswith("norm.weight"):
            blocks.append((name, p[start:]))
        elif name in ("tok_embeddings.weight", "output.weight"):
            blocks.append((name, p[:, start:]))
        else:
            assert name.endswith(("wk.weight", "wv.weight")) and cfg.kv_sharing, name
    return blocks


@pytest.mark.parametrize("name", MULTI)
def test_causality_perturbing_later_chains(name):
    model = make_model(name)
    toks = tokens()
    cfg = model.config
    n = len(cfg.chains)
    prefixes = [cfg.dim * sum(cfg.chains[: i + 1]) // sum(cfg.chains) for i in range(n)]
    for j in range(1, n):
        with torch.no_grad():
            before_scaled = [model(toks, chain=k) for k in range(n)]
        h_before = final_hidden(model, toks)
        saved = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for _, block in _chain_only_params(model, j):
                block.add_(torch.randn_like(block))
            after_scaled = [model(toks, chain=k) for k in range(n)]
        h_after = final_hidden(model, toks)
        # Inside a full-scale run, the hidden features of chains < j are bit-identical.
        assert torch.equal(h_before[..., : prefixes[j - 1]], h_after[..., : prefixes[j - 1]])
        assert not torch.allclose(h_before[..., prefixes[j - 1]:], h_after[..., prefixes[j - 1]:])
        for k in range(n):
            if k < j:
                assert torch.equal(before_scaled[k], after_scaled[k]), (j, k)
            else:
                assert (before_scaled[k] - after_scaled[k]).abs().max() > 1e-6, (j, k)
        model.load_state_dict(saved)


@pytest.mark.parametrize("name", MULTI)
def test_scale_logits_are_prefixes_of_the_full_hidden_state(name):
    """logits at chain=k == first P_(k+1) features of the full run's final hidden @ head columns."""
    model = make_model(name)
    toks = tokens()
    cfg = model.config
    h = final_hidden(model, toks)
    w = model.output.weight.detach()
    for k in range(len(cfg.chains)):
        width = cfg.dim * sum(cfg.chains[: k + 1]) // sum(cfg.chains)
        with torch.no_grad():
            logits = model(toks, chain=k)
        torch.testing.assert_close(logits, h[..., :width] @ w[:, :width].T, rtol=0, atol=1e-12)


def truncated_model(model, k):
    """A standalone model of chains[:k+1], loaded with the sliced state dict."""
    cfg = model.config
    sub = cfg.chains[: k + 1]
    s = sum(cfg.chains)
    width = cfg.dim * sum(sub) // s
    sub_cfg = cfg.replace(
        chains=sub, dim=width, n_heads=sum(sub),
        n_kv_heads=cfg.n_kv_heads if cfg.kv_sharing else cfg.n_kv_heads * sum(sub) // s,
        ffn_hidden_dim=cfg.ffn_hidden_dim * sum(sub) // s,
    )
    sd = {}
    for key, value in model.state_dict().items():
        if ".mlps." in key:
            if int(key.split(".mlps.")[1].split(".")[0]) <= k:
                sd[key] = value
        elif key.endswith("norm.weight"):
            sd[key] = value[:width]
        elif key in ("tok_embeddings.weight", "output.weight"):
            sd[key] = value[:, :width]
        else:  # CoLM-Air shared wk / wv: chain 1 only, unchanged
            sd[key] = value
    small = CoLM(sub_cfg).to(DTYPE)
    small.load_state_dict(sd, strict=True)
    return small


@pytest.mark.parametrize("name", MULTI)
def test_elasticity_equals_standalone_truncated_model(name):
    model = make_model(name)
    toks = tokens()
    for k in range(len(model.config.chains)):
        with torch.no_grad():
            expected = truncated_model(model, k)(toks)
            got = model(toks, chain=k)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    with torch.no_grad():  # the scales really differ
        assert (model(toks, chain=0) - model(toks)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["c22-gqa", "c121-air", "c44-air-group"])
def test_causal_attention(name):
    model = make_model(name)
    toks = tokens(seq=10)
    t = 5
    changed = toks.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(10 - t - 1)) % VOCAB
    for k in range(len(model.config.chains)):
        with torch.no_grad():
            a, b = model(toks, chain=k), model(changed, chain=k)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
        assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------
# generate


def greedy_no_cache(model, prompt, scales):
    seq = prompt
    with torch.no_grad():
        for s in scales:
            nxt = model(seq, chain=s)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_matches_no_cache_greedy(name):
    model = make_model(name)
    prompt = tokens(seq=5, seed=3)
    n = len(model.config.chains)
    for k in {0, n - 1}:
        out = model.generate(prompt, 6, chain=k)
        assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
        assert torch.equal(out, greedy_no_cache(model, prompt, [k] * 6))
    assert torch.equal(model.generate(prompt, 6), greedy_no_cache(model, prompt, [n - 1] * 6))


def test_generate_single_token_prompt_and_zero_new_tokens():
    model = make_model("c121")
    prompt = tokens(seq=1, seed=4)
    assert torch.equal(model.generate(prompt, 5, chain=1), greedy_no_cache(model, prompt, [1] * 5))
    # With no prefilled positions a later step may still not exceed an earlier one.
    with pytest.raises(ValueError, match="incomplete"):
        model.generate(prompt, 2, chain=[0, 2])
    longer = tokens(seq=4)
    out = model.generate(longer, 0)
    assert torch.equal(out, longer) and out is not longer


@pytest.mark.parametrize("name", ["c121", "c2222", "c44-gqa"])
def test_generate_scale_switching_downwards_non_air(name):
    model = make_model(name)
    n = len(model.config.chains)
    prompt = tokens(seq=6, seed=5)
    scales = sorted([min(i // 2, n - 1) for i in range(7)], reverse=True)  # non-increasing
    out = model.generate(prompt, 7, chain=scales)
    assert torch.equal(out, greedy_no_cache(model, prompt, scales))
    # A prefill at a larger scale than the decode scale is fine too.
    out = model.generate(prompt, 4, chain=0, prefill_chain=n - 1)
    assert torch.equal(out, greedy_no_cache(model, prompt, [0] * 4))


@pytest.mark.parametrize("name", [n for n in AIR if n in MULTI])
def test_generate_air_any_switching_and_cheap_prefill(name):
    model = make_model(name)
    n = len(model.config.chains)
    prompt = tokens(seq=7, seed=6)
    scales = [0, n - 1, 0, n // 2, n - 1, 1, 0]
    out = model.generate(prompt, 7, chain=scales, prefill_chain=0)
    assert torch.equal(out, greedy_no_cache(model, prompt, scales))
    full = model.generate(prompt, 6, chain=n - 1)
    assert torch.equal(model.generate(prompt, 6, chain=n - 1, prefill_chain=0), full)
    assert torch.equal(full, greedy_no_cache(model, prompt, [n - 1] * 6))
    # The caches themselves agree: K/V depend only on chain 1.
    small, big = model.new_cache(), model.new_cache()
    with torch.no_grad():
        model(prompt, 0, cache=small)
        model(prompt, n - 1, cache=big)
    for (ks, vs), (kb, vb) in zip(small, big):
        assert ks.shape == kb.shape == (2, model.config.n_kv_heads, 7, model.config.head_dim)
        torch.testing.assert_close(ks, kb, rtol=0, atol=1e-12)
        torch.testing.assert_close(vs, vb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["c11", "c22-gqa", "c121"])
def test_generate_non_air_incomplete_cache_raises(name):
    model = make_model(name)
    prompt = tokens(seq=5)
    with pytest.raises(ValueError, match="prefill_chain.*incomplete"):
        model.generate(prompt, 3, chain=1, prefill_chain=0)
    with pytest.raises(ValueError, match="incomplete"):
        model.generate(prompt, 3, chain=[0, 1, 1])
    # The cache holds only the kv heads of the chains computed: chain 0's share at scale 0.
    cache = model.new_cache()
    with torch.no_grad():
        model(prompt, 0, cache=cache)
    assert cache[0][0].shape[1] == model.config.n_kv_heads * model.config.chains[0] // sum(model.config.chains)
    with pytest.raises(ValueError, match="incomplete"):
        model(prompt[:, :1], 1, cache=cache)


# ---------------------------------------------------------------------------------------------
# Input validation and parameter names


def test_bad_inputs_raise():
    model = make_model("c121")
    toks = tokens()
    for bad in (3, -1):
        with pytest.raises(ValueError, match="chain"):
            model(toks, chain=bad)
        with pytest.raises(ValueError, match="chain"):
            model.generate(toks, 2, chain=bad)
        with pytest.raises(ValueError, match="prefill_chain"):
            model.generate(toks, 2, chain=0, prefill_chain=bad)
        with pytest.raises(ValueError, match=r"chain\[1\]"):
            model.generate(toks, 2, chain=[0, bad])
    with pytest.raises(TypeError, match="chain"):
        model(toks, chain=1.0)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(toks[0], 2)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(toks[None], 2)
    with pytest.raises(TypeError, match="prompt"):
        model.generate(toks.double(), 2)
    with pytest.raises(TypeError, match="prompt"):
        model.generate(toks.tolist(), 2)
    with pytest.raises(ValueError, match="tokens"):
        model(toks[0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(toks, -1)
    with pytest.raises(TypeError, match="max_new_tokens"):
        model.generate(toks, 2.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(toks, 3, chain=[0, 0])
    with pytest.raises(TypeError):
        CoLM(dict(dim=16))


def expected_keys(cfg):
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    n = len(cfg.chains)
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        keys |= {p + "attention_norm.weight", p + "ffn_norm.weight"}
        linears = ["attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
        if cfg.kv_sharing:
            keys |= {p + "attention.wk.weight", p + "attention.wv.weight"}
        else:
            linears += ["attention.wk", "attention.wv"]
        keys |= {f"{p}{lin}.mlps.{i}.weight" for lin in linears for i in range(n)}
    return keys


@pytest.mark.parametrize("name", ["c121", "c121-air", "c44-air-group"])
def test_state_dict_keys_and_shapes(name):
    cfg = make_config(name)
    sd = CoLM(cfg).state_dict()
    assert set(sd) == expected_keys(cfg)
    d, s = cfg.dim, sum(cfg.chains)
    p1 = d * cfg.chains[0] // s
    assert sd["tok_embeddings.weight"].shape == (VOCAB, d)
    assert sd["output.weight"].shape == (VOCAB, d)
    assert sd["norm.weight"].shape == (d,)
    last = len(cfg.chains) - 1
    assert sd[f"layers.1.attention.wq.mlps.{last}.weight"].shape == (d * cfg.chains[-1] // s, d)
    assert sd["layers.0.feed_forward.w2.mlps.0.weight"].shape == (
        d * cfg.chains[0] // s, cfg.ffn_hidden_dim * cfg.chains[0] // s)
    if cfg.kv_sharing:
        assert sd["layers.0.attention.wk.weight"].shape == (cfg.kv_dim, p1)
    else:
        assert sd["layers.0.attention.wv.mlps.0.weight"].shape == (cfg.kv_dim * cfg.chains[0] // s, p1)
    # Default init is non-degenerate: norms are ones, linears random.
    assert torch.equal(sd["norm.weight"], torch.ones(d))
    assert 0.01 < sd["layers.0.attention.wq.mlps.0.weight"].std() < 0.04
