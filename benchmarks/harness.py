"""Shared by the ``bench_<op>.py`` files: one parametrized benchmark per case of an op."""
import pytest
import torch

from colm_kernels.bench.models import MODEL_CASES
from colm_kernels.bench.ops import CASES

CASES = {**CASES, **MODEL_CASES}

SIZE = "default"
DTYPE = torch.bfloat16


def cases_for(op: str):
    """Parametrize a test over ``op``'s cases (none, and a clean skip, without CUDA)."""
    cases = list(CASES[op](SIZE, torch.device("cuda"), DTYPE)) if torch.cuda.is_available() else []
    return pytest.mark.parametrize(
        "case", cases or [pytest.param(None, marks=pytest.mark.skip(reason="timings need a CUDA GPU"))],
        ids=lambda c: "no-cuda" if c is None else f"{c.provider}-{c.shape}-{c.pass_name}",
    )
