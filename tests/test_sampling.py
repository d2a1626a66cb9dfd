"""Sampler: reproducible, never picks an excluded token, filters agree with transformers."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
hf = pytest.importorskip("transformers.generation.logits_process")
MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper = (
    hf.MinPLogitsWarper, hf.RepetitionPenaltyLogitsProcessor, hf.TemperatureLogitsWarper, hf.TopKLogitsWarper,
    hf.TopPLogitsWarper)

from blobstore.runtime.sampling import (
    SamplingParams, apply_repetition_penalty, candidates, sample,
)


def hf_kept(logits, params):
    """Indices and probabilities transformers' warper chain leaves for sampling."""
    scores = torch.tensor(logits, dtype=torch.float32)[None]
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warp in warpers:
        scores = warp(None, scores)
    probs = torch.softmax(scores, dim=-1)[0].numpy()
    kept = np.flatnonzero(np.isfinite(scores[0].numpy()))
    return kept, probs[kept]


FILTERS = [
    SamplingParams(top_k=1), SamplingParams(top_k=7), SamplingParams(top_p=0.5),
    SamplingParams(top_p=0.9, temperature=0.7), SamplingParams(min_p=0.1),
    SamplingParams(min_p=0.3, temperature=1.5), SamplingParams(top_k=40, top_p=0.8, min_p=0.05),
    SamplingParams(top_k=3, top_p=0.99, min_p=0.5, temperature=0.5),
]


@pytest.mark.parametrize("params", FILTERS, ids=repr)
@pytest.mark.parametrize("seed", range(4))
def test_kept_set_and_probabilities_match_transformers(params, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(1000) * rng.uniform(0.5, 4)).astype(np.float32)
    ids, probs = candidates(logits, params)
    hf_ids, hf_probs = hf_kept(logits, params)
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], hf_ids)
    np.testing.assert_allclose(probs[order], hf_probs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale", [0.3, 8.0], ids=["flat", "peaked"])
def test_top_p_on_a_large_vocabulary_matches_transformers(scale):
    # a peaked distribution keeps its nucleus inside the shortlist; a flat one needs the full sort
    logits = (np.random.default_rng(5).standard_normal(20000) * scale).astype(np.float32)
    params = SamplingParams(top_p=0.9)
    ids, _ = candidates(logits, params)
    np.testing.assert_array_equal(np.sort(ids), hf_kept(logits, params)[0])


def test_top_k_keeps_ties_at_the_edge_like_transformers():
    logits = np.array([1, 3, 2, 3, 2, 0, 2], dtype=np.float32)
    ids, _ = candidates(logits, SamplingParams(top_k=3))
    assert sorted(ids.tolist()) == hf_kept(logits, SamplingParams(top_k=3))[0].tolist() == [1, 2, 3, 4, 6]


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    context = rng.integers(0, 50, 30)  # with repeats: each token is penalized once
    expected = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor(context)[None], torch.tensor(logits)[None])[0].numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, context.tolist(), penalty), expected, rtol=1e-6)


def test_repetition_penalty_changes_the_greedy_choice():
    logits = np.array([0.0, 2.0, 1.5], dtype=np.float32)
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(logits, greedy, np.random.default_rng(0)) == 1
    assert sample(logits, greedy, np.random.default_rng(0), context_ids=[1]) == 2


def test_greedy_is_argmax_and_ignores_the_other_filters():
    logits = np.random.default_rng(2).standard_normal(300).astype(np.float32)
    params = SamplingParams(temperature=0, top_k=5, top_p=0.1, min_p=0.9)
    assert sample(logits, params, np.random.default_rng(3)) == int(np.argmax(logits))


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = np.random.default_rng(4).standard_normal(500).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sample(logits, params, rng) for _ in range(64)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_draws_follow_the_softmax_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    rng = np.random.default_rng(7)
    counts = np.bincount([sample(logits, SamplingParams(), rng) for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.25, 0.15, 0.1], atol=0.015)


finite_logits = st.lists(st.floats(-30, 30, width=32), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(values=finite_logits, masked=st.lists(st.booleans(), min_size=60, max_size=60),
       temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]), top_k=st.integers(0, 10),
       top_p=st.floats(0.01, 1.0), min_p=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_never_picks_an_excluded_token(values, masked, temperature, top_k, top_p, min_p, seed):
    logits = np.array(values, dtype=np.float32)
    logits[np.array(masked[:len(values)]) & (np.arange(len(values)) > 0)] = -np.inf  # token 0 stays
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ids, probs = candidates(logits, params)
    rng = np.random.default_rng(seed)
    for _ in range(10):
        token = sample(logits, params, rng)
        assert token in ids[probs > 0] and np.isfinite(logits[token])
        if top_k:
            assert np.count_nonzero(logits > logits[token]) < top_k
        if temperature and min_p:  # min-p compares to the best token, which every filter keeps
            assert (logits[token] - logits.max()) / temperature >= np.log(min_p) - 1e-6


def test_generation_config_defaults_follow_transformers():
    assert SamplingParams.from_generation_config(None).greedy
    assert SamplingParams.from_generation_config({"temperature": 0.6, "top_p": 0.9}).greedy  # no do_sample
    params = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                    "eos_token_id": [1, 107]})
    assert params == SamplingParams(temperature=0.6, top_k=50, top_p=0.9)
    overridden = SamplingParams.from_generation_config({"do_sample": True, "top_k": 64},
                                                       top_k=None, temperature=0.0, min_p=0.05)
    assert overridden == SamplingParams(temperature=0.0, top_k=64, min_p=0.05)


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0),
                                          ("top_p", 1.5), ("min_p", -0.2), ("repetition_penalty", 0.0)])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("logits, message", [
    (np.zeros((2, 3), np.float32), "1-D"), (np.zeros(0, np.float32), "non-empty"),
    (np.array([0.0, np.nan], np.float32), "no NaN"), (np.full(3, -np.inf, np.float32), "all -inf"),
])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0)], ids=["sampled", "greedy"])
def test_bad_logits_are_rejected(logits, message, params):
    with pytest.raises(ValueError, match=message):
        sample(logits, params, np.random.default_rng(0))


@pytest.mark.parametrize("context, bad", [([0, 5], 5), ([-1, 2], -1)])
def test_repetition_context_outside_the_vocabulary_is_rejected(context, bad):
    with pytest.raises(ValueError, match=f"context token id {bad} is outside"):
        sample(np.zeros(3, np.float32), SamplingParams(repetition_penalty=1.2), np.random.default_rng(0), context)
