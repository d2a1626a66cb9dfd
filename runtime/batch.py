"""Batched decoding of concurrent requests: one background thread advances every active sequence
together, one `Transformer.run_batch` step per iteration, so a step reads the weights once for
all of them instead of once per sequence.

A step feeds each active sequence its next run of tokens: a newcomer its prompt's next chunk
(`prefill_chunks`, as a lone prefill cuts it, after the prefix its session's cache already
holds), a decoding sequence the token it sampled last; the head computes each run's last row
only. Newcomers thus prefill together, and alongside the sequences already decoding, as
llama-server and vLLM batch continuously. Every row is sampled with its own parameters and random
generator, over the decodable vocabulary only, exactly as `generate.generate_step` samples a lone
generation: with the same seed a request gets the same tokens batched as alone (its logits are
bit-identical to a lone run's, float weights included: see `Transformer.run_batch`).

Threads (runtime/session.py tells the whole lock story): `submit` may be called from any
thread; each returned TokenStream is read by one consumer. A request holds its Session
(`Session.in_use`) from submit to its last token, so a second use of the session meanwhile — a
submit, or a generate on another thread — raises RuntimeError. The engine's forwards and those
of other sessions generating in other threads take turns on the model (`Transformer`'s lock).
"""
from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .generate import LogitsProcessor, sample_next
from .kv_cache import KVCache
from .model import PREFILL_CHUNK, keep_reusable_prefix, prefill_chunks
from .sampling import SamplingParams
from .session import Session

_DONE = object()   # the end of a stream, after its last token


@dataclass(frozen=True)
class _Run:
    """Tokens a step feeds one sequence at its cache's end, and the ImageSpans among them."""

    ids: list[int]
    images: list = field(default_factory=list)


@dataclass(eq=False)
class _Request:
    cache: KVCache                  # the session's
    holding: contextlib.AbstractContextManager   # the session's in_use(), entered at submit
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset
    rng: np.random.Generator
    logits_processor: LogitsProcessor | None
    images: list                    # the prompt's ImageSpans (runtime/image_prompt.py)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    context: list[int] = field(default_factory=list)   # prompt and tokens so far (repetition penalty)
    generated: int = 0
    # what the next steps feed: the prompt's chunks not yet in the cache, then the last sampled token
    runs: list[_Run] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None


class TokenStream:
    """The token ids of one request, as the engine produces them. Iterating ends after the last
    token; `finish_reason` is then "stop" (a stop id came: it is not yielded), "length"
    (max_new_tokens, or the session's context is full) or "cancelled". An error in the engine is
    raised here.
    `cancel()` — or dropping the stream — frees the request's slot at the engine's next step.

    >>> stream = engine.submit(session, ids, SamplingParams(temperature=0), 16)   # doctest: +SKIP
    >>> tokens = list(stream); stream.finish_reason                              # doctest: +SKIP
    'length'
    """

    def __init__(self, request: _Request, wake):
        self._request, self._wake = request, wake
        self.finish_reason: str | None = None

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.finish_reason is not None:
            raise StopIteration
        item = self._request.out.get()
        if item is _DONE:
            self.finish_reason = self._request.finish_reason
            raise StopIteration
        if isinstance(item, BaseException):
            self.finish_reason = "error"
            raise item
        return item

    def cancel(self):
        if not self._request.cancelled:
            self._request.cancelled = True
            self._wake()

    close = cancel

    def wait(self):
        """Block until the engine has let go of the request and its session: after its last token,
        an error, or a cancel() the engine has seen (at its next step). Ids not read are dropped."""
        while self.finish_reason is None:
            item = self._request.out.get()
            if item is _DONE:
                self.finish_reason = self._request.finish_reason
            elif isinstance(item, BaseException):
                self.finish_reason = "error"

    def __del__(self):
        self.cancel()


class BatchEngine:
    """Runs the requests submitted to it, up to `max_active` at once in one batched step (prompt
    chunks and decode tokens alike); the others wait in arrival order. The background thread
    starts with the first request and stops at `close()`.

    >>> engine = BatchEngine(model, max_active=4)                                   # doctest: +SKIP
    >>> streams = [engine.submit(s, ids, SamplingParams(temperature=0), 32) for s in sessions]  # doctest: +SKIP
    >>> [list(s) for s in streams]                                                # doctest: +SKIP
    """

    def __init__(self, model, max_active: int = 4):
        if max_active < 1:
            raise ValueError(f"BatchEngine: max_active must be >= 1, got {max_active}")
        self.transformer = model.transformer
        self.vocab_size = model.decodable_vocab_size
        self.max_active = max_active
        self._changed = threading.Condition()
        self._waiting: list[_Request] = []
        self._active: list[_Request] = []    # touched by the engine's thread only
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, session: Session, prompt_ids: Iterable[int], params: SamplingParams = SamplingParams(),
               max_new_tokens: int = 256, stop_ids: Iterable[int] = (), seed: int | None = None,
               logits_processor: LogitsProcessor | None = None, images=()) -> TokenStream:
        """Queue a generation of `prompt_ids` in `session` (the prefix of the prompt its cache holds
        is reused); returns its TokenStream. RuntimeError when the session is in use.
        `logits_processor(generated_ids, logits)`, as generate's, returns the logits to sample
        from; it runs on the engine's thread, and an exception from it ends this request only.
        `images`: the prompt's ImageSpans, when it holds pictures (prefilled with the prompt)."""
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("submit: the prompt is empty: give at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"submit: max_new_tokens must be >= 0, got {max_new_tokens}")
        session.cache.check_room(len(prompt_ids))
        holding = session.in_use()
        with self._changed:
            if self._closed:
                raise RuntimeError("submit: this BatchEngine is closed")
            holding.__enter__()   # left by the engine's thread when the request ends
            request = _Request(session.cache, holding, prompt_ids, params, max_new_tokens, frozenset(stop_ids),
                               np.random.default_rng(seed), logits_processor, list(images), context=list(prompt_ids))
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="blobstore-batch", daemon=True)
                self._thread.start()
            self._changed.notify()
        return TokenStream(request, self._wake)

    def close(self):
        """Stop the thread after its current step; unfinished requests end with an error."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _wake(self):
        with self._changed:
            self._changed.notify()

    # ---- the engine's thread ----

    def _loop(self):
        try:
            while self._next_round():
                self._step()
        except BaseException as error:   # a bug in the loop itself: every consumer hears of it
            self._fail(self._waiting + self._active, error)
            raise
        self._fail(self._waiting + self._active, RuntimeError("the BatchEngine was closed"))

    def _next_round(self) -> bool:
        """Wait for work; drop cancelled requests, admit newcomers while there are free slots.
        False when the engine is closed."""
        with self._changed:
            while not self._closed and not self._waiting and not self._active:
                self._changed.wait()
            if self._closed:
                return False
            for request in [r for r in self._waiting + self._active if r.cancelled]:
                self._finish(request, "cancelled")
            self._waiting = [r for r in self._waiting if not r.cancelled]
            self._active = [r for r in self._active if not r.cancelled]
            free = self.max_active - len(self._active)
            admitted, self._waiting = self._waiting[:free], self._waiting[free:]
        self._active += [request for request in admitted if self._admit(request)]
        return True

    def _admit(self, request: _Request) -> bool:
        """Plan the request's prompt chunks after the prefix its cache holds; True when it goes on."""
        if request.max_new_tokens == 0:
            return self._finish(request, "length")
        try:
            request.runs = _prompt_runs(request.cache, request.prompt_ids, request.images)
        except Exception as error:
            self._fail([request], error)
            return False
        return True

    def _step(self):
        """One batched step: each chosen request's next run; those done with their prompt sample."""
        rows = self._step_rows()
        if not rows:
            return
        runs = [r.runs[0] for r in rows]
        caches = [r.cache for r in rows]
        try:
            logits = self.transformer.run_batch([run.ids for run in runs], caches, [c.length for c in caches],
                                                [run.images for run in runs])
        except Exception as error:
            self._fail(rows, error)
            self._active = [r for r in self._active if r not in rows]
            return
        for request, run, row in zip(rows, runs, logits):
            request.cache.token_ids.extend(run.ids)
            request.cache.images.extend(run.images)
            del request.runs[0]
            if not request.runs and not self._emit(request, row):
                self._active.remove(request)

    def _step_rows(self) -> list[_Request]:
        """The requests the next step feeds: every decoding one, and those with prompt left in
        arrival order while their chunks hold at most PREFILL_CHUNK tokens (the first always), so
        that a long prompt holds the others' decoding up for one chunk's time per step. Shortest
        runs first: the forward multiplies short and long runs apart (csrc/forward.c), in as few
        products as this order allows."""
        rows, prompt_tokens = [], 0
        for request in self._active:
            if request.cancelled:
                continue
            size = len(request.runs[0].ids)
            if request.generated == 0:   # its prompt is not all in yet
                if prompt_tokens and prompt_tokens + size > PREFILL_CHUNK:
                    continue
                prompt_tokens += size
            rows.append(request)
        return sorted(rows, key=lambda r: len(r.runs[0].ids))

    def _emit(self, request: _Request, logits: np.ndarray) -> bool:
        """Sample the next token from `logits`, hand it out; True when another step is due."""
        logits = logits[:self.vocab_size]
        try:
            token = sample_next(logits, request.context, len(request.prompt_ids), request.params, request.rng,
                                request.logits_processor)
        except Exception as error:
            self._fail([request], error)
            return False
        if token in request.stop_ids:
            return self._finish(request, "stop")
        request.out.put(token)
        request.generated += 1
        request.context.append(token)
        request.runs.append(_Run([token]))
        room = len(request.prompt_ids) + request.generated <= request.cache.max_seq_len
        if request.generated >= request.max_new_tokens or not room:
            return self._finish(request, "length")
        return True

    def _finish(self, request: _Request, reason: str) -> bool:
        request.finish_reason = reason
        self._release(request, _DONE)
        return False

    def _fail(self, requests, error: BaseException):
        for request in requests:
            self._release(request, error)

    def _release(self, request: _Request, last_item):
        """The request's last item to its consumer; its session is free again."""
        request.holding.__exit__(None, None, None)
        request.out.put(last_item)


def _prompt_runs(cache: KVCache, prompt_ids: list[int], images: list) -> list[_Run]:
    """The chunks of the prompt a lone prefill (runtime/model.py's `prefill`) would compute: after
    the prefix the cache shares with the prompt, cut by prefill_chunks."""
    reuse, new_images = keep_reusable_prefix(cache, prompt_ids, images)
    return [_Run(prompt_ids[reuse + begin:reuse + end], spans)
            for begin, end, spans in prefill_chunks(len(prompt_ids) - reuse, reuse, new_images)]
