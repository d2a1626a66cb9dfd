"""The key/value cache: preallocated per layer, with the ids it holds, so a new prompt that
starts like the previous conversation reuses the cached prefix instead of recomputing it."""
from __future__ import annotations

import numpy as np

KV_DTYPES = {"f32": np.float32, "f16": np.float16}


class ContextFull(ValueError):
    """The prompt plus the tokens to generate do not fit in the cache."""


class KVCache:
    """K and V of every layer: (num_layers, max_seq_len, num_kv_heads, head_dim) each.

    np.zeros maps fresh pages lazily, so a long context costs memory only as it fills.

    >>> cache = KVCache(num_layers=2, max_seq_len=16, num_kv_heads=1, head_dim=8)
    >>> cache.k.shape, cache.length
    ((2, 16, 1, 8), 0)
    """

    def __init__(self, num_layers: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: str = "f32"):
        if dtype not in KV_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {sorted(KV_DTYPES)}, got {dtype!r}")
        shape = (num_layers, max_seq_len, num_kv_heads, head_dim)
        self.k = np.zeros(shape, KV_DTYPES[dtype])
        self.v = np.zeros(shape, KV_DTYPES[dtype])
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.token_ids: list[int] = []  # the tokens whose keys and values are at positions 0..length-1
        self.images: list = []  # the ImageSpans (runtime/image_prompt.py) among those positions, in order
        self.long_rope = False  # its keys were rotated with LongRoPE's long factors (Transformer.run)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reusable_prefix(self, ids: list[int], images=()) -> int:
        """How many leading tokens of `ids` (holding the ImageSpans `images`) are already cached;
        at least one token is always left to compute, because its logits are needed. Image soft
        tokens share one id: a picture counts as cached only where the cache holds the same one
        (same key) at the same positions, and the prefix never ends inside a picture (its tokens
        attend to each other, so they are computed together)."""
        limit = min(len(self.token_ids), len(ids) - 1)
        n = 0
        while n < limit and self.token_ids[n] == ids[n]:
            n += 1
        in_both = set(self.images) & set(images)   # the same picture at the same positions
        for span in [*self.images, *images]:
            if span.begin < n and (span not in in_both or span.end > n):
                n = span.begin
        return n

    def truncate(self, length: int):
        """Forget everything from position `length` on."""
        del self.token_ids[length:]
        self.images = [span for span in self.images if span.end <= length]

    def check_room(self, needed: int):
        if needed > self.max_seq_len:
            raise ContextFull(f"{needed} tokens do not fit in the context of {self.max_seq_len} tokens; "
                              f"shorten the prompt, lower max_new_tokens, or load with a larger max_seq_len")
