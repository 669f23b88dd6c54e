"""FSDP2 (``fully_shard``) over ``models.CoLM``: two CPU ranks on gloo give the same losses, elastic
logits, (all-gathered) gradients and generated tokens as the unsharded model, on the reference
backend in float64 and on the Triton kernels (interpreter, float32)."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import colm_kernels as ck
from colm_kernels.backends import backend_unavailable_reason
from colm_kernels.models import CoLM, CoLMConfig

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
CONFIGS = {
    "air": dict(n_kv_heads=1, kv_sharing=True),
    "gqa": dict(n_kv_heads=4, kv_sharing=False),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, backend: str, dtype: torch.dtype, config: dict, tol: float) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if os.environ.get("TRITON_INTERPRET") == "1":  # a spawned rank does not run conftest.py
        from colm_kernels._triton.interpreter import skip_repatching

        skip_repatching()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # same weights and tokens on every rank, like a checkpoint load
        cfg = CoLMConfig(dim=64, n_layers=2, n_heads=4, vocab_size=37, chains=(1, 1, 2), ffn_hidden_dim=64,
                         **config)
        plain = CoLM(cfg).to(dtype)
        for p in plain.parameters():  # not the init's zeros/ones: every block must matter
            torch.nn.init.normal_(p, std=0.3)
        sharded = copy.deepcopy(plain)
        for layer in sharded.layers:
            fully_shard(layer)
        fully_shard(sharded)
        # Methods other than forward need FSDP's unshard hooks too.
        register_fsdp_forward_method(sharded, "multi_chain_loss")
        register_fsdp_forward_method(sharded, "generate")
        tokens = torch.randint(0, cfg.vocab_size, (2, 11))

        with ck.use_backend(backend):
            for chain in range(len(cfg.chains)):
                torch.testing.assert_close(sharded(tokens, chain=chain), plain(tokens, chain=chain),
                                           rtol=tol, atol=tol)
            loss = sharded.multi_chain_loss(tokens, tokens)
            ref = plain.multi_chain_loss(tokens, tokens)
            torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
            loss.sum().backward()
            ref.sum().backward()

        shards = dict(sharded.named_parameters())
        for name, p in plain.named_parameters():
            grad = shards[name].grad.full_tensor()
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grad, p.grad, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")

        # After a forward the root stays unsharded (FSDP2 skips its reshard), so this comes last.
        switching = [2, 1, 0]  # downwards: valid with and without KV sharing
        with ck.use_backend(backend):
            assert torch.equal(sharded.generate(tokens[:, :5], 3, chain=switching),
                               plain.generate(tokens[:, :5], 3, chain=switching))
    finally:
        dist.destroy_process_group()


# Triton on CPU ranks is its interpreter (~1 min a config on 2 cores), so it runs one config:
# CoLM-Air calls the same ops and kernels as the per-chain KV config (sharded on the reference
# backend here); the kernels' per-chain KV head layouts are tested op by op in tests/ops.
@pytest.mark.parametrize("backend,config", [("reference", "air"), ("reference", "gqa"), ("triton", "air")])
def test_fully_shard_matches_unsharded(backend, config):
    if backend == "triton":
        if backend_unavailable_reason("triton") is not None or torch.cuda.is_available():
            pytest.skip("the CPU ranks run Triton only in its interpreter (no GPU, TRITON_INTERPRET=1)")
        dtype, tol = torch.float32, 1e-4
    else:
        dtype, tol = torch.float64, 1e-10
    mp.spawn(_worker, args=(_free_port(), backend, dtype, CONFIGS[config], tol), nprocs=WORLD)
