"""Many scales in one batch (``seq_chains``) in chain_linear, chain_swiglu and chain_rmsnorm.

Each row must equal running that row alone at its own scale (``chain=s``, float64 reference),
padded with exact zeros; gradients must equal the gradients of those per-row runs (no gradient
flows from the zeros). Both layouts of ``seq_chains``: one scale per sequence ``(B,)`` and one
per token ``(B, S)``. The Triton kernels sort rows by scale and skip the work of chains a row does
not reach: ``test_mixed_batch_runs_the_flops_of_separate_batches`` counts it.
"""

import pytest
import torch

import colm_kernels as ck
from colm_kernels.chains import Chains
from utils import F64, run_reporting, work_env

BACKENDS = ["reference", "triton"]


def _per_row_reference(fn, x, seq_chains, out_width, params):
    """float64 outputs and gradients of running every row alone at its scale (padded with zeros)."""
    B, S = x.shape[:2]
    scales = seq_chains[:, None].expand(B, S) if seq_chains.dim() == 1 else seq_chains
    xs = x.detach().double().requires_grad_(True)
    ps = [p.detach().double().requires_grad_(True) for p in params]
    rows = []
    with ck.use_backend("reference"):
        for b in range(B):
            for t in range(S):
                y = fn(xs[b, t:t + 1], ps, int(scales[b, t]))
                rows.append(torch.nn.functional.pad(y, (0, out_width - y.shape[-1])))
    return torch.cat(rows).reshape(B, S, out_width), xs, ps


def _scales(B, S, n, per_token, gen):
    shape = (B, S) if per_token else (B,)
    return torch.randint(0, n, shape, generator=gen)


def _check(op_fn, x, params, seq_chains, out_width, backend, tol):
    """The op on ``backend`` (float32) against the per-row float64 reference: outputs, exact
    zeros beyond each row's scale, gradients of x and of every parameter."""
    ref, xs, ps = _per_row_reference(op_fn, x, seq_chains, out_width, params)
    cot = torch.randn(ref.shape, dtype=F64)
    (ref * cot).sum().backward()
    xk = x.detach().float().requires_grad_(True)
    pk = [p.detach().float().requires_grad_(True) for p in params]
    with ck.use_backend(backend):
        y = op_fn(xk, pk, None, seq_chains=seq_chains)
    zeros = ref == 0
    assert (y.detach()[zeros] == 0).all(), "outputs beyond a row's scale must be exact zeros"
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    (y * cot.float()).sum().backward()
    torch.testing.assert_close(xk.grad.double(), xs.grad, rtol=tol, atol=tol)
    for g, r in zip(pk, ps):
        torch.testing.assert_close(g.grad.double(), r.grad, rtol=tol, atol=tol)


CHAINS = [(1, 2, 1), (1, 1, 1, 1), (3,)]


@pytest.mark.parametrize("per_token", [False, True], ids=["per-seq", "per-token"])
@pytest.mark.parametrize("chains", CHAINS, ids=lambda c: "C" + ".".join(map(str, c)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_linear_rows(backend, chains, per_token, gen):
    c = Chains(chains)
    in_f, out_f = 8 * c.total, 4 * c.total
    x = torch.randn(3, 5, in_f + 3, generator=gen, dtype=F64)  # wider than the chains read
    w = torch.randn(out_f, in_f, generator=gen, dtype=F64) / in_f ** 0.5
    b = torch.randn(out_f, generator=gen, dtype=F64)
    sc = _scales(3, 5, c.n, per_token, gen)

    def fn(x, p, chain, seq_chains=None):
        return ck.chain_linear(x, p[0], p[1], c, chain=chain, seq_chains=seq_chains)
    _check(fn, x, [w, b], sc, out_f, backend, 1e-4)


@pytest.mark.parametrize("per_token", [False, True], ids=["per-seq", "per-token"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_swiglu_rows(backend, per_token, gen):
    c = Chains((1, 2, 1))
    dim, hidden = 24, 32
    x = torch.randn(2, 7, dim, generator=gen, dtype=F64)
    w1, w3 = (torch.randn(hidden, dim, generator=gen, dtype=F64) / dim ** 0.5 for _ in range(2))
    sc = _scales(2, 7, c.n, per_token, gen)

    def fn(x, p, chain, seq_chains=None):
        return ck.chain_swiglu(x, p[0], p[1], c, chain=chain, seq_chains=seq_chains)
    _check(fn, x, [w1, w3], sc, hidden, backend, 1e-4)


@pytest.mark.parametrize("per_token", [False, True], ids=["per-seq", "per-token"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_rmsnorm_rows(backend, per_token, gen):
    c = Chains((1, 2, 1))
    dim = 40
    x = torch.randn(3, 6, dim, generator=gen, dtype=F64)
    g = 1 + 0.2 * torch.randn(dim, generator=gen, dtype=F64)
    sc = _scales(3, 6, c.n, per_token, gen)

    def fn(x, p, chain, seq_chains=None):
        if chain is not None:  # the row alone: its prefix width
            x = x[..., : c.active_width(dim, chain)]
        return ck.chain_rmsnorm(x, p[0], c, seq_chains=seq_chains)
    _check(fn, x, [g], sc, dim, backend, 1e-4)


def test_scale_below_the_call_and_one_row_scale():
    """seq_chains at most the call's chain; a batch whose rows share one scale equals that scale."""
    c = Chains((1, 1, 1))
    x, w = torch.randn(4, 12, dtype=F64), torch.randn(12, 12, dtype=F64)
    y = ck.chain_linear(x, w, None, c, chain=1, seq_chains=torch.tensor([1, 0, 1, 1]))
    full = ck.chain_linear(x, w, None, c, chain=1)
    assert y.shape == (4, 8)
    torch.testing.assert_close(y[[0, 2, 3]], full[[0, 2, 3]])
    assert (y[1, 4:] == 0).all()
    same = ck.chain_linear(x, w, None, c, seq_chains=torch.full((4,), 2))
    torch.testing.assert_close(same, ck.chain_linear(x, w, None, c))


@pytest.mark.parametrize("op", ["chain_linear", "chain_swiglu", "chain_rmsnorm"])
def test_bad_seq_chains_name_the_argument(op):
    c = (1, 2, 1)
    x, w = torch.randn(2, 3, 8), torch.randn(8, 8)

    def call(sc, **kw):
        if op == "chain_linear":
            return ck.chain_linear(x, w, None, c, seq_chains=sc, **kw)
        if op == "chain_swiglu":
            return ck.chain_swiglu(x, w, w, c, seq_chains=sc, **kw)
        return ck.chain_rmsnorm(x, torch.ones(8), c, seq_chains=sc, **kw)

    with pytest.raises(ValueError, match=r"seq_chains must have a prefix of x's leading shape \(2, 3\)"):
        call(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_chains must have a prefix"):
        call(torch.zeros(2, 3, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_chains must be an integer tensor"):
        call(torch.zeros(2))
    with pytest.raises(ValueError, match=r"seq_chains values must be in \[0, 2\]"):
        call(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"seq_chains values must be in \[0, 2\]"):
        call(torch.tensor([[0, 1, -1], [2, 2, 2]]))
    with pytest.raises(ValueError, match="seq_chains is on meta"):
        call(torch.zeros(2, dtype=torch.long, device="meta"))
    call(torch.tensor([0, 3]), check_values=False)  # trusted by the caller: no host sync


_WORK = r"""
import json, torch
import colm_kernels as ck
from colm_kernels.bench.work import count_mma_flops
from colm_kernels.chains import Chains

c, dim, rows_per_scale = Chains((1, 1, 1, 1)), 512, 256
gen = torch.Generator().manual_seed(0)
scales = torch.arange(4).repeat_interleave(rows_per_scale)
scales = scales[torch.randperm(scales.numel(), generator=gen)]  # mixed, unsorted
x = torch.randn(scales.numel(), dim, generator=gen).half()
w1, w3 = (torch.randn(dim, dim, generator=gen).half() / 8 for _ in range(2))
out = {}

def run(op, x, sc=None, chain=None):
    x = x.clone().requires_grad_(True)
    ws = [w.clone().requires_grad_(True) for w in (w1, w3)]
    with count_mma_flops() as work:
        if op == "chain_linear":
            y = ck.chain_linear(x, ws[0], None, c, chain=chain, seq_chains=sc, check_values=False)
        else:
            y = ck.chain_swiglu(x, ws[0], ws[1], c, chain=chain, seq_chains=sc, check_values=False)
        y.backward(torch.ones_like(y))
    return work.total

with ck.use_backend("triton"):
    for op in ("chain_linear", "chain_swiglu"):
        mixed = run(op, x, scales)
        separate = sum(run(op, x[scales == s], None, s) for s in range(4))
        out[op] = [mixed, separate]
print("ELASTIC_WORK " + json.dumps(out))
"""


@pytest.mark.static
def test_mixed_batch_runs_the_flops_of_separate_batches():
    """Executed tensor-core FLOPs (interpreter, H100 tiles, forward and backward) of a batch that
    mixes four scales in random order, over the FLOPs of four batches of one scale each: <= 1.05."""
    for op, (mixed, separate) in run_reporting(["-c", _WORK], "ELASTIC_WORK", work_env()).items():
        assert separate > 0
        assert mixed <= 1.05 * separate, f"{op}: mixed batch {mixed} FLOPs vs {separate} for separate batches"
