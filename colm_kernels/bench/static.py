"""``colm-bench --static``: how every Triton kernel will run on an H100, without a GPU.

Three parts, each a list of rows (JSON) and a table:

- ``kernels``: every Triton kernel and every autotune config its pruner keeps at the default bench
  shapes (bf16, the timing dtype), compiled for sm_90a with Triton's ``ptxas -v``
  (``colm_kernels.bench.sm90``): registers, spill bytes, shared memory, resident blocks per SM,
  MMA kind (``wgmma`` / ``mma.sync`` / none), TMA and ``cp.async`` use. Runs in a subprocess
  without ``TRITON_INTERPRET``.
- ``work``: tensor-core FLOPs the kernels execute over the useful FLOPs of the op, per op and pass,
  counted in Triton's interpreter at the H100 tile sizes (``colm_kernels.bench.work``), for the
  first config each pruner keeps and for the worst of the kept configs. Runs in a subprocess with
  ``TRITON_INTERPRET=1 COLM_KERNELS_TILES=gpu``, at reduced sizes that keep the default cases'
  structure (chain widths multiples of 128, sequences of 512).
- ``roofline``: for every default bench case, the useful FLOPs and the bytes it must move at least
  (inputs read once, outputs written once), and the H100 lower bound
  ``max(FLOPs / 790 TFLOP/s, bytes / 3 TB/s)`` that no kernel can beat.

Nothing here is a GPU measurement.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List

import torch

from .report import H100_CEILINGS

MARK = "COLM_STATIC_JSON "
DEFAULT_DTYPE = torch.bfloat16


def _cid(chains) -> str:
    return "C" + ".".join(map(str, chains))


# ----------------------------------------------------------------------------------------------
# kernels: compile the default bench shapes for sm_90a (subprocess, no interpreter)
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _triton_backend_on_cpu_tensors():
    """Let the ``triton`` backend take CPU tensors without the interpreter: with the sm_90a driver
    installed every launch compiles and launches nothing, so the public ops (forward and autograd
    backward) drive exactly the kernels and configs a GPU run would."""
    from .. import backends

    saved = backends.triton_interpret, dict(backends._BACKEND_AVAILABILITY)
    backends.triton_interpret = lambda: True
    backends._BACKEND_AVAILABILITY["triton"] = lambda: None
    try:
        with backends.use_backend("triton"):
            yield
    finally:
        backends.triton_interpret = saved[0]
        backends._BACKEND_AVAILABILITY.clear()
        backends._BACKEND_AVAILABILITY.update(saved[1])


def _empty(*shape, dtype=DEFAULT_DTYPE, grad=False):
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def _backward(out):
    out.backward(torch.empty_like(out))


def _compile_cases(dtype) -> Iterator[tuple[str, str, Callable[[], None]]]:
    """(op, label, call) at the default bench shapes: the forward and the backward of each op."""
    import colm_kernels as ck
    from colm_kernels.chains import Chains

    from .ops import ATTN_SIZES, CE_SIZES, LINEAR_SIZES, NORM_SIZES, SWIGLU_SIZES

    for chains, out_f, in_f, m in LINEAR_SIZES["default"]:
        c = Chains(chains)

        def run(c=c, out_f=out_f, in_f=in_f, m=m):
            x, w = _empty(m, in_f, grad=True), _empty(out_f, in_f, grad=True)
            _backward(ck.chain_linear(x, w, None, c))
        yield "chain_linear", f"M{m}-{out_f}x{in_f}-{_cid(chains)}", run
    for chains, dim, hidden, m in SWIGLU_SIZES["default"]:
        def run(chains=chains, dim=dim, hidden=hidden, m=m):
            x, w1, w3 = _empty(m, dim, grad=True), _empty(hidden, dim, grad=True), _empty(hidden, dim, grad=True)
            _backward(ck.chain_swiglu(x, w1, w3, chains))
        yield "chain_swiglu", f"M{m}-D{dim}-H{hidden}-{_cid(chains)}", run
    for chains, dim, m in NORM_SIZES["default"]:
        def run(chains=chains, dim=dim, m=m):
            x, g = _empty(m, dim, grad=True), _empty(dim, grad=True)
            _backward(ck.chain_rmsnorm(x, g, chains))
        yield "chain_rmsnorm", f"M{m}-D{dim}-{_cid(chains)}", run
    seen = set()
    for chains, n_kv, shared, seq, hd in ATTN_SIZES["default"]:
        # configs depend on the head dim, the heads per kv head and the dtype, not the length
        if (chains, shared) in seen:
            continue
        seen.add((chains, shared))

        def run(chains=chains, n_kv=n_kv, shared=shared, hd=hd):
            c = Chains(chains)
            q = _empty(1, 256, c.total, hd, grad=True)
            k, v = (_empty(1, 256, n_kv, hd, grad=True) for _ in range(2))
            _backward(ck.chain_attention(q, k, v, c, kv_sharing=shared))
        yield "chain_attention", f"S*-{_cid(chains)}-KV{n_kv}-D{hd}-{'shared' if shared else 'gqa'}", run
    for chains, dim, vocab, m in CE_SIZES["default"]:
        def run(chains=chains, dim=dim, vocab=vocab, m=m):
            h, w = _empty(m, dim, grad=True), _empty(vocab, dim, grad=True)
            t = torch.zeros(m, dtype=torch.long)
            ck.multi_chain_cross_entropy(h, w, t, chains, check_values=False).sum().backward()
        yield "multi_chain_cross_entropy", f"N{m}-D{dim}-V{vocab}-{_cid(chains)}", run


def compile_default_shapes(ops: List[str], dtype=DEFAULT_DTYPE) -> dict:
    """Compile every kernel config the pruners keep at the default bench shapes (this process must
    not run the interpreter). Returns ``{"kernels": rows, "failures": [...]}``."""
    from . import sm90

    sm90.install()
    sm90.full_sweep(True)
    with _triton_backend_on_cpu_tensors():
        for op, label, run in _compile_cases(dtype):
            if op not in ops:
                continue
            sm90.set_label(f"{op} {label}")
            try:
                run()
            except Exception as e:  # noqa: BLE001  a case that cannot compile is a failure row
                sm90.FAILURES.append(f"{op} {label}: {type(e).__name__}: {e}")
    rows = []
    for s in sm90.COMPILED:
        op, _, label = s.label.partition(" ")
        rows.append({"op": op, "shape": label, "kernel": s.kernel, "config": s.config,
                     "registers": s.registers, "spill_bytes": s.spill_bytes, "shared": s.shared,
                     "resident_blocks": s.resident_blocks, "mma": s.mma, "tma": s.tma,
                     "cp_async": s.cp_async, "num_warps": s.num_warps, "num_stages": s.num_stages})
    return {"kernels": rows, "failures": list(sm90.FAILURES)}


# ----------------------------------------------------------------------------------------------
# work: executed over useful MMA FLOPs (subprocess, interpreter at H100 tiles)
# ----------------------------------------------------------------------------------------------
def _kept_config_runs(fn: Callable[[], Dict[str, int]], max_configs: int = 12) -> List[Dict[str, int]]:
    """``fn()``'s per-kernel FLOPs under each config the pruners keep (``force_config(i)`` until
    the configs chosen stop changing): index 0 is what ``COLM_KERNELS_AUTOTUNE=0`` runs."""
    from .._triton.utils import autotuned_kernels, force_config

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


def _work_cases() -> Iterator[tuple[str, str, dict, Callable[[], Dict[str, int]]]]:
    """(op, label, {pass: (useful FLOPs, kernels)}, run -> per-kernel executed FLOPs)."""
    import colm_kernels as ck
    from colm_kernels.chains import Chains

    from .work import attention_flops, chain_gemm_flops, count_mma_flops

    dt = torch.float16  # the interpreter's bf16 tl.dot is wrong; the FLOP count is the same
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dt)

    def counted(fn):
        def run():
            with count_mma_flops() as work:
                fn()
            return dict(work.by_kernel)
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
        yield "chain_linear", f"M{m}-{dim}x{dim}-{_cid(chains)}", passes, counted(fn)
    chains, dim, hidden = (1, 1, 1, 1), 512, 1024
    c = Chains(chains)
    gate = chain_gemm_flops(m, c.prefixes(dim), c.widths(hidden))
    x, w1, w3 = rnd(m, dim).requires_grad_(), rnd(hidden, dim).requires_grad_(), rnd(hidden, dim).requires_grad_()

    def swiglu():
        ck.chain_swiglu(x, w1, w3, c).backward(torch.ones(m, hidden, dtype=dt))
    yield ("chain_swiglu", f"M{m}-D{dim}-H{hidden}-{_cid(chains)}",
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
        yield ("chain_attention", f"B{B}-S{S}-{_cid(chains)}-KV{n_kv}-D{D}-{'shared' if shared else 'gqa'}",
               {"fwd": (fwd, ["_chain_attention_fwd_kernel"]),
                "bwd (FA2 ideal: 5 matmuls)": (bwd, None)}, counted(attn))
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

    def ce():
        ck.multi_chain_cross_entropy(h, wo, t, chains).sum().backward()
    yield ("multi_chain_cross_entropy", f"N{n}-D{dim}-V{vocab}-{_cid(chains)}",
           {"fwd": (2 * n * vocab * dim, "forward"), "bwd (dh + dW)": (4 * n * vocab * dim, "backward")}, counted(ce))


def _pass_flops(spec, flops: Dict[str, int], fwd_kernels: List[str]) -> int:
    """Executed FLOPs of one pass: the named kernels, or (None) every kernel but the forward's, or
    the kernels whose names say forward / backward."""
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
    from .._triton.utils import small_tiles, tma_mode
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
            for pass_name, (useful, spec) in passes.items():
                ratios = [_pass_flops(spec, flops, fwd_kernels) / useful for flops in runs]
                rows.append({"op": op, "shape": label, "pass": pass_name, "useful_flops": useful,
                             "executed_flops": _pass_flops(spec, runs[0], fwd_kernels),
                             "ratio_first_config": ratios[0], "ratio_worst_config": max(ratios),
                             "configs": len(runs)})
    return {"work": rows, "failures": failures}


# ----------------------------------------------------------------------------------------------
# roofline: a lower bound of every default bench case on an H100
# ----------------------------------------------------------------------------------------------
def _bound(flops: float, nbytes: float) -> dict:
    t_flops = flops / (H100_CEILINGS["bf16_tflops"] * 1e12)
    t_bytes = nbytes / (H100_CEILINGS["hbm_tb_s"] * 1e12)
    return {"flops": flops, "bytes": nbytes, "bound_ms": 1e3 * max(t_flops, t_bytes),
            "bound_by": "compute" if t_flops >= t_bytes else "memory",
            "flops_per_byte": flops / nbytes if nbytes else None}


def roofline(ops: List[str], es: int = 2) -> List[dict]:
    """One row per default bench case and pass (bf16 bytes unless ``es`` says otherwise)."""
    from ..chains import Chains
    from .ops import ATTN_SIZES, ATTN_TOKENS, CE_SIZES, DECODE_SIZES, LINEAR_SIZES, NORM_SIZES, SWIGLU_SIZES
    from .work import attention_flops, chain_gemm_flops

    rows = []

    def add(op, label, pass_name, flops, nbytes, note=""):
        if op in ops:
            rows.append({"op": op, "shape": label, "pass": pass_name, **_bound(flops, nbytes), "note": note})

    for chains, out_f, in_f, m in LINEAR_SIZES["default"]:
        c = Chains(chains)
        f = chain_gemm_flops(m, c.prefixes(in_f), c.widths(out_f))
        w = sum(d * p for d, p in zip(c.widths(out_f), c.prefixes(in_f))) * es
        x, y = m * in_f * es, m * out_f * es
        label = f"M{m}-{out_f}x{in_f}-{_cid(chains)}"
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
        label = f"M{m}-D{dim}-H{hidden}-{_cid(chains)}"
        add("chain_swiglu", label, "fwd", 2 * gate + down, x + w13 + w2 + x, "whole FFN: w1, w3, w2")
        add("chain_swiglu", label, "fwd+bwd", 3 * (2 * gate + down), 3 * (2 * x + w13 + w2))
    for chains, dim, m in NORM_SIZES["default"]:
        x = m * dim * es
        label = f"M{m}-D{dim}-{_cid(chains)}"
        add("chain_rmsnorm", label, "fwd", 0, 2 * x + dim * es)
        add("chain_rmsnorm", label, "fwd+bwd", 0, 5 * x + 3 * dim * es, "x, y; dy, x, dx")
    for chains, n_kv, shared, seq, hd in ATTN_SIZES["default"]:
        c = Chains(chains)
        batch = max(1, ATTN_TOKENS // seq)
        q = batch * seq * c.total * hd * es
        kv = 2 * batch * seq * n_kv * hd * es
        label = f"B{batch}-S{seq}-{_cid(chains)}-KV{n_kv}-D{hd}-{'shared' if shared else 'gqa'}"
        fwd = attention_flops(batch, c.total, seq, seq, hd, True, 2)
        bwd = attention_flops(batch, c.total, seq, seq, hd, True, 5)
        add("chain_attention", label, "fwd", fwd, q + kv + q, "causal")
        add("chain_attention", label, "bwd_x", bwd, 3 * q + 2 * kv, "q, k, v, o, do -> dq, dk, dv")
        add("chain_attention", label, "fwd+bwd", fwd + bwd, 5 * q + 3 * kv)
    for chains, n_kv, shared, batch, length, hd in DECODE_SIZES["default"]:
        c = Chains(chains)
        label = f"B{batch}-L{length}-{_cid(chains)}-KV{n_kv}-D{hd}-{'shared' if shared else 'gqa'}"
        cache = 2 * batch * length * n_kv * hd * es
        add("chain_attention_decode", label, "fwd", attention_flops(batch, c.total, 1, length, hd, True, 2),
            cache + 2 * batch * c.total * hd * es, "K/V read once")
    for chains, dim, vocab, m in CE_SIZES["default"]:
        h, w = m * dim * es, vocab * dim * es
        label = f"N{m}-D{dim}-V{vocab}-{_cid(chains)}"
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


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------
def _subprocess(part: str, ops: List[str], env_changes: Dict[str, str | None], timeout: int) -> dict:
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    cmd = [sys.executable, "-m", "colm_kernels.bench.static", part, ",".join(ops)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-4000:]
        return {"failures": [f"{part}: subprocess exited {proc.returncode}:\n{tail}"]}
    return json.loads(lines[-1][len(MARK):])


def run(ops: List[str], *, parts=("kernels", "work", "roofline"), timeout: int = 3600) -> dict:
    """Every part of the report for ``ops``: ``{"kernels": [...], "work": [...], "roofline":
    [...], "failures": [...]}`` (subprocesses for the first two)."""
    import tempfile

    out = {"kernels": [], "work": [], "roofline": [], "failures": []}
    if "kernels" in parts:
        with tempfile.TemporaryDirectory() as cache:  # a real compile (ptxas log), never a cache hit
            got = _subprocess("compile", ops, {"TRITON_INTERPRET": None, "COLM_KERNELS_AUTOTUNE": None,
                                               "COLM_KERNELS_TILES": None, "TRITON_CACHE_DIR": cache}, timeout)
        out["kernels"] = got.get("kernels", [])
        out["failures"] += got.get("failures", [])
    if "work" in parts:
        got = _subprocess("work", ops, {"TRITON_INTERPRET": "1", "COLM_KERNELS_TILES": "gpu",
                                        "COLM_KERNELS_AUTOTUNE": "0"}, timeout)
        out["work"] = got.get("work", [])
        out["failures"] += got.get("failures", [])
    if "roofline" in parts:
        out["roofline"] = roofline(ops)
    return out


KERNEL_COLUMNS = [("op", "op", ""), ("kernel", "kernel", ""), ("config", "config", ""),
                  ("registers", "regs", "d"), ("spill_bytes", "spill B", "d"), ("shared", "smem B", "d"),
                  ("resident_blocks", "blocks/SM", "d"), ("mma", "MMA", ""), ("tma", "TMA", ""),
                  ("cp_async", "cp.async", "")]
WORK_COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("pass", "pass", ""),
                ("useful_flops", "useful FLOPs", ".3g"), ("executed_flops", "executed", ".3g"),
                ("ratio_first_config", "exec/useful (1st cfg)", ".3f"),
                ("ratio_worst_config", "worst kept cfg", ".3f"), ("configs", "cfgs", "d")]
ROOFLINE_COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("pass", "pass", ""),
                    ("flops", "FLOPs", ".3g"), ("bytes", "bytes", ".3g"), ("flops_per_byte", "FLOP/B", ".0f"),
                    ("bound_ms", "H100 bound ms", ".4f"), ("bound_by", "bound by", ""), ("note", "note", "")]


def format_report(report: dict) -> str:
    from .report import format_table

    parts = [
        "kernels: every config the pruners keep at the default bench shapes (bf16), compiled for "
        "sm_90a",
        format_table(report["kernels"], KERNEL_COLUMNS),
        "",
        "work: tensor-core FLOPs executed over useful FLOPs, counted in the interpreter at H100 tiles",
        format_table(report["work"], WORK_COLUMNS),
        "",
        f"roofline: lower bounds on an H100 ({H100_CEILINGS['bf16_tflops']:.0f} TFLOP/s bf16, "
        f"{H100_CEILINGS['hbm_tb_s']:.0f} TB/s HBM); no GPU figure",
        format_table(report["roofline"], ROOFLINE_COLUMNS),
    ]
    if report["failures"]:
        parts += ["", "FAILURES:"] + [f"  {f}" for f in report["failures"]]
    return "\n".join(parts)


def _main(argv: List[str]) -> int:
    part, ops = argv[1], argv[2].split(",")
    t0 = time.time()
    if part == "compile":
        out = compile_default_shapes(ops)
    elif part == "work":
        out = count_work(ops, all_configs=argv[3:] != ["first"])
    else:
        raise SystemExit(f"unknown part {part!r}")
    out["seconds"] = round(time.time() - t0, 1)
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
