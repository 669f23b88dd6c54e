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

``model_flops`` gives the useful FLOPs of both (the roofline rows of ``colm-bench --static``).
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
def model_flops(case: ModelCase, chain=None, train: bool = True) -> float:
    """Useful FLOPs of a forward (``train=False``: one prefill pass at ``chain``) or of a training
    step's forward and backward at full scale with the multi-chain loss (optimizer excluded)."""
    cfg = case.config()
    c: Chains = cfg.chain_config
    k = c.check_chain(chain)
    sub = Chains(c.sizes[: k + 1])
    tokens = case.batch * case.seq
    dim, hd = cfg.dim, cfg.head_dim
    width = c.active_width(dim, k)
    d_in = list(c.prefixes(dim))[: k + 1]

    def gemm(out_f, in_f):
        return chain_gemm_flops(tokens, list(c.prefixes(in_f))[: k + 1], list(c.widths(out_f))[: k + 1])

    if cfg.kv_sharing:
        kv = 2 * 2 * tokens * d_in[0] * cfg.kv_dim
    else:
        kv = 2 * gemm(cfg.kv_dim, dim)
    per_layer = (2 * gemm(dim, dim) + kv + 2 * gemm(cfg.ffn_hidden_dim, dim) + gemm(dim, cfg.ffn_hidden_dim)
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


MODEL_CASES = {"colm_train_step": colm_train_step_cases, "colm_air_prefill": colm_air_prefill_cases}
MODEL_SIZES = {"colm_train_step": TRAIN_SIZES, "colm_air_prefill": PREFILL_SIZES}


def labels(op: str, size: str) -> List[str]:
    return [c.label for c in MODEL_SIZES[op][size]]
