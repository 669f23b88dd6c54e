"""``chain_swiglu``: ``silu(x W1^T) * (x W3^T)`` with Chain-of-Linear W1, W3 (the FFN's gate)."""
