"""``colm-bench``: every op against its peers at sensible sizes: a table, JSON and plots.

On a GPU it times each op's providers side by side (ours per backend, dense cuBLAS, the paper's
naive code, SDPA) and reports ms, TFLOP/s or GB/s and the ratio to the peer. Without a GPU it says
so, checks every backend that can run on this CPU against the float64 reference (Triton under its
interpreter), and trains a tiny CoLM for a few steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

OPS = ("chain_linear", "chain_swiglu", "chain_rmsnorm", "chain_attention", "chain_attention_decode",
       "multi_chain_cross_entropy")
# Model-level cases (colm_kernels.bench.models): timed like the ops, no per-backend CPU check.
MODEL_OPS = ("colm_train_step", "colm_air_prefill", "colm_serving_decode")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description and epilog as written, every option's default appended to its help."""


SIZES_HELP = (
    "sizes (--sizes):\n"
    "  default  the figures we measure ourselves against, minutes on an H100:\n"
    "           chain_linear C=(1,1,1,1) 4096x4096 and C=8x(1) 8192x8192 at 8192 tokens;\n"
    "           chain_swiglu FFN C=(1,1,1,1) dim 4096, hidden 11008 (rounded to 11264), 8192 tokens;\n"
    "           chain_rmsnorm C=(4,4,4,4) dim 2048, 16384 tokens;\n"
    "           chain_attention LLaMA-3.2-1B layout (16 heads of 128, C=(4,4,4,4) and (8,8),\n"
    "             GQA and shared KV) at 2k, 4k, 8k, 16k tokens (16k tokens per batch);\n"
    "           chain_attention_decode batch 1, 16, 64 over 1k, 16k, 128k-token caches;\n"
    "           multi_chain_cross_entropy C=(4,4,4,4) dim 2048, vocab 32000, 4096 tokens;\n"
    "           colm_train_step: a training step (forward, backward, AdamW) of the LLaMA-3.2-1B\n"
    "             layout (dim 2048, 16 layers, 32 heads, 8 kv heads, FFN 8192, vocab 128256),\n"
    "             C=(16,16) and (8,8,8,8), 2 x 4096 tokens, against the paper's naive code;\n"
    "           colm_air_prefill: CoLM-Air prefill at chain 1 against a full prefill, 8K-32K tokens;\n"
    "           colm_serving_decode: one decode step of 64 sequences at 4 scales of the 1B layout\n"
    "             (C=(8,8,8,8), CoLM-Air and plain, caches of 2K-4K tokens) as one batch with a\n"
    "             scale per sequence, against one batch per scale and the whole batch at full scale\n"
    "  small    one smaller case per op, for a quick look on a GPU\n"
    "  tiny     odd, tiny shapes that exercise the timing path on a CPU (--device cpu)\n"
    "\n"
    "outputs (--out): results.json (every row, with the device, commit, date and command),\n"
    "table.txt, and PNG plots (matplotlib: pip install 'colm-kernels[bench]'):\n"
    "  <op>.png       time relative to the peer per shape and pass: timing runs only, which\n"
    "                 need a GPU (or --device cpu, which times the CPU)\n"
    "  accuracy.png   error over tolerance per op, backend and dtype: the CPU check mode\n"
    "\n"
    "timing: triton.testing.do_bench (L2 flushed between repetitions, median and 20/80th\n"
    "percentiles); do_bench_cudagraph for short forward-only kernels (decode, norms); each row\n"
    "records its method."
)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="colm-bench", description=__doc__, epilog=SIZES_HELP,
                                formatter_class=_HelpFormatter)
    # "all", not the list: argparse would wrap a comma-joined default mid-word
    p.add_argument("--ops", default="all",
                   help="comma-separated ops and model cases to run ('all': every one), from: "
                        + ", ".join(OPS + MODEL_OPS))
    p.add_argument("--sizes", default=None, choices=("default", "small", "tiny"),
                   help="size preset (see below); None: 'default' on a GPU, 'tiny' with --device cpu")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES),
                   help="dtype of the GPU timings (CPU timings run in float32)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: time on CUDA if present, else run the CPU correctness checks; "
                        "cuda: time on CUDA or fail; cpu: time on the CPU anyway (only to "
                        "exercise the harness)")
    p.add_argument("--out", default="colm_bench_results", help="output folder")
    p.add_argument("--warmup", type=float, default=25.0,
                   help="warm-up time per case in ms (do_bench's warmup)")
    p.add_argument("--rep", type=float, default=100.0,
                   help="timed repetitions per case in ms (do_bench's rep)")
    p.add_argument("--demo-steps", type=int, default=30,
                   help="CPU check mode: steps of the tiny CoLM training demo (0: skip it)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (one line per case instead)")
    p.add_argument("--static", action="store_true",
                   help="no timings: the static sm_90a report (registers, spills, shared memory, "
                        "MMA kind, TMA per kernel config; executed / useful tensor-core FLOPs; an "
                        "H100 roofline bound per default case), with or without a GPU")
    args = p.parse_args(argv)
    ops = (list(OPS + MODEL_OPS) if args.ops.strip() == "all"
           else [o.strip() for o in args.ops.split(",") if o.strip()])
    unknown = sorted(set(ops) - set(OPS + MODEL_OPS))
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {list(OPS + MODEL_OPS)}")
    args.ops = ops
    args.interrupted = False  # set when a timing run is cut short; its rows are still reported
    return args


class _Progress:
    """A tqdm bar over the cases (the current case in its postfix), or one printed line per case
    when tqdm is missing or the bar is switched off. Every finished case is also logged."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(unit="case", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def start(self, op: str, case) -> None:
        if self.bar is not None:
            self.bar.set_description(op)
            self.bar.set_postfix_str(f"{case.provider} {case.shape} {case.pass_name}", refresh=True)

    def done(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
            self.bar.update(1)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _time_cases(args, size, device, dtype, rows: list) -> None:
    """Time every case of ``args.ops``, appending one row per case to ``rows`` as it finishes."""
    from .models import MODEL_CASES
    from .ops import CASES
    from .report import H100_CEILINGS

    CASES = {**CASES, **MODEL_CASES}
    from .timing import measure

    progress = _Progress(not args.no_progress)
    try:
        for op in args.ops:
            # Cases are built one at a time: a default-size case can hold gigabytes of inputs.
            for i, case in enumerate(CASES[op](size, device, dtype), 1):
                progress.start(op, case)
                t0 = time.perf_counter()
                timing, error = None, None
                try:
                    timing = measure(case.run, device, warmup_ms=args.warmup, rep_ms=args.rep,
                                     cudagraph=case.cudagraph)
                except Exception as exc:  # a provider that fails is reported, not hidden
                    error = f"{type(exc).__name__}: {exc}"[:200]
                row = {"op": case.op, "provider": case.provider, "shape": case.shape,
                       "pass": case.pass_name, "dtype": str(dtype).replace("torch.", ""),
                       "ms": timing.ms if timing else None, "peer": case.peer, "flops": case.flops,
                       "bytes": case.bytes, "note": case.note, "error": error}
                if timing:
                    row.update(ms_p20=timing.ms_p20, ms_p80=timing.ms_p80, timing_method=timing.method,
                               capture_error=timing.capture_error or None)
                    ms = timing.ms
                    row["tflops"] = case.flops / ms / 1e9 if case.flops else None
                    row["gb_s"] = case.bytes / ms / 1e6 if case.bytes else None
                    # Share of the H100's measured ceilings (bf16 tensor cores, or HBM bandwidth).
                    row["pct_of_h100_peak"] = 100 * (row["tflops"] / H100_CEILINGS["bf16_tflops"]
                                                     if case.flops else
                                                     row["gb_s"] / 1e3 / H100_CEILINGS["hbm_tb_s"])
                rows.append(row)
                status = f"{timing.ms:9.3f} ms" if timing else f"FAILED {error}"
                progress.done(f"[{op} {i}] {case.provider:<16} {case.shape:<36} {case.pass_name:<8} "
                              f"{status} ({time.perf_counter() - t0:.1f}s)")
                del case.run
    finally:
        progress.close()


def run_timings(args, device) -> list[dict]:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype]) if device.type == "cuda" else torch.float32
    size = args.sizes or "default"
    rows = []
    try:
        _time_cases(args, size, device, dtype, rows)
    except KeyboardInterrupt:  # Ctrl-C, or `timeout -s INT` on a time-limited GPU run
        print(f"\ninterrupted: reporting the {len(rows)} rows measured so far", flush=True)
        args.interrupted = True
    for r in rows:  # time relative to the peer in the same run, same shape and pass
        peer = next((p for p in rows if (p["op"], p["shape"], p["pass"], p["provider"]) ==
                     (r["op"], r["shape"], r["pass"], r["peer"])), None)
        r["ratio"] = r["ms"] / peer["ms"] if peer and r["ms"] and peer["ms"] else None
    return rows


def run_checks(args) -> list[dict]:
    import torch

    from .. import BackendError
    from .checks import check, runnable_backends

    rows = []
    for op in [o for o in args.ops if o in OPS]:  # model cases are timed, not checked per backend
        for backend, reason in runnable_backends(op, "cpu", torch.float32).items():
            if reason:
                rows.append({"op": op, "backend": backend, "dtype": "-", "ok": None,
                             "note": f"cannot run here: {reason}"})
                continue
            for dtype in (torch.float32, torch.float16):
                try:
                    row = check(op, backend, dtype)
                    row["note"] = "" if row["ok"] else "ERROR ABOVE TOLERANCE"
                except BackendError as exc:
                    row = {"op": op, "backend": backend, "dtype": str(dtype)[6:], "ok": None,
                           "note": f"cannot run: {exc}"}
                rows.append(row)
                print(f"checked {op:<27} {backend:<10} {row['dtype']:<8} "
                      f"{'ok' if row['ok'] else row['note']}", flush=True)
    return rows


def _static(args, out: Path) -> int:
    """``--static``: compile, count and bound; nothing is timed (see ``colm_kernels.bench.static``)."""
    import torch

    from . import static
    from .report import provenance, write_json

    t0 = time.time()
    print("colm-bench --static: compiling every kept config for sm_90a, counting tensor-core FLOPs "
          "in the interpreter at H100 tiles, bounding each default case (no GPU needed) ...", flush=True)
    report = static.run(args.ops)
    text = static.format_report(report)
    print(text)
    (out / "static.txt").write_text(text + "\n")
    meta = provenance(torch.device("cpu"))
    meta.update(mode="static", seconds=round(time.time() - t0, 1),
                ceilings={"bf16_tflops": static.H100_CEILINGS["bf16_tflops"],
                          "hbm_tb_s": static.H100_CEILINGS["hbm_tb_s"]})
    write_json(out / "static.json", meta, [])
    data = json.loads((out / "static.json").read_text())
    data.update({k: report[k] for k in ("kernels", "work", "roofline", "failures")})
    (out / "static.json").write_text(json.dumps(data, indent=2))
    print(f"\nwrote {out / 'static.json'}, {out / 'static.txt'} in {time.time() - t0:.0f}s")
    if report["failures"]:
        print(f"colm-bench --static: {len(report['failures'])} failure(s)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("colm-bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .report import format_table, provenance, write_accuracy_plot, write_json, write_plots

    if args.static:
        return _static(args, out)
    if cuda and args.device != "cpu" or args.device == "cpu":
        device = torch.device("cuda" if cuda and args.device != "cpu" else "cpu")
        if device.type == "cpu" and args.sizes is None:
            args.sizes = "tiny"
        rows = run_timings(args, device)
        table = format_table(rows, [
            ("op", "op", ""), ("provider", "provider", ""), ("shape", "shape", ""), ("pass", "pass", ""),
            ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".1f"), ("gb_s", "GB/s", ".0f"),
            ("pct_of_h100_peak", "% H100 peak", ".0f"),
            ("ratio", "time/peer", ".2f"), ("peer", "peer", ""), ("timing_method", "timed by", "")])
        meta = provenance(device)
        meta["mode"] = "timings"
        meta["interrupted"] = args.interrupted
    else:
        # Triton kernels run on CPU tensors only under the interpreter; it must be chosen before
        # the kernels are first imported (import colm_kernels does not import them on a CPU).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("colm-bench: no CUDA device, so no timings (they need a GPU; see README for targets).\n"
              "Checking every backend that runs on this CPU against the float64 reference "
              "(Triton via TRITON_INTERPRET=1) ...", flush=True)
        rows = run_checks(args)
        table = format_table(rows, [
            ("op", "op", ""), ("backend", "backend", ""), ("dtype", "dtype", ""),
            ("max_rel_err_fwd", "rel err fwd", ".1e"), ("max_rel_err_grad", "rel err grad", ".1e"),
            ("tolerance", "tol", ".0e"), ("ok", "ok", ""), ("note", "note", "")])
        meta = provenance(torch.device("cpu"))
        meta["mode"] = "cpu-checks"
    print()
    print(table)
    (out / "table.txt").write_text(table + "\n")
    write_json(out / "results.json", meta, rows)
    if args.no_plots:
        plots = []
    elif meta["mode"] == "timings":
        plots = write_plots(out, rows)
    else:
        plots = write_accuracy_plot(out, rows)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}" + "".join(f", {p}" for p in plots))
    failed = [r for r in rows if r.get("ok") is False or r.get("error")]
    if meta["mode"] == "cpu-checks" and args.demo_steps > 0:
        from ..demo import train
        print()
        train(args.demo_steps)
    if failed:
        print(f"colm-bench: {len(failed)} row(s) failed", file=sys.stderr)
        return 1
    return 130 if args.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
