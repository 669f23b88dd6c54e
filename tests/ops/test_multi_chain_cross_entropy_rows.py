"""``multi_chain_cross_entropy`` with per-row scales (``seq_chains``, elastic batches).

Row r with scale s counts in the losses of scales 0..s only: each scale's loss is over the rows that
reach it. The float64 reference here is written independently of the package: for every scale, one
``F.cross_entropy`` (with the call's ``reduction`` and ``label_smoothing``) over the rows that reach
it, on logits built from those rows' hidden states at that prefix width, plus the z-loss reduced
the same way; ``none`` scatters the rows back (0 where a row does not reach a scale). Both layouts
of ``seq_chains`` (``(B,)`` and ``(B, S)``), every option, the reference backend (float64, to
rounding) and the triton backend (interpreter: fp32 and fp16; bf16 on a GPU) under the accuracy
rule of ``numerics.py``; bad ``seq_chains``; a scale that no row reaches; hidden values beyond a
row's own prefix that must never be read; several backward chunks; opcheck and torch.compile.
``test_mixed_batch_runs_the_flops_of_separate_batches`` counts the tensor-core FLOPs the kernels
execute (interpreter, H100 tiles) for a batch mixing 4 scales against 4 one-scale batches.
``torch.empty`` is NaN-filled here, so any output element a kernel leaves unwritten fails.
"""

import pytest
import torch
import torch.nn.functional as F

import colm_kernels as ck
from ce_options import CHAINS, D, DEVICE, LOW, OPTIONS, V
from numerics import assert_within_eager_error
from utils import kernel_subprocess_env, require_sm90_ptxas, run_reporting, work_env

pytestmark = pytest.mark.usefixtures("nan_empty")  # unwritten outputs are NaN

B, S = 3, 7
LAYOUTS = ["per-seq", "per-token"]


def _prefixes(d, chains):
    out, acc = [], 0
    for c in chains:
        acc += d * c // sum(chains)
        out.append(acc)
    return out


def ref64(hidden, weight, targets, seq_chains, chains=CHAINS, ignore_index=-100, *, reduction="mean",
          label_smoothing=0.0, lse_square_scale=0.0, softcap=None):
    """``(loss, z_loss)`` in float64: per scale, PyTorch's cross-entropy over the rows that reach it."""
    width = hidden.shape[-1]
    prefixes = _prefixes(weight.shape[1], chains)
    ns = prefixes.index(width) + 1
    h = hidden.double().reshape(-1, width)
    t = targets.reshape(-1)
    scale = seq_chains.reshape(*seq_chains.shape, *([1] * (targets.dim() - seq_chains.dim())))
    scale = scale.expand(targets.shape).reshape(-1)
    losses, zs = [], []
    for s, p in enumerate(prefixes[:ns]):
        sel = (scale >= s).nonzero().flatten()
        logits = h[sel, :p] @ weight.double()[:, :p].T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        ts = t[sel]
        keep = (ts != ignore_index).double()
        z = lse_square_scale * torch.logsumexp(logits, dim=-1) ** 2 * keep
        if reduction == "none":
            ce = F.cross_entropy(logits, ts, ignore_index=ignore_index, reduction="none",
                                 label_smoothing=label_smoothing)
            loss_s = torch.zeros(t.shape[0], dtype=torch.float64, device=h.device).index_add(0, sel, ce + z)
            z_s = torch.zeros(t.shape[0], dtype=torch.float64, device=h.device).index_add(0, sel, z)
        else:
            ce = F.cross_entropy(logits, ts, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing)
            z_s = z.sum() / keep.sum() if reduction == "mean" else z.sum()
            loss_s = ce + z_s
        losses.append(loss_s)
        zs.append(z_s)
    shape = (-1, *targets.shape) if reduction == "none" else (-1,)
    return torch.stack(losses).reshape(shape), torch.stack(zs).reshape(shape)


def _inputs(dtype, width=D, layout="per-token", ignore=(0, 3), n_scales=len(CHAINS), gen=None, lead=(B, S)):
    """hidden ``(*lead, width)``, weight ``(V, D)``, targets ``lead`` (``ignore`` rows -100) and
    seq_chains ``lead[:1]`` (per-seq) or ``lead`` (per-token) in ``[0, n_scales)``."""
    hidden = torch.randn(*lead, width, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(V, D, generator=gen) / D ** 0.5 * 2).to(DEVICE, dtype)
    targets = torch.randint(0, V, lead, generator=gen)
    targets.view(-1)[list(ignore)] = -100
    shape = lead[:1] if layout == "per-seq" else lead
    seq_chains = torch.randint(0, n_scales, shape, generator=gen)
    seq_chains.view(-1)[:n_scales] = torch.arange(n_scales)  # every scale present
    return hidden, weight, targets.to(DEVICE), seq_chains.to(DEVICE)


def _run(fn, hidden, weight, cot, cot_z):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss, z = fn(h, w)
    ((loss * cot.to(loss)).sum() + (z * cot_z.to(z)).sum()).backward()  # NaN losses too: finite cotangents
    return loss.detach(), z.detach(), h.grad, w.grad


def _ours(backend, targets, seq_chains, options, **kw):
    def fn(h, w):
        with ck.use_backend(backend):
            return ck.multi_chain_cross_entropy(h, w, targets, CHAINS, return_z_loss=True,
                                                seq_chains=seq_chains, **options, **kw)
    return fn


def _theirs(targets, seq_chains, options):
    return lambda h, w: ref64(h, w, targets, seq_chains, **options)


def _cotangents(hidden, targets, options):
    ns = _prefixes(D, CHAINS).index(hidden.shape[-1]) + 1
    shape = (ns, *targets.shape) if options.get("reduction") == "none" else (ns,)
    return (torch.randn(shape, dtype=torch.float64).to(DEVICE),
            torch.randn(shape, dtype=torch.float64).to(DEVICE))


def _reaches(targets, seq_chains, ns):
    """``(ns, *targets.shape)`` bool: which rows reach each scale."""
    sc = seq_chains.reshape(*seq_chains.shape, *([1] * (targets.dim() - seq_chains.dim()))).expand(targets.shape)
    return torch.stack([sc >= s for s in range(ns)])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name, options", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_reference_backend_float64(name, options, layout, gen):
    hidden, weight, targets, sc = _inputs(torch.float64, layout=layout, gen=gen)
    cot, cot_z = _cotangents(hidden, targets, options)
    got = _run(_ours("reference", targets, sc, options), hidden, weight, cot, cot_z)
    want = _run(_theirs(targets, sc, options), hidden, weight, cot, cot_z)
    for what, a, b in zip(("loss", "z_loss", "d_hidden", "d_weight"), got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape, what
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=what)


# Every option in float32 with both layouts; float16 (and bfloat16 on a GPU) on the plain and the
# combined ones.
CASES = [(name, options, torch.float32, layout) for name, options in OPTIONS for layout in LAYOUTS] + [
    (name, options, dtype, layout) for name, options in OPTIONS if name in ("mean", "all-mean", "all-none")
    for dtype in LOW[1:] for layout in LAYOUTS]


@pytest.mark.parametrize("name, options, dtype, layout", CASES,
                         ids=[f"{c[0]}-{str(c[2])[6:]}-{c[3]}" for c in CASES])
def test_triton_backend_within_eager_error(name, options, dtype, layout, gen):
    hidden, weight, targets, sc = _inputs(dtype, layout=layout, gen=gen)
    cot, cot_z = _cotangents(hidden, targets, options)
    got = _run(_ours("triton", targets, sc, options), hidden, weight, cot, cot_z)
    eager = _run(_ours("reference", targets, sc, options), hidden, weight, cot, cot_z)
    want = _run(_theirs(targets, sc, options), hidden.double(), weight.double(), cot, cot_z)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
    if options.get("reduction") == "none":
        out = _reaches(targets, sc, 3) & (targets != -100)
        assert (got[0][~out] == 0).all() and (got[1][~out] == 0).all()  # unreached and ignored rows
    for what, a, b, c, factor in zip(("loss", "z_loss", "d_hidden", "d_weight"), got, eager, want, (2, 2, 3, 3)):
        assert_within_eager_error(a, b, c, factor=factor, name=f"{name} {what}")


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy, on
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # rows of scales they never reach
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hidden_beyond_a_rows_prefix_is_never_read(backend, gen):
    """NaN in every hidden column past a row's own prefix width: the same losses and gradients as
    zeros there, and exact zero gradients in those columns."""
    options = dict(label_smoothing=0.1, lse_square_scale=0.01, softcap=4.0, reduction="none")
    hidden, weight, targets, sc = _inputs(torch.float32, gen=gen)
    beyond = torch.arange(D, device=DEVICE) >= torch.tensor(_prefixes(D, CHAINS), device=DEVICE)[sc][..., None]
    assert beyond.any()
    cot, cot_z = _cotangents(hidden, targets, options)
    clean = _run(_ours(backend, targets, sc, options), hidden.masked_fill(beyond, 0.0), weight, cot, cot_z)
    dirty = _run(_ours(backend, targets, sc, options), hidden.masked_fill(beyond, float("nan")), weight, cot, cot_z)
    for what, a, b in zip(("loss", "z_loss", "d_hidden", "d_weight"), dirty, clean):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)
    assert (dirty[2][beyond] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_scale_no_row_reaches(backend, reduction, gen):
    """No row reaches the last scale: ``mean`` is NaN there with zero gradients from it (as when
    every target is ignored), ``sum`` 0, ``none`` zeros; the other scales as the reference."""
    options = dict(label_smoothing=0.1, lse_square_scale=0.01, reduction=reduction)
    hidden, weight, targets, _ = _inputs(torch.float32, gen=gen)
    sc = torch.randint(0, 2, (B, S), generator=gen).to(DEVICE)
    cot, cot_z = _cotangents(hidden, targets, options)
    got = _run(_ours(backend, targets, sc, options), hidden, weight, cot, cot_z)
    want = _run(_theirs(targets, sc, options), hidden.double(), weight.double(), cot, cot_z)
    if reduction == "mean":
        assert torch.isnan(got[0][2]) and torch.isnan(got[1][2]) and torch.isnan(want[0][2])
    else:
        assert (got[0][2] == 0).all() and (got[1][2] == 0).all()
    for what, a, b in zip(("loss", "z_loss", "d_hidden", "d_weight"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, equal_nan=True, msg=what)
    # the gradient is the one of the first two scales alone (to rounding: the triton backend
    # scales its workspace by the largest upstream weight, which the third scale's changes)
    zero = torch.zeros_like(cot)
    zero[:2] = cot[:2]
    zero_z = torch.zeros_like(cot_z)
    zero_z[:2] = cot_z[:2]
    alone = _run(_ours(backend, targets, sc, options), hidden, weight, zero, zero_z)
    for what, a, b in zip(("d_hidden", "d_weight"), got[2:], alone[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=what)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefix_width_call_and_one_scale_batches(backend, gen):
    """A call at two scales (hidden of width P_2) with scales in [0, 1]; and a batch whose rows all
    share scale s gives, at scales 0..s, the losses of the same batch without seq_chains."""
    options = dict(label_smoothing=0.1, softcap=4.0, reduction="none")
    hidden, weight, targets, sc = _inputs(torch.float32, width=30, n_scales=2, gen=gen)
    cot, cot_z = _cotangents(hidden, targets, options)
    got = _run(_ours(backend, targets, sc, options), hidden, weight, cot, cot_z)
    want = _run(_theirs(targets, sc, options), hidden.double(), weight.double(), cot, cot_z)
    for what, a, b in zip(("loss", "z_loss", "d_hidden", "d_weight"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=what)
    assert (got[3][:, 30:] == 0).all()
    full = torch.randn(B, S, D, generator=gen).to(DEVICE)
    with ck.use_backend(backend):
        plain = ck.multi_chain_cross_entropy(full, weight, targets, CHAINS)
        for s in range(3):
            one = ck.multi_chain_cross_entropy(full, weight, targets, CHAINS, seq_chains=torch.full((B,), s, device=DEVICE))
            torch.testing.assert_close(one[: s + 1], plain[: s + 1], rtol=1e-6, atol=1e-6)
            assert torch.isnan(one[s + 1:]).all()  # no row reaches them: mean is 0 / 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unchecked_out_of_range_target_is_nan_where_its_row_counts(backend, gen):
    hidden, weight, targets, _ = _inputs(torch.float32, ignore=(), gen=gen)
    sc = torch.full((B, S), 2, device=DEVICE)
    sc[1, 4] = 0
    targets[1, 4] = V  # past the vocabulary, only in scale 0
    with ck.use_backend(backend):
        loss = ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS, seq_chains=sc, check_values=False)
        rows = ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS, seq_chains=sc, check_values=False,
                                            reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    assert torch.isnan(rows[0, 1, 4]) and (rows[1:, 1, 4] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_several_backward_chunks(monkeypatch, reduction, gen):
    """Three chunks of the sorted rows (16 a chunk): first, middle and last dW pass, per-row weights
    and the chunk's counts of rows reaching each chain."""
    from colm_kernels.ops.multi_chain_cross_entropy import triton_bwd

    monkeypatch.setattr(triton_bwd, "_WORKSPACE_BYTES", 3 * 16 * V * 4)  # fp32: 16 rows a chunk
    monkeypatch.setattr(triton_bwd, "_ACC_RATIO", 0)  # not grown for the dW accumulator
    options = dict(label_smoothing=0.1, softcap=3.0, reduction=reduction)
    hidden, weight, targets, sc = _inputs(torch.float32, gen=gen, lead=(37,), ignore=(2, 20))  # 16 + 16 + 5
    cot, cot_z = _cotangents(hidden, targets, options)
    got = _run(_ours("triton", targets, sc, options), hidden, weight, cot, cot_z)
    eager = _run(_ours("reference", targets, sc, options), hidden, weight, cot, cot_z)
    want = _run(_theirs(targets, sc, options), hidden.double(), weight.double(), cot, cot_z)
    for what, a, b, c, factor in zip(("loss", "z_loss", "d_hidden", "d_weight"), got, eager, want, (2, 2, 3, 3)):
        assert_within_eager_error(a, b, c, factor=factor, name=what)


def test_bad_seq_chains_name_the_argument():
    hidden, weight, targets, _ = _inputs(torch.float32)

    def call(sc, **kw):
        return ck.multi_chain_cross_entropy(hidden, weight, targets, CHAINS, seq_chains=sc, **kw)

    with pytest.raises(ValueError, match=r"seq_chains must have a prefix of hidden's leading shape \(3, 7\)"):
        call(torch.zeros(7, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="seq_chains must have a prefix"):
        call(torch.zeros(3, 7, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="seq_chains must be an integer tensor"):
        call(torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="seq_chains must be an integer tensor"):
        call(torch.zeros(3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="seq_chains must be a torch.Tensor"):
        call([0, 1, 2])
    with pytest.raises(ValueError, match="seq_chains is on meta"):
        call(torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"seq_chains values must be in \[0, 2\]"):
        call(torch.tensor([0, 3, 1], device=DEVICE))
    with pytest.raises(ValueError, match=r"seq_chains values must be in \[0, 2\]"):
        call(torch.tensor([0, -1, 1], device=DEVICE))
    with pytest.raises(ValueError, match=r"seq_chains values must be in \[0, 1\]"):  # a call at two scales
        ck.multi_chain_cross_entropy(hidden[..., :30], weight, targets, CHAINS,
                                     seq_chains=torch.tensor([0, 2, 1], device=DEVICE))
    call(torch.tensor([0, 3, 1], device=DEVICE), check_values=False)  # trusted by the caller: no host sync


def test_opcheck():
    from colm_kernels.ops.multi_chain_cross_entropy.triton_backend import (
        multi_chain_cross_entropy_triton_bwd, multi_chain_cross_entropy_triton_fwd)

    options = ("none", 0.1, 0.02, 3.0)  # reduction, label_smoothing, lse_square_scale, softcap
    hidden = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(33, 16, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 33, (9,), device=DEVICE)
    targets[1] = -100
    rows = torch.tensor([2, 0, 1, 2, 2, 0, 1, 0, 2], dtype=torch.int32, device=DEVICE)
    offsets = [0, 4, 12, 16]
    torch.library.opcheck(multi_chain_cross_entropy_triton_fwd, (hidden, weight, targets, offsets, -100, *options, rows))
    torch.library.opcheck(multi_chain_cross_entropy_triton_fwd,
                          (hidden, weight, targets, offsets, -100, "mean", 0.0, 0.0, 0.0, rows))
    out, lse = multi_chain_cross_entropy_triton_fwd(hidden.detach(), weight.detach(), targets, offsets, -100,
                                                    *options, rows)
    torch.library.opcheck(multi_chain_cross_entropy_triton_bwd,
                          (torch.randn_like(out), hidden.detach(), weight.detach(), targets, lse, offsets,
                           -100, *options, True, True, rows))


def test_compile_fullgraph_matches_eager(monkeypatch, gen):
    monkeypatch.undo()  # compile with a plain torch.empty
    torch._dynamo.reset()
    hidden, weight, targets, sc = _inputs(torch.float32, gen=gen)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with ck.use_backend("triton"):
        def fn(h, w):
            loss, z = ck.multi_chain_cross_entropy(h, w, targets, CHAINS, check_values=False, seq_chains=sc,
                                                   label_smoothing=0.1, lse_square_scale=0.01, softcap=4.0,
                                                   return_z_loss=True)
            return loss + 2 * z

        expected = fn(hidden, weight)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(hidden, weight)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        g_exp = torch.autograd.grad(expected.sum(), [hidden, weight])
        g_got = torch.autograd.grad(got.sum(), [hidden, weight])
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


_WORK = r"""
import json, torch
import colm_kernels as ck
from colm_kernels.bench.work import count_mma_flops
from colm_kernels.chains import Chains

c, dim, vocab = Chains((1, 1, 1, 1)), 256, 384
gen = torch.Generator().manual_seed(0)
scales = torch.cat([torch.full((n,), s) for s, n in enumerate((300, 200, 100, 60))])
scales = scales[torch.randperm(scales.numel(), generator=gen)]  # mixed, unsorted
h = torch.randn(scales.numel(), dim, generator=gen).half()
w = (torch.randn(vocab, dim, generator=gen) / 16).half()
t = torch.randint(0, vocab, (scales.numel(),), generator=gen)

def run(h, t, sc=None):
    h = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    with count_mma_flops() as fwd:
        # reduction='none': every run on the per-scale path (a one-scale batch with a reduced loss
        # would take the fused path, which moves the gradient GEMMs into the forward)
        loss = ck.multi_chain_cross_entropy(h, ww, t, c, seq_chains=sc, check_values=False, reduction="none")
    with count_mma_flops() as bwd:
        loss.sum().backward()
    return [fwd.total, bwd.total]

with ck.use_backend("triton"):
    mixed = run(h, t, scales)
    every_scale = run(h, t)  # the same rows, all at the full scale
    separate = [run(h[scales == s, : c.active_width(dim, s)], t[scales == s]) for s in range(4)]
out = dict(mixed=mixed, full=every_scale, separate=[sum(r[i] for r in separate) for i in range(2)])
print("CE_WORK " + json.dumps(out))
"""


@pytest.mark.static
def test_mixed_batch_runs_the_flops_of_separate_batches():
    """Executed tensor-core FLOPs (interpreter, H100 tiles) of a batch mixing four scales (300, 200,
    100 and 60 rows) in random order over the FLOPs of four one-scale batches, each run at its
    scale (``hidden[..., :P]``): forward and backward each <= 1.05. The same rows all at the full
    scale execute well over 1.3x (what a kernel that ignored the scales would run)."""
    work = run_reporting(["-c", _WORK], "CE_WORK", work_env())
    for i, name in enumerate(("forward", "backward")):
        mixed, separate, full = work["mixed"][i], work["separate"][i], work["full"][i]
        assert separate > 0
        assert mixed <= 1.05 * separate, f"{name}: mixed batch {mixed} FLOPs vs {separate} for separate batches"
        assert full > 1.3 * separate  # the count does see the skipped work


_SM90 = r"""
import json, sys, torch
from colm_kernels.bench import sm90
sm90.install()
sm90.full_sweep(False)
from colm_kernels.ops.multi_chain_cross_entropy import triton_kernels as K

gen = torch.Generator().manual_seed(0)
for aligned, options in ((True, ("mean", 0.0, 0.0, 0.0)), (False, ("none", 0.1, 1e-4, 30.0))):
    sm90.set_label(f"aligned={aligned} {options[0]}")
    offsets, n, v, d = ((0, 64, 128), 64, 256, 128) if aligned else ((0, 24, 40), 37, 101, 41)
    if aligned:
        hidden = torch.randn(n, offsets[-1], generator=gen).half()
    else:  # an odd row stride and base offset: no 16-byte alignment
        hidden = torch.randn(n * (offsets[-1] + 1) + 1, generator=gen).half()[1:].view(n, -1)[:, : offsets[-1]]
    weight = torch.randn(v, d, generator=gen).half()
    targets = torch.randint(0, v, (n,), generator=gen)
    rows = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int32)
    out, lse = K.mcce_fwd(hidden, weight, targets, offsets, -100, *options, row_chains=rows)
    K.mcce_bwd(torch.ones_like(out), hidden, weight, targets, offsets, -100, lse=lse, reduction=options[0],
               label_smoothing=options[1], lse_square_scale=options[2], softcap=options[3], row_chains=rows)
print("CE_SM90 " + json.dumps(dict(failures=sm90.FAILURES, compiled=sm90.kernel_table())))
"""


@pytest.mark.static
def test_sorted_row_kernels_compile_for_sm90_without_spills():
    """The per-row-scale (``ROWS``) variants compile for sm_90a (``colm_kernels.bench.sm90``, no
    GPU: the interpreter never lowers a kernel), to wgmma, without register spills: fp16, aligned
    and unaligned operands, plain and with every option (first and largest kept config)."""
    require_sm90_ptxas()
    report = run_reporting(["-c", _SM90], "CE_SM90", kernel_subprocess_env())
    assert not report["failures"], report["failures"]
    kernels = {r["kernel"] for r in report["compiled"]}
    assert {"_mcce_fwd_kernel", "_mcce_fwd_merge_kernel", "_mcce_bwd_dlogits_kernel", "_mcce_bwd_dh_kernel",
            "_mcce_bwd_dw_kernel"} <= kernels
    spilling = [f"{r['kernel']} {r['config']} ({r['label']}): {r['spill_bytes']} B"
                for r in report["compiled"] if r["spill_bytes"]]
    assert not spilling, "configs that spill registers on sm_90a:\n" + "\n".join(spilling)
    not_wgmma = [f"{r['kernel']} {r['config']}" for r in report["compiled"]
                 if "merge" not in r["kernel"] and r["mma"] != "wgmma"]
    assert not not_wgmma, not_wgmma
