"""``CoLMCache``: the KV cache ``CoLMForCausalLM`` hands to ``generate``, a ``transformers.Cache``.

Per layer it holds ``(batch, capacity, heads, head_dim)`` keys and values, the layout the kernels
read, with each sequence's tokens packed from slot 0 (masked prompt tokens are never stored) and its
own length in ``seq_lengths``: a left-padded batch decodes exactly as each prompt alone would.

It holds only the kv heads the scale reads: without KV sharing the kv heads of chains
``0..chain`` of the first call's scale (a later call at a larger scale raises ``ValueError``: earlier
positions lack those chains' kv heads, the rule ``CoLM.generate`` follows too); with KV sharing
(CoLM-Air) the shared kv heads, once, complete at every scale.

``get_seq_length()`` counts input columns seen (masked ones too), which is what ``generate`` slices
its ``input_ids`` by; ``seq_lengths`` counts the tokens stored per sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ...chains import Chains
from ..ragged import RaggedLayout


class CoLMCacheLayer(CacheLayerMixin):
    """One layer's buffers. Written only through ``CoLMCache.write`` (per-sequence slots); the
    generic ``update`` (one length for the whole batch, ``(B, H, S, D)`` layout) does not apply."""

    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "CoLMCache"):
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise NotImplementedError("CoLMCache allocates its buffers in CoLMCache.write")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise NotImplementedError(
            "CoLMCache is written by CoLMForCausalLM (CoLMCache.write, one length per sequence); "
            "the (B, H, S, D) update of transformers' attention layers does not apply to it"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner.columns

    def get_max_length(self) -> int:
        return -1

    def _apply(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)


class CoLMCache(Cache):
    def __init__(self, num_layers: int, *, kv_sharing: bool, chains):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        super().__init__(layers=[CoLMCacheLayer(self) for _ in range(num_layers)])
        self.kv_sharing = bool(kv_sharing)
        self.chains = Chains(chains)
        self.columns = 0
        self.seq_lengths: Optional[Tensor] = None  # (batch,) int32 tokens stored per sequence
        self.complete_chain: Optional[int] = None  # smallest scale any stored position was computed at

    @classmethod
    def for_model(cls, config) -> "CoLMCache":
        """An empty cache for a ``CoLMHFConfig``."""
        return cls(config.num_hidden_layers, kv_sharing=config.kv_sharing, chains=config.chains)

    # -- what CoLMForCausalLM calls ---------------------------------------------------------
    def past_lengths(self, batch: int) -> Optional[Tensor]:
        if self.seq_lengths is None:
            return None
        if self.seq_lengths.shape[0] != batch:
            raise ValueError(
                f"cache holds {self.seq_lengths.shape[0]} sequences but input_ids has batch {batch}"
            )
        return self.seq_lengths

    def check_scale(self, chain: int) -> None:
        if self.kv_sharing or self.complete_chain is None or chain <= self.complete_chain:
            return
        raise ValueError(
            f"chain={chain} needs the kv heads of chains 0..{chain}, but cached positions were "
            f"computed at scale {self.complete_chain}: without kv_sharing the KV cache would be incomplete"
        )

    def write(self, layer: int, keys: Tensor, values: Tensor, layout: RaggedLayout,
              chain: int) -> tuple[Tensor, Tensor]:
        """Store the packed new K/V ``(T, heads, hd)`` at each token's slot; return the layer's
        ``(batch, capacity, heads_held, hd)`` buffers (grown when the longest sequence needs it)."""
        self.check_scale(chain)
        lay = self.layers[layer]
        heads = keys.shape[1]
        if not lay.is_initialized or lay.keys.shape[1] < layout.max_total:
            old = lay.keys if lay.is_initialized else None
            capacity = max(layout.max_total, 2 * old.shape[1] if old is not None else 0)
            held = heads if old is None else old.shape[2]
            shape = (layout.rows, capacity, held, keys.shape[2])
            new_k = keys.new_zeros(shape)
            new_v = values.new_zeros(shape)
            if old is not None:
                new_k[:, : old.shape[1]] = old
                new_v[:, : old.shape[1]] = lay.values
            lay.keys, lay.values, lay.is_initialized = new_k, new_v, True
            lay.device = keys.device
        if heads > lay.keys.shape[2]:  # unreachable after check_scale; a wrong cache would be silent
            raise ValueError(f"chain={chain} writes {heads} kv heads but the cache holds {lay.keys.shape[2]}")
        lay.keys[layout.seq_id, layout.slot, :heads] = keys
        lay.values[layout.seq_id, layout.slot, :heads] = values
        return lay.keys, lay.values

    def advance(self, layout: RaggedLayout, chain: int) -> None:
        """Called once per model call, after every layer has written."""
        self.columns += layout.cols
        self.seq_lengths = layout.past_lens + layout.new_lens
        if not self.kv_sharing:
            self.complete_chain = chain if self.complete_chain is None else min(self.complete_chain, chain)

    # -- what generate calls -------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def _batch_apply(self, fn) -> None:
        for lay in self.layers:
            lay._apply(fn)
        if self.seq_lengths is not None:
            self.seq_lengths = fn(self.seq_lengths)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._batch_apply(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CoLMCache cannot be cropped (assisted decoding is not supported)")

    def reset(self) -> None:
        for lay in self.layers:
            lay.keys = lay.values = None
            lay.is_initialized = False
        self.columns = 0
        self.seq_lengths = None
        self.complete_chain = None

    @property
    def held_kv_heads(self) -> Optional[int]:
        """kv heads stored per position (None before the first write)."""
        lay = self.layers[0]
        return lay.keys.shape[2] if lay.is_initialized else None
