"""``chain_attention_decode``: chain attention of a few new tokens over a KV cache (flash-decoding)."""
