"""``chain_attention_decode`` (KV-cache flash-decoding) through the public API.

The reference backend against a naive float64 loop written here; the ``triton`` backend (the
interpreter on CPU, fp32 only there) and the ``cuda`` backend (GPU with the built extension) against
the float64 reference with the accuracy rule of ``numerics.py``. Cases: GQA and shared KV with both
mappings, every elastic scale, Sq = 1 and 3, per-sequence lengths that are not tile multiples
(1, 17, 40; a row with no visible key), a cache larger than every length with NaN past each length
and in the kv heads a scale does not read, a strided cache, mixed ``seq_chains`` (exact zeros),
more than one split (forced through the launchers' ``num_splits``), the split heuristic, errors,
opcheck, torch.compile and the model's decode path. Head dims: every multiple of 8 (8, 40, 80, 96,
112, 160, 192, 256 here, padded inside the kernels); 64 and 128 new tokens per sequence; a ``q``
with a strided last dim. The paged cache: ``test_chain_attention_decode_paged.py``.
"""


import itertools

import pytest
import torch

import colm_kernels as ck
from colm_kernels import BackendError, _cuda
from colm_kernels.ops.chain_attention_decode.api import decode_head_maps
from numerics import assert_within_eager_error

pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.usefixtures("nan_empty")]  # unwritten outputs are NaN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
# bf16 tl.dot is wrong in the interpreter and fp16 is slow there: low precision is GPU-only.
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])
HAS_CUDA_EXT = torch.cuda.is_available() and _cuda.unavailable_reason() is None
KERNEL_BACKENDS = ["triton"] + (["cuda"] if HAS_CUDA_EXT else [])
HEAD_DIM = 16 if DEVICE == "cpu" else 64
# flash-attn's head dims that are not powers of two, the smallest and the largest.
ODD_HEAD_DIMS = [8, 40, 80, 96, 112, 160, 192, 256]
S_MAX = 48
LENGTHS = [1, 17, 40]  # not multiples of the 16-key tiles; 1 < Sq = 3: rows with no key

# (chains, n_kv_heads of the model, kv_sharing, kv_mapping)
CASES = [
    ((1, 1), 2, False, "tile"),          # one head per chain, G = 1
    ((2, 2), 2, False, "tile"),          # GQA G = 2, the cache holds heads scale 0 never reads
    ((2, 4), 2, True, "tile"),           # shared KV, tile: G = 1 then 3
    ((2, 4), 2, True, "chain_group"),    # shared KV, chain_group
    ((4, 4), 1, True, "tile"),           # one shared head, G = 4 then 8 (24 rows at Sq = 3)
]


def _case_id(case):
    chains, n_kv, sharing, mapping = case
    return f"C{'.'.join(map(str, chains))}-kv{n_kv}-" + (f"shared-{mapping}" if sharing else "gqa")


def _dt(dtype):
    return str(dtype)[6:]


def _make(case, n_q, sq, *, B=3, lengths=LENGTHS, s_max=S_MAX, d=HEAD_DIM, strided=False, seed=0):
    """float64 CPU ``(q, k_cache, v_cache, cache_seqlens)`` for ``n_q`` active query heads. Cache
    entries at or past each length, and kv heads the scale does not read, are NaN."""
    chains, n_kv, sharing, mapping = case
    gen = torch.Generator().manual_seed(seed)
    *_, n_read = decode_head_maps(chains, n_q, n_kv, sharing, mapping)
    q = torch.randn(B, sq, n_q, d, generator=gen, dtype=F64)
    if strided:  # (B, H + 1, S, D) buffer seen as (B, S, H, D): head-major, a spare head
        kb = torch.randn(B, n_kv + 1, s_max, d, generator=gen, dtype=F64)
        vb = torch.randn(B, n_kv + 1, s_max, d, generator=gen, dtype=F64)
        k, v = kb.transpose(1, 2)[:, :, :n_kv], vb.transpose(1, 2)[:, :, :n_kv]
    else:
        k = torch.randn(B, s_max, n_kv, d, generator=gen, dtype=F64)
        v = torch.randn(B, s_max, n_kv, d, generator=gen, dtype=F64)
    for b, n in enumerate(lengths):
        for t in (k, v):
            t[b, n:] = float("nan")
            t[b, :, n_read:] = float("nan")
    return q, k, v, torch.tensor(lengths, dtype=torch.int32)


def _to(t, dtype, device=DEVICE):
    """A copy on ``device`` in ``dtype`` keeping ``t``'s strides (a strided cache stays strided)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device)
    out.copy_(t)
    return out


def _naive(q, k, v, lengths, kv_index, head_chain, seq_chains, scale):
    """float64 loops: sequence, query, head; explicit masked softmax over the valid prefix."""
    B, Sq, Hq, D = q.shape
    out = torch.zeros(B, Sq, Hq, D, dtype=F64)
    for b in range(B):
        n = int(lengths[b])
        for i in range(Sq):
            visible = n - Sq + i + 1
            for h in range(Hq):
                if seq_chains is not None and head_chain[h] > int(seq_chains[b]):
                    continue
                if visible <= 0:
                    continue
                keys = k[b, :visible, kv_index[h]].double()
                s = keys @ q[b, i, h].double() * scale
                p = torch.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, :visible, kv_index[h]].double()
    return out


def _seq_chains(scale, B=3):
    """Mixed last active chains: the full scale, chain 0, and something between."""
    return torch.tensor([scale, 0, min(1, scale)][:B], dtype=torch.int64)


def _scales(chains):
    return list(itertools.accumulate(chains))


def _run(backend, q, k, v, lengths, chains, dtype, **kw):
    device = "cpu" if dtype == F64 else DEVICE
    sc = kw.pop("seq_chains", None)
    with torch.no_grad(), ck.use_backend(backend):
        return ck.chain_attention_decode(
            _to(q, dtype, device), _to(k, dtype, device), _to(v, dtype, device), lengths.to(device), chains,
            seq_chains=None if sc is None else sc.to(device), **kw)


def _check_zeros(out, sc, head_chain):
    """Inactive heads are exact zeros."""
    for b in range(out.shape[0]):
        for h, c in enumerate(head_chain):
            if c > int(sc[b]):
                assert (out[b, :, h] == 0).all(), f"sequence {b} head {h} is not exactly zero"


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_matches_naive(case):
    chains, n_kv, sharing, mapping = case
    for n_q, sq in itertools.product(_scales(chains), (1, 3)):
        scale, kv_index, head_chain, _ = decode_head_maps(chains, n_q, n_kv, sharing, mapping)
        q, k, v, lengths = _make(case, n_q, sq)
        for sc in (None, _seq_chains(scale)):
            out = _run("reference", q, k, v, lengths, chains, F64, kv_sharing=sharing, kv_mapping=mapping,
                       seq_chains=sc, softmax_scale=0.3)
            expected = _naive(q, k, v, lengths, kv_index, head_chain, sc, 0.3)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backend_matches_reference_every_scale(case, backend, dtype):
    """Every scale, Sq = 1 and 3, lengths [1, 17, 40] with NaN past them, seq_chains off / mixed;
    the strided cache on the last scale."""
    chains, n_kv, sharing, mapping = case
    kw = dict(kv_sharing=sharing, kv_mapping=mapping)
    for n_q, sq in itertools.product(_scales(chains), (1, 3)):
        scale, _, head_chain, _ = decode_head_maps(chains, n_q, n_kv, sharing, mapping)
        q, k, v, lengths = _make(case, n_q, sq, strided=n_q == sum(chains))
        for sc in (None, _seq_chains(scale)):
            tag = f"{backend} Hq={n_q} Sq={sq} seq_chains={None if sc is None else sc.tolist()}"
            ref = _run("reference", q, k, v, lengths, chains, F64, seq_chains=sc, **kw)
            eager = _run("reference", q, k, v, lengths, chains, dtype, seq_chains=sc, **kw)
            ours = _run(backend, q, k, v, lengths, chains, dtype, seq_chains=sc, **kw)
            assert ours.dtype == dtype and ours.shape == q.shape
            assert_within_eager_error(ours, eager, ref, name=f"out {tag}")
            if sc is not None:
                _check_zeros(ours, sc, head_chain)


def _splits_case(launch, case, n_q, sq, dtype, num_splits, lengths=LENGTHS, strided=False):
    chains, n_kv, sharing, mapping = case
    scale, kv_index, head_chain, _ = decode_head_maps(chains, n_q, n_kv, sharing, mapping)
    q, k, v, lens = _make(case, n_q, sq, lengths=lengths, strided=strided)
    for sc in (None, _seq_chains(scale, len(lengths))):
        ref = _run("reference", q, k, v, lens, chains, F64, kv_sharing=sharing, kv_mapping=mapping, seq_chains=sc)
        eager = _run("reference", q, k, v, lens, chains, dtype, kv_sharing=sharing, kv_mapping=mapping, seq_chains=sc)
        ours = launch(_to(q, dtype), _to(k, dtype), _to(v, dtype), lens.to(DEVICE), kv_index, head_chain,
                      None if sc is None else sc.to(DEVICE), HEAD_DIM ** -0.5, num_splits=num_splits)
        assert_within_eager_error(ours, eager, ref, name=f"out splits={num_splits} seq_chains={sc}")
        if sc is not None:
            _check_zeros(ours, sc, head_chain)


@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=_case_id)
def test_triton_more_than_one_split(case, num_splits):
    """Forced splits of the 48-key cache (16-key tiles: 2 or 3 splits); lengths 1 / 17 / 40 leave
    splits past some sequences' ends (those programs do nothing; the reduce skips them)."""
    from colm_kernels.ops.chain_attention_decode import triton_kernels as kernels

    plan = kernels.decode_plan(3, 1, 3, S_MAX, HEAD_DIM, torch.device(DEVICE), num_splits)
    if DEVICE == "cpu":
        assert plan["num_splits"] == num_splits
    for dtype in DTYPES:
        for n_q, sq in ((case[0][0], 3), (sum(case[0]), 1), (sum(case[0]), 3)):
            _splits_case(kernels.chain_attention_decode_fwd, case, n_q, sq, dtype, num_splits,
                         strided=sq == 1)


@pytest.mark.skipif(not HAS_CUDA_EXT, reason=f"needs a CUDA device and the built extension "
                                             f"({_cuda.unavailable_reason()})")
@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=_case_id)
def test_cuda_more_than_one_split(case, num_splits):
    from colm_kernels.ops.chain_attention_decode import cuda_kernels as kernels

    for dtype in DTYPES:
        for n_q, sq in ((case[0][0], 3), (sum(case[0]), 1), (sum(case[0]), 3)):
            _splits_case(kernels.chain_attention_decode_fwd, case, n_q, sq, dtype, num_splits,
                         strided=sq == 1)


@pytest.mark.skipif(DEVICE != "cuda", reason="large head dims and long caches: GPU only")
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_head_dims_long_cache(backend, d):
    case = ((4, 4), 2, False, "tile")
    chains = case[0]
    for dtype in DTYPES:
        q, k, v, lengths = _make(case, 8, 2, B=4, lengths=[1000, 3, 517, 2048], s_max=2100, d=d)
        ref = _run("reference", q, k, v, lengths, chains, F64)
        eager = _run("reference", q, k, v, lengths, chains, dtype)
        ours = _run(backend, q, k, v, lengths, chains, dtype)
        assert_within_eager_error(ours, eager, ref, name=f"out {backend} D={d} {dtype}")


def _compare(backend, case, n_q, sq, dtype, *, sc=None, **make_kw):
    """``backend`` against the float64 reference, with the eager-error rule of ``numerics.py``."""
    chains, _, sharing, mapping = case
    q, k, v, lengths = _make(case, n_q, sq, **make_kw)
    kw = dict(kv_sharing=sharing, kv_mapping=mapping, seq_chains=sc)
    ref = _run("reference", q, k, v, lengths, chains, F64, **kw)
    eager = _run("reference", q, k, v, lengths, chains, dtype, **kw)
    ours = _run(backend, q, k, v, lengths, chains, dtype, **kw)
    tag = f"{backend} {_dt(dtype)} Hq={n_q} Sq={sq} D={q.shape[-1]} seq_chains={sc}"
    assert ours.dtype == dtype and ours.shape == q.shape, tag
    assert_within_eager_error(ours, eager, ref, name=tag)
    return ours


# fp16 runs in the interpreter too (small shapes); bf16 tl.dot needs a GPU.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt)
@pytest.mark.parametrize("d", ODD_HEAD_DIMS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_every_head_dim_multiple_of_8(backend, d, dtype):
    """Head dims padded to a power of two inside the kernels: the padded columns read as zeros
    and are never written (NaN-filled outputs would show them). GQA G = 2, Sq = 2, lengths not
    tile multiples, seq_chains mixed, one split and (forced) two."""
    from colm_kernels.ops.chain_attention_decode import cuda_kernels, triton_kernels

    case = CASES[1]
    scale, kv_index, head_chain, _ = decode_head_maps(case[0], 4, case[1], False, "tile")
    sc = _seq_chains(scale)
    _compare(backend, case, 4, 2, dtype, d=d, sc=sc, lengths=[1, 17, 33], s_max=33)
    launch = (triton_kernels if backend == "triton" else cuda_kernels).chain_attention_decode_fwd
    q, k, v, lengths = _make(case, 4, 2, d=d, lengths=[1, 17, 33], s_max=33)
    ref = _run("reference", q, k, v, lengths, case[0], F64, seq_chains=sc)
    eager = _run("reference", q, k, v, lengths, case[0], dtype, seq_chains=sc)
    ours = launch(_to(q, dtype), _to(k, dtype), _to(v, dtype), lengths.to(DEVICE), kv_index, head_chain,
                  sc.to(DEVICE), d ** -0.5, num_splits=2)
    assert_within_eager_error(ours, eager, ref, name=f"{backend} D={d} two splits")


@pytest.mark.skipif(not HAS_CUDA_EXT, reason=f"needs a CUDA device and the built extension "
                                             f"({_cuda.unavailable_reason()})")
@pytest.mark.parametrize("d", ODD_HEAD_DIMS + [16, 24, 64, 128, 136, 248])
def test_cuda_every_head_dim_long_cache(d):
    """Every padded kernel of the extension (16 .. 256) with real head dims at both ends of its
    range, each dtype, a cache long enough for the automatic split heuristic."""
    case = ((4, 4), 2, False, "tile")
    for dtype in DTYPES:
        _compare("cuda", case, 8, 3, dtype, d=d, B=3, lengths=[700, 2, 1025], s_max=1100)


@pytest.mark.parametrize("d", [4, 12, 264])
def test_head_dims_the_kernels_decline(d):
    """Head dims that are not multiples of 8 in [8, 256]: each kernel backend declines with the
    reason (BackendError when named, auto moves on), the reference computes them."""
    from colm_kernels.ops.chain_attention_decode.limits import head_dim_reasons

    for backend in ("triton", "cuda"):
        assert head_dim_reasons(backend, d) == [
            f"{backend} chain_attention_decode takes head dims that are multiples of 8 in [8, 256], got {d}"]
    case = CASES[1]
    q, k, v, lengths = _make(case, 4, 1, d=d)
    with torch.no_grad(), ck.use_backend("triton"), pytest.raises(BackendError, match="multiples of 8"):
        ck.chain_attention_decode(_to(q, torch.float32), _to(k, torch.float32), _to(v, torch.float32),
                                  lengths.to(DEVICE), case[0])
    ref = _run("reference", q, k, v, lengths, case[0], F64)
    with torch.no_grad():  # auto: the kernels decline, the reference runs
        out = ck.chain_attention_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lengths.to(DEVICE), case[0])
    torch.testing.assert_close(out.cpu(), ref)


@pytest.mark.parametrize("sq, case, n_q", [(64, CASES[3], 6), (128, CASES[1], 4)],
                         ids=["Sq64-shared-G3", "Sq128-gqa-G2"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_many_new_tokens(backend, sq, case, n_q):
    """64 and 128 new tokens per sequence (speculative decoding, chunked prefill): causal
    bottom-right per sequence, small caches, a sequence shorter than Sq (its first rows see no
    key), seq_chains mixed; 128 x G packed rows span many row blocks."""
    scale, *_ = decode_head_maps(case[0], n_q, case[1], case[2], case[3])
    for dtype in DTYPES:
        _compare(backend, case, n_q, sq, dtype, B=3, lengths=[sq + 9, sq, sq // 2], s_max=sq + 12,
                 sc=_seq_chains(scale))


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_q_with_strided_last_dim(backend):
    """A q whose last dim is strided (a view of every other element) is copied by the public
    function: every backend gives the reference's answer (chain_attention takes the same q)."""
    case = CASES[4]
    chains = case[0]
    q, k, v, lengths = _make(case, 8, 3)
    wide = torch.randn(*q.shape[:-1], 2 * HEAD_DIM, dtype=F64)
    wide[..., ::2] = q
    strided = _to(wide, torch.float32)[..., ::2]
    assert strided.stride(-1) == 2
    ref = _run("reference", q, k, v, lengths, chains, F64, kv_sharing=True)
    with torch.no_grad(), ck.use_backend(backend):
        out = ck.chain_attention_decode(strided, _to(k, torch.float32), _to(v, torch.float32),
                                        lengths.to(DEVICE), chains, kv_sharing=True)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_length_zero_and_rows_without_keys():
    """A sequence of length 0 and one shorter than Sq: rows that see no key are zeros."""
    case = CASES[2]
    chains = case[0]
    q, k, v, lengths = _make(case, 6, 3, B=2, lengths=[0, 2])
    lengths = lengths.long()  # int64 lengths are read as well as int32
    ref = _run("reference", q, k, v, lengths, chains, F64, kv_sharing=True)
    assert (ref[0] == 0).all() and (ref[1, 0] == 0).all() and ref[1, 1:].abs().sum() > 0
    for backend in KERNEL_BACKENDS:
        out = _run(backend, q, k, v, lengths, chains, torch.float32, kv_sharing=True)
        assert (out[0] == 0).all() and (out[1, 0] == 0).all()
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
def test_num_splits_heuristic():
    from colm_kernels.ops.chain_attention_decode.triton_kernels import MAX_SPLITS, num_splits_heuristic as h

    assert h(132, 64, 132) == 1  # the programs already fill the GPU
    assert h(8, 1, 132) == 1  # one key block
    for programs, blocks in ((1, 1000), (8, 64), (16, 32), (3, 5)):
        n = h(programs, blocks, 132, min_blocks_per_split=2)
        assert 2 <= n <= min(MAX_SPLITS, blocks // 2) and n & (n - 1) == 0, (programs, blocks, n)
    assert h(1, 10**6, 132) == MAX_SPLITS


def test_split_k_traffic_stays_within_its_budget():
    """Each split's own traffic (q re-read, fp32 partial rows and lse written and read back) is at
    most ``SPLIT_TRAFFIC`` of the K/V it reads, at every row count the decode takes."""
    from colm_kernels.ops.chain_attention_decode.triton_kernels import (SPLIT_TRAFFIC, num_splits_heuristic,
                                                                        split_min_blocks)

    for fp32, es in ((False, 2), (True, 4)):
        for rows in (1, 4, 16, 64, 512):
            for d, block_n in ((64, 64), (128, 64), (256, 16)):
                blocks = split_min_blocks(rows, d, block_n, fp32)
                overhead = rows * ((d + 1) * 8 + d * es)
                assert overhead <= SPLIT_TRAFFIC * blocks * 2 * block_n * d * es * 1.001, (rows, d, blocks)
                for n_blocks in (2, 32, 2048):
                    splits = num_splits_heuristic(4, n_blocks, 132, min_blocks_per_split=blocks)
                    assert splits == 1 or n_blocks // splits >= blocks
    # 16 new tokens x 4 heads (64 rows) at D=128 over 2048 keys: no split; over 131072 keys: splits
    assert split_min_blocks(64, 128, 64, False) == 26


def test_plan_depends_on_cache_capacity_not_lengths():
    """The split plan is a function of shapes (S_max) only: no recompilation or retuning per
    step, and split sizes are whole key blocks."""
    from colm_kernels.ops.chain_attention_decode.triton_kernels import decode_plan

    dev = torch.device(DEVICE)
    a = decode_plan(1, 1, 1, 4096, 64, dev)
    assert a == decode_plan(1, 1, 1, 4096, 64, dev)
    assert a["num_splits"] > 1 and a["split_size"] % a["BLOCK_N"] == 0
    assert a["num_splits"] * a["split_size"] >= 4096
    assert decode_plan(64, 8, 1, 4096, 64, dev)["num_splits"] == 1


def test_errors():
    case = CASES[1]
    chains = case[0]
    q, k, v, lengths = _make(case, 4, 1)
    q, k, v = (t.float() for t in (q, k, v))
    with pytest.raises(RuntimeError, match="inference-only"):
        ck.chain_attention_decode(q.requires_grad_(), k, v, lengths, chains)
    q = q.detach()
    with pytest.raises(ValueError, match=r"new tokens must be in \[1, 128\]"):
        ck.chain_attention_decode(q.expand(3, 129, 4, HEAD_DIM), k, v, lengths, chains)
    with pytest.raises(ValueError, match="cache_seqlens values"):
        ck.chain_attention_decode(q, k, v, torch.tensor([1, 2, S_MAX + 1]), chains)
    with pytest.raises(TypeError, match="cache_seqlens must be an integer tensor"):
        ck.chain_attention_decode(q, k, v, lengths.float(), chains)
    with pytest.raises(ValueError, match="one entry per sequence"):
        ck.chain_attention_decode(q, k, v, lengths[:2], chains)
    with pytest.raises(ValueError, match="model's n_kv_heads"):
        ck.chain_attention_decode(q, k[:, :, :1].expand(3, S_MAX, 3, HEAD_DIM), v[:, :, :1].expand(3, S_MAX, 3, HEAD_DIM),
                                  lengths, chains)
    with pytest.raises(ValueError, match="seq_chains values"):
        ck.chain_attention_decode(q, k, v, lengths, chains, seq_chains=torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError, match="contiguous last dim"):
        ck.chain_attention_decode(q, k.repeat_interleave(2, -1)[..., ::2], v, lengths, chains)
    with pytest.raises(ValueError, match="GQA group size"):
        ck.chain_attention_decode(q[:, :, :3], k, v, lengths, chains)
    if DEVICE == "cpu":
        with ck.use_backend("cuda"), pytest.raises(BackendError, match="cuda"):
            ck.chain_attention_decode(q, k, v, lengths, chains)


def test_opcheck_and_compile():
    from colm_kernels.ops.chain_attention_decode.api import chain_attention_decode_reference
    from colm_kernels.ops.chain_attention_decode.triton_backend import chain_attention_decode_triton

    case = CASES[4]
    q, k, v, lengths = _make(case, 4, 2, B=2, lengths=[5, 17], s_max=20)
    q, k, v = (t.float().to(DEVICE) for t in (q, k, v))
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)  # opcheck compares outputs with NaN-free inputs
    lengths = lengths.to(DEVICE)
    sc = torch.tensor([1, 0], device=DEVICE)
    args = (q, k, v, lengths, [0, 0, 0, 0], [0, 0, 0, 0], sc, 0.25)
    ops = [chain_attention_decode_reference, chain_attention_decode_triton]
    if HAS_CUDA_EXT:
        from colm_kernels.ops.chain_attention_decode.cuda_backend import chain_attention_decode_cuda
        ops.append(chain_attention_decode_cuda)
    for op in ops:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    for backend in ["reference"] + KERNEL_BACKENDS:
        with torch.no_grad(), ck.use_backend(backend):
            fn = torch.compile(lambda q, k, v, n: ck.chain_attention_decode(q, k, v, n, (4, 4), kv_sharing=True),
                               fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(fn(q, k, v, lengths),
                                       ck.chain_attention_decode(q, k, v, lengths, (4, 4), kv_sharing=True))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_sharing", [False, True], ids=["gqa", "shared"])
def test_model_decode_step_uses_the_op(kv_sharing, monkeypatch):
    """ChainAttention on a decode step reads the KV cache through chain_attention_decode (one call
    per layer), on the triton backend it gives the reference backend's hidden states, and
    generate keeps the no-cache greedy tokens."""
    from colm_kernels.models import CoLM, CoLMConfig
    from colm_kernels.nn import attention as attention_module

    cfg = CoLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=29, chains=(2, 2),
                     ffn_hidden_dim=64, kv_sharing=kv_sharing, kv_mapping="chain_group")
    model = CoLM(cfg).to(DEVICE)
    prompt = torch.randint(0, 29, (2, 6), device=DEVICE)
    calls = []
    real = attention_module.chain_attention_decode
    monkeypatch.setattr(attention_module, "chain_attention_decode",
                        lambda *a, **kw: calls.append(a[3].tolist()) or real(*a, **kw))
    hidden = {}
    for backend in ("reference", "triton"):
        cache = model.new_cache(2, 8)
        with torch.no_grad(), ck.use_backend(backend, ops=["chain_attention_decode"]):
            model.hidden(prompt[:, :-1], 0, cache)
            hidden[backend] = [model.hidden(prompt[:, -1:], 0, cache), model.hidden(prompt[:, :1], 0, cache)]
    assert calls == [[6, 6]] * 2 + [[7, 7]] * 2 + [[6, 6]] * 2 + [[7, 7]] * 2
    for got, ref in zip(hidden["triton"], hidden["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    model = model.double()  # float64 (reference backend): argmax ties cannot flip
    with torch.no_grad():
        out = model.generate(prompt, 3, chain=0)
        greedy = prompt
        for _ in range(3):
            logits = model(greedy, chain=0)[:, -1]
            greedy = torch.cat([greedy, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)
