"""Trainer configs for ``torchtitan.train --module colm_kernels.integrations.torchtitan --config NAME``.

Every config trains with ``CoLMTrainer`` and ``MultiChainLoss`` (the sum of every scale's loss;
``loss.weights`` per scale), FSDP2 (``parallelism.data_parallel_shard_degree``, default: every rank),
full activation checkpointing, ``spmd_backend='partial_dtensor'``; tensor parallelism with
``--parallelism.tensor_parallel_degree``. Checkpoints go through ``CoLMCheckpointManager``
(``--checkpoint.last_save_in_hf`` writes a folder ``AutoModelForCausalLM`` loads).
``hf_assets_path`` must hold a tokenizer whose vocabulary matches the flavour (TorchTitan's
``scripts/download_hf_assets.py``).
"""
from __future__ import annotations

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

from . import model_registry
from .checkpoint import CoLMCheckpointManager
from .loss import MultiChainLoss
from .trainer import CoLMTrainer


def _config(flavor: str, *, hf_assets_path: str, dataset: str, lr: float, batch: int, seq_len: int,
            steps: int, warmup: int, **model) -> CoLMTrainer.Config:
    return CoLMTrainer.Config(
        model_spec=model_registry(flavor, **model),
        loss=MultiChainLoss.Config(),
        hf_assets_path=hf_assets_path,
        optimizer=default_adamw(lr=lr),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=warmup, decay_ratio=0.8, decay_type="linear",
                                                  min_lr_factor=0.1),
        training=TrainingConfig(local_batch_size=batch, seq_len=seq_len, steps=steps),
        dataloader=HuggingFaceTextDataLoader.Config(dataset=dataset),
        metrics=MetricsProcessor.Config(log_freq=1 if steps <= 100 else 10),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CoLMCheckpointManager.Config(interval=max(steps // 2, 1)),
        activation_checkpoint=FullAC.Config(),
    )


def colm_debugmodel() -> CoLMTrainer.Config:
    """Tiny CoLM, chains (8, 8), on TorchTitan's test tokenizer and c4_test (from a torchtitan checkout)."""
    return _config("debugmodel", hf_assets_path="./tests/assets/tokenizer", dataset="c4_test", lr=8e-4,
                   batch=8, seq_len=2048, steps=10, warmup=2)


def colm_air_debugmodel() -> CoLMTrainer.Config:
    return _config("debugmodel_air", hf_assets_path="./tests/assets/tokenizer", dataset="c4_test", lr=8e-4,
                   batch=8, seq_len=2048, steps=10, warmup=2)


def _paper_1b(flavor: str) -> CoLMTrainer.Config:
    return _config(flavor, hf_assets_path="./assets/hf/Llama-3.2-1B", dataset="c4", lr=3e-4, batch=4,
                   seq_len=8192, steps=10000, warmup=1000)


def colm_1b_c16x2() -> CoLMTrainer.Config:
    return _paper_1b("1B_c16x2")


def colm_1b_c8x4() -> CoLMTrainer.Config:
    return _paper_1b("1B_c8x4")


def colm_air_1b_c16x2() -> CoLMTrainer.Config:
    return _paper_1b("1B_air_c16x2")


def colm_air_1b_c8x4() -> CoLMTrainer.Config:
    return _paper_1b("1B_air_c8x4")


def colm_air_1b_c16x2_tune() -> CoLMTrainer.Config:
    """Chain tuning: a LLaMA-3.2-1B grown to CoLM-Air (16, 16) (``from_llama`` + ``save_pretrained``,
    loaded with ``--checkpoint.initial_load_path DIR --checkpoint.initial_load_in_hf``) trains only its
    new chain; the LLaMA's chain keeps its weights exactly."""
    return _config("1B_air_c16x2", hf_assets_path="./assets/hf/Llama-3.2-1B", dataset="c4", lr=3e-4, batch=4,
                   seq_len=8192, steps=10000, warmup=1000, freeze_chains=1)
