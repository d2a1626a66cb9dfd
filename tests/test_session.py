"""Sessions: conversations kept apart on one model, their lock rules, and sessions saved to blob files."""
import threading

import numpy as np
import pytest

from blobstore.convert import convert
from blobstore.runtime import Session, load

pytest.importorskip("transformers")

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma3_blob(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("session") / "gemma3.blob"
    convert(checkpoints("gemma3"), out, dtype="f32", quiet=True)
    return out


def conversation(model, session, turns=("Hello there", "And again", "Pack my box")):
    """A session's reply to each user turn, the replies fed back as the chat goes on."""
    messages = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = model.chat(messages, session=session, max_new_tokens=6, **GREEDY)
        messages.append({"role": "model", "content": reply.text})
        yield reply


def test_two_interleaved_conversations_equal_each_run_alone(gemma3_blob):
    alone = [[r.token_ids for r in conversation(load(gemma3_blob, max_seq_len=256), None, turns)]
             for turns in (("Hello there", "And again"), ("Pack my box", "naïve café"))]
    model = load(gemma3_blob, max_seq_len=256)
    first, second = model.new_session(), model.new_session()
    a = conversation(model, first, ("Hello there", "And again"))
    b = conversation(model, second, ("Pack my box", "naïve café"))
    interleaved = [[], []]
    for _ in range(2):
        interleaved[0].append(next(a))
        interleaved[1].append(next(b))
    assert [[r.token_ids for r in replies] for replies in interleaved] == alone
    assert interleaved[0][1].stats.reused_prompt_tokens > 0  # each session kept its own history
    assert interleaved[1][1].stats.reused_prompt_tokens > 0


def test_the_default_session_behaves_as_before(gemma3_blob):
    model = load(gemma3_blob, max_seq_len=256)
    assert isinstance(model.session, Session) and model.cache is model.session.cache
    first = model.generate("The quick brown fox", max_new_tokens=8, **GREEDY)
    prompt = model.tokenizer.encode("The quick brown fox")
    assert model.session.token_ids == prompt + first.token_ids[:-1]  # the last token is never fed back
    again = model.generate("The quick brown fox", max_new_tokens=8, **GREEDY)
    assert again.token_ids == first.token_ids and again.stats.reused_prompt_tokens > 0
    other = model.new_session()
    fresh = model.generate("The quick brown fox", session=other, max_new_tokens=8, **GREEDY)
    assert fresh.token_ids == first.token_ids and fresh.stats.reused_prompt_tokens == 0
    assert other.cache is not model.cache and other.max_seq_len == model.max_seq_len == 256


def test_new_session_takes_its_own_length_and_kv_dtype(gemma3_blob):
    model = load(gemma3_blob, max_seq_len=256)
    session = model.new_session(max_seq_len=32, kv_dtype="f16")
    assert session.max_seq_len == 32 and session.cache.k.dtype == np.float16 and session.kv_dtype == "f16"
    result = model.generate("The quick brown fox", session=session, max_new_tokens=100, **GREEDY)
    assert result.stats.context_full and session.cache.length == 32
    with pytest.raises(ValueError, match="kv cache dtype must be one of"):
        model.new_session(kv_dtype="q8_0")


def test_a_session_used_by_two_generations_at_once_raises(gemma3_blob):
    model = load(gemma3_blob, max_seq_len=256)
    session = model.new_session()
    holding = model.stream("The quick brown fox", session=session, max_new_tokens=8, **GREEDY)
    next(holding)  # an unfinished stream holds the session
    with pytest.raises(RuntimeError, match="one generation at a time"):
        model.generate("Pack my box", session=session, max_new_tokens=2)
    assert model.generate("Pack my box", max_new_tokens=2).token_ids  # the default session is free
    holding.close()
    assert model.generate("Pack my box", session=session, max_new_tokens=2).token_ids


def test_sessions_in_two_threads_give_what_each_gives_alone(gemma3_blob):
    model = load(gemma3_blob, max_seq_len=256)
    prompts = ["The quick brown fox", "Pack my box with five"]
    alone = [model.generate(p, session=model.new_session(), max_new_tokens=24, **GREEDY).token_ids for p in prompts]
    found, errors = [None, None], []

    def run(i):
        try:
            session = model.new_session()
            for _ in range(3):
                found[i] = model.generate(prompts[i], session=session, max_new_tokens=24, **GREEDY).token_ids
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and found == alone


def test_a_session_of_another_model_is_refused_by_generate(gemma3_blob, checkpoints, tmp_path):
    convert(checkpoints("qwen3"), tmp_path / "qwen3.blob", dtype="f32", quiet=True)
    other = load(tmp_path / "qwen3.blob", max_seq_len=64).new_session()
    with pytest.raises(ValueError, match=r"belongs to another model \(qwen3.blob, not gemma3.blob\)"):
        load(gemma3_blob, max_seq_len=64).generate("Hello", session=other, max_new_tokens=2)
