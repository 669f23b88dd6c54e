"""With ``check_values=False`` no op reads a device value on the host, on any backend that runs
here, forward or backward: no ``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``, ...
(``host_syncs.HostSyncTrap`` lists them), and on a warm call no host list copied to the device
(``torch.tensor(list, device=...)``): every table comes from a cache. Each of these is a GPU
stall per layer per step, and an error under CUDA-graph capture; on CPU tensors they sync nothing,
so they are trapped instead. The first (cold) call may build cached tables; the second (warm)
call may not even do that."""
import pytest
import torch

import colm_kernels as ck
from host_syncs import trap_host_syncs
from op_cases import CASES, step

BACKENDS = ["reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_no_host_reads_with_check_values_off(case, backend):
    run, leaves = CASES[case]("cpu")
    with ck.use_backend(backend):
        with trap_host_syncs(tables=True) as cold:
            step(run, leaves)
        with trap_host_syncs(tables=False) as warm:
            step(run, leaves)
    assert not cold.calls, f"{case} on {backend}, first call, reads device values:\n" + "\n".join(cold.calls)
    assert not warm.calls, f"{case} on {backend}, warm call:\n" + "\n".join(warm.calls)


def test_the_trap_sees_host_reads():
    """The trap itself: each kind of host read it lists is recorded (and nothing else is)."""
    t = torch.arange(6.0)
    with trap_host_syncs(tables=False) as trap:
        t.sum() * 2
        t.index_select(0, torch.arange(2))
        torch.tensor([1, 2])  # host tensor: fine
        reads = [t[0].item(), t.tolist(), bool(t[1]), t.nonzero(), torch.unique(t), t[t > 2],
                 t.repeat_interleave(torch.ones(6, dtype=torch.long)), torch.tensor([1], device="cpu"),
                 t.to("cpu"), torch.where(t > 1)]
    assert len(reads) == len(trap.calls) == 10, [c.splitlines()[0] for c in trap.calls]
