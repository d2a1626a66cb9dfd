"""The runtime against transformers: logits at every position and greedy tokens, per family and quirk."""
import os
import threading

import numpy as np
import pytest

import blobstore
from blobstore.convert import convert
from blobstore.runtime import ContextFull, load

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# one checkpoint per family and quirk (see conftest.CHECKPOINTS): GQA, head_dim != hidden/heads,
# windows shorter than the prompt, soft-caps, q/k norms, local/global rope, llama3 scaling, tied/untied
FAMILIES = ["gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3"]
PROMPT_LEN = 70


@pytest.fixture(scope="session")
def packed(checkpoints, tmp_path_factory):
    """name → (blob path converted at f32, checkpoint folder); cached per session."""
    root = tmp_path_factory.mktemp("packed")
    done = {}

    def get(name, dtype="f32"):
        if (name, dtype) not in done:
            out = root / f"{name}-{dtype}.blob"
            convert(checkpoints(name), out, dtype=dtype, quiet=True)
            done[name, dtype] = out, checkpoints(name)
        return done[name, dtype]
    return get


def reference_model(folder):
    """The checkpoint in transformers, float32, eager attention (the reference implementation)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def prompt_ids(vocab, n=PROMPT_LEN, seed=0):
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(4, vocab, n - 1).tolist()


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_at_every_position(packed, name):
    path, folder = packed(name)
    model, reference = load(path), reference_model(folder)
    ids = prompt_ids(model.config.vocab_size)
    ours, theirs = model.forward(ids), reference_logits(reference, ids)
    assert ours.shape == theirs.shape == (len(ids), model.config.vocab_size)
    assert np.abs(ours - theirs).max() <= 1e-3, f"max |logit difference| {np.abs(ours - theirs).max()}"


@pytest.mark.parametrize("name", FAMILIES)
def test_32_greedy_tokens_match_transformers(packed, name):
    path, folder = packed(name)
    model, reference = load(path), reference_model(folder)
    ids = prompt_ids(model.config.vocab_size, seed=1)
    result = model.generate(ids, max_new_tokens=32, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 32 and result.finish_reason == "length"
    # teacher-forced: transformers' argmax after every prefix of our output is our next token
    logits = reference_logits(reference, ids + result.token_ids)
    assert logits[len(ids) - 1:-1].argmax(axis=1).tolist() == result.token_ids


@pytest.mark.parametrize("name", ["gemma3", "llama"])
def test_prefill_then_decode_equals_one_full_forward(packed, name):
    model = load(packed(name)[0])
    ids = prompt_ids(model.config.vocab_size, n=40, seed=2)
    full = model.forward(ids)
    cache = model.cache
    cache.truncate(0)
    stepped = [model.transformer.run(ids[:25], cache, start=0, all_logits=True)]
    cache.token_ids.extend(ids[:25])
    for position in range(25, len(ids)):
        stepped.append(model.transformer.run([ids[position]], cache, start=position))
    assert np.abs(np.concatenate(stepped) - full).max() < 1e-4


def test_f16_kv_cache_stays_close_to_f32(packed):
    path = packed("gemma3")[0]
    ids = prompt_ids(load(path).config.vocab_size, n=60, seed=4)
    exact, half = load(path).forward(ids), load(path, kv_dtype="f16").forward(ids)
    assert half.dtype == np.float32 and not np.array_equal(half, exact)  # keys and values were rounded
    assert np.abs(half - exact).max() < 1e-2 * np.abs(exact).max()


def test_the_c_layer_loop_rejects_bad_arguments_with_clear_errors(packed):
    model = load(packed("llama")[0])
    stack, cache = model.transformer.stack, model.cache
    with pytest.raises(IndexError, match="token id 400 out of range"):
        stack.run([1, model.config.vocab_size], cache.k, cache.v, 0)
    with pytest.raises(ValueError, match="k cache must be"):
        stack.run([1], cache.k[:, :, :, :4], cache.v, 0)
    with pytest.raises(ValueError, match="caches differ"):
        stack.run([1], cache.k, cache.v.astype(np.float16), 0)
    with pytest.raises(ValueError, match="do not fit a cache"):
        stack.run([1, 2], cache.k, cache.v, cache.max_seq_len - 1)
    with pytest.raises(ValueError, match="3 logit rows asked of 2 tokens"):
        stack.run([1, 2], cache.k, cache.v, 0, logit_rows=3)
    assert stack.run([1, 2], cache.k, cache.v, 0, logit_rows=0).shape == (0, model.config.vocab_size)


@pytest.mark.parametrize("dtype, bar", [("q8_0", 0.97), ("q4_0", 0.90)])
def test_quantized_top1_agreement_is_reported(packed, dtype, bar, capsys):
    """Random tiny models have close top logits, so the agreement is reported, not asserted to the bar."""
    exact, quantized = load(packed("gemma3")[0]), load(packed("gemma3", dtype)[0])
    ids = prompt_ids(exact.config.vocab_size, n=200, seed=3)
    agreement = float((exact.forward(ids).argmax(1) == quantized.forward(ids).argmax(1)).mean())
    with capsys.disabled():
        print(f"\n  gemma3 tiny random {dtype}: top-1 agreement with f32 {agreement:.1%} (bar on real models {bar:.0%})")
    assert agreement > 0.5  # far above chance (1/400): the quantized path computes the same function


def test_sharded_bf16_checkpoint_matches(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("llama")  # saved in bfloat16
    reference = reference_model(folder)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for extra in ("tokenizer.model", "tokenizer_config.json"):
        (tmp_path / "sharded" / extra).write_bytes((folder / extra).read_bytes())
    convert(tmp_path / "sharded", tmp_path / "s.blob", dtype="f32", quiet=True)
    model = load(tmp_path / "s.blob")
    ids = prompt_ids(model.config.vocab_size)
    assert np.abs(model.forward(ids) - reference_logits(reference, ids)).max() <= 1e-3


def test_seeded_sampling_is_reproducible(packed):
    model = load(packed("qwen3")[0])
    ids = prompt_ids(model.config.vocab_size, n=10)
    runs = [model.generate(ids, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
            for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids
    other = model.generate(ids, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=8, ignore_eos=True)
    assert other.token_ids != runs[0].token_ids


def test_stream_yields_the_same_text_as_generate(packed):
    model = load(packed("gemma")[0])
    chunks = list(model.stream("The quick brown fox", max_new_tokens=20, temperature=0, ignore_eos=True))
    result = model.generate("The quick brown fox", max_new_tokens=20, temperature=0, ignore_eos=True)
    assert "".join(c.text for c in chunks) == result.text == model.tokenizer.decode(result.token_ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 20


def test_chat_turns_reuse_the_cached_prefix(packed):
    model = load(packed("gemma3")[0])
    messages = [{"role": "user", "content": "Hello there"}]
    first = model.chat(messages, max_new_tokens=8, temperature=0, ignore_eos=True)
    messages += [{"role": "model", "content": first.text}, {"role": "user", "content": "And again"}]
    second = model.chat(messages, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert second.stats.reused_prompt_tokens > 0
    fresh = load(packed("gemma3")[0]).chat(messages, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert fresh.token_ids == second.token_ids and fresh.stats.reused_prompt_tokens == 0


def test_generation_stops_on_a_stop_string(packed):
    model = load(packed("gemma")[0])
    full = model.generate("fox", max_new_tokens=24, temperature=0, ignore_eos=True).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), "the greedy text should have characters to stop on"
    cut = model.generate("fox", max_new_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_a_prompt_longer_than_the_context_is_a_clear_error(packed):
    model = load(packed("llama")[0], max_seq_len=16)
    with pytest.raises(ContextFull, match="do not fit in the context of 16"):
        model.generate(list(range(4, 30)), max_new_tokens=1)
    assert model.generate(list(range(4, 10)), max_new_tokens=30, ignore_eos=True).finish_reason == "length"


def test_a_missing_layer_tensor_fails_at_load_naming_it(packed, tmp_path):
    source, _ = packed("llama")
    with blobstore.open(source) as r, blobstore.BlobWriter(tmp_path / "broken.blob") as w:
        for info in r.infos():
            if info.name == "layers.1.up":
                continue
            if info.tie:
                w.add_tie(info.name, info.tie, component=info.component)
            else:
                w.add(info.name, np.array(r[info.name]), dtype=info.dtype.label, component=info.component)
        w.metadata.update(r.metadata)
    with pytest.raises(blobstore.MissingTensor, match=r"layers\.1\.up: missing"):
        load(tmp_path / "broken.blob")


def test_two_threads_on_one_model_get_a_clear_error_or_work(packed):
    model = load(packed("qwen2")[0])
    ids = prompt_ids(model.config.vocab_size, n=8)
    outcomes = []

    def run():
        try:
            outcomes.append(model.generate(ids, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids)
        except RuntimeError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = [o for o in outcomes if isinstance(o, list)]
    assert tokens and all(t == tokens[0] for t in tokens)
    assert all("another thread" in o for o in outcomes if isinstance(o, str))


class _InterruptedStack:
    """Runs the real layer loop (the step's keys and values land in the cache), then raises
    KeyboardInterrupt on call number `at`, as Ctrl-C arriving during a step would."""

    def __init__(self, stack, at):
        self.stack, self.at, self.calls = stack, at, 0

    def run(self, *args, **kwargs):
        logits = self.stack.run(*args, **kwargs)
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return logits


def test_ctrl_c_during_a_step_leaves_the_model_usable(packed):
    path = packed("gemma3")[0]
    expected = load(path).generate("the fox", max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    model = load(path)
    real = model.transformer.stack
    model.transformer.stack = _InterruptedStack(real, at=5)   # the prefill, then decode steps
    with pytest.raises(KeyboardInterrupt):
        model.generate("the fox", max_new_tokens=12, temperature=0, ignore_eos=True)
    model.transformer.stack = real
    assert model.generate("the fox", max_new_tokens=12, temperature=0, ignore_eos=True).token_ids == expected


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident size read from /proc (Linux)")
def test_a_thousand_short_generations_do_not_grow_memory(packed):
    model = load(packed("llama")[0])
    for i in range(100):   # warm up: caches, allocator pools, lazily built tables
        model.generate([1, 5 + i % 7, 9], max_new_tokens=2, temperature=0.8, seed=i)
    before = _rss_bytes()
    for i in range(1000):
        model.generate([1, 5 + i % 7, 9], max_new_tokens=2, temperature=0.8, seed=i)
    assert _rss_bytes() - before < 2 << 20
