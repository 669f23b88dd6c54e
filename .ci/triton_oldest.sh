#!/usr/bin/env bash
# The sm_90a compile gates under the OLDEST Triton that setup.py accepts (its "triton>=X.Y" floor;
# GPU machines carry it), where README's tiers run under the newest that pip installs: a venv of
# its own with CPU torch and triton==X.Y.0, then every static test that compiles kernels for sm_90a
# (no spills in any kept config, the wgmma rules). Part of README's second tier; no GPU needed.
# COLM_OLDEST_TRITON_VENV=path: build (or reuse, if it already holds that Triton) the venv there.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(sed -n 's/.*"triton>=\([0-9][0-9.]*\)".*/\1/p' setup.py)
[ -n "$floor" ] || { echo "setup.py has no \"triton>=X.Y\" requirement" >&2; exit 1; }
want="$floor.0"
venv="${COLM_OLDEST_TRITON_VENV:-$(mktemp -d)/venv}"
if ! "$venv/bin/python" -c "import sys, triton; sys.exit(triton.__version__ != '$want')" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # numpy < 2.3: setup.py's bound (Triton 3.6's interpreter)
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0" "triton==$want" "numpy<2.3" pytest pytest-xdist hypothesis
fi
"$venv/bin/python" -m pip install --quiet --no-deps -e . >/dev/null
"$venv/bin/python" -c "import triton; print('sm_90a gates under triton', triton.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 -m static \
    tests/ops/test_triton_compiles_for_sm90.py \
    tests/ops/test_static_report.py::test_default_shapes_no_spills_and_wgmma \
    tests/ops/test_multi_chain_cross_entropy_rows.py::test_sorted_row_kernels_compile_for_sm90_without_spills
