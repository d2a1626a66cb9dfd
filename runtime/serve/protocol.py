"""OpenAI's request and response shapes: requests are checked field by field into a Job (every
problem a 400 naming the field), results become chat.completion / text_completion objects and
their streamed chunks, and errors OpenAI's {"error": {message, type, param, code}}."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status.

    >>> APIError(400, "messages must be a list", param="messages").body()["error"]["param"]
    'messages'
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[Mapping] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """One request, checked: what to generate (chat messages or a completion prompt) and how."""
    messages: Optional[list] = None             # chat: rendered by the model's chat template
    tools: Optional[list] = None                # chat: passed to the template
    tool_choice: str = "auto"                   # "auto": calls parsed from the answer; "none"; "required"
    tool_name: Optional[str] = None             # tool_choice naming one function: a call of it is required
    parallel_tool_calls: bool = True            # a required call may be several
    prompt: Any = None                          # completion: a str, or a list of token ids
    max_tokens: Optional[int] = None            # None: until the context is full
    sampling: dict = field(default_factory=dict)  # Model.stream's options: temperature, top_p, seed, stop, ...
    response_format: Optional[dict] = None      # None, {"type": "json_object"}, {"type": "json_schema", "schema": ...}
    stream: bool = False
    include_usage: bool = False

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def parse_chat(body: Any, model_id: str) -> Job:
    """A /v1/chat/completions body as a Job.

    >>> parse_chat({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}, "demo").max_tokens
    8
    """
    body = _common(body, model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    for index, message in enumerate(messages):
        _check_message(index, message)
    tools = _tools(body.get("tools"))
    tool_choice, tool_name = _tool_choice(body.get("tool_choice"), tools)
    response_format = _response_format(body.get("response_format"))
    if response_format is not None and (tool_choice == "required" or tool_name):
        raise APIError(400, "response_format and a required tool call cannot both constrain one answer",
                       param="tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if type(parallel) is not bool:
        raise APIError(400, f"parallel_tool_calls must be true or false, got {parallel!r}", param="parallel_tool_calls")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Job(messages=messages, tools=tools, tool_choice=tool_choice, tool_name=tool_name, parallel_tool_calls=parallel,
               max_tokens=_max_tokens(max_tokens), sampling=_sampling(body), response_format=response_format,
               **_streaming(body))


def _tools(tools: Any) -> Optional[list]:
    def named(tool):
        function = tool.get("function") if isinstance(tool, dict) else None
        return isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]

    if tools is not None and not (isinstance(tools, list) and all(named(t) for t in tools)):
        raise APIError(400, "tools must be a list of {type: function, function: {name, parameters}} objects",
                       param="tools")
    return tools or None


def _tool_choice(choice: Any, tools: Optional[list]) -> tuple[str, Optional[str]]:
    """("auto" | "none" | "required", the function a call must name or None)."""
    if choice is None:
        return "auto", None
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise APIError(400, "tool_choice is 'required' but the request has no tools", param="tool_choice")
        return choice, None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise APIError(400, "tool_choice must be auto, none, required or {type: function, function: {name}}",
                       param="tool_choice")
    if name not in [t["function"]["name"] for t in tools or []]:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the request's tools",
                       param="tool_choice")
    return "required", name


def parse_completion(body: Any, model_id: str) -> Job:
    """A /v1/completions body as a Job (the prompt a string, one-string list, or token ids).

    >>> parse_completion({"prompt": "And God said", "max_tokens": 4}, "demo").prompt
    'And God said'
    """
    body = _common(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    token_ids = isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt)
    if not (isinstance(prompt, str) and prompt) and not token_ids:
        raise APIError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                       param="prompt")
    for name in ("echo", "logprobs", "suffix"):
        if body.get(name):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    return Job(prompt=prompt, max_tokens=_max_tokens(body.get("max_tokens", 16)), sampling=_sampling(body),
               response_format=_response_format(body.get("response_format")), **_streaming(body))


def _common(body: Any, model_id: str) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"model {model!r} does not exist; this server runs {model_id!r}", param="model",
                       code="model_not_found")
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1: this server makes one choice per request", param="n")
    return body


def _check_message(index: int, message: Any) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise APIError(400, f"{where} must be an object whose role is one of {', '.join(ROLES)}", param=where)
    content = message.get("content")
    if content is None and not message.get("tool_calls"):
        raise APIError(400, f"{where}.content is missing", param=f"{where}.content")
    parts_ok = isinstance(content, list) and all(_text_part(p) or _image_part(p) for p in content)
    if content is not None and not isinstance(content, str) and not parts_ok:
        raise APIError(400, f"{where}.content must be a string or a list of parts: {{type: text, text: ...}} or "
                            f"{{type: image_url, image_url: {{url: \"data:image/...;base64,...\"}}}}",
                       param=f"{where}.content")


def _text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _image_part(part: Any) -> bool:
    """An image_url part; its URL is checked (a base64 data: URL) when the image is read."""
    url = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
    return isinstance(url, dict) and isinstance(url.get("url"), str)


def _max_tokens(value: Any) -> Optional[int]:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise APIError(400, f"max_tokens must be a positive integer, got {value!r}", param="max_tokens")
    return value


_NUMBERS = {  # field: (lowest, highest, integer?)
    "temperature": (0.0, 2.0, False), "top_p": (0.0, 1.0, False), "min_p": (0.0, 1.0, False),
    "top_k": (0, None, True), "repetition_penalty": (0.0, None, False), "seed": (None, None, True),
}


def _sampling(body: dict) -> dict:
    options = {}
    for name, (low, high, integer) in _NUMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        kind_ok = type(value) is int or (not integer and type(value) is float)
        if not kind_ok or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"in [{low}, {high if high is not None else '∞'}]" if low is not None else "an integer"
            raise APIError(400, f"{name} must be {'an integer ' if integer else 'a number '}{bounds}, got {value!r}",
                           param=name)
        options[name] = value
    if options.get("top_p") == 0:
        raise APIError(400, "top_p must be above 0", param="top_p")
    if options.get("repetition_penalty") == 0:
        raise APIError(400, "repetition_penalty must be above 0", param="repetition_penalty")
    ignore_eos = body.get("ignore_eos", False)  # llama.cpp's extension: generate past end-of-sequence
    if type(ignore_eos) is not bool:
        raise APIError(400, f"ignore_eos must be true or false, got {ignore_eos!r}", param="ignore_eos")
    if ignore_eos:
        options["ignore_eos"] = True
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS
                                 and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them",
                       param="stop")
    if stop:
        options["stop"] = stop
    return options


def _response_format(value: Any) -> Optional[dict]:
    if value is None or (isinstance(value, dict) and value.get("type") == "text"):
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema must be an object holding a `schema` object",
                           param="response_format.json_schema")
        return {"type": "json_schema", "schema": schema}
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                   param="response_format")


def _streaming(body: dict) -> dict:
    stream, options = body.get("stream", False), body.get("stream_options")
    if type(stream) is not bool:
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    if options is not None and not (isinstance(options, dict) and type(options.get("include_usage", False)) is bool):
        raise APIError(400, "stream_options must be an object like {include_usage: true}", param="stream_options")
    return {"stream": stream, "include_usage": bool(stream and options and options.get("include_usage"))}


# ---- responses ----

class Reply:
    """The id, creation time and model of one response, shared by all its streamed chunks.

    >>> Reply("demo", chat=True).chunk(content="Hi")["object"]
    'chat.completion.chunk'
    """

    def __init__(self, model_id: str, *, chat: bool):
        self.chat, self.model_id = chat, model_id
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list, usage: Optional[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "choices": choices, "usage": usage}

    def whole(self, text: str, finish_reason: str, usage: dict, tool_calls: Sequence = ()) -> dict:
        """The non-streamed response; with `tool_calls` (ToolCalls), `text` is the prose before them."""
        if self.chat:
            message = {"role": "assistant", "content": text}
            if tool_calls:
                message = {"role": "assistant", "content": text or None, "tool_calls": [c.openai() for c in tool_calls]}
                finish_reason = "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage)

    def chunk(self, content: str = "", finish_reason: Optional[str] = None, *, role: bool = False) -> dict:
        """One streamed piece of text (the first chat chunk also says the role)."""
        if self.chat:
            delta = {"role": "assistant", "content": content} if role else ({"content": content} if content else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], None)
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], None)

    def tool_calls_chunk(self, tool_calls: Sequence) -> dict:
        """The streamed tool calls, whole, in one delta (OpenAI's `index` tells them apart)."""
        calls = [{"index": i, **call.openai()} for i, call in enumerate(tool_calls)]
        choice = {"index": 0, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}
        return self._envelope("chat.completion.chunk", [choice], None)

    def usage_chunk(self, usage: dict) -> dict:
        """stream_options.include_usage: the last chunk, with no choices."""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: the prompt's leading tokens a session already held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
