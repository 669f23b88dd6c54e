"""``chain_linear``: block-lower-triangular matmul (Chain-of-Linear), the public function.

Weight layout (what the kernels read): one block per chain, ``W_i`` of shape ``(d_i_out, P_i_in)``:
chain i's output rows and every input column it may read. Pass either that list (the paper's
``mlps.{i}.weight``, what ``colm_kernels.nn.ChainLinear`` holds) or one dense ``(out, in)`` matrix,
of which only the lower blocks are read (its upper blocks are never read and get zero gradient).
"""
from __future__ import annotations

from torch import Tensor

from ... import backends
from ...chains import ChainsLike, as_chains
from .._checks import check_like, check_tensor, unit_last_dim
from .._library import register_reference_op
from .._rows import row_chains as _row_chains
from ..autocast import LOWER, autocast_op
from . import reference

OP = "chain_linear"
SCHEMA = "(Tensor x, Tensor[] weights, Tensor[] biases, Tensor? row_chains) -> Tensor"


def _fake(x, weights, biases, row_chains):
    return x.new_empty(reference.chain_linear_out_shape(x, weights))


chain_linear_reference = register_reference_op(
    f"{OP}_reference", reference.chain_linear, _fake, SCHEMA
)

backends.register(OP, "reference", __name__, "chain_linear_reference")
backends.register(OP, "triton", "colm_kernels.ops.chain_linear.triton_backend", "chain_linear_triton",
                  reasons_fn="not_supported_reasons")
backends.register(OP, "cuda", "colm_kernels.ops.chain_linear.cuda_backend", "chain_linear_cuda", reasons_fn="not_supported_reasons")
backends.register_bounds(OP, "colm_kernels.ops.chain_linear.bounds")


def split_weight(weight, bias, chains: ChainsLike, chain=None, *, name: str = "weight"):
    """Validate ``weight``/``bias`` (dense or per-chain) and return the per-chain blocks of the
    active chains ``0..chain``, as ``(weights, biases)`` lists (views, no copies). Errors name the
    argument ``name`` (and ``bias``)."""
    chains = as_chains(chains)
    k = chains.check_chain(chain)
    if isinstance(weight, Tensor):
        check_tensor(name, weight, ndim=2)
        out_f, in_f = weight.shape
        widths = chains.widths(out_f, name=f"{name}.shape[0] (out_features)")
        prefixes = chains.prefixes(in_f, name=f"{name}.shape[1] (in_features)")
        rows = chains.offsets(out_f)
        blocks = [weight[rows[i]: rows[i + 1], : prefixes[i]] for i in range(k + 1)]
    elif isinstance(weight, (list, tuple)):
        if len(weight) != chains.n:
            raise ValueError(
                f"{name} must hold one block per chain: {chains.n} for chains={chains.sizes}, "
                f"got {len(weight)}"
            )
        for i, w in enumerate(weight):
            check_tensor(f"{name}[{i}]", w, ndim=2)
        out_f, in_f = _block_layout(chains, [tuple(w.shape) for w in weight], name)
        widths = chains.widths(out_f)
        blocks = list(weight[: k + 1])
    else:
        raise TypeError(
            f"{name} must be a dense (out, in) Tensor or a list of per-chain blocks, "
            f"got {type(weight).__name__}"
        )
    for i, w in enumerate(blocks):
        check_like(f"{name}[0]", blocks[0], **{f"{name}[{i}]": w})
    if bias is None:
        biases = []
    elif isinstance(bias, Tensor):
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must have shape ({out_f},) (out_features), got {tuple(bias.shape)}")
        offs = chains.offsets(out_f)
        biases = [bias[offs[i]: offs[i + 1]] for i in range(k + 1)]
    elif isinstance(bias, (list, tuple)):
        if len(bias) != chains.n:
            raise ValueError(f"bias must hold one vector per chain ({chains.n}), got {len(bias)}")
        for i, b in enumerate(bias):
            check_tensor(f"bias[{i}]", b, ndim=1)
            if b.shape[0] != widths[i]:
                raise ValueError(f"bias[{i}] must have shape ({widths[i]},), got {tuple(b.shape)}")
        biases = list(bias[: k + 1])
    else:
        raise TypeError(f"bias must be None, a Tensor or a list of per-chain Tensors, got {type(bias).__name__}")
    for i, b in enumerate(biases):
        check_like(f"{name}[0]", blocks[0], **{f"bias[{i}]": b})
    return blocks, biases


def _block_layout(chains, shapes: list[tuple[int, int]], name: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of per-chain blocks of ``shapes``, checked against the
    paper's layout ``W_i: (d_i_out, P_i_in)``.

    Every block implies an ``(out, in)`` pair; the pair most blocks agree on (the earliest chain
    breaks ties) is taken as meant, so an error names the blocks that are wrong and the shape each
    block must have, instead of deriving the dimensions from a wrong block."""
    sizes, total = chains.sizes, chains.total
    implied = []
    for i, (rows, cols) in enumerate(shapes):
        prefix_chains = sum(sizes[: i + 1])
        out_f, in_f = rows * total / sizes[i], cols * total / prefix_chains
        implied.append((int(out_f), int(in_f)) if out_f.is_integer() and in_f.is_integer() else None)

    def expected(out_f, in_f):
        try:
            return [(d, p) for d, p in zip(chains.widths(out_f), chains.prefixes(in_f))]
        except ValueError:
            return None

    candidates = [pair for pair in implied if pair is not None and expected(*pair) is not None]
    if candidates:
        out_f, in_f = max(candidates, key=lambda pair: (candidates.count(pair), -implied.index(pair)))
        want = expected(out_f, in_f)
        wrong = [i for i, shape in enumerate(shapes) if shape != want[i]]
        if not wrong:
            return out_f, in_f
        detail = "; ".join(f"{name}[{i}] must be {want[i]}, got {shapes[i]}" for i in wrong)
        raise ValueError(
            f"{name} blocks must have shapes (d_i_out, P_i_in) = {want} for out_features={out_f}, "
            f"in_features={in_f} (the layout most blocks fit), chains={sizes}: {detail}"
        )
    raise ValueError(
        f"{name} blocks must have shapes (d_i_out, P_i_in) = (out * c_i / S, in * (c_1 + ... + c_i) / S) "
        f"for chains={sizes} (S={total}); no out_features/in_features fits any block of shapes {shapes}"
    )


def as_rows(x: Tensor, width: int) -> Tensor:
    """``x`` ``(..., K)`` as ``(rows, K)`` with a unit last-dim stride (what the kernels read),
    after checking that it is at least ``width`` wide (the input width the active chains read)."""
    if x.shape[-1] < width:
        raise ValueError(
            f"x.shape[-1]={x.shape[-1]} is narrower than the input width the active chains read "
            f"(P_in={width})"
        )
    return unit_last_dim(x.reshape(-1, x.shape[-1]))


def unit_stride(tensors: list[Tensor]) -> list[Tensor]:
    """Weight blocks (or biases) with a unit last-dim stride; strided views of dense weights whose
    rows are unit-stride are read in place."""
    return [unit_last_dim(t) for t in tensors]


@autocast_op(LOWER, ("x", "weight", "bias"))
def chain_linear(x: Tensor, weight, bias, chains: ChainsLike, chain=None, *, seq_chains=None,
                 check_values: bool = True) -> Tensor:
    """Chain-of-Linear: ``y_i = x[..., :P_i_in] @ W_i^T + b_i`` for the active chains ``0..chain``.

    Args:
        x: ``(..., K)`` with ``K >= P_(chain+1)_in`` (wider inputs are sliced, as in the paper).
        weight: dense ``(out, in)`` Tensor (lower blocks read) or a list of per-chain blocks
            ``W_i`` of shape ``(d_i_out, P_i_in)``.
        bias: None, an ``(out,)`` Tensor or a list of per-chain ``(d_i_out,)`` Tensors.
        chains: the chain configuration; ``chain``: last active chain (None: all).
        seq_chains: elastic batches: an integer tensor whose shape is a prefix of ``x``'s leading
            dims (``(B,)`` per sequence, or the whole leading shape per token), the last active
            chain of each row, at most ``chain``. A row's outputs beyond its scale are exact zeros
            and pass no gradient; kernels skip that work.
        check_values: check ``seq_chains``' values on the host (one sync); pass False where the
            caller guarantees them.

    Returns ``(..., P_(chain+1)_out)``: the first active-width output features.
    """
    check_tensor("x", x, min_ndim=1)
    weights, biases = split_weight(weight, bias, chains, chain)
    check_like("x", x, weight=weights[0])
    rows = _row_chains(seq_chains, x, len(weights) - 1, check_values)
    x2 = as_rows(x, weights[-1].shape[1])
    weights, biases = unit_stride(weights), unit_stride(biases)
    tensors = [x2, *weights, *biases] + ([rows] if rows is not None else [])
    op = backends.dispatch(OP, tensors, x=x2, weights=weights, biases=biases, row_chains=rows)
    y = op(x2, weights, biases, rows)
    return y.reshape(*x.shape[:-1], y.shape[-1])
