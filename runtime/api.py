"""The public Model: load() a blob file, then forward / generate / stream / chat."""
from __future__ import annotations

import functools
import os
import sys
import threading
import time
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import FormatError
from ..reader import open as open_blob
from . import chat as chat_templates
from . import demo, kernels
from .generate import GenerationChunk, GenerationResult, LogitsProcessor, stream
from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer

KV_CACHE_RAM_SHARE = 8  # by default the KV cache may use at most 1/8 of the machine's memory


def load(path=None, *, threads: int | None = None, max_seq_len: int | None = None, kv_dtype: str = "f32",
         verbose: bool = False) -> "Model":
    """Map a blob file and get a model ready to run: the file is validated, every tensor the
    architecture needs is checked, and no weight is copied. Without a path, the built-in demo
    model (see blobstore.runtime.demo) is loaded, and a notice on stderr says so.

    >>> model = load("gemma-3-270m.blob")                         # doctest: +SKIP
    >>> model.generate("The capital of France is", max_new_tokens=8).text   # doctest: +SKIP
    """
    started = time.perf_counter()
    if path is None:
        path = demo.demo_path()
        print(demo.NOTICE, file=sys.stderr)
    if threads is not None:
        kernels.set_threads(threads)
    reader = open_blob(path)
    try:
        model = Model(reader, max_seq_len=max_seq_len, kv_dtype=kv_dtype)
    except BaseException:
        reader.close()
        raise
    if verbose:
        info = kernels.cpu_info()
        print(f"Loaded {os.fspath(path)} in {(time.perf_counter() - started) * 1000:.1f} ms "
              f"({model.config.arch}, {info['isa']} kernels, {kernels.get_threads()} threads, "
              f"context {model.cache.max_seq_len})", file=sys.stderr)
    return model


class Model:
    """A loaded model. Generation state (the KV cache) is shared by calls, which run one at a time."""

    def __init__(self, reader, *, max_seq_len: int | None = None, kv_dtype: str = "f32"):
        if "model" not in reader.metadata:
            raise FormatError(f"{reader.path}: no model config in the metadata; was it written by blob-pack convert?")
        self.reader = reader
        self.config = ModelConfig.from_dict(reader.metadata["model"])
        self.transformer = Transformer(reader, self.config)
        self.tokenizer_info = reader.metadata.get("tokenizer", {})
        if "tokenizer.model" not in reader and "tokenizer.json" not in reader:
            raise FormatError(f"{reader.path}: no tokenizer in the file (expected a tokenizer.model or "
                              f"tokenizer.json blob)")
        self.generation_config = reader.metadata.get("source", {}).get("generation_config") or {}
        self.max_seq_len = _context_length(self.config, max_seq_len, kv_dtype)
        self.cache = KVCache(self.config.num_layers, self.max_seq_len, self.config.num_kv_heads,
                             self.config.head_dim, kv_dtype)
        self._lock = threading.Lock()

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The packed tokenizer, built on first use: parsing a 262k-piece SentencePiece model takes
        30 ms, which a caller that only runs token ids never pays."""
        return _tokenizer(self.reader, self.tokenizer_info)

    # ---- numbers ----

    @functools.cached_property
    def decodable_vocab_size(self) -> int:
        """How many of the logit rows generation may pick: the embedding rows the tokenizer has
        entries for. Checkpoints often pad the embedding past the tokenizer (Gemma 3: 262,208
        rows for 262,144 pieces, Qwen2.5: 151,936 for 151,665); the rows past it are never sampled.

        >>> model.config.vocab_size, model.decodable_vocab_size   # doctest: +SKIP
        (262208, 262144)
        """
        return min(self.config.vocab_size, self.tokenizer.vocab_size)

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), config.vocab_size) at every position, from an empty cache
        (of the model's KV dtype): every row, padding rows included, as transformers returns
        them. The generation state is left alone.

        >>> model.forward(model.tokenizer.encode("Hello")).shape   # doctest: +SKIP
        (2, 262144)
        """
        ids = self._check_ids(ids, self.config.vocab_size)
        scratch = KVCache(self.config.num_layers, max(len(ids), 1), self.config.num_kv_heads,
                          self.config.head_dim, self.cache.dtype)
        with self._lock:
            return self.transformer.run(ids, scratch, start=0, all_logits=True)

    # ---- text ----

    def generate(self, prompt, **options) -> GenerationResult:
        """Generate a completion of `prompt` (a str, or a list of token ids used as given).

        Options: max_new_tokens=256, temperature, top_k, top_p, min_p, repetition_penalty (defaults
        from the model's generation_config; temperature 0 is greedy), seed, stop (strings), ignore_eos.
        A str is encoded with the tokenizer's BOS setting, and no second BOS is added to text
        that starts with one (such as apply_chat_template's output). Only ids the tokenizer can
        decode are sampled (see decodable_vocab_size). The result's finish_reason is "stop" or
        "length"; `stats.context_full` tells a full context (max_seq_len) from max_new_tokens.

        >>> model.generate("The sky is", max_new_tokens=8, temperature=0).finish_reason   # doctest: +SKIP
        'length'
        """
        texts, ids = [], []
        for chunk in self.stream(prompt, **options):
            texts.append(chunk.text)
            if chunk.token_id is not None:
                ids.append(chunk.token_id)
            last = chunk
        return GenerationResult("".join(texts), ids, last.finish_reason, last.stats)

    def stream(self, prompt, *, max_new_tokens: int = 256, temperature=None, top_k=None, top_p=None, min_p=None,
               repetition_penalty=None, seed: int | None = None, stop: Sequence[str] | None = None,
               ignore_eos: bool = False, logits_processor: LogitsProcessor | None = None) -> Iterator[GenerationChunk]:
        """Like generate(), one GenerationChunk per token; breaking out of the loop cancels.
        `ignore_eos` keeps generating past end-of-sequence tokens (for benchmarks and tests).
        `logits_processor(generated_ids, logits)` returns the logits each token is sampled from
        (logits of the decodable vocabulary; -inf forbids a token), e.g. a grammar's mask.

        >>> no_e = lambda ids, logits: np.where(np.arange(logits.size) == 5, -np.inf, logits)  # doctest: +SKIP
        >>> 5 in model.generate("Hi", max_new_tokens=8, logits_processor=no_e).token_ids  # doctest: +SKIP
        False
        """
        params = SamplingParams.from_generation_config(
            self.generation_config, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty)
        ids = self._check_ids(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt,
                              self.decodable_vocab_size)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this model is generating in another thread; use one Model per thread "
                               "or wait for that generation to finish")
        try:
            yield from stream(self, ids, params, max_new_tokens=max_new_tokens, seed=seed, stop=list(stop or ()),
                              stop_ids=frozenset() if ignore_eos else self._stop_ids(),
                              logits_processor=logits_processor)
        finally:
            self._lock.release()

    def chat(self, messages: Sequence[Mapping], *, stream: bool = False, tools: Sequence[Mapping] | None = None,
             documents: Sequence[Mapping] | None = None, chat_template_kwargs: Mapping | None = None, **options):
        """Answer a conversation ([{"role": ..., "content": ...}]) using the model's chat template.

        `tools`, `documents` and `chat_template_kwargs` (e.g. {"enable_thinking": False}) go to the
        template as in apply_chat_template; the other options are generate()'s. Returns a
        GenerationResult, or an iterator of GenerationChunk with stream=True. The cached prefix
        of the previous turn is reused, so a long conversation is not recomputed each turn.

        >>> model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=16).text   # doctest: +SKIP
        """
        text = self.apply_chat_template(messages, tools=tools, documents=documents, **(chat_template_kwargs or {}))
        prompt = self.tokenizer.encode(text, add_bos=False)  # the template writes BOS where the model wants it
        return self.stream(prompt, **options) if stream else self.generate(prompt, **options)

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
                            **template_kwargs) -> str:
        """The prompt text the chat template renders for `messages` (BOS included when the template
        writes it), as transformers' apply_chat_template(..., tokenize=False) renders it.

        `tools` are JSON-schema dicts (OpenAI's function format); transformers would also turn
        Python functions into such dicts (its get_json_schema), which this does not. `documents`
        and `template_kwargs` (enable_thinking, ...) are passed to the template as they are.

        >>> model.apply_chat_template([{"role": "user", "content": "Hi"}])   # doctest: +SKIP
        '<bos><start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
        """
        return chat_templates.render(self._chat_template(), messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self._token_text(self.tokenizer.bos_id),
                                     eos_token=self._token_text(self.tokenizer.eos_id),
                                     tools=tools, documents=documents, **template_kwargs)

    # ---- helpers ----

    def _chat_template(self) -> str:
        if self.tokenizer_info.get("chat_template"):
            return self.tokenizer_info["chat_template"]
        llama3_marker = "<|start_header_id|>"  # the only way to tell a Llama 3 from a Llama 2
        vocabulary = [llama3_marker] if self.tokenizer.token_to_id(llama3_marker) is not None else []
        return chat_templates.builtin_template(self.config.arch.lower(), vocabulary)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.id_to_token(token_id)

    def _stop_ids(self) -> frozenset[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        for marker in chat_templates.end_of_turn_tokens(self._chat_template()):
            token = self.tokenizer.token_to_id(marker)
            if token is not None:
                ids.add(token)
        return frozenset(ids)

    @staticmethod
    def _check_ids(ids, limit: int) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < limit]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{limit - 1})")
        return ids

    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _tokenizer(reader, info: Mapping) -> Tokenizer:
    """The tokenizer packed in the file: tokenizer.model (SentencePiece) or tokenizer.json."""
    add_bos = info.get("add_bos")
    if "tokenizer.model" in reader:
        return Tokenizer.from_sentencepiece(reader.file_bytes("tokenizer.model"), add_bos=add_bos)
    eos_ids = info.get("eos_ids") or [None]
    return Tokenizer.from_json(reader.file_bytes("tokenizer.json"), bos_token=info.get("bos_id"),
                               eos_token=eos_ids[0], add_bos=add_bos)


def _context_length(config: ModelConfig, requested: int | None, kv_dtype: str) -> int:
    """The KV cache length: as requested, else the model's context capped to a share of RAM."""
    if requested is not None:
        if requested <= 0:
            raise ValueError(f"max_seq_len must be positive, got {requested}")
        return requested
    bytes_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * (4 if kv_dtype == "f32" else 2)
    budget = _total_memory() // KV_CACHE_RAM_SHARE // bytes_per_token
    length = min(config.max_position_embeddings, max(budget, 1))
    if length < config.max_position_embeddings:
        print(f"blobstore: context capped to {length} of the model's {config.max_position_embeddings} tokens "
              f"so the KV cache fits in 1/{KV_CACHE_RAM_SHARE} of RAM; pass max_seq_len to choose",
              file=sys.stderr)
    return length


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # platforms without sysconf (Windows): assume a modest laptop
