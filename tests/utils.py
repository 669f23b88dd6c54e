"""Test helpers: readable ids, chain arithmetic written again from the spec (independent of
``colm_kernels.chains``), and float64 references written without any package code.

Every reference here is deliberately naive (dense masked matmuls, explicit loops over rows / heads)
so that it shares no code path with ``colm_kernels``' reference backend.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# ids
def cid(chains: Sequence[int]) -> str:
    """``(1, 2, 1)`` -> ``"C1.2.1"``."""
    return "C" + ".".join(str(c) for c in chains)


def shape_id(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


# ---------------------------------------------------------------------------------------------
# chain arithmetic (spec section 1), re-derived here
def widths(dim: int, chains: Sequence[int]) -> list[int]:
    s = sum(chains)
    assert all(dim * c % s == 0 for c in chains), (dim, chains)
    return [dim * c // s for c in chains]


def offsets(dim: int, chains: Sequence[int]) -> list[int]:
    """``[0, P_1, ..., P_n]``."""
    out = [0]
    for w in widths(dim, chains):
        out.append(out[-1] + w)
    return out


def prefix(dim: int, chains: Sequence[int], k: Optional[int]) -> int:
    """``P_(k+1)``: active width at ``chain=k`` (``None``: all)."""
    k = len(chains) - 1 if k is None else k
    return offsets(dim, chains)[k + 1]


def head_prefix(chains: Sequence[int], k: Optional[int]) -> int:
    k = len(chains) - 1 if k is None else k
    return sum(chains[: k + 1])


def head_chain(chains: Sequence[int]) -> list[int]:
    return [i for i, c in enumerate(chains) for _ in range(c)]


def kv_map(chains: Sequence[int], n_q: int, n_kv: int, kv_sharing: bool, mapping: str) -> list[int]:
    """Spec section 3/4: which kv head each of the first ``n_q`` query heads reads.

    Without sharing ``n_kv`` is the kv heads of the active chains and the GQA group is constant,
    so query head j reads ``j // (n_q / n_kv)``. With sharing ``n_kv`` is every shared head.
    """
    if not kv_sharing:
        assert n_q % n_kv == 0
        return [j // (n_q // n_kv) for j in range(n_q)]
    if mapping == "tile":
        return [j % n_kv for j in range(n_q)]
    out = []
    for c in chains:
        out.extend(l // (c // n_kv) for l in range(c))
    return out[:n_q]


# ---------------------------------------------------------------------------------------------
# random tensors
def randn(*shape, gen: torch.Generator, dtype=F64, requires_grad: bool = False, scale: float = 1.0):
    t = torch.randn(*shape, generator=gen, dtype=F64) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def chain_blocks(out_f: int, in_f: int, chains, gen, dtype=F64, requires_grad=False):
    """Per-chain blocks ``W_i`` of shape ``(d_i_out, P_i_in)``, O(1) outputs."""
    d_out = widths(out_f, chains)
    p_in = offsets(in_f, chains)[1:]
    return [randn(d, p, gen=gen, dtype=dtype, requires_grad=requires_grad, scale=1 / math.sqrt(p))
            for d, p in zip(d_out, p_in)]


def lower_mask(out_f: int, in_f: int, chains) -> torch.Tensor:
    """Boolean ``(out, in)``: True on the blocks (i, j <= i) that chain_linear reads."""
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    ro, co = offsets(out_f, chains), offsets(in_f, chains)
    for i in range(len(chains)):
        mask[ro[i]: ro[i + 1], : co[i + 1]] = True
    return mask


def blocks_to_dense(blocks, chains, out_f: int, in_f: int, fill: float = 0.0) -> torch.Tensor:
    """Scatter per-chain blocks into a dense ``(out, in)`` matrix; upper blocks hold ``fill``."""
    dense = torch.full((out_f, in_f), fill, dtype=blocks[0].dtype)
    ro = offsets(out_f, chains)
    for i, b in enumerate(blocks):
        dense[ro[i]: ro[i + 1], : b.shape[1]] = b.detach()
    return dense


def dense_to_blocks(dense: torch.Tensor, chains) -> list[torch.Tensor]:
    out_f, in_f = dense.shape
    ro, co = offsets(out_f, chains), offsets(in_f, chains)
    return [dense[ro[i]: ro[i + 1], : co[i + 1]].detach().clone() for i in range(len(chains))]


# ---------------------------------------------------------------------------------------------
# float64 references
def ref_chain_linear(x, dense_w, bias, chains, chain=None):
    """Dense masked matmul: ``x[..., :in] @ (W * lower_mask)^T + b``, first P_(chain+1) outputs."""
    out_f, in_f = dense_w.shape
    mask = lower_mask(out_f, in_f, chains)
    w = torch.where(mask, dense_w.to(F64), torch.zeros((), dtype=F64))
    y = x[..., :in_f].to(F64) @ w.T
    if bias is not None:
        y = y + bias.to(F64)
    return y[..., : prefix(out_f, chains, chain)]


def ref_chain_rmsnorm(x, weight, chains, eps):
    """Explicit loop over rows and chain segments: ``x_i / sqrt(mean(x_i^2) + eps) * g_i``."""
    dim = weight.shape[0]
    bounds = offsets(dim, chains)
    width = x.shape[-1]
    rows = x.to(F64).reshape(-1, width)
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if lo >= width:
                break
            seg = rows[r, lo:hi]
            ms = sum(float(v) ** 2 for v in seg) / (hi - lo)
            out[r, lo:hi] = seg / math.sqrt(ms + eps) * weight[lo:hi].to(F64)
    return out.reshape(x.shape)


def ref_chain_attention(q, k, v, mapping: Sequence[int], causal=True, softmax_scale=None,
                        active: Optional[torch.Tensor] = None):
    """Explicit loop over batch and query heads. ``active``: bool ``(B, H)`` (False -> zeros).

    Causal masking is bottom-right aligned: query i sees key j iff ``j <= i + Sk - Sq``; a row that
    sees no key outputs zeros.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(B, Sq, H, D, dtype=F64)
    for b in range(B):
        for h in range(H):
            if active is not None and not bool(active[b, h]):
                continue
            qh = q[b, :, h].to(F64)
            kh = k[b, :, mapping[h]].to(F64)
            vh = v[b, :, mapping[h]].to(F64)
            scores = qh @ kh.T * scale
            for i in range(Sq):
                if causal:
                    visible = [j for j in range(Sk) if j <= i + Sk - Sq]
                else:
                    visible = list(range(Sk))
                if not visible:
                    continue
                p = torch.softmax(scores[i, visible], dim=0)
                out[b, i, h] = p @ vh[visible]
    return out


def ref_multi_chain_ce(hidden, weight, targets, chains, ignore_index=-100):
    """One ``F.cross_entropy`` per scale on explicitly built logits ``h[:, :P] @ W[:, :P]^T``."""
    dim = weight.shape[1]
    n_scales = offsets(dim, chains)[1:].index(hidden.shape[-1]) + 1
    h = hidden.to(F64).reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    losses = []
    for k in range(n_scales):
        p = prefix(dim, chains, k)
        logits = h[:, :p] @ weight.to(F64)[:, :p].T
        losses.append(F.cross_entropy(logits, t, ignore_index=ignore_index))
    return torch.stack(losses)


def randomize(model, seed=0):
    """O(1) random weights so logits are far from degenerate; gains near (not exactly) one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(p.shape[-1]))
    return model


def free_port() -> int:
    """A free localhost TCP port for a test's process group (``MASTER_PORT``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# compile-only checks (sm_90a without a GPU)
def require_sm90_ptxas() -> str:
    """Triton's bundled ``ptxas`` for sm_90 (its path), or skip the test: the compile-only checks
    lower kernels to cubins with it."""
    import os

    import pytest
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001  (no NVIDIA backend / no ptxas in this triton build)
        pytest.skip(f"triton's ptxas is not available: {e!r}")
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"triton's ptxas is not available ({path!r})")
    return path


def kernel_subprocess_env(cache_dir=None, **set_vars: str) -> dict:
    """The environment of a subprocess that compiles kernels for sm_90a (or, with ``set_vars``
    such as ``work_env``'s, counts their work): by default not the interpreter nor the one-config or
    small-tile test modes (every config the pruners keep compiles, at the H100 tiles), and no
    backend forced from outside; this checkout and ``tests/`` importable. Triton's cache:
    ``cache_dir``, else the test session's shared one (``COLM_KERNELS_TEST_TRITON_CACHE``, set by
    conftest.py), so shards and xdist workers compile each kernel once (``bench.sm90`` keeps the
    ptxas log beside the cubin, so a cache hit reports the same registers and spills)."""
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "COLM_KERNELS_AUTOTUNE", "COLM_KERNELS_TILES", "COLM_KERNELS_BACKEND")}
    cache_dir = cache_dir if cache_dir is not None else os.environ.get("COLM_KERNELS_TEST_TRITON_CACHE")
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(tests), tests, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(set_vars)
    return env


def work_env(cache_dir=None) -> dict:
    """A subprocess that counts the tensor-core FLOPs kernels execute: the interpreter at the H100
    tiles, the first kept config (``colm_kernels.bench.work``)."""
    return kernel_subprocess_env(cache_dir, TRITON_INTERPRET="1", COLM_KERNELS_TILES="gpu", COLM_KERNELS_AUTOTUNE="0")


def run_reporting(args, marker: str, env: dict, timeout: int = 900):
    """Run ``python *args`` from the repository root and return the JSON of its last stdout line
    that starts with ``marker`` (after one space); fail with its output if it exits non-zero or
    prints no such line."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker + " ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return json.loads(lines[-1][len(marker) + 1:])


def sgd_steps(model, optimizer, loss_fn, batches, rows, frozen=None):
    """Training steps as TorchTitan's trainer (and ``CoLMTrainer``) takes them: the loss over the
    batch's counted tokens, backward, chain tuning's frozen columns zeroed (``frozen``), a step.
    ``rows`` selects this rank's rows of each ``(inputs, labels)`` batch. Returns the losses."""
    import torch as _torch

    losses = []
    for inputs, labels in batches:
        loss, _ = loss_fn(model(inputs[rows], labels=labels[rows]), labels[rows], (labels != -100).sum())
        loss.backward()
        if frozen is not None:
            frozen.zero_grads()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return _torch.stack(losses)

