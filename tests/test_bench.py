"""``colm-bench`` end to end on CPU: the timing harness (``--device cpu``, tiny sizes) and the
correctness-check mode that runs without a GPU, plus the training demo it ends with."""
import json

import pytest
import torch

from colm_kernels.bench import cli
from colm_kernels.demo import train

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def test_timing_harness_on_cpu(tmp_path):
    rc = cli.main(["--device", "cpu", "--sizes", "tiny", "--warmup", "0", "--rep", "1", "--no-plots",
                   "--out", str(tmp_path), "--ops", "chain_linear,chain_rmsnorm"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["mode"] == "timings" and data["meta"]["torch"]
    rows = data["rows"]
    providers = {(r["op"], r["provider"]) for r in rows}
    assert {("chain_linear", "dense-cublas"), ("chain_linear", "paper-naive"),
            ("chain_rmsnorm", "paper-naive")} <= providers
    assert all(r["ms"] > 0 and r["error"] is None for r in rows)
    peers = [r for r in rows if r["provider"] == r["peer"]]
    assert peers and all(r["ratio"] == pytest.approx(1.0) for r in peers)
    assert {r["pass"] for r in rows if r["op"] == "chain_linear"} == {"fwd", "bwd_x", "bwd_w", "fwd+bwd"}
    assert (tmp_path / "table.txt").read_text().count("\n") == len(rows) + 2
    # every row says how it was timed, with its spread
    assert {r["timing_method"] for r in rows} == {"perf_counter"}
    assert all(r["ms_p20"] <= r["ms"] <= r["ms_p80"] for r in rows)


def test_interrupted_timing_run_still_writes_what_it_measured(tmp_path, monkeypatch):
    # GPU runs end with `timeout -s INT` at the device's time limit: the rows measured stay.
    from colm_kernels.bench import timing
    calls = []

    def fake_measure(run, device, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return timing.Timing(1.0, 0.9, 1.1, "perf_counter")

    monkeypatch.setattr(timing, "measure", fake_measure)
    rc = cli.main(["--device", "cpu", "--sizes", "tiny", "--no-plots", "--out", str(tmp_path),
                   "--ops", "chain_linear"])
    assert rc == 130
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["interrupted"] is True
    assert [r["ms"] for r in data["rows"]] == [1.0, 1.0]


def test_failed_graph_capture_is_reported_not_hidden(monkeypatch):
    """A case that asks for CUDA-graph replay and cannot be captured is timed by do_bench, and the
    timing says so (method and the capture's exception), as the table's "timed by" column shows.
    The CUDA calls are stubbed: the logic runs on CPU."""
    import contextlib

    import triton.testing

    from colm_kernels.bench import timing

    def capture(fn, **_):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", capture)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: [2.0, 1.5, 2.5])
    monkeypatch.setattr(timing, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    t = timing.measure(lambda: None, torch.device("cuda"), cudagraph=True)
    assert (t.ms, t.method) == (2.0, "do_bench (graph capture failed)")
    assert t.capture_error == "RuntimeError: operation not permitted when stream is capturing"
    t = timing.measure(lambda: None, torch.device("cuda"), cudagraph=False)
    assert (t.method, t.capture_error) == ("do_bench", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU colm-bench times instead of checking")
def test_check_mode_without_gpu(tmp_path):
    rc = cli.main(["--out", str(tmp_path), "--ops", "chain_linear,chain_attention_decode",
                   "--demo-steps", "0"])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    ran = [r for r in rows if r["ok"] is not None]
    assert ran and all(r["ok"] for r in ran)
    assert {("chain_linear", "triton"), ("chain_linear", "reference")} <= {(r["op"], r["backend"]) for r in ran}
    # backends that cannot run here are listed with the reason, not hidden
    assert any(r["backend"] == "cuda" and "cannot run" in r["note"] for r in rows)
    # a forward-only op has no gradient error: null in JSON, n/a in the table (never 0.0)
    decode = [r for r in ran if r["op"] == "chain_attention_decode"]
    assert decode and all(r["max_rel_err_grad"] is None for r in decode)
    assert all(r["max_rel_err_grad"] is not None for r in ran if r["op"] == "chain_linear")
    table = (tmp_path / "table.txt").read_text()
    decode_lines = [line for line in table.splitlines() if line.startswith("chain_attention_decode")]
    assert decode_lines and all("n/a" in line for line in decode_lines)
    # the CPU mode plots its accuracy checks
    png = tmp_path / "accuracy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_states_defaults_and_plots(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "issue" not in text.lower()
    assert "(default: colm_bench_results)" in text  # the output folder and every default
    assert "accuracy.png" in text and "need a GPU" in text
    for option in ("--ops", "--sizes", "--dtype", "--device", "--out", "--warmup", "--rep",
                   "--demo-steps", "--no-plots", "--no-progress"):
        assert option in text
    # the op list is separated by spaces, so the help never wraps it mid-word
    import re
    assert not re.search(r"[a-z]_\n\s+[a-z]", text)
    help_lines = [ln for ln in text.splitlines() if ln.startswith("  --")]
    assert len(help_lines) >= 10


def test_progress_bar_shows_cases(tmp_path, capsys):
    pytest.importorskip("tqdm")
    rc = cli.main(["--device", "cpu", "--sizes", "tiny", "--warmup", "0", "--rep", "1", "--no-plots",
                   "--out", str(tmp_path), "--ops", "chain_rmsnorm"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "chain_rmsnorm" in err and "case" in err  # the bar: op, case count and current case


def test_demo_losses_fall_at_every_scale():
    history = train(steps=12, log=lambda *_: None)
    first, last = history[0], history[-1]
    assert len(first) == 3 and all(l < f for f, l in zip(first, last))


def test_unknown_op_is_rejected():
    with pytest.raises(SystemExit):
        cli.main(["--ops", "not_an_op"])


@pytest.mark.parametrize("kv_sharing", [False, True], ids=["gqa", "air"])
def test_paper_naive_model_peer_computes_our_loss(kv_sharing):
    """The model-level peer (the paper's way: per-chain loops, repeated K/V through SDPA, a logits
    tensor per scale) computes the same per-scale losses as ``CoLM.multi_chain_loss`` (float64,
    reference backend), so the train-step rows compare equal work."""
    from colm_kernels.bench.models import ModelCase, naive_multi_chain_loss
    from colm_kernels.models import CoLM

    layout = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_hidden_dim=128, vocab_size=97)
    case = ModelCase((4, 4), layout, 2, 9, kv_sharing)
    torch.manual_seed(0)
    model = CoLM(case.config()).double()
    tokens = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    import colm_kernels as ck
    with ck.use_backend("reference"):
        ours = model.multi_chain_loss(tokens, targets)
    naive = naive_multi_chain_loss(model, tokens, targets)
    torch.testing.assert_close(naive.double(), ours.double(), rtol=1e-9, atol=1e-9)


def test_model_flops_match_the_layout():
    """Useful FLOPs of the model rows: a chain-0 prefill of CoLM-Air does the sub-model's work
    (here 4 chains: about a fifth of the full prefill at 32K, the paper's 5.2x)."""
    from colm_kernels.bench.models import PREFILL_SIZES, model_flops

    case = [c for c in PREFILL_SIZES["default"] if c.chains == (8, 8, 8, 8) and c.seq == 32768][0]
    ratio = model_flops(case, None, train=False) / model_flops(case, 0, train=False)
    assert 4.5 < ratio < 5.5
