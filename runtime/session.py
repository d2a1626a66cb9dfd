"""Sessions: one conversation's generation state (its KV cache and the token ids it holds), kept
apart from the model's weights so that several conversations can share one loaded model.

The lock story, in one place:
- A Session serves one generation at a time. A second generation on a session that is in use
  (from another thread, or while an unfinished stream holds it) raises RuntimeError at once:
  it never waits, and never interleaves two histories in one cache.
- Different sessions of one Model may generate in different threads. Their forward passes run
  one at a time: the decoder stack's scratch memory is shared, so `Transformer.run` holds the
  transformer's lock for each call; between forwards (sampling, decoding text) threads overlap.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Mapping

from .kv_cache import KVCache


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies the model a KV cache was computed with: the model file's size and manifest
    CRC32C (the manifest lists every tensor's CRC32C, so it changes with any weight) and its config.
    Cheap: read from the validated header, nothing is hashed again.

    >>> ModelFingerprint.of(reader).differences(ModelFingerprint.of(other_reader))   # doctest: +SKIP
    ['model file size 4587520 vs 3997696', ...]
    """

    name: str            # the model file's name, for messages only (a renamed copy is the same model)
    size: int
    manifest_crc32c: int
    config: Mapping

    @classmethod
    def of(cls, reader) -> "ModelFingerprint":
        return cls(os.path.basename(reader.path), reader.header.file_size, reader.header.manifest_crc32c,
                   reader.metadata["model"])

    def differences(self, other: "ModelFingerprint") -> list[str]:
        """What differs between the model of `self` and that of `other`, as "what: ours vs theirs"."""
        found = []
        if self.size != other.size:
            found.append(f"model file size {self.size} vs {other.size}")
        if self.manifest_crc32c != other.manifest_crc32c:
            found.append(f"manifest CRC32C {self.manifest_crc32c:08x} vs {other.manifest_crc32c:08x}")
        keys = sorted(set(self.config) | set(other.config))
        found += [f"config {key}: {self.config.get(key)!r} vs {other.config.get(key)!r}"
                  for key in keys if self.config.get(key) != other.config.get(key)]
        return found


class Session:
    """One conversation: its KV cache (`cache`) and the token ids the cache holds. Make one with
    `model.new_session()`; pass it to generate / stream / chat. See the module docstring for
    which uses may run at the same time.

    >>> session = model.new_session(max_seq_len=2048)                          # doctest: +SKIP
    >>> model.chat(messages, session=session).stats.reused_prompt_tokens       # doctest: +SKIP
    0
    """

    def __init__(self, cache: KVCache, model: ModelFingerprint):
        self.cache = cache
        self.model = model
        self._in_use = threading.Lock()

    @property
    def token_ids(self) -> list[int]:
        return self.cache.token_ids

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def kv_dtype(self) -> str:
        return self.cache.dtype

    def reusable_prefix(self, ids) -> int:
        """How many leading tokens of `ids` this session's cache already holds (one is always
        left to compute, since its logits are needed)."""
        return self.cache.reusable_prefix(list(ids))

    @contextlib.contextmanager
    def in_use(self) -> Iterator["Session"]:
        """Hold the session for one generation; RuntimeError when another generation holds it."""
        if not self._in_use.acquire(blocking=False):
            raise RuntimeError("this session is generating in another thread (or an unfinished stream holds "
                               "it); a session serves one generation at a time: make another with "
                               "model.new_session()")
        try:
            yield self
        finally:
            self._in_use.release()
