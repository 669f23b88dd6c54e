"""The whole model on the kernel backends: ``models.CoLM`` with some (or all) ops on ``triton``
(the interpreter on CPU) gives the reference backend's logits and parameter gradients."""

import pytest
import torch

import colm_kernels as ck
from colm_kernels import backends
from colm_kernels.models import CoLM, CoLMConfig

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Ops a forward pass runs (decode attention runs only inside generate).
TRITON_OPS = sorted(op for op in backends.ops()
                    if "triton" in backends.registered(op) and op != "chain_attention_decode")


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["gqa", "shared"])
@pytest.mark.parametrize("ops", [[op] for op in TRITON_OPS] + [TRITON_OPS],
                         ids=lambda ops: "all" if len(ops) > 1 else ops[0])
def test_model_matches_reference_backend(ops, kv_sharing):
    cfg = CoLMConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=29, chains=(2, 2),
                     ffn_hidden_dim=64, kv_sharing=kv_sharing, kv_mapping="chain_group")
    model = CoLM(cfg).to(DEVICE)
    tokens = torch.randint(0, 29, (2, 7), device=DEVICE)
    params = list(model.parameters())
    for chain in (0, 1):
        with ck.use_backend("reference"):
            ref = model(tokens, chain)
        grads_ref = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
        with ck.use_backend("triton", ops=ops):  # the other ops keep ``auto``
            out = model(tokens, chain)
        grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for g, gr in zip(grads, grads_ref):
            assert (g is None) == (gr is None)
            if g is not None:
                torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


ALL_TRITON = sorted(op for op in backends.ops() if "triton" in backends.registered(op))


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["gqa", "shared"])
def test_generate_on_kernels_gives_reference_tokens(kv_sharing):
    """Every op on triton, decode steps on the split-K kernel: exactly the tokens of the plain
    reference model, with scale switching (and, for CoLM-Air, a chain-1 prefill)."""
    from colm_kernels import reference
    from utils import randomize

    cfg = CoLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=29, chains=(2, 2),
                     ffn_hidden_dim=64, kv_sharing=kv_sharing, kv_mapping="tile")
    model = randomize(CoLM(cfg), seed=3).to(DEVICE)  # O(1) weights: well separated logits
    ref = reference.CoLM(cfg).to(DEVICE)
    ref.load_state_dict(model.state_dict())
    prompt = torch.randint(0, 29, (2, 6), device=DEVICE)
    if kv_sharing:
        scales, prefill = [1, 0, 1, 1, 0], 0
    else:
        scales, prefill = [1, 1, 0, 0, 0], None  # without sharing a scale may only go down
    expected = ref.generate(prompt, len(scales), chain=scales, prefill_chain=prefill)
    with ck.use_backend("triton", ops=ALL_TRITON):
        got = model.generate(prompt, len(scales), chain=scales, prefill_chain=prefill)
    assert torch.equal(got, expected)


def _small(kv_sharing, seed=3):
    """Head dim 16 (the Triton attention kernels' smallest), unequal chains, O(1) weights."""
    from utils import randomize

    cfg = CoLMConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=1 if kv_sharing else 4, vocab_size=29,
                     chains=(1, 2, 1), ffn_hidden_dim=64, kv_sharing=kv_sharing)
    return randomize(CoLM(cfg), seed=seed).to(DEVICE)


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["mha", "shared"])
def test_per_sequence_scales_on_kernels_equal_each_sequence_alone(kv_sharing):
    """``model(tokens, chain=(B,) tensor)`` with every op on triton (float32, the interpreter on
    CPU): each row equals that sequence alone at its scale on triton, and the reference backend."""
    model = _small(kv_sharing)
    tokens = torch.randint(0, 29, (3, 6), device=DEVICE)
    scales = torch.tensor([2, 0, 1], device=DEVICE)
    with torch.no_grad():
        with ck.use_backend("reference"):
            ref = model(tokens, chain=scales)
        with ck.use_backend("triton", ops=ALL_TRITON):
            mixed = model(tokens, chain=scales)
            for b, s in enumerate(scales.tolist()):
                torch.testing.assert_close(mixed[b:b + 1], model(tokens[b:b + 1], chain=s), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["mha", "shared"])
def test_left_padded_per_sequence_generate_on_kernels(kv_sharing):
    """Left-padded prompts (varlen prefill), a scale per sequence (per step for CoLM-Air, after a
    chain-1 prefill), a paged cache: every op on triton gives each prompt's tokens alone, and the
    reference backend's tokens."""
    model = _small(kv_sharing, seed=5)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 29, (n,), generator=gen).to(DEVICE) for n in (2, 5, 1)]
    batch = torch.zeros(3, 5, dtype=torch.long, device=DEVICE)
    mask = torch.zeros(3, 5, dtype=torch.long, device=DEVICE)
    for b, p in enumerate(prompts):
        batch[b, 5 - len(p):], mask[b, 5 - len(p):] = p, 1
    if kv_sharing:
        steps, prefill = [torch.tensor([2, 0, 1], device=DEVICE), 0, torch.tensor([0, 2, 2], device=DEVICE)], 0
    else:
        steps, prefill = [torch.tensor([2, 0, 1], device=DEVICE)] * 3, None
    per_seq = [[s if isinstance(s, int) else int(s[b]) for s in steps] for b in range(3)]
    with ck.use_backend("reference"):
        expected = model.generate(batch, 3, steps, prefill, attention_mask=mask)
    with ck.use_backend("triton", ops=ALL_TRITON):
        got = model.generate(batch, 3, steps, prefill, attention_mask=mask, page_size=2)
        for b, p in enumerate(prompts):
            assert torch.equal(got[b, 5:], model.generate(p[None], 3, per_seq[b], prefill)[0, len(p):]), b
    assert torch.equal(got, expected)
