"""``colm_kernels.chains``: the one place chain numbers are derived. Expected values are written out
by hand from the spec, so a slip in the shared derivation cannot hide behind itself."""
import copy
import pickle

import pytest

from colm_kernels.chains import Chains, as_chains


def test_widths_offsets_prefixes_and_active_width():
    c = Chains((1, 2, 1))
    assert (c.n, c.total, len(c), tuple(c)) == (3, 4, 3, (1, 2, 1))
    assert c.widths(32) == (8, 16, 8)
    assert c.offsets(32) == (0, 8, 24, 32)
    assert c.prefixes(32) == (8, 24, 32)
    assert [c.active_width(32, k) for k in (0, 1, 2, None)] == [8, 24, 32, 32]
    assert [c.scale_of_width(w, 32) for w in (8, 24, 32)] == [0, 1, 2]
    assert c.prefix(1) == (1, 2) and c.prefix(0) == Chains((1,))


def test_head_chain_and_kv_head_maps():
    assert Chains((1, 2, 1)).head_chain(4) == (0, 1, 1, 2)
    # Without sharing: ordinary GQA over the whole head range, truncated to the active heads.
    assert Chains((2, 2)).kv_head_map(2) == (0, 0, 1, 1)
    assert Chains((2, 2)).kv_head_map(2, chain=0) == (0, 0)
    assert Chains((2, 2)).kv_head_counts(2) == (1, 1)
    # Shared KV: `tile` is j mod n_kv; `chain_group` is GQA inside each chain.
    c = Chains((4, 4))
    assert c.kv_head_map(2, kv_sharing=True, kv_mapping="tile") == (0, 1, 0, 1, 0, 1, 0, 1)
    assert c.kv_head_map(2, kv_sharing=True, kv_mapping="chain_group") == (0, 0, 1, 1, 0, 0, 1, 1)
    assert c.kv_head_map(2, kv_sharing=True, kv_mapping="chain_group", chain=0) == (0, 0, 1, 1)


def test_shards_split_every_chain_evenly():
    # tensor parallelism: rank r holds the r-th of `world` equal pieces of every chain's segment
    c = Chains((2, 2, 4))
    assert c.shard_widths(32, 2) == (4, 4, 8)
    assert c.shard_ranges(32, 2, 0) == ((0, 4), (8, 12), (16, 24))
    assert c.shard_ranges(32, 2, 1) == ((4, 8), (12, 16), (24, 32))
    assert c.shard_widths(8, 2, name="n_heads") == (1, 1, 2)
    assert Chains((3,)).shard_ranges(9, 3, 2) == ((6, 9),)


@pytest.mark.parametrize("call, match", [
    (lambda: Chains((1, 1, 2)).shard_widths(4, 2, name="n_heads", world_name="tensor_parallel_degree"),
     r"tensor_parallel_degree=2 must divide every chain's width of n_heads=4 .* not divisible: \[1, 1\]"),
    (lambda: Chains((1, 1)).shard_widths(8, 0), r"world must be a positive int"),
    (lambda: Chains((1, 1)).shard_ranges(8, 2, 2), r"rank must be an int in \[0, 1\]"),
    (lambda: Chains(()), r"chains must be a non-empty tuple"),
    (lambda: Chains((1, 0)), r"positive"),
    (lambda: Chains((1, -2)), r"positive"),
    (lambda: Chains((1, 1)).widths(3), r"dim=3 cannot be split exactly by chains=\(1, 1\)"),
    (lambda: Chains((1, 2)).widths(4), r"dim=4 cannot be split exactly"),
    (lambda: Chains((1, 2)).check_chain(2), r"chain=2 is out of range for chains=\(1, 2\)"),
    (lambda: Chains((1, 2)).check_chain(-1), r"chain=-1 is out of range"),
    (lambda: Chains((1, 2)).check_heads(4), r"n_heads=4 must equal sum\(chains\)=3"),
    (lambda: Chains((1, 3)).kv_head_counts(2), r"n_kv_heads=2 cannot be split exactly"),
    (lambda: Chains((2, 1)).check_kv_sharing(2), r"multiple of n_kv_heads=2; chains=\(2, 1\) has \[1\]"),
    (lambda: Chains((2, 2)).kv_head_map(2, kv_sharing=True, kv_mapping="repeat"), r"kv_mapping must be one of"),
    (lambda: Chains((1, 2)).scale_of_width(5, 12), r"x.shape\[-1\]=5 is not a prefix width"),
])
def test_bad_values_raise_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", [3, "12", (1, 1.5), (True, 1), None])
def test_bad_types_raise_type_error(bad):
    with pytest.raises(TypeError, match="chains must"):
        Chains(bad)


def test_immutable_hashable_and_equal_to_its_tuple():
    c = Chains((1, 2))
    with pytest.raises(AttributeError, match="immutable"):
        c.sizes = (3,)
    assert c == (1, 2) and c == Chains([1, 2]) and c != Chains((2, 1))
    assert len({c, Chains((1, 2))}) == 1
    assert as_chains(c) is c and as_chains([1, 2]) == c


def test_copy_deepcopy_and_pickle():
    # Modules hold a Chains: deepcopy (EMA copies, FSDP2 set-up) and pickling must keep working.
    c = Chains((1, 2, 1))
    assert copy.copy(c) is c and copy.deepcopy(c) is c
    restored = pickle.loads(pickle.dumps(c))
    assert restored == c and restored.offsets(8) == (0, 2, 6, 8)
