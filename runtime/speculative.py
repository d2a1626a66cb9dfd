"""Speculative decoding: a cheap drafter proposes the next few tokens, the model checks them all in
one forward, and each token it keeps costs no forward of its own. The output is exactly plain
decoding's:

- at temperature 0 a drafted token is kept when it is the model's argmax, and the verify forward
  gives every position its one-token decode's logits bit for bit (it spans at most
  kernels.DECODE_TILES_MAX_TOKENS tokens and never straddles a LongRoPE factor switch), so the
  tokens are identical to plain greedy decoding;
- when sampling, standard speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
  drafted token x with draft probability q(x) is kept with probability min(1, p(x) / q(x)), where p
  is the model's distribution at that position; the first refused one is replaced by a draw from
  max(0, p - q), renormalised; after a fully kept draft one more token comes from p. Each output
  token is then distributed as p, as in plain sampling (the random draws differ, so a seed gives
  other text than without speculation). A prompt-lookup draft is deterministic (q is one-hot): x is
  kept with probability p(x).

p and q both go through the same sampling parameters (repetition penalty over the context so far,
temperature, top-k, top-p, min-p) and logits processor, which sees the drafted prefixes too: with
speculation it must depend only on its arguments (a processor that consumes each call's new ids
once, such as serve's grammar mask, cannot follow a draft that is refused).

Drafters:
- PromptLookup: the tokens that followed the latest earlier occurrence of the context's last
  n-gram (in the prompt or the output). Free; pays off when the answer repeats the prompt
  (summaries, code edits, extraction).
- DraftModel: a smaller model with the same vocabulary, with its own KV cache kept on the
  context by prefix reuse (runtime/kv_cache.py): tokens it drafted that were refused are dropped
  from its cache at its next draft.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Protocol, Sequence

import numpy as np

from . import kernels
from .kv_cache import KVCache
from .model import Transformer, prefill
from .sampling import SamplingParams, distribution, draw
from .session import Session

if TYPE_CHECKING:   # generate.py runs speculative_step: importing it back here would be a cycle
    from .generate import LogitsProcessor

# The verify forward runs the pending token and the draft: at most this many tokens keep every
# position's logits equal to a one-token decode's (csrc/kernels.h), so greedy output stays exact.
MAX_DRAFT_TOKENS = kernels.DECODE_TILES_MAX_TOKENS - 1

# n-gram lengths prompt lookup matches, longest first: a longer match predicts better. No single
# tokens: they match nearly everywhere, and a refused drafted token is not free (the verify
# forward's decode tiles run token by token: on Gemma 3 270M q8_0, 2 threads, 5 tokens cost 2.3
# one-token steps). Replaying greedy outputs of bench/bench_speculative.py's prompts, (4, 3, 2)
# needed the fewest forwards: code edit 1.9x plain at 4 tokens against 1.8x with (3, 2, 1).
LOOKUP_NGRAMS = (4, 3, 2)


@dataclass
class SpeculationCounts:
    """Drafted tokens the model checked, and how many of them it kept (all of a kept run, even when
    the generation stops inside it).

    >>> SpeculationCounts(drafted=10, accepted=7).acceptance
    0.7
    """

    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(frozen=True)
class Draft:
    """Tokens a drafter proposes, with the distributions it drew them from.

    >>> Draft([7, 8]).tokens
    [7, 8]
    """

    tokens: list[int]
    # each token's draft distribution (candidate ids, probabilities); None for a deterministic draft
    distributions: Optional[list[tuple[np.ndarray, np.ndarray]]] = None


@dataclass
class Sampler:
    """How one generation turns logits into tokens: the params, its random generator and logits
    processor, applied alike to the model's and the draft's logits.

    >>> sampler = Sampler(SamplingParams(temperature=0), np.random.default_rng(0), prompt_length=1)
    >>> sampler.draw(*sampler.distribution(np.array([0.5, 2.0, 1.0]), [0]))
    1
    """

    params: SamplingParams
    rng: np.random.Generator
    prompt_length: int
    logits_processor: Optional[LogitsProcessor] = None

    def distribution(self, logits: np.ndarray, context: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) of the next token after `context` (prompt, then generated ids)."""
        if self.logits_processor is not None:
            logits = self.logits_processor(list(context[self.prompt_length:]), logits)
        return distribution(logits, self.params, context)

    def draw(self, ids: np.ndarray, probs: np.ndarray) -> int:
        return draw(ids, probs, self.rng)


class Drafter(Protocol):
    def propose(self, context: list[int], limit: int, sampler: Sampler) -> Draft:
        """Up to `limit` tokens likely to follow `context`."""


class PromptLookup:
    """Drafts the up to `max_tokens` tokens that followed the latest earlier occurrence of the
    context's last n-gram (of the lengths `ngrams`, longest first). One per generation: its index
    follows the context as it grows, at O(1) a token.

    >>> PromptLookup(3).propose([5, 6, 7, 8, 5, 6], limit=3, sampler=None).tokens
    [7, 8, 5]
    """

    def __init__(self, max_tokens: int, ngrams: Sequence[int] = LOOKUP_NGRAMS):
        self.max_tokens = _check_draft_tokens("lookup", max_tokens)
        self.ngrams = sorted(ngrams, reverse=True)
        self._continuation = {n: {} for n in self.ngrams}   # n-gram -> where its latest continuation starts
        self._indexed = 0

    def propose(self, context: list[int], limit: int, sampler: Sampler) -> Draft:
        self._index(context)
        for n in self.ngrams:
            start = self._continuation[n].get(tuple(context[-n:])) if len(context) >= n else None
            if start is not None:
                return Draft(context[start:start + min(limit, self.max_tokens)])
        return Draft([])

    def _index(self, context: list[int]):
        for end in range(max(self._indexed, 1), len(context)):
            for n in self.ngrams:
                if end >= n:
                    self._continuation[n][tuple(context[end - n:end])] = end
        self._indexed = len(context)


class DraftModel:
    """Drafts up to `max_tokens` tokens by sampling a smaller model of the same vocabulary token
    by token, with the generation's sampler; `cache` is its KV cache for this conversation.

    >>> DraftModel(draft.transformer, cache, 262144, 4).propose(ids, 4, sampler).tokens   # doctest: +SKIP
    [236761, 108, 818, 5279]
    """

    def __init__(self, transformer: Transformer, cache: KVCache, vocab_size: int, max_tokens: int):
        self.transformer, self.cache, self.vocab_size = transformer, cache, vocab_size
        self.max_tokens = _check_draft_tokens("draft_tokens", max_tokens)

    def propose(self, context: list[int], limit: int, sampler: Sampler) -> Draft:
        count = min(limit, self.max_tokens)
        if count == 0:
            return Draft([], [])
        logits = prefill(self.transformer, self.cache, context)[:self.vocab_size]
        drafted, distributions = [], []
        for i in range(count):
            ids, probs = sampler.distribution(logits, context + drafted)
            drafted.append(sampler.draw(ids, probs))
            distributions.append((ids, probs))
            if i + 1 < count:   # the last drafted token is fed at the next draft, if it is kept
                logits = self.transformer.run(drafted[-1:], self.cache, start=self.cache.length)[-1, :self.vocab_size]
                self.cache.token_ids.append(drafted[-1])
        return Draft(drafted, distributions)


class FirstOf:
    """Prompt lookup's draft when it finds one, else the draft model's.

    >>> FirstOf(PromptLookup(4), DraftModel(...)).propose(ids, 4, sampler)   # doctest: +SKIP
    """

    def __init__(self, *drafters: Drafter):
        self.drafters = drafters

    def propose(self, context: list[int], limit: int, sampler: Sampler) -> Draft:
        for drafter in self.drafters:
            draft = drafter.propose(context, limit, sampler)
            if draft.tokens:
                return draft
        return Draft([])


def speculative_step(transformer: Transformer, session: Session, prompt_ids: Sequence[int], params: SamplingParams,
                     rng: np.random.Generator, *, vocab_size: int, drafter: Drafter,
                     counts: Optional[SpeculationCounts] = None,
                     logits_processor: Optional[LogitsProcessor] = None) -> Iterator[int]:
    """generate_step with drafts: yield token ids forever (the caller stops), each round feeding
    the last token and `drafter`'s draft to the model in one forward and handing out the drafted
    tokens it keeps, then the one it picks after them. `counts` (when given) adds up the drafted
    and kept tokens. The session's cache follows the handed-out tokens as generate_step's does:
    when a token is yielded the cache holds every token before it, so stopping anywhere leaves
    the session as plain decoding would (its rows past the last kept token are overwritten later).

    >>> steps = speculative_step(transformer, session, ids, SamplingParams(temperature=0),
    ...                          np.random.default_rng(0), vocab_size=262144,
    ...                          drafter=PromptLookup(4))                       # doctest: +SKIP
    >>> next(steps)                                                             # doctest: +SKIP
    6037
    """
    counts = counts if counts is not None else SpeculationCounts()
    cache = session.cache
    context = list(prompt_ids)
    sampler = Sampler(params, rng, len(context), logits_processor)
    token = sampler.draw(*sampler.distribution(prefill(transformer, cache, context)[:vocab_size], context))
    while True:
        yield token
        context.append(token)
        draft = drafter.propose(context, draft_room(transformer, cache), sampler)
        rows = transformer.run([token] + draft.tokens, cache, start=cache.length, all_logits=True)
        cache.token_ids.append(token)
        counts.drafted += len(draft.tokens)
        kept, token = verify(draft, rows[:, :vocab_size], context, sampler)
        counts.accepted += len(kept)
        for drafted in kept:
            yield drafted
            context.append(drafted)
            cache.token_ids.append(drafted)


def draft_room(transformer: Transformer, cache: KVCache) -> int:
    """How many drafted tokens the next verify forward (the pending token at cache.length, then
    the draft) may hold: within MAX_DRAFT_TOKENS and the cache, and on the pending token's side of
    a LongRoPE factor switch, so that every position computes as in one-token decoding.

    >>> draft_room(transformer, session.cache)                                   # doctest: +SKIP
    7
    """
    start = cache.length
    room = min(MAX_DRAFT_TOKENS, cache.max_seq_len - start - 1)
    long_rope = transformer.uses_long_factors(start + 1)
    while room > 0 and transformer.uses_long_factors(start + 1 + room) != long_rope:
        room -= 1
    return max(room, 0)


def verify(draft: Draft, logits: np.ndarray, context: list[int], sampler: Sampler) -> tuple[list[int], int]:
    """The leading draft tokens the model keeps and the token it picks after them, from `logits`
    (len(draft.tokens) + 1, vocab): row i is the model's next-token logits after `context` and the
    first i drafted tokens.

    >>> verify(Draft([5, 9]), logits, [2, 651], sampler)                         # doctest: +SKIP
    ([5], 17)
    """
    kept = list(context)
    for i, token in enumerate(draft.tokens):
        ids, p = sampler.distribution(logits[i], kept)
        q = _one_hot(token) if draft.distributions is None else draft.distributions[i]
        if not _keeps(token, ids, p, q, sampler.rng):
            return kept[len(context):], sampler.draw(*_residual(ids, p, q))
        kept.append(token)
    return kept[len(context):], sampler.draw(*sampler.distribution(logits[len(draft.tokens)], kept))


def _keeps(token: int, ids: np.ndarray, p: np.ndarray, q, rng: np.random.Generator) -> bool:
    """Accept with probability min(1, p(token) / q(token)); no random draw when that is 0 or 1
    (always at temperature 0)."""
    ratio = _probability(token, ids, p) / _probability(token, *q)
    if ratio >= 1 or ratio <= 0:
        return ratio >= 1
    return rng.random() < ratio


def _residual(ids: np.ndarray, p: np.ndarray, q) -> tuple[np.ndarray, np.ndarray]:
    """max(0, p - q) over p's candidates (q's mass elsewhere only lowers tokens p gives 0); p itself
    if rounding left nothing."""
    q_ids, q_probs = q
    order = np.argsort(q_ids)
    sorted_ids = q_ids[order]
    at = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    q_on_p = np.where(sorted_ids[at] == ids, q_probs[order][at], 0.0)
    residual = np.maximum(p - q_on_p, 0.0)
    return (ids, residual) if residual.sum() > 0 else (ids, p)


def _one_hot(token: int) -> tuple[np.ndarray, np.ndarray]:
    return np.array([token]), np.ones(1)


def _probability(token: int, ids: np.ndarray, probs: np.ndarray) -> float:
    return float(probs[ids == token].sum())


def _check_draft_tokens(option: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_DRAFT_TOKENS:
        raise ValueError(f"{option} must be an integer from 1 to {MAX_DRAFT_TOKENS} (a verify forward of more "
                         f"than {MAX_DRAFT_TOKENS + 1} tokens would no longer match one-token decoding bit for "
                         f"bit), got {value!r}")
    return int(value)
