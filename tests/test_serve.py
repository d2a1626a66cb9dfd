"""blob-serve against the official openai client and raw HTTP: the demo model served on a free
loopback port; the answers equal the Python API's, structured output always validates, and every
bad request gets OpenAI's error JSON with the right status."""
import json
import socket

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

from blobstore.runtime import demo, load  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

KEY = "sk-test-key"
CTX = 256
HELLO = [{"role": "user", "content": "Who led Israel out of Egypt?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 969},
        "tribe": {"enum": ["Judah", "Levi", "Benjamin"]},
        "sons": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "tribe"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server():
    process = ServeProcess("--api-key", KEY, "--ctx", str(CTX))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model():
    return load(demo.demo_path(), max_seq_len=CTX)


def post(server, path, body=None, *, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and (code is None or error["code"] == code)
    return error["message"]


# ---- the openai client ----

def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").owned_by == "blobstore"


def test_chat_answers_like_the_python_api_with_usage_ids_and_created(client, model):
    reply = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=12, temperature=0)
    expected = model.chat(HELLO, max_new_tokens=12, temperature=0)
    prompt = model.tokenizer.encode(model.apply_chat_template(HELLO), add_bos=False)
    assert reply.choices[0].message.content == expected.text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), expected.stats.generated_tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.created > 1.7e9


def test_streamed_chunks_concatenate_to_the_plain_answer(client):
    options = dict(model="demo", messages=HELLO, max_tokens=24, temperature=0, seed=5)
    plain = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_the_next_turn_of_a_conversation_reuses_the_cached_prompt(client):
    first = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=8, temperature=0)
    turn = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="demo", messages=turn, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens


def test_completions_equal_generate(client, model):
    reply = client.completions.create(model="demo", prompt="And God said", max_tokens=10, temperature=0)
    expected = model.generate("And God said", max_new_tokens=10, temperature=0)
    assert reply.choices[0].text == expected.text and reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(model.tokenizer.encode("And God said"))
    streamed = client.completions.create(model="demo", prompt="And God said", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_completions_take_token_ids(client, model):
    ids = model.tokenizer.encode("In the beginning")
    reply = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    assert reply.choices[0].text == model.generate(ids, max_new_tokens=6, temperature=0).text


def test_stop_strings_end_the_answer_before_them(client):
    free = client.completions.create(model="demo", prompt="And God said", max_tokens=16, temperature=0)
    words = free.choices[0].text.split()
    stop = words[len(words) // 2]
    cut = client.completions.create(model="demo", prompt="And God said", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free.choices[0].text[:free.choices[0].text.index(stop)]


def test_a_seed_reproduces_a_sampled_answer_and_seeds_differ(client):
    def ask(seed):
        return client.chat.completions.create(model="demo", messages=HELLO, max_tokens=16, temperature=1.0,
                                              seed=seed).choices[0].message.content
    assert ask(7) == ask(7)
    assert len({ask(seed) for seed in range(4)}) > 1


def test_json_schema_output_parses_and_validates_on_20_seeds(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Describe a man of Israel as JSON."}]
    for seed in range(20):
        reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=96, temperature=1.0,
                                               seed=seed, response_format=response_format)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_output_is_an_object(client):
    messages = [{"role": "user", "content": "Answer in JSON."}]
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=48, temperature=0,
                                           response_format={"type": "json_object"})
    text = reply.choices[0].message.content
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":  # a grammar that completes ends the answer at once
        assert isinstance(json.loads(text), dict)


def test_a_schema_llguidance_cannot_compile_is_a_400(server):
    body = {"messages": HELLO, "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}
    assert_error(post(server, "/v1/chat/completions", body), 400, param="response_format")


def test_the_openai_client_sees_errors_as_its_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="demo", messages=HELLO, temperature=7)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


# ---- raw HTTP: every error status ----

def test_health_needs_no_key_but_the_api_does(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert_error(httpx.get(f"{server.url}/v1/models"), 401, code="invalid_api_key")
    assert_error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}x"}), 401)
    assert_error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401)
    assert_error(post(server, "/v1/chat/completions", {"messages": HELLO}, key=None), 401)


@pytest.mark.parametrize("raw", [b"{", b'{"messages": [{"role": "user", "content": "Hi"}', b"\xff\xfe", b"",
                                 b"not json at all"])
def test_malformed_and_truncated_json_is_a_400(server, raw):
    message = assert_error(post(server, "/v1/chat/completions", content=raw,
                                headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in message


@pytest.mark.parametrize("body, param", [
    ([1, 2], None),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0]"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": "12"}, "max_tokens"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "temperature": -1}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "seed": 1.5}, "seed"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HELLO, "stop": 3}, "stop"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "n": 2}, "n"),
    ({"messages": HELLO, "ignore_eos": 1}, "ignore_eos"),
    ({"messages": HELLO, "tools": "search"}, "tools"),
    ({"messages": HELLO, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": HELLO, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
])
def test_bad_fields_are_a_400_naming_the_field(server, body, param):
    assert_error(post(server, "/v1/chat/completions", body), 400, param=param)


@pytest.mark.parametrize("body, param", [({"prompt": ""}, "prompt"), ({"prompt": [1, "a"]}, "prompt"),
                                         ({"prompt": "Hi", "echo": True}, "echo"),
                                         ({"prompt": [999999]}, "prompt")])
def test_bad_completion_prompts_are_a_400(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param=param)


def test_an_unknown_model_is_a_404(server):
    assert_error(post(server, "/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO}), 404,
                 param="model", code="model_not_found")
    assert_error(httpx.get(f"{server.url}/v1/models/gpt-4o", headers={"Authorization": f"Bearer {KEY}"}), 404,
                 param="model")


def test_unknown_paths_and_methods_answer_in_the_error_shape(server):
    assert_error(httpx.get(f"{server.url}/v1/embeddings"), 404)
    assert_error(httpx.get(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)


def test_a_body_over_the_limit_is_a_413_declared_or_streamed(server):
    huge = json.dumps({"messages": [{"role": "user", "content": "a" * (5 << 20)}]}).encode()
    assert_error(post(server, "/v1/chat/completions", content=huge, headers={"Content-Type": "application/json"}),
                 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit holds while the body streams in
        for start in range(0, len(huge), 1 << 16):
            yield huge[start:start + (1 << 16)]
    assert_error(post(server, "/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"}),
                 413)


def test_a_prompt_longer_than_the_context_is_a_400_naming_both_lengths(server, model):
    messages = [{"role": "user", "content": "and the " * 200}]
    length = len(model.tokenizer.encode(model.apply_chat_template(messages), add_bos=False))
    message = assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400, param="messages",
                           code="context_length_exceeded")
    assert str(length) in message and str(CTX) in message


def test_content_types(server):
    body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
    # curl -d sends form-urlencoded, fetch() text/plain: a JSON body is read whatever they say
    for kind in ("application/x-www-form-urlencoded", "text/plain", "application/json; charset=utf-8"):
        assert post(server, "/v1/chat/completions", content=body, headers={"Content-Type": kind}).status_code == 200
    response = post(server, "/v1/chat/completions", files={"file": ("a.json", body)})
    assert_error(response, 415)


def test_huge_max_tokens_stops_at_the_full_context(server):
    response = post(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 10 ** 12, "temperature": 0,
                                                     "ignore_eos": True})
    assert response.status_code == 200, response.text
    # the last token is sampled from the last position's logits: one past the context's positions
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["usage"]["total_tokens"] == CTX + 1


def test_unicode_and_empty_messages(server):
    text = "Καὶ εἶπεν ὁ Θεός — 神は言われた 🙏 \u0000 \ud7ff"
    for content in (text, "", [{"type": "text", "text": text}]):
        response = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                         "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert isinstance(response.json()["choices"][0]["message"]["content"], str)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": text}], "max_tokens": 8, "stream": True}) as s:
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    for event in events[:-1]:
        json.loads(event[len("data: "):])


def test_a_connection_cut_inside_the_body_leaves_the_server_serving(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 500\r\n\r\n{\"messages\": [")
    assert post(server, "/v1/completions", {"prompt": "And", "max_tokens": 2}).status_code == 200
