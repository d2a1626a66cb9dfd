"""Next-token selection: greedy, or temperature sampling narrowed by top-k, top-p and min-p.

The filters follow transformers' logits processors in their order and tie rules
(repetition penalty, then temperature, top-k, top-p, min-p), so a generation_config
means the same thing here as it does there. Everything after top-k works on the
surviving candidates only, which keeps a 256k-token vocabulary cheap.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Optional

import numpy as np

# transformers' GenerationConfig defaults: a generation_config.json omits any key at its default.
_HF_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}

# top-p first looks for its nucleus among this many best tokens; a full sort
# of the vocabulary is only needed when they hold less than top_p of the probability.
_NUCLEUS_SHORTLIST = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy; top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 switch their filter off.

    >>> SamplingParams(temperature=0.7, top_p=0.9).greedy
    False
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = (
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
        )
        for field, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{field} must be {expected}, got {getattr(self, field)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: Optional[Mapping] = None, **overrides) -> "SamplingParams":
        """Defaults as transformers would read `generation_config.json`, then explicit overrides
        (None means "keep the default"). Without `do_sample: true` the model decodes greedily.

        >>> SamplingParams.from_generation_config({"do_sample": True, "top_p": 0.95})
        SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.0, repetition_penalty=1.0)
        >>> SamplingParams.from_generation_config({}, temperature=0.8).temperature
        0.8
        """
        config = dict(config or {})
        values = {key: config[key] if config.get(key) is not None else default
                  for key, default in _HF_DEFAULTS.items()}
        if not config.get("do_sample", False):
            values["temperature"] = 0.0
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


def apply_repetition_penalty(logits: np.ndarray, context_ids: Iterable[int], penalty: float) -> np.ndarray:
    """A copy of `logits` where every token already in `context_ids` is made less likely:
    positive logits are divided by `penalty`, negative ones multiplied (CTRL / transformers rule).

    >>> apply_repetition_penalty(np.array([2.0, -2.0, 1.0]), [0, 1], 2.0).tolist()
    [1.0, -4.0, 1.0]
    """
    logits = np.array(logits, dtype=np.float32)
    seen = np.unique(np.fromiter(context_ids, dtype=np.int64))
    if seen.size and not 0 <= seen[0] <= seen[-1] < logits.size:
        bad = seen[0] if seen[0] < 0 else seen[-1]
        raise ValueError(f"context token id {bad} is outside the vocabulary (0..{logits.size - 1})")
    if penalty != 1 and seen.size:
        scores = logits[seen]
        logits[seen] = np.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens the sampler may pick and their probabilities, after temperature, top-k, top-p
    and min-p (each keeps at least one token). Greedy params keep only the argmax.

    >>> ids, probs = candidates(np.log([0.5, 0.3, 0.2]), SamplingParams(top_p=0.7))
    >>> ids.tolist(), np.round(probs, 3).tolist()
    ([0, 1], [0.625, 0.375])
    """
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
    best = int(np.argmax(logits))   # the first NaN if there is one, as max() would give NaN
    if not np.isfinite(logits[best]):
        raise ValueError(f"logits must hold no NaN or +inf and not be all -inf; their max is {logits[best]}")
    if params.greedy:   # one pass over the vocabulary: a batched step samples 4 x 262144 logits
        return np.array([best]), np.ones(1)
    scores = logits.astype(np.float64) / params.temperature
    ids = _top_k_ids(scores, params.top_k)
    weights = np.exp(scores[ids] - scores[ids].max())
    if params.top_p < 1:
        ids, weights = _nucleus(ids, weights, params.top_p)
    if params.min_p > 0:
        keep = weights >= params.min_p * weights.max()
        ids, weights = ids[keep], weights[keep]
    return ids, weights / weights.sum()


def distribution(logits: np.ndarray, params: SamplingParams, context_ids: Iterable[int] = ()):
    """What `sample` draws from: the candidate ids and their probabilities after the repetition
    penalty (over `context_ids`) and `candidates`' filters. Speculative decoding compares the
    target's and the draft's distributions through it.

    >>> ids, probs = distribution(np.log([0.5, 0.3, 0.2]), SamplingParams(top_k=2))
    >>> ids.tolist(), np.round(probs, 3).tolist()
    ([0, 1], [0.625, 0.375])
    """
    if params.repetition_penalty != 1:
        logits = apply_repetition_penalty(logits, context_ids, params.repetition_penalty)
    return candidates(logits, params)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           context_ids: Iterable[int] = ()) -> int:
    """Pick the next token id from one position's `logits`. `context_ids` (prompt and output so
    far) feed the repetition penalty; `rng` makes the choice reproducible.

    >>> sample(np.array([0.1, 3.0, 0.2]), SamplingParams(temperature=0), np.random.default_rng(0))
    1
    """
    ids, probs = distribution(logits, params, context_ids)
    if params.greedy:   # the argmax, the one candidate: no draw (a batched step samples every row each step)
        return int(ids[0])
    return draw(ids, probs, rng)


def draw(ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    """One id of `ids` drawn with weights `probs` (which need not sum to 1), with one rng.random().

    >>> draw(np.array([7, 9]), np.array([0.0, 2.0]), np.random.default_rng(0))
    9
    """
    # inverse CDF; side="right" can never land on a zero-probability token
    pick = np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right")
    return int(ids[min(pick, np.flatnonzero(probs)[-1])])


def _top_k_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of tokens scoring at least the k-th best score (ties at the edge all stay)."""
    if k == 0 or k >= scores.size:
        return np.arange(scores.size)
    kth_best = np.partition(scores, scores.size - k)[scores.size - k]
    return np.flatnonzero(scores >= kth_best)


def _nucleus(ids: np.ndarray, weights: np.ndarray, top_p: float):
    """The best tokens, best first, while the weight ranked strictly above each is below top_p
    of the total: the smallest prefix reaching top_p, as transformers' TopPLogitsWarper keeps."""
    total = weights.sum()
    if ids.size > _NUCLEUS_SHORTLIST:
        shortlist = np.argpartition(weights, ids.size - _NUCLEUS_SHORTLIST)[-_NUCLEUS_SHORTLIST:]
        if weights[shortlist].sum() >= top_p * total:  # the nucleus lies inside the shortlist
            ids, weights = ids[shortlist], weights[shortlist]
    order = np.argsort(-weights, kind="stable")
    ids, weights = ids[order], weights[order]
    mass_before = (np.cumsum(weights) - weights) / total
    keep = max(1, int(np.count_nonzero(mass_before < top_p)))
    return ids[:keep], weights[:keep]
