"""Where generation meets the edges of the model: embedding rows the tokenizer has no entry for,
a context that fills up, a prompt that already holds its BOS, and chat-template arguments."""
import json

import pytest

from blobstore.convert import convert
from blobstore.runtime import ContextFull, load
from blobstore.runtime.chat import render
from blobstore.runtime.cli import main as blob_run
from conftest import build_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENIZER_PIECES = 400   # conftest's sentencepiece model
EMBEDDING_ROWS = 512     # the checkpoint's vocab_size: 112 padding rows
BOOST = 50.0


@pytest.fixture(scope="module")
def padded_blob(tmp_path_factory, spm_model):
    """A Llama whose padding rows win every argmax: the head's rows 400.. are ±50 times a unit
    vector of the hidden space, so one of them outscores every real token whatever the state."""
    folder = build_checkpoint(tmp_path_factory.mktemp("padded"), "llama", spm_model, vocab_size=EMBEDDING_ROWS)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hidden = model.config.hidden_size
    with torch.no_grad():
        head = model.lm_head.weight
        head[TOKENIZER_PIECES:] = 0
        for row in range(TOKENIZER_PIECES, EMBEDDING_ROWS):
            offset = row - TOKENIZER_PIECES
            head[row, offset % hidden] = BOOST if offset < hidden else -BOOST
    model.save_pretrained(folder)
    out = folder / "padded.blob"
    convert(folder, out, dtype="f32", quiet=True)
    return out


def test_padding_rows_would_win_every_position_and_forward_still_returns_them(padded_blob):
    model = load(padded_blob, max_seq_len=128)
    assert (model.config.vocab_size, model.tokenizer.vocab_size, model.decodable_vocab_size) == (512, 400, 400)
    logits = model.forward(model.tokenizer.encode("The quick brown fox jumps"))
    assert logits.shape[1] == EMBEDDING_ROWS
    assert (logits.argmax(axis=1) >= TOKENIZER_PIECES).all()  # unmasked, greedy would pick padding


def test_greedy_generation_picks_the_best_token_the_tokenizer_knows(padded_blob):
    model = load(padded_blob, max_seq_len=128)
    prompt = model.tokenizer.encode("The quick brown fox")
    result = model.generate(prompt, max_new_tokens=24, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 24 and result.text == model.tokenizer.decode(result.token_ids)
    # teacher-forced: each token is the argmax over the rows below the tokenizer's size
    logits = model.forward(prompt + result.token_ids)
    expected = logits[len(prompt) - 1:-1, :TOKENIZER_PIECES].argmax(axis=1)
    assert result.token_ids == expected.tolist()


@pytest.mark.parametrize("options", [
    dict(temperature=1.0), dict(temperature=1.5, top_k=0, top_p=1.0), dict(temperature=1.0, top_p=0.9),
    dict(temperature=1.0, min_p=0.01), dict(temperature=1.0, top_k=5, repetition_penalty=1.3),
    dict(temperature=0, repetition_penalty=1.5),
], ids=repr)
def test_every_sampler_stays_inside_the_tokenizer(padded_blob, options):
    model = load(padded_blob, max_seq_len=128)
    for seed in range(4):
        result = model.generate("Pack my box", max_new_tokens=16, seed=seed, ignore_eos=True, **options)
        assert len(result.token_ids) == 16 and max(result.token_ids) < TOKENIZER_PIECES


def test_a_prompt_with_a_padding_id_is_refused_for_generation_but_runs_forward(padded_blob):
    model = load(padded_blob, max_seq_len=32)
    assert model.forward([2, 450]).shape == (2, EMBEDDING_ROWS)
    with pytest.raises(ValueError, match=r"token id 450 is outside the vocabulary \(0\.\.399\)"):
        model.generate([2, 450], max_new_tokens=2)


@pytest.fixture(scope="module")
def llama_blob(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctx") / "llama.blob"
    convert(checkpoints("llama"), out, dtype="f32", quiet=True)
    return out


PROMPT = [2, 17, 95, 230, 11, 64]


def test_a_generation_that_fills_the_context_ends_with_length_and_says_so(llama_blob):
    model = load(llama_blob, max_seq_len=16)
    result = model.generate(PROMPT, max_new_tokens=30, temperature=0, ignore_eos=True)
    # every position is used: the last token's logits come from position 15, and it is never fed back
    assert len(result.token_ids) == 16 - len(PROMPT) + 1 and model.cache.length == 16
    assert result.finish_reason == "length" and result.stats.context_full
    roomy = load(llama_blob, max_seq_len=64).generate(PROMPT, max_new_tokens=len(result.token_ids), temperature=0,
                                                      ignore_eos=True)
    assert roomy.token_ids == result.token_ids
    assert roomy.finish_reason == "length" and not roomy.stats.context_full


def test_max_new_tokens_reached_at_the_last_position_is_not_a_full_context(llama_blob):
    model = load(llama_blob, max_seq_len=16)
    exact = model.generate(PROMPT, max_new_tokens=16 - len(PROMPT) + 1, temperature=0, ignore_eos=True)
    assert exact.finish_reason == "length" and not exact.stats.context_full
    chunks = list(model.stream(list(range(4, 20)), max_new_tokens=5, temperature=0, ignore_eos=True))
    assert len([c for c in chunks if c.token_id is not None]) == 1  # a prompt that fills it gets one token
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.context_full


def test_a_prompt_longer_than_the_context_is_still_refused(llama_blob):
    with pytest.raises(ContextFull, match="17 tokens do not fit in the context of 16"):
        load(llama_blob, max_seq_len=16).generate(list(range(4, 21)), max_new_tokens=1)


def _prompt_that_runs_to_the_end(path, ctx):
    """A text prompt whose greedy generation (EOS allowed, as blob-run runs it) fills `ctx`."""
    model = load(path, max_seq_len=ctx)
    for text in ("The quick brown fox", "Pack my box", "naïve café", "Hello there"):
        if model.generate(text, max_new_tokens=ctx, temperature=0).stats.context_full:
            return text
    pytest.fail("every prompt met EOS before the context was full")


def test_blob_run_says_when_the_context_ran_out(llama_blob, capsys):
    text = _prompt_that_runs_to_the_end(llama_blob, 24)
    assert blob_run([str(llama_blob), "-p", text, "-n", "100", "--ctx", "24", "--temp", "0", "--stats-json"]) == 0
    err = capsys.readouterr().err
    assert "blob-run: the context of 24 tokens is full" in err and "--ctx" in err
    assert json.loads(err.strip().splitlines()[-2])["context_full"] is True  # the stats line precedes the notice
    assert blob_run([str(llama_blob), "-p", text, "-n", "3", "--ctx", "24", "--temp", "0"]) == 0
    assert "is full" not in capsys.readouterr().err


def test_blob_run_names_ctx_when_the_prompt_does_not_fit(llama_blob, capsys):
    assert blob_run([str(llama_blob), "-p", "The quick brown fox jumps over the lazy dog.", "--ctx", "4"]) == 1
    err = capsys.readouterr().err
    assert "do not fit in the context of 4 tokens" in err and "--ctx N sets the context length" in err


# A chat template that writes BOS, lists the tools it is given and reads an extra variable.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}Tools: {{ tools | map(attribute='function') | map(attribute='name') | join(', ') }}\n"
    "{% endif %}{% for m in messages %}<start_of_turn>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{{ m.content | map(attribute='text') | join }}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% if think is defined and not think %}(no thinking)\n{% endif %}{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Oslo?"}]}]


@pytest.fixture(scope="module")
def tools_blob(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    source = checkpoints("gemma3")
    for item in source.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    convert(folder, folder / "tools.blob", dtype="f32", quiet=True)
    return folder / "tools.blob"


def test_apply_chat_template_passes_tools_and_template_arguments(tools_blob):
    model = load(tools_blob, max_seq_len=128)
    bos = model.tokenizer.id_to_token(model.tokenizer.bos_id)
    text = model.apply_chat_template(MESSAGES, tools=TOOLS, think=False)
    assert text == (f"{bos}Tools: get_weather, get_time\n<start_of_turn>user\nWeather in Oslo?<end_of_turn>\n"
                    "<start_of_turn>model\n(no thinking)\n")
    assert text == render(TOOLS_TEMPLATE, MESSAGES, bos_token=bos, tools=TOOLS, think=False)
    assert model.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("in Oslo?<end_of_turn>\n")


def test_chat_with_tools_runs_the_prompt_apply_chat_template_renders(tools_blob):
    model = load(tools_blob, max_seq_len=128)
    text = model.apply_chat_template(MESSAGES, tools=TOOLS, think=False)
    ids = model.tokenizer.encode(text)
    assert ids.count(model.tokenizer.bos_id) == 1 and ids[0] == model.tokenizer.bos_id  # no second BOS
    options = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    chat = model.chat(MESSAGES, tools=TOOLS, chat_template_kwargs={"think": False}, **options)
    assert chat.stats.prompt_tokens == len(ids)
    assert load(tools_blob, max_seq_len=128).generate(text, **options).token_ids == chat.token_ids
    plain = load(tools_blob, max_seq_len=128).chat(MESSAGES, **options)
    assert plain.stats.prompt_tokens < len(ids)  # without the tools the prompt is shorter
