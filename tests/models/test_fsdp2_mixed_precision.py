"""FSDP2 with a bf16 ``MixedPrecisionPolicy`` (bf16 compute, fp32 gradient reduction and master
weights) over ``models.CoLM`` on two CPU gloo ranks, reference backend: the per-scale losses and
the gradients equal those of the unsharded model cast to bf16 (the same arithmetic), come back
fp32 on fp32 shards, and are close to the fp32 run; generation under the policy gives the bf16
model's tokens."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import colm_kernels as ck
from colm_kernels.models import CoLM, CoLMConfig

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
BF16 = torch.bfloat16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = {"air": dict(n_kv_heads=1, kv_sharing=True), "gqa": dict(n_kv_heads=4, kv_sharing=False)}


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        for config in CONFIGS.values():  # one spawn for both: starting the ranks is most of the time
            _check(config)
    finally:
        dist.destroy_process_group()


def _check(config: dict) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    torch.manual_seed(0)  # same weights and tokens on every rank
    cfg = CoLMConfig(dim=64, n_layers=2, n_heads=4, vocab_size=37, chains=(1, 1, 2), ffn_hidden_dim=64,
                     **config)
    plain = CoLM(cfg)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.3)
    low = copy.deepcopy(plain).to(BF16)  # what the policy computes with
    sharded = copy.deepcopy(plain)
    policy = MixedPrecisionPolicy(param_dtype=BF16, reduce_dtype=torch.float32)
    for layer in sharded.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(sharded, mp_policy=policy)
    register_fsdp_forward_method(sharded, "multi_chain_loss")
    register_fsdp_forward_method(sharded, "generate")
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))

    with ck.use_backend("reference"):
        assert sharded(tokens, chain=0).dtype == BF16
        loss = sharded.multi_chain_loss(tokens, tokens)
        want = low.multi_chain_loss(tokens, tokens)
        ref32 = plain.multi_chain_loss(tokens, tokens)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, want, rtol=0, atol=0)
        torch.testing.assert_close(loss, ref32, rtol=0.02, atol=0.02)
        for out in (loss, want, ref32):
            out.sum().backward()

    shards = dict(sharded.named_parameters())
    lows = dict(low.named_parameters())
    for name, p in plain.named_parameters():
        shard = shards[name]
        assert shard.dtype == torch.float32 and shard.grad.dtype == torch.float32, name
        grad = shard.grad.full_tensor()
        # Both ranks reduce the same bf16 gradient in fp32: its mean is that gradient, exactly.
        torch.testing.assert_close(grad, lows[name].grad.float(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        err = (grad - p.grad).abs().max() / p.grad.abs().max()
        assert err < 0.1, f"{name}: bf16 gradient {err:.3f} (relative) from the fp32 one"

    with ck.use_backend("reference"):
        assert torch.equal(sharded.generate(tokens[:, :5], 3, chain=[2, 1, 0]),
                           low.generate(tokens[:, :5], 3, chain=[2, 1, 0]))


def test_fully_shard_bf16_mixed_precision():
    """CoLM-Air and the per-chain KV config."""
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD)
