"""``colm_kernels.models.CoLM`` against the plain ``colm_kernels.reference.CoLM`` (float64, same
weights), whole-model causality and elasticity, generate, checkpoints, multi-chain loss, chain
expansion and chain tuning."""
import io

import pytest
import torch
import torch.nn.functional as F

import colm_kernels as ck
from colm_kernels import models, reference
from colm_kernels.models import CoLMConfig, expand_chains, freeze_chains
from colm_kernels.nn import ChainLinear
from utils import F64, offsets, randomize

VOCAB = 37
TOL = dict(rtol=1e-11, atol=1e-11)  # float64, two different (exact-in-math) implementations

# (chains, dim, n_kv_heads, kv_sharing, kv_mapping, ffn_hidden_dim)
CONFIGS = {
    "C1.1": ((1, 1), 16, 2, False, "tile", 32),
    "C1.1-air": ((1, 1), 16, 1, True, "tile", 32),
    "C1.2.1": ((1, 2, 1), 32, 4, False, "tile", 32),
    "C1.2.1-air": ((1, 2, 1), 32, 1, True, "tile", 32),
    "C1.2.1-air-group": ((1, 2, 1), 32, 1, True, "chain_group", 32),
    "C4-gqa": ((4,), 32, 2, False, "tile", 48),
    "C4-air-tile": ((4,), 32, 2, True, "tile", 48),
    "C4-air-group": ((4,), 32, 2, True, "chain_group", 48),
    "C2.2.2.2": ((2, 2, 2, 2), 32, 4, False, "tile", 64),
    "C2.2.2.2-gqa-group": ((2, 2, 2, 2), 32, 4, False, "chain_group", 64),
    "C2.2.2.2-air-tile": ((2, 2, 2, 2), 32, 2, True, "tile", 64),
    "C2.2.2.2-air-group": ((2, 2, 2, 2), 32, 2, True, "chain_group", 64),
    "C4.4-air-tile": ((4, 4), 32, 2, True, "tile", 32),
    "C4.4-air-group": ((4, 4), 32, 2, True, "chain_group", 32),
}
MULTI = [n for n, c in CONFIGS.items() if len(c[0]) > 1]
AIR_MULTI = [n for n in MULTI if CONFIGS[n][3]]
NON_AIR_MULTI = [n for n in MULTI if not CONFIGS[n][3]]


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def make_config(name, n_layers=2):
    chains, dim, n_kv, air, mapping, hidden = CONFIGS[name]
    return CoLMConfig(dim=dim, n_layers=n_layers, n_heads=sum(chains), n_kv_heads=n_kv, vocab_size=VOCAB,
                      chains=chains, ffn_hidden_dim=hidden, rope_theta=10000.0, kv_sharing=air,
                      kv_mapping=mapping)




def pair(name, seed=0, n_layers=2):
    """(models.CoLM, reference.CoLM) holding the same random float64 weights."""
    cfg = make_config(name, n_layers)
    ours = randomize(models.CoLM(cfg).to(F64), seed)
    ref = reference.CoLM(cfg).to(F64)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def tokens(batch=2, seq=9, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def width(cfg, k):
    return offsets(cfg.dim, cfg.chains)[k + 1]


# =============================================================================================
# models.CoLM == reference.CoLM
@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_matches_reference_every_scale(name):
    ours, ref = pair(name)
    toks = tokens()
    with torch.no_grad():
        for k in list(range(len(ours.config.chains))) + [None]:
            got, expected = ours(toks, chain=k), ref(toks, chain=k)
            assert got.shape == (2, 9, VOCAB) and got.dtype == F64
            assert expected.std() > 0.1  # not degenerate
            torch.testing.assert_close(got, expected, **TOL)


def test_kv_mappings_give_different_models():
    """Guard for the comparisons above: with (4, 4) and 2 shared kv heads the mapping matters."""
    a, _ = pair("C4.4-air-tile")
    b = models.CoLM(make_config("C4.4-air-group")).to(F64)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert (a(tokens()) - b(tokens())).abs().max() > 1e-3


@pytest.mark.parametrize("name", MULTI)
def test_hidden_matches_reference_final_norm(name):
    ours, ref = pair(name)
    toks = tokens()
    captured = {}
    handle = ref.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    with torch.no_grad():
        for k in range(len(ours.config.chains)):
            ref(toks, chain=k)
            h = ours.hidden(toks, chain=k)
            assert h.shape == (2, 9, width(ours.config, k))
            torch.testing.assert_close(h, captured["h"], **TOL)
    handle.remove()


def truncated(model, k):
    """A standalone models.CoLM of chains[:k+1] loaded with the sliced state dict."""
    cfg = model.config
    sub = cfg.chains[: k + 1]
    s = sum(cfg.chains)
    w = width(cfg, k)
    sub_cfg = cfg.replace(chains=sub, dim=w, n_heads=sum(sub),
                          n_kv_heads=cfg.n_kv_heads if cfg.kv_sharing else cfg.n_kv_heads * sum(sub) // s,
                          ffn_hidden_dim=cfg.ffn_hidden_dim * sum(sub) // s)
    sd = {}
    for key, value in model.state_dict().items():
        if ".mlps." in key:
            if int(key.split(".mlps.")[1].split(".")[0]) <= k:
                sd[key] = value
        elif key.endswith("norm.weight"):
            sd[key] = value[:w]
        elif key in ("tok_embeddings.weight", "output.weight"):
            sd[key] = value[:, :w]
        else:  # CoLM-Air's shared wk / wv belong to chain 1
            sd[key] = value
    small = models.CoLM(sub_cfg).to(F64)
    small.load_state_dict(sd, strict=True)
    return small


@pytest.mark.parametrize("name", MULTI)
def test_truncated_model_equals_scale(name):
    model, _ = pair(name)
    toks = tokens()
    with torch.no_grad():
        for k in range(len(model.config.chains)):
            # Different tensor widths: same math, BLAS may round differently.
            torch.testing.assert_close(truncated(model, k)(toks), model(toks, chain=k), rtol=1e-12, atol=1e-12)
        assert (model(toks, chain=0) - model(toks)).abs().max() > 1e-3  # the scales really differ


# =============================================================================================
# whole-model causality and elasticity
def chain_only_params(model, j):
    """Parameter slices that belong only to chains >= j."""
    cfg = model.config
    start = width(cfg, j - 1)
    blocks = []
    for name, p in model.named_parameters():
        if ".mlps." in name:
            if int(name.split(".mlps.")[1].split(".")[0]) >= j:
                blocks.append(p)
        elif name.endswith("norm.weight"):
            blocks.append(p[start:])
        elif name in ("tok_embeddings.weight", "output.weight"):
            blocks.append(p[:, start:])
        else:
            assert cfg.kv_sharing and name.endswith(("wk.weight", "wv.weight")), name
    return blocks


@pytest.mark.parametrize("name", MULTI)
def test_model_causality(name):
    model, _ = pair(name)
    toks = tokens()
    n = len(model.config.chains)
    with torch.no_grad():
        before = [model(toks, chain=k) for k in range(n)]
        h_before = model.hidden(toks)
    for j in range(1, n):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for block in chain_only_params(model, j):
                block.add_(torch.randn_like(block))
            after = [model(toks, chain=k) for k in range(n)]
            h_after = model.hidden(toks)
        p = width(model.config, j - 1)
        assert torch.equal(h_before[..., :p], h_after[..., :p]), j
        assert not torch.allclose(h_before[..., p:], h_after[..., p:])
        for k in range(n):
            if k < j:
                assert torch.equal(before[k], after[k]), (j, k)
            else:
                assert (before[k] - after[k]).abs().max() > 1e-6, (j, k)
        model.load_state_dict(saved)


@pytest.mark.parametrize("name", MULTI)
def test_model_elasticity(name):
    model, _ = pair(name)
    toks = tokens()
    w_out = model.output.weight.detach()
    with torch.no_grad():
        full = model.hidden(toks)
        for k in range(len(model.config.chains)):
            p = width(model.config, k)
            # Same per-chain math; the activations have other widths (strides): rounding may differ.
            torch.testing.assert_close(model.hidden(toks, chain=k), full[..., :p], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(model(toks, chain=k), full[..., :p] @ w_out[:, :p].T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["C1.2.1", "C4.4-air-group"])
def test_model_is_causal_in_time(name):
    model, _ = pair(name)
    toks = tokens(seq=10)
    changed = toks.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    with torch.no_grad():
        for k in range(len(model.config.chains)):
            a, b = model(toks, chain=k), model(changed, chain=k)
            assert torch.equal(a[:, :6], b[:, :6])
            assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6


# =============================================================================================
# per-sequence scales: chain as a (B,) tensor
def seq_scales(n, batch=4, seed=0):
    """Every scale at least once where the batch allows, in shuffled order."""
    base = torch.arange(batch) % n
    return base[torch.randperm(batch, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("name", MULTI)
def test_forward_per_sequence_scales_equal_each_sequence_alone(name):
    """Row b of ``model(tokens, chain=t)`` equals ``tokens[b]`` alone at scale ``t[b]``, here and
    in the plain reference model; ``hidden`` is zero beyond each row's width."""
    ours, ref = pair(name)
    n = len(ours.config.chains)
    toks = tokens(batch=4, seq=7)
    scales = seq_scales(n)
    with torch.no_grad():
        logits, h = ours(toks, chain=scales), ours.hidden(toks, chain=scales)
        assert logits.shape == (4, 7, VOCAB) and h.shape == (4, 7, ours.config.dim)
        for b, s in enumerate(scales.tolist()):
            torch.testing.assert_close(logits[b:b + 1], ours(toks[b:b + 1], chain=s), **TOL)
            torch.testing.assert_close(logits[b:b + 1], ref(toks[b:b + 1], chain=s), **TOL)
            p = width(ours.config, s)
            torch.testing.assert_close(h[b:b + 1, :, :p], ours.hidden(toks[b:b + 1], chain=s), **TOL)
            assert torch.equal(h[b, :, p:], torch.zeros_like(h[b, :, p:]))
        # int32 tensors work too; one scale for all equals the int
        torch.testing.assert_close(ours(toks, chain=torch.full((4,), n - 2, dtype=torch.int32)),
                                   ours(toks, chain=n - 2), **TOL)


@pytest.mark.parametrize("name", ["C1.2.1", "C2.2.2.2-air-tile"])
def test_per_sequence_scales_gradients_equal_each_sequence_alone(name):
    """Training with a scale per sequence: the parameter gradients of the summed loss are the sums
    of each sequence's own gradients at its scale."""
    ours, _ = pair(name)
    toks = tokens(batch=3, seq=5)
    scales = seq_scales(len(ours.config.chains), batch=3, seed=2)
    params = [p for p in ours.parameters()]
    mixed = torch.autograd.grad(ours(toks, chain=scales).square().sum(), params, allow_unused=True)
    alone = [torch.autograd.grad(ours(toks[b:b + 1], chain=s).square().sum(), params, allow_unused=True)
             for b, s in enumerate(scales.tolist())]
    for i, g in enumerate(mixed):
        parts = [a[i] for a in alone if a[i] is not None]
        if g is None:
            assert not parts
        elif not parts:  # a chain no sequence reaches: no gradient at all
            assert torch.equal(g, torch.zeros_like(g))
        else:
            torch.testing.assert_close(g, sum(parts), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["C1.2.1", "C1.2.1-air"])
def test_hidden_with_cache_and_per_sequence_scales(name):
    """Prefill and decode steps through ``hidden(..., cache)`` with per-sequence scales (contiguous
    and paged caches) equal one forward; without KV sharing a sequence may not step up."""
    ours, _ = pair(name)
    toks = tokens(batch=3, seq=6)
    scales = torch.tensor([2, 0, 1])
    with torch.no_grad():
        full = ours.hidden(toks, chain=scales)
        for page_size in (None, 4):
            cache = ours.new_cache(3, 6, page_size=page_size)
            assert (cache.block_table is None) == (page_size is None)
            parts = [ours.hidden(toks[:, :3], scales, cache)] + [ours.hidden(toks[:, t:t + 1], scales, cache)
                                                                for t in range(3, 6)]
            torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)
        up = torch.tensor([2, 1, 1])
        if ours.config.kv_sharing:
            ours.hidden(toks[:, :1], up, ours.new_cache(3, 6))
            cache = ours.new_cache(3, 6)
            ours.hidden(toks[:, :3], scales, cache)
            ours.hidden(toks[:, 3:4], up, cache)
        else:
            cache = ours.new_cache(3, 6)
            ours.hidden(toks[:, :3], scales, cache)
            with pytest.raises(ValueError, match="chain=seq_chains: sequence 1 needs.*incomplete"):
                ours.hidden(toks[:, 3:4], up, cache)


def test_chain_tensor_bad_input_names_the_argument():
    ours, _ = pair("C1.2.1")
    toks = tokens(batch=3)
    with pytest.raises(TypeError, match="chain must be an int, None or an integer tensor"):
        ours(toks, chain=torch.zeros(3))
    with pytest.raises(TypeError, match="chain must be an int, None or an integer tensor"):
        ours(toks, chain=torch.zeros(3, dtype=torch.bool))
    for shape in ((2,), (3, 1), ()):
        with pytest.raises(ValueError, match=r"chain as a tensor must have shape \(3,\)"):
            ours(toks, chain=torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="chain is on meta"):
        ours(toks, chain=torch.zeros(3, dtype=torch.long, device="meta"))
    for bad in ([0, 3, 1], [-1, 0, 0]):
        with pytest.raises(ValueError, match=r"chain values must be in \[0, 2\]"):
            ours.hidden(toks, chain=torch.tensor(bad))


# =============================================================================================
# generate
@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_fixed_scale_equals_reference(name):
    ours, ref = pair(name)
    prompt = tokens(seq=5, seed=3)
    n = len(ours.config.chains)
    for k in sorted({0, n - 1}) + [None]:
        got = ours.generate(prompt, 6, chain=k)
        assert got.shape == (2, 11) and torch.equal(got[:, :5], prompt)
        assert torch.equal(got, ref.generate(prompt, 6, chain=k)), k


@pytest.mark.parametrize("name", NON_AIR_MULTI)
def test_generate_non_air_downward_switching_equals_reference(name):
    ours, ref = pair(name)
    n = len(ours.config.chains)
    prompt = tokens(seq=6, seed=5)
    scales = sorted([min(i // 2, n - 1) for i in range(7)], reverse=True)
    assert torch.equal(ours.generate(prompt, 7, chain=scales), ref.generate(prompt, 7, chain=scales))
    got = ours.generate(prompt, 4, chain=0, prefill_chain=n - 1)
    assert torch.equal(got, ref.generate(prompt, 4, chain=0, prefill_chain=n - 1))


@pytest.mark.parametrize("name", AIR_MULTI)
def test_generate_air_any_switching_and_cheap_prefill(name):
    ours, ref = pair(name)
    n = len(ours.config.chains)
    prompt = tokens(seq=7, seed=6)
    scales = [0, n - 1, 0, n // 2, n - 1, 1, 0]
    got = ours.generate(prompt, 7, chain=scales, prefill_chain=0)
    assert torch.equal(got, ref.generate(prompt, 7, chain=scales, prefill_chain=0))
    full = ours.generate(prompt, 6, chain=n - 1)
    assert torch.equal(ours.generate(prompt, 6, chain=n - 1, prefill_chain=0), full)
    assert torch.equal(full, ref.generate(prompt, 6, chain=n - 1))


@pytest.mark.parametrize("name", ["C1.2.1", "C1.2.1-air"])
def test_generate_edge_cases_equal_reference(name):
    ours, ref = pair(name)
    one = tokens(seq=1, seed=4)
    assert torch.equal(ours.generate(one, 4, chain=1), ref.generate(one, 4, chain=1))
    longer = tokens(seq=4)
    out = ours.generate(longer, 0)
    assert torch.equal(out, longer) and out is not longer
    single = tokens(batch=1, seq=3, seed=8)
    assert torch.equal(ours.generate(single, 3), ref.generate(single, 3))


def test_generate_equals_greedy_without_cache():
    model, _ = pair("C2.2.2.2")
    prompt = tokens(seq=5, seed=9)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq, chain=2)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(prompt, 5, chain=2), seq)


# =============================================================================================
# checkpoints
@pytest.mark.parametrize("name", ["C1.2.1", "C1.2.1-air", "C4-gqa"])
def test_state_dict_round_trip(name):
    model, ref = pair(name)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = models.CoLM(model.config).to(F64)
    fresh.load_state_dict(torch.load(buf), strict=True)
    toks = tokens()
    with torch.no_grad():
        for k in range(len(model.config.chains)):
            assert torch.equal(fresh(toks, chain=k), model(toks, chain=k))
    ours_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes


@pytest.mark.parametrize("name", ["C1.2.1", "C2.2.2.2-air-group"])
def test_reference_checkpoint_loads_strict(name):
    cfg = make_config(name)
    ref = randomize(reference.CoLM(cfg).to(F64), seed=7)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    ours = models.CoLM(cfg).to(F64)
    ours.load_state_dict(torch.load(buf), strict=True)
    toks = tokens()
    with torch.no_grad():
        for k in range(len(cfg.chains)):
            torch.testing.assert_close(ours(toks, chain=k), ref(toks, chain=k), **TOL)


def test_state_dict_keys_follow_torchtitan_and_paper_layout():
    model = models.CoLM(make_config("C1.2.1", n_layers=1))
    keys = set(model.state_dict())
    for lin in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        for i in range(3):
            assert f"layers.0.{lin}.mlps.{i}.weight" in keys
    assert not any(k.endswith(".bias") for k in keys)  # LLaMA linears have no bias
    assert {"tok_embeddings.weight", "norm.weight", "output.weight",
            "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight"} <= keys
    air = models.CoLM(make_config("C1.2.1-air", n_layers=1)).state_dict()
    assert air["layers.0.attention.wk.weight"].shape == (8, 8)  # nn.Linear(P_1=8, n_kv * hd = 8)


# =============================================================================================
# multi_chain_loss
@pytest.mark.parametrize("name", ["C1.2.1", "C2.2.2.2-air-tile", "C4-gqa"])
def test_multi_chain_loss_equals_per_scale_cross_entropy(name):
    model, _ = pair(name)
    toks, targets = tokens(seed=1), tokens(seed=2)
    targets[0, ::4] = -100
    losses = model.multi_chain_loss(toks, targets)
    n = len(model.config.chains)
    assert losses.shape == (n,)
    per_scale = torch.stack([F.cross_entropy(model(toks, chain=k).reshape(-1, VOCAB), targets.reshape(-1))
                             for k in range(n)])
    torch.testing.assert_close(losses, per_scale, rtol=1e-12, atol=1e-12)

    weights = torch.linspace(0.5, 2.0, n, dtype=F64)
    (losses * weights).sum().backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    (per_scale * weights).sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)


# =============================================================================================
# expand_chains
# (old chains, dim, n_kv, kv_sharing, mapping, ffn, new chains)
EXPAND = {
    "C2+C2": ((2,), 16, 2, False, "tile", 32, (2,)),
    "C1+C2.1": ((1,), 8, 1, False, "tile", 16, (2, 1)),
    "C4-air-group+C4": ((4,), 32, 2, True, "chain_group", 32, (4,)),
    "C2-air-tile+C2.2": ((2,), 16, 1, True, "tile", 16, (2, 2)),
    "C1.1+C2": ((1, 1), 16, 2, False, "tile", 16, (2,)),
}


def old_model(case, seed=3):
    chains, dim, n_kv, air, mapping, ffn, _ = EXPAND[case]
    cfg = CoLMConfig(dim=dim, n_layers=2, n_heads=sum(chains), n_kv_heads=n_kv, vocab_size=VOCAB,
                     chains=chains, ffn_hidden_dim=ffn, rope_theta=10000.0, kv_sharing=air, kv_mapping=mapping)
    return randomize(models.CoLM(cfg).to(F64), seed)


def load_expanded(state, cfg):
    model = models.CoLM(cfg).to(F64)
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("case", list(EXPAND))
def test_expand_chains_preserves_logits_and_copies_blocks(case):
    old = old_model(case)
    new_chains = EXPAND[case][-1]
    old_n = len(old.config.chains)
    state, cfg = expand_chains(old.state_dict(), old.config, new_chains)
    assert cfg.chains == tuple(old.config.chains) + new_chains
    assert cfg.head_dim == old.config.head_dim
    new = load_expanded(state, cfg)
    toks = tokens()
    with torch.no_grad():
        ref_logits = old(toks)
        # Full scale: new chains add exactly zero through the zero head columns.
        torch.testing.assert_close(new(toks), ref_logits, rtol=1e-12, atol=1e-12)
        # The first old_n chains of the new model are the old model.
        torch.testing.assert_close(new(toks, chain=old_n - 1), ref_logits, rtol=1e-12, atol=1e-12)
        # The new chains do compute something (their hidden features are not zero).
        h = new.hidden(toks)
        assert h[..., old.config.dim:].abs().max() > 1e-3

    d_old = old.config.dim
    for key, value in old.state_dict().items():
        target = state[key]
        if key == "output.weight":
            assert torch.equal(target[:, :d_old], value)
            assert torch.equal(target[:, d_old:], torch.zeros_like(target[:, d_old:]))
        elif key == "tok_embeddings.weight":
            assert torch.equal(target[:, :d_old], value)
        elif key.endswith("norm.weight"):
            assert torch.equal(target[:d_old], value)
        else:
            assert torch.equal(target, value), key
    # New blocks are freshly initialised (not zero), of the new config's shapes.
    new_blocks = [k for k in state if ".mlps." in k and int(k.split(".mlps.")[1].split(".")[0]) >= old_n]
    assert new_blocks and all(state[k].abs().max() > 0 for k in new_blocks)
    assert state["tok_embeddings.weight"].dtype == F64


def to_dense_keys(state):
    """A one-chain CoLM checkpoint written as a plain LLaMA: ``X.mlps.0.weight`` -> ``X.weight``."""
    return {k.replace(".mlps.0.", "."): v for k, v in state.items()}


@pytest.mark.parametrize("air", [False, True], ids=["gqa", "air-group"])
def test_expand_dense_llama_checkpoint(air):
    cfg = CoLMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, chains=(4,),
                     ffn_hidden_dim=48, rope_theta=10000.0, kv_sharing=air, kv_mapping="chain_group")
    old = randomize(models.CoLM(cfg).to(F64), seed=11)
    dense = to_dense_keys(old.state_dict())
    assert "layers.0.attention.wq.weight" in dense and not any(".mlps." in k for k in dense)
    state, new_cfg = expand_chains(dense, cfg, (4,))
    new = load_expanded(state, new_cfg)
    toks = tokens()
    with torch.no_grad():
        torch.testing.assert_close(new(toks), old(toks), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new(toks, chain=0), old(toks), rtol=1e-12, atol=1e-12)
    assert torch.equal(state["layers.1.attention.wq.mlps.0.weight"], dense["layers.1.attention.wq.weight"])


def test_expand_chains_is_deterministic_with_generator():
    old = old_model("C2+C2")
    a, _ = expand_chains(old.state_dict(), old.config, (2,), generator=torch.Generator().manual_seed(5))
    b, _ = expand_chains(old.state_dict(), old.config, (2,), generator=torch.Generator().manual_seed(5))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# =============================================================================================
# freeze_chains
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("name", ["C1.2.1", "C1.2.1-air"])
def test_freeze_chains(name, k):
    model, _ = pair(name, seed=4)
    cfg = model.config
    toks, targets = tokens(seed=1), tokens(seed=2)
    p = width(cfg, k - 1)

    # Without freezing, the frozen columns do get gradient: the hooks below matter.
    model.multi_chain_loss(toks, targets).sum().backward()
    assert model.tok_embeddings.weight.grad[:, :p].abs().max() > 0
    assert model.output.weight.grad[:, :p].abs().max() > 0
    model.zero_grad(set_to_none=True)

    handles = freeze_chains(model, k)
    assert handles
    for module in model.modules():
        if isinstance(module, ChainLinear):
            for i, m in enumerate(module.mlps):
                assert all(q.requires_grad == (i >= k) for q in m.parameters())
    for layer in model.layers:
        if cfg.kv_sharing:
            assert not layer.attention.wk.weight.requires_grad and not layer.attention.wv.weight.requires_grad

    with torch.no_grad():
        before_small = model(toks, chain=k - 1)
        before_full = model(toks)
    model.multi_chain_loss(toks, targets).sum().backward()
    for name_, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name_
        elif ".mlps." in name_:
            assert param.grad.abs().max() > 0, name_  # later chains still learn
    for param, dim_ in [(model.tok_embeddings.weight, 1), (model.output.weight, 1)] + \
            [(m.weight, 0) for m in model.modules() if m.__class__.__name__ == "ChainRMSNorm"]:
        frozen = param.grad.narrow(dim_, 0, p)
        live = param.grad.narrow(dim_, p, param.shape[dim_] - p)
        assert torch.equal(frozen, torch.zeros_like(frozen))
        assert live.abs().max() > 0

    torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1).step()
    with torch.no_grad():
        assert torch.equal(model(toks, chain=k - 1), before_small)  # frozen sub-model untouched
        assert (model(toks) - before_full).abs().max() > 1e-6
    for h in handles:
        h.remove()
