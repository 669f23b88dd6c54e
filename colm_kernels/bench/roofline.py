"""``colm-bench --static`` part ``roofline``: for every default bench case, the useful FLOPs and the
bytes it must move at least (inputs read once, outputs written once), the time each needs on an
H100 (``flops_ms``: FLOPs / 790 TFLOP/s bf16; ``hbm_ms``: bytes / 3.35 TB/s, the H100 SXM's HBM3
peak) and the lower bound ``max`` of the two that no kernel can beat. Never a measurement. The
bytes the kernels really move are counted in the ``work`` part (``count_memory_traffic``)."""
from __future__ import annotations

from typing import List

from .cases import chains_label
from .report import H100_CEILINGS

__all__ = ["roofline"]


# The memory side of the bound is the spec peak (H100_CEILINGS' 3 TB/s is what copies reach: the
# share of peak of timed rows), so that no kernel can beat the bound.
H100_HBM_PEAK_TB_S = 3.35


def _bound(flops: float, nbytes: float) -> dict:
    t_flops = flops / (H100_CEILINGS["bf16_tflops"] * 1e12)
    t_bytes = nbytes / (H100_HBM_PEAK_TB_S * 1e12)
    return {"flops": flops, "bytes": nbytes, "flops_ms": 1e3 * t_flops, "hbm_ms": 1e3 * t_bytes,
            "bound_ms": 1e3 * max(t_flops, t_bytes),
            "bound_by": "compute" if t_flops >= t_bytes else "memory",
            "flops_per_byte": flops / nbytes if nbytes else None}


def roofline(ops: List[str], es: int = 2) -> List[dict]:
    """One row per default bench case and pass (bf16 bytes unless ``es`` says otherwise)."""
    from ..chains import Chains
    from .ops import ATTN_SIZES, ATTN_TOKENS, CE_SIZES, DECODE_SIZES, LINEAR_SIZES, NORM_SIZES, SWIGLU_SIZES
    from .work import attention_flops, chain_gemm_flops, decode_min_bytes, rmsnorm_min_bytes

    rows = []

    def add(op, label, pass_name, flops, nbytes, note=""):
        if op in ops:
            rows.append({"op": op, "shape": label, "pass": pass_name, **_bound(flops, nbytes), "note": note})

    for chains, out_f, in_f, m in LINEAR_SIZES["default"]:
        c = Chains(chains)
        f = chain_gemm_flops(m, c.prefixes(in_f), c.widths(out_f))
        w = sum(d * p for d, p in zip(c.widths(out_f), c.prefixes(in_f))) * es
        x, y = m * in_f * es, m * out_f * es
        label = f"M{m}-{out_f}x{in_f}-{chains_label(chains)}"
        for name, nb in (("fwd", x + w + y), ("bwd_x", y + w + x), ("bwd_w", y + x + w)):
            add("chain_linear", label, name, f, nb, "lower blocks only")
        add("chain_linear", label, "fwd+bwd", 3 * f, 3 * (x + w + y))
    for chains, dim, hidden, m in SWIGLU_SIZES["default"]:
        c = Chains(chains)
        gate = chain_gemm_flops(m, c.prefixes(dim), c.widths(hidden))
        down = chain_gemm_flops(m, c.prefixes(hidden), c.widths(dim))
        w13 = 2 * sum(d * p for d, p in zip(c.widths(hidden), c.prefixes(dim))) * es
        w2 = sum(d * p for d, p in zip(c.widths(dim), c.prefixes(hidden))) * es
        x = m * dim * es
        label = f"M{m}-D{dim}-H{hidden}-{chains_label(chains)}"
        add("chain_swiglu", label, "fwd", 2 * gate + down, x + w13 + w2 + x, "whole FFN: w1, w3, w2")
        add("chain_swiglu", label, "fwd+bwd", 3 * (2 * gate + down), 3 * (2 * x + w13 + w2))
    for chains, dim, m in NORM_SIZES["default"]:
        label = f"M{m}-D{dim}-{chains_label(chains)}"
        fwd = rmsnorm_min_bytes(m, dim, es)
        add("chain_rmsnorm", label, "fwd", 0, fwd)
        add("chain_rmsnorm", label, "fwd+bwd", 0, fwd + rmsnorm_min_bytes(m, dim, es, True), "x, y; dy, x, dx")
    for chains, n_kv, shared, seq, hd in ATTN_SIZES["default"]:
        c = Chains(chains)
        batch = max(1, ATTN_TOKENS // seq)
        q = batch * seq * c.total * hd * es
        kv = 2 * batch * seq * n_kv * hd * es
        label = f"B{batch}-S{seq}-{chains_label(chains)}-KV{n_kv}-D{hd}-{'shared' if shared else 'gqa'}"
        fwd = attention_flops(batch, c.total, seq, seq, hd, True, 2)
        bwd = attention_flops(batch, c.total, seq, seq, hd, True, 5)
        add("chain_attention", label, "fwd", fwd, q + kv + q, "causal")
        add("chain_attention", label, "bwd_x", bwd, 3 * q + 2 * kv, "q, k, v, o, do -> dq, dk, dv")
        add("chain_attention", label, "fwd+bwd", fwd + bwd, 5 * q + 3 * kv)
    for chains, n_kv, shared, batch, length, hd in DECODE_SIZES["default"]:
        c = Chains(chains)
        label = f"B{batch}-L{length}-{chains_label(chains)}-KV{n_kv}-D{hd}-{'shared' if shared else 'gqa'}"
        add("chain_attention_decode", label, "fwd", attention_flops(batch, c.total, 1, length, hd, True, 2),
            decode_min_bytes(batch, 1, c.total, n_kv, [length] * batch, hd, es), "K/V read once")
    for chains, dim, vocab, m in CE_SIZES["default"]:
        h, w = m * dim * es, vocab * dim * es
        label = f"N{m}-D{dim}-V{vocab}-{chains_label(chains)}"
        add("multi_chain_cross_entropy", label, "fwd", 2.0 * m * vocab * dim, h + w, "no logits in HBM")
        add("multi_chain_cross_entropy", label, "fwd+bwd", 6.0 * m * vocab * dim, 2 * (h + w) + h + w)
    from .models import PREFILL_SIZES, TRAIN_SIZES, model_bytes, model_flops
    for case in TRAIN_SIZES["default"]:
        add("colm_train_step", case.label, "step", model_flops(case), model_bytes(case, es),
            "fwd + bwd FLOPs; bytes: params twice, grads, AdamW states")
    for case in PREFILL_SIZES["default"]:
        for chain, name in ((None, "prefill full"), (0, "prefill chain 0")):
            add("colm_air_prefill", case.label, name, model_flops(case, chain, train=False),
                model_bytes(case, es, train=False), "params read once")
    from .models import SERVE_SIZES, decode_bytes, decode_flops, serving_batch
    for case in SERVE_SIZES["default"]:
        cfg, n = case.config(), len(case.chains)
        scales, past = serving_batch(case)
        useful = decode_flops(cfg, scales, past)
        add("colm_serving_decode", case.label, "decode mixed", useful, decode_bytes(cfg, [n - 1], scales, past, es),
            "one batch, a scale per sequence: active weights once, each sequence's K/V")
        add("colm_serving_decode", case.label, "decode per-scale", useful,
            decode_bytes(cfg, range(n), scales, past, es), f"{n} batches: each scale's weights once per batch")
        full = [n - 1] * case.batch
        add("colm_serving_decode", case.label, "decode full-scale", decode_flops(cfg, full, past),
            decode_bytes(cfg, [n - 1], full, past, es), "every sequence at the full scale")
    return rows
