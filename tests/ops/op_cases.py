"""One small call of every op with every host-checked input given and ``check_values=False``,
as the models call them in a training or decode step (``tests/ops/test_host_syncs.py`` traps host
reads in them on CPU; ``tests/ops/test_cuda_graphs.py`` captures them in a CUDA graph).

``CASES[name](device)`` returns ``(run, leaves)``: ``run()`` calls the op (decode under
``no_grad``) and ``leaves`` are the inputs that get gradients (empty: forward only).
"""
import torch

import colm_kernels as ck

CHAINS = (1, 1, 2)


def _leaves(device, *shapes, scale=1.0):
    return [(torch.randn(*s, device=device) * scale).requires_grad_() for s in shapes]


def _chain_linear(device):
    x, w, b = _leaves(device, (2, 5, 32), (32, 32), (32,))
    sc = torch.tensor([0, 2], device=device)
    return lambda: ck.chain_linear(x, w, b, CHAINS, seq_chains=sc, check_values=False), [x, w, b]


def _chain_swiglu(device):
    x, w1, w3 = _leaves(device, (2, 5, 32), (48, 32), (48, 32), scale=0.3)
    sc = torch.tensor([[2, 1, 0, 2, 1], [0, 0, 1, 2, 2]], device=device)
    return lambda: ck.chain_swiglu(x, w1, w3, CHAINS, seq_chains=sc, check_values=False), [x, w1, w3]


def _chain_rmsnorm(device):
    x, w = _leaves(device, (2, 5, 32), (32,))
    sc = torch.tensor([1, 2], device=device)
    return lambda: ck.chain_rmsnorm(x, w, CHAINS, 1e-5, seq_chains=sc, check_values=False), [x, w]


def _chain_attention(device, deterministic):
    q, k, v = _leaves(device, (2, 9, 4, 16), (2, 9, 2, 16), (2, 9, 2, 16))
    sc = torch.tensor([0, 1], device=device)

    def run():
        return ck.chain_attention(q, k, v, (2, 2), seq_chains=sc, deterministic=deterministic, check_values=False)

    return run, [q, k, v]


def _chain_attention_varlen(device):
    q, k, v = _leaves(device, (12, 4, 16), (12, 2, 16), (12, 2, 16))
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
    sc = torch.tensor([1, 0, 1], device=device)

    def run():
        return ck.chain_attention(q, k, v, (2, 2), seq_chains=sc, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                  max_seqlen_q=7, max_seqlen_k=7, check_values=False)

    return run, [q, k, v]


def _chain_attention_decode(device):
    q = torch.randn(2, 3, 4, 16, device=device)
    k, v = torch.randn(6, 8, 2, 16, device=device), torch.randn(6, 8, 2, 16, device=device)  # 6 pages of 8
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32, device=device)
    lengths = torch.tensor([20, 9], dtype=torch.int32, device=device)
    sc = torch.tensor([1, 0], device=device)

    def run():
        with torch.no_grad():
            return ck.chain_attention_decode(q, k, v, lengths, (2, 2), seq_chains=sc, block_table=table,
                                             check_values=False)

    return run, []


def _multi_chain_cross_entropy(device):
    h, w = _leaves(device, (10, 32), (40, 32), scale=0.3)
    t = torch.randint(0, 40, (10,), device=device)
    t[3] = -100
    sc = torch.tensor([2, 1, 0, 2, 2, 1, 0, 0, 1, 2], device=device)

    def run():
        return ck.multi_chain_cross_entropy(h, w, t, CHAINS, seq_chains=sc, label_smoothing=0.1,
                                            check_values=False)

    return run, [h, w]


CASES = {
    "chain_linear": _chain_linear,
    "chain_swiglu": _chain_swiglu,
    "chain_rmsnorm": _chain_rmsnorm,
    "chain_attention": lambda device: _chain_attention(device, False),
    "chain_attention-deterministic": lambda device: _chain_attention(device, True),
    "chain_attention-varlen": _chain_attention_varlen,
    "chain_attention_decode-paged": _chain_attention_decode,
    "multi_chain_cross_entropy": _multi_chain_cross_entropy,
}


def step(run, leaves, cot=None):
    """``run()`` and, when there are leaves, the gradients of the leaves for the cotangent ``cot``
    (random when None): ``(out, grads)``."""
    out = run()
    if not leaves:
        return out, ()
    cot = torch.randn_like(out) if cot is None else cot
    return out, torch.autograd.grad(out, leaves, cot)
