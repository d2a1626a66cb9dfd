"""Generation in three layers: generate_step (ids out of the weights and a session; with a drafter,
speculative.speculative_step) → stream (text chunks, stop conditions) → generate (one result with
statistics). Each takes what it uses as
arguments (weights, tokenizer, session, sampling); `Model.generate / stream / chat` are thin
wrappers. Which calls may run at the same time: see runtime/session.py."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .model import Transformer, prefill
from .sampling import SamplingParams, sample
from .session import Session
from .speculative import Drafter, SpeculationCounts, speculative_step
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    reused_prompt_tokens: int        # served from the session's cache (an earlier turn, a saved session), not recomputed
    prefill_seconds: float
    generated_tokens: int
    decode_seconds: float
    peak_rss_bytes: int
    # the KV cache (max_seq_len) had no room for another token before max_new_tokens were made;
    # finish_reason is "length" either way, as OpenAI's API defines it
    context_full: bool = False
    # speculative decoding: drafted tokens the model checked, and those it kept (0 and 0 without)
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        computed = self.prompt_tokens - self.reused_prompt_tokens
        return computed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first new token comes out of the prefill; decode time covers the others
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """The share of drafted tokens the model kept (0 without speculative decoding)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def _acceptance(self) -> str:
        if not self.drafted_tokens:
            return ""
        return (f", drafts: {self.accepted_tokens} of {self.drafted_tokens} tokens accepted "
                f"({self.acceptance_rate:.0%})")

    def report(self, file=None):
        """The llama.cpp / mlx-lm style summary lines, on `file` (default: the current sys.stderr)."""
        file = file or sys.stderr
        reused = f" ({self.reused_prompt_tokens} reused from the cache)" if self.reused_prompt_tokens else ""
        print(f"Prompt: {self.prompt_tokens} tokens{reused}, {self.prefill_tokens_per_second:.3f} tokens-per-sec",
              file=file)
        print(f"Generation: {self.generated_tokens} tokens, {self.decode_tokens_per_second:.3f} tokens-per-sec"
              f"{self._acceptance()}", file=file)
        print(f"Peak memory: {self.peak_rss_bytes / 1e9:.3f} GB", file=file)


@dataclass(frozen=True)
class GenerationChunk:
    text: str                   # new text (may be empty while a character or stop string is incomplete)
    token_id: int | None        # the token that produced it (None for the final flush)
    finish_reason: str | None   # "stop" | "length" on the last chunk, else None
    stats: GenerationStats | None = None  # on the last chunk


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    stats: GenerationStats | None = None
    tool_calls: list = field(default_factory=list)   # Model.chat(tools=...): the ToolCalls found in `text`


@dataclass
class _Timer:
    prompt_tokens: int
    reused: int
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    generated: int = 0
    speculation: SpeculationCounts | None = None

    def stats(self, context_full: bool = False) -> GenerationStats:
        now = time.perf_counter()
        first = self.first_token_at or now
        counts = self.speculation or SpeculationCounts()
        return GenerationStats(self.prompt_tokens, self.reused, first - self.started, self.generated,
                               now - first, peak_rss_bytes(), context_full, counts.drafted, counts.accepted)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS; Windows
    has no `resource` module, and reports the peak working set instead)."""
    if sys.platform == "win32":
        return _peak_working_set()
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _peak_working_set() -> int:
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS (psapi.h)
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t), ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

    counters = Counters(cb=ctypes.sizeof(Counters))
    process = ctypes.windll.kernel32.GetCurrentProcess()
    if not ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
        return 0
    return counters.PeakWorkingSetSize


# (ids generated so far, logits of the next position) -> the logits to sample from; setting a
# token's logit to -inf forbids it (a grammar's mask, as structured output uses)
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


def generate_step(transformer: Transformer, session: Session, prompt_ids: Sequence[int], params: SamplingParams,
                  rng: np.random.Generator, *, vocab_size: int,
                  logits_processor: Optional[LogitsProcessor] = None, images: Sequence = ()) -> Iterator[int]:
    """Layer 1: yield sampled token ids forever (the caller stops); the session's cache follows
    every token, and the leading prompt tokens it already holds are not recomputed.

    Only the first `vocab_size` logits are sampled from (a view, not a copy): checkpoints pad
    their embedding past the tokenizer (Gemma 3: 262,208 rows for 262,144 pieces), and a padding
    row the tokenizer cannot decode must never be picked, greedy or sampled.

    The cache's id list grows only after a step completes, so an interrupted step (Ctrl-C)
    leaves the session consistent: the next call recomputes from the last complete position.
    The caller holds the session (Session.in_use).
    `logits_processor(generated_ids, logits)`, when given, returns the logits to sample from.
    `images`: the prompt's ImageSpans (runtime/image_prompt.py), when it holds pictures.

    >>> steps = generate_step(transformer, session, [2, 651], SamplingParams(temperature=0),
    ...                       np.random.default_rng(0), vocab_size=262144)     # doctest: +SKIP
    >>> next(steps)                                                            # doctest: +SKIP
    6037
    """
    prompt_ids = list(prompt_ids)
    cache = session.cache
    logits = prefill(transformer, cache, prompt_ids, images)[:vocab_size]
    context = list(prompt_ids)
    while True:
        token = sample_next(logits, context, len(prompt_ids), params, rng, logits_processor)
        yield token
        context.append(token)
        logits = transformer.run([token], cache, start=cache.length)[-1, :vocab_size]
        cache.token_ids.append(token)


def sample_next(logits: np.ndarray, context: list[int], prompt_length: int, params: SamplingParams,
                rng: np.random.Generator, logits_processor: Optional[LogitsProcessor] = None) -> int:
    """The next token from `logits` (already cut to the decodable vocabulary), after `context`
    (the prompt's `prompt_length` ids, then the generated ones), through `logits_processor`.

    >>> sample_next(logits, [2, 651], 2, SamplingParams(temperature=0), rng)    # doctest: +SKIP
    6037
    """
    if logits_processor is not None:
        logits = logits_processor(context[prompt_length:], logits)
    return sample(logits, params, rng, context)


def stream(transformer: Transformer, tokenizer: Tokenizer, session: Session, prompt_ids: Sequence[int],
           params: SamplingParams, *, vocab_size: int, max_new_tokens: int, seed: int | None = None,
           stop: Sequence[str] = (), stop_ids=frozenset(),
           logits_processor: Optional[LogitsProcessor] = None, batch=None,
           drafter: Optional[Drafter] = None, images: Sequence = ()) -> Iterator[GenerationChunk]:
    """Layer 2: text chunks of a generation on `session`; the last chunk has the finish reason and
    the statistics. The session is held (Session.in_use) from the first chunk to the last.

    The ids come from generate_step, or with `batch` (a runtime.batch.BatchEngine) from a request
    submitted to it, advancing in one batched step with the engine's other requests; the text is
    the same either way (text_chunks). With `drafter` (runtime/speculative.py: PromptLookup,
    DraftModel) the ids come from speculative_step instead: the same tokens at temperature 0, the
    same distribution when sampling, and the statistics count the drafted and accepted tokens.
    Breaking out of the loop stops the generation; the cache keeps what was computed. Sampled ids
    stay below `vocab_size` (see generate_step), which is also the length of the logits a
    `logits_processor` gets. `images`: the prompt's ImageSpans.

    >>> for chunk in stream(transformer, tokenizer, session, ids, SamplingParams(temperature=0),
    ...                     vocab_size=262144, max_new_tokens=8):               # doctest: +SKIP
    ...     print(chunk.text, end="")
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt_ids = list(prompt_ids)
    session.cache.check_room(len(prompt_ids))
    text = dict(max_new_tokens=max_new_tokens, max_seq_len=session.max_seq_len, stop=stop, stop_ids=stop_ids,
                reused_prompt_tokens=session.reusable_prefix(prompt_ids, images))
    if batch is not None and drafter is not None:
        raise ValueError("speculative decoding (lookup, a draft model) runs a generation alone, not in a BatchEngine")
    if images and drafter is not None:
        raise ValueError("speculative decoding (lookup, a draft model) takes text prompts only, not images")
    if batch is not None and max_new_tokens > 0:
        # the engine holds the session from submit until it lets go of the request (wait())
        tokens = batch.submit(session, prompt_ids, params, max_new_tokens, seed=seed, logits_processor=logits_processor,
                              images=images)
        try:
            yield from text_chunks(tokenizer, prompt_ids, tokens, **text)
        finally:
            tokens.cancel()
            tokens.wait()
        return
    with session.in_use():
        rng = np.random.default_rng(seed)
        if drafter is None:
            steps = generate_step(transformer, session, prompt_ids, params, rng, vocab_size=vocab_size,
                                  logits_processor=logits_processor, images=images)
        else:
            text["speculation"] = SpeculationCounts()
            steps = speculative_step(transformer, session, prompt_ids, params, rng, vocab_size=vocab_size,
                                     drafter=drafter, counts=text["speculation"], logits_processor=logits_processor)
        try:
            yield from text_chunks(tokenizer, prompt_ids, steps, **text)
        finally:
            steps.close()


def text_chunks(tokenizer: Tokenizer, prompt_ids: Sequence[int], token_ids: Iterator[int], *, max_new_tokens: int,
                max_seq_len: int, stop: Sequence[str] = (), stop_ids=frozenset(),
                reused_prompt_tokens: int = 0,
                speculation: Optional[SpeculationCounts] = None) -> Iterator[GenerationChunk]:
    """The text of the ids `token_ids` yields after `prompt_ids` (from any source: generate_step, a
    BatchEngine's TokenStream), one GenerationChunk per id, the last with the finish reason and
    the statistics. It reads no further than the generation goes; the caller closes the source.

    Text that might be the start of a stop string is held back until it is clearly not one. A
    stop id ends with "stop" (it counts as generated, its text is not given); a generation that
    fills the context (`max_seq_len`) ends with "length" and `stats.context_full` set.
    `speculation`, the counts a speculative_step adds up, go into the statistics.

    >>> [c.text for c in text_chunks(tokenizer, [2], iter([651, 6037]), max_new_tokens=2,
    ...                              max_seq_len=64)]                              # doctest: +SKIP
    ['The', ' sky', '']
    """
    timer = _Timer(len(prompt_ids), reused_prompt_tokens, speculation=speculation)
    if max_new_tokens == 0:
        yield GenerationChunk("", None, "length", timer.stats())
        return
    decoder = tokenizer.decoder(list(prompt_ids)[-8:])
    held, finish, context_full = "", "length", False
    for count, token in enumerate(token_ids, start=1):
        timer.generated = count
        timer.first_token_at = timer.first_token_at or time.perf_counter()
        if token in stop_ids:
            finish = "stop"
            break
        held += decoder.add(token)
        cut = _first_stop(held, stop)
        if cut is not None:
            held, finish = held[:cut], "stop"
            break
        safe = len(held) - _stop_prefix_overlap(held, stop)
        yield GenerationChunk(held[:safe], token, None)
        held = held[safe:]
        if count >= max_new_tokens:
            break
        if len(prompt_ids) + count > max_seq_len:  # no position left to feed this token at
            context_full = True
            break
    if finish == "length":
        held += decoder.flush()
    yield GenerationChunk(held, None, finish, timer.stats(context_full))


def generate(transformer: Transformer, tokenizer: Tokenizer, session: Session, prompt_ids: Sequence[int],
             params: SamplingParams, **options) -> GenerationResult:
    """Layer 3: the whole generation as one GenerationResult; `options` are stream()'s.

    >>> generate(transformer, tokenizer, session, ids, SamplingParams(temperature=0),
    ...          vocab_size=262144, max_new_tokens=8).finish_reason             # doctest: +SKIP
    'length'
    """
    texts, ids = [], []
    for chunk in stream(transformer, tokenizer, session, prompt_ids, params, **options):
        texts.append(chunk.text)
        if chunk.token_id is not None:
            ids.append(chunk.token_id)
        last = chunk
    return GenerationResult("".join(texts), ids, last.finish_reason, last.stats)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _stop_prefix_overlap(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest
