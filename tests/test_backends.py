"""Backend selection: set_backend / use_backend / get_backend, COLM_KERNELS_BACKEND, auto on CPU,
and explicit backends that cannot run the inputs (BackendError with a reason, never a fallback)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import colm_kernels as ck
from colm_kernels import BackendError, backends
from utils import F64, chain_blocks, randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["chain_attention", "chain_linear", "chain_rmsnorm", "multi_chain_cross_entropy"]


def op_call(op, dtype=F64):
    """A zero-argument call of the public function ``op`` on small CPU inputs of ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    chains = (1, 2, 1)
    if op == "chain_linear":
        x, w = randn(5, 8, gen=gen, dtype=dtype), chain_blocks(12, 8, chains, gen, dtype=dtype)
        return lambda: ck.chain_linear(x, w, None, chains)
    if op == "chain_rmsnorm":
        x, w = randn(5, 8, gen=gen, dtype=dtype), randn(8, gen=gen, dtype=dtype)
        return lambda: ck.chain_rmsnorm(x, w, chains)
    if op == "chain_attention":
        q, k, v = (randn(2, 3, 4, 4, gen=gen, dtype=dtype) for _ in range(3))
        return lambda: ck.chain_attention(q, k, v, chains)
    h, w = randn(5, 8, gen=gen, dtype=dtype), randn(7, 8, gen=gen, dtype=dtype)
    t = torch.randint(0, 7, (5,), generator=gen)
    return lambda: ck.multi_chain_cross_entropy(h, w, t, chains)


# ---------------------------------------------------------------------------------------------
# set_backend / get_backend / use_backend
@pytest.mark.parametrize("name", ["auto", "cuda", "triton", "reference"])
def test_set_backend_round_trip(name):
    ck.set_backend(name)
    assert ck.get_backend() == name


@pytest.mark.parametrize("bad", ["gpu", "Reference", "", None, 1], ids=["gpu", "Reference", "empty", "None", "int"])
def test_unknown_backend_name_raises_and_keeps_the_current_one(bad):
    ck.set_backend("reference")
    with pytest.raises(ValueError, match="backend"):
        ck.set_backend(bad)
    assert ck.get_backend() == "reference"
    with pytest.raises(ValueError, match="backend"):
        with ck.use_backend(bad):
            pass
    assert ck.get_backend() == "reference"


def test_use_backend_nests_and_restores():
    ck.set_backend("auto")
    with ck.use_backend("reference"):
        assert ck.get_backend() == "reference"
        with ck.use_backend("triton"):
            assert ck.get_backend() == "triton"
        assert ck.get_backend() == "reference"
    assert ck.get_backend() == "auto"


def test_use_backend_restores_after_an_exception():
    ck.set_backend("auto")
    with pytest.raises(KeyError):
        with ck.use_backend("cuda"):
            raise KeyError("boom")
    assert ck.get_backend() == "auto"


def test_backend_error_is_a_runtime_error():
    assert issubclass(BackendError, RuntimeError)
    assert ck.BackendError is backends.BackendError


# ---------------------------------------------------------------------------------------------
# COLM_KERNELS_BACKEND (read at import): one fresh interpreter per value
_PROBE = textwrap.dedent("""
    import torch, colm_kernels as ck
    print("backend=" + ck.get_backend())
    x = torch.randn(3, 4, dtype=torch.float64)
    try:
        ck.chain_rmsnorm(x, torch.ones(4, dtype=torch.float64), (1, 1))
        print("ran")
    except ck.BackendError as exc:
        print("BackendError: " + str(exc))
""")


def _probe(value):
    env = {k: v for k, v in os.environ.items() if k not in ("COLM_KERNELS_BACKEND", "TRITON_INTERPRET")}
    if value is not None:
        env["COLM_KERNELS_BACKEND"] = value
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("", "auto"), ("reference", "reference")],
                         ids=["unset", "empty", "reference"])
def test_env_var_selects_backend_at_import(value, expected):
    res = _probe(value)
    assert res.returncode == 0, res.stderr
    assert f"backend={expected}" in res.stdout
    assert "ran" in res.stdout  # auto and reference both run on CPU


def test_env_var_explicit_backend_that_cannot_run_raises():
    res = _probe("cuda")
    assert res.returncode == 0, res.stderr
    assert "backend=cuda" in res.stdout
    assert "BackendError: chain_rmsnorm" in res.stdout and "'cuda'" in res.stdout


def test_env_var_invalid_value_raises_value_error_at_import():
    res = _probe("fastest")
    assert res.returncode != 0
    assert "ValueError" in res.stderr and "COLM_KERNELS_BACKEND" in res.stderr and "fastest" in res.stderr


# ---------------------------------------------------------------------------------------------
# explicit backends that cannot run: BackendError naming the op, with a reason; no fallback
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_explicit_backend_on_cpu_raises_backend_error(op, backend, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    call = op_call(op, dtype)
    with ck.use_backend(backend):
        with pytest.raises(BackendError, match=op) as info:
            call()
    msg = str(info.value)
    assert repr(backend) in msg
    reason = msg.split(":", 2)[-1].strip()
    assert len(reason) > 10, msg  # says why, not just that it failed
    if backend not in backends.registered(op):
        assert "no implementation" in msg
    else:
        assert "cannot run" in msg


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_picks_reference(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter on, auto stays on reference
    ck.set_backend("auto")
    for dtype in (F64, torch.float32):
        x = torch.zeros(2, 8, dtype=dtype)
        assert backends.select(op, [x]) == "reference"
    auto = op_call(op)()
    with ck.use_backend("reference"):
        ref = op_call(op)()
    assert torch.equal(auto, ref)


def _fake_impl(op, backend):
    """A registry entry for ``backend`` that would run the reference op if it were ever selected."""
    module = f"colm_kernels.ops.{op}.api"
    return backends.Implementation(op, backend, module, f"{op}_reference")


def test_registered_but_unavailable_triton_raises_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(backends._REGISTRY["chain_rmsnorm"], "triton", _fake_impl("chain_rmsnorm", "triton"))
    call = op_call("chain_rmsnorm", torch.float32)
    with ck.use_backend("triton"):
        with pytest.raises(BackendError, match="chain_rmsnorm.*'triton' cannot run") as info:
            call()
    assert "TRITON_INTERPRET" in str(info.value) or "triton" in str(info.value).split("cannot run")[1]
    # auto on CPU never picks it.
    assert backends.select("chain_rmsnorm", [torch.zeros(2, 8)]) == "reference"


def test_triton_interpreter_rejects_float64_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(backends._REGISTRY["chain_rmsnorm"], "triton", _fake_impl("chain_rmsnorm", "triton"))
    with ck.use_backend("triton"):
        with pytest.raises(BackendError, match="float64"):
            op_call("chain_rmsnorm", F64)()
        # float32 CPU tensors are accepted under the interpreter: the (fake) triton entry runs.
        assert backends.select("chain_rmsnorm", [torch.zeros(2, 8)]) == "triton"


def test_registered_but_unavailable_cuda_raises_with_reason(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY["chain_rmsnorm"], "cuda", _fake_impl("chain_rmsnorm", "cuda"))
    call = op_call("chain_rmsnorm", torch.float32)
    with ck.use_backend("cuda"):
        with pytest.raises(BackendError, match="chain_rmsnorm.*'cuda' cannot run"):
            call()
    assert backends.select("chain_rmsnorm", [torch.zeros(2, 8)]) == "reference"


def test_unavailable_reasons_are_strings_on_this_machine(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for check in (backends.triton_unavailable_reason, backends.cuda_unavailable_reason):
        reason = check()
        assert isinstance(reason, str) and reason


# ---------------------------------------------------------------------------------------------
# registered custom ops
def test_every_op_is_registered_with_a_reference_backend():
    assert set(OPS) <= set(backends.ops())
    for op in OPS:
        impl = backends.registered(op)["reference"]
        assert hasattr(torch.ops.colm_kernels, f"{op}_reference")
        assert hasattr(torch.ops.colm_kernels, f"{op}_reference_backward")
        api = __import__(f"colm_kernels.ops.{op}.api", fromlist=["api"])
        assert impl.function() is getattr(api, f"{op}_reference")


def test_torch_ops_namespace_calls_equal_public_functions():
    gen = torch.Generator().manual_seed(1)
    x, w = randn(5, 8, gen=gen), randn(8, gen=gen)
    with ck.use_backend("reference"):
        public = ck.chain_rmsnorm(x, w, (1, 2, 1))
    assert torch.equal(torch.ops.colm_kernels.chain_rmsnorm_reference(x, w, [0, 2, 6, 8], 1e-5, None), public)
    blocks = chain_blocks(12, 8, (1, 2, 1), gen)
    with ck.use_backend("reference"):
        public = ck.chain_linear(x, blocks, None, (1, 2, 1))
    assert torch.equal(torch.ops.colm_kernels.chain_linear_reference(x, blocks, [], None), public)
