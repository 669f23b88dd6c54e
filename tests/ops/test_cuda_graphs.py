"""Every op's forward and backward captured in a CUDA graph and replayed (GPU only): the models'
training and decode steps are graph-captured, and a capture fails on any host read of a device
value or host-to-device copy of a list (``tests/ops/test_host_syncs.py`` traps those on CPU).
The replay must reproduce the eager call on the same inputs: bitwise, except where a backward
adds with float atomics (attention's dQ without ``deterministic``)."""
import pytest
import torch

import colm_kernels as ck
from colm_kernels import _cuda
from op_cases import CASES, step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

BACKENDS = ["triton", "reference"] + (["cuda"] if torch.cuda.is_available() and _cuda.unavailable_reason() is None
                                      else [])
ATOMIC_DQ = {"chain_attention", "chain_attention-varlen"}  # dQ summed by float atomics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_capture_and_replay(case, backend):
    run, leaves = CASES[case]("cuda")
    with ck.use_backend(backend):
        try:
            out, _ = step(run, leaves)  # first call outside the capture: compiles and autotunes
        except ck.BackendError as exc:
            pytest.skip(f"{backend} declines {case}: {exc}")
        cot = torch.randn_like(out)
        eager_out, eager_grads = step(run, leaves, cot)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm the side stream, as torch.cuda.graphs recommends
            step(run, leaves, cot)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, g_grads = step(run, leaves, cot)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(g_out, eager_out), f"{case} {backend}: replayed output differs"
    for i, (a, b) in enumerate(zip(g_grads, eager_grads)):
        if backend == "triton" and case in ATOMIC_DQ and i == 0:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a, b), f"{case} {backend}: replayed gradient {i} differs"
