"""Model-level benchmark cases: the figures users compare.

- ``colm_train_step``: one training step (forward, backward, AdamW step) of a CoLM at the
  LLaMA-3.2-1B layout (dim 2048, 16 layers, 32 heads, 8 kv heads, FFN 8192, vocab 128256) with
  chains (16, 16) and (8, 8, 8, 8): ``ours`` (``models.CoLM`` on the fastest backends, the
  multi-chain loss fused) against ``paper-naive``: the same weights run the way the paper's
  pseudo-code is written (a loop of per-chain ``nn.Linear``, a per-chain RMSNorm loop, K/V
  repeated per query head for SDPA, one logits tensor and one cross-entropy per scale).
- ``colm_air_prefill``: CoLM-Air prefill of one prompt at chain 1 (``chain=0``) against a full
  prefill, at 8K-32K tokens (the paper: 5.2x at 32K with 4 chains); both fill the KV cache that
  decoding at any scale then reads.

- ``colm_serving_decode``: elastic serving, one decode step of 64 sequences at four scales (a
  quarter at each, shuffled, each with its own cache length of a few thousand tokens) as ONE batch
  with per-sequence scales (``ours-mixed``) against one batch per scale (``ours-per-scale``: what a
  server without elastic batches runs) and everyone at the full scale (``ours-full-scale``). The
  mixed batch reads the weights of the active chains once instead of once per scale; the chain
  kernels skip the chains a sequence does not reach. CoLM-Air (the paper's serving model: prompts
  prefilled at chain 1) and plain CoLM.

``model_flops`` and ``decode_flops`` give the useful FLOPs (the roofline rows of ``colm-bench
--static``); ``serving_work`` counts the tensor-core FLOPs a decode step executes (interpreter).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, List

import torch
import torch.nn.functional as F

from ..chains import Chains
from .cases import Case
from .work import attention_flops, chain_gemm_flops

LAYOUT_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192, vocab_size=128256)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    chains: tuple
    layout: dict
    batch: int
    seq: int
    kv_sharing: bool = False

    def config(self):
        from ..models import CoLMConfig
        return CoLMConfig(chains=self.chains, kv_sharing=self.kv_sharing, **self.layout)

    @property
    def label(self) -> str:
        c = "C" + ".".join(map(str, self.chains))
        return f"B{self.batch}-S{self.seq}-L{self.layout['n_layers']}-D{self.layout['dim']}-{c}" + (
            "-air" if self.kv_sharing else "")


_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=97)
_SMALL = dict(LAYOUT_1B, n_layers=2, vocab_size=32000)
TRAIN_SIZES = {
    "default": [ModelCase(c, LAYOUT_1B, 2, 4096) for c in ((16, 16), (8, 8, 8, 8))],
    "small": [ModelCase((8, 8, 8, 8), _SMALL, 1, 2048)],
    "tiny": [ModelCase((2, 2), _TINY, 2, 17)],
}
PREFILL_SIZES = {
    "default": [ModelCase(c, LAYOUT_1B, 1, s, True) for c in ((16, 16), (8, 8, 8, 8)) for s in (8192, 16384, 32768)],
    "small": [ModelCase((8, 8, 8, 8), _SMALL, 1, 8192, True)],
    "tiny": [ModelCase((2, 2), _TINY, 1, 33, True)],
}


# ----------------------------------------------------------------------------------------------
# The paper's way, on the same parameters
# ----------------------------------------------------------------------------------------------
def _naive_linear(x, module, chain: int):
    """Algorithm 1: a Python loop of per-chain ``nn.Linear`` over input prefixes."""
    return torch.cat([F.linear(x[..., : m.in_features], m.weight, m.bias) for m in module.mlps[: chain + 1]], -1)


def _naive_norm(x, norm, chain: int):
    offs = norm.chains.offsets(norm.weight.shape[0])[: chain + 2]
    return torch.cat([F.rms_norm(x[..., a:b], (b - a,), norm.weight[a:b], norm.eps)
                      for a, b in zip(offs[:-1], offs[1:])], -1)


def naive_hidden(model, tokens, chain: int):
    """The final hidden states of ``models.CoLM`` computed the paper's way."""
    from ..nn.rope import apply_rotary, rope_angles

    cfg = model.config
    width = model.chains.active_width(cfg.dim, chain)
    h = model.tok_embeddings(tokens)[..., :width]
    angles = rope_angles(cfg.head_dim, 0, tokens.shape[1], cfg.rope_theta, tokens.device)
    kv_map = torch.tensor(model.chains.kv_head_map(cfg.n_kv_heads, kv_sharing=cfg.kv_sharing,
                                                   kv_mapping=cfg.kv_mapping, chain=chain), device=tokens.device)
    for layer in model.layers:
        att = layer.attention
        x = _naive_norm(h, layer.attention_norm, chain)
        q = apply_rotary(_naive_linear(x, att.wq, chain).unflatten(-1, (-1, cfg.head_dim)), angles)
        if cfg.kv_sharing:
            shared = x[..., : att.shared_width]
            k, v = F.linear(shared, att.wk.weight), F.linear(shared, att.wv.weight)
        else:
            k, v = _naive_linear(x, att.wk, chain), _naive_linear(x, att.wv, chain)
        k = apply_rotary(k.unflatten(-1, (-1, cfg.head_dim)), angles).index_select(2, kv_map)  # repeat
        v = v.unflatten(-1, (-1, cfg.head_dim)).index_select(2, kv_map)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + _naive_linear(o.transpose(1, 2).flatten(-2), att.wo, chain)
        ffn = layer.feed_forward
        x = _naive_norm(h, layer.ffn_norm, chain)
        h = h + _naive_linear(F.silu(_naive_linear(x, ffn.w1, chain)) * _naive_linear(x, ffn.w3, chain), ffn.w2, chain)
    return _naive_norm(h, model.norm, chain)


def naive_multi_chain_loss(model, tokens, targets):
    """One full-scale pass, then one logits tensor and one cross-entropy per scale."""
    h = naive_hidden(model, tokens, model.chains.n - 1)
    prefixes = model.chains.prefixes(model.config.dim)
    losses = []
    for p in prefixes:
        logits = F.linear(h[..., :p], model.output.weight[:, :p]).flatten(0, 1)
        losses.append(F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.flatten()))
    return torch.stack(losses)


# ----------------------------------------------------------------------------------------------
# Useful FLOPs
# ----------------------------------------------------------------------------------------------
def layer_gemm_flops(cfg, k: int, tokens: int, *, chain_kernels_only: bool = False) -> int:
    """Useful FLOPs of one layer's projections (wq, wk, wv, wo, w1, w3, w2) for ``tokens`` tokens
    at scale ``k``; ``chain_kernels_only`` leaves out CoLM-Air's shared wk / wv (plain
    ``nn.Linear``, not a chain kernel)."""
    c: Chains = cfg.chain_config

    def gemm(out_f, in_f):
        return chain_gemm_flops(tokens, list(c.prefixes(in_f))[: k + 1], list(c.widths(out_f))[: k + 1])

    if cfg.kv_sharing:
        kv = 0 if chain_kernels_only else 2 * 2 * tokens * c.prefixes(cfg.dim)[0] * cfg.kv_dim
    else:
        kv = 2 * gemm(cfg.kv_dim, cfg.dim)
    return 2 * gemm(cfg.dim, cfg.dim) + kv + 2 * gemm(cfg.ffn_hidden_dim, cfg.dim) + gemm(cfg.dim, cfg.ffn_hidden_dim)


def model_flops(case: ModelCase, chain=None, train: bool = True) -> float:
    """Useful FLOPs of a forward (``train=False``: one prefill pass at ``chain``) or of a training
    step's forward and backward at full scale with the multi-chain loss (optimizer excluded)."""
    cfg = case.config()
    c: Chains = cfg.chain_config
    k = c.check_chain(chain)
    sub = Chains(c.sizes[: k + 1])
    tokens = case.batch * case.seq
    hd = cfg.head_dim
    width = c.active_width(cfg.dim, k)
    per_layer = (layer_gemm_flops(cfg, k, tokens)
                 + attention_flops(case.batch, sub.total, case.seq, case.seq, hd, True, 2))
    head = 2 * tokens * width * cfg.vocab_size if train else 0  # prefill computes no logits
    fwd = cfg.n_layers * per_layer + head
    if not train:
        return float(fwd)
    # backward: dX and dW of every GEMM (2x), attention's five-matmul backward (2.5x its forward)
    attn = cfg.n_layers * attention_flops(case.batch, sub.total, case.seq, case.seq, hd, True, 2)
    return float(3 * (fwd - attn) + 3.5 * attn)


def model_bytes(case: ModelCase, es: int = 2, train: bool = True) -> float:
    """Bytes a step must move at least: the parameters read (twice in training: forward and
    backward) and, in training, their gradients and two AdamW states read and written."""
    from ..models import CoLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in CoLM(case.config()).parameters())
    return float(n_params * es * ((2 + 1 + 4 + 1) if train else 1))


# ----------------------------------------------------------------------------------------------
# Elastic serving: one decode step
# ----------------------------------------------------------------------------------------------
# ``seq`` is the cache capacity; each sequence has cached between seq / 2 and seq - 1 tokens.
SERVE_SIZES = {
    "default": [ModelCase((8, 8, 8, 8), LAYOUT_1B, 64, 4096, air) for air in (True, False)],
    "small": [ModelCase((8, 8, 8, 8), _SMALL, 64, 1024, True)],
    "tiny": [ModelCase((1, 1, 1, 1), dict(_TINY, n_kv_heads=1), 8, 33, True)],
}
# The work count's model (interpreter, H100 tiles): 4 chains of width 128, one layer, 16 sequences
# per scale (a real decode batch: each per-scale batch fills a fraction of one 128-row tile) and
# 128 per scale (every batch fills whole tiles).
SERVE_WORK = [ModelCase((1, 1, 1, 1), dict(dim=512, n_layers=1, n_heads=4, n_kv_heads=1, ffn_hidden_dim=1024,
                                           vocab_size=256), b, 64, True) for b in (64, 512)]


def serving_batch(case: ModelCase, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, past)``, both ``(B,)`` on the CPU: every scale on an equal share of the sequences
    in shuffled order, and each sequence's cached length in ``[seq / 2, seq)``."""
    n = len(case.chains)
    gen = torch.Generator().manual_seed(seed)
    scales = (torch.arange(case.batch) % n)[torch.randperm(case.batch, generator=gen)]
    past = torch.randint(case.seq // 2, case.seq, (case.batch,), generator=gen)
    return scales, past


def active_weights(cfg, k: int) -> int:
    """Weight elements a decode step at scale ``k`` reads: the projections' active blocks, the
    norms' and the output head's first ``P_(k+1)`` columns (the embedding rows are negligible)."""
    width = cfg.chain_config.active_width(cfg.dim, k)
    return cfg.n_layers * (layer_gemm_flops(cfg, k, 1) // 2 + 2 * width) + (cfg.vocab_size + 1) * width


def _kv_heads_read(cfg, k: int) -> int:
    """kv heads a sequence at scale ``k`` reads: CoLM-Air's shared ones all, else its chains'."""
    c = cfg.chain_config
    return cfg.n_kv_heads if cfg.kv_sharing else cfg.n_kv_heads * sum(c.sizes[: k + 1]) // c.total


def decode_flops(cfg, scales, past, *, chain_kernels_only: bool = False) -> float:
    """Useful FLOPs of one decode step: sequence ``b`` at scale ``scales[b]`` after ``past[b]``
    cached tokens (projections, attention over its ``past + 1`` keys, its scale's logits).
    ``chain_kernels_only``: only what the chain kernels compute (no logits, no CoLM-Air wk / wv)."""
    c: Chains = cfg.chain_config
    total = 0
    for s, n_past in zip(scales, past):
        s, n_past = int(s), int(n_past)
        heads = sum(c.sizes[: s + 1])
        total += cfg.n_layers * (layer_gemm_flops(cfg, s, 1, chain_kernels_only=chain_kernels_only)
                                 + attention_flops(1, heads, 1, n_past + 1, cfg.head_dim, True, 2))
        if not chain_kernels_only:
            total += 2 * c.active_width(cfg.dim, s) * cfg.vocab_size
    return float(total)


def decode_bytes(cfg, batch_scales, scales, past, es: int = 2) -> float:
    """Bytes a decode step must move at least: the active weights once per batch (one batch per
    entry of ``batch_scales``, at that scale) and every sequence's cached K/V once."""
    weights = sum(active_weights(cfg, k) for k in batch_scales)
    kv = sum(2 * (int(n) + 1) * _kv_heads_read(cfg, int(s)) * cfg.head_dim for s, n in zip(scales, past))
    return float((weights + cfg.n_layers * kv) * es)


SERVE_PROVIDERS = ("ours-mixed", "ours-per-scale", "ours-full-scale")


def serving_runs(case: ModelCase, device, dtype, model=None) -> dict:
    """One decode step per provider, as ``{provider: run}``: ``ours-mixed`` (one batch, a scale per
    sequence), ``ours-per-scale`` (one batch per scale, run one after the other) and
    ``ours-full-scale`` (the whole batch at the full scale). Each run writes its K/V at the same
    slots every call, so it can be repeated (and captured in a CUDA graph)."""
    from ..models.generation import decode_logits
    from ..models.ragged import PackedKVCache
    from ..models.scales import Scale

    model = model if model is not None else _model(case, device, dtype)
    n = len(case.chains)
    scales, past = serving_batch(case)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, case.layout["vocab_size"], (case.batch, 1), generator=gen)

    def step(rows, scale: Scale):
        cache = PackedKVCache(model.new_cache(len(rows), case.seq))
        last, n_past = tokens[rows].to(device), past[rows]
        host = (int(n_past.max()), int(n_past.sum()))
        n_past = n_past.to(device=device, dtype=torch.int32)

        @torch.no_grad()
        def run():
            return decode_logits(model, last, scale, cache, n_past, *host).argmax(-1)
        return run

    everyone = torch.arange(case.batch)
    mixed = step(everyone, Scale(n - 1, scales.to(device)))
    per_scale = [step((scales == k).nonzero().squeeze(1), Scale(k)) for k in range(n)]
    return {"ours-mixed": mixed, "ours-per-scale": lambda: [run() for run in per_scale],
            "ours-full-scale": step(everyone, Scale(n - 1))}


def serving_work(case: ModelCase, dtype=torch.float16) -> dict:
    """Executed tensor-core FLOPs of one decode step of ``case`` per provider (``count_mma_flops``:
    needs ``TRITON_INTERPRET=1``, and ``COLM_KERNELS_TILES=gpu`` for the H100's tiles), every op
    on triton, beside the useful FLOPs of the chain kernels (``"useful"``)."""
    from .. import backends
    from .work import count_mma_flops

    runs = serving_runs(case, "cpu", dtype)
    out = {}
    with backends.use_backend("triton"):
        for provider in ("ours-mixed", "ours-per-scale"):
            with count_mma_flops() as work:
                runs[provider]()
            out[provider] = work.total
    scales, past = serving_batch(case)
    out["useful"] = decode_flops(case.config(), scales, past, chain_kernels_only=True)
    return out


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
def _model(case: ModelCase, device, dtype):
    from ..models import CoLM

    torch.manual_seed(0)
    with torch.device(device):
        return CoLM(case.config()).to(dtype)


def colm_train_step_cases(size: str, device, dtype) -> Iterator[Case]:
    for case in TRAIN_SIZES[size]:
        model = _model(case, device, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        gen = torch.Generator(device=device).manual_seed(0)
        tokens = torch.randint(0, case.layout["vocab_size"], (case.batch, case.seq), device=device, generator=gen)
        targets = torch.randint(0, case.layout["vocab_size"], (case.batch, case.seq), device=device, generator=gen)

        def step(loss_fn, model=model, opt=opt, tokens=tokens, targets=targets):
            def run():
                loss = loss_fn(model, tokens, targets).sum()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return run

        flops = model_flops(case)
        note = "fwd + bwd + AdamW; useful FLOPs of fwd and bwd (chain-sparse GEMMs, causal attention)"
        for provider, fn in (("paper-naive", naive_multi_chain_loss),
                             ("ours", lambda m, t, y: m.multi_chain_loss(t, y))):
            yield Case("colm_train_step", provider, case.label, "step", step(fn), flops=flops,
                       bytes=model_bytes(case), peer="paper-naive", note=note)
        del model, opt


def colm_air_prefill_cases(size: str, device, dtype) -> Iterator[Case]:
    for case in PREFILL_SIZES[size]:
        model = _model(case, device, dtype)
        prompt = torch.randint(0, case.layout["vocab_size"], (case.batch, case.seq), device=device)

        def prefill(chain, model=model, prompt=prompt, case=case):
            @torch.no_grad()
            def run():
                cache = model.new_cache(case.batch, case.seq)
                model.hidden(prompt, chain, cache)
            return run

        full = model_flops(case, None, train=False)
        for provider, chain in (("ours-full", None), ("ours-chain0", 0)):
            yield Case("colm_air_prefill", provider, case.label, "prefill", prefill(chain),
                       flops=model_flops(case, chain, train=False), bytes=model_bytes(case, train=False),
                       peer="ours-full",
                       note=f"fills the whole KV cache; useful FLOPs {model_flops(case, chain, train=False) / full:.2f}x full")
        del model


def colm_serving_decode_cases(size: str, device, dtype) -> Iterator[Case]:
    for case in SERVE_SIZES[size]:
        model = _model(case, device, dtype)
        cfg, n = case.config(), len(case.chains)
        scales, past = serving_batch(case)
        runs = serving_runs(case, device, dtype, model)
        es = torch.finfo(dtype).bits // 8
        useful = decode_flops(cfg, scales, past)
        rows = {
            "ours-mixed": (useful, decode_bytes(cfg, [n - 1], scales, past, es),
                           "one batch, a scale per sequence: weights read once"),
            "ours-per-scale": (useful, decode_bytes(cfg, range(n), scales, past, es),
                               f"{n} batches, one per scale, run one after the other"),
            "ours-full-scale": (decode_flops(cfg, [n - 1] * case.batch, past),
                                decode_bytes(cfg, [n - 1], [n - 1] * case.batch, past, es),
                                "every sequence at the full scale (other tokens)"),
        }
        for provider, (flops, nbytes, note) in rows.items():
            yield Case("colm_serving_decode", provider, case.label, "decode", runs[provider], flops=flops,
                       bytes=nbytes, peer="ours-per-scale", cudagraph=True,
                       note=f"{note}; cached lengths {int(past.min())}..{int(past.max())}")
        del model, runs


MODEL_CASES = {"colm_train_step": colm_train_step_cases, "colm_air_prefill": colm_air_prefill_cases,
               "colm_serving_decode": colm_serving_decode_cases}
MODEL_SIZES = {"colm_train_step": TRAIN_SIZES, "colm_air_prefill": PREFILL_SIZES,
               "colm_serving_decode": SERVE_SIZES}


def labels(op: str, size: str) -> List[str]:
    return [c.label for c in MODEL_SIZES[op][size]]
