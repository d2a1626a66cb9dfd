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
    batched = model.transformer.run_batch([[t] for t in tokens], caches, [c.length for c in caches])
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


# (prefix tokens already in the cache, tokens of the run) of each sequence of a mixed step: decode
# tokens, a short prompt (5 tokens: decode tiles, as alone) and long ones (prefill tiles), from
# position 0 and after a prefix, in an order that makes the forward multiply short and long runs
# in several products; the short runs hold 8 tokens in all
MIXED_STEP = [(10, 1), (0, 12), (0, 5), (3, 1), (7, 20), (17, 1)]


def lone_and_mixed(model, shape=MIXED_STEP, seed=1):
    """(lone logits, batched logits, lone caches' K and V, batched caches' K and V) of one step of
    runs of the `shape` (prefix, run length) pairs: each run's last logits."""
    rng = np.random.default_rng(seed)
    caches, runs = [], []
    for prefix, length in shape:
        ids = [2] + rng.integers(4, model.config.vocab_size, prefix + length - 1).tolist()
        cache = model.new_session().cache
        if prefix:
            model.transformer.run(ids[:prefix], cache, start=0)
            cache.token_ids.extend(ids[:prefix])
        caches.append(cache)
        runs.append(ids[prefix:])
    twins = [copy.deepcopy(c) for c in caches]
    lone = np.concatenate([model.transformer.run(r, c, start=c.length) for r, c in zip(runs, twins)])
    batched = model.transformer.run_batch(runs, caches, [c.length for c in caches])
    kv = lambda group: [np.stack([c.k, c.v]) for c in group]   # noqa: E731
    return lone, batched, kv(twins), kv(caches)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0", "q5_1"])
@pytest.mark.parametrize("name", ["gemma3", "llama", "qwen2"])
def test_a_step_mixing_prompt_chunks_and_decode_tokens_equals_each_run_alone(packed_batch, name, dtype):
    """Newcomers' prompt chunks and running sequences' next tokens in one forward: each run gets
    exactly the logits and cache rows of its lone `run`, float weights too (short runs are
    multiplied apart from long ones, each with the tiles its lone call takes)."""
    model = load(packed_batch(name, dtype))
    lone, batched, lone_kv, batched_kv = lone_and_mixed(model)
    assert batched.shape == (len(MIXED_STEP), model.config.vocab_size)
    assert np.array_equal(batched, lone), f"max |difference| {np.abs(batched - lone).max()}"
    for i, (alone, together) in enumerate(zip(lone_kv, batched_kv)):
        assert np.array_equal(together, alone), f"sequence {i}: its keys and values differ"


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_more_than_8_short_runs_still_equal_each_run_alone(packed_batch, dtype):
    """Short runs holding more than 8 tokens in all go through the decode tiles 8 rows at a time:
    every run still gets exactly its lone numbers, f32 weights too."""
    shape = [(4 + i, 1) for i in range(7)] + [(0, 6), (2, 30), (3, 1), (1, 8)]
    lone, batched, lone_kv, batched_kv = lone_and_mixed(load(packed_batch("llama", dtype)), shape)
    assert np.array_equal(batched, lone), f"max |difference| {np.abs(batched - lone).max()}"
    assert all(np.array_equal(b, a) for a, b in zip(lone_kv, batched_kv))


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


def alone(model, ids, count, **options):
    return model.generate(ids, session=model.new_session(), max_new_tokens=count, temperature=0, ignore_eos=True,
                          **options).token_ids


@pytest.fixture
def small_chunks(prefill_chunk):
    """Prompts cut in chunks of 4 tokens, and a step taking 4 prompt tokens at most."""
    prefill_chunk(4)


def test_newcomers_prefill_together_in_one_step(q8_model):
    """Requests that arrive together prefill in one forward (their prompts fit PREFILL_CHUNK),
    beside the running stream's next token, each giving the tokens it gives alone."""
    model = q8_model
    ids = prompts(model, 4)
    engine = BatchEngine(model, max_active=4)
    stepped, held = threading.Event(), threading.Event()
    watched = engine.transformer = _Watched(model.transformer, on_step=lambda runs: stepped.set())
    with engine:   # the first request's prompt runs alone, then it holds the engine until the others are queued
        streams = [engine.submit(model.new_session(), ids[0], SamplingParams(temperature=0), 6,
                                 logits_processor=held_at(0, held))]
        stepped.wait()
        streams += [engine.submit(model.new_session(), p, SamplingParams(temperature=0), 6) for p in ids[1:]]
        held.set()
        batched = [drain(s) for s in streams]
    assert batched == [alone(model, p, 6) for p in ids]
    assert watched.steps[:2] == [[ids[0]], [batched[0][:1]] + ids[1:]]   # three prompts beside a decode token
    assert len(watched.steps) == 1 + 6


def held_at(count: int, event: threading.Event):
    """A logits processor that holds its request's token number `count` + 1 until `event` is set."""
    def processor(generated, logits):
        if len(generated) == count:
            event.wait()
        return logits
    return processor


def test_a_newcomer_prefills_in_chunks_while_others_decode(q8_model, small_chunks):
    """A long prompt arriving while a stream decodes goes in 4-token chunks, one per step beside
    the running stream's tokens, which keep coming; prompts of different lengths, one request
    ending on a stop id mid-way: each gets exactly its lone tokens."""
    model = q8_model
    first, second, third = prompts(model, 3)
    long_prompt = first + second + third   # 24 tokens
    stop = alone(model, third, 12)[5]
    engine = BatchEngine(model, max_active=4)
    watched = engine.transformer = _Watched(model.transformer)
    go = threading.Event()
    with engine:
        running = engine.submit(model.new_session(), first, SamplingParams(temperature=0), 30,
                                logits_processor=held_at(3, go))
        head = [next(running) for _ in range(3)]   # it is decoding, held before its fourth token
        newcomers = [engine.submit(model.new_session(), long_prompt, SamplingParams(temperature=0), 10),
                     engine.submit(model.new_session(), third, SamplingParams(temperature=0), 12, stop_ids=[stop])]
        go.set()
        batched = [head + drain(running)] + [drain(s) for s in newcomers]
    lone = [alone(model, first, 30), alone(model, long_prompt, 10), alone(model, third, 12)]
    assert batched[:2] == lone[:2] and batched[2] == lone[2][:lone[2].index(stop)]
    assert newcomers[1].finish_reason == "stop"
    chunks = [long_prompt[i:i + 4] for i in range(0, len(long_prompt), 4)]
    beside_decoding = [run for step in watched.steps if [len(r) for r in step].count(1) for run in step]
    assert all(chunk in beside_decoding for chunk in chunks)


def test_a_request_cancelled_mid_prompt_leaves_a_prefix_the_next_one_reuses(q8_model, small_chunks):
    """Cancelled after two of its chunks: the others go on unchanged, and the session's cache holds
    those 8 prompt tokens, which the next request on it reuses (its first run starts after them)."""
    model = q8_model
    first, second, third = prompts(model, 3)
    long_prompt = second + third + first
    session = model.new_session()
    engine = BatchEngine(model, max_active=4)
    chunks_seen = []

    def cancel_after_two_chunks(runs):
        chunks_seen.extend(run for run in runs if run in (long_prompt[:4], long_prompt[4:8]))
        if len(chunks_seen) == 2:
            victim.cancel()
    watched = engine.transformer = _Watched(model.transformer, on_step=cancel_after_two_chunks)
    with engine:
        other = engine.submit(model.new_session(), first, SamplingParams(temperature=0), 20)
        victim = engine.submit(session, long_prompt, SamplingParams(temperature=0), 10)
        assert drain(victim) == [] and victim.finish_reason == "cancelled"
        assert session.token_ids == long_prompt[:8]
        watched.steps.clear()
        again = engine.submit(session, long_prompt, SamplingParams(temperature=0), 10)
        resumed = drain(again)
        others = drain(other)
    assert resumed == alone(model, long_prompt, 10) and others == alone(model, first, 20)
    fed = [run for step in watched.steps for run in step if len(run) > 1]
    assert fed == [long_prompt[i:i + 4] for i in range(8, len(long_prompt), 4)]


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


def test_one_session_runs_one_request_at_a_time(q8_model):
    model = q8_model
    session = model.new_session()
    ids = prompts(model, 1)[0]
    checked = threading.Event()
    with BatchEngine(model) as engine:   # the request cannot end before the checks ran
        stream = engine.submit(session, ids, SamplingParams(temperature=0), 50, logits_processor=held_at(0, checked))
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
                               logits_processor=held_at(0, cancelled))
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


class _Watched:
    """The model's transformer, noting each batched step's runs; `on_step(runs)` is called
    before each step, and from call number `fail_at` on the step raises."""

    def __init__(self, transformer, fail_at=None, on_step=None):
        self.transformer, self.fail_at, self.on_step = transformer, fail_at, on_step
        self.steps = []

    def run_batch(self, runs, *args, **kwargs):
        self.steps.append([list(run) for run in runs])
        if self.on_step:
            self.on_step(runs)
        if self.fail_at is not None and len(self.steps) >= self.fail_at:
            raise MemoryError("step failed")
        return self.transformer.run_batch(runs, *args, **kwargs)


def test_an_error_in_a_step_reaches_every_consumer_and_the_engine_goes_on(q8_model):
    model = q8_model
    engine = BatchEngine(model, max_active=4)
    engine.transformer = _Watched(model.transformer, fail_at=3)
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
    batched = model.transformer.run_batch([[t] for t in tokens], caches, [c.length for c in caches])
    assert np.array_equal(batched, lone)
    assert [c.long_rope for c in caches] == [t.long_rope for t in twins] == [False, True, True]
    assert all(np.array_equal(c.k, t.k) for c, t in zip(caches, twins))


def test_run_batch_refuses_inconsistent_arguments(q8_model):
    model = q8_model
    caches, tokens = prefilled_caches(model, 2)
    runs = [[t] for t in tokens]
    with pytest.raises(ValueError, match="need as many caches and positions"):
        model.transformer.run_batch(runs, caches, [caches[0].length])
    with pytest.raises(ValueError, match="a cache appears twice"):
        model.transformer.run_batch(runs, [caches[0], caches[0]], [caches[0].length] * 2)
    with pytest.raises(ValueError, match="sequence 1 is at position 3, but its cache holds 10 tokens"):
        model.transformer.run_batch(runs, caches, [3, 3])
    with pytest.raises(ValueError, match="run 1 is empty"):
        model.transformer.run_batch([runs[0], []], caches, [c.length for c in caches])
    with pytest.raises(IndexError, match="out of range"):
        model.transformer.run_batch([[0], [model.config.vocab_size]], caches, [c.length for c in caches])


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
