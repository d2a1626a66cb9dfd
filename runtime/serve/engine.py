"""What runs a Job: the model adapter (prompt ids, a Session per slot), the admission control
(slots and a bounded queue: 503 when full) and the bridge that runs a blocking generation in a
worker thread and hands its chunks to the event loop.

The HTTP layer talks to an engine through four members — `prompt(job)`, `context_length`,
`tool_call_format`, `run(job, prompt, logits_processor, cancelled)` — so another engine can replace ModelEngine without
touching the routes.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from ..batch import BatchEngine
from ..chat import ChatTemplateError
from ..generate import GenerationChunk
from ..image_prompt import images_in_messages
from .protocol import APIError, Job

RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class Prompt:
    """A request's prompt: its token ids and the ImageSpans among them (runtime/image_prompt.py:
    the pictures of its image_url parts, encoded)."""
    ids: list[int]
    images: list = field(default_factory=list)


class ModelEngine:
    """One Model and `sessions` Sessions of it, one per slot. A request takes the idle session whose
    history shares the longest prefix with its prompt (the next turn of a conversation, a shared
    system prompt), so that prefix is not computed again, unless that would overwrite most of
    another conversation's history: then the least recently used session. The slots' generations
    advance together, one batched step for all of them, a newcomer's prompt beside the others'
    next tokens (a BatchEngine of `sessions` rows).

    >>> engine = ModelEngine(load("gemma.blob"), sessions=2)                       # doctest: +SKIP
    >>> job = parse_chat({"messages": [{"role": "user", "content": "Hi"}]}, "gemma")  # doctest: +SKIP
    >>> prompt = engine.prompt(job)                                                # doctest: +SKIP
    >>> "".join(c.text for c in engine.run(job, prompt, None, threading.Event()))  # doctest: +SKIP
    """

    def __init__(self, model, sessions: int = 1):
        self.model = model
        self._idle = [model.new_session() for _ in range(sessions)]
        self._batch = BatchEngine(model, max_active=sessions)
        self._pool_lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return self.model.max_seq_len

    @property
    def tool_call_format(self):
        """The format the model's chat template has tool calls written in, or None."""
        return self.model.tool_call_format

    def prompt(self, job: Job) -> Prompt:
        """The prompt's token ids: chat messages through the chat template (their image_url parts,
        base64 data: URLs, encoded by the model's vision tower), else the prompt as given. A prompt
        that does not fit the context, or images the model cannot take, are a 400."""
        images = []
        try:
            if job.is_chat:
                messages, pictures = images_in_messages(job.messages)
                text = self.model.apply_chat_template(messages, tools=job.tools)
                # the template writes BOS where the model wants it
                ids, images = self.model.encode_prompt(text, images=pictures or None, add_bos=False)
            elif isinstance(job.prompt, str):
                ids = self.model.tokenizer.encode(job.prompt)
            else:
                ids = list(job.prompt)
        except ChatTemplateError as error:
            raise APIError(400, str(error), param="messages") from None
        except ValueError as error:   # an image that is not a data: URL or not an image, a text-only model
            raise APIError(400, str(error), param="messages") from None
        limit = self.model.config.vocab_size if images else self.model.decodable_vocab_size
        bad = [i for i in ids if not 0 <= i < limit]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{limit - 1})", param="prompt")
        if len(ids) > self.context_length:
            raise APIError(400, f"the prompt is {len(ids)} tokens, longer than the context of "
                                f"{self.context_length} tokens", param="messages" if job.is_chat else "prompt",
                           code="context_length_exceeded")
        return Prompt(ids, images)

    def run(self, job: Job, prompt: Prompt, logits_processor, cancelled: threading.Event) -> Iterator[GenerationChunk]:
        """The generation's chunks (blocking; call from a worker thread that holds a slot). Stops
        within a token of `cancelled` being set."""
        session = self._take_session(prompt)
        try:
            max_tokens = min(job.max_tokens or self.context_length, self.context_length)
            chunks = self.model.stream(prompt.ids, image_spans=prompt.images, session=session, max_new_tokens=max_tokens,
                                       logits_processor=logits_processor, batch=self._batch, **job.sampling)
            try:
                for chunk in chunks:
                    if cancelled.is_set():
                        return
                    yield chunk
            finally:
                chunks.close()
        finally:
            with self._pool_lock:
                self._idle.append(session)

    def _take_session(self, prompt: Prompt):
        def reusable(session):
            return session.reusable_prefix(prompt.ids, prompt.images)
        with self._pool_lock:
            if not self._idle:
                raise RuntimeError("no idle session: more generations run than the engine has sessions "
                                   "(give ModelEngine as many sessions as the server has slots)")
            # the idle list runs from least to most recently used, and max() keeps the first of equals
            best = max(self._idle, key=reusable)
            if 2 * reusable(best) < len(best.token_ids):
                # not this conversation's next turn, only a shared opening (a chat template's header):
                # keep its history for its own next turn, and take the longest-idle session
                best = self._idle[0]
            self._idle.remove(best)
            return best


class Admission:
    """`parallel` slots and at most `queue_size` requests waiting for one; past that a 503 with
    Retry-After. A slot is given back by the worker that ran the generation (see Generation).

    >>> await admission.acquire()      # doctest: +SKIP  (raises the 503 APIError when full)
    """

    def __init__(self, parallel: int, queue_size: int):
        if parallel < 1 or queue_size < 0:
            raise ValueError(f"parallel must be >= 1 and the queue >= 0, got {parallel} and {queue_size}")
        self.parallel, self.queue_size = parallel, queue_size
        self._slots = asyncio.Semaphore(parallel)
        self.waiting = 0
        self.active = 0

    async def acquire(self) -> None:
        if self.active + self.waiting >= self.parallel + self.queue_size:
            raise APIError(503, f"the server is busy: {self.active} requests running and {self.waiting} waiting; "
                                f"retry in a moment", type="server_error", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()


class Generation:
    """One generation running in a worker thread from the moment it is made; `chunks()` hands its
    GenerationChunks to the event loop. The caller has taken a slot (admission.acquire()) and the
    worker gives it back once the generation has really stopped. `cancel()` (a client that went
    away, a shutdown) stops it at its next token.

    >>> generation = Generation(engine, admission, job, prompt)   # doctest: +SKIP
    >>> async for chunk in generation.chunks(): ...                 # doctest: +SKIP
    """

    _DONE = object()

    def __init__(self, engine, admission: Admission, job: Job, prompt: Prompt, logits_processor=None):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._admission = admission
        worker = threading.Thread(target=self._work, args=(engine, job, prompt, logits_processor),
                                  name="blob-serve generation", daemon=True)
        worker.start()

    def cancel(self) -> None:
        self._cancelled.set()

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        try:
            while (item := await self._queue.get()) is not self._DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    def _work(self, engine, job, prompt, logits_processor) -> None:
        try:
            for chunk in engine.run(job, prompt, logits_processor, self._cancelled):
                self._deliver(chunk)
        except BaseException as error:  # handed to the request, which answers it
            self._deliver(error)
        finally:
            self._deliver(self._DONE)
            self._call_in_loop(self._admission.release)

    def _deliver(self, item) -> None:
        self._call_in_loop(self._queue.put_nowait, item)

    def _call_in_loop(self, function, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the event loop is closed (shutdown): nobody listens any more
            self._cancelled.set()
