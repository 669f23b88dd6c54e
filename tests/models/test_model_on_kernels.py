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
