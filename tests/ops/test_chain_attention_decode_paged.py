"""``chain_attention_decode`` over a paged KV cache (flash-attn's ``block_table`` convention).

The same K/V laid out in shuffled pages (spare blocks and pages past each length full of NaN,
table entries past a sequence's pages pointing outside the cache) must give exactly the output of
the contiguous layout: bitwise for the float64 reference and for each kernel backend (same key
tiles, same order), and within the eager-error rule of the float64 reference. Odd page sizes,
sequences of different lengths (0 included), GQA and shared KV, mixed ``seq_chains``, forced
splits, blocks shared between sequences, unchecked table entries (clamped into the cache), the
model's paged ``KVCache`` (a layer step by step, a gradient step, and ``generate``), opcheck.
"""
import pytest
import torch

import colm_kernels as ck
from colm_kernels import _cuda
from colm_kernels.nn import KVCache
from colm_kernels.ops.chain_attention_decode.api import decode_head_maps
from numerics import assert_within_eager_error

pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.usefixtures("nan_empty")]  # unwritten outputs are NaN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])
HAS_CUDA_EXT = torch.cuda.is_available() and _cuda.unavailable_reason() is None
KERNEL_BACKENDS = ["triton"] + (["cuda"] if HAS_CUDA_EXT else [])
D = 16 if DEVICE == "cpu" else 64
NAN = float("nan")

# (chains, n_kv_heads of the model, kv_sharing, kv_mapping, query heads read)
CASES = [
    ((2, 2), 2, False, "tile", 4),          # GQA G = 2
    ((2, 4), 2, True, "chain_group", 6),    # shared KV, G = 3
]


def _case_id(case):
    chains, n_kv, sharing, mapping, n_q = case
    return f"C{'.'.join(map(str, chains))}-kv{n_kv}-Hq{n_q}-" + (f"shared-{mapping}" if sharing else "gqa")


def _cdiv(a, b):
    return -(-a // b)


def _contiguous(case, sq, lengths, capacity, *, d=D, seed=0):
    """float64 CPU ``(q, k, v, cache_seqlens)``: a contiguous cache of ``capacity`` positions, NaN at
    and past each length and in the kv heads the scale does not read."""
    chains, n_kv, sharing, mapping, n_q = case
    *_, n_read = decode_head_maps(chains, n_q, n_kv, sharing, mapping)
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = torch.randn(B, sq, n_q, d, generator=gen, dtype=F64)
    k = torch.randn(B, capacity, n_kv, d, generator=gen, dtype=F64)
    v = torch.randn(B, capacity, n_kv, d, generator=gen, dtype=F64)
    for b, n in enumerate(lengths):
        for t in (k, v):
            t[b, n:] = NAN
            t[b, :, n_read:] = NAN
    return q, k, v, torch.tensor(lengths, dtype=torch.int32)


def _paged(k, v, lengths, page, *, spare=3, seed=1):
    """The same K/V as pools ``(num_blocks, page, Hkv, D)``: every page of every sequence in a
    random block, ``spare`` NaN blocks (the last one among them), and the int32 table; entries
    past a sequence's pages name no block (``num_blocks + 5``, never read)."""
    B, cap, H, d = k.shape
    n_pages = cap // page
    n_blocks = B * n_pages + spare
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(B * n_pages, generator=gen).view(B, n_pages)
    pools = []
    for t in (k, v):
        pool = torch.full((n_blocks, page, H, d), NAN, dtype=t.dtype)
        pool[table.flatten()] = t.reshape(B * n_pages, page, H, d)
        pools.append(pool)
    for b, n in enumerate(lengths):
        table[b, _cdiv(n, page):] = n_blocks + 5
    return pools[0], pools[1], table.to(torch.int32)


def _run(backend, q, k, v, lengths, case, dtype, *, block_table=None, seq_chains=None, check_values=True):
    chains, _, sharing, mapping, _ = case
    device = "cpu" if dtype == F64 else DEVICE
    with torch.no_grad(), ck.use_backend(backend):
        return ck.chain_attention_decode(
            q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), lengths.to(device), chains,
            kv_sharing=sharing, kv_mapping=mapping, softmax_scale=0.3,
            seq_chains=None if seq_chains is None else seq_chains.to(device),
            block_table=None if block_table is None else block_table.to(device), check_values=check_values)


def _seq_chains(case, B):
    chains, n_kv, sharing, mapping, n_q = case
    scale = decode_head_maps(chains, n_q, n_kv, sharing, mapping)[0]
    return torch.tensor([scale, 0, scale, min(1, scale)][:B])


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", [1, 3, 5, 16])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_paged_equals_contiguous(case, page):
    """Shuffled pages give the contiguous cache's output, bit for bit, on every backend; the
    kernels are within the eager error of the float64 reference. Lengths 0, 1, 17, 40 (none a
    page multiple for pages 3, 5, 16), Sq = 3 (rows without keys), seq_chains off and mixed."""
    lengths = [17, 0, 40, 1]
    capacity = _cdiv(45, page) * page
    q, k, v, lens = _contiguous(case, 3, lengths, capacity)
    kp, vp, table = _paged(k, v, lengths, page)
    for sc in (None, _seq_chains(case, len(lengths))):
        ref = _run("reference", q, k, v, lens, case, F64, seq_chains=sc)
        ref_paged = _run("reference", q, kp, vp, lens, case, F64, block_table=table, seq_chains=sc)
        assert torch.equal(ref_paged, ref), "reference: paged != contiguous"
        for backend in KERNEL_BACKENDS:
            for dtype in DTYPES:
                tag = f"{backend} {dtype} page={page} seq_chains={sc}"
                eager = _run("reference", q, k, v, lens, case, dtype, seq_chains=sc)
                flat = _run(backend, q, k, v, lens, case, dtype, seq_chains=sc)
                paged = _run(backend, q, kp, vp, lens, case, dtype, block_table=table, seq_chains=sc)
                assert torch.equal(paged, flat), f"{tag}: paged != contiguous"
                assert_within_eager_error(paged, eager, ref, name=tag)


def _launchers():
    from colm_kernels.ops.chain_attention_decode import triton_kernels
    out = [("triton", triton_kernels.chain_attention_decode_fwd)]
    if HAS_CUDA_EXT:
        from colm_kernels.ops.chain_attention_decode import cuda_kernels
        out.append(("cuda", cuda_kernels.chain_attention_decode_fwd))
    return out


@pytest.mark.parametrize("num_splits", [2, 3])
def test_paged_splits_and_shared_blocks(num_splits):
    """Forced splits (some past a sequence's end) over pages of 7 keys, and two sequences whose
    first three pages are the same blocks (a shared prompt prefix): equal to the contiguous
    layout through the launchers, bitwise."""
    case, page, lengths = CASES[0], 7, [30, 26, 9]
    capacity = 35
    q, k, v, lens = _contiguous(case, 2, lengths, capacity)
    k[1, :21], v[1, :21] = k[0, :21], v[0, :21]  # the shared prefix: 3 pages
    kp, vp, table = _paged(k, v, lengths, page)
    table[1, :3] = table[0, :3]
    chains, n_kv, sharing, mapping, n_q = case
    _, kv_index, head_chain, _ = decode_head_maps(chains, n_q, n_kv, sharing, mapping)
    ref = _run("reference", q, kp, vp, lens, case, F64, block_table=table)
    torch.testing.assert_close(ref, _run("reference", q, k, v, lens, case, F64), rtol=0, atol=0)
    for name, launch in _launchers():
        for dtype in DTYPES:
            args = [t.to(DEVICE, dtype) for t in (q, k, v)] + [lens.to(DEVICE), kv_index, head_chain, None, 0.3]
            flat = launch(*args, num_splits=num_splits)
            args[1:3] = [kp.to(DEVICE, dtype), vp.to(DEVICE, dtype)]
            paged = launch(*args, table.to(DEVICE), num_splits=num_splits)
            assert torch.equal(paged, flat), f"{name} {dtype}: paged != contiguous"
            eager = _run("reference", q, k, v, lens, case, dtype)
            assert_within_eager_error(paged, eager, ref, name=f"{name} {dtype} splits={num_splits}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_paged_many_new_tokens_odd_head_dim(backend):
    """64 new tokens over pages of 5 keys, head dim 40 (padded to 64 inside the kernels)."""
    case, page, lengths = CASES[0], 5, [67, 64, 30]
    q, k, v, lens = _contiguous(case, 64, lengths, 70, d=40)
    kp, vp, table = _paged(k, v, lengths, page)
    ref = _run("reference", q, k, v, lens, case, F64)
    for dtype in DTYPES:
        flat = _run(backend, q, k, v, lens, case, dtype)
        paged = _run(backend, q, kp, vp, lens, case, dtype, block_table=table)
        assert torch.equal(paged, flat)
        assert_within_eager_error(paged, _run("reference", q, k, v, lens, case, dtype), ref,
                                  name=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_unchecked_table_entries_are_clamped_into_the_cache(backend):
    """With check_values=False an entry past num_blocks (or negative) is the caller's bug: the
    kernels never read outside the cache, they read the clamped block (the last, or block 0)."""
    case, page, lengths = CASES[0], 4, [10, 7]
    q, k, v, lens = _contiguous(case, 1, lengths, 12)
    kp, vp, table = _paged(k, v, lengths, page, spare=0)
    n_blocks = kp.shape[0]
    bad, clamped = table.clone(), table.clone()
    bad[0, 1], clamped[0, 1] = 10**6, n_blocks - 1
    bad[1, 0], clamped[1, 0] = -3, 0
    for dtype in DTYPES:
        got = _run(backend, q, kp, vp, lens, case, dtype, block_table=bad, check_values=False)
        want = _run(backend, q, kp, vp, lens, case, dtype, block_table=clamped)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="block_table entries in use"):
        _run(backend, q, kp, vp, lens, case, torch.float32, block_table=bad)


def test_opcheck_and_compile_with_block_table():
    from colm_kernels.ops.chain_attention_decode.api import chain_attention_decode_reference
    from colm_kernels.ops.chain_attention_decode.triton_backend import chain_attention_decode_triton

    case = CASES[0]
    q, k, v, lens = _contiguous(case, 2, [5, 9], 12)
    kp, vp, table = _paged(k, v, [5, 9], 4, spare=0)
    kp, vp = (torch.nan_to_num(t).float().to(DEVICE) for t in (kp, vp))  # opcheck compares NaN-free outputs
    table = table.clamp(max=kp.shape[0] - 1).to(DEVICE)
    args = (q.float().to(DEVICE), kp, vp, lens.to(DEVICE), [0, 0, 1, 1], [0, 0, 1, 1], None, 0.25, table)
    ops = [chain_attention_decode_reference, chain_attention_decode_triton]
    if HAS_CUDA_EXT:
        from colm_kernels.ops.chain_attention_decode.cuda_backend import chain_attention_decode_cuda
        ops.append(chain_attention_decode_cuda)
    for op in ops:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    q32, lens = args[0], args[3]
    for backend in ["reference"] + KERNEL_BACKENDS:
        with torch.no_grad(), ck.use_backend(backend):
            fn = torch.compile(lambda q, k, v, n, t: ck.chain_attention_decode(q, k, v, n, (2, 2), block_table=t),
                               fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(fn(q32, kp, vp, lens, table),
                                       ck.chain_attention_decode(q32, kp, vp, lens, (2, 2), block_table=table))


# ---------------------------------------------------------------------------------------------
# The model's KV cache
# ---------------------------------------------------------------------------------------------
def _attention(kv_sharing, dtype=F64):
    from colm_kernels.nn import ChainAttention
    torch.manual_seed(0)
    return ChainAttention(64, 4, 2, (2, 2), kv_sharing=kv_sharing, kv_mapping="chain_group").to(DEVICE, dtype)


def _cache(attn, batch, max_len, page_size, dtype=F64):
    return KVCache(1, batch, max_len, attn.n_kv_heads, attn.head_dim, kv_sharing=attn.kv_sharing,
                   dtype=dtype, device=DEVICE, page_size=page_size)


def test_kv_cache_paged_layout():
    """Pages are handed out position-major (page j of sequence b is block j * B + b), the pools
    are (num_blocks, page_size, n_kv, hd), and a write lands where the table says."""
    cache = KVCache(2, 3, 10, 2, 8, kv_sharing=True, dtype=F64, page_size=4)
    assert cache.k[0].shape == (9, 4, 2, 8) and cache.block_table.dtype == torch.int32
    assert cache.block_table.tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    keys = torch.randn(3, 6, 2, 8, dtype=F64)
    got_k, _ = cache.update(0, keys, keys, 0)
    assert torch.equal(got_k, keys)
    assert torch.equal(cache.k[0][4, 1], keys[1, 5])  # sequence 1, position 5: page 1 (block 4), slot 1
    with pytest.raises(ValueError, match="page_size"):
        KVCache(1, 1, 4, 1, 8, kv_sharing=True, page_size=0)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("kv_sharing", [False, True], ids=["gqa", "shared"])
def test_chain_attention_paged_cache_equals_contiguous(kv_sharing, backend):
    """ChainAttention step by step (prefill 5, decode 1, a chunk of 3 at a smaller scale, decode 1)
    with a paged cache (pages of 3) gives the contiguous cache's outputs; then a step with
    gradients (the chain_attention path, which gathers the pages) does too."""
    dtype = F64 if backend == "reference" else torch.float32
    attn = _attention(kv_sharing, dtype)
    x = torch.randn(2, 12, 64, dtype=dtype, device=DEVICE)
    outs = {}
    for page in (None, 3):
        cache = _cache(attn, 2, 12, page, dtype)
        got = []
        with torch.no_grad(), ck.use_backend(backend, ops=["chain_attention_decode"]):
            for a, b, chain in ((0, 5, 1), (5, 6, 1), (6, 9, 0), (9, 10, 0)):
                got.append(attn(x[:, a:b], chain, cache))
                cache.advance(b - a, chain)
        with torch.enable_grad():
            got.append(attn(x[:, 10:12], 0, cache))
        outs[page] = got
    for step, (paged, flat) in enumerate(zip(outs[3], outs[None])):
        if backend == "reference":
            assert torch.equal(paged, flat), f"step {step}"
        else:
            torch.testing.assert_close(paged, flat, rtol=1e-5, atol=1e-6, msg=f"step {step}")


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["gqa", "shared"])
def test_model_generates_the_same_tokens_with_a_paged_cache(kv_sharing, monkeypatch):
    """CoLM.generate with a paged KV cache (pages of 3; every decode step reads the cache through
    block_table) gives the tokens of the contiguous cache: float64 on the reference backend and
    float32 on the triton backend."""
    from colm_kernels.models import CoLM, CoLMConfig
    from colm_kernels.models import ragged as ragged_module

    cfg = CoLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=29, chains=(2, 2),
                     ffn_hidden_dim=64, kv_sharing=kv_sharing, kv_mapping="chain_group")
    tables = []
    real = ragged_module.chain_attention_decode  # where generation's decode steps call the op
    monkeypatch.setattr(ragged_module, "chain_attention_decode",
                        lambda *a, **kw: tables.append(kw.get("block_table")) or real(*a, **kw))
    for dtype, backend in ((F64, "reference"), (torch.float32, "triton")):
        model = CoLM(cfg).to(DEVICE, dtype)
        prompt = torch.randint(0, 29, (2, 6), device=DEVICE)
        chain = [0, 0, 0, 0, 0] if not kv_sharing else [1, 0, 1, 1, 0]
        with ck.use_backend(backend, ops=["chain_attention_decode"]):
            tables.clear()
            flat = model.generate(prompt, 5, chain=chain, prefill_chain=0)
            assert tables and all(t is None for t in tables)
            tables.clear()
            paged = model.generate(prompt, 5, chain=chain, prefill_chain=0, page_size=3)
            assert tables and all(t is not None for t in tables)
        assert torch.equal(paged, flat), (dtype, paged.tolist(), flat.tolist())
