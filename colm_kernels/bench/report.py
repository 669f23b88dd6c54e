"""Rows -> a printed table, JSON with the run's provenance, and PNG plots (matplotlib optional)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

# The H100's measured ceilings (dense bf16 GEMM, HBM copy): "% H100 peak" divides by these.
H100_CEILINGS = {"bf16_tflops": 790.0, "hbm_tb_s": 3.0}


def provenance(device: torch.device) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).resolve().parent).stdout.strip() or None
        except Exception:
            return None

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain")),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec); missing values (None) print as 'n/a'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("n/a" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (and a line saying why) without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'colm-kernels[bench]')")
        return None
    return plt


def write_accuracy_plot(out_dir: Path, rows: list[dict]) -> list[Path]:
    """``accuracy.png`` of the CPU check mode: each (op, backend, dtype)'s largest relative error
    (forward and gradient) over its tolerance, on a log axis (below 1 passes)."""
    plt = _pyplot()
    checked = [r for r in rows if r.get("ok") is not None]
    if plt is None or not checked:
        return []
    labels = [f"{r['op']}\n{r['backend']} {r['dtype']}" for r in checked]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(checked)), 4.5))
    xs = range(len(checked))
    floor = 1e-6  # an exact result still shows as a bar on the log axis
    for offset, key, name in ((-0.2, "max_rel_err_fwd", "forward"), (0.2, "max_rel_err_grad", "gradient")):
        ys = [max(floor, r[key] / r["tolerance"]) if r.get(key) is not None else 0.0 for r in checked]
        ax.bar([x + offset for x in xs], ys, 0.4, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel("max relative error / tolerance (< 1 passes)")
    ax.set_title("CPU checks against the float64 reference (no bar: forward-only op)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def write_plots(out_dir: Path, rows: list[dict]) -> list[Path]:
    """One PNG per op: time relative to the peer of the same shape and pass (1.0 = the peer;
    scale-free, so shapes and passes share one axis). Returns the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for op in sorted({r["op"] for r in rows}):
        op_rows = [r for r in rows if r["op"] == op and r.get("ratio") is not None]
        if not op_rows:
            continue
        groups = sorted({(r["shape"], r["pass"]) for r in op_rows})
        providers = sorted({r["provider"] for r in op_rows})
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(providers) / 2), 4))
        width = 0.8 / len(providers)
        for j, prov in enumerate(providers):
            ys = []
            for g in groups:
                match = [r for r in op_rows if (r["shape"], r["pass"]) == g and r["provider"] == prov]
                ys.append(match[0]["ratio"] if match else 0.0)
            ax.bar([i + j * width for i in range(len(groups))], ys, width, label=prov)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{p}" for s, p in groups], fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"time / {op_rows[0]['peer']} (lower is better)")
        ax.set_title(op)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
