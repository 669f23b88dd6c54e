"""``colm-bench --static``: how every Triton kernel will run on an H100, without a GPU.

Three parts, each a list of rows (JSON) and a table:

- ``kernels``: every Triton kernel and every autotune config its pruner keeps at the default bench
  shapes (bf16, the timing dtype), compiled for sm_90a with Triton's ``ptxas -v``
  (``colm_kernels.bench.sm90``): registers, spill bytes, shared memory, resident blocks per SM,
  MMA kind (``wgmma`` / ``mma.sync`` / none) and how many of each instruction the PTX holds, TMA
  and ``cp.async`` use. Runs in a subprocess
  without ``TRITON_INTERPRET``.
- ``work``: tensor-core FLOPs the kernels execute over the useful FLOPs of the op, and the bytes
  they load and store in global memory over the op's minimum (each input read once, each output
  written once), per op and pass, counted in Triton's interpreter at the H100 tile sizes
  (``colm_kernels.bench.work``), for the first config each pruner keeps and for the worst of the
  kept configs. Runs in a subprocess with ``TRITON_INTERPRET=1 COLM_KERNELS_TILES=gpu``, at
  reduced sizes that keep the default cases' structure (chain widths multiples of 128, sequences
  of 512).
- ``roofline``: for every default bench case, the useful FLOPs and the bytes it must move at least
  (inputs read once, outputs written once), their times on an H100 (790 TFLOP/s bf16, 3.35 TB/s
  HBM) and the lower bound, the larger of the two, that no kernel can beat.

Nothing here is a GPU measurement. This module runs the parts (``static_compile``,
``static_work`` in subprocesses with their own environments; ``roofline``) and formats the report;
``python -m colm_kernels.bench.static compile|work OPS`` is a part's subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List

from .report import H100_CEILINGS as _TIMED_CEILINGS
from .roofline import H100_HBM_PEAK_TB_S, roofline

# The ceilings this report bounds with (recorded in static.json): the memory side at the HBM peak.
H100_CEILINGS = {**_TIMED_CEILINGS, "hbm_tb_s": H100_HBM_PEAK_TB_S}

MARK = "COLM_STATIC_JSON "


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
                  ("resident_blocks", "blocks/SM", "d"), ("mma", "MMA", ""), ("mma_sync", "mma.sync", "d"),
                  ("wgmma", "wgmma", "d"), ("tma", "TMA", ""),
                  ("cp_async", "cp.async", "")]
WORK_COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("pass", "pass", ""),
                ("useful_flops", "useful FLOPs", ".3g"), ("executed_flops", "executed", ".3g"),
                ("ratio_first_config", "exec/useful (1st cfg)", ".3f"),
                ("ratio_worst_config", "worst kept cfg", ".3f"), ("min_bytes", "min bytes", ".3g"),
                ("executed_bytes", "moved", ".3g"), ("bytes_ratio_first_config", "moved/min (1st cfg)", ".3f"),
                ("bytes_ratio_worst_config", "worst kept cfg", ".3f"), ("configs", "cfgs", "d")]
ROOFLINE_COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("pass", "pass", ""),
                    ("flops", "FLOPs", ".3g"), ("bytes", "bytes", ".3g"), ("flops_per_byte", "FLOP/B", ".0f"),
                    ("flops_ms", "FLOP ms", ".4f"), ("hbm_ms", "HBM ms", ".4f"), ("bound_ms", "H100 bound ms", ".4f"),
                    ("bound_by", "bound by", ""), ("note", "note", "")]


def format_report(report: dict) -> str:
    from .report import format_table

    parts = [
        "kernels: every config the pruners keep at the default bench shapes (bf16), compiled for "
        "sm_90a",
        format_table(report["kernels"], KERNEL_COLUMNS),
        "",
        "work: tensor-core FLOPs executed over useful FLOPs, and global-memory bytes moved over the "
        "minimum (inputs read once, outputs written once), counted in the interpreter at H100 tiles",
        format_table(report["work"], WORK_COLUMNS),
        "",
        f"roofline: lower bounds on an H100 ({H100_CEILINGS['bf16_tflops']:.0f} TFLOP/s bf16, "
        f"{H100_CEILINGS['hbm_tb_s']} TB/s HBM); no GPU figure",
        format_table(report["roofline"], ROOFLINE_COLUMNS),
    ]
    if report["failures"]:
        parts += ["", "FAILURES:"] + [f"  {f}" for f in report["failures"]]
    return "\n".join(parts)


def _main(argv: List[str]) -> int:
    part, ops = argv[1], argv[2].split(",")
    t0 = time.time()
    if part == "compile":
        from .static_compile import compile_default_shapes

        out = compile_default_shapes(ops)
    elif part == "work":
        from .static_work import count_work

        out = count_work(ops, all_configs=argv[3:] != ["first"])
    else:
        raise SystemExit(f"unknown part {part!r}")
    out["seconds"] = round(time.time() - t0, 1)
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
