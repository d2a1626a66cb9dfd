"""Batched decoding: Transformer.run_batch against lone steps, and the BatchEngine against lone generations."""
import copy
import threading

import numpy as np
import pytest

from blobstore.convert import convert
from blobstore.runtime import demo, load
from blobstore.runtime.batch import BatchEngine
from blobstore.runtime.sampling import SamplingParams

pytest.importorskip("torch")

FAMILIES = ["gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3"]


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


@pytest.fixture(scope="session")
def wide_gemma3(spm_model, tmp_path_factory):
    """dtype → a Gemma 3 blob with the real 270M's 640 columns: its q8_0 and q4_0 rows of 640 and 320
    bytes go one per decode tile, so a batched step runs the few-token tile (csrc/matmul.c)."""
    from conftest import build_checkpoint
    root = tmp_path_factory.mktemp("wide_gemma3")
    folder = build_checkpoint(root / "ckpt", "gemma3", spm_model, hidden_size=640, intermediate_size=320)
    done = {}

    def get(dtype):
        if dtype not in done:
            done[dtype] = root / f"{dtype}.blob"
            convert(folder, done[dtype], dtype=dtype, quiet=True)
        return done[dtype]
    return get


def prefilled_caches(model, count, seed=0):
    """`count` caches holding prompts of different lengths (3, 10, 17, ...: past Gemma 2's and 3's
    8-token windows), and the next token of each."""
    rng = np.random.default_rng(seed)
    caches, tokens = [], []
    for i in range(count):
        ids = [2] + rng.integers(4, model.config.vocab_size, 2 + 7 * i).tolist()
        cache = model.new_session().cache
        model.transformer.run(ids, cache, start=0)
        cache.token_ids.extend(ids)
        caches.append(cache)
        tokens.append(int(rng.integers(4, model.config.vocab_size)))
    return caches, tokens


def lone_and_batched(model, count):
    """(lone logits, batched logits, lone caches' K and V, batched caches' K and V) of one step of
    `count` sequences."""
    caches, tokens = prefilled_caches(model, count)
    twins = [copy.deepcopy(c) for c in caches]
    lone = np.concatenate([model.transformer.run([t], c, start=c.length) for t, c in zip(tokens, twins)])
    batched = model.transformer.run_batch(tokens, caches, [c.length for c in caches])
    kv = lambda group: np.stack([np.stack([c.k, c.v]) for c in group])   # noqa: E731
    return lone, batched, kv(twins), kv(caches)


@pytest.mark.parametrize("dtype", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_batched_step_equals_lone_steps_bit_for_bit(packed_batch, name, dtype):
    """Up to 8 rows the products run the decode tiles, each token's sums as alone, so every weight
    type gives exactly the lone step's numbers (csrc/matmul.c, decode_tiles)."""
    model = load(packed_batch(name, dtype))
    for count in range(1, 6):
        lone, batched, lone_kv, batched_kv = lone_and_batched(model, count)
        assert batched.shape == (count, model.config.vocab_size) and batched.dtype == np.float32
        assert np.array_equal(batched, lone), f"{count} sequences: max |difference| {np.abs(batched - lone).max()}"
        assert np.array_equal(batched_kv, lone_kv)   # each step's keys and values went to its own cache


# ---- the engine ----

def prompts(model, count):
    rng = np.random.default_rng(5)
    return [[2] + rng.integers(4, model.decodable_vocab_size, 3 + 4 * i).tolist() for i in range(count)]


def drain(stream, timeout=30):
    """The stream's tokens, read on a helper thread so that a hung engine fails the test."""
    tokens, errors = [], []

    def read():
        try:
            tokens.extend(stream)
        except Exception as error:
            errors.append(error)
    reader = threading.Thread(target=read)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), "the stream hung"
    if errors:
        raise errors[0]
    return tokens


@pytest.fixture(scope="module")
def q8_model(packed_batch):
    return load(packed_batch("gemma3", "q8_0"))


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_a_batched_step_over_long_rows_equals_lone_steps_bit_for_bit(wide_gemma3, dtype):
    """Rows of more than 256 bytes: 2..8 sequences' products run the few-token tile, up to four
    tokens at once, and still give each sequence exactly its lone step's logits and cache rows."""
    model = load(wide_gemma3(dtype))
    for count in (2, 3, 5, 8):
        lone, batched, lone_kv, batched_kv = lone_and_batched(model, count)
        assert np.array_equal(batched, lone), f"{count} sequences: max |difference| {np.abs(batched - lone).max()}"
        assert np.array_equal(batched_kv, lone_kv)


def test_four_batched_greedy_streams_equal_each_alone(q8_model):
    model = q8_model
    greedy = SamplingParams(temperature=0)
    lengths = [12, 20, 7, 16, 10]   # they leave the batch at different steps; the fifth waits for a slot
    with BatchEngine(model, max_active=4) as engine:
        streams = [engine.submit(model.new_session(), ids, greedy, n)
                   for ids, n in zip(prompts(model, 5), lengths)]
        batched = [drain(s) for s in streams]
    alone = [model.generate(ids, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids
             for ids, n in zip(prompts(model, 5), lengths)]
    assert batched == alone and [len(t) for t in batched] == lengths
    assert all(s.finish_reason == "length" for s in streams)


def test_seeded_sampling_gives_each_stream_the_tokens_it_gets_alone(q8_model):
    model = q8_model
    options = dict(temperature=0.9, top_p=0.95, top_k=40)
    params = SamplingParams(**options)
    with BatchEngine(model, max_active=4) as engine:
        streams = [engine.submit(model.new_session(), ids, params, 16, seed=10 + i)
                   for i, ids in enumerate(prompts(model, 4))]
        batched = [drain(s) for s in streams]
    alone = [model.generate(ids, max_new_tokens=16, seed=10 + i, ignore_eos=True, **options).token_ids
             for i, ids in enumerate(prompts(model, 4))]
    assert batched == alone
    assert len({tuple(t) for t in batched}) == 4


def test_a_stop_id_ends_the_stream_without_being_yielded(q8_model):
    model = q8_model
    ids = prompts(model, 1)[0]
    with BatchEngine(model) as engine:
        full = drain(engine.submit(model.new_session(), ids, SamplingParams(temperature=0), 12))
        stream = engine.submit(model.new_session(), ids, SamplingParams(temperature=0), 12, stop_ids=[full[5]])
        cut = drain(stream)
    assert cut == full[:full.index(full[5])] and stream.finish_reason == "stop"


def test_a_cancelled_or_dropped_stream_frees_its_slot(q8_model):
    model = q8_model
    first, second, third = prompts(model, 3)
    with BatchEngine(model, max_active=1) as engine:
        long = engine.submit(model.new_session(), first, SamplingParams(temperature=0), 200)
        assert [next(long), next(long)]
        waiting = engine.submit(model.new_session(), second, SamplingParams(temperature=0), 5)
        long.cancel()
        assert len(drain(waiting)) == 5   # it got the only slot
        dropped = engine.submit(model.new_session(), first, SamplingParams(temperature=0), 200)
        next(dropped)
        del dropped                       # a consumer that stops iterating
        assert len(drain(engine.submit(model.new_session(), third, SamplingParams(temperature=0), 5))) == 5


def held_until(event: threading.Event):
    """A logits processor that holds its request's first token until `event` is set."""
    def processor(generated, logits):
        event.wait()
        return logits
    return processor


def test_one_session_runs_one_request_at_a_time(q8_model):
    model = q8_model
    session = model.new_session()
    ids = prompts(model, 1)[0]
    checked = threading.Event()
    with BatchEngine(model) as engine:   # the request cannot end before the checks ran
        stream = engine.submit(session, ids, SamplingParams(temperature=0), 50, logits_processor=held_until(checked))
        with pytest.raises(RuntimeError, match="session is generating"):
            engine.submit(session, ids, SamplingParams(temperature=0), 5)
        with pytest.raises(RuntimeError, match="session is generating"):
            model.generate(ids, session=session, max_new_tokens=2)
        checked.set()
        drain(stream)
        assert len(drain(engine.submit(session, ids, SamplingParams(temperature=0), 5))) == 5   # free again


def test_wait_after_cancel_returns_once_the_session_is_free(q8_model):
    model = q8_model
    session = model.new_session()
    ids = prompts(model, 1)[0]
    cancelled = threading.Event()
    with BatchEngine(model) as engine:   # the request cannot run to its length first
        stream = engine.submit(session, ids, SamplingParams(temperature=0), 200,
                               logits_processor=held_until(cancelled))
        stream.cancel()
        cancelled.set()
        stream.wait()
        assert stream.finish_reason == "cancelled"
        assert len(drain(engine.submit(session, ids, SamplingParams(temperature=0), 3))) == 3   # no RuntimeError


def test_model_stream_through_an_engine_gives_the_text_of_a_lone_stream():
    model = load(demo.demo_path(), max_seq_len=256)
    ids = model.tokenizer.encode("And Moses said unto the people,")
    options = dict(max_new_tokens=16, temperature=0)
    whole = model.generate(ids, session=model.new_session(), **options).text
    options["stop"] = [whole[len(whole) // 2:][:3]]   # a stop string that comes mid-answer
    alone = model.generate(ids, session=model.new_session(), **options)
    with BatchEngine(model, max_active=2) as engine:
        rival = engine.submit(model.new_session(), model.tokenizer.encode("In the beginning"),
                              SamplingParams(temperature=0), 30)
        chunks = list(model.stream(ids, session=model.new_session(), batch=engine, **options))
        rival.cancel()
    assert alone.finish_reason == "stop" and 0 < len(alone.text) < len(whole)
    assert "".join(c.text for c in chunks) == alone.text and chunks[-1].finish_reason == "stop"
    assert chunks[-1].stats.generated_tokens == alone.stats.generated_tokens


class _FailingTransformer:
    """The model's transformer, whose batched step raises from call number `at` on."""

    def __init__(self, transformer, at):
        self.transformer, self.at, self.calls = transformer, at, 0

    def run(self, *args, **kwargs):
        return self.transformer.run(*args, **kwargs)

    def run_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.at:
            raise MemoryError("step failed")
        return self.transformer.run_batch(*args, **kwargs)


def test_an_error_in_a_step_reaches_every_consumer_and_the_engine_goes_on(q8_model):
    model = q8_model
    engine = BatchEngine(model, max_active=4)
    failing = _FailingTransformer(model.transformer, at=3)
    engine.transformer = failing
    streams = [engine.submit(model.new_session(), ids, SamplingParams(temperature=0), 20)
               for ids in prompts(model, 3)]
    for stream in streams:
        with pytest.raises(MemoryError, match="step failed"):
            drain(stream)
        assert stream.finish_reason == "error"
    engine.transformer = model.transformer
    assert len(drain(engine.submit(model.new_session(), prompts(model, 1)[0], SamplingParams(temperature=0), 4))) == 4
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(model.new_session(), [2, 5], SamplingParams(temperature=0), 4)


def test_bad_requests_are_refused_at_submit(q8_model):
    model = q8_model
    with BatchEngine(model) as engine:
        with pytest.raises(ValueError, match="prompt is empty"):
            engine.submit(model.new_session(), [], SamplingParams(), 4)
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
            engine.submit(model.new_session(), [2], SamplingParams(), -1)
        stream = engine.submit(model.new_session(), [2, 7], SamplingParams(), 0)
        assert drain(stream) == [] and stream.finish_reason == "length"


def test_longrope_rows_use_the_factor_set_their_lone_step_would(tmp_path, spm_model):
    """Phi-3 with an original context of 32: one cache in the short regime, one that crosses into
    the long one at this step (it runs alone, recomputing its prefix), one already long."""
    from test_phi3 import VARIANTS, build_phi3
    convert(build_phi3(tmp_path / "phi3", spm_model, **VARIANTS["longrope"]), tmp_path / "p.blob", dtype="q8_0",
            quiet=True)
    model = load(tmp_path / "p.blob")
    rng = np.random.default_rng(3)
    caches = []
    for length in (20, 32, 40):
        cache = model.new_session().cache
        ids = [2] + rng.integers(4, 400, length - 1).tolist()
        model.transformer.run(ids, cache, start=0)
        cache.token_ids.extend(ids)
        caches.append(cache)
    assert [c.long_rope for c in caches] == [False, False, True]
    twins = [copy.deepcopy(c) for c in caches]
    tokens = [7, 8, 9]
    lone = np.concatenate([model.transformer.run([t], c, start=c.length) for t, c in zip(tokens, twins)])
    batched = model.transformer.run_batch(tokens, caches, [c.length for c in caches])
    assert np.array_equal(batched, lone)
    assert [c.long_rope for c in caches] == [t.long_rope for t in twins] == [False, True, True]
    assert all(np.array_equal(c.k, t.k) for c, t in zip(caches, twins))


def test_run_batch_refuses_inconsistent_arguments(q8_model):
    model = q8_model
    caches, tokens = prefilled_caches(model, 2)
    with pytest.raises(ValueError, match="need as many caches and positions"):
        model.transformer.run_batch(tokens, caches, [caches[0].length])
    with pytest.raises(ValueError, match="a cache appears twice"):
        model.transformer.run_batch(tokens, [caches[0], caches[0]], [caches[0].length] * 2)
    with pytest.raises(ValueError, match="sequence 1 is at position 3, but its cache holds 10 tokens"):
        model.transformer.run_batch(tokens, caches, [3, 3])
    with pytest.raises(IndexError, match="out of range"):
        model.transformer.run_batch([0, model.config.vocab_size], caches, [c.length for c in caches])


def test_a_logits_processor_acts_as_in_generate_and_its_errors_end_only_its_request(q8_model):
    model = q8_model
    first, second = prompts(model, 2)

    def forbid_even(generated, logits):
        masked = logits.copy()
        masked[::2] = -np.inf
        return masked

    def broken(generated, logits):
        if len(generated) == 3:
            raise ValueError("grammar failed")
        return logits

    with BatchEngine(model) as engine:
        masked = engine.submit(model.new_session(), first, SamplingParams(temperature=0), 10,
                               logits_processor=forbid_even)
        failing = engine.submit(model.new_session(), second, SamplingParams(temperature=0), 10,
                                logits_processor=broken)
        tokens = drain(masked)
        with pytest.raises(ValueError, match="grammar failed"):
            drain(failing)
    alone = model.generate(first, max_new_tokens=10, temperature=0, ignore_eos=True, logits_processor=forbid_even)
    assert tokens == alone.token_ids and all(t % 2 for t in tokens)
