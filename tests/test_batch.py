"""Batched decoding: Transformer.run_batch against lone steps, and the BatchEngine against lone generations."""
import copy

import numpy as np
import pytest

from blobstore.convert import convert
from blobstore.runtime import load

pytest.importorskip("torch")

FAMILIES = ["gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3"]
QUANTIZED = ["q8_0", "q4_0"]


@pytest.fixture(scope="session")
def packed_batch(checkpoints, tmp_path_factory):
    """(family, dtype) → blob path; converted once per session."""
    root = tmp_path_factory.mktemp("packed_batch")
    done = {}

    def get(name, dtype):
        if (name, dtype) not in done:
            done[name, dtype] = root / f"{name}-{dtype}.blob"
            convert(checkpoints(name), done[name, dtype], dtype=dtype, quiet=True)
        return done[name, dtype]
    return get


def prefilled_caches(model, count, seed=0):
    """`count` caches holding prompts of different lengths (3, 10, 17, ...: past Gemma 2's and 3's
    8-token windows), and the next token of each."""
    rng = np.random.default_rng(seed)
    caches, tokens = [], []
    for i in range(count):
        ids = [2] + rng.integers(4, model.config.vocab_size, 2 + 7 * i).tolist()
        cache = model.new_cache() if hasattr(model, "new_cache") else _cache_like(model.cache)
        model.transformer.run(ids, cache, start=0)
        cache.token_ids.extend(ids)
        caches.append(cache)
        tokens.append(int(rng.integers(4, model.config.vocab_size)))
    return caches, tokens


def _cache_like(cache):
    fresh = copy.copy(cache)
    fresh.k, fresh.v, fresh.token_ids = np.zeros_like(cache.k), np.zeros_like(cache.v), []
    return fresh


def lone_and_batched(model, count):
    """(lone logits, batched logits, lone caches' K and V, batched caches' K and V) of one step of
    `count` sequences."""
    caches, tokens = prefilled_caches(model, count)
    twins = [copy.deepcopy(c) for c in caches]
    lone = np.concatenate([model.transformer.run([t], c, start=c.length) for t, c in zip(tokens, twins)])
    batched = model.transformer.run_batch(tokens, caches, [c.length for c in caches])
    kv = lambda group: np.stack([np.stack([c.k, c.v]) for c in group])   # noqa: E731
    return lone, batched, kv(twins), kv(caches)


@pytest.mark.parametrize("dtype", QUANTIZED)
@pytest.mark.parametrize("name", FAMILIES)
def test_a_batched_step_equals_lone_steps_bit_for_bit_with_quantized_weights(packed_batch, name, dtype):
    model = load(packed_batch(name, dtype))
    for count in range(1, 6):
        lone, batched, lone_kv, batched_kv = lone_and_batched(model, count)
        assert batched.shape == (count, model.config.vocab_size) and batched.dtype == np.float32
        assert np.array_equal(batched, lone), f"{count} sequences: max |difference| {np.abs(batched - lone).max()}"
        assert np.array_equal(batched_kv, lone_kv)   # each step's keys and values went to its own cache


@pytest.mark.parametrize("name", FAMILIES)
def test_a_batched_step_equals_lone_steps_to_rounding_with_float_weights(packed_batch, name):
    model = load(packed_batch(name, "f32"))
    for count in (1, 5):
        lone, batched, lone_kv, batched_kv = lone_and_batched(model, count)
        assert np.abs(batched - lone).max() <= 1e-5 * np.abs(lone).max()
        assert np.abs(batched_kv - lone_kv).max() <= 1e-5 * np.abs(lone_kv).max()
