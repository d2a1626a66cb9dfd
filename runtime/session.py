"""Sessions: one conversation's generation state (its KV cache and the token ids it holds), kept
apart from the model's weights so that several conversations can share one loaded model.

The lock story, in one place:
- A Session serves one generation at a time. A second generation on a session that is in use
  (from another thread, or while an unfinished stream holds it) raises RuntimeError at once:
  it never waits, and never interleaves two histories in one cache.
- Different sessions of one Model may generate in different threads. Their forward passes run
  one at a time: the decoder stack's scratch memory is shared, so `Transformer.run` holds the
  transformer's lock for each call; between forwards (sampling, decoding text) threads overlap.
  Sessions submitted to one BatchEngine (runtime/batch.py; `Model.stream(..., batch=)`) instead
  advance together in one batched forward; the engine holds each from submit to its last token.

A session saves to a blob file (`save`) and a Model maps one back (`Model.load_session`): the
filled KV rows, the token ids, and a fingerprint of the model that computed them, checked on load.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from ..errors import FormatError, InvalidTensor
from ..reader import open as open_blob
from ..writer import BlobWriter
from .image_prompt import ImageSpan
from .kv_cache import ContextFull, KVCache

SESSION_VERSION = 1


class SessionMismatch(ValueError):
    """A saved session does not belong to this model (another file, config or KV dtype)."""


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

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "manifest_crc32c": self.manifest_crc32c}

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

    def reusable_prefix(self, ids, images=()) -> int:
        """How many leading tokens of `ids` (holding the ImageSpans `images`) this session's cache
        already holds (one is always left to compute, since its logits are needed)."""
        return self.cache.reusable_prefix(list(ids), images)

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

    # ---- on disk ----

    def save(self, path):
        """Write the session to a blob file: the KV rows filled so far (not the whole preallocated
        cache), the token ids, and the fingerprint of the model (docs/FORMAT.md §6.3, `session`).
        The write is atomic (BlobWriter), so an interrupted save leaves the old file in place.

        >>> session.save("system-prompt.session")      # doctest: +SKIP
        """
        with self.in_use():
            n = self.cache.length
            with BlobWriter(path) as writer:
                writer.add("session.k", self.cache.k[:, :n], component="session")
                writer.add("session.v", self.cache.v[:, :n], component="session")
                writer.add("session.token_ids", np.asarray(self.token_ids, np.int32), component="session")
                writer.metadata["session"] = {
                    "version": SESSION_VERSION, "tokens": n, "kv_dtype": self.kv_dtype,
                    "long_rope": self.cache.long_rope, "model_file": self.model.to_json(),
                    "model": dict(self.model.config)}
                if self.cache.images:   # which picture each image token run holds, for prefix reuse
                    writer.metadata["session"]["images"] = [[s.begin, s.end, s.key] for s in self.cache.images]


def load_session(path, model: ModelFingerprint, *, max_seq_len: int, kv_dtype: str) -> Session:
    """A Session read back from `path` (written by Session.save) for the model of `model`.

    The file is validated as any blob file, every blob's CRC32C included (FormatError); a session
    of another model or KV dtype is SessionMismatch, naming the file and what differs.
    """
    with open_blob(path, verify="full") as reader:
        saved = _session_metadata(reader)
        file = saved["model_file"]
        fingerprint = ModelFingerprint(file["name"], file["size"], file["manifest_crc32c"], saved["model"])
        differences = model.differences(fingerprint)
        if saved["kv_dtype"] != kv_dtype:
            differences.append(f"KV cache dtype {kv_dtype} vs {saved['kv_dtype']} (pass kv_dtype= to choose)")
        if differences:
            raise SessionMismatch(f"{reader.path}: this session was saved from another model "
                                  f"({fingerprint.name}, not {model.name}); this model vs the session's: "
                                  + "; ".join(differences))
        n = saved["tokens"]
        if n > max_seq_len:
            raise ContextFull(f"{reader.path}: the session holds {n} tokens, more than the context of "
                              f"{max_seq_len} tokens; load it with a larger max_seq_len")
        config = model.config
        cache = KVCache(config["num_layers"], max_seq_len, config["num_kv_heads"], config["head_dim"], kv_dtype)
        rows = (config["num_layers"], n, config["num_kv_heads"], config["head_dim"])
        cache.k[:, :n] = _tensor(reader, "session.k", rows, cache.k.dtype)
        cache.v[:, :n] = _tensor(reader, "session.v", rows, cache.v.dtype)
        token_ids = _tensor(reader, "session.token_ids", (n,), np.int32)
        if n and not 0 <= token_ids.min() <= token_ids.max() < config["vocab_size"]:
            raise InvalidTensor(f"{reader.path}: tensor 'session.token_ids': ids must be in 0..{config['vocab_size'] - 1}, "
                                f"found {token_ids.min()}..{token_ids.max()}")
        cache.token_ids.extend(token_ids.tolist())
        cache.images.extend(_images(reader.path, saved.get("images", []), n))
        cache.long_rope = saved["long_rope"]
    return Session(cache, model)


def _session_metadata(reader) -> dict:
    saved = reader.metadata.get("session")
    if not isinstance(saved, dict):
        raise FormatError(f"{reader.path}: not a session file (its metadata has no 'session' section; "
                          f"a session file is written by Session.save or blob-run --prompt-cache)")
    expected = {"version": int, "tokens": int, "kv_dtype": str, "long_rope": bool, "model_file": dict, "model": dict}
    _check_fields(reader.path, "session", saved, expected)
    _check_fields(reader.path, "session.model_file", saved["model_file"], {"name": str, "size": int, "manifest_crc32c": int})
    if saved["version"] != SESSION_VERSION:
        raise FormatError(f"{reader.path}: session version {saved['version']}; this runtime reads version "
                          f"{SESSION_VERSION}")
    return saved


def _images(path, saved, tokens: int) -> list[ImageSpan]:
    """The session's pictures: [begin, end, key] each, sorted, disjoint, inside its tokens."""
    spans, previous_end = [], 0
    for entry in saved if isinstance(saved, list) else [saved]:
        if not (isinstance(entry, list) and len(entry) == 3 and all(type(v) is int for v in entry[:2])
                and isinstance(entry[2], str) and previous_end <= entry[0] < entry[1] <= tokens):
            raise FormatError(f"{path}: metadata field session.images: expected sorted [begin, end, key] entries "
                              f"inside the {tokens} tokens, found {entry!r}")
        spans.append(ImageSpan(*entry))
        previous_end = entry[1]
    return spans


def _check_fields(path, section: str, values: dict, expected: dict):
    for key, kind in expected.items():
        if not isinstance(values.get(key), kind):
            raise FormatError(f"{path}: metadata field {section}.{key}: expected a {kind.__name__}, "
                              f"found {values.get(key)!r}")


def _tensor(reader, name: str, shape: tuple, dtype) -> np.ndarray:
    """The view of tensor `name`, checked to hold `shape` values of `dtype`."""
    info = reader.info(name)
    if info.shape != shape or info.dtype.is_quantized or info.dtype.numpy != np.dtype(dtype):
        raise InvalidTensor(f"{reader.path}: tensor {name!r}: expected {np.dtype(dtype)} {list(shape)}, "
                            f"found {info.dtype.label} {list(info.shape)}")
    return reader[name]
