"""``colm-bench --static`` part ``work``: tensor-core FLOPs the kernels execute over the useful FLOPs
of the op, and global-memory bytes they move over the op's minimum (each input read once, each
output written once), per op and pass, counted in Triton's interpreter at the H100 tiles
(``colm_kernels.bench.work``), for the first config each pruner keeps and the worst kept one.
Runs under ``TRITON_INTERPRET=1 COLM_KERNELS_TILES=gpu`` (``static`` starts it in a subprocess),
at reduced sizes that keep the default cases' structure (chain widths multiples of 128,
sequences of 512)."""
from __future__ import annotations

import functools
from typing import Callable, Dict, Iterator, List

import torch

from .cases import chains_label

__all__ = ["count_work"]


def _kept_config_runs(fn: Callable[[], dict], max_configs: int = 12) -> List[dict]:
    """``fn()``'s per-kernel counts under each config the pruners keep (``force_config(i)`` until
    the configs chosen stop changing): index 0 is what ``COLM_KERNELS_AUTOTUNE=0`` runs."""
    from .._triton.autotuning import autotuned_kernels, force_config

    runs, previous = [], None
    for i in range(max_configs):
        with force_config(i):
            flops = fn()
            chosen = tuple(sorted((k.base_fn.__name__, str(c)) for k in autotuned_kernels()
                                  for c in k.cache.values()))
        if chosen == previous:
            break
        runs.append(flops)
        previous = chosen
    return runs


def _work_cases() -> Iterator[tuple[str, str, dict, Callable[[], dict]]]:
    """(op, label, {pass: (useful FLOPs, kernels[, minimum bytes])}, run -> {"flops": per-kernel
    executed FLOPs, "bytes": per-kernel bytes moved})."""
    import colm_kernels as ck
    from colm_kernels.chains import Chains

    from .work import attention_flops, chain_gemm_flops, count_memory_traffic, count_mma_flops

    dt = torch.float16  # the interpreter's bf16 tl.dot is wrong; the FLOP count is the same
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dt)

    def counted(fn):
        def run():
            with count_mma_flops() as work, count_memory_traffic() as traffic:
                fn()
            return {"flops": dict(work.by_kernel), "bytes": traffic.by_kernel}
        return run

    m = 256
    for chains in ((1, 1, 1, 1), (1,) * 8, (1, 2, 1)):
        c = Chains(chains)
        dim = 128 * c.total  # every chain width a multiple of 128
        gemm = chain_gemm_flops(m, c.prefixes(dim), c.widths(dim))
        x, w = rnd(m, dim).requires_grad_(), rnd(dim, dim).requires_grad_()

        def fn(c=c, x=x, w=w):
            ck.chain_linear(x, w, None, c).backward(torch.ones(m, dim, dtype=dt))
        passes = {"fwd": (gemm, ["_chain_linear_fwd_kernel"]), "bwd_x": (gemm, ["_chain_linear_bwd_dx_kernel"]),
                  "bwd_w": (gemm, ["_chain_linear_bwd_dw_kernel"])}
        yield "chain_linear", f"M{m}-{dim}x{dim}-{chains_label(chains)}", passes, counted(fn)
    chains, dim, hidden = (1, 1, 1, 1), 512, 1024
    c = Chains(chains)
    gate = chain_gemm_flops(m, c.prefixes(dim), c.widths(hidden))
    x, w1, w3 = rnd(m, dim).requires_grad_(), rnd(hidden, dim).requires_grad_(), rnd(hidden, dim).requires_grad_()

    def swiglu():
        ck.chain_swiglu(x, w1, w3, c).backward(torch.ones(m, hidden, dtype=dt))
    yield ("chain_swiglu", f"M{m}-D{dim}-H{hidden}-{chains_label(chains)}",
           {"fwd": (2 * gate, ["_chain_swiglu_fwd_kernel"]),
            "bwd": (4 * gate, ["_chain_linear_bwd_dx_kernel", "_chain_linear_bwd_dw_kernel"])}, counted(swiglu))
    for shared in (False, True):
        B, S, D, chains, n_kv = 1, 512, 64, (2, 2), 2
        c = Chains(chains)
        q, k, v = (rnd(B, S, h, D).requires_grad_() for h in (c.total, n_kv, n_kv))

        def attn(q=q, k=k, v=v, shared=shared, c=c):
            ck.chain_attention(q, k, v, c, kv_sharing=shared).backward(torch.ones(B, S, c.total, D, dtype=dt))
        fwd = attention_flops(B, c.total, S, S, D, True, 2)
        bwd = attention_flops(B, c.total, S, S, D, True, 5)
        yield ("chain_attention", f"B{B}-S{S}-{chains_label(chains)}-KV{n_kv}-D{D}-{'shared' if shared else 'gqa'}",
               {"fwd": (fwd, ["_chain_attention_fwd_kernel"]),
                "bwd (FA2 ideal: 5 matmuls)": (bwd, None)}, counted(attn))
    yield from _traffic_cases(rnd, counted)
    from .models import LAYOUT_1B, ModelCase, model_flops
    for chains in ((16, 16), (8, 8, 8, 8)):
        # the 1B layout's heads and chains at one layer, half width and a 4096-word vocabulary (the
        # interpreter runs every program in Python): every kernel of a training step, 256 tokens
        layout = dict(LAYOUT_1B, n_layers=1, dim=1024, ffn_hidden_dim=4096, vocab_size=4096)
        case = ModelCase(chains, layout, 1, 256)

        def train(case=case):
            from ..models import CoLM

            torch.manual_seed(0)
            model = CoLM(case.config()).to(dt)
            tok = torch.randint(0, case.layout["vocab_size"], (1, case.seq), generator=gen)
            model.multi_chain_loss(tok, tok).sum().backward()
        yield ("colm_train_step", case.label, {"fwd+bwd": (model_flops(case), None)}, counted(train))
    from .models import SERVE_WORK, decode_flops, serving_batch, serving_runs
    case = SERVE_WORK[0]  # a decode batch of 64 at four scales against one batch per scale
    useful = decode_flops(case.config(), *serving_batch(case), chain_kernels_only=True)
    runs = {}  # built on first use, shared by both rows

    def serve(provider):
        if not runs:
            runs.update(serving_runs(case, "cpu", dt))
        runs[provider]()
    for provider in ("ours-mixed", "ours-per-scale"):
        yield ("colm_serving_decode", case.label, {f"decode {provider[5:]} (chain kernels)": (useful, None)},
               counted(functools.partial(serve, provider)))
    chains, dim, vocab, n = (1, 1, 1, 1), 256, 512, 256
    h, wo = rnd(n, dim).requires_grad_(), rnd(vocab, dim).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen)

    def ce(weights=None, width=dim, loss_chains=chains):
        h.grad = wo.grad = None
        loss = ck.multi_chain_cross_entropy(h[:, :width], wo, t, loss_chains, weights=weights)
        (loss.sum() * 3.7).backward()  # an upstream gradient that is not 1
    gemm = 2 * n * vocab * dim
    yield ("multi_chain_cross_entropy", f"N{n}-D{dim}-V{vocab}-{chains_label(chains)}",
           {"fwd": (gemm, "forward"), "bwd (dh + dW)": (2 * gemm, "backward")}, counted(ce))
    # The fused path (one scale, or weights=): dh and dW are computed in the forward and the
    # backward only scales them (no tensor-core work, so no pass of its own: fwd+bwd is all of it).
    fused = ["_mcce_fwd_kernel", "_mcce_bwd_dh_kernel", "_mcce_bwd_dw_kernel"]
    for label, run in (("one scale", functools.partial(ce, loss_chains=(1,))),
                       ("weighted", functools.partial(ce, weights=[1.0, 0.5, 0.5, 2.0]))):
        yield ("multi_chain_cross_entropy", f"N{n}-D{dim}-V{vocab}-{chains_label(chains)} {label}",
               {"fwd (logits + fused dh, dW)": (3 * gemm, fused), "fwd+bwd": (3 * gemm, None)}, counted(run))


def rmsnorm_traffic_case(rnd, rows: int = 512, dim: int = 2048, chains=(4, 4, 4, 4)) -> dict:
    """RMSNorm at the bench's chains and width (``NORM_SIZES``), 512 tokens: ``run`` (forward and
    backward), its inputs and the minimum bytes of each pass. ``rnd(*shape)``: fp16 tensors."""
    import colm_kernels as ck

    from .work import rmsnorm_min_bytes

    x, g, dy = rnd(rows, dim).requires_grad_(), (rnd(dim).abs() + 0.5).requires_grad_(), rnd(rows, dim)
    es = x.element_size()

    def run():
        ck.chain_rmsnorm(x, g, chains).backward(dy)
    return {"label": f"M{rows}-D{dim}-{chains_label(chains)}", "run": run, "x": x, "weight": g, "dy": dy,
            "chains": chains, "fwd": rmsnorm_min_bytes(rows, dim, es), "bwd": rmsnorm_min_bytes(rows, dim, es, True)}


def decode_traffic_case(rnd, paged: bool, new_tokens: int, batch: int = 2, length: int = 2048,
                        chains=(4, 4, 4, 4), n_kv: int = 4, head_dim: int = 128, page: int = 16) -> dict:
    """A decode step at the bench's head layout (CoLM-Air, 4 kv heads of 128) over ``batch``
    sequences of ``length`` cached keys, contiguous or paged (pages of ``page`` keys, shuffled):
    ``run``, the caches, the useful FLOPs and the minimum bytes."""
    import colm_kernels as ck
    from colm_kernels.chains import Chains

    from .work import attention_flops, decode_min_bytes

    c = Chains(chains)
    kv_read = max(c.kv_head_map(n_kv, kv_sharing=True)) + 1
    q = rnd(batch, new_tokens, c.total, head_dim)
    k, v = rnd(batch, length, n_kv, head_dim), rnd(batch, length, n_kv, head_dim)
    lengths = torch.full((batch,), length, dtype=torch.int32)
    table = None
    if paged:
        perm = torch.randperm(batch * length // page, generator=torch.Generator().manual_seed(1))
        table = perm.view(batch, -1).to(torch.int32)
        pages = [torch.empty_like(t).view(-1, page, n_kv, head_dim) for t in (k, v)]
        for dst, src in zip(pages, (k, v)):
            dst[perm] = src.reshape(-1, page, n_kv, head_dim)
        k, v = pages

    def run():
        return ck.chain_attention_decode(q, k, v, lengths, chains, kv_sharing=True, block_table=table)
    label = (f"B{batch}-L{length}-Sq{new_tokens}-{chains_label(chains)}-KV{n_kv}-D{head_dim}-shared-"
             + (f"paged{page}" if paged else "contiguous"))
    return {"label": label, "run": run, "q": q, "k": k, "v": v, "lengths": lengths, "table": table,
            "kv_bytes": 2 * batch * length * kv_read * head_dim * q.element_size(),
            "flops": attention_flops(batch, c.total, new_tokens, length, head_dim, True, 2),
            "min_bytes": decode_min_bytes(batch, new_tokens, c.total, kv_read, [length] * batch, head_dim,
                                          q.element_size())}


def _traffic_cases(rnd, counted):
    """The memory-bound ops, whose rows are about bytes: RMSNorm; a decode step, contiguous and
    paged, 1 and 16 new tokens."""
    norm = rmsnorm_traffic_case(rnd)
    yield ("chain_rmsnorm", norm["label"],
           {"fwd": (0, ["_chain_rmsnorm_fwd_kernel"], norm["fwd"]),
            "bwd (dx + dgain)": (0, ["_chain_rmsnorm_bwd_kernel"], norm["bwd"])}, counted(norm["run"]))
    for paged in (False, True):
        for new in (1, 16):
            case = decode_traffic_case(rnd, paged, new)
            yield ("chain_attention_decode", case["label"], {"decode": (case["flops"], None, case["min_bytes"])},
                   counted(case["run"]))


def _pass_flops(spec, flops: Dict[str, int], fwd_kernels: List[str]) -> int:
    """Executed FLOPs (or bytes) of one pass: the named kernels, or (None) every kernel but the
    forward's, or the kernels whose names say forward / backward."""
    if spec is None:  # every kernel but the forward's (all of them when it names none)
        return sum(v for k, v in flops.items() if k not in fwd_kernels)
    if spec == "forward":
        return sum(v for k, v in flops.items() if "fwd" in k)
    if spec == "backward":
        return sum(v for k, v in flops.items() if "fwd" not in k)
    return sum(flops.get(k, 0) for k in spec)


def count_work(ops: List[str], all_configs: bool = True) -> dict:
    """Executed over useful MMA FLOPs per op and pass (this process must run the interpreter with
    ``COLM_KERNELS_TILES=gpu``); with ``all_configs`` every config the pruners keep, else the
    first (what ``COLM_KERNELS_AUTOTUNE=0`` runs)."""
    from .._triton.device import small_tiles
    from .._triton.tma import tma_mode
    from .. import backends

    if small_tiles():
        raise RuntimeError("count_work needs TRITON_INTERPRET=1 and COLM_KERNELS_TILES=gpu")
    rows, failures = [], []
    # TMA twins run the same tiles as their pointer configs (tests/ops/test_chain_linear_tma.py
    # holds them bit-equal): counting the pointer configs counts both, in half the time.
    with backends.use_backend("triton"), tma_mode("off"):
        for op, label, passes, run in _work_cases():
            if op not in ops:
                continue
            try:
                runs = _kept_config_runs(run) if all_configs else [run()]
            except Exception as e:  # noqa: BLE001
                failures.append(f"{op} {label}: {type(e).__name__}: {e}")
                continue
            fwd_spec = passes.get("fwd", (0, None))[1]
            fwd_kernels = fwd_spec if isinstance(fwd_spec, list) else []
            for pass_name, (useful, spec, *least) in passes.items():
                def ratios(key, denominator):  # per kept config; None without a denominator
                    return [_pass_flops(spec, r[key], fwd_kernels) / denominator if denominator else None
                            for r in runs]
                flops, moved = ratios("flops", useful), ratios("bytes", least[0] if least else None)
                rows.append({"op": op, "shape": label, "pass": pass_name, "useful_flops": useful,
                             "executed_flops": _pass_flops(spec, runs[0]["flops"], fwd_kernels),
                             "ratio_first_config": flops[0], "ratio_worst_config": _worst(flops),
                             "min_bytes": least[0] if least else None,
                             "executed_bytes": _pass_flops(spec, runs[0]["bytes"], fwd_kernels),
                             "bytes_ratio_first_config": moved[0], "bytes_ratio_worst_config": _worst(moved),
                             "configs": len(runs)})
    return {"work": rows, "failures": failures}


def _worst(ratios: List):
    return None if ratios[0] is None else max(ratios)
