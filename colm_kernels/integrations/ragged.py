"""The ragged-batch machinery lives in ``colm_kernels.models.ragged`` (``CoLM.generate`` runs on
it too); this name stays for the integrations that import it from here."""
from ..models.ragged import (
    PackedKVCache, RaggedCache, RaggedLayout, decode_layout, ragged_attention, ragged_hidden, ragged_layout,
    rope_table,
)

__all__ = ["PackedKVCache", "RaggedCache", "RaggedLayout", "decode_layout", "ragged_attention", "ragged_hidden",
           "ragged_layout", "rope_table"]
