"""The public Model: load() a blob file, then forward / generate / stream / chat."""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
import weakref
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import FormatError
from ..reader import open as open_blob
from . import chat as chat_templates
from . import demo, kernels
from . import generate as layers
from . import image_prompt
from .generate import GenerationChunk, GenerationResult
from .image_prompt import ImageEncoder, ImageSpan, ImageTokens
from .images import PanAndScan
from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams
from .session import ModelFingerprint, Session, load_session
from .speculative import DraftModel, FirstOf, PromptLookup
from .tokenizer import Tokenizer
from .tool_calls import ToolCallFormat, format_for_template

KV_CACHE_RAM_SHARE = 8  # by default the KV cache may use at most 1/8 of the machine's memory
DEFAULT_DRAFT_TOKENS = 4  # tokens a draft model proposes per verify forward unless draft_tokens= says


class VocabularyMismatch(ValueError):
    """A draft model whose vocabulary is not the model's: its tokens would mean other text."""


def load(path=None, *, threads: int | None = None, max_seq_len: int | None = None, kv_dtype: str = "f32",
         verbose: bool = False, draft=None) -> "Model":
    """Map a blob file and get a model ready to run: the file is validated, every tensor the
    architecture needs is checked, and no weight is copied. Without a path, the built-in demo
    model (see blobstore.runtime.demo) is loaded, and a notice on stderr says so.

    `draft` (a blob file, or a loaded Model) is a smaller model of the same vocabulary for
    speculative decoding: generate / stream / chat then let it propose `draft_tokens` tokens per
    forward of this model (see runtime/speculative.py); the output stays this model's. A draft
    of another vocabulary raises VocabularyMismatch.

    >>> model = load("gemma-3-270m.blob")                         # doctest: +SKIP
    >>> model.generate("The capital of France is", max_new_tokens=8).text   # doctest: +SKIP
    >>> big = load("gemma-3-4b.blob", draft="gemma-3-270m.blob")   # doctest: +SKIP
    """
    started = time.perf_counter()
    if path is None:
        path = demo.demo_path()
        print(demo.NOTICE, file=sys.stderr)
    if threads is not None:
        kernels.set_threads(threads)
    draft_model = _draft(draft, kv_dtype)
    reader = open_blob(path)
    try:
        model = Model(reader, max_seq_len=max_seq_len, kv_dtype=kv_dtype, draft=draft_model,
                      close_draft=draft_model is not draft)
    except BaseException:
        reader.close()
        if draft_model is not draft:
            draft_model.close()
        raise
    if verbose:
        info = kernels.cpu_info()
        drafting = f", draft {os.path.basename(model.draft.reader.path)}" if model.draft is not None else ""
        print(f"Loaded {os.fspath(path)} in {(time.perf_counter() - started) * 1000:.1f} ms "
              f"({model.config.arch}, {info['isa']} kernels, {kernels.get_threads()} threads, "
              f"context {model.max_seq_len}{drafting})", file=sys.stderr)
    return model


def _draft(draft, kv_dtype: str) -> "Model | None":
    """The draft Model for load(draft=): as given, or mapped from a path (its own sessions unused:
    a tiny context)."""
    if draft is None or isinstance(draft, Model):
        return draft
    reader = open_blob(draft)
    try:
        return Model(reader, max_seq_len=1, kv_dtype=kv_dtype)
    except BaseException:
        reader.close()
        raise


class Model:
    """A loaded model: the weights, the tokenizer, and a built-in default Session (`model.session`)
    that generate / stream / chat use unless given another. Which calls may run at the same time:
    see runtime/session.py (a session: one generation at a time; sessions: a forward at a time)."""

    def __init__(self, reader, *, max_seq_len: int | None = None, kv_dtype: str = "f32", draft: "Model | None" = None,
                 close_draft: bool = False):
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
        self.fingerprint = ModelFingerprint.of(reader)
        self.kv_dtype = kv_dtype
        self.max_seq_len = _context_length(self.config, max_seq_len, kv_dtype)
        self.session = self.new_session()
        self.draft = draft   # a Model of the same vocabulary for speculative decoding, or None
        self._close_draft = close_draft   # load() mapped it: close() closes it too
        self._draft_caches = weakref.WeakKeyDictionary()   # session -> the draft model's KV cache for it
        if draft is not None:
            check_same_vocabulary(self, draft)
        self.image_encoder = ImageEncoder(reader)   # builds the vision tower when the first image comes

    @property
    def cache(self) -> KVCache:
        """The default session's KV cache."""
        return self.session.cache

    # ---- sessions ----

    def new_session(self, max_seq_len: int | None = None, kv_dtype: str | None = None) -> Session:
        """A new conversation with its own KV cache (of `max_seq_len` tokens, default the model's
        context; `kv_dtype` "f32" or "f16", default the model's). Its memory is mapped lazily,
        as it fills.

        >>> session = model.new_session(max_seq_len=4096)                          # doctest: +SKIP
        >>> model.generate("Hello", session=session, max_new_tokens=8).text      # doctest: +SKIP
        """
        length = self._session_length(max_seq_len, kv_dtype)
        cache = KVCache(self.config.num_layers, length, self.config.num_kv_heads, self.config.head_dim,
                        kv_dtype or self.kv_dtype)
        return Session(cache, self.fingerprint)

    def load_session(self, path, *, max_seq_len: int | None = None, kv_dtype: str | None = None) -> Session:
        """A session saved by Session.save (or blob-run --prompt-cache), mapped back: the file is
        validated like any blob file and every blob's CRC32C checked (FormatError); a session of
        another model, config or KV dtype (default the model's) raises SessionMismatch naming the
        file and what differs. `max_seq_len` as new_session's.

        >>> session = model.load_session("system-prompt.session")                 # doctest: +SKIP
        >>> model.chat(messages, session=session).stats.reused_prompt_tokens      # doctest: +SKIP
        1999
        """
        length = self._session_length(max_seq_len, kv_dtype)
        return load_session(path, self.fingerprint, max_seq_len=length, kv_dtype=kv_dtype or self.kv_dtype)

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

    def forward(self, prompt, *, images=None, image_features=None, pan_and_scan=False) -> np.ndarray:
        """float32 logits (len(ids), config.vocab_size) at every position of the prompt (token ids,
        or a str encoded with the tokenizer's BOS setting), from an empty cache (of the model's KV
        dtype): every row, padding rows included, as transformers returns them. With images,
        the positions are those of the expanded prompt (see `encode_prompt`). The generation state
        is left alone.

        >>> model.forward(model.tokenizer.encode("Hello")).shape   # doctest: +SKIP
        (2, 262144)
        >>> model.forward("<start_of_image>What is this?", images=["cat.png"]).shape   # doctest: +SKIP
        (270, 262208)
        """
        ids, spans = self.encode_prompt(prompt, images=images, image_features=image_features,
                                        pan_and_scan=pan_and_scan)
        ids = self._check_ids(ids, self.config.vocab_size)
        scratch = KVCache(self.config.num_layers, max(len(ids), 1), self.config.num_kv_heads,
                          self.config.head_dim, self.kv_dtype)
        return self.transformer.run(ids, scratch, start=0, all_logits=True, images=spans)

    # ---- images ----

    @functools.cached_property
    def image_tokens(self) -> ImageTokens:
        """The ids of the image markers and soft tokens per picture (the blob's "projector"
        component config); FormatError when the blob has no vision component.

        >>> model.image_tokens.per_image     # doctest: +SKIP
        256
        """
        return ImageTokens.of(self.reader)

    def encode_prompt(self, prompt, *, images=None, image_features=None, pan_and_scan=False,
                      add_bos: bool | None = None) -> tuple[list[int], list[ImageSpan]]:
        """(token ids, ImageSpans) of a prompt that may hold images (Gemma 3 vision blobs).

        A str prompt writes one `<start_of_image>` marker per image; each becomes the token run
        transformers' Gemma3Processor writes (`\\n\\n<start_of_image>`, mm_tokens_per_image image
        soft tokens, `<end_of_image>\\n\\n`). A list of ids is taken as the processor's
        input_ids: it already holds one run of soft tokens per picture. `images` are paths,
        bytes, PIL images or (H, W, 3) uint8 arrays, preprocessed as transformers does and
        encoded by the blob's vision tower; `pan_and_scan` (True, or an images.PanAndScan)
        adds transformers' crops of long images. `image_features` instead gives each picture's
        projected features (mm_tokens_per_image, hidden) float32 directly, as transformers'
        get_image_features returns them. Without either, the prompt is text only.
        ValueError when markers and images do not pair up; FormatError when the blob has no
        vision component.

        >>> ids, spans = model.encode_prompt("<start_of_image>Describe it.", images=["cat.png"])  # doctest: +SKIP
        >>> spans[0].end - spans[0].begin                                                          # doctest: +SKIP
        256
        """
        if images is None and image_features is None:
            return (self.tokenizer.encode(prompt, add_bos) if isinstance(prompt, str) else list(prompt)), []
        if images is not None and image_features is not None:
            raise ValueError("give images or image_features, not both")
        tokens = self.image_tokens
        if images is not None:
            pictures = self.image_encoder.pictures(_listed(images, "images"), _pan_and_scan(pan_and_scan))
            crops = [len(picture) - 1 for picture in pictures]
            features = self.image_encoder.features(np.concatenate(pictures))
        else:
            features = _listed(image_features, "image_features")
            crops = [0] * len(features)
        if isinstance(prompt, str):
            ids, begins = image_prompt.expand_text(self.tokenizer, prompt, tokens, crops, add_bos)
        else:
            ids = [int(i) for i in prompt]
            begins = image_prompt.runs_in_ids(ids, tokens)
        return ids, image_prompt.spans(begins, features, tokens, self.config.hidden_size)

    # ---- text ----

    def generate(self, prompt, **options) -> GenerationResult:
        """Generate a completion of `prompt` (a str, or a list of token ids used as given).
        `images=[...]` (and `pan_and_scan`, or `image_features`) as in encode_prompt: one
        `<start_of_image>` marker in the prompt per image.

        Options: max_new_tokens=256, temperature, top_k, top_p, min_p, repetition_penalty (defaults
        from the model's generation_config; temperature 0 is greedy), seed, stop (strings), ignore_eos,
        session (a Session from new_session / load_session; default the model's own), add_bos (a str
        prompt's BOS: None follows the tokenizer).
        Speculative decoding (runtime/speculative.py; the same tokens at temperature 0, the same
        distribution when sampling; text prompts): lookup=N (1..7) drafts up to N tokens by prompt
        lookup; with a draft model (load(..., draft=)) draft_tokens=N (default 4, 0 = off; with
        batch= it is off unless given, and speculation with batch= is an error) drafts up to N
        tokens with it; with both, the draft model drafts when lookup finds no match. The stats
        count the drafted and accepted tokens.
        A str is encoded with the tokenizer's BOS setting, and no second BOS is added to text
        that starts with one (such as apply_chat_template's output). Only ids the tokenizer can
        decode are sampled (see decodable_vocab_size). The result's finish_reason is "stop" or
        "length"; `stats.context_full` tells a full context (max_seq_len) from max_new_tokens.

        >>> model.generate("The sky is", max_new_tokens=8, temperature=0).finish_reason   # doctest: +SKIP
        'length'
        >>> model.generate(text + "\\nSummary:", lookup=4).stats.accepted_tokens      # doctest: +SKIP
        93
        >>> model.generate("<start_of_image>Describe this image.", images=["cat.png"]).text   # doctest: +SKIP
        """
        arguments, options = self._generation(prompt, **options)
        return layers.generate(*arguments, **options)

    def stream(self, prompt, **options) -> Iterator[GenerationChunk]:
        """Like generate(), one GenerationChunk per token; breaking out of the loop cancels.
        `ignore_eos` keeps generating past end-of-sequence tokens (for benchmarks and tests).
        `logits_processor(generated_ids, logits)` returns the logits each token is sampled from
        (logits of the decodable vocabulary; -inf forbids a token), e.g. a grammar's mask.
        `batch` (a runtime.batch.BatchEngine of this model) advances the generation (its prompt chunks,
        then its tokens) in batched steps with the engine's other requests; the tokens are the same as alone.
        `image_spans` (with the prompt as token ids): the ImageSpans encode_prompt made for those ids,
        so a prompt encoded once (the server's, checked before it takes a slot) is not encoded again.

        >>> for chunk in model.stream("Once upon a time", max_new_tokens=32):   # doctest: +SKIP
        ...     print(chunk.text, end="", flush=True)
        """
        arguments, options = self._generation(prompt, **options)
        return layers.stream(*arguments, **options)

    def _generation(self, prompt, *, max_new_tokens: int = 256, temperature=None, top_k=None, top_p=None,
                    min_p=None, repetition_penalty=None, seed: int | None = None, stop: Sequence[str] | None = None,
                    ignore_eos: bool = False, session: Session | None = None,
                    logits_processor: layers.LogitsProcessor | None = None, batch=None, lookup: int = 0,
                    draft_tokens: int | None = None, images=None, image_features=None, pan_and_scan=False,
                    image_spans: Sequence[ImageSpan] | None = None, add_bos: bool | None = None):
        """The arguments of generate.stream / generate.generate for these options."""
        params = SamplingParams.from_generation_config(
            self.generation_config, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty)
        ids, spans = self._encoded(prompt, images, image_features, pan_and_scan, image_spans, add_bos)
        ids = self._check_ids(ids, self.config.vocab_size if spans else self.decodable_vocab_size)
        session = self._check_session(session)
        options = dict(vocab_size=self.decodable_vocab_size, max_new_tokens=max_new_tokens, seed=seed,
                       stop=list(stop or ()), stop_ids=frozenset() if ignore_eos else self._stop_ids(),
                       logits_processor=logits_processor, batch=batch, images=spans,
                       drafter=self._drafter(session, lookup, draft_tokens, batched=batch is not None))
        return (self.transformer, self.tokenizer, session, ids, params), options

    def _encoded(self, prompt, images, image_features, pan_and_scan, image_spans, add_bos):
        """(ids, ImageSpans) of a generation's prompt: encode_prompt's, or as given when the caller
        encoded it already (`image_spans`)."""
        if image_spans is None:
            return self.encode_prompt(prompt, images=images, image_features=image_features,
                                      pan_and_scan=pan_and_scan, add_bos=add_bos)
        if isinstance(prompt, str) or images is not None or image_features is not None:
            raise ValueError("image_spans go with the token ids encode_prompt made them for, "
                             "not with a str prompt, images or image_features")
        return list(prompt), list(image_spans)

    def chat(self, messages: Sequence[Mapping], *, stream: bool = False, tools: Sequence[Mapping] | None = None,
             documents: Sequence[Mapping] | None = None, chat_template_kwargs: Mapping | None = None, **options):
        """Answer a conversation ([{"role": ..., "content": ...}]) using the model's chat template.

        `tools`, `documents` and `chat_template_kwargs` (e.g. {"enable_thinking": False}) go to the
        template as in apply_chat_template; the other options are generate()'s. A message's
        content may be a list of parts, {"type": "text", "text": …} and {"type": "image",
        "image": …} (a path, bytes, a PIL image, an array; or "path", or a data: "url"; OpenAI's
        {"type": "image_url", "image_url": {"url": "data:…"}} too): the template writes an image
        marker per image part, and the images go with the prompt in that order. Returns a
        GenerationResult, or an iterator of GenerationChunk with stream=True. With `tools`, the
        result's `tool_calls` are the calls its text makes in the template's format
        (`tool_call_format`); its `text` stays what the model wrote. The cached prefix
        of the previous turn (in the session: `session=`, default the model's) is reused, so a
        long conversation is not recomputed each turn.

        >>> model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=16).text   # doctest: +SKIP
        >>> model.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
        ...                                          {"type": "text", "text": "What is this?"}]}]).text  # doctest: +SKIP
        """
        messages, images = image_prompt.images_in_messages(messages)
        if images:
            options["images"] = images
        text = self.apply_chat_template(messages, tools=tools, documents=documents, **(chat_template_kwargs or {}))
        # the template writes BOS where the model wants it
        if stream:
            return self.stream(text, add_bos=False, **options)
        result = self.generate(text, add_bos=False, **options)
        if not tools or self.tool_call_format is None:
            return result
        return dataclasses.replace(result, tool_calls=self.tool_call_format.parse(result.text)[1])

    @property
    def tool_call_format(self) -> ToolCallFormat | None:
        """How this model's chat template has it write tool calls (None: the template has no tools).

        >>> model.tool_call_format.name        # doctest: +SKIP
        'hermes'
        """
        return format_for_template(self._chat_template())

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

    def _drafter(self, session: Session, lookup: int, draft_tokens: int | None, batched: bool):
        """The drafter of speculative decoding for these options (None: plain decoding). The draft
        model drafts by default, except in a BatchEngine's generations, which decode plainly."""
        drafters = [PromptLookup(lookup)] if lookup else []
        if draft_tokens and self.draft is None:
            raise ValueError(f"draft_tokens={draft_tokens} needs a draft model: load(path, draft=SMALL_MODEL)")
        if self.draft is not None and draft_tokens != 0 and not (batched and draft_tokens is None):
            cache = self._draft_caches.get(session)
            if cache is None:
                cache = self._draft_caches[session] = self.draft.new_session(session.max_seq_len, session.kv_dtype).cache
            drafters.append(DraftModel(self.draft.transformer, cache, self.decodable_vocab_size,
                                       DEFAULT_DRAFT_TOKENS if draft_tokens is None else draft_tokens))
        return None if not drafters else drafters[0] if len(drafters) == 1 else FirstOf(*drafters)

    def _session_length(self, max_seq_len: int | None, kv_dtype: str | None) -> int:
        return self.max_seq_len if max_seq_len is None else _context_length(self.config, max_seq_len, kv_dtype)

    def _check_session(self, session: Session | None) -> Session:
        if session is None:
            return self.session
        if not isinstance(session, Session):
            raise TypeError(f"session must be a Session (from new_session or load_session), got {type(session).__name__}")
        differences = self.fingerprint.differences(session.model)
        if differences:
            raise ValueError(f"this session belongs to another model ({session.model.name}, not "
                             f"{self.fingerprint.name}): " + "; ".join(differences))
        return session

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
        if self._close_draft:
            self.draft.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _listed(values, what: str) -> list:
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{what} must be a list (one entry per image), got {type(values).__name__}")
    return list(values)


def _pan_and_scan(setting) -> PanAndScan | None:
    if isinstance(setting, PanAndScan):
        return setting
    return PanAndScan() if setting else None


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


def check_same_vocabulary(model: Model, draft: Model):
    """VocabularyMismatch unless `draft` decodes every id `model` may sample to the same piece.

    >>> check_same_vocabulary(load("gemma-3-4b.blob"), load("gemma-3-270m.blob"))   # doctest: +SKIP
    """
    ours, theirs = model.reader.path, draft.reader.path
    if model.decodable_vocab_size != draft.decodable_vocab_size:
        raise VocabularyMismatch(f"draft model {theirs}: its vocabulary has {draft.decodable_vocab_size} tokens, "
                                 f"that of {ours} {model.decodable_vocab_size}; a draft model needs the same one")
    if _tokenizer_crc32c(model) == _tokenizer_crc32c(draft):   # the same packed tokenizer file
        return
    for token_id in range(model.decodable_vocab_size):
        piece, draft_piece = model.tokenizer.id_to_token(token_id), draft.tokenizer.id_to_token(token_id)
        if piece != draft_piece:
            raise VocabularyMismatch(f"draft model {theirs}: token {token_id} is {draft_piece!r} there and {piece!r} "
                                     f"in {ours}; a draft model needs the same vocabulary")


def _tokenizer_crc32c(model: Model) -> tuple:
    return tuple(model.reader.info(name).crc32c for name in ("tokenizer.model", "tokenizer.json")
                 if name in model.reader)
