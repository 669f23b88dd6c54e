"""``colm_kernels.integrations.hf`` as users load it: a checkpoint loads in a fresh process through
its ``auto_map`` (``trust_remote_code=True``, colm_kernels installed but not imported), ``AutoModel``
gives the base model, ``max_position_embeddings`` is in the config, ``attn_implementation`` values
are accepted or refused saying what the model uses, out-of-vocabulary ids raise ``ValueError``, and
``generate`` runs under autocast."""
import json
import os
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

import colm_kernels as ck  # noqa: E402
from colm_kernels import models  # noqa: E402
from colm_kernels.integrations.hf import CoLMForCausalLM, CoLMHFConfig, CoLMModel, from_llama, to_hf  # noqa: E402
from utils import F64, randomize  # noqa: E402

VOCAB = 41
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def tiny_hf(kv_sharing=True, dtype=F64):
    cfg = models.CoLMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2 if kv_sharing else 4, vocab_size=VOCAB,
                            chains=(2, 2) if kv_sharing else (1, 1, 2), ffn_hidden_dim=32, rope_theta=10000.0,
                            kv_sharing=kv_sharing)
    return to_hf(randomize(models.CoLM(cfg).to(dtype), seed=2)).eval()


FRESH_PROCESS = r"""
import json, sys
import torch, transformers
assert "colm_kernels" not in sys.modules
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
lm = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64)
base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64)
print(json.dumps(dict(
    classes=[type(o).__module__ + "." + type(o).__name__ for o in (config, lm, base)],
    logits=lm(ids, chain=0).logits.tolist(), hidden=base(ids).last_hidden_state.tolist())))
"""


def test_checkpoint_loads_in_a_fresh_process_through_auto_map(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "colm_auto.CoLMHFConfig", "AutoModel": "colm_auto.CoLMModel",
                                  "AutoModelForCausalLM": "colm_auto.CoLMForCausalLM"}
    assert (tmp_path / "ckpt" / "colm_auto.py").exists()
    ids = torch.randint(0, VOCAB, (2, 6))
    env = dict(os.environ, PYTHONPATH=ROOT, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "ckpt"), json.dumps(ids.tolist())],
                         env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    hf_mod = "colm_kernels.integrations.hf"
    assert got["classes"] == [f"{hf_mod}.config.CoLMHFConfig", f"{hf_mod}.modeling.CoLMForCausalLM",
                              f"{hf_mod}.modeling.CoLMModel"]
    torch.testing.assert_close(torch.tensor(got["logits"], dtype=F64), hf(ids, chain=0).logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(got["hidden"], dtype=F64), hf.model.hidden(ids), rtol=1e-12, atol=1e-12)


def test_auto_model_is_the_base_model(tmp_path):
    hf = tiny_hf(kv_sharing=False)
    assert isinstance(transformers.AutoModel.from_config(hf.config), CoLMModel)
    hf.save_pretrained(tmp_path)
    base = transformers.AutoModel.from_pretrained(tmp_path, dtype=F64).eval()
    assert type(base) is CoLMModel
    ids = torch.randint(0, VOCAB, (2, 7))
    for chain in range(3):
        out = base(ids, chain=chain)
        torch.testing.assert_close(out.last_hidden_state, hf.model.hidden(ids, chain), rtol=1e-12, atol=1e-12)
    # A base-model checkpoint (same keys) loads back into the causal LM.
    base.save_pretrained(tmp_path / "base")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=F64).eval()
    torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=1e-12, atol=1e-12)


def test_max_position_embeddings_is_in_the_config(tmp_path):
    hf = tiny_hf()
    assert hf.config.max_position_embeddings == 2048  # LlamaConfig's default
    cfg = CoLMHFConfig(hidden_size=32, num_attention_heads=4, chains=[2, 2], max_position_embeddings=4096)
    cfg.save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).max_position_embeddings == 4096
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=96))
    assert from_llama(llama, (4, 4)).config.max_position_embeddings == 96


@pytest.mark.parametrize("impl", [None, "eager", "sdpa"])
def test_attn_implementation_names_the_one_attention(tmp_path, impl):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    loaded = CoLMForCausalLM.from_pretrained(tmp_path, attn_implementation=impl, dtype=F64).eval()
    assert loaded.config._attn_implementation == (impl or "eager")
    ids = torch.randint(0, VOCAB, (1, 5))
    want = hf(ids).logits
    torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-12, atol=1e-12)
    loaded.set_attn_implementation("sdpa")
    assert loaded.config._attn_implementation == "sdpa"
    torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention", "paged|eager"])
def test_other_attn_implementations_are_refused_saying_what_the_model_uses(tmp_path, impl):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"attn_implementation='{impl}'.*chain_attention"):
        CoLMForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)
    with pytest.raises(ValueError, match="chain_attention"):
        hf.set_attn_implementation(impl)


def test_out_of_vocabulary_ids_raise_value_errors_naming_input_ids():
    hf = tiny_hf()
    base = CoLMModel(hf.config).to(F64)
    for bad in (VOCAB, -1):
        ids = torch.tensor([[1, 2, bad]])
        for call in (lambda: hf(ids), lambda: base(ids), lambda: hf.multi_chain_loss(ids, ids),
                     lambda: hf.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)):
            with pytest.raises(ValueError, match=rf"input_ids values must be in \[0, {VOCAB - 1}\]"):
                call()


def test_generate_under_autocast():
    """HF ``generate`` under bf16 autocast with float32 weights: bf16 logits and KV cache; every
    new token is the float32 model's argmax at its position up to bf16 rounding."""
    hf = tiny_hf(dtype=torch.float32)
    ids = torch.randint(1, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hf(ids, attention_mask=mask)
        assert out.logits.dtype == torch.bfloat16 and out.cache.layers[0].keys.dtype == torch.bfloat16
        new = hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    logits = hf(new[:, :-1], attention_mask=full_mask[:, :-1]).logits[:, ids.shape[1] - 1:]
    chosen = logits.gather(2, new[:, ids.shape[1]:, None]).squeeze(2)
    assert torch.all(chosen >= logits.max(2).values - 0.1)
