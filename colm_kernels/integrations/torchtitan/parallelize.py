"""``parallelize_colm``: TorchTitan's ``parallelize_fn`` for CoLM.

In order: tensor parallelism when ``parallel_dims.tp > 1`` (``tensor_parallel``: every parameter
becomes a DTensor on the TP mesh; sequence parallel unless ``parallelism.enable_sequence_parallel``
is off), chain tuning (``requires_grad`` flags must exist before FSDP copies them), activation
checkpointing of every block (TorchTitan's own ``FullAC`` / ``SelectiveAC``), per-block
``torch.compile`` (TorchTitan's ``apply_compile``), then FSDP2: ``fully_shard`` on every block and on
the root (embedding, final norm and output head), mixed precision from ``training``, gradients
summed across ranks (TorchTitan divides by the global token count itself). With TP, FSDP2 shards
the TP shards over the data-parallel ranks (2-D: dp_shard x tp).
"""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.fsdp import disable_fsdp_gradient_division, get_fsdp_reshard_after_forward_policy

from .model import check_parallelism
from .tensor_parallel import apply_tensor_parallel
from .tensor_parallel.optimizer import attach_canonical_state
from .tuning import apply_chain_tuning


def parallelize_colm(model, *, parallel_dims, training, parallelism, compile_config, ac_config, dump_folder):
    check_parallelism(parallelism)
    if parallel_dims.tp_enabled:
        apply_tensor_parallel(model, parallel_dims.get_mesh("tp"),
                              sequence_parallel=parallelism.enable_sequence_parallel)
    apply_chain_tuning(model, model.titan_config.freeze_chains)
    if ac_config is not None:
        ac_config.build(dump_folder=dump_folder).apply(model)
    if compile_config.enable and "model" in compile_config.components:
        apply_compile(model, compile_config=compile_config, parallel_dims=parallel_dims)
    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    mesh = parallel_dims.get_mesh(names)
    fsdp = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(
        param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce], cast_forward_inputs=False))
    if training.enable_cpu_offload:
        fsdp["offload_policy"] = CPUOffloadPolicy()
    reshard = get_fsdp_reshard_after_forward_policy(parallelism.fsdp_reshard_after_forward, False)
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again first in backward: keep them gathered
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **fsdp)
    fully_shard(model, reshard_after_forward=reshard, **fsdp)
    # TorchTitan's losses are already sums over the global token count: FSDP must sum, not average
    disable_fsdp_gradient_division(model)
    if "gloo" in str(dist.get_backend(mesh.get_group(0) if mesh.ndim > 1 else mesh.get_group())):
        # gloo (CPU) has no PREMUL_SUM, FSDP's reduce with a divide factor: a plain sum is the same
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model


def post_optimizer_build(optimizers, model_parts, parallel_dims) -> None:
    """Chain tuning: keep the frozen columns of the shared tensors fixed through every step. Tensor
    parallelism: optimizer state dicts in the canonical column order (``tensor_parallel.optimizer``).
    ``optimizers``: TorchTitan's ``OptimizersContainer`` or one ``torch.optim.Optimizer``."""
    if parallel_dims.tp_enabled:
        for optimizer in getattr(optimizers, "optimizers", [optimizers]):
            attach_canonical_state(optimizer, model_parts)
    for part in model_parts:
        frozen = getattr(part, "frozen_columns", None)
        if frozen is not None:
            frozen.attach(optimizers)
