"""The option sets and the small problem the multi-chain cross-entropy option tests share
(``test_multi_chain_cross_entropy_options.py``: one scale per call; ``..._rows.py``: per-row scales)."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong in the interpreter: bfloat16 is a GPU test
LOW = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
CHAINS, D, V = (1, 2, 1), 40, 101  # chain widths 10/20/10; V not a multiple of any block

OPTIONS = [  # (id, options)
    ("mean", dict()),
    ("sum", dict(reduction="sum")),
    ("none", dict(reduction="none")),
    ("smooth", dict(label_smoothing=0.1)),
    ("smooth-none", dict(label_smoothing=0.3, reduction="none")),
    ("zloss", dict(lse_square_scale=0.05)),
    ("zloss-sum", dict(lse_square_scale=0.05, reduction="sum")),
    ("softcap", dict(softcap=2.5)),
    ("all-mean", dict(label_smoothing=0.2, lse_square_scale=0.02, softcap=3.0)),
    ("all-none", dict(label_smoothing=0.2, lse_square_scale=0.02, softcap=3.0, reduction="none")),
]
