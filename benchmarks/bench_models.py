"""Benchmark the model-level cases: a CoLM training step against the paper's naive code, CoLM-Air
prefill at chain 1 against a full prefill, and a mixed-scale decode step against one batch per
scale (``colm_kernels.bench.models``)."""
from harness import cases_for


@cases_for("colm_train_step")
def test_colm_train_step(case, cuda_benchmark):
    cuda_benchmark(case.run)


@cases_for("colm_air_prefill")
def test_colm_air_prefill(case, cuda_benchmark):
    cuda_benchmark(case.run)


@cases_for("colm_serving_decode")
def test_colm_serving_decode(case, cuda_benchmark):
    cuda_benchmark(case.run)
