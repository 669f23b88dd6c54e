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

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. Decided here, before
# anything imports triton (it reads the variable then); on a GPU the real kernels run.
if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"
# On a GPU, one config per autotuned kernel: tuning every small test layout would spend the run
# compiling. tests/ops/test_triton_configs.py checks every config. COLM_KERNELS_AUTOTUNE=1 overrides.
if torch.cuda.is_available():
    os.environ.setdefault("COLM_KERNELS_AUTOTUNE", "0")

import colm_kernels  # noqa: E402

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
def _restore_backend():
    """A test that switches backend cannot leak its choice into the next test."""
    previous = colm_kernels.get_backend()
    yield
    colm_kernels.set_backend(previous)


def pytest_configure(config):
    # Triton's interpreter converts 1-element numpy arrays with int(); numpy >= 1.25 warns each time.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
    # pytest-xdist's grouping marker (used by tests/ops/test_int64_offsets.py); known without it too.
    config.addinivalue_line("markers", "xdist_group(name): run in one xdist worker with --dist loadgroup")
