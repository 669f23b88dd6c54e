"""``colm_kernels.integrations.torchtitan`` on TorchTitan 0.3.0, on CPU.

TorchTitan's trainer cannot run on a CPU-only torch (README says exactly why), so this tests its
pieces against TorchTitan's real classes: the registry and trainer configs, the model built from its
config against ``models.CoLM``, the multi-chain loss, ``CoLMTrainer``'s batch hand-off, the
state-dict adapter (round trip, and into the HF model), and ``parallelize_colm`` on a 2-rank gloo
mesh (FSDP2 + activation checkpointing): optimizer steps equal to the unsharded model, with and
without chain tuning."""
import copy
import os

import pytest

pytest.importorskip("torchtitan")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import colm_kernels as ck  # noqa: E402
from colm_kernels import models  # noqa: E402
from colm_kernels.integrations.torchtitan import (  # noqa: E402
    CoLMStateDictAdapter, CoLMTitanModel, CoLMTrainer, MultiChainLoss, colm_configs, config_registry,
    model_registry)
from utils import F64, free_port, randomize, sgd_steps  # noqa: E402

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=37, chains=(1, 1, 2), ffn_hidden_dim=32,
            rope_theta=10000.0)
TINY_AIR = dict(TINY, n_kv_heads=1, kv_sharing=True)


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def titan(seed=0, **overrides):
    spec = model_registry("debugmodel", **{**TINY, **overrides})
    model = spec.model.build()
    model.init_states()
    return randomize(model.to(F64), seed)


def test_registry_flavours_and_trainer_configs():
    for flavor in colm_configs:
        spec = model_registry(flavor)
        assert spec.name == "colm" and spec.flavor == flavor and spec.state_dict_adapter is CoLMStateDictAdapter
        with torch.device("meta"):
            model = spec.model.build()
        assert isinstance(model, CoLMTitanModel) and isinstance(model, models.CoLM)
        with torch.device("meta"):  # shapes only
            reference = models.CoLM(spec.model.colm_config())
        assert {k: v.shape for k, v in model.state_dict().items()} == \
               {k: v.shape for k, v in reference.state_dict().items()}
    for name in ("colm_debugmodel", "colm_air_debugmodel", "colm_1b_c16x2", "colm_1b_c8x4",
                 "colm_air_1b_c16x2", "colm_air_1b_c8x4", "colm_air_1b_c16x2_tune"):
        cfg = getattr(config_registry, name)()
        assert isinstance(cfg, CoLMTrainer.Config) and isinstance(cfg.loss, MultiChainLoss.Config)
        assert cfg.parallelism.spmd_backend == "partial_dtensor"
    assert model_registry("1B_air_c8x4").model.chains == (8, 8, 8, 8)
    with pytest.raises(ValueError, match="flavor='2B'"):
        model_registry("2B")
    with pytest.raises(ValueError, match="n_kv_heads"):
        model_registry("debugmodel", n_kv_heads=3)


def test_torchtitan_command_line_selects_and_overrides_a_colm_config(tmp_path, monkeypatch):
    from torchtitan.config import ConfigManager

    monkeypatch.chdir(tmp_path)
    cfg = ConfigManager().parse_args([
        "--module", "colm_kernels.integrations.torchtitan", "--config", "colm_air_1b_c8x4",
        "--training.steps", "20", "--loss.weights", "1", "0.5", "0.5", "1"])
    assert isinstance(cfg, CoLMTrainer.Config) and cfg.model_spec.flavor == "1B_air_c8x4"
    assert cfg.training.steps == 20 and cfg.loss.weights == [1.0, 0.5, 0.5, 1.0]
    tune = ConfigManager().parse_args(["--module", "colm_kernels.integrations.torchtitan",
                                       "--config", "colm_air_1b_c16x2_tune"])
    assert tune.model_spec.model.freeze_chains == 1


def test_update_from_config_rejects_what_colm_does_not_support():
    from torchtitan.config import ParallelismConfig

    cfg = config_registry.colm_debugmodel()
    cfg.model_spec.model.update_from_config(config=cfg)
    cfg.parallelism = ParallelismConfig(spmd_backend="partial_dtensor", context_parallel_degree=2)
    with pytest.raises(ValueError, match="context_parallel_degree=2"):
        cfg.model_spec.model.update_from_config(config=cfg)
    cfg.parallelism = ParallelismConfig()  # TorchTitan's default spmd_backend
    with pytest.raises(ValueError, match="spmd_backend='spmd_types'"):
        cfg.model_spec.model.update_from_config(config=cfg)
    bad = model_registry("debugmodel", freeze_chains=2)
    with pytest.raises(ValueError, match="freeze_chains=2"):
        bad.model.update_from_config(config=config_registry.colm_debugmodel())


@pytest.mark.parametrize("overrides", [TINY, TINY_AIR], ids=["gqa", "air"])
def test_model_equals_colm_and_returns_per_scale_loss_sums(overrides):
    model = titan(**overrides)
    plain = models.CoLM(model.config).to(F64)
    plain.load_state_dict(model.state_dict(), strict=True)
    tokens = torch.randint(0, 37, (2, 12))
    torch.testing.assert_close(model(tokens), plain(tokens), rtol=0, atol=0)
    torch.testing.assert_close(model(tokens, positions=torch.arange(12).repeat(2, 1)), plain(tokens), rtol=0, atol=0)
    labels = torch.randint(0, 37, (2, 12))
    labels[1, 4:] = -100
    sums = model(tokens, labels=labels)
    want = torch.stack([F.cross_entropy(plain(tokens, chain=c).flatten(0, 1), labels.flatten(), reduction="sum")
                        for c in range(3)])
    torch.testing.assert_close(sums, want, rtol=1e-11, atol=1e-11)
    assert torch.equal(model(tokens, labels=torch.full_like(labels, -100)), torch.zeros(3, dtype=F64))

    loss, _ = MultiChainLoss(MultiChainLoss.Config(weights=[0.5, 1.0, 2.0]))(sums, labels, torch.tensor(20))
    torch.testing.assert_close(loss, (want * torch.tensor([0.5, 1.0, 2.0], dtype=F64)).sum() / 20)
    loss, _ = MultiChainLoss(MultiChainLoss.Config())(model(tokens), labels, torch.tensor(16))
    # logits (TorchTitan's validator): the full scale, through TorchTitan's own float32 cross-entropy
    torch.testing.assert_close(loss, (want[2] / 16).float())
    with pytest.raises(ValueError, match="one weight per scale"):
        MultiChainLoss(MultiChainLoss.Config(weights=[1.0, 1.0]))(sums, labels)


def test_trainer_hands_labels_to_the_model_and_drops_positions():
    from torchtitan.config import ParallelismConfig
    from torchtitan.distributed import ParallelDims

    trainer = CoLMTrainer.__new__(CoLMTrainer)  # the batch hand-off only: no device, no process group
    trainer.config = config_registry.colm_debugmodel()
    trainer.model_config = trainer.config.model_spec.model
    trainer.parallel_dims = ParallelDims.from_config(ParallelismConfig(spmd_backend="partial_dtensor"), 1)
    trainer.ntokens_seen = 0
    tokens, labels = torch.randint(0, 37, (2, 8)), torch.randint(0, 37, (2, 8))
    inputs, out_labels, extra = trainer.post_dataloading_process(
        {"input": tokens, "positions": torch.arange(8).repeat(2, 1)}, labels)
    assert inputs is tokens and out_labels is labels
    assert set(extra) == {"labels"} and extra["labels"] is labels


def test_trainer_gives_the_loss_weights_to_the_model(monkeypatch):
    """``CoLMTrainer`` sets ``MultiChainLoss``'s weights on the model, whose forward then returns
    their weighted sum (``multi_chain_cross_entropy(weights=)``: the head's gradients computed in
    the forward); the loss takes that scalar as it is. Same numbers as weighting the vector."""
    from torchtitan.trainer import Trainer

    model = titan()
    weights = [0.5, 1.0, 2.0]

    def fake_init(self, config):  # what CoLMTrainer reads of TorchTitan's construction
        self.loss_fn, self.model_parts = MultiChainLoss(MultiChainLoss.Config(weights=config)), [model]

    monkeypatch.setattr(Trainer, "__init__", fake_init)
    tokens, labels = torch.randint(0, 37, (2, 12)), torch.randint(0, 37, (2, 12))
    labels[0, 3:7] = -100
    sums = model(tokens, labels=labels)
    CoLMTrainer(weights)
    assert model.loss_weights == weights
    total = model(tokens, labels=labels)
    assert total.shape == ()
    want = (sums * torch.tensor(weights, dtype=sums.dtype)).sum()
    torch.testing.assert_close(total, want, rtol=1e-12, atol=1e-12)
    loss, _ = MultiChainLoss(MultiChainLoss.Config(weights=weights))(total, labels, torch.tensor(20))
    torch.testing.assert_close(loss, want / 20, rtol=1e-12, atol=1e-12)
    CoLMTrainer(None)  # the paper's sum
    assert model.loss_weights == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="one weight per scale"):
        CoLMTrainer([1.0, 1.0])


def test_state_dict_adapter_round_trip_and_hf_model():
    model = titan()
    adapter = CoLMStateDictAdapter(model.titan_config, None)
    hf_state = adapter.to_hf(model.state_dict())
    assert all(k.startswith("model.") for k in hf_state)
    back = adapter.from_hf(hf_state)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="lm_head.weight"):
        adapter.from_hf({**hf_state, "lm_head.weight": torch.zeros(1)})
    hf = pytest.importorskip("colm_kernels.integrations.hf")
    hf_model = hf.CoLMForCausalLM(hf.CoLMHFConfig.from_colm_config(model.config)).to(F64)
    hf_model.load_state_dict(hf_state, strict=True)
    tokens = torch.randint(0, 37, (2, 9))
    for chain in range(3):
        torch.testing.assert_close(hf_model(tokens, chain=chain).logits, model(tokens, chain=chain), rtol=0, atol=0)


# -- FSDP2 on two gloo ranks ---------------------------------------------------------------------
WORLD = 2


def _worker(rank: int, port: int, dump: str) -> None:
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.activation_checkpoint import FullAC

    from colm_kernels.integrations.torchtitan.parallelize import parallelize_colm, post_optimizer_build
    from colm_kernels.integrations.torchtitan.tuning import apply_chain_tuning

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    # TorchTitan builds its meshes on tools.utils.device_type, which is "cuda" without an accelerator.
    parallel_dims_module.device_type = "cpu"
    try:
        parallelism = ParallelismConfig(spmd_backend="partial_dtensor", data_parallel_shard_degree=WORLD)
        dims = ParallelDims.from_config(parallelism, WORLD)
        training = TrainingConfig(mixed_precision_param="float32")
        loss_fn = MultiChainLoss(MultiChainLoss.Config(weights=[1.0, 0.5, 0.25]))
        gen = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(3):
            tokens = torch.randint(0, 37, (4, 13), generator=gen)
            labels = tokens[:, 1:].clone()
            labels[3, 5:] = -100
            batches.append((tokens[:, :-1], labels))
        for freeze in (0, 1):
            with ck.use_backend("reference"):
                torch.manual_seed(0)
                plain = model_registry("debugmodel", **TINY, freeze_chains=freeze).model.build()
                plain.init_states()
                randomize(plain)
                start = copy.deepcopy(plain.state_dict())
                sharded = copy.deepcopy(plain)
                parallelize_colm(sharded, parallel_dims=dims, training=training, parallelism=parallelism,
                                 compile_config=CompileConfig(), ac_config=FullAC.Config(), dump_folder=dump)
                frozen_plain = apply_chain_tuning(plain, freeze)
                opt = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
                opt_plain = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], **opt)
                opt_sharded = torch.optim.SGD([p for p in sharded.parameters() if p.requires_grad], **opt)
                if frozen_plain is not None:
                    frozen_plain.attach(opt_plain)
                post_optimizer_build(opt_sharded, [sharded], dims)

                mine = slice(rank * 2, rank * 2 + 2)
                got = sgd_steps(sharded, opt_sharded, loss_fn, batches, mine, getattr(sharded, "frozen_columns", None))
                dist.all_reduce(got)
                want = sgd_steps(plain, opt_plain, loss_fn, batches, slice(None), frozen_plain)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            shards = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in sharded.named_parameters()}
            width = plain.chains.prefixes(plain.config.dim)[0]
            for name, p in plain.named_parameters():
                full = shards[name].full_tensor()
                torch.testing.assert_close(full, p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
                before = start[name]
                if freeze and (".mlps.0." in name):
                    assert torch.equal(p.detach(), before) and torch.equal(full, before), name
                elif freeze and (name.endswith("norm.weight")):
                    assert torch.equal(full[:width], before[:width]) and not torch.equal(full, before), name
                elif freeze and name in ("tok_embeddings.weight", "output.weight"):
                    assert torch.equal(full[:, :width], before[:, :width]) and not torch.equal(full, before), name
                else:
                    assert not torch.equal(full, before), name  # every other tensor trained
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_parallelize_colm_fsdp2_steps_equal_unsharded_model(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
