"""Shared Triton helpers of the kernels, one module per concern (import the one you need):

- ``device``: where kernels run (interpreter, tiles), the dtypes they take, launcher checks.
- ``tables``: per-chain tables kernels read (pointers, widths, offsets) and grid tile counts.
- ``tiles``: device-side (``@triton.jit``) tile order, chain segments, table reads, ``mma``, K loops.
- ``gemm_configs``: the chain GEMMs' autotune configurations and their pruner.
- ``tma``: Tensor Memory Accelerator legality, modes and descriptors.
- ``autotuning``: ``autotune`` and the kernels whose launches are not idempotent.
- ``rows``: per-row scales (elastic batches): rows sorted by scale, blocks each row block reaches.
- ``attention``: device-side helpers of the attention kernels (packed kv-head groups).
- ``gpu_semantics``: the interpreter launching kernels as an H100 does (tests, debugging).
- ``interpreter``: a faster Triton interpreter for kernels built from many helpers (tests, bench).

Importing this package imports nothing heavy; every module needs ``triton``.
"""
