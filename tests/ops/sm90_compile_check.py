"""Compile every Triton kernel of ``colm_kernels`` for an H100 (sm_90a) on a machine without a GPU.

Run as a script (``python tests/ops/sm90_compile_check.py [label-filter] [--ops op,op:dtype]``: cases whose
label contains the filter, of the named ops (or one dtype of an op) only) in a process WITHOUT
``TRITON_INTERPRET`` (``tests/ops/test_triton_compiles_for_sm90.py`` spawns it so). It installs
``colm_kernels.bench.sm90`` (a fake sm_90a driver; every autotune config the pruners keep is
compiled to a cubin with Triton's ``ptxas -v``, nothing is launched) and calls the public launchers
of every op on small CPU tensors: fp16 / bf16, aligned and unaligned shapes, varlen, several decode
splits. ``colm-bench --static`` does the same at the default bench shapes.

Exit status 0 iff every compile succeeded without register spills (ptxas -v) and every
``@triton.jit`` kernel module was covered (with
``--ops``: every kernel of the modules of those ops, ``colm_kernels.ops.<op>.*``); the last line
is ``SM90_COMPILE_SUMMARY <json>`` with one entry per compiled config (registers, spill
bytes, shared memory, MMA kind and its ``mma.sync`` / ``wgmma`` instruction counts, TMA /
cp.async, resident blocks per SM, ``triton_version``).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
    sys.exit("sm90_compile_check must run without TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402

from colm_kernels.bench import sm90  # noqa: E402

KERNEL_MODULES = (
    "colm_kernels.ops.chain_linear.triton_kernels",
    "colm_kernels.ops.chain_swiglu.triton_kernels",
    "colm_kernels.ops.chain_attention.triton_kernels",
    "colm_kernels.ops.chain_attention_decode.triton_kernels",
)
FAILURES = sm90.FAILURES


# ----------------------------------------------------------------------------------------------
# Launcher calls
# ----------------------------------------------------------------------------------------------
def _t(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def _unaligned(rows, cols, dtype):
    """A (rows, cols) view at an element offset of 1 with an odd row stride (no 16-B alignment)."""
    base = _t(rows * (cols + 1) + 1, dtype=dtype)
    return base[1:].view(rows, cols + 1)[:, :cols]


def run_chain_linear(dtype, aligned):
    from colm_kernels.ops.chain_linear import triton_launch as K
    ps, ds = ((64, 128), (64, 64)) if aligned else ((24, 40), (40, 24))
    M = 64 if aligned else 37
    x = _t(M, ps[-1], dtype=dtype) if aligned else _unaligned(M, ps[-1], dtype)
    ws = [_t(d, p, dtype=dtype) for d, p in zip(ds, ps)]
    bs = [_t(d, dtype=dtype) for d in ds]
    K.chain_linear_fwd(x, ws, bs if aligned else ())
    dy = _t(M, sum(ds), dtype=dtype) if aligned else _unaligned(M, sum(ds), dtype)
    K.chain_linear_bwd_dx(dy, ws, ps[-1])
    K.chain_linear_bwd_dw(dy, x, ws, [True] * len(ws), [True] * len(ws))


def run_chain_swiglu(dtype, aligned):
    from colm_kernels.ops.chain_swiglu import triton_kernels as K
    ps, ds = ((64, 128), (64, 64)) if aligned else ((24, 40), (40, 24))
    M = 64 if aligned else 37
    x = _t(M, ps[-1], dtype=dtype) if aligned else _unaligned(M, ps[-1], dtype)
    w1 = [_t(d, p, dtype=dtype) for d, p in zip(ds, ps)]
    w3 = [_t(d, p, dtype=dtype) for d, p in zip(ds, ps)]
    h, gates = K.chain_swiglu_fwd(x, w1, w3, True)
    K.chain_swiglu_fwd(x, w1, w3, False)
    K.chain_swiglu_bwd_gates(_t(M, sum(ds), dtype=dtype), _t(M, 2 * sum(ds), dtype=dtype), list(ds))


def run_chain_attention(dtype, head_dim, varlen, causal, seq_chains):
    from colm_kernels.ops.chain_attention import triton_launch as K
    kv_index, head_chain = [0, 0, 1, 1], [0, 1, 0, 1]
    Hq, Hkv, D = 4, 2, head_dim
    if varlen:
        lens = [5, 11]
        tot = sum(lens)
        cu = torch.tensor([0, 5, 16], dtype=torch.int32)
        q, k, v = (_t(tot, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=11, max_seqlen_k=11)
        B = 2
    else:
        B, S = 2, 13
        q, k, v = (_t(B, S, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
        kw = {}
    sc = torch.tensor([1, 0][:B]) if seq_chains else None
    out, lse = K.chain_attention_fwd(q, k, v, kv_index, head_chain, causal, sc, 0.125, **kw)
    for deterministic in (False, True):  # dQ by atomics, or by its own kernel
        K.chain_attention_bwd(torch.randn_like(out), q, k, v, out, lse, kv_index, head_chain, causal, sc,
                              0.125, deterministic=deterministic, **kw)


def run_chain_attention_decode(dtype, head_dim, sq, num_splits, seq_chains, page_size=None):
    from colm_kernels.ops.chain_attention_decode import triton_kernels as K
    kv_index, head_chain = [0, 0, 1, 1], [0, 1, 0, 1]
    B, Hq, Hkv, S, D = 2, 4, 2, 300, head_dim
    q = _t(B, sq, Hq, D, dtype=dtype)
    table = None
    if page_size:  # paged: (num_blocks, page_size, Hkv, D) pools and an int32 (B, pages) table
        pages = -(-S // page_size)
        kc, vc = (_t(B * pages, page_size, Hkv, D, dtype=dtype) for _ in range(2))
        table = torch.randperm(B * pages).view(B, pages).to(torch.int32)
    else:
        kc, vc = _t(B, S, Hkv, D, dtype=dtype), _t(B, S, Hkv, D, dtype=dtype)
    lens = torch.tensor([S, 77], dtype=torch.int32)
    sc = torch.tensor([1, 0]) if seq_chains else None
    K.chain_attention_decode_fwd(q, kc, vc, lens, kv_index, head_chain, sc, 0.125, table, num_splits=num_splits)


def run_multi_chain_cross_entropy(dtype, aligned):
    from colm_kernels.ops.multi_chain_cross_entropy import triton_kernels as K
    offsets, N, V, D = ((0, 64, 128), 64, 256, 128) if aligned else ((0, 24, 40), 37, 101, 41)
    hidden = _t(N, offsets[-1], dtype=dtype) if aligned else _unaligned(N, offsets[-1], dtype)
    weight = _t(V, D, dtype=dtype)
    targets = torch.randint(0, V, (N,))
    targets[3] = -100
    K.mcce_fwd(hidden, weight, targets, offsets, -100)
    K.mcce_bwd(torch.ones(len(offsets) - 1), hidden, weight, targets, offsets, -100)
    # the fused path (weights=): the forward's STORE variant and the gradient pass over its logits
    # (unaligned with softcap it runs the per-scale kernels: ``triton_fused.fusable``)
    from colm_kernels.ops.multi_chain_cross_entropy.triton_fused import mcce_fused
    for options in (("mean", 0.0, 0.0, 0.0), ("sum", 0.1, 1e-4, 30.0), ("sum", 0.1, 1e-4, 0.0)):
        mcce_fused(hidden, weight, targets, torch.tensor([1.0, 0.5]), offsets, -100, *options)


def run_chain_rmsnorm(dtype, aligned):
    from colm_kernels.ops.chain_rmsnorm import triton_kernels as K
    offsets, M = ((0, 64, 128, 256), 64) if aligned else ((0, 17, 51), 37)
    x = _t(M, offsets[-1], dtype=dtype) if aligned else _unaligned(M, offsets[-1], dtype)
    weight = _t(offsets[-1], dtype=dtype)
    y, rstd = K.chain_rmsnorm_fwd(x, weight, offsets, 1e-5)
    K.chain_rmsnorm_bwd(torch.randn_like(y), x, weight, rstd, offsets, True, True)
    if aligned:  # a chain wider than the one-pass limit: the chunked fallback (x read twice)
        x, weight = _t(4, 8192, dtype=dtype), _t(8192, dtype=dtype)
        y, rstd = K.chain_rmsnorm_fwd(x, weight, (0, 8192), 1e-5)
        K.chain_rmsnorm_bwd(torch.randn_like(y), x, weight, rstd, (0, 8192), True, True)


def cases():
    """(label, launcher call, args, full autotune sweep?): fp16 sweeps every pruned config, bf16
    the first and the largest."""
    for dtype in (torch.float16, torch.bfloat16):
        full = dtype == torch.float16
        for aligned in (True, False):
            yield f"chain_linear {dtype} aligned={aligned}", run_chain_linear, (dtype, aligned), full
            yield f"chain_swiglu {dtype} aligned={aligned}", run_chain_swiglu, (dtype, aligned), full
            yield (f"multi_chain_cross_entropy {dtype} aligned={aligned}",
                   run_multi_chain_cross_entropy, (dtype, aligned), full)
            yield f"chain_rmsnorm {dtype} aligned={aligned}", run_chain_rmsnorm, (dtype, aligned), full
        # the forward's and the dQ pass's TMA twins compile beside their pointer configs (aligned
        # K / V); head dim 80 (padded to 128) with varlen, seq_chains and causal, the heaviest mix
        for d, varlen, causal, sc in ((64, False, True, False), (128, True, False, True), (80, True, True, True)):
            yield (f"chain_attention {dtype} D={d} varlen={varlen} causal={causal} sc={sc}",
                   run_chain_attention, (dtype, d, varlen, causal, sc), full)
        # Head dims padded inside the kernel (8 -> 16, 40 -> 64, 80 -> 128, 160 -> 256), many new
        # tokens (BLOCK_M at its cap), paged caches.
        for d, sq, splits, sc, page in ((64, 1, 4, False, None), (128, 2, 1, True, None), (8, 3, 2, False, None),
                                        (40, 1, 1, True, 16), (80, 128, 2, False, 7), (160, 4, 2, True, None),
                                        (256, 128, 1, False, 16)):
            yield (f"chain_attention_decode {dtype} D={d} Sq={sq} splits={splits} sc={sc} page={page}",
                   run_chain_attention_decode, (dtype, d, sq, splits, sc, page), full)
    # float32 decode (IEEE tl.dot on FMA units, its own tile sizes).
    for d, sq, splits, page in ((40, 16, 2, 16), (256, 128, 1, None)):
        yield (f"chain_attention_decode {torch.float32} D={d} Sq={sq} splits={splits} page={page}",
               run_chain_attention_decode, (torch.float32, d, sq, splits, False, page), True)


def discover_kernels():
    """``{module: {kernel names}}`` for every module of ``colm_kernels`` that defines a
    ``@triton.jit`` kernel that the package launches (``name[grid](...)`` in any of its sources: a
    kernel module's launchers may live beside it, e.g. ``triton_launch``)."""
    import importlib
    import re

    import colm_kernels
    from triton.runtime.jit import JITFunction

    root = os.path.dirname(os.path.abspath(colm_kernels.__file__))
    sources = {}
    for dirpath, _, files in sorted(os.walk(root)):  # not pkgutil: op folders are namespace packages
        for fname in sorted(files):
            if fname.endswith(".py"):
                path = os.path.join(dirpath, fname)
                with open(path) as fh:
                    sources[path] = fh.read()
    everything = "\n".join(sources.values())
    found = {}
    for path, src in sources.items():
        if "triton.jit" not in src:
            continue
        rel = os.path.relpath(path[:-3], os.path.dirname(root)).replace(os.sep, ".")
        mod_name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001
            FAILURES.append(f"cannot import {mod_name} (defines @triton.jit code): {e!r}")
            continue
        for attr, obj in vars(mod).items():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn
            if (isinstance(fn, JITFunction) and fn.module == mod_name
                    and re.search(r"\b%s\s*\[" % re.escape(attr), everything)):
                found.setdefault(mod_name, set()).add(fn.__name__)
    return found


def op_of(module: str):
    """The op a kernel module belongs to (``colm_kernels.ops.<op>.triton_kernels`` -> ``<op>``)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["colm_kernels", "ops"] else None


def case_part(label: str) -> str:
    """``"<op>:<dtype>"`` of a case label (``"chain_linear torch.float16 ..."`` -> ``"chain_linear:float16"``)."""
    op, dtype = label.split()[:2]
    return f"{op}:{dtype.replace('torch.', '')}"


def main(argv):
    args = list(argv[1:])
    ops = None  # --ops tokens: "<op>" (all its cases) or "<op>:<dtype>"
    if "--ops" in args:
        i = args.index("--ops")
        ops = set(args[i + 1].split(","))
        del args[i:i + 2]
    only = args[0] if args else None
    all_parts = sorted({case_part(label) for label, *_ in cases()})
    all_ops = sorted({p.split(":")[0] for p in all_parts})
    if ops is not None and ops - set(all_ops) - set(all_parts):
        sys.exit(f"--ops: unknown {sorted(ops - set(all_ops) - set(all_parts))}; the cases cover {all_parts}")
    op_names = None if ops is None else {t.split(":")[0] for t in ops}

    def selected(label):
        return ((not only or only in label)
                and (ops is None or label.split()[0] in ops or case_part(label) in ops))

    sm90.install()
    t0 = time.time()
    for label, fn, args_, full in cases():
        if not selected(label):
            continue
        sm90.full_sweep(full)
        sm90.set_label(label)
        t = time.time()
        n = len(sm90.COMPILED)
        try:
            fn(*args_)
        except Exception as e:  # noqa: BLE001
            FAILURES.append(f"{label}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
        print(f"[sm90] {label}: {len(sm90.COMPILED) - n} kernels in {time.time() - t:.1f}s", flush=True)
    compiled_names = {c.kernel for c in sm90.COMPILED}
    launched = discover_kernels()
    missing = {}
    for m in KERNEL_MODULES:
        if m not in launched:
            FAILURES.append(f"no launched @triton.jit kernel found in {m}")
    for m, want in sorted(launched.items()):
        if op_of(m) is not None and op_of(m) not in all_ops:
            FAILURES.append(f"{m} launches Triton kernels but no case of this script calls op {op_of(m)!r}")
        elif not only and (op_names is None or op_of(m) in op_names) and want - compiled_names:
            missing[m] = sorted(want - compiled_names)
    if missing:
        FAILURES.append(f"kernels never compiled: {missing}")
    # a spill in any kept config fails the check (every op, every Triton this runs under)
    FAILURES.extend(f"{c.kernel} {c.config} ({c.label}): spills {c.spill_bytes} B at {c.registers} registers"
                    for c in sm90.COMPILED if c.spill_bytes)
    per_kernel = {}
    for c in sm90.COMPILED:
        per_kernel[c.kernel] = per_kernel.get(c.kernel, 0) + 1
        print(f"[sm90] {c.kernel:<40} {c.config:<44} regs={c.registers:<3} spill={c.spill_bytes:<5} "
              f"smem={c.shared:<6} {c.mma:<8} mma.sync={c.mma_sync:<3} wgmma={c.wgmma:<3} "
              f"blocks/SM={c.resident_blocks} ({c.label})", flush=True)
    for f in FAILURES:
        print("[sm90] FAIL", f, flush=True)
    import triton
    summary = dict(compiled=len(sm90.COMPILED), failures=len(FAILURES), seconds=round(time.time() - t0, 1),
                   triton_version=triton.__version__,
                   ops=sorted(ops) if ops is not None else all_ops, all_ops=all_ops, all_parts=all_parts,
                   modules=sorted({c.module for c in sm90.COMPILED}),
                   kernel_modules={m: sorted(v) for m, v in sorted(launched.items())},
                   kernels=dict(sorted(per_kernel.items())),
                   configs=sm90.kernel_table())
    print("SM90_COMPILE_SUMMARY " + json.dumps(summary), flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
