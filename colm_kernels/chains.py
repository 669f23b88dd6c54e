"""Chain configurations: the only place chain arithmetic and its validation live.

A chain configuration ``C = (c_1, ..., c_n)`` splits a width ``D`` into chain widths
``d_i = D * c_i / sum(C)`` (exact, never floored). ``P_k = d_1 + ... + d_k`` are the prefix
widths. An argument ``chain`` is the 0-based index of the last active chain (``None``: all),
so the sub-model at ``chain=k`` spans the first ``P_(k+1)`` features of every width.

Every error is a ``ValueError`` (or ``TypeError`` for a wrong type) that names the argument and
shows the offending values.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence, Union

KV_MAPPINGS = ("tile", "chain_group")

ChainsLike = Union["Chains", Sequence[int]]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class Chains:
    """An immutable, validated chain configuration (hashable, usable as a cache key)."""

    __slots__ = ("sizes",)

    def __init__(self, chains: Iterable[int], *, name: str = "chains"):
        if isinstance(chains, Chains):
            sizes = chains.sizes
        else:
            if _is_int(chains) or isinstance(chains, (str, bytes)) or not hasattr(chains, "__iter__"):
                raise TypeError(
                    f"{name} must be a non-empty tuple of positive ints, got {chains!r}"
                )
            sizes = tuple(chains)
            if not sizes:
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {chains!r}")
            for c in sizes:
                if not _is_int(c):
                    raise TypeError(f"{name} must contain ints, got {chains!r}")
                if c <= 0:
                    raise ValueError(f"{name} must contain positive ints, got {chains!r}")
            sizes = tuple(int(c) for c in sizes)
        object.__setattr__(self, "sizes", sizes)

    def __setattr__(self, key, value):
        raise AttributeError("Chains is immutable")

    # Immutable: copies may share the instance; pickling rebuilds it through the validating constructor
    # (so deepcopy, torch.save of a whole module, and multiprocessing all work).
    def __reduce__(self):
        return (Chains, (self.sizes,))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    # -- basic properties -------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of chains."""
        return len(self.sizes)

    @property
    def total(self) -> int:
        """``S = sum(C)``."""
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        return iter(self.sizes)

    def __eq__(self, other) -> bool:
        if isinstance(other, Chains):
            return self.sizes == other.sizes
        if isinstance(other, tuple):
            return self.sizes == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.sizes)

    def __repr__(self) -> str:
        return f"Chains{self.sizes}"

    # -- scales -----------------------------------------------------------------------
    def check_chain(self, chain, *, name: str = "chain") -> int:
        """Normalise ``chain`` (``None`` -> last) to the index of the last active chain."""
        if chain is None:
            return self.n - 1
        if not _is_int(chain):
            raise TypeError(f"{name} must be an int in [0, {self.n - 1}] or None, got {chain!r}")
        if not 0 <= chain < self.n:
            raise ValueError(
                f"{name}={chain} is out of range for chains={self.sizes}: "
                f"expected an int in [0, {self.n - 1}] or None"
            )
        return int(chain)

    def prefix(self, k: int) -> "Chains":
        """The configuration of the first ``k + 1`` chains (the sub-model at ``chain=k``)."""
        return Chains(self.sizes[: self.check_chain(k) + 1])

    # -- widths -----------------------------------------------------------------------
    def widths(self, dim: int, *, name: str = "dim") -> tuple[int, ...]:
        """Chain widths ``d_i = dim * c_i / S``; raises when a split is not exact."""
        return _widths(self.sizes, dim, name)

    def offsets(self, dim: int, *, name: str = "dim") -> tuple[int, ...]:
        """``(0, P_1, ..., P_n)``: where each chain's segment starts and ends."""
        out = [0]
        for w in self.widths(dim, name=name):
            out.append(out[-1] + w)
        return tuple(out)

    def prefixes(self, dim: int, *, name: str = "dim") -> tuple[int, ...]:
        """``(P_1, ..., P_n)``."""
        return self.offsets(dim, name=name)[1:]

    # -- sharding (tensor parallelism) -----------------------------------------------------
    def shard_widths(self, dim: int, world: int, *, name: str = "dim",
                     world_name: str = "world") -> tuple[int, ...]:
        """``d_i / world``: the width of one of ``world`` equal shards of every chain's segment
        (each rank holds one shard of every chain); raises when a chain width does not split."""
        if not _is_int(world) or world <= 0:
            raise ValueError(f"{world_name} must be a positive int, got {world!r}")
        widths = self.widths(dim, name=name)
        bad = [w for w in widths if w % world]
        if bad:
            raise ValueError(
                f"{world_name}={world} must divide every chain's width of {name}={dim} split by "
                f"chains={self.sizes} (each chain is split evenly across the {world_name} ranks): "
                f"widths {widths}, not divisible: {bad}"
            )
        return tuple(w // world for w in widths)

    def shard_ranges(self, dim: int, world: int, rank: int, *, name: str = "dim",
                     world_name: str = "world") -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of rank ``rank``'s shard of every chain's segment of ``dim``: the
        ``rank``-th of ``world`` equal pieces of each chain, so a rank's features are again split
        by ``chains``, with widths ``d_i / world``."""
        widths = self.shard_widths(dim, world, name=name, world_name=world_name)
        if not _is_int(rank) or not 0 <= rank < world:
            raise ValueError(f"rank must be an int in [0, {world - 1}], got {rank!r}")
        starts = self.offsets(dim, name=name)[:-1]
        return tuple((s + rank * w, s + (rank + 1) * w) for s, w in zip(starts, widths))

    def active_width(self, dim: int, chain=None, *, name: str = "dim") -> int:
        """``P_(k+1)``: the width of the sub-model at ``chain=k``."""
        return self.offsets(dim, name=name)[self.check_chain(chain) + 1]

    def scale_of_width(self, width: int, dim: int, *, name: str = "x.shape[-1]",
                       dim_name: str = "dim") -> int:
        """The ``chain`` index whose prefix width is ``width``; raises if it is none."""
        prefixes = self.prefixes(dim, name=dim_name)
        if width not in prefixes:
            raise ValueError(
                f"{name}={width} is not a prefix width of {dim_name}={dim} split by chains={self.sizes}: "
                f"expected one of {prefixes}"
            )
        return prefixes.index(width)

    # -- attention heads ----------------------------------------------------------------
    def check_heads(self, n_heads: int, *, name: str = "n_heads") -> None:
        """Chain i owns ``c_i`` query heads, so ``n_heads`` must equal ``S``."""
        if not _is_int(n_heads) or n_heads != self.total:
            raise ValueError(
                f"{name}={n_heads!r} must equal sum(chains)={self.total} "
                f"(chain i owns c_i query heads) for chains={self.sizes}"
            )

    def head_chain(self, n_heads: int | None = None) -> tuple[int, ...]:
        """The chain index of every query head."""
        if n_heads is not None:
            self.check_heads(n_heads)
        return tuple(i for i, c in enumerate(self.sizes) for _ in range(c))

    def kv_head_counts(self, n_kv_heads: int, *, name: str = "n_kv_heads") -> tuple[int, ...]:
        """Without KV sharing chain i owns ``c_i * n_kv_heads / S`` kv heads (must be exact)."""
        return _widths(self.sizes, n_kv_heads, name)

    def check_kv_sharing(self, n_kv_heads: int, *, name: str = "n_kv_heads") -> None:
        """With KV sharing every ``c_i`` must be a multiple of ``n_kv_heads``."""
        if not _is_int(n_kv_heads) or n_kv_heads <= 0:
            raise ValueError(f"{name} must be a positive int, got {n_kv_heads!r}")
        bad = [c for c in self.sizes if c % n_kv_heads]
        if bad:
            raise ValueError(
                f"with kv_sharing every chain size must be a multiple of {name}={n_kv_heads}; "
                f"chains={self.sizes} has {bad}"
            )

    def kv_head_map(
        self,
        n_kv_heads: int,
        *,
        kv_sharing: bool = False,
        kv_mapping: str = "tile",
        chain=None,
    ) -> tuple[int, ...]:
        """For each query head of the sub-model at ``chain``, the kv head it reads.

        Indices refer to the kv heads that sub-model holds: without sharing those are the kv heads
        of its own chains (ordinary GQA, ``j // (n_heads / n_kv_heads)``); with sharing all
        ``n_kv_heads`` shared heads (``tile``: ``j mod n_kv``; ``chain_group``: GQA inside each
        chain). Both mappings are the same at every active scale.
        """
        k = self.check_chain(chain)
        return _kv_head_map(self.sizes, n_kv_heads, bool(kv_sharing), kv_mapping, k)


def as_chains(chains: ChainsLike, *, name: str = "chains") -> Chains:
    """Accept a ``Chains`` or any sequence of positive ints."""
    return chains if isinstance(chains, Chains) else Chains(chains, name=name)


def _widths(sizes: tuple[int, ...], dim, name: str) -> tuple[int, ...]:
    if not _is_int(dim) or dim <= 0:
        raise ValueError(f"{name} must be a positive int, got {dim!r}")
    total = sum(sizes)
    bad = [c for c in sizes if (dim * c) % total]
    if bad:
        raise ValueError(
            f"{name}={dim} cannot be split exactly by chains={sizes}: "
            f"{dim} * c / {total} is not an integer for c in {bad}"
        )
    return tuple(dim * c // total for c in sizes)


def _kv_head_map(sizes, n_kv_heads, kv_sharing, kv_mapping, k) -> tuple[int, ...]:
    chains = Chains(sizes)
    if kv_mapping not in KV_MAPPINGS:
        raise ValueError(f"kv_mapping must be one of {KV_MAPPINGS}, got {kv_mapping!r}")
    active = sizes[: k + 1]
    if not kv_sharing:
        chains.kv_head_counts(n_kv_heads)
        group = chains.total // n_kv_heads
        return tuple(j // group for j in range(sum(active)))
    chains.check_kv_sharing(n_kv_heads)
    if kv_mapping == "tile":
        return tuple(j % n_kv_heads for j in range(sum(active)))
    out = []
    for c in active:
        group = c // n_kv_heads
        out.extend(l // group for l in range(c))
    return tuple(out)
