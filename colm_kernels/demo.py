"""A tiny CoLM trained for a few steps on a synthetic task; prints the loss at every scale.

``python -m colm_kernels.demo``: runs on CPU in seconds. The task (next token = a fixed permutation
of the current one) is learnable, so every scale's loss falls; the small scales are sub-models of
the large one, trained together through the multi-chain loss.
"""
from __future__ import annotations

import argparse
import time

import torch

from .models import CoLM, CoLMConfig


def train(steps: int = 30, chains=(2, 2, 4), kv_sharing: bool = False, seed: int = 0,
          log=print) -> list[list[float]]:
    torch.manual_seed(seed)
    vocab = 64
    config = CoLMConfig(dim=128, n_layers=2, n_heads=sum(chains), n_kv_heads=2 if kv_sharing else 4,
                        vocab_size=vocab, chains=tuple(chains), ffn_hidden_dim=128,
                        kv_sharing=kv_sharing)
    model = CoLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    permutation = torch.randperm(vocab)
    history = []
    header = "step  " + "  ".join(f"loss@chain{k}" for k in range(config.n_chains))
    log(f"CoLM {config.chains} dim={config.dim} layers={config.n_layers} "
        f"kv_sharing={kv_sharing}: training {steps} steps on CPU")
    log(header)
    start = time.perf_counter()
    for step in range(steps):
        tokens = torch.randint(0, vocab, (8, 32))
        targets = permutation[tokens]
        losses = model.multi_chain_loss(tokens, targets)  # one loss per scale
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        history.append(losses.tolist())
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            log(f"{step:4d}  " + "  ".join(f"{v:12.4f}" for v in history[-1]))
    log(f"done in {time.perf_counter() - start:.1f}s; every scale's loss fell: "
        f"{all(h[0] > history[-1][i] for i, h in enumerate(zip(*history)))}")
    return history


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--air", action="store_true", help="CoLM-Air (keys/values from chain 1)")
    args = parser.parse_args(argv)
    train(args.steps, kv_sharing=args.air)


if __name__ == "__main__":
    main()
