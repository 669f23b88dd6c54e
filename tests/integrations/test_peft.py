"""LoRA with PEFT on the HF model: ``target_modules="all-linear"`` adapts every ``mlps.{i}`` of every
``ChainLinear`` (and CoLM-Air's plain ``wk``/``wv``, never the head); ``register_chain_lora`` lets
explicit names (``["wq", "w2"]``) target chain layers. ``ChainLinear`` adds each child's low-rank
term to its chain on top of one fused base GEMM, so:
- fine-tuning (a real ``Trainer``, bf16, checkpointing) gives every adapter a gradient and changes
  the model, while output chain i of every layer still reads input chains 1..i only, and the
  smallest sub-model does not move when later chains' weights or adapters do;
- ``merge_and_unload()`` gives a plain ``CoLMForCausalLM`` with the same logits at every scale;
- elastic inference (every scale, a scale per sequence, generate) works with adapters attached;
- a saved adapter loads back; unsupported adapter kinds raise instead of being skipped."""
import copy

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402

import colm_kernels as ck  # noqa: E402
from colm_kernels import models  # noqa: E402
from colm_kernels.backends import backend_unavailable_reason  # noqa: E402
from colm_kernels.integrations.hf import CoLMForCausalLM, from_hf, to_hf  # noqa: E402
from colm_kernels.integrations.peft import register_chain_lora  # noqa: E402
from colm_kernels.nn import ChainLinear  # noqa: E402
from colm_kernels.nn.adapters import is_adapted  # noqa: E402
from utils import F64, randomize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

VOCAB = 41
TOL = dict(rtol=1e-10, atol=1e-10)
CONFIGS = {"gqa": dict(chains=(1, 1, 2), n_kv_heads=4, kv_sharing=False),
           "air": dict(chains=(2, 2), n_kv_heads=2, kv_sharing=True, kv_mapping="chain_group")}


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def tiny_hf(name, dtype=F64):
    cfg = models.CoLMConfig(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, ffn_hidden_dim=32, rope_theta=10000.0,
                            **CONFIGS[name])
    return to_hf(randomize(models.CoLM(cfg).to(dtype), seed=4))


def lora(model, target_modules="all-linear", random_b=True, **kw):
    """``random_b``: adapters that already change the model (PEFT starts B at zero)."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=target_modules,
                             init_lora_weights=not random_b, **kw)
    if isinstance(target_modules, list):
        register_chain_lora(config)
    return peft.get_peft_model(model, config)


def chain_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ChainLinear)]


def assert_block_lower_triangular(model):
    """Every ChainLinear: output chain i unchanged when input chains > i change (adapters on)."""
    for name, m in chain_linears(model):
        ins, outs = m.chains.offsets(m.in_features), m.chains.offsets(m.out_features)
        x = torch.randn(2, 3, m.in_features, dtype=next(m.parameters()).dtype)
        y = m(x)
        for j in range(1, m.chains.n):
            x2 = x.clone()
            x2[..., ins[j]:] += torch.randn_like(x2[..., ins[j]:])
            y2 = m(x2)
            assert torch.equal(y2[..., : outs[j]], y[..., : outs[j]]), (name, j)
            assert not torch.equal(y2[..., outs[j]:], y[..., outs[j]:]), (name, j)


# -- which layers --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_all_linear_adapts_every_chain_layer_but_not_the_head(name):
    hf = tiny_hf(name)
    ids = torch.randint(0, VOCAB, (1, 4))
    base_logits = hf(ids).logits
    model = lora(hf, random_b=False)  # PEFT's init: B = 0, so the adapted model is the base one
    wrapped = {n for n, m in model.named_modules() if is_adapted(m)}
    want = {f"{n}.mlps.{i}" for n, m in chain_linears(model) for i in range(m.chains.n)}
    if name == "air":  # CoLM-Air's shared K/V are plain nn.Linear on chain 1
        want |= {n for n, _ in model.named_modules() if n.endswith((".attention.wk", ".attention.wv"))}
        assert len(want) == len(chain_linears(model)) * 2 + 4
    assert wrapped == want
    assert not any("output" in n for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)


def test_explicit_names_need_register_chain_lora():
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(tiny_hf("gqa"), peft.LoraConfig(r=2, target_modules=["wq"]))
    model = lora(tiny_hf("gqa"), ["wq", "w2"])
    wrapped = {n.split("layers.")[1] for n, m in model.named_modules() if is_adapted(m)}
    assert wrapped == {f"{layer}.{path}.mlps.{i}" for layer in (0, 1)
                       for path in ("attention.wq", "feed_forward.w2") for i in range(3)}
    assert_block_lower_triangular(model)


# -- the math ------------------------------------------------------------------------------------
def test_chain_linear_adds_each_childs_low_rank_term_to_its_chain():
    """Against the per-chain formula, with per-row scales (a row's terms beyond its scale are
    dropped: exact zeros there) and at a smaller scale."""
    layer = ChainLinear(24, 16, (1, 2, 1), bias=True).to(F64)
    model = peft.get_peft_model(torch.nn.Sequential(layer), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["0.mlps.0", "0.mlps.2"], init_lora_weights=False))
    lin = model.base_model.model[0]
    x = torch.randn(2, 5, 24, dtype=F64)
    ins, outs = lin.chains.prefixes(24), lin.chains.offsets(16)
    want = []
    for i, child in enumerate(lin.mlps):
        base = child.get_base_layer() if is_adapted(child) else child
        y = x[..., : ins[i]] @ base.weight.T + base.bias
        if is_adapted(child):
            y = y + child.lora_B["default"](child.lora_A["default"](x[..., : ins[i]])) * child.scaling["default"]
        want.append(y)
    want = torch.cat(want, -1)
    torch.testing.assert_close(lin(x), want, **TOL)
    torch.testing.assert_close(lin(x, chain=1), want[..., : outs[2]], **TOL)
    rows = torch.tensor([0, 2])
    got = lin(x, seq_chains=rows)
    torch.testing.assert_close(got[1], want[1], **TOL)
    torch.testing.assert_close(got[0, :, : outs[1]], want[0, :, : outs[1]], **TOL)
    assert torch.all(got[0, :, outs[1]:] == 0)
    got.sum().backward()
    assert lin.mlps[2].lora_A["default"].weight.grad.abs().sum() > 0  # only row 1 reaches chain 2


def test_unsupported_adapters_raise_naming_the_child():
    model = peft.get_peft_model(tiny_hf("gqa"), peft.LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    with pytest.raises(NotImplementedError, match=r"mlps\[0\].*DoRA"):
        model(torch.randint(0, VOCAB, (1, 4)))
    ia3 = peft.get_peft_model(tiny_hf("gqa"), peft.IA3Config(target_modules="all-linear", feedforward_modules=[]))
    with pytest.raises(NotImplementedError, match=r"mlps\[0\] is a Linear adapter layer.*LoRA"):
        ia3(torch.randint(0, VOCAB, (1, 4)))


# -- fine-tuning ---------------------------------------------------------------------------------
class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, length=9):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], labels=self.ids[i])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_fine_tuning_keeps_the_chains_and_merges_back(name, tmp_path):
    """The issue's done-when: LoRA on every linear layer, trained by Trainer (bf16, gradient
    accumulation, checkpointing), changes the model, keeps chain 1 independent of later chains'
    inputs, and merges back into a plain model with the same logits at every scale."""
    hf = tiny_hf(name, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 7))
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    base_logits = [hf(ids, chain=k).logits for k in range(len(hf.chains.sizes))]
    model = lora(hf, random_b=False)  # PEFT's own init: B = 0, the adapted model starts as the base
    torch.testing.assert_close(model(ids).logits, base_logits[-1], rtol=0, atol=0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=0.05, bf16=True, gradient_checkpointing=True, report_to=[], save_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    # accelerate leaves bf16 autocast around the trained model's forward; compare in float32.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)

    # Every adapter gets a gradient, the base weights stay frozen, the model changed.
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, n
    model.zero_grad()
    model.eval()
    base = {k.replace("base_layer.", ""): v for k, v in model.base_model.model.state_dict().items()
            if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in before.items())
    with torch.no_grad():
        tuned = [model(ids, chain=k).logits for k in range(len(base_logits))]
    for k, (t, b) in enumerate(zip(tuned, base_logits)):
        assert not torch.allclose(t, b, atol=1e-4), f"scale {k} did not change"

    # Still a chain model: every layer block-lower-triangular (adapters included).
    assert_block_lower_triangular(model)

    merged = model.merge_and_unload()
    assert type(merged) is CoLMForCausalLM and not any(is_adapted(m) for m in merged.modules())
    with torch.no_grad():
        for k, want in enumerate(tuned):
            torch.testing.assert_close(merged(ids, chain=k).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_hf(merged)(ids), tuned[-1], rtol=1e-5, atol=1e-5)  # a plain CoLM
        # The smallest sub-model does not see later chains' weights: perturb them all.
        smallest = merged(ids, chain=0).logits
        for n, p in merged.named_parameters():
            if ".mlps." in n and ".mlps.0." not in n:
                p.add_(torch.randn_like(p))
        assert torch.equal(merged(ids, chain=0).logits, smallest)
        assert not torch.allclose(merged(ids).logits, tuned[-1], atol=1e-3)


def test_merge_and_unload_keeps_every_logit_float64():
    for name in CONFIGS:
        model = lora(tiny_hf(name))
        ids = torch.randint(0, VOCAB, (2, 6))
        logits = [model(ids, chain=k).logits for k in range(len(CONFIGS[name]["chains"]))]
        merged = model.merge_and_unload()
        assert not any(is_adapted(m) for m in merged.modules())
        for k, want in enumerate(logits):
            torch.testing.assert_close(merged(ids, chain=k).logits, want, **TOL)


# -- inference with adapters attached ------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_elastic_inference_with_adapters_attached(name):
    """Every scale, a scale per sequence (core CoLM, ``seq_chains`` through the adapters) and
    generate, against the merged model."""
    model = lora(tiny_hf(name))
    merged = copy.deepcopy(model).merge_and_unload()
    ids = torch.randint(1, VOCAB, (3, 6))
    n = len(CONFIGS[name]["chains"])
    for k in range(n):
        torch.testing.assert_close(model(ids, chain=k).logits, merged(ids, chain=k).logits, **TOL)
    colm = model.base_model.model.model  # the models.CoLM inside, its ChainLinears adapted
    scales = torch.tensor([0, n - 1, 1])
    rows = colm(ids, chain=scales)
    for b in range(3):
        torch.testing.assert_close(rows[b], colm(ids[b: b + 1], chain=int(scales[b]))[0], **TOL)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    for k in (0, n - 1):
        assert torch.equal(model.generate(input_ids=ids, chain=k, **kw), merged.generate(ids, chain=k, **kw))


def test_saved_adapters_load_back(tmp_path):
    for targets in ("all-linear", ["wq", "w1", "w3"]):
        model = lora(tiny_hf("gqa"), targets)
        ids = torch.randint(0, VOCAB, (1, 5))
        want = model(ids).logits
        model.save_pretrained(tmp_path / str(len(targets)))
        config = peft.LoraConfig.from_pretrained(tmp_path / str(len(targets)))
        if isinstance(targets, list):  # PEFT keeps custom modules out of adapter_config.json
            register_chain_lora(config)
        loaded = peft.PeftModel.from_pretrained(tiny_hf("gqa"), tmp_path / str(len(targets)), config=config)
        torch.testing.assert_close(loaded(ids).logits, want, **TOL)


@pytest.mark.skipif(backend_unavailable_reason("triton") is not None, reason="the triton backend cannot run here")
def test_adapters_on_the_triton_kernels():
    """The base GEMMs on the Triton chain_linear kernels (interpreter, float32), adapters on top:
    the reference backend's logits and adapter gradients."""
    cfg = models.CoLMConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=VOCAB, chains=(2, 2),
                            ffn_hidden_dim=64, rope_theta=10000.0)
    model = lora(to_hf(randomize(models.CoLM(cfg), seed=5)))
    ids = torch.randint(0, VOCAB, (2, 5))
    runs = {}
    for backend in ("reference", "triton"):
        with ck.use_backend(backend, ops=["chain_linear"]):
            loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        runs[backend] = loss, grads
    torch.testing.assert_close(runs["triton"][0], runs["reference"][0], rtol=1e-4, atol=1e-5)
    for g, want in zip(runs["triton"][1], runs["reference"][1]):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
