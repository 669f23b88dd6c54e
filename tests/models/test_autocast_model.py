"""``models.CoLM`` under ``torch.autocast`` with float32 weights (mixed-precision training): the
per-scale losses (float32), elastic logits (the autocast dtype, as ``F.linear`` gives) and every
parameter gradient (float32) against the float32 run; bf16 on the reference backend, fp16 on the
Triton kernels (interpreter), CUDA bf16 on a GPU (skipped without one). Generation under autocast
keeps its KV cache in the autocast dtype and picks the float32 model's tokens up to that dtype's
rounding; ``torch.compile`` gives eager's losses and gradients."""
import pytest
import torch

import colm_kernels as ck
from colm_kernels.backends import backend_unavailable_reason
from colm_kernels.models import CoLM, CoLMConfig
from utils import randomize

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

BF16, FP16 = torch.bfloat16, torch.float16
CONFIGS = {
    "gqa": dict(chains=(1, 1, 2), n_kv_heads=4, kv_sharing=False),
    "air": dict(chains=(2, 2), n_kv_heads=2, kv_sharing=True, kv_mapping="chain_group"),
}
# Max error over the largest magnitude of the float32 result (O(1) weights, 2 layers); the worst
# seen: 0.050 (bf16, a weight gradient) and 0.003 (fp16).
REL_TOL = {BF16: 0.08, FP16: 0.01}


def colm(name, n_layers=2, seed=0):
    cfg = CoLMConfig(dim=64, n_layers=n_layers, n_heads=4, vocab_size=37, ffn_hidden_dim=64, **CONFIGS[name])
    return randomize(CoLM(cfg), seed)


def assert_rel_close(got, want, tol, name):
    assert got.shape == want.shape, name
    err, scale = (got.float() - want.float()).abs().max().item(), want.abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x {scale:.3g}"


def step(model, tokens):
    """Per-scale losses, chain-1 logits, and the gradient of both w.r.t. every parameter."""
    losses = model.multi_chain_loss(tokens, tokens)
    logits = model(tokens, chain=0)
    grads = torch.autograd.grad(losses.sum() + logits.float().square().mean(), list(model.parameters()))
    return losses, logits, grads


RUNS = {"reference-bf16": ("cpu", "reference", BF16), "triton-fp16": ("cpu", "triton", FP16),
        "cuda-bf16": ("cuda", "auto", BF16)}


# The interpreter takes ~10 s a config: Triton runs the per-chain KV config, whose kernels' head
# layouts differ most from the reference's. On a GPU (skipped without one) every config runs on the
# backends ``auto`` picks there (cuda, then triton).
@pytest.mark.parametrize("name,run", [("gqa", "reference-bf16"), ("air", "reference-bf16"), ("gqa", "triton-fp16"),
                                      ("gqa", "cuda-bf16"), ("air", "cuda-bf16")])
def test_training_step_under_autocast_matches_float32(name, run):
    device, backend, dtype = RUNS[run]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA autocast needs a CUDA GPU")
    if backend_unavailable_reason(backend):
        pytest.skip(backend_unavailable_reason(backend))
    model = colm(name, n_layers=1 if backend == "triton" else 2).to(device)
    tokens = torch.randint(0, 37, (2, 9), device=device)
    with ck.use_backend(backend):
        losses32, logits32, grads32 = step(model, tokens)
        with torch.autocast(device, dtype=dtype):
            losses, logits, grads = step(model, tokens)
    assert losses.dtype == torch.float32 and logits.dtype == dtype
    assert_rel_close(losses, losses32, REL_TOL[dtype], "losses")
    assert_rel_close(logits, logits32, REL_TOL[dtype], "chain-1 logits")
    for (pname, p), g, g32 in zip(model.named_parameters(), grads, grads32):
        assert g.dtype == p.dtype == torch.float32, pname
        assert g32.abs().max() > 0, pname
        assert_rel_close(g, g32, REL_TOL[dtype], pname)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_under_autocast(name):
    """Every token generated under bf16 autocast (scales switching downwards) is the float32
    model's argmax at its position up to bf16 rounding of the logits; the cache is bf16."""
    model = colm(name).eval()
    prompt = torch.randint(0, 37, (2, 4))
    scales = [2, 1, 0] if name == "gqa" else [1, 1, 0]
    with ck.use_backend("reference"):
        with torch.autocast("cpu", dtype=BF16):
            out = model.generate(prompt, 3, chain=scales)
            assert model.new_cache(2, 8).k[0].dtype == BF16
        assert model.new_cache(2, 8).k[0].dtype == torch.float32
        for step_, scale in enumerate(scales):
            pos = prompt.shape[1] + step_
            logits = model(out[:, :pos], chain=scale)[:, -1]
            chosen = logits.gather(1, out[:, pos:pos + 1]).squeeze(1)
            assert torch.all(chosen >= logits.max(1).values - 0.1), (step_, chosen, logits.max(1).values)


def test_compiled_model_under_autocast_equals_eager():
    model = colm("air", n_layers=1)
    tokens = torch.randint(0, 37, (2, 9))
    compiled = torch.compile(model.multi_chain_loss, backend="aot_eager", fullgraph=True)
    with ck.use_backend("reference"), torch.autocast("cpu", dtype=BF16):
        eager = model.multi_chain_loss(tokens, tokens)
        got = compiled(tokens, tokens)
    params = list(model.parameters())
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(eager.sum(), params)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
