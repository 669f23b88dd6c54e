"""Shared fixtures: deterministic per-test seeding, a seeded generator, backend isolation."""
import os
import sys
import zlib

import pytest
import torch

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
for _path in (_ROOT, _TESTS):  # ``import colm_kernels`` and ``import utils`` from any test file
    if _path not in sys.path:
        sys.path.insert(0, _path)

# GPU-semantics mode (``COLM_KERNELS_GPU_SEMANTICS=1``, the tests marked ``gpu_semantics``; .ci/run's
# second tier): the interpreter launches kernels as an H100 does (colm_kernels/_triton/
# gpu_semantics.py): the H100 tiles and config lists, autotuning on with every kept config rerun
# into the live buffers, programs in a seeded random order, a race detector and a bounds checker.
# The tiles are chosen when the kernels are defined, so all of this is set before the import.
GPU_SEMANTICS = os.environ.get("COLM_KERNELS_GPU_SEMANTICS", "").strip().lower() in ("1", "true", "yes", "on")
if GPU_SEMANTICS:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["COLM_KERNELS_TILES"] = "gpu"
    os.environ["COLM_KERNELS_AUTOTUNE"] = "1"
    # one seed for the run, inherited by pytest-xdist's workers; printed in the header
    os.environ.setdefault("COLM_KERNELS_GPU_SEMANTICS_SEED", str(int.from_bytes(os.urandom(4), "little") >> 1))

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. Decided here, before
# anything imports triton (it reads the variable then); on a GPU the real kernels run.
if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"
# On a GPU autotuning stays on, as users run (every kept config is benchmarked into the live
# buffers on a kernel's first call of a key); COLM_KERNELS_AUTOTUNE=0 runs the first kept config
# (benchmarks/gpu_run.sh runs both; tests/ops/test_triton_configs.py checks every config).

import colm_kernels  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from colm_kernels._triton.interpreter import skip_repatching  # noqa: E402

    skip_repatching()  # the interpreter re-patched triton.language on every helper call

if GPU_SEMANTICS:
    from colm_kernels._triton import gpu_semantics  # noqa: E402
    from colm_kernels._triton.autotuning import autotuned_kernels  # noqa: E402

    GPU_SEMANTICS_SEED = int(os.environ["COLM_KERNELS_GPU_SEMANTICS_SEED"])
    gpu_semantics.start(GPU_SEMANTICS_SEED)

# Tiny tensors everywhere: one thread is faster and leaves the shared cores to others.
torch.set_num_threads(1)


def _seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Every test starts from a seed derived from its own id: reproducible, independent of order."""
    torch.manual_seed(_seed_of(request))
    yield


@pytest.fixture
def seed(request) -> int:
    """The per-test seed (stable across runs and orderings)."""
    return _seed_of(request)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id; pass it to ``utils.randn``."""
    return torch.Generator().manual_seed(_seed_of(request))


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` / ``empty_like`` return NaN-filled floating tensors, so an output element a
    kernel leaves unwritten fails the accuracy checks. Kernel tests use it module-wide."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() and t.device.type != "meta" else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))


@pytest.fixture(autouse=True)
def _gpu_semantics_first_call(request):
    """In the GPU-semantics mode every test starts as a new process would: no tuned config cached
    (its first call of each kernel benchmarks the kept configs into live buffers), and its own
    program orders, from the run's seed and the test id (reproducible alone)."""
    if GPU_SEMANTICS:
        for kernel in autotuned_kernels():
            kernel.cache.clear()
        gpu_semantics.reseed(GPU_SEMANTICS_SEED ^ _seed_of(request))
        gpu_semantics.clear_launch_log()
    yield


@pytest.fixture(autouse=True)
def _restore_backend():
    """A test that switches backend cannot leak its choice into the next test."""
    previous = colm_kernels.get_backend()
    yield
    colm_kernels.set_backend(previous)


def pytest_configure(config):
    # One Triton cache for every kernel-compiling subprocess of the session (utils.kernel_subprocess_env),
    # made by the controller and inherited by pytest-xdist's workers.
    if not hasattr(config, "workerinput") and "COLM_KERNELS_TEST_TRITON_CACHE" not in os.environ:
        import atexit
        import shutil
        import tempfile

        cache = tempfile.mkdtemp(prefix="colm-test-triton-cache-")
        os.environ["COLM_KERNELS_TEST_TRITON_CACHE"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    # Triton's interpreter converts 1-element numpy arrays with int(); numpy >= 1.25 warns each time.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
    # pytest-xdist's grouping marker (used by tests/ops/test_int64_offsets.py); known without it too.
    config.addinivalue_line("markers", "xdist_group(name): run in one xdist worker with --dist loadgroup")
    config.addinivalue_line("markers", "gpu_semantics: runs only with COLM_KERNELS_GPU_SEMANTICS=1 "
                            "(the interpreter launching kernels as an H100 does)")
    config.addinivalue_line("markers", "static: the second tier's sm_90a compiles and H100-tile work counts "
                            "(subprocesses, minutes; README's second-tier command runs them)")


def pytest_report_header(config):
    if GPU_SEMANTICS:
        return (f"GPU-semantics mode: H100 tiles, autotuning with reruns, shuffled programs, race and bounds "
                f"checks; COLM_KERNELS_GPU_SEMANTICS_SEED={GPU_SEMANTICS_SEED}")
    return None


def pytest_terminal_summary(terminalreporter):
    if GPU_SEMANTICS:  # printed after the results too: -q hides the header
        terminalreporter.write_line(f"GPU-semantics mode: COLM_KERNELS_GPU_SEMANTICS_SEED={GPU_SEMANTICS_SEED} "
                                    "(set it to replay this run's program orders and config choices)")


def pytest_collection_modifyitems(config, items):
    if GPU_SEMANTICS:
        return
    skip = pytest.mark.skip(reason="GPU-semantics mode only: COLM_KERNELS_GPU_SEMANTICS=1 (README, second tier)")
    for item in items:
        if item.get_closest_marker("gpu_semantics") is not None:
            item.add_marker(skip)
