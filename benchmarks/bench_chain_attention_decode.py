"""Benchmark ``chain_attention_decode`` against its peers (providers and sizes: ``colm_kernels.bench.ops``)."""
from harness import cases_for


@cases_for("chain_attention_decode")
def test_chain_attention_decode(case, cuda_benchmark):
    cuda_benchmark(case.run)
