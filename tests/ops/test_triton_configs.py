"""Every autotune config of every autotuned Triton kernel gives right answers (GPU only).

The rest of the GPU suite runs with ``COLM_KERNELS_AUTOTUNE=0`` (one config per kernel; see
conftest), and the benchmarks pick whichever config is fastest, so each config needs its own check:
``force_config(i)`` pins every autotuned kernel to the i-th config its pruner keeps, and the ops run
forward and backward against the float64 reference with the accuracy rule of ``numerics.py``, at
sizes that span several tiles of the largest blocks and end mid-tile. The GEMM kernels' kept configs
include their TMA twins (``USE_TMA``) for 16-bit inputs; ``test_chain_linear_tma.py`` runs those
alone in bf16 as well.
"""
import pytest
import torch
import triton

import colm_kernels as ck
from colm_kernels._triton.autotuning import autotuned_kernels, force_config
from colm_kernels._triton.gemm_configs import register_gemm_layout
from colm_kernels.ops.chain_attention import triton_kernels as _attention  # noqa: F401  (registers)
from colm_kernels.ops.chain_linear import triton_kernels as _linear
from colm_kernels.ops.chain_swiglu import triton_kernels as _swiglu  # noqa: F401
from colm_kernels.ops.multi_chain_cross_entropy import triton_kernels as _cross_entropy  # noqa: F401
from numerics import check_against_reference

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="autotune configs are GPU-only (the interpreter has one)")

N_CONFIGS = max(len(k.configs) for k in autotuned_kernels())


_check = check_against_reference  # triton vs float64, eager in the same dtype as the yardstick


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


@requires_gpu
@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_every_config_matches_reference(index):
    chains = (1, 2, 1)
    m, k_in, n_out, hidden = 301, 320, 192, 448  # per-chain widths 80/160/80, 48/96/48, 112/224/112
    vocab = 1000
    targets = torch.randint(0, vocab, (m,), device="cuda")
    targets[::7] = -100
    scales = torch.randint(0, len(chains), (m,), device="cuda")
    with force_config(index):
        for dtype in (torch.float16, torch.float32):  # fp32 keeps other (smaller) configs
            _check("chain_linear", lambda x, w, b: ck.chain_linear(x, w, b, chains),
                   [_randn(m, k_in), _randn(n_out, k_in, scale=k_in ** -0.5), _randn(n_out)], dtype)
            _check("chain_swiglu", lambda x, w1, w3: ck.chain_swiglu(x, w1, w3, chains),
                   [_randn(m, k_in), _randn(hidden, k_in, scale=k_in ** -0.5),
                    _randn(hidden, k_in, scale=k_in ** -0.5)], dtype)
            for sc in (None, scales):  # every scale, and per-row scales (the sorted-row kernels)
                _check(f"multi_chain_cross_entropy seq_chains={sc is not None}",
                       lambda h, w, sc=sc: ck.multi_chain_cross_entropy(h, w, targets, chains, seq_chains=sc,
                                                                        check_values=False),
                       [_randn(m, k_in), _randn(vocab, k_in, scale=k_in ** -0.5 * 2)], dtype)
        for head_dim, dtype, kv_sharing, sq, sk in ((64, torch.float16, False, 200, 200),
                                                    (128, torch.bfloat16, True, 131, 260)):
            # chains (2, 2): 4 query heads over 2 kv heads, per-chain GQA or shared (tile); both
            # backwards (dQ by atomics, or the deterministic dQ kernel)
            for deterministic in (False, True):
                _check(f"chain_attention hd{head_dim} deterministic={deterministic}",
                       lambda q, k, v: ck.chain_attention(q, k, v, (2, 2), kv_sharing=kv_sharing,
                                                          deterministic=deterministic),
                       [_randn(2, sq, 4, head_dim), _randn(2, sk, 2, head_dim), _randn(2, sk, 2, head_dim)], dtype)
        not_run = [k.base_fn.__name__ for k in autotuned_kernels() if not k.cache]
        assert not not_run, f"autotuned kernels these ops never launched: {not_run}"


def test_autotune_switch_and_forced_config_narrow_the_pruned_list(monkeypatch):
    """The narrowing itself (any machine): the real GEMM pruner of the chain-linear forward, fed
    three distinct configs, keeps all three when tuning, the first with COLM_KERNELS_AUTOTUNE=0,
    and the i-th (clamped to the last) under force_config(i)."""
    prune = _linear._chain_linear_fwd_kernel.early_config_prune
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2)
               for bm in (32, 64, 128)]
    key = register_gemm_layout(201, ("BLOCK_N", "BLOCK_K"), [(512, 512)])
    args = {"X": torch.empty(1, 1, dtype=torch.float16), "LAYOUT_KEY": key, "ALIGN": 8}

    def block_m(kept):
        return [c.kwargs["BLOCK_M"] for c in kept]

    monkeypatch.setenv("COLM_KERNELS_AUTOTUNE", "1")
    assert block_m(prune(configs, args)) == [32, 64, 128]
    monkeypatch.setenv("COLM_KERNELS_AUTOTUNE", "0")
    assert block_m(prune(configs, args)) == [32]
    with force_config(1):
        assert block_m(prune(configs, args)) == [64]
    with force_config(7):
        assert block_m(prune(configs, args)) == [128]
    assert block_m(prune(configs, args)) == [32]  # force_config restored
