"""Tensor parallelism for CoLM on TorchTitan (``integrations.torchtitan.tensor_parallel``), on CPU gloo ranks.

``parallelize_colm`` with ``parallel_dims.tp = 2`` (TorchTitan's ``ParallelDims`` and meshes, FSDP2 and full
activation checkpointing as TorchTitan applies them) against the unsharded model on the same weights and batch:
the per-scale loss sums and every parameter's gradient, for CoLM (per-chain GQA) and CoLM-Air (shared kv heads
split, replicated, one per rank), at full scale and at an elastic ``chain=k``, with and without sequence
parallelism; the vocabulary-sharded logits through TorchTitan's loss-parallel cross-entropy; ``torch.compile`` of
the blocks; SGD steps; no collective carries a sharded weight; DCP checkpoints load across TP degrees. A 2x2
FSDP2 x TP run trains equal to the unsharded model and TorchTitan's HF-format save writes a folder that
``AutoModelForCausalLM`` loads. Reference backend in float32 (TorchTitan's mixed-precision policy has no float64).
"""
import copy
import os

import pytest

pytest.importorskip("torchtitan")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import colm_kernels as ck  # noqa: E402
from colm_kernels.integrations.torchtitan import MultiChainLoss, model_registry  # noqa: E402
from colm_kernels.integrations.torchtitan.tensor_parallel import RowChainLinear, TensorParallelLayout  # noqa: E402
from colm_kernels.integrations.torchtitan.tuning import apply_chain_tuning  # noqa: E402
from colm_kernels.models import CoLM, CoLMConfig  # noqa: E402
from utils import free_port, offsets, randomize, sgd_steps  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

# Unequal chains, 16 query heads (head dim 4), 8 kv heads (GQA groups of 2); vocabulary 37: uneven shards 19 / 18.
GQA = dict(dim=64, n_layers=2, n_heads=16, n_kv_heads=8, vocab_size=37, chains=(4, 4, 8), ffn_hidden_dim=64,
           rope_theta=10000.0)
AIR_SPLIT = dict(GQA, n_kv_heads=2, kv_sharing=True, kv_mapping="chain_group")  # kv heads split across ranks
AIR_TILE = dict(GQA, n_kv_heads=2, kv_sharing=True, kv_mapping="tile")  # replicated: every rank reads both
AIR_ONE = dict(GQA, n_kv_heads=1, kv_sharing=True, kv_mapping="chain_group")  # replicated, fewer than ranks
WEIGHTS = [1.0, 0.5, 0.25]


def _config(**fields) -> CoLMConfig:
    return CoLMConfig(**{k: tuple(v) if k == "chains" else v for k, v in fields.items()})


# -- the layout, without ranks ------------------------------------------------------------------
def test_tensor_parallel_layout_row_columns_and_kv_plans():
    layout = TensorParallelLayout.build(_config(**GQA), 2)
    assert layout.local_heads.sizes == (2, 2, 4) and not layout.kv_split
    # row-parallel wo / w2: rank r holds the r-th half of every input chain of the prefix (re-derived here)
    o = offsets(64, (4, 4, 8))
    for chain in range(3):
        for rank in range(2):
            want = [c for j in range(chain + 1) for c in range(o[j] + rank * (o[j + 1] - o[j]) // 2,
                                                                o[j] + (rank + 1) * (o[j + 1] - o[j]) // 2)]
            assert layout.row_columns(64, chain, rank) == want
        order = layout.rank_major_columns(64, chain)
        assert sorted(order) == list(range(o[chain + 1]))
        assert order[: len(order) // 2] == layout.row_columns(64, chain, 0)
    split, tile, one = (TensorParallelLayout.build(_config(**c), 2) for c in (AIR_SPLIT, AIR_TILE, AIR_ONE))
    assert split.kv_split and [split.shared_kv_heads(r) for r in (0, 1)] == [(0, 1), (1, 2)]
    assert not tile.kv_split and [tile.shared_kv_heads(r) for r in (0, 1)] == [(0, 2), (0, 2)]
    assert not one.kv_split and [one.shared_kv_heads(r) for r in (0, 1)] == [(0, 1), (0, 1)]
    four = TensorParallelLayout.build(_config(**dict(AIR_SPLIT, chains=(8, 8, 16), n_heads=32, dim=128)), 4)
    assert not four.kv_split and [four.shared_kv_heads(r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]


@pytest.mark.parametrize("fields, world, match", [
    (dict(GQA, chains=(2, 2, 4), n_heads=8), 4, r"tensor_parallel_degree=4 must divide every chain's width of n_heads"),
    (dict(GQA, ffn_hidden_dim=4), 2, r"tensor_parallel_degree=2 .* ffn_hidden_dim=4"),
    (dict(GQA, n_kv_heads=4), 2, r"tensor_parallel_degree=2 .* n_kv_heads"),
    (dict(AIR_SPLIT, chains=(6, 6, 6), n_heads=18, dim=72, ffn_hidden_dim=72), 3,
     r"n_kv_heads=2 with kv_sharing and kv_mapping='chain_group': one must divide the other"),
    (dict(AIR_TILE, n_kv_heads=4), 2, r"kv_mapping='tile'.* must be a multiple of 4"),
    (dict(GQA, vocab_size=3), 4, r"tensor_parallel_degree=4 is larger than vocab_size=3"),
    (GQA, 0, r"tensor_parallel_degree must be a positive int"),
])
def test_tensor_parallel_layout_rejects_configs_that_do_not_split(fields, world, match):
    with pytest.raises(ValueError, match=match):
        TensorParallelLayout.build(_config(**fields), world)


def test_tensor_parallel_command_line_and_hf_checkpoint_config(monkeypatch, tmp_path):
    from torchtitan.config import ConfigManager

    from colm_kernels.integrations.torchtitan import CoLMCheckpointManager

    monkeypatch.chdir(tmp_path)
    cfg = ConfigManager().parse_args([
        "--module", "colm_kernels.integrations.torchtitan", "--config", "colm_air_1b_c8x4",
        "--parallelism.tensor_parallel_degree", "2", "--checkpoint.enable", "--checkpoint.last_save_in_hf"])
    assert cfg.parallelism.tensor_parallel_degree == 2 and cfg.parallelism.enable_sequence_parallel
    assert isinstance(cfg.checkpoint, CoLMCheckpointManager.Config) and cfg.checkpoint.last_save_in_hf
    cfg.model_spec.model.update_from_config(config=cfg)


def test_tensor_parallel_degree_is_checked_by_the_trainer_config():
    from torchtitan.config import ParallelismConfig

    from colm_kernels.integrations.torchtitan import config_registry

    cfg = config_registry.colm_air_debugmodel()
    cfg.parallelism = ParallelismConfig(spmd_backend="partial_dtensor", tensor_parallel_degree=2)
    cfg.model_spec.model.update_from_config(config=cfg)  # chains (8, 8), 4 shared kv heads: splits
    cfg.parallelism = ParallelismConfig(spmd_backend="partial_dtensor", tensor_parallel_degree=16)
    with pytest.raises(ValueError, match="tensor_parallel_degree=16"):
        cfg.model_spec.model.update_from_config(config=cfg)


# -- ranks --------------------------------------------------------------------------------------
def _entry(rank: int, world: int, port: int, fn, args) -> None:
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torchtitan.distributed import utils as dist_utils

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # TorchTitan builds its meshes on tools.utils.device_type, which is "cuda" without an accelerator.
    parallel_dims_module.device_type = "cpu"
    dist_utils.set_spmd_backend("partial_dtensor")  # as TorchTitan's Trainer does
    try:
        with ck.use_backend("reference"):
            fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _run(world: int, fn, *args) -> None:
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="fork")


def _parallelize(model, *, tp=2, dp=1, sp=True, compile=False, dump="/tmp"):
    """``parallelize_colm`` as TorchTitan's trainer calls it (FSDP2 and full activation checkpointing);
    returns TorchTitan's ``ParallelDims``."""
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.activation_checkpoint import FullAC

    from colm_kernels.integrations.torchtitan.parallelize import parallelize_colm

    parallelism = ParallelismConfig(spmd_backend="partial_dtensor", tensor_parallel_degree=tp,
                                    data_parallel_shard_degree=dp, enable_sequence_parallel=sp)
    dims = ParallelDims.from_config(parallelism, tp * dp)
    parallelize_colm(model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"),
                     parallelism=parallelism, compile_config=CompileConfig(enable=compile, backend="aot_eager"),
                     ac_config=FullAC.Config(), dump_folder=dump)
    return dims


def _build(fields, *, seed=0, **parallel):
    """The unsharded model (seeded random weights) and a copy through ``parallelize_colm``."""
    plain = model_registry("debugmodel", **fields).model.build()
    plain.init_states()
    randomize(plain, seed)
    sharded = copy.deepcopy(plain)
    return plain, sharded, _parallelize(sharded, **parallel)


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _full_grads(sharded) -> dict:
    """Every gradient of ``sharded`` as the unsharded model's full tensor (row-parallel columns put back
    in the paper's order)."""
    row = {f"{_clean(n)}.mlps.{i}.weight": (m, i) for n, m in sharded.named_modules()
           if isinstance(m, RowChainLinear) for i in range(m.chains.n)}
    out = {}
    for name, p in sharded.named_parameters():
        name = _clean(name)
        if p.grad is not None:
            g = row[name][0].canonical(row[name][1], p.grad) if name in row else p.grad
            out[name] = g.full_tensor()
    return out


def _full_state(sharded) -> dict:
    return {_clean(k): v.full_tensor() for k, v in sharded.state_dict().items()}


def _close(got, want, what=""):
    scale = max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale, msg=lambda m: f"{what}: {m}")


def _assert_grads_equal(plain, sharded):
    got = _full_grads(sharded)
    used = {n for n, p in plain.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert used and used <= set(got), sorted(used - set(got))
    for name, p in plain.named_parameters():
        if name in used:
            _close(got[name], p.grad, name)
        elif name in got:
            assert got[name].abs().max() == 0, name
    plain.zero_grad(set_to_none=True)
    sharded.zero_grad(set_to_none=True)


def _batch(seed=1, batch=2, seq=9):  # odd: uneven sequence-parallel shards
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 37, (batch, seq + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[-1, seq // 2:] = -100
    return tokens[:, :-1], labels


def _check_losses_and_grads(plain, sharded, chain):
    """``forward(tokens, labels)`` at scale ``chain``: per-scale sums and every gradient of a weighted sum."""
    tokens, labels = _batch()
    got = sharded(tokens, labels=labels, chain=chain)
    want = plain(tokens, labels=labels, chain=chain)
    assert type(got) is torch.Tensor and got.shape == want.shape  # plain, the same on every TP rank
    _close(got, want, f"loss sums at chain={chain}")
    weights = torch.tensor(WEIGHTS[: len(want)])
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    _assert_grads_equal(plain, sharded)


def _check_loss_parallel_logits(plain, sharded, chain):
    """Logits at ``chain`` stay vocabulary-sharded; TorchTitan's cross-entropy takes them as they are."""
    from torch.distributed.tensor import Shard
    from torchtitan.components.loss import cross_entropy_loss

    tokens, labels = _batch(seed=2)
    logits, ref = sharded(tokens, chain=chain), plain(tokens, chain=chain)
    assert logits.placements == (Shard(2),) and logits.to_local().shape[-1] < 37
    _close(logits.full_tensor(), ref, "logits")
    loss = cross_entropy_loss(logits, labels)
    want = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction="sum")
    _close(loss, want, "loss-parallel cross-entropy")
    loss.backward()
    want.backward()
    _assert_grads_equal(plain, sharded)


class _Collectives:
    """The shape of every tensor handed to a functional collective (what DTensor's redistributions call;
    a dispatch mode would also catch them but breaks the reference ops' ``torch.func.vjp``)."""

    PREFIXES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "broadcast", "permute")

    def __enter__(self):
        import torch.distributed._functional_collectives as funcol

        self.module, self.saved, self.seen = funcol, {}, []
        for name in dir(funcol):
            fn = getattr(funcol, name)
            if name.startswith(self.PREFIXES) and callable(fn):
                self.saved[name] = fn
                setattr(funcol, name, self._recording(name, fn))
        return self

    def _recording(self, name, fn):
        def call(*args, **kwargs):
            self.seen += [(name, tuple(t.shape)) for t in pytree.tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)]
            return fn(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.module, name, fn)


def _check_no_weight_collectives(sharded):
    """A training step's collectives move activations (and replicated gains' gradients), never a sharded
    weight: no tensor in a collective has the full or the local shape of a sharded 2-D parameter."""
    sharded_shapes = set()
    for p in sharded.parameters():
        if p.dim() == 2 and any(pl.is_shard() for pl in p.placements):
            sharded_shapes |= {tuple(p.shape), tuple(p.to_local().shape)}
    tokens, labels = _batch()
    with _Collectives() as record:
        sharded(tokens, labels=labels).sum().backward()
    sharded.zero_grad(set_to_none=True)
    kinds = {kind for kind, _ in record.seen}
    for family in ("all_gather", "reduce_scatter", "all_reduce"):  # sequence parallel, the loss, the gains
        assert any(kind.startswith(family) for kind in kinds), kinds
    moved = [(kind, shape) for kind, shape in record.seen if shape in sharded_shapes]
    assert not moved, moved


def _optimizer(model, dims=None):
    """SGD over the trainable parameters, named as TorchTitan names them (its flat optimizer state dicts
    are keyed by those names); with ``dims``, set up by TorchTitan's ``post_optimizer_build`` hook."""
    from torchtitan.components.checkpointer.utils import canonical_fqn

    from colm_kernels.integrations.torchtitan.parallelize import post_optimizer_build

    named = [(canonical_fqn(n), p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(named, lr=0.05, momentum=0.9, weight_decay=0.1)
    frozen = getattr(model, "frozen_columns", None)
    if dims is not None:
        post_optimizer_build(optimizer, [model], dims)
    elif frozen is not None:
        frozen.attach(optimizer)
    return optimizer


def _train(model, optimizer, loss_fn, batches, rows):
    """``sgd_steps`` with the model's own chain-tuning columns (when chain tuning is on)."""
    return sgd_steps(model, optimizer, loss_fn, batches, rows, getattr(model, "frozen_columns", None))


def _check_optimizer_state(sharded_optimizer, plain_optimizer):
    """The TP optimizer's state dict holds every state tensor in the unsharded layout (the row-parallel
    parameters' momentum in the paper's column order)."""
    got, want = sharded_optimizer.state_dict()["state"], plain_optimizer.state_dict()["state"]
    assert got.keys() == want.keys() and want
    for index, state in want.items():
        _close(got[index]["momentum_buffer"].full_tensor(), state["momentum_buffer"], f"momentum {index}")


def _check_meta_init(fields, out):
    """TorchTitan's order: build on the meta device, parallelize, ``to_empty``, ``init_weights`` on the
    DTensors (``init_on_shards``): replicated parameters equal on every TP rank, shards drawn independently."""
    from torch.distributed.tensor import Replicate

    with torch.device("meta"):
        model = model_registry("debugmodel", **fields).model.build()
    dims = _parallelize(model, dump=out)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    tp = dims.get_mesh("tp")
    for name, p in model.named_parameters():
        head = p.to_local().detach().flatten()[:8].contiguous()
        every = [torch.empty_like(head) for _ in range(tp.size())]
        dist.all_gather(every, head, group=tp.get_group())
        same = all(torch.equal(e, every[0]) for e in every)
        # replicated over the TP ranks: one value; sharded: pieces drawn independently
        assert same == (p.placements[-1] == Replicate()), name
    for name, value in _full_state(model).items():
        if name.endswith("norm.weight"):
            assert torch.equal(value, torch.ones_like(value)), name
        else:
            assert 0.01 < value.std().item() < 0.03, (name, value.std().item())
    tokens, labels = _batch()
    assert torch.isfinite(model(tokens, labels=labels)).all()


def _tp_worker(rank: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.optimizer.utils import (get_flat_optim_state_dict, init_optim_state,
                                                        load_flat_optim_state_dict)

    for name, fields, sp in (("gqa", GQA, True), ("air_split", AIR_SPLIT, True), ("air_tile", AIR_TILE, False),
                             ("air_one", AIR_ONE, True)):
        plain, sharded, _ = _build(fields, sp=sp, dump=out)
        for chain in (None, 1):
            _check_losses_and_grads(plain, sharded, chain)
        if name == "gqa":
            _check_loss_parallel_logits(plain, sharded, chain=1)
            _check_no_weight_collectives(sharded)
    _check_meta_init(AIR_TILE, out)
    # torch.compile of every block (TorchTitan's apply_compile: fullgraph), eager aot backend on CPU
    plain, compiled, _ = _build(dict(AIR_SPLIT, n_layers=1), compile=True, dump=out)
    _check_losses_and_grads(plain, compiled, None)

    # training with chain tuning (chain 1 frozen), then checkpoints across TP degrees
    plain, sharded, dims = _build(dict(GQA, freeze_chains=1), dump=out)
    apply_chain_tuning(plain, 1)  # parallelize_colm did it for the sharded copy
    start = copy.deepcopy(plain.state_dict())
    batches = [_batch(seed=s, batch=4) for s in (3, 4)]
    loss_fn = MultiChainLoss(MultiChainLoss.Config(weights=WEIGHTS))
    sharded_optimizer, plain_optimizer = _optimizer(sharded, dims), _optimizer(plain)
    got = _train(sharded, sharded_optimizer, loss_fn, batches, slice(None))
    want = _train(plain, plain_optimizer, loss_fn, batches, slice(None))
    _close(got, want, "training losses")
    _check_optimizer_state(sharded_optimizer, plain_optimizer)
    full = _full_state(sharded)
    width = offsets(64, GQA["chains"])[1]
    for name, p in plain.state_dict().items():
        _close(full[name], p, name)
        if ".mlps.0." in name:  # chain 1's blocks and columns: bit-identical
            assert torch.equal(full[name], start[name]), name
        elif name.endswith("norm.weight"):
            assert torch.equal(full[name][:width], start[name][:width]), name
        elif name in ("tok_embeddings.weight", "output.weight"):
            assert torch.equal(full[name][:, :width], start[name][:, :width]), name
        if ".mlps.0." not in name:
            assert not torch.equal(full[name], start[name]), name  # everything else trained
    dcp.save(sharded.state_dict(), checkpoint_id=os.path.join(out, "dcp_tp2"))  # read at tp=1 by the test
    if rank == 0:
        torch.save(plain.state_dict(), os.path.join(out, "plain.pt"))
    dcp.save(plain.state_dict(), checkpoint_id=os.path.join(out, "dcp_tp1"))
    _, fresh, fresh_dims = _build(dict(GQA, freeze_chains=1), seed=7, dump=out)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=os.path.join(out, "dcp_tp1"))
    fresh.load_state_dict(state)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in _full_state(fresh).items())
    # the unsharded optimizer's state through DCP (TorchTitan's flat optimizer state dicts) at tp=2:
    # one more step lands where the unsharded model's does
    dcp.save(get_flat_optim_state_dict(plain_optimizer), checkpoint_id=os.path.join(out, "optimizer_tp1"))
    fresh_optimizer = _optimizer(fresh, fresh_dims)
    init_optim_state(fresh_optimizer)
    flat = get_flat_optim_state_dict(fresh_optimizer)
    dcp.load(flat, checkpoint_id=os.path.join(out, "optimizer_tp1"))
    load_flat_optim_state_dict(fresh_optimizer, flat)
    _check_optimizer_state(fresh_optimizer, plain_optimizer)
    more = [_batch(seed=8, batch=4)]
    _close(_train(fresh, fresh_optimizer, loss_fn, more, slice(None)),
           _train(plain, plain_optimizer, loss_fn, more, slice(None)), "resumed step")
    for name, value in _full_state(fresh).items():
        _close(value, plain.state_dict()[name], f"resumed {name}")


def _plain_model(fields, state_path: str) -> CoLM:
    model = model_registry("debugmodel", **fields).model.build()
    model.load_state_dict(torch.load(state_path), strict=True)
    return model


def test_tensor_parallel_two_ranks_equal_unsharded_and_checkpoint_across_degrees(tmp_path):
    import torch.distributed.checkpoint as dcp

    _run(2, _tp_worker, str(tmp_path))
    plain = _plain_model(GQA, tmp_path / "plain.pt")
    fresh = model_registry("debugmodel", **GQA).model.build()  # tp=1
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp_tp2"))
    fresh.load_state_dict(state)
    for name, p in plain.state_dict().items():
        _close(fresh.state_dict()[name], p, name)


def _fsdp_tp_worker(rank: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp

    from colm_kernels.integrations.torchtitan import CoLMStateDictAdapter
    from colm_kernels.integrations.torchtitan.checkpoint import CoLMCheckpointManager

    plain, sharded, dims = _build(AIR_SPLIT, dp=2, dump=out)
    dp_mesh = dims.get_mesh("fsdp")
    assert dp_mesh.size() == 2 and dims.get_mesh("tp").size() == 2
    batches = [_batch(seed=s, batch=4) for s in (3, 4)]
    loss_fn = MultiChainLoss(MultiChainLoss.Config(weights=WEIGHTS))
    mine = slice(dp_mesh.get_local_rank() * 2, dp_mesh.get_local_rank() * 2 + 2)
    sharded_optimizer, plain_optimizer = _optimizer(sharded, dims), _optimizer(plain)
    got = _train(sharded, sharded_optimizer, loss_fn, batches, mine)
    dist.all_reduce(got, group=dp_mesh.get_group())  # the TP ranks of one dp rank hold the same loss
    want = _train(plain, plain_optimizer, loss_fn, batches, slice(None))
    _close(got, want, "training losses")
    _check_optimizer_state(sharded_optimizer, plain_optimizer)
    full = _full_state(sharded)
    for name, p in plain.state_dict().items():
        _close(full[name], p, name)
    dcp.save(sharded.state_dict(), checkpoint_id=os.path.join(out, "dcp_2x2"))

    def manager(model):
        config = CoLMCheckpointManager.Config(enable=True, folder="checkpoint", last_save_in_hf=True, keep_latest_k=0)
        return config.build(dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None, states={},
                            sd_adapter=CoLMStateDictAdapter(model.titan_config, None), base_folder=out)

    saver = manager(sharded)
    assert saver.save(curr_step=2, last_step=True)  # what --checkpoint.last_save_in_hf does at the end
    saver.close()
    _, fresh, _ = _build(AIR_SPLIT, dp=2, seed=7, dump=out)
    loader = manager(fresh)
    loader.dcp_load(loader.states["model"].state_dict(), os.path.join(out, "checkpoint", "step-2"),
                    from_hf=True, from_quantized=False)
    loader.close()
    for name, value in _full_state(fresh).items():
        assert torch.equal(value, full[name]), name
    if rank == 0:
        torch.save(plain.state_dict(), os.path.join(out, "plain.pt"))


def test_tensor_parallel_fsdp2_2x2_trains_equal_and_saves_in_hf_format(tmp_path):
    import torch.distributed.checkpoint as dcp

    _run(4, _fsdp_tp_worker, str(tmp_path))
    plain = _plain_model(AIR_SPLIT, tmp_path / "plain.pt")
    fresh = model_registry("debugmodel", **AIR_SPLIT).model.build()  # tp=1, no FSDP
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp_2x2"))
    fresh.load_state_dict(state)
    for name, p in plain.state_dict().items():
        _close(fresh.state_dict()[name], p, name)

    pytest.importorskip("colm_kernels.integrations.hf")
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "checkpoint" / "step-2"
    assert (folder / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(hf).__name__ == "CoLMForCausalLM" and hf.config.chains == [4, 4, 8] and hf.config.kv_sharing
    tokens, _ = _batch(seed=6)
    with ck.use_backend("reference"):
        for chain in range(3):
            _close(hf(tokens, chain=chain).logits, plain(tokens, chain=chain), f"HF logits at chain={chain}")
