"""Benchmark cases of every op against what a user would otherwise write.

Providers: ``ours-<backend>`` for every backend that can run the inputs (our ops), and peers:
``dense-cublas`` (``F.linear`` over the whole matrix), ``paper-naive`` (the paper's per-chain
loops, written from its pseudo-code), ``sdpa-repeat`` (the paper's ``repeat`` + SDPA for attention).
FLOPs count only useful work (unmasked blocks, causal half), and say so.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import (backends, chain_attention, chain_attention_decode, chain_linear, chain_rmsnorm,
               chain_swiglu, multi_chain_cross_entropy)
from ..chains import Chains
from .cases import PASSES, Case, pass_runner

# (chains, out_features, in_features, tokens) per size preset; issue targets use "default".
LINEAR_SIZES = {
    "default": [((1, 1, 1, 1), 4096, 4096, 8192), ((1,) * 8, 8192, 8192, 8192)],
    "small": [((1, 1, 1, 1), 1024, 1024, 2048), ((1,) * 8, 2048, 2048, 2048)],
    "tiny": [((1, 2, 1), 64, 48, 37)],
}


def _round_up(v: int, mult: int) -> int:
    return -(-v // mult) * mult


# SwiGLU FFN: (chains, dim, hidden, tokens); hidden = LLaMA's 11008 rounded to a multiple of
# 4 chains x 64 (a whole number of 64-wide tiles per chain).
SWIGLU_SIZES = {
    "default": [((1, 1, 1, 1), 4096, _round_up(11008, 4 * 64), 8192)],
    "small": [((1, 1, 1, 1), 1024, _round_up(1024 * 8 // 3, 4 * 64), 2048)],
    "tiny": [((1, 2, 1), 64, 96, 37)],
}
# (chains, dim, tokens)
NORM_SIZES = {"default": [((4, 4, 4, 4), 2048, 16384)], "small": [((4, 4, 4, 4), 2048, 4096)],
              "tiny": [((1, 2, 1), 64, 37)]}
# (chains, n_kv_heads, kv_sharing, seq, head_dim): the 1B layout (D 2048, 16 heads of 128); the
# batch keeps 16k tokens in flight at every length.
ATTN_SIZES = {
    "default": [(c, 4, shared, seq, 128) for c in ((4, 4, 4, 4), (8, 8)) for shared in (False, True)
                for seq in (2048, 4096, 8192, 16384)],
    "small": [((4, 4, 4, 4), 4, True, 2048, 128)],
    "tiny": [((2, 2), 2, True, 33, 16)],
}
ATTN_TOKENS = 16384
# (chains, dim, vocab, tokens)
CE_SIZES = {"default": [((4, 4, 4, 4), 2048, 32000, 4096)], "small": [((4, 4, 4, 4), 1024, 8192, 2048)],
            "tiny": [((1, 2, 1), 64, 101, 37)]}


def our_backends(op: str, tensors, **inputs) -> list[str]:
    """Backends that can run ``op`` on these inputs, fastest first; reference only on CPU or
    when it is the only one."""
    names = []
    for name in ("cuda", "triton", "reference"):
        impl = backends.registered(op).get(name)
        if impl is not None and not impl.not_supported_reasons(tensors, **inputs):
            names.append(name)
    on_gpu = any(t.is_cuda for t in tensors)
    if on_gpu and len(names) > 1:  # the reference is the paper-naive peer already
        names.remove("reference")
    return names


def _ours(op_fn, backend):
    def forward(x, params, **kw):
        with backends.use_backend(backend):
            return op_fn(x, params, **kw)
    return forward


def chain_linear_cases(size: str, device, dtype, passes=PASSES) -> Iterator[Case]:
    for chains, out_f, in_f, m in LINEAR_SIZES[size]:
        c = Chains(chains)
        widths, prefixes, rows = c.widths(out_f), c.prefixes(in_f), c.offsets(out_f)
        dense = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5
        blocks = [dense[rows[i]:rows[i + 1], :prefixes[i]].contiguous() for i in range(c.n)]
        x = torch.randn(m, in_f, device=device, dtype=dtype)
        useful = 2.0 * m * sum(d * p for d, p in zip(widths, prefixes))
        label = f"M{m}-{out_f}x{in_f}-C{'.'.join(map(str, chains))}"
        providers = {
            "dense-cublas": (lambda x, p: F.linear(x, p[0]), [dense]),
            "paper-naive": (lambda x, p: torch.cat(
                [F.linear(x[:, : w.shape[1]], w) for w in p], dim=-1), blocks),
        }
        for b in our_backends("chain_linear", [x, *blocks], x=x, weights=blocks, biases=[]):
            providers[f"ours-{b}"] = (_ours(lambda x, p: chain_linear(x, p, None, c), b), blocks)
        for pass_name in passes:
            scale = 3.0 if pass_name == "fwd+bwd" else 1.0
            for name, (fwd, params) in providers.items():
                yield Case("chain_linear", name, label, pass_name, pass_runner(fwd, x, params, pass_name),
                           flops=useful * scale, peer="dense-cublas", note="useful FLOPs (lower blocks)")
        # Elastic scales: only the first k+1 chains' tiles; compared with the full-scale run.
        for b in our_backends("chain_linear", [x, *blocks], x=x, weights=blocks, biases=[]):
            if b == "reference":
                continue
            for k in range(c.n):
                active = 2.0 * m * sum(d * p for d, p in zip(widths[: k + 1], prefixes[: k + 1]))
                fwd = _ours(lambda x, p, k=k: chain_linear(x, p, None, c, chain=k), b)
                yield Case("chain_linear_elastic", f"ours-{b}", f"{label}-k{k}", "fwd+bwd",
                           pass_runner(fwd, x, blocks, "fwd+bwd"), flops=3 * active,
                           peer=None, note=f"chain={k}")


def chain_swiglu_cases(size: str, device, dtype, passes=PASSES) -> Iterator[Case]:
    """The whole SwiGLU FFN ``w2(silu(w1 x) * w3 x)``: ``ours-<backend>`` (fused ``chain_swiglu``,
    then ``chain_linear`` for w2) against ``unfused-<backend>`` (two ``chain_linear`` calls,
    ``F.silu(a) * b``, then w2: what ChainFeedForward did before) and ``paper-naive`` (per-chain
    ``nn.Linear`` loops, the paper's Algorithm 1)."""
    for chains, dim, hidden, m in SWIGLU_SIZES[size]:
        c = Chains(chains)
        n = c.n

        def blocks(out_f, in_f):
            rows, prefixes = c.offsets(out_f), c.prefixes(in_f)
            w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5
            return [w[rows[i]:rows[i + 1], :prefixes[i]].contiguous() for i in range(n)]

        params = blocks(hidden, dim) + blocks(hidden, dim) + blocks(dim, hidden)  # w1, w3, w2
        x = torch.randn(m, dim, device=device, dtype=dtype)
        gate = 2.0 * m * sum(d * p for d, p in zip(c.widths(hidden), c.prefixes(dim)))
        down = 2.0 * m * sum(d * p for d, p in zip(c.widths(dim), c.prefixes(hidden)))
        useful = 2 * gate + down
        label = f"M{m}-D{dim}-H{hidden}-C{'.'.join(map(str, chains))}"

        def naive(x, p):
            def chain_loop(x, ws):
                return torch.cat([F.linear(x[:, : w.shape[1]], w) for w in ws], dim=-1)
            h = F.silu(chain_loop(x, p[:n])) * chain_loop(x, p[n:2 * n])
            return chain_loop(h, p[2 * n:])

        def fused(x, p):
            return chain_linear(chain_swiglu(x, p[:n], p[n:2 * n], c), p[2 * n:], None, c)

        def unfused(x, p):
            h = F.silu(chain_linear(x, p[:n], None, c)) * chain_linear(x, p[n:2 * n], None, c)
            return chain_linear(h, p[2 * n:], None, c)

        providers = {"paper-naive": naive}
        w13 = params[: 2 * n]
        for b in our_backends("chain_swiglu", [x, *w13], x=x, w1=params[:n], w3=params[n:2 * n]):
            providers[f"ours-{b}"] = _ours(fused, b)
            providers[f"unfused-{b}"] = _ours(unfused, b)
        for pass_name, (name, fwd) in itertools.product(passes, providers.items()):
            scale = 3.0 if pass_name == "fwd+bwd" else 1.0
            yield Case("chain_swiglu", name, label, pass_name, pass_runner(fwd, x, params, pass_name),
                       flops=useful * scale, peer="paper-naive",
                       note="whole FFN; useful FLOPs (lower blocks) of w1, w3, w2")


def chain_rmsnorm_cases(size: str, device, dtype, passes=("fwd", "fwd+bwd")) -> Iterator[Case]:
    for chains, dim, m in NORM_SIZES[size]:
        c = Chains(chains)
        offsets = c.offsets(dim)
        x = torch.randn(m, dim, device=device, dtype=dtype)
        g = torch.rand(dim, device=device, dtype=dtype) + 0.5
        label = f"M{m}-D{dim}-C{'.'.join(map(str, chains))}"

        def naive(x, p):  # the paper's per-chain loop
            return torch.cat([F.rms_norm(x[:, lo:hi], (hi - lo,), p[0][lo:hi], 1e-5)
                              for lo, hi in zip(offsets[:-1], offsets[1:])], dim=-1)

        providers = {"paper-naive": (naive, [g])}
        for b in our_backends("chain_rmsnorm", [x, g], x=x, weight=g, offsets=list(offsets), eps=1e-5):
            providers[f"ours-{b}"] = (_ours(lambda x, p: chain_rmsnorm(x, p[0], c), b), [g])
        for pass_name, (name, (fwd, params)) in itertools.product(passes, providers.items()):
            moved = x.numel() * x.element_size() * (2 if pass_name == "fwd" else 5)
            yield Case("chain_rmsnorm", name, label, pass_name, pass_runner(fwd, x, params, pass_name),
                       bytes=moved, peer="paper-naive", note="bytes: x in, y out (+dy, dx, x again)",
                       cudagraph=pass_name == "fwd")


def _sdpa(backend=None, gqa_index=None, causal=True):
    """SDPA on (B, S, H, D) tensors; ``gqa_index`` materialises K/V per query head (the paper's
    ``repeat``), otherwise SDPA's own GQA; ``backend`` pins one SDPA kernel (flash, cuDNN)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward(q, p):
        k, v = p
        if gqa_index is not None:
            k, v = k.index_select(2, gqa_index), v.index_select(2, gqa_index)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        kwargs = {"is_causal": causal, "enable_gqa": k.shape[2] != q.shape[2]}
        if backend is None:
            return F.scaled_dot_product_attention(*args, **kwargs).transpose(1, 2)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(*args, **kwargs).transpose(1, 2)
    return forward


def _flex(seq: int, device):
    """FlexAttention (compiled) with the causal block mask: only unmasked blocks are computed."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, B=None, H=None, Q_LEN=seq, KV_LEN=seq,
                             device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def forward(q, p):
        k, v = p
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                       enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)
    return forward


def chain_attention_cases(size: str, device, dtype, passes=("fwd", "bwd_x", "fwd+bwd")) -> Iterator[Case]:
    """Causal attention against SDPA (flash, cuDNN), FlexAttention and the paper's repeat + SDPA;
    ``bwd_x`` times the gradients of q, k and v together. Then every elastic scale against a dense
    SDPA-flash run with only the active heads. ``ours-cuda`` is SDPA over permuted query heads
    (``ops/chain_attention/cuda_backend.py``), ``ours-triton`` our FlashAttention-2 kernels."""
    on_gpu = torch.device(device).type == "cuda"
    for chains, n_kv, sharing, seq, hd in ATTN_SIZES[size]:
        c = Chains(chains)
        batch = max(1, ATTN_TOKENS // seq) if size == "default" else 1
        q = torch.randn(batch, seq, c.total, hd, device=device, dtype=dtype)
        k = torch.randn(batch, seq, n_kv, hd, device=device, dtype=dtype)
        v = torch.randn_like(k)
        kv_index = torch.tensor(c.kv_head_map(n_kv, kv_sharing=sharing), device=device)
        label = (f"B{batch}-S{seq}-C{'.'.join(map(str, chains))}-KV{n_kv}-D{hd}-"
                 f"{'shared' if sharing else 'gqa'}")

        def flops(n_heads):
            return 4.0 * batch * n_heads * seq * seq * hd / 2  # causal: half the score matrix

        providers = {"sdpa-repeat": _sdpa(gqa_index=kv_index)}
        if on_gpu:  # pinned SDPA kernels and FlexAttention exist only on CUDA
            providers.update({"sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
                              "flex": _flex(seq, device)})
        peer = "sdpa-flash" if on_gpu else "sdpa-repeat"
        ours = our_backends("chain_attention", [q, k, v], q=q, k=k, v=v, kv_head_index=kv_index.tolist(),
                            head_chain=list(c.head_chain()), causal=True, seq_chains=None,
                            softmax_scale=hd ** -0.5)
        for b in ours:
            providers[f"ours-{b}"] = _ours(
                lambda x, p: chain_attention(x, p[0], p[1], c, kv_sharing=sharing), b)
        scale = {"fwd": 1.0, "bwd_x": 2.5, "fwd+bwd": 3.5}
        for pass_name, (name, fwd) in itertools.product(passes, providers.items()):
            yield Case("chain_attention", name, label, pass_name,
                       pass_runner(fwd, q, [k, v], pass_name, grad_params_with_x=True),
                       flops=flops(c.total) * scale[pass_name], peer=peer,
                       note="causal FLOPs (half the scores); bwd = 2.5x fwd")
        # Elastic scales: q holds the active chains' heads (and, without sharing, their kv heads).
        for kk in range(c.n - 1):
            n_q = sum(chains[: kk + 1])
            n_k = n_kv if sharing else n_q * n_kv // c.total
            qa, ka, va = q[:, :, :n_q].contiguous(), k[:, :, :n_k].contiguous(), v[:, :, :n_k].contiguous()
            elastic = {"sdpa-flash": _sdpa("FLASH_ATTENTION")} if on_gpu else {"sdpa": _sdpa()}
            for b in ours:
                elastic[f"ours-{b}"] = _ours(
                    lambda x, p: chain_attention(x, p[0], p[1], c, kv_sharing=sharing), b)
            for name, fwd in elastic.items():
                yield Case("chain_attention_elastic", name, f"{label}-k{kk}", "fwd+bwd",
                           pass_runner(fwd, qa, [ka, va], "fwd+bwd", grad_params_with_x=True),
                           flops=flops(n_q) * 3.5, peer=next(iter(elastic)),
                           note=f"chain={kk}: {n_q} active query heads")


# (chains, n_kv_heads, kv_sharing, batch, cache length, head_dim); one new token per sequence.
# Head dim 80 (a padded one: the kernels compute at 128) once, at a middle size.
DECODE_SIZES = {
    "default": [((4, 4, 4, 4), 4, shared, b, L, 128) for shared in (True, False)
                for b in (1, 16, 64) for L in (1024, 16384, 131072)]
               + [((4, 4, 4, 4), 4, True, 16, 16384, 80)],
    "small": [((4, 4, 4, 4), 4, True, 8, 8192, 128)],
    "tiny": [((2, 2), 2, True, 2, 40, 16)],
}


DECODE_PAGE = 64  # keys per page of the paged-cache rows (vLLM uses 16, flash-attn 2 multiples of 256)


def chain_attention_decode_cases(size: str, device, dtype, passes=("fwd",)) -> Iterator[Case]:
    """One decode step over a KV cache; GB/s counts the K/V bytes the step must read (the
    kernel's floor), so it reads directly against HBM bandwidth. Peer: SDPA over the cache with
    the paper's repeated K/V; also SDPA's own GQA. ``ours-<backend>-paged``: the same cache
    memory seen as pages of ``DECODE_PAGE`` keys in a shuffled block table (no extra memory; the
    keys each sequence reads change, their number does not)."""
    for chains, n_kv, sharing, batch, length, hd in DECODE_SIZES[size]:
        c = Chains(chains)
        q = torch.randn(batch, 1, c.total, hd, device=device, dtype=dtype)
        k = torch.randn(batch, length, n_kv, hd, device=device, dtype=dtype)
        v = torch.randn_like(k)
        lengths = torch.full((batch,), length, device=device, dtype=torch.int32)
        kv_index = torch.tensor(c.kv_head_map(n_kv, kv_sharing=sharing), device=device)
        label = f"B{batch}-L{length}-C{'.'.join(map(str, chains))}-KV{n_kv}-D{hd}-{'shared' if sharing else 'gqa'}"
        moved = 2 * k.numel() * k.element_size()
        # One query over the whole cache sees every key: the peers run unmasked (SDPA's causal
        # mask would align top-left).
        providers = {"sdpa-repeat": _sdpa(gqa_index=kv_index, causal=False), "sdpa-gqa": _sdpa(causal=False)}
        ours = our_backends("chain_attention_decode", [q, k, v], q=q, k_cache=k, v_cache=v,
                            cache_seqlens=lengths, kv_head_index=kv_index.tolist(),
                            head_chain=list(c.head_chain()), seq_chains=None, softmax_scale=hd ** -0.5)
        pages = length // DECODE_PAGE
        table = torch.randperm(batch * pages, device=device).view(batch, pages).to(torch.int32)
        for b in ours:
            def decode(x, p, b=b):
                with backends.use_backend(b):
                    return chain_attention_decode(x, p[0], p[1], lengths, c, kv_sharing=sharing,
                                                  check_values=False)
            providers[f"ours-{b}"] = decode
            if b != "reference" and length % DECODE_PAGE == 0:
                def decode_paged(x, p, b=b):
                    pool_k, pool_v = (t.view(batch * pages, DECODE_PAGE, n_kv, hd) for t in p)
                    with backends.use_backend(b):
                        return chain_attention_decode(x, pool_k, pool_v, lengths, c, kv_sharing=sharing,
                                                      block_table=table, check_values=False)
                providers[f"ours-{b}-paged"] = decode_paged
        for name, fwd in providers.items():
            yield Case("chain_attention_decode", name, label, "fwd", pass_runner(fwd, q, [k, v], "fwd"),
                       bytes=moved, peer="sdpa-repeat", note="bytes: K and V read once (the floor)",
                       cudagraph=True)


def multi_chain_cross_entropy_cases(size: str, device, dtype, passes=("fwd", "fwd+bwd")) -> Iterator[Case]:
    for chains, dim, vocab, m in CE_SIZES[size]:
        c = Chains(chains)
        offsets = c.offsets(dim)
        h = torch.randn(m, dim, device=device, dtype=dtype)
        w = torch.randn(vocab, dim, device=device, dtype=dtype) / dim ** 0.5
        t = torch.randint(0, vocab, (m,), device=device)
        label = f"N{m}-D{dim}-V{vocab}-C{'.'.join(map(str, chains))}"

        def naive(x, p):  # one logit tensor per scale, as a user would write it
            return torch.stack([F.cross_entropy(F.linear(x[:, :hi], p[0][:, :hi]).float(), t)
                                for hi in offsets[1:]])

        providers = {"paper-naive": naive}
        for b in our_backends("multi_chain_cross_entropy", [h, w, t], hidden=h, weight=w, targets=t,
                              offsets=list(offsets), ignore_index=-100):
            # no value check: one host sync per step, as the models run it
            providers[f"ours-{b}"] = _ours(lambda x, p: multi_chain_cross_entropy(x, p[0], t, c, check_values=False), b)
        flops = 2.0 * m * vocab * dim
        for pass_name, (name, fwd) in itertools.product(passes, providers.items()):
            yield Case("multi_chain_cross_entropy", name, label, pass_name,
                       pass_runner(fwd, h, [w], pass_name),
                       flops=flops * (3 if pass_name == "fwd+bwd" else 1), peer="paper-naive",
                       note="useful FLOPs: one (N, V, D) product (chains add up to it)")


CASES = {
    "chain_linear": chain_linear_cases,
    "chain_swiglu": chain_swiglu_cases,
    "chain_rmsnorm": chain_rmsnorm_cases,
    "chain_attention": chain_attention_cases,
    "multi_chain_cross_entropy": multi_chain_cross_entropy_cases,
    "chain_attention_decode": chain_attention_decode_cases,
}
