"""Sessions: conversations kept apart on one model, their lock rules, and sessions saved to blob files."""
import json
import threading

import numpy as np
import pytest

import blobstore
from blobstore.convert import convert
from blobstore.runtime import ContextFull, Session, SessionMismatch, load
from blobstore.runtime.cli import main as blob_run

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


# ---- sessions saved to blob files ----

def test_save_load_and_continue_equals_never_having_stopped(gemma3_blob, tmp_path):
    model = load(gemma3_blob, max_seq_len=256)
    for kv_dtype in ("f32", "f16"):
        session = model.new_session(kv_dtype=kv_dtype)
        first = model.generate("The quick brown fox", session=session, max_new_tokens=10, **GREEDY)
        session.save(tmp_path / f"{kv_dtype}.session")
        loaded = model.load_session(tmp_path / f"{kv_dtype}.session", kv_dtype=kv_dtype)
        assert loaded.token_ids == session.token_ids and loaded.kv_dtype == kv_dtype
        n = session.cache.length
        follow = first.token_ids[-1:] + model.tokenizer.encode(" jumps over", add_bos=False)
        logits = [model.transformer.run(follow, s.cache, start=n, all_logits=True) for s in (session, loaded)]
        assert np.array_equal(logits[0], logits[1])
        prompt = session.token_ids + follow
        went_on, resumed = (model.generate(prompt, session=s, max_new_tokens=10, **GREEDY) for s in (session, loaded))
        assert resumed.token_ids == went_on.token_ids
        assert resumed.stats.reused_prompt_tokens == went_on.stats.reused_prompt_tokens == n


def test_an_empty_session_round_trips(gemma3_blob, tmp_path):
    model = load(gemma3_blob, max_seq_len=64)
    model.new_session().save(tmp_path / "empty.session")
    loaded = model.load_session(tmp_path / "empty.session")
    assert loaded.token_ids == [] and loaded.max_seq_len == 64
    assert model.generate("Hello", session=loaded, max_new_tokens=3, **GREEDY).token_ids == \
        model.generate("Hello", session=model.new_session(), max_new_tokens=3, **GREEDY).token_ids


def test_a_session_saved_from_another_model_is_refused_naming_what_differs(gemma3_blob, checkpoints, tmp_path):
    convert(checkpoints("gemma3"), tmp_path / "other.blob", dtype="q8_0", quiet=True)   # same config, other weights
    other = load(tmp_path / "other.blob", max_seq_len=64)
    other.generate("Hello", max_new_tokens=2)
    other.session.save(tmp_path / "other.session")
    with pytest.raises(SessionMismatch, match=r"other\.session: this session was saved from another model "
                                              r"\(other\.blob, not gemma3\.blob\).*manifest CRC32C"):
        load(gemma3_blob, max_seq_len=64).load_session(tmp_path / "other.session")
    convert(checkpoints("qwen3"), tmp_path / "qwen3.blob", dtype="f32", quiet=True)   # another architecture
    with pytest.raises(SessionMismatch, match=r"config arch: 'Qwen3ForCausalLM' vs 'Gemma3ForCausalLM'"):
        load(tmp_path / "qwen3.blob", max_seq_len=64).load_session(tmp_path / "other.session")


def test_a_session_of_another_kv_dtype_or_too_long_is_refused(gemma3_blob, tmp_path):
    model = load(gemma3_blob, max_seq_len=64)
    model.generate("The quick brown fox", max_new_tokens=4)
    model.session.save(tmp_path / "f32.session")
    with pytest.raises(SessionMismatch, match="KV cache dtype f16 vs f32"):
        model.load_session(tmp_path / "f32.session", kv_dtype="f16")
    with pytest.raises(ContextFull, match=f"holds {model.cache.length} tokens, more than the context of 4"):
        model.load_session(tmp_path / "f32.session", max_seq_len=4)


def test_a_damaged_session_file_raises_format_error(gemma3_blob, tmp_path):
    model = load(gemma3_blob, max_seq_len=64)
    model.generate("The quick brown fox", max_new_tokens=4)
    model.session.save(tmp_path / "good.session")
    data = (tmp_path / "good.session").read_bytes()
    (tmp_path / "short.session").write_bytes(data[:len(data) // 2])
    with pytest.raises(blobstore.TruncatedFile, match="short.session"):
        model.load_session(tmp_path / "short.session")
    with blobstore.open(tmp_path / "good.session") as reader:
        offset = reader.info("session.v").offset
    damaged = bytearray(data)
    damaged[offset + 5] ^= 0x40
    (tmp_path / "damaged.session").write_bytes(bytes(damaged))
    with pytest.raises(blobstore.ChecksumMismatch, match=r"session\.v: expected CRC32C"):
        model.load_session(tmp_path / "damaged.session")
    with pytest.raises(blobstore.FormatError, match="not a session file"):
        model.load_session(gemma3_blob)


def test_blob_run_prompt_cache_reuses_the_prompt_on_the_second_run(gemma3_blob, checkpoints, tmp_path, capsys):
    cache = tmp_path / "prompt.session"
    argv = [str(gemma3_blob), "-p", "The quick brown fox jumps over", "-n", "6", "--temp", "0", "--ctx", "128",
            "--prompt-cache", str(cache), "--stats-json"]
    runs = []
    for _ in range(2):
        assert blob_run(argv) == 0
        captured = capsys.readouterr()
        runs.append((captured.out, captured.err, json.loads(captured.err.strip().splitlines()[-1])))
    assert runs[0][2]["reused_prompt_tokens"] == 0 and cache.exists()
    assert runs[1][2]["reused_prompt_tokens"] == runs[1][2]["prompt_tokens"] - 1
    assert "reused from the cache" in runs[1][1] and runs[1][0] == runs[0][0]
    convert(checkpoints("qwen3"), tmp_path / "qwen3.blob", dtype="f32", quiet=True)
    assert blob_run([str(tmp_path / "qwen3.blob"), "-p", "Hi", "--prompt-cache", str(cache)]) == 1
    assert "--prompt-cache:" in capsys.readouterr().err


def test_blob_run_names_the_prompt_cache_it_cannot_write(gemma3_blob, tmp_path, capsys):
    target = tmp_path / "missing-folder" / "prompt.session"
    assert blob_run([str(gemma3_blob), "-p", "Hello", "-n", "2", "--ctx", "64", "--prompt-cache", str(target)]) == 1
    assert f"--prompt-cache: cannot save the session to {target}" in capsys.readouterr().err
