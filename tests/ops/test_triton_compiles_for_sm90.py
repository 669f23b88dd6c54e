"""Every Triton kernel of the package compiles for an H100 (sm_90), without a GPU.

The interpreter (``TRITON_INTERPRET=1``, used by the other tests on CPU) never lowers a kernel, so
errors that only real compilation sees (a non-constexpr global read in a kernel, invalid layouts,
``ptxas`` failures, shared memory beyond the H100's 227 KiB for a config the pruners keep) would
pass CI. This test runs ``sm90_compile_check.py`` in a clean subprocess without
``TRITON_INTERPRET``: it calls the public Triton launchers on small CPU tensors with a fake driver
targeting sm_90, compiles every kernel (every surviving autotune config) they would launch down to
a cubin with Triton's bundled ``ptxas``, and launches nothing. See that script's docstring.

The ops are split into shards of about equal compile time (one subprocess each), so that
``pytest -n 2`` runs them on both workers; together the shards cover every op of the script and
every kernel module of the package.
"""
import json
import os
import subprocess
import sys

import pytest

from utils import kernel_subprocess_env, require_sm90_ptxas

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_SCRIPT = os.path.join(_HERE, "sm90_compile_check.py")
_EXPECTED_MODULES = {
    "colm_kernels.ops.chain_linear.triton_kernels",
    "colm_kernels.ops.chain_swiglu.triton_kernels",
    "colm_kernels.ops.chain_attention.triton_kernels",
    "colm_kernels.ops.chain_attention_decode.triton_kernels",
}


# Ops, or "op:dtype" parts of an op's cases (every kernel of an op runs in each dtype's cases), in
# shards of about equal compile time (attention's configs take ~2.5 s each on one core, the rest ~1 s).
SHARDS = (
    ("chain_attention:float16",),
    ("chain_attention:bfloat16", "chain_linear", "chain_rmsnorm"),
    ("chain_swiglu", "chain_attention_decode", "multi_chain_cross_entropy"),
)


# Kernels whose every kept config at the script's shapes must compile to wgmma alone (issue 22;
# the decode kernels' M tile is their few query rows; the GEMMs are held at the default shapes by
# test_static_report.py).
WGMMA_ONLY = {"_chain_attention_fwd_kernel", "_chain_attention_bwd_kernel", "_chain_attention_bwd_dq_kernel"}

pytestmark = pytest.mark.static  # second tier: sm_90a compiles


@pytest.mark.parametrize("ops", SHARDS, ids=["+".join(s) for s in SHARDS])
def test_every_triton_kernel_compiles_for_sm90(ops):
    require_sm90_ptxas()
    env = kernel_subprocess_env()
    proc = subprocess.run([sys.executable, _SCRIPT, "--ops", ",".join(ops)], cwd=_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (proc.stdout + proc.stderr)[-20000:]
    summary_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SM90_COMPILE_SUMMARY ")]
    assert proc.returncode == 0, f"sm_90 compile check failed (exit {proc.returncode}):\n{log}"
    assert summary_lines, f"no summary line:\n{log}"
    summary = json.loads(summary_lines[-1].split(" ", 1)[1])
    assert summary["failures"] == 0, log
    assert summary["compiled"] > 0, log
    covered = {p for p in summary["all_parts"] for shard in SHARDS for t in shard if t in (p, p.split(":")[0])}
    assert covered == set(summary["all_parts"]), f"shards {SHARDS} miss {set(summary['all_parts']) - covered}"
    launched = summary["kernel_modules"]  # every module of the package that launches a @triton.jit kernel
    assert _EXPECTED_MODULES <= set(launched), f"kernel modules not discovered: {sorted(launched)}"
    outside = [m for m in launched if not m.startswith("colm_kernels.ops.")]
    assert not outside, f"kernel modules outside colm_kernels.ops/<op>/, which no shard owns: {outside}"
    mine = {m: kernels for m, kernels in launched.items() if m.split(".")[2] in {t.split(":")[0] for t in ops}}
    assert mine, f"no kernel module of {ops} discovered: {sorted(launched)}"
    assert set(mine) <= set(summary["modules"]), log
    for module, kernels in mine.items():
        for kernel in kernels:
            assert summary["kernels"].get(kernel, 0) > 0, f"{module}.{kernel} was never compiled\n{log}"
    # every config the pruners keep at these shapes (fp16, bf16, fp32 decode; aligned and not; head
    # dims 8..256) compiles without register spills (ptxas -v): fix the kernel or prune the config
    spilling = [f"{c['kernel']} {c['config']} ({c['label']}): {c['spill_bytes']} B"
                for c in summary["configs"] if c["spill_bytes"]]
    assert not spilling, "configs that spill registers on sm_90a:\n" + "\n".join(spilling)
    # the training attention kernels at head dims 64 and 128 (80 pads to 128), fp16 and bf16: every
    # product on warpgroup tiles, not one mma.sync instruction (counted in the PTX, not "any wgmma")
    on_mma_sync = [f"{c['kernel']} {c['config']} ({c['label']}): {c['mma_sync']} mma.sync, {c['wgmma']} wgmma"
                   for c in summary["configs"] if c["kernel"] in WGMMA_ONLY and c["mma_sync"]]
    assert not on_mma_sync, "attention configs with mma.sync on sm_90a:\n" + "\n".join(on_mma_sync)
