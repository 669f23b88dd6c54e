"""``colm_kernels.integrations.hf``: the transformers model against ``models.CoLM`` and the float64
``reference.CoLM`` (reference backend, tiny random configs): logits at every scale, HF ``generate``
(greedy, sampling, beam search, EOS, left-padded batches, ``chain`` / ``prefill_chain``), the cache,
losses, save/load, conversions, ``from_llama`` against transformers' own LLaMA, bad inputs."""
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import colm_kernels as ck  # noqa: E402
from colm_kernels import models, reference  # noqa: E402
from colm_kernels.backends import backend_unavailable_reason  # noqa: E402
from colm_kernels.integrations.hf import (  # noqa: E402
    CoLMCache, CoLMForCausalLM, CoLMHFConfig, from_hf, from_llama, half_split_to_interleaved,
    interleaved_to_half_split, to_hf)
from utils import F64, randomize  # noqa: E402

VOCAB = 41
TOL = dict(rtol=1e-10, atol=1e-10)
# transformers' LLaMA computes RMSNorm and RoPE in float32 even for a float64 model: float32 level.
LLAMA_TOL = dict(rtol=1e-5, atol=1e-5)
# name: (chains, dim, n_kv_heads, kv_sharing, kv_mapping)
CONFIGS = {
    "C1.1.2-gqa": ((1, 1, 2), 32, 4, False, "tile"),
    "C2.2-air-tile": ((2, 2), 32, 2, True, "tile"),
    "C2.2.4-air-group": ((2, 2, 4), 64, 2, True, "chain_group"),
    "C4-one-chain": ((4,), 32, 2, False, "tile"),
}
AIR = [n for n, c in CONFIGS.items() if c[3]]


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def colm(name, seed=0, n_layers=2, dim=None):
    chains, default_dim, n_kv, air, mapping = CONFIGS[name]
    dim = dim or default_dim
    cfg = models.CoLMConfig(dim=dim, n_layers=n_layers, n_heads=sum(chains), n_kv_heads=n_kv, vocab_size=VOCAB,
                            chains=chains, ffn_hidden_dim=dim, rope_theta=10000.0, kv_sharing=air,
                            kv_mapping=mapping)
    return randomize(models.CoLM(cfg).to(F64), seed).eval()


def pair(name, seed=0):
    m = colm(name, seed)
    return m, to_hf(m).eval()


def left_pad(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def gen(hf, ids, n, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", 0)
    return hf.generate(ids, max_new_tokens=n, min_new_tokens=n if "eos_token_id" not in kw else 0, **kw)


# -- logits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_colm_and_reference_at_every_scale(name):
    m, hf = pair(name)
    ref = reference.CoLM(m.config).to(F64)
    ref.load_state_dict(m.state_dict(), strict=True)
    x = torch.randint(0, VOCAB, (2, 13))
    for chain in [*range(len(m.chains)), None]:
        ours = hf(x, chain=chain).logits
        assert ours.shape == (2, 13, VOCAB)
        torch.testing.assert_close(ours, m(x, chain=chain), rtol=0, atol=0)  # same ops, same order
        torch.testing.assert_close(ours, ref(x, chain=chain), **TOL)


@pytest.mark.parametrize("name", ["C1.1.2-gqa", "C2.2-air-tile"])
def test_padded_logits_equal_each_sequence_alone(name):
    """Left and right padding, a cache filled by a padded chunk, then more padded chunks."""
    _, hf = pair(name)
    a, b = torch.randint(1, VOCAB, (9,)), torch.randint(1, VOCAB, (4,))
    ids, mask = left_pad([a, b])
    out = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], hf(a[None]).logits[0], **TOL)
    torch.testing.assert_close(out[1, -4:], hf(b[None]).logits[0], **TOL)
    assert torch.all(out[1, :-4] == 0)  # padding is never computed
    # Right padding, no cache.
    right = torch.stack([a, torch.cat([b, torch.zeros(5, dtype=torch.long)])])
    rmask = (torch.arange(9)[None] < torch.tensor([[9], [4]])).long()
    out = hf(right, attention_mask=rmask, use_cache=False).logits
    torch.testing.assert_close(out[1, :4], hf(b[None]).logits[0], **TOL)
    # Prompt in two padded chunks through the cache, then a chunk of 3 tokens each.
    cache = hf.new_cache()
    hf(ids[:, :5], attention_mask=mask[:, :5], cache=cache)
    hf(ids[:, 5:], attention_mask=mask, cache=cache)
    assert cache.seq_lengths.tolist() == [9, 4]
    more = torch.randint(1, VOCAB, (2, 3))
    out = hf(more, attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1), cache=cache).logits
    torch.testing.assert_close(out[0], hf(torch.cat([a, more[0]])[None]).logits[0, -3:], **TOL)
    torch.testing.assert_close(out[1], hf(torch.cat([b, more[1]])[None]).logits[0, -3:], **TOL)


def test_loss_is_shifted_mean_cross_entropy_at_the_scale():
    m, hf = pair("C1.1.2-gqa")
    x = torch.randint(0, VOCAB, (2, 10))
    labels = x.clone()
    labels[0, 3] = -100
    for chain in range(3):
        out = hf(x, labels=labels, chain=chain, use_cache=False)
        want = F.cross_entropy(m(x, chain=chain)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        torch.testing.assert_close(out.loss, want, **TOL)
    losses = hf.multi_chain_loss(x, labels)
    want = torch.stack([hf(x, labels=labels, chain=c, use_cache=False).loss for c in range(3)])
    torch.testing.assert_close(losses, want, **TOL)
    weighted = hf(x, labels=labels, chain_weights=[0.5, 0.25, 1.0], use_cache=False).loss
    torch.testing.assert_close(weighted, (torch.tensor([0.5, 0.25, 1.0], dtype=F64) * want).sum(), **TOL)
    # Padded inputs: positions whose input is padding add nothing.
    ids, mask = left_pad([x[0], x[1, :6]])
    out = hf(ids, attention_mask=mask, labels=ids, chain=1, use_cache=False)
    alone = [hf(x[0:1], labels=x[0:1], chain=1, use_cache=False).loss,
             hf(x[1:2, :6], labels=x[1:2, :6], chain=1, use_cache=False).loss]
    torch.testing.assert_close(out.loss, (alone[0] * 9 + alone[1] * 5) / 14, **TOL)


def test_gradients_flow_through_padded_forward():
    m, hf = pair("C2.2-air-tile")
    hf.train()
    ids, mask = left_pad([torch.randint(1, VOCAB, (7,)), torch.randint(1, VOCAB, (3,))])
    hf(ids, attention_mask=mask, labels=ids).loss.backward()
    m.train()
    want = F.cross_entropy(m(ids[0:1])[0, :-1], ids[0, 1:], reduction="sum")
    want = (want + F.cross_entropy(m(ids[1:2, -3:])[0, :-1], ids[1, -2:], reduction="sum")) / 8
    want.backward()
    got = dict(hf.model.named_parameters())
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, **TOL, msg=lambda s: f"{name}: {s}")


# -- generate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_equals_colm_generate(name):
    m, hf = pair(name)
    x = torch.randint(1, VOCAB, (2, 6))
    for chain in [None, 0]:
        torch.testing.assert_close(gen(hf, x, 6, chain=chain), m.generate(x, 6, chain=chain), rtol=0, atol=0)


@pytest.mark.parametrize("name", AIR)
def test_air_prefill_at_chain_one_gives_full_prefill_tokens(name):
    m, hf = pair(name)
    x = torch.randint(1, VOCAB, (2, 7))
    full = gen(hf, x, 6)
    cheap = gen(hf, x, 6, prefill_chain=0)
    assert torch.equal(cheap, full)
    assert torch.equal(cheap, m.generate(x, 6, prefill_chain=0))
    # Left-padded prompts too.
    ids, mask = left_pad([x[0], x[1, 3:]])
    assert torch.equal(gen(hf, ids, 5, attention_mask=mask, prefill_chain=0), gen(hf, ids, 5, attention_mask=mask))


@pytest.mark.parametrize("name", ["C1.1.2-gqa", "C2.2.4-air-group"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_left_padded_batch_equals_each_prompt_alone(name, mode):
    _, hf = pair(name)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (3, 8, 5)]
    ids, mask = left_pad(prompts)
    kw = dict(num_beams=3) if mode == "beam" else {}
    for chain in [None, 1]:
        batch = gen(hf, ids, 6, attention_mask=mask, chain=chain, **kw)
        for i, p in enumerate(prompts):
            alone = gen(hf, p[None], 6, chain=chain, **kw)
            assert torch.equal(batch[i, ids.shape[1] - len(p):], alone[0]), (mode, chain, i)


def test_beam_search_with_cache_equals_without():
    _, hf = pair("C2.2-air-tile")
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (4, 7)])
    kw = dict(attention_mask=mask, num_beams=4, num_return_sequences=2)
    assert torch.equal(gen(hf, ids, 5, **kw), gen(hf, ids, 5, use_cache=False, **kw))


def test_sampling_is_reproducible_and_reads_the_model():
    _, hf = pair("C1.1.2-gqa")
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (5, 2)])
    kw = dict(attention_mask=mask, do_sample=True, temperature=0.8, top_k=10, top_p=0.9)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(gen(hf, ids, 8, **kw))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # top_k=1 sampling is greedy decoding: the sampler sees this model's logits.
    torch.manual_seed(3)
    assert torch.equal(gen(hf, ids, 8, attention_mask=mask, do_sample=True, top_k=1),
                       gen(hf, ids, 8, attention_mask=mask))
    # Sampling with a cache equals sampling without one (same random draws).
    torch.manual_seed(4)
    cached = gen(hf, ids, 6, **kw)
    torch.manual_seed(4)
    assert torch.equal(cached, gen(hf, ids, 6, use_cache=False, **kw))


def test_eos_stops_each_sequence():
    _, hf = pair("C2.2-air-tile")
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (6, 3)])
    free = gen(hf, ids, 8, attention_mask=mask)
    eos = int(free[0, ids.shape[1] + 2])  # row 0's third new token
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)
    new = out[:, ids.shape[1]:]
    stop = (new[0] == eos).nonzero()[0, 0]
    assert stop <= 2 and torch.equal(new[0, : stop + 1], free[0, ids.shape[1]: ids.shape[1] + stop + 1])
    assert torch.all(new[0, stop + 1:] == 0)  # padded after EOS
    for row in range(2):  # before its EOS each row is what it was without one
        hit = (new[row] == eos).nonzero()
        end = int(hit[0, 0]) + 1 if len(hit) else new.shape[1]
        assert torch.equal(new[row, :end], free[row, ids.shape[1]: ids.shape[1] + end])


def test_cache_holds_only_the_kv_heads_a_scale_reads():
    _, hf = pair("C1.1.2-gqa")  # 4 kv heads: chain 0 owns 1
    x = torch.randint(1, VOCAB, (2, 5))
    out = hf(x, chain=0)
    assert isinstance(out.cache, CoLMCache) and out.cache.held_kv_heads == 1
    assert hf(x).cache.held_kv_heads == 4
    with pytest.raises(ValueError, match="chain=2.*incomplete"):
        hf(x[:, :1], chain=2, cache=out.cache)
    _, air = pair("C2.2.4-air-group")  # shared heads, once, whatever the scale
    for chain in (0, 2):
        cache = air(x, chain=chain).cache
        assert cache.held_kv_heads == 2
        assert cache.layers[0].keys.shape == (2, 5, 2, 64 // 8)


# -- save / load / convert ----------------------------------------------------------------------
def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    m, hf = pair("C2.2.4-air-group")
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, CoLMHFConfig) and cfg.chains == [2, 2, 4] and cfg.kv_mapping == "chain_group"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=F64).eval()
    assert isinstance(loaded, CoLMForCausalLM)
    x = torch.randint(0, VOCAB, (2, 9))
    for chain in range(3):
        assert torch.equal(loaded(x, chain=chain).logits, hf(x, chain=chain).logits)


def test_to_hf_from_hf_keep_every_logit():
    m = colm("C1.1.2-gqa")
    back = from_hf(to_hf(m))
    assert isinstance(back, models.CoLM) and back.config == m.config
    assert set(to_hf(m).state_dict()) == {f"model.{k}" for k in m.state_dict()}
    x = torch.randint(0, VOCAB, (3, 8))
    for chain in range(3):
        assert torch.equal(back(x, chain=chain), m(x, chain=chain))


# -- from_llama ---------------------------------------------------------------------------------
def tiny_llama(n_kv=2, tie=False, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                   tie_word_embeddings=tie, max_position_embeddings=64)
    llama = transformers.LlamaForCausalLM(cfg).to(F64)
    return randomize(llama, seed).eval()


@pytest.mark.parametrize("case", ["one-chain", "grow-gqa", "grow-air", "tied-head"])
def test_from_llama_reproduces_the_llama(case):
    llama = tiny_llama(tie=case == "tied-head")
    chains = {"one-chain": (4,), "grow-gqa": (4, 4), "grow-air": (4, 2, 2), "tied-head": (4,)}[case]
    model = from_llama(llama, chains, kv_sharing=case == "grow-air").eval()
    assert model.config.chains == list(chains)
    x = torch.randint(0, VOCAB, (2, 11))
    want = llama(x).logits
    for chain in range(len(chains)):  # new chains' head columns are zero: every scale is the LLaMA
        torch.testing.assert_close(model(x, chain=chain).logits, want, **LLAMA_TOL)
    if len(chains) > 1:  # and the new chains are not zero themselves
        assert model.model.layers[0].attention.wq.mlps[1].weight.abs().max() > 0


def test_from_llama_rope_permutation_is_needed_and_invertible():
    llama = tiny_llama()
    w = llama.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(interleaved_to_half_split(half_split_to_interleaved(w, 4), 4), w)
    # Without the permutation (LLaMA rows in CoLM's interleaved RoPE) the logits change.
    state = {k: v for k, v in llama.state_dict().items()}
    for l in range(2):
        for p in ("q_proj", "k_proj"):
            key = f"model.layers.{l}.self_attn.{p}.weight"
            state[key] = interleaved_to_half_split(state[key], 4 if p == "q_proj" else 2)
    wrong = from_llama(state, (4,), config=llama.config).eval()
    x = torch.randint(0, VOCAB, (1, 9))
    assert not torch.allclose(wrong(x).logits, llama(x).logits, atol=1e-3)


def test_from_llama_generate_equals_llama_generate():
    llama = tiny_llama()
    model = from_llama(llama, (4, 4)).eval()
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (5, 3)])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), llama.generate(ids, **kw))


# -- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument(tmp_path):
    _, hf = pair("C1.1.2-gqa")
    x = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="chain=3 is out of range"):
        hf(x, chain=3)
    with pytest.raises(ValueError, match="chain=-1 is out of range"):
        gen(hf, x, 2, chain=-1)
    with pytest.raises(ValueError, match="prefill_chain=5"):
        gen(hf, x, 2, prefill_chain=5)
    with pytest.raises(ValueError, match="prefill_chain=0 < chain=2 without kv_sharing"):
        gen(hf, x, 2, prefill_chain=0)
    with pytest.raises(ValueError, match="attention_mask"):
        hf(x, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="masks every new token"):
        hf(x, attention_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="cache must be a CoLMCache"):
        hf(x, cache=transformers.DynamicCache(config=hf.config))
    with pytest.raises(ValueError, match="chain_weights"):
        hf(x, labels=x, chain_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="n_heads"):
        CoLMHFConfig(hidden_size=32, num_attention_heads=4, chains=[1, 2])
    # A checkpoint loaded with chains it was not trained with.
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="chains"):
        CoLMForCausalLM.from_pretrained(tmp_path, chains=[2, 2])
    # LLaMA shapes that cannot be expanded to the chains asked for.
    llama = tiny_llama()
    with pytest.raises(ValueError, match=r"chains=\(2, 2\).*chains\[0\]"):
        from_llama(llama, (2, 2))
    with pytest.raises(ValueError, match=r"chains=\(4, 1\) cannot grow this LLaMA.*n_kv_heads"):
        from_llama(llama, (4, 1))
    with pytest.raises(ValueError, match="kv_mapping='tile'"):
        from_llama(llama, (4, 4), kv_sharing=True, kv_mapping="tile")
    with pytest.raises(ValueError, match="config"):
        from_llama(llama.state_dict(), (4,))
    scaled = transformers.LlamaConfig(**{**llama.config.to_dict(), "rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})
    with pytest.raises(ValueError, match="rope type 'linear'"):
        from_llama(llama.state_dict(), (4,), config=scaled)


# -- the kernels ------------------------------------------------------------------------------------
@pytest.mark.skipif(backend_unavailable_reason("triton") is not None, reason="the triton backend cannot run here")
@pytest.mark.parametrize("name", ["C1.1.2-gqa", "C2.2-air-tile"])
def test_triton_backend_runs_padded_prefill_and_per_sequence_decode(name):
    """The ragged layouts on the Triton kernels (interpreter on CPU, float32): varlen prefill over
    left-padded prompts, decode over a cache holding a prefix of the kv heads, per-sequence lengths."""
    m = colm(name, n_layers=1, dim=64).float()  # head dim 16: the Triton kernels' smallest
    hf = to_hf(m).eval()
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (3, 6)])
    results = {}
    for backend in ("reference", "triton"):
        with ck.use_backend(backend):
            logits = hf(ids, attention_mask=mask, use_cache=False).logits
            tokens = gen(hf, ids, 3, attention_mask=mask, chain=1)
        results[backend] = logits, tokens
    torch.testing.assert_close(results["triton"][0], results["reference"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(results["triton"][1], results["reference"][1])
