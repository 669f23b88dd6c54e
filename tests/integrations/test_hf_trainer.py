"""``CoLMForCausalLM`` under a real ``transformers.Trainer`` (CPU, tiny model, one SGD step without
clipping, so a step's update is the learning rate times the gradient):
- ``num_items_in_batch``: two accumulated micro-batches give the update and the logged loss of one
  whole batch, and that loss is the mean next-token cross-entropy over all the batch's targets;
- gradient checkpointing recomputes every block and leaves the gradients unchanged;
- ``bf16=True`` with accumulation and checkpointing steps as the fp32 run does, within bf16 rounding;
  ``fp16=True`` trains (on a CPU accelerate runs it in fp32: it has no fp16 autocast there);
- on a GPU (skipped without one) ``bf16=True`` and ``fp16=True`` against fp32 there."""
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import colm_kernels as ck  # noqa: E402
from colm_kernels import models  # noqa: E402
from colm_kernels.integrations.hf import to_hf  # noqa: E402
from utils import randomize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

VOCAB, LR = 41, 0.1
LENGTHS = (9, 6, 9, 4)  # right-padded to 9: padding never computed, its labels -100


@pytest.fixture(autouse=True)
def _reference_backend():
    with ck.use_backend("reference"):
        yield


def colm():
    cfg = models.CoLMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, chains=(2, 2),
                            ffn_hidden_dim=32, rope_theta=10000.0, kv_sharing=True, kv_mapping="chain_group")
    return randomize(models.CoLM(cfg), seed=1)


def samples():
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in LENGTHS:
        ids = torch.zeros(9, dtype=torch.long)
        ids[:n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask = (torch.arange(9) < n).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[2] = -100  # an ignored target inside a sequence too
        rows.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return rows


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train_one_step(base, tmp_path, *, batch=4, accumulation=1, device="cpu", **args):
    """A copy of ``base`` after one Trainer step over the 4 samples, and the logged loss."""
    model = to_hf(base).to(device)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no",
        disable_tqdm=True, use_cpu=device == "cpu", dataloader_num_workers=0, seed=0, **args)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Rows(samples()))
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return model, loss


def updates(model, base):
    before = {f"model.{k}": v for k, v in base.state_dict().items()}
    return {k: (v.detach().float().cpu() - before[k]) for k, v in model.state_dict().items()}


def mean_token_loss(base):
    """The mean next-token cross-entropy over every target of the 4 samples, from the logits."""
    hf = to_hf(base)
    batch = {k: torch.stack([r[k] for r in samples()]) for k in ("input_ids", "attention_mask", "labels")}
    logits = hf(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def test_accumulated_micro_batches_equal_the_whole_batch(tmp_path):
    base = colm()
    whole, loss = train_one_step(base, tmp_path)
    accumulated, acc_loss = train_one_step(base, tmp_path, batch=2, accumulation=2)
    assert loss == pytest.approx(acc_loss, rel=1e-6)
    assert loss == pytest.approx(float(mean_token_loss(base)), rel=1e-6)  # the 4 samples' token mean
    a, b = updates(whole, base), updates(accumulated, base)
    for name in a:
        assert a[name].abs().max() > 0, name
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_num_items_in_batch_divides_the_summed_token_losses():
    hf = to_hf(colm())
    batch = {k: torch.stack([r[k] for r in samples()]) for k in ("input_ids", "attention_mask", "labels")}
    mean = hf(**batch, use_cache=False).loss
    n = int((batch["labels"][:, 1:] != -100).sum())
    for items in (n, torch.tensor(n), torch.tensor(3 * n)):
        got = hf(**batch, use_cache=False, num_items_in_batch=items).loss
        torch.testing.assert_close(got, mean * n / int(items))
    weighted = hf(**batch, use_cache=False, num_items_in_batch=n, chain_weights=[0.5, 1.0]).loss
    per_scale = hf.multi_chain_loss(batch["input_ids"], batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(weighted, 0.5 * per_scale[0] + per_scale[1])


def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients():
    """With checkpointing the forward keeps the blocks' inputs only (the tensors it saves for the
    backward drop from 80 to 12 here), the backward runs each block again, and the gradients are
    the same."""
    base = colm()
    batch = {k: torch.stack([r[k] for r in samples()]) for k in ("input_ids", "attention_mask", "labels")}
    grads, saved = [], []
    for checkpointing in (False, True):
        hf = to_hf(base).train()
        if checkpointing:
            hf.gradient_checkpointing_enable()
            assert hf.is_activation_checkpointing
        calls, packed = [], []
        hf.model.layers[0].attention_norm.register_forward_hook(lambda *_: calls.append(1))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            loss = hf(**batch).loss  # checkpointed blocks save through their own hooks, not these
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the backward ran the block again
        saved.append(len(packed))
        grads.append({k: p.grad for k, p in hf.named_parameters()})
    assert saved[1] < saved[0] / 4, saved
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_bf16_accumulation_and_checkpointing_step_as_fp32(tmp_path):
    """The issue's done-when: bf16=True, gradient_accumulation_steps=2, gradient_checkpointing=True
    takes the plain bf16 run's step (accumulation and recomputation change nothing but summation
    order) and the fp32 run's step within bf16 rounding; fp16=True trains too."""
    base = colm()
    plain, loss = train_one_step(base, tmp_path)
    bf16, bf16_loss = train_one_step(base, tmp_path, bf16=True)
    mixed, mixed_loss = train_one_step(base, tmp_path, batch=2, accumulation=2, bf16=True,
                                       gradient_checkpointing=True)
    assert mixed.is_activation_checkpointing
    assert mixed_loss != loss and mixed_loss == pytest.approx(loss, rel=2e-2)  # bf16 really ran
    assert mixed_loss == pytest.approx(bf16_loss, rel=1e-3)
    want, low, got = updates(plain, base), updates(bf16, base), updates(mixed, base)
    largest = max(u.abs().max() for u in want.values())
    for name in want:
        assert got[name].dtype == torch.float32
        scale = want[name].abs().max()
        assert (got[name] - low[name]).abs().max() <= 0.01 * scale, f"{name}: accumulation / checkpointing"
        # bf16 rounding: the norms' gains (small sums of cancelling terms) reach 0.11 of their
        # largest update, every parameter stays within 0.02 of the largest update of all.
        err = (got[name] - want[name]).abs().max()
        assert err <= 0.15 * scale and err <= 0.04 * largest, f"{name}: {err / scale:.3f} of the fp32 step"
    half, half_loss = train_one_step(base, tmp_path, fp16=True)
    assert half_loss == pytest.approx(loss, rel=1e-6)  # accelerate: no fp16 autocast on a CPU
    for name, u in updates(half, base).items():
        torch.testing.assert_close(u, want[name], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA mixed precision needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu_steps_as_fp32(tmp_path, precision):
    base = colm()
    with ck.use_backend("auto"):  # cuda / triton kernels
        plain, loss = train_one_step(base, tmp_path, device="cuda")
        mixed, mixed_loss = train_one_step(base, tmp_path, device="cuda", batch=2, accumulation=2,
                                           gradient_checkpointing=True, **{precision: True})
    assert mixed_loss == pytest.approx(loss, rel=2e-2)
    want, got = updates(plain, base), updates(mixed, base)
    for name in want:
        err = (got[name] - want[name]).abs().max() / want[name].abs().max()
        assert err < 0.05, f"{name}: the {precision} step is {err:.3f} (relative) from the fp32 step"
