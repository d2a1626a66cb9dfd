"""Tool calls: each template family's format parsed out of generated text (and nothing taken for a
call that is not one), the grammar that forces a call giving calls that validate whatever the
logits, and blob-serve answering the openai client with tool_calls, streamed and not."""
import json
import shutil

import numpy as np
import pytest

from blobstore.runtime import chat
from blobstore.runtime.tool_calls import FORMATS, HERMES, LLAMA3, MISTRAL, ToolCall, format_for_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]


# ---- parsing ----

@pytest.mark.parametrize("text, prose, calls", [
    ('Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>',
     "Checking.", [ToolCall("get_time", {"zone": 1})]),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": "{\\"x\\": 2}"}'
     '\n</tool_call>\n', "", [ToolCall("a", {}), ToolCall("b", {"x": 2})]),
    ("no call here", "no call here", []),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> and then prose', None, []),   # not only calls
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1\n</tool_call>', None, []),               # cut short
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', None, []),                               # no name
])
def test_hermes_calls_parse_and_anything_else_stays_text(text, prose, calls):
    assert HERMES.parse(text) == (text if prose is None else prose, calls)


def test_llama3_and_mistral_calls_parse_with_or_without_their_dropped_control_token():
    call = '{"name": "get_time", "parameters": {"zone": -3}}'
    for text in (call, "<|python_tag|>" + call, " " + call + "; " + call.replace("-3", "4")):
        prose, calls = LLAMA3.parse(text)
        assert prose == "" and calls[0] == ToolCall("get_time", {"zone": -3})
    assert len(LLAMA3.parse(" " + call + "; " + call)[1]) == 2
    assert LLAMA3.parse("The answer is {1, 2}.") == ("The answer is {1, 2}.", [])
    listed = '[{"name": "a", "arguments": {"k": "v"}}, {"name": "b", "arguments": {}}]'
    for text in (listed, "[TOOL_CALLS]" + listed, "[TOOL_CALLS] " + listed):
        assert MISTRAL.parse(text) == ("", [ToolCall("a", {"k": "v"}), ToolCall("b", {})])
    assert MISTRAL.parse("[1, 2, 3] are numbers")[1] == []


def test_streaming_holds_back_only_what_may_be_a_call():
    assert HERMES.holds_back("Sure. <tool") == len("Sure. ")
    assert HERMES.holds_back("Sure. <tool_call>\n{") == len("Sure. ")
    assert HERMES.holds_back("Sure, 3 <") == len("Sure, 3 ")            # "<" might open the marker
    assert HERMES.holds_back("Sure, 3 < 4") == len("Sure, 3 < 4")      # "< 4" cannot
    assert HERMES.holds_back("Plain text.") == len("Plain text.")
    assert LLAMA3.holds_back(' {"name"') == 0 and LLAMA3.holds_back("Hi {") == len("Hi {")
    assert MISTRAL.holds_back("[TOOL_") == 0 and MISTRAL.holds_back("[{") == 0


def test_the_format_is_read_from_the_template():
    import test_chat_templates as family
    assert format_for_template(family.QWEN) is HERMES
    assert format_for_template(family.LLAMA31) is LLAMA3
    assert format_for_template(family.MISTRAL) is MISTRAL
    assert format_for_template(family.GEMMA3) is None
    assert format_for_template(chat.BUILTIN_TEMPLATES["chatml"]) is HERMES
    assert format_for_template(chat.BUILTIN_TEMPLATES["gemma"]) is None


def test_calls_rendered_by_the_builtin_chatml_template_parse_back():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": json.dumps({"city": "Oslo", "unit": "C"})}},
             {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": 2}}}]
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    text = chat.render(chat.BUILTIN_TEMPLATES["chatml"], messages, add_generation_prompt=False, tools=TOOLS)
    answer = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert HERMES.parse(answer) == ("", [ToolCall("get_weather", {"city": "Oslo", "unit": "C"}),
                                         ToolCall("get_time", {"zone": 2})])
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]   # the tools in the system turn


# ---- the grammar of a required call ----

@pytest.mark.parametrize("form", FORMATS, ids=lambda f: f.name)
def test_random_logits_under_the_tool_grammar_always_make_valid_calls(form):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    import test_serve_grammar
    from blobstore.runtime.serve.grammar import Grammars

    for model in (test_serve_grammar.sentencepiece_model(), test_serve_grammar.byte_level_model()):
        grammars = Grammars(model)
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        for seed in range(8):
            mask = grammars.tool_processor(form, TOOLS, parallel=False)   # random logits never end a list
            text = _sampled(model, mask, seed)
            prose, calls = form.parse(text)
            assert prose == "" and len(calls) == 1, text
            for call in calls:
                jsonschema.validate(call.arguments, schemas[call.name])


def _sampled(model, mask, seed, limit=300):
    from blobstore.runtime.sampling import SamplingParams, sample
    rng, generated = np.random.default_rng(seed), []
    for _ in range(limit):
        logits = mask(generated, rng.normal(0, 3, model.tokenizer.vocab_size).astype(np.float32))
        token = sample(logits, SamplingParams(temperature=1.0), rng)
        if token == model.tokenizer.eos_id:
            return model.tokenizer.decode(generated)
        generated.append(token)
    raise AssertionError(f"no EOS after {limit} tokens: {model.tokenizer.decode(generated)!r}")


# ---- blob-serve ----

@pytest.fixture(scope="module")
def qwen_blob(tmp_path_factory, checkpoints):
    """A tiny Qwen 2 whose chat template teaches Hermes-style <tool_call> blocks."""
    from blobstore.convert import convert
    import test_chat_templates as family

    root = tmp_path_factory.mktemp("qwen_tools")
    folder = shutil.copytree(checkpoints("qwen2"), root / "ckpt")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(chat_template=family.QWEN)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    convert(folder, root / "qwen.blob", dtype="f32", quiet=True)
    return root / "qwen.blob"


@pytest.fixture(scope="module")
def qwen_server(qwen_blob):
    pytest.importorskip("openai")
    pytest.importorskip("llguidance")
    from serve_process import ServeProcess
    server = ServeProcess(str(qwen_blob), "--ctx", "1024")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def qwen_client(qwen_server):
    import openai
    return openai.OpenAI(base_url=f"{qwen_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_required_call_comes_back_as_tool_calls(qwen_client, choice):
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        reply = qwen_client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                    seed=seed, temperature=1.0, max_tokens=200,
                                                    parallel_tool_calls=False)
        choice_out = reply.choices[0]
        assert choice_out.finish_reason == "tool_calls" and len(choice_out.message.tool_calls) == 1
        for call in choice_out.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            if isinstance(choice, dict):
                assert call.function.name == "get_time"


def test_streamed_tool_calls_equal_the_whole_answer(qwen_client):
    options = dict(model="qwen", messages=ASK, tools=TOOLS, tool_choice="required", seed=7, temperature=1.0,
                   max_tokens=200, parallel_tool_calls=False)
    whole = qwen_client.chat.completions.create(**options).choices[0]
    chunks = list(qwen_client.chat.completions.create(stream=True, **options))
    streamed = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in streamed] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == (whole.message.content or "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_auto_answer_in_text_when_no_call_is_made(qwen_client):
    for choice in ("none", "auto"):
        reply = qwen_client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                    temperature=0, max_tokens=8)
        message = reply.choices[0].message
        if choice == "none" or not message.tool_calls:
            assert message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


def test_bad_tool_choices_are_400_naming_tool_choice(qwen_server):
    import httpx
    cases = [{"tool_choice": "required"},                                            # no tools
             {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
             {"tools": TOOLS, "tool_choice": 3},
             {"tools": TOOLS, "parallel_tool_calls": "yes"},
             {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}]
    for extra in cases:
        response = httpx.post(f"{qwen_server.url}/v1/chat/completions", json={"messages": ASK, **extra}, timeout=60)
        param = "parallel_tool_calls" if "parallel_tool_calls" in extra else "tool_choice"
        assert response.status_code == 400 and response.json()["error"]["param"] == param, extra
    response = httpx.post(f"{qwen_server.url}/v1/chat/completions", json={"messages": ASK, "tools": [{"x": 1}]},
                          timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


def test_a_template_without_tool_calls_refuses_a_required_call_but_passes_tools_on_auto():
    import httpx
    from serve_process import ServeProcess
    server = ServeProcess("--ctx", "256")   # the demo model: Gemma's template has no tool format
    try:
        body = {"messages": ASK, "tools": TOOLS, "max_tokens": 4}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "tool_choice": "required"}, timeout=60)
        assert refused.status_code == 400 and "no tool-call format" in refused.json()["error"]["message"]
        answered = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert answered.status_code == 200 and "tool_calls" not in answered.json()["choices"][0]["message"]
    finally:
        server.stop()


def test_model_chat_returns_the_calls_its_text_makes(qwen_blob):
    pytest.importorskip("llguidance")
    from blobstore.runtime import load
    from blobstore.runtime.serve.grammar import Grammars
    model = load(qwen_blob, max_seq_len=1024)
    assert model.tool_call_format is HERMES
    forced = Grammars(model).tool_processor(HERMES, [TIME], parallel=False)
    result = model.chat(ASK, tools=TOOLS, max_new_tokens=200, temperature=1.0, seed=1, logits_processor=forced)
    assert result.text.startswith("<tool_call>") and [c.name for c in result.tool_calls] == ["get_time"]
    assert result.tool_calls == HERMES.parse(result.text)[1]
    plain = model.chat(ASK, max_new_tokens=4, temperature=0)   # no tools: nothing is parsed
    assert plain.tool_calls == []


def test_the_parallel_grammar_takes_several_calls_and_the_single_one_refuses_a_second():
    pytest.importorskip("llguidance")
    import test_serve_grammar
    from blobstore.runtime.serve.grammar import Grammars

    model = test_serve_grammar.byte_level_model()
    grammars = Grammars(model)
    one = '<tool_call>\n{"name":"get_time","arguments":{"zone":3}}\n</tool_call>'
    ids = model.tokenizer.encode(one + "\n" + one, add_bos=False)
    for parallel, accepted in ((True, len(ids)), (False, len(model.tokenizer.encode(one, add_bos=False)))):
        matcher = grammars.tool_processor(HERMES, TOOLS, parallel=parallel).matcher
        assert matcher.validate_tokens(ids) == accepted
