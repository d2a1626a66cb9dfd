"""Tool calls in a model's answer, in the format its chat template teaches the model.

Three formats cover the checkpoints people run: Hermes-style `<tool_call>{json}</tool_call>`
blocks (Qwen 2 / 2.5 / 3, Hermes, and the built-in ChatML template), Llama 3.1's bare JSON
object with "parameters" (after `<|python_tag|>`), and Mistral's `[TOOL_CALLS]` list. The format
is recognised from the template's text. `parse` splits generated text into its prose and its
calls; `lark` writes the grammar (for llguidance) that makes a model write a call when the
caller requires one. Markers that are control tokens are dropped when ids are decoded, so each
parser also accepts the call without its marker.

>>> form = format_for_template("... <tool_call> ...")
>>> form.parse('Let me look.<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\\n</tool_call>')
('Let me look.', [ToolCall(name='get_weather', arguments={'city': 'Oslo'})])
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: a function name and its arguments.

    >>> ToolCall("get_weather", {"city": "Oslo"}).openai()["function"]["arguments"]
    '{"city": "Oslo"}'
    """
    name: str
    arguments: dict

    def openai(self) -> dict:
        """OpenAI's tool_calls entry (the arguments as a JSON string, a fresh call id)."""
        return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family of templates writes calls: `marker` opens the calls (`closer` ends each
    one, for block formats), `arguments_key` names the arguments, and `as_list` says the calls
    follow the marker as one JSON list rather than one object each; `bare` says the marker is a
    control token that decoding drops, so an answer that opens with the JSON is a call too. A
    template that writes any of `template_markers` teaches this format."""
    name: str
    template_markers: tuple[str, ...]
    marker: str
    closer: str = ""
    arguments_key: str = "arguments"
    as_list: bool = False
    bare: bool = False

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the prose before the first call, the calls). Text after the prose must be nothing but
        calls: otherwise it is all prose and there are no calls, so nothing the model wrote is lost.

        >>> LLAMA3.parse('{"name": "now", "parameters": {}}')
        ('', [ToolCall(name='now', arguments={})])
        """
        start = self._first_call(text)
        if start is None:
            return text, []
        calls, at = [], start
        while text[at:].strip():
            value, at = self._json_at(text, _past(text, at, self.marker))
            entries = value if self.as_list and isinstance(value, list) else [value]
            parsed = [self._call(entry) for entry in entries]
            if value is None or not parsed or None in parsed:
                return text, []
            calls += parsed
            at = _past(text, at, self.closer or ";")   # Llama 3 joins its calls with ';'
        return text[:start].rstrip(), calls

    def holds_back(self, text: str) -> int:
        """Where streamed text must stop being shown because a call may be starting there (len(text)
        when none can): at the marker, at a trailing prefix of it, or, for formats whose marker is
        a dropped control token, at an answer that opens with JSON."""
        found = text.find(self.marker)
        if found >= 0:
            return found
        for size in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if self.marker.startswith(text[-size:]):
                return len(text) - size
        return 0 if self._opens_bare(text) else len(text)

    def lark(self, tools: Sequence[Mapping], marker_token: Optional[int] = None, parallel: bool = True) -> str:
        """A Lark grammar (llguidance's dialect) whose sentences are calls of `tools` with arguments
        that validate against each tool's parameters schema: one call, or with `parallel` one or
        more (Llama 3 makes one call a turn). `marker_token`: the marker's id when it is one token
        of the vocabulary (control tokens are written by id)."""
        one = {"anyOf": [_call_schema(tool, self.arguments_key) for tool in tools],
               "x-guidance": {"whitespace_flexible": False}}
        opening = f"<[{marker_token}]>" if marker_token is not None else json.dumps(self.marker)
        if self.as_list:
            calls = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
            return f"start: {opening} %json {json.dumps(calls)}\n"
        if self.closer:
            more = ' ("\\n" block)*' if parallel else ""
            return (f"start: block{more}\nblock: {opening} \"\\n\" call \"\\n\" {json.dumps(self.closer)}\n"
                    f"call: %json {json.dumps(one)}\n")
        return f"start: {opening} %json {json.dumps(one)}\n"

    def _first_call(self, text: str) -> Optional[int]:
        found = text.find(self.marker)
        if found >= 0:
            return found
        return len(text) - len(text.lstrip()) if self._opens_bare(text) else None

    def _opens_bare(self, text: str) -> bool:
        return self.bare and text.lstrip().startswith("[" if self.as_list else "{")

    def _call(self, entry) -> Optional[ToolCall]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            return None
        arguments = entry.get(self.arguments_key, entry.get("arguments", {}))
        if isinstance(arguments, str):   # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        return ToolCall(entry["name"], arguments) if isinstance(arguments, dict) else None

    @staticmethod
    def _json_at(text: str, at: int):
        at = _past(text, at, "")
        try:
            return _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            return None, at


def _past(text: str, at: int, token: str) -> int:
    """Where `text` goes on after whitespace and one optional `token` from `at`."""
    at = len(text) - len(text[at:].lstrip())
    return at + len(token) if text.startswith(token, at) else at


def _call_schema(tool: Mapping, arguments_key: str) -> dict:
    function = tool.get("function", tool)
    parameters = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


HERMES = ToolCallFormat("hermes", ("<tool_call>",), "<tool_call>", closer="</tool_call>")
MISTRAL = ToolCallFormat("mistral", ("[TOOL_CALLS]",), "[TOOL_CALLS]", as_list=True, bare=True)
# Llama 3.2's template describes the JSON call without writing <|python_tag|>, Llama 3.1's writes both
LLAMA3 = ToolCallFormat("llama3", ("<|python_tag|>", '"parameters"'), "<|python_tag|>", arguments_key="parameters",
                        bare=True)
FORMATS = (HERMES, MISTRAL, LLAMA3)   # the first match wins: a ChatML template may mention "parameters"


def format_for_template(template: str) -> Optional[ToolCallFormat]:
    """The tool-call format a chat template teaches, or None when it has none (Gemma's).

    >>> format_for_template("{{ '[TOOL_CALLS]' }}").name
    'mistral'
    """
    for form in FORMATS:
        if any(marker in template for marker in form.template_markers):
            return form
    return None
