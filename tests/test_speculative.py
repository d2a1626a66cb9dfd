"""Speculative decoding (runtime/speculative.py): prompt lookup and a draft model give exactly plain
greedy decoding's tokens and session, and when sampling the distribution of plain sampling.

The statistical tests draw from fixed seeds, so they are deterministic; each is a chi-square
goodness-of-fit test at significance 0.001 against the exact distribution computed from the
model's logits: a correct implementation with a random seed set would fail one of them with
probability 0.001 (the reason for the threshold), and the seeds here pass.
"""
from __future__ import annotations

import numpy as np
import pytest

from blobstore.convert import convert
from blobstore.runtime import VocabularyMismatch, cli, demo, kernels, load
from blobstore.runtime import generate as layers
from blobstore.runtime.sampling import SamplingParams, distribution
from blobstore.runtime.speculative import (MAX_DRAFT_TOKENS, Draft, PromptLookup, Sampler, SpeculationCounts,
                                           speculative_step, verify)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

SIGNIFICANCE = 1e-3
DEMO_PROMPTS = [
    "And God said, Let there be light: and there was light. And God said",
    "In the beginning God created the heaven and the earth. And the earth was",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down",
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel, and say unto them,",
    "Blessed are the poor in spirit: for theirs is the kingdom of heaven. Blessed are they that mourn",
    "And he said unto them, Go ye into all the world, and preach the gospel to every creature. And he",
    "For God so loved the world, that he gave his only begotten Son, that whosoever believeth",
    "And Jesus answered and said unto them, Verily I say unto you, Verily I say unto you, Verily",
    "Now the serpent was more subtil than any beast of the field",
    "Thus saith the LORD; Thus saith the LORD; Thus saith",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Products are bit-identical at any thread count; one thread spares these tiny forwards the
    pool's wake-ups, which dominate them on a busy machine."""
    previous = kernels.get_threads()
    kernels.set_threads(1)
    yield
    kernels.set_threads(previous)


@pytest.fixture(scope="module")
def demo_model():
    return load(demo.demo_path(), max_seq_len=512)


@pytest.fixture(scope="module")
def tiny(checkpoints, tmp_path_factory):
    """(name, dtype) → a tiny random model packed at dtype, by default f32 (float weights: the case
    where a verify forward wider than the decode tiles would round differently); gemma3 and llama
    share a tokenizer."""
    root = tmp_path_factory.mktemp("speculative")
    paths = {}

    def get(name: str, dtype: str = "f32"):
        if (name, dtype) not in paths:
            paths[name, dtype] = root / f"{name}-{dtype}.blob"
            convert(checkpoints(name), paths[name, dtype], dtype=dtype, quiet=True)
        return paths[name, dtype]
    return get


def random_prompt(length: int, seed: int) -> list[int]:
    return [2] + np.random.default_rng(seed).integers(4, 400, length - 1).tolist()


def plain_and_speculative(model, prompt, **options):
    """The plain and the speculative result of one prompt, each in a fresh session."""
    spec = {key: options.pop(key) for key in ("lookup", "draft_tokens") if key in options}
    plain = model.generate(prompt, session=model.new_session(), draft_tokens=0 if model.draft else None, **options)
    return plain, model.generate(prompt, session=model.new_session(), **spec, **options)


# ---- the drafters ----

def test_prompt_lookup_drafts_what_followed_the_longest_then_latest_match():
    lookup = PromptLookup(3)
    assert lookup.propose([5, 6, 7, 8, 5, 6], 3, None).tokens == [7, 8, 5]
    assert lookup.propose([5, 6, 7, 8, 5, 6], 1, None).tokens == [7]             # the room given
    # the bigram (1, 2) was followed by 3; the later unigram (2) by 4: the longer match wins
    assert PromptLookup(2, ngrams=(1, 2)).propose([1, 2, 3, 9, 2, 4, 1, 2], 7, None).tokens == [3, 9]
    assert PromptLookup(2, ngrams=(1,)).propose([1, 2, 3, 9, 2, 4, 1, 2], 7, None).tokens == [4, 1]
    assert PromptLookup(2).propose([1, 2, 3, 9, 2, 4, 6, 2], 7, None).tokens == []   # no unigrams by default
    # a longer context: its index grows with it, and the latest occurrence wins
    grown = [5, 6, 7, 8, 5, 6, 9, 1, 5, 6]
    assert lookup.propose(grown, 3, None).tokens == [9, 1, 5]
    assert PromptLookup(4).propose([1, 2, 3], 4, None).tokens == []               # nothing repeats
    assert PromptLookup(4).propose([7], 4, None).tokens == []


@pytest.mark.parametrize("bad", [0, MAX_DRAFT_TOKENS + 1, 2.5])
def test_draft_lengths_outside_the_exact_verify_width_are_refused(demo_model, bad):
    with pytest.raises(ValueError, match=f"lookup must be an integer from 1 to {MAX_DRAFT_TOKENS}"):
        PromptLookup(bad)
    if bad != 0:   # 0 is "off" for the generate options
        with pytest.raises(ValueError, match="lookup must be"):
            demo_model.generate("And", lookup=bad, max_new_tokens=2)


# ---- greedy: the very tokens of plain decoding ----

def test_greedy_prompt_lookup_gives_plain_greedy_tokens_on_the_demo_model(demo_model):
    accepted = 0
    for prompt in DEMO_PROMPTS:
        plain = demo_model.generate(prompt, session=demo_model.new_session(), max_new_tokens=32, temperature=0)
        assert plain.stats.drafted_tokens == 0
        for lookup in (1, 3, MAX_DRAFT_TOKENS):
            fast = demo_model.generate(prompt, session=demo_model.new_session(), max_new_tokens=32, temperature=0,
                                       lookup=lookup)
            assert fast.token_ids == plain.token_ids and fast.text == plain.text, (prompt, lookup)
            assert fast.finish_reason == plain.finish_reason
            assert fast.stats.drafted_tokens >= fast.stats.accepted_tokens
            accepted += fast.stats.accepted_tokens
    assert accepted > 100   # the Bible repeats itself: many drafted tokens were right


@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_greedy_with_a_draft_model_gives_plain_greedy_tokens(tiny, kv_dtype):
    """A random llama drafting for a random gemma3 (nearly every draft refused), at every draft
    length, with prompt lookup in front of it, and at both KV dtypes."""
    model = load(tiny("gemma3"), max_seq_len=256, kv_dtype=kv_dtype, draft=tiny("llama"))
    for seed in range(3):
        prompt = random_prompt(12 + 9 * seed, seed)
        for options in (dict(draft_tokens=1), dict(draft_tokens=4), dict(draft_tokens=MAX_DRAFT_TOKENS),
                        dict(lookup=2, draft_tokens=3)):
            plain, fast = plain_and_speculative(model, prompt, max_new_tokens=32, temperature=0, ignore_eos=True,
                                                **options)
            assert plain.stats.drafted_tokens == 0   # draft_tokens=0 off: plain decoding, draft or not
            assert fast.token_ids == plain.token_ids, (seed, options)
            assert fast.stats.drafted_tokens > 0


def test_the_model_drafting_for_itself_has_every_draft_accepted(tiny):
    """The same weights decode bit for bit alike one token at a time (the draft) and in the
    verify forward, so at temperature 0 every drafted token is kept."""
    model = load(tiny("gemma3"), max_seq_len=256, draft=load(tiny("gemma3"), max_seq_len=8))
    plain, fast = plain_and_speculative(model, random_prompt(20, 5), draft_tokens=MAX_DRAFT_TOKENS,
                                        max_new_tokens=60, temperature=0, ignore_eos=True)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.accepted_tokens == fast.stats.drafted_tokens > 40


class Oracle:
    """Drafts the plain greedy continuation itself: every draft is accepted."""

    def __init__(self, prompt_length: int, continuation: list[int]):
        self.prompt_length, self.continuation = prompt_length, continuation

    def propose(self, context, limit, sampler):
        done = len(context) - self.prompt_length
        return Draft(self.continuation[done:done + limit])


class Contrarian:
    """Drafts tokens that are never the model's greedy choice: every draft is refused."""

    def __init__(self, model):
        self.model = model

    def propose(self, context, limit, sampler):
        logits = self.model.forward(context)[-1, :self.model.decodable_vocab_size]
        return Draft([int(np.argmin(logits))] * limit)


def run_layers(model, prompt, drafter, **options):
    """layers.generate in a fresh session: (result, the session's ids, its KV rows)."""
    session = model.new_session()
    params = SamplingParams(temperature=0)
    result = layers.generate(model.transformer, model.tokenizer, session, prompt, params,
                             vocab_size=model.decodable_vocab_size, drafter=drafter, **options)
    n = session.cache.length
    return result, list(session.token_ids), session.cache.k[:, :n].copy(), session.cache.v[:, :n].copy()


@pytest.mark.parametrize("drafts", ["all accepted", "all refused"])
def test_stops_inside_a_draft_end_as_plain_decoding_with_the_same_session(demo_model, drafts):
    """EOS, a stop string, and max_new_tokens landing inside a run of drafted tokens: the same
    text, ids and finish reason as plain decoding, and the session holds the same ids and KV
    rows (the verify forward's rows past the stop are not counted)."""
    model = demo_model
    prompt = model.tokenizer.encode(DEMO_PROMPTS[0])
    continuation = model.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True).token_ids
    drafter = Oracle(len(prompt), continuation) if drafts == "all accepted" else Contrarian(model)
    text = model.tokenizer.decode(continuation)
    stop_string = text[len(model.tokenizer.decode(continuation[:10])):][:6]
    cases = [dict(max_new_tokens=n) for n in (1, 2, 5, 9, 16)]
    cases += [dict(max_new_tokens=40, stop_ids=frozenset({continuation[i]})) for i in (3, 6, 11)]
    cases += [dict(max_new_tokens=40, stop=[stop_string])]
    for options in cases:
        plain = run_layers(model, prompt, None, **options)
        fast = run_layers(model, prompt, drafter, **options)
        assert fast[0].token_ids == plain[0].token_ids and fast[0].text == plain[0].text, options
        assert fast[0].finish_reason == plain[0].finish_reason
        assert fast[1] == plain[1]
        assert np.array_equal(fast[2], plain[2]) and np.array_equal(fast[3], plain[3])
        stats = fast[0].stats
        if drafts == "all refused":
            assert stats.accepted_tokens == 0
        else:
            assert stats.accepted_tokens == stats.drafted_tokens


def test_a_full_context_ends_where_plain_decoding_ends(demo_model):
    prompt = demo_model.tokenizer.encode(DEMO_PROMPTS[9])
    for room in (1, 3, 8, 13):
        session_length = len(prompt) + room
        results = [demo_model.generate(prompt, session=demo_model.new_session(max_seq_len=session_length),
                                       max_new_tokens=100, temperature=0, ignore_eos=True, **options)
                   for options in ({}, dict(lookup=MAX_DRAFT_TOKENS))]
        assert results[1].token_ids == results[0].token_ids
        assert results[1].stats.context_full and results[0].stats.context_full
        assert len(results[1].token_ids) == room + 1


def test_a_logits_processor_shapes_drafts_and_verification_alike(demo_model):
    """A processor that depends only on its arguments (here: ban the first greedy token and
    every token already generated twice) gives the same tokens with prompt lookup."""
    banned = demo_model.generate(DEMO_PROMPTS[9], max_new_tokens=1, temperature=0).token_ids[0]

    def processor(generated, logits):
        twice = [t for t in set(generated) if generated.count(t) >= 2]
        return np.where(np.isin(np.arange(logits.size), twice + [banned]), -np.inf, logits)

    plain, fast = plain_and_speculative(demo_model, DEMO_PROMPTS[9], lookup=4, max_new_tokens=40, temperature=0,
                                        ignore_eos=True, logits_processor=processor)
    assert fast.token_ids == plain.token_ids and banned not in fast.token_ids


def test_drafts_stop_short_of_a_longrope_factor_switch(tmp_path, spm_model):
    """Phi-3's LongRoPE changes factors at its original context (32): a verify forward that
    straddled it would rotate the tokens before it with the long factors, unlike plain decoding."""
    from test_phi3 import VARIANTS, build_phi3

    folder = tmp_path / "phi3"
    folder.mkdir()
    build_phi3(folder, spm_model, **VARIANTS["longrope"])
    convert(folder, tmp_path / "phi3.blob", dtype="f32", quiet=True)
    model = load(tmp_path / "phi3.blob", draft=load(tmp_path / "phi3.blob"))
    for length in (20, 27, 30):
        plain, fast = plain_and_speculative(model, random_prompt(length, length), draft_tokens=MAX_DRAFT_TOKENS,
                                            max_new_tokens=20, temperature=0, ignore_eos=True)
        assert fast.token_ids == plain.token_ids
        assert fast.stats.accepted_tokens == fast.stats.drafted_tokens


# ---- sampling: the distribution of plain sampling ----

def chi_square_p_value(counts: dict, probabilities: dict) -> float:
    """P(chi-square >= the statistic) of `counts` against `probabilities` (cells of expected count
    below 5 pooled into one), from the regularised upper incomplete gamma function."""
    total = sum(counts.values())
    cells = sorted(probabilities, key=probabilities.get, reverse=True)
    big = [c for c in cells if probabilities[c] * total >= 5]
    small = [c for c in cells if c not in big]
    observed = [counts.get(c, 0) for c in big] + ([sum(counts.get(c, 0) for c in small)] if small else [])
    expected = [probabilities[c] * total for c in big] + ([sum(probabilities[c] for c in small) * total]
                                                         if small else [])
    assert sum(counts.get(c, 0) for c in counts if c not in probabilities) == 0, "an impossible outcome was drawn"
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    freedom = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(freedom / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4),
          SamplingParams(temperature=1.3, top_p=0.8, repetition_penalty=1.5)]


@pytest.mark.parametrize("params", PARAMS, ids=["plain", "top-k", "top-p+penalty"])
@pytest.mark.parametrize("kind", ["draft model", "prompt lookup"])
def test_verify_keeps_the_models_distribution(params, kind):
    """One verify step on a 6-token vocabulary: the first token out (the kept draft or its
    replacement) is distributed as the model's p, whatever the draft's q; 6000 draws."""
    rng = np.random.default_rng(1)
    logits = np.log(np.array([[0.30, 0.25, 0.20, 0.12, 0.08, 0.05], [0.2] * 5 + [0.0]]) + 1e-12)
    draft_logits = np.log(np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.25]))
    context = [0, 3]   # the penalty lowers tokens 0 and 3
    p_ids, p = distribution(logits[0], params, context)
    sampler = Sampler(params, rng, prompt_length=1)
    counts = {}
    for _ in range(6000):
        if kind == "draft model":
            q = distribution(draft_logits, params, context)
            draft = Draft([sampler.draw(*q)], [q])
        else:
            draft = Draft([2])
        kept, after = verify(draft, logits, context, sampler)
        first = kept[0] if kept else after
        counts[first] = counts.get(first, 0) + 1
    assert chi_square_p_value(counts, dict(zip(p_ids.tolist(), p))) > SIGNIFICANCE


def exact_distribution(model, prompt, params, steps):
    """{token tuple: probability} of the first `steps` sampled tokens, from the model's logits."""
    vocab = model.decodable_vocab_size
    outcomes = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for tokens, probability in outcomes.items():
            logits = model.forward(prompt + list(tokens))[-1, :vocab]
            for token, p in zip(*distribution(logits, params, prompt + list(tokens))):
                grown[tokens + (int(token),)] = probability * p
        outcomes = grown
    return outcomes


@pytest.mark.parametrize("kind", ["draft model", "prompt lookup"])
def test_sampled_speculative_generations_follow_plain_sampling(tiny, kind):
    """The first three tokens of 2000 seeded generations (top-k 2 and a repetition penalty: 8
    outcomes) against their exact probabilities; the second and third come out of verification.
    The draft is the same model at q4_0: close to it, yet a quarter of its drafts are refused (the
    random tiny models' logits are steep: a high temperature gives both candidates weight)."""
    model = load(tiny("gemma3"), max_seq_len=64, draft=tiny("gemma3", "q4_0"))
    params = SamplingParams(temperature=10, top_k=2, repetition_penalty=1.3)
    prompt = random_prompt(10, 3)
    if kind == "prompt lookup":   # each candidate first token reappears in the prompt: lookup drafts
        first = exact_distribution(model, prompt, params, 1)
        prompt = prompt + [t for (t,) in first] + prompt[1:4] + [t for (t,) in first]
    expected = exact_distribution(model, prompt, params, 3)
    options = dict(lookup=2, draft_tokens=0) if kind == "prompt lookup" else dict(draft_tokens=2)
    session = model.new_session()
    counts, counted = {}, SpeculationCounts()
    for seed in range(2000):
        result = model.generate(prompt, session=session, max_new_tokens=3, temperature=10, top_k=2,
                                repetition_penalty=1.3, seed=seed, ignore_eos=True, **options)
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
        counted.drafted += result.stats.drafted_tokens
        counted.accepted += result.stats.accepted_tokens
    assert 0.2 < counted.acceptance < 0.8   # both verdicts were exercised
    assert chi_square_p_value(counts, expected) > SIGNIFICANCE


# ---- the API ----

def test_a_draft_with_another_vocabulary_is_refused_naming_both(tiny, tmp_path, checkpoints):
    with pytest.raises(VocabularyMismatch, match=r"demo.blob: its vocabulary has \d+ tokens, that of .*gemma3-f32.blob 400"):
        load(tiny("gemma3"), draft=demo.demo_path())


def test_a_draft_whose_tokens_differ_is_refused_naming_the_first(tiny, tmp_path, spm_model):
    """Same size, other pieces: a tokenizer trained on other text."""
    import sentencepiece as spm
    from conftest import build_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["Zebras quietly vex jumping flocks of wyverns; 0987654321 !?"] * 50 +
                                ["a b c d e f g h i j k l m n o p q r s t u v w x y z"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "other"), vocab_size=400, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2, hard_vocab_limit=False)
    folder = tmp_path / "other-llama"
    folder.mkdir()
    build_checkpoint(folder, "llama", (tmp_path / "other.model").read_bytes())
    convert(folder, tmp_path / "other.blob", dtype="f32", quiet=True)
    other = load(tmp_path / "other.blob")
    if other.decodable_vocab_size != 400:
        pytest.fail(f"the other tokenizer has {other.decodable_vocab_size} pieces; the test needs 400")
    with pytest.raises(VocabularyMismatch, match=r"other.blob: token \d+ is '.*' there and '.*' in .*gemma3-f32.blob"):
        load(tiny("gemma3"), draft=other)


def test_speculative_options_are_checked(tiny, demo_model):
    with pytest.raises(ValueError, match="draft_tokens=3 needs a draft model"):
        demo_model.generate("And", draft_tokens=3)
    model = load(tiny("gemma3"), max_seq_len=64, draft=tiny("llama"))
    with pytest.raises(ValueError, match="draft_tokens must be an integer from 1 to"):
        model.generate([2, 5], draft_tokens=MAX_DRAFT_TOKENS + 1)
    from blobstore.runtime import BatchEngine
    with BatchEngine(demo_model) as engine, pytest.raises(ValueError, match="not in a BatchEngine"):
        list(demo_model.stream("And", lookup=2, batch=engine, max_new_tokens=4))
    with BatchEngine(model) as engine:   # a model's draft drafts by default, but not in an engine
        batched = "".join(c.text for c in model.stream([2, 5], batch=engine, max_new_tokens=4, temperature=0))
        with pytest.raises(ValueError, match="not in a BatchEngine"):
            list(model.stream([2, 5], batch=engine, draft_tokens=2, max_new_tokens=4))
    assert batched == model.generate([2, 5], max_new_tokens=4, temperature=0).text


def test_a_draft_loaded_from_a_path_is_closed_with_the_model(tiny):
    model = load(tiny("gemma3"), max_seq_len=64, draft=tiny("llama"))
    draft = model.draft
    model.close()
    with pytest.raises(ValueError, match="the reader is closed"):
        draft.reader["embed"]
    given = load(tiny("llama"), max_seq_len=8)
    load(tiny("gemma3"), max_seq_len=64, draft=given).close()
    assert given.reader["embed"] is not None


def test_the_speculative_step_layer_takes_what_it_uses(demo_model):
    """speculative_step runs on a transformer, a session and a drafter, like generate_step."""
    prompt = demo_model.tokenizer.encode(DEMO_PROMPTS[7])
    counts = SpeculationCounts()
    steps = speculative_step(demo_model.transformer, demo_model.new_session(), prompt, SamplingParams(temperature=0),
                             np.random.default_rng(0), vocab_size=demo_model.decodable_vocab_size,
                             drafter=PromptLookup(5), counts=counts)
    tokens = [next(steps) for _ in range(30)]
    steps.close()
    assert tokens == demo_model.generate(prompt, max_new_tokens=30, temperature=0, ignore_eos=True,
                                         session=demo_model.new_session()).token_ids
    assert counts.accepted > 0 and counts.drafted >= counts.accepted


def test_blob_run_takes_lookup_and_reports_acceptance(capsys, tiny):
    help_text = cli.build_parser().format_help()
    assert "--lookup N" in help_text and "--draft FILE" in help_text and "--draft-tokens N" in help_text
    assert cli.main(["-p", DEMO_PROMPTS[9], "-n", "24", "--temp", "0", "--lookup", "4"]) == 0
    out, err = capsys.readouterr()
    plain = load(demo.demo_path(), max_seq_len=512).generate(DEMO_PROMPTS[9], max_new_tokens=24, temperature=0)
    assert out.startswith(plain.text)
    assert "Generation: " in err and "tokens accepted (" in err
    assert cli.main([str(tiny("gemma3")), "--draft", str(tiny("llama")), "-p", "hello", "-n", "8", "--temp", "0",
                     "--ctx", "64"]) == 0
    assert "draft llama-f32.blob" in capsys.readouterr().err
