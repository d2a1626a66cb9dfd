"""Chat prompts: Jinja chat templates, rendered the way transformers renders them, but in a
sandbox, because a template is code from an untrusted file.

A model's own template comes from its tokenizer_config.json / chat_template.jinja. Models
without one get a built-in template chosen by family (`builtin_template`).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Collection, Mapping, Sequence

import jinja2
import numpy as np
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError


class ChatTemplateError(ValueError):
    """A chat template that does not compile, is blocked by the sandbox, or rejects the messages."""


# Built-in templates. Jinja string escapes ('\n') are kept raw here; all output comes from
# {{ }} expressions so that block whitespace never leaks into the prompt.
_GEMMA = r"""
{%- macro content(message) -%}
  {%- if message['content'] is string -%}
    {{- message['content'] | trim -}}
  {%- else -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}
      {%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_prefix = content(messages[0]) + '\n\n' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system_prefix = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('conversation roles must alternate user/assistant/user/... after an optional system message') -}}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{- '<start_of_turn>' + role + '\n' + (system_prefix if loop.first else '') + content(message) + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

_LLAMA3 = r"""
{{- bos_token -}}
{%- for message in messages -%}
  {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

# ChatML; with tools, the Hermes-style calls runtime/tool_calls.py parses (Qwen's own templates
# teach the same <tool_call> blocks)
_CHATML = r"""
{%- if tools -%}
  {%- set has_system = messages and messages[0]['role'] == 'system' -%}
  {{- '<|im_start|>system\n' + (messages[0]['content'] + '\n\n' if has_system else '') -}}
  {{- 'You can call these functions, given as JSON schemas:\n<tools>\n' -}}
  {%- for tool in tools -%}{{- tool | tojson + '\n' -}}{%- endfor -%}
  {{- '</tools>\nTo call one, answer with <tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call> for each call.<|im_end|>\n' -}}
  {%- if has_system -%}{%- set messages = messages[1:] -%}{%- endif -%}
{%- endif -%}
{%- for message in messages -%}
  {%- set ns = namespace(text=message['content'] if message['content'] is string else '') -%}
  {%- for call in message['tool_calls'] or [] -%}
    {%- set call = call['function'] if call['function'] is defined else call -%}
    {%- set arguments = call['arguments'] if call['arguments'] is string else call['arguments'] | tojson -%}
    {%- set ns.text = ns.text + ('\n' if ns.text else '') + '<tool_call>\n{"name": "' + call['name'] + '", "arguments": ' + arguments + '}\n</tool_call>' -%}
  {%- endfor -%}
  {{- '<|im_start|>' + message['role'] + '\n' + ns.text + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Llama 2 and Mistral share the [INST] shape. Llama 2 wraps the system prompt in <<SYS>>
# and repeats BOS on every instruction; Mistral prepends the system prompt as plain text and
# writes BOS once.
_INST_SETTINGS = {
    "llama2": r"""
{%- set system_open, system_close = '<<SYS>>\n', '\n<</SYS>>\n\n' -%}
{%- set bos_every_turn, answer_end = true, ' ' + eos_token -%}
""",
    "mistral": r"""
{%- set system_open, system_close = '', '\n\n' -%}
{%- set bos_every_turn, answer_end = false, eos_token -%}
""",
}

_INST = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_prefix = system_open + messages[0]['content'] | trim + system_close -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system_prefix = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('conversation roles must alternate user/assistant/user/... after an optional system message') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- set bos = bos_token if bos_every_turn or loop.first else '' -%}
    {{- bos + '[INST] ' + (system_prefix if loop.first else '') + message['content'] | trim + ' [/INST]' -}}
  {%- else -%}
    {{- ' ' + message['content'] | trim + answer_end -}}
  {%- endif -%}
{%- endfor -%}
"""

# Phi-3 / Phi-3.5 / Phi-4-mini: a role tag line, the content, <|end|>; the checkpoints ship their
# own template, this is the fallback for files without one.
_PHI3 = r"""
{%- for message in messages -%}
  {{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant|>\n' -}}
{%- endif -%}
"""

BUILTIN_TEMPLATES = {
    "gemma": _GEMMA,
    "llama2": _INST_SETTINGS["llama2"] + _INST,
    "llama3": _LLAMA3,
    "chatml": _CHATML,
    "mistral": _INST_SETTINGS["mistral"] + _INST,
    "phi3": _PHI3,
}

# Markers that close a turn in the templates we know; a model stops generating on them.
_END_OF_TURN_MARKERS = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>")


def builtin_template(family: str, vocabulary: Collection[str] = ()) -> str:
    """The built-in Jinja template for a model family (transformers' model_type, e.g.
    "gemma3_text", "qwen2", "llama") or for a template name in BUILTIN_TEMPLATES.
    "llama" means Llama 3 when `vocabulary` holds "<|start_header_id|>", else Llama 2.

    >>> builtin_template("qwen2") == BUILTIN_TEMPLATES["chatml"]
    True
    """
    name = family.lower()
    if name not in BUILTIN_TEMPLATES:
        name = _template_name_for_family(name, vocabulary)
    return BUILTIN_TEMPLATES[name]


def end_of_turn_tokens(template: str) -> tuple[str, ...]:
    """The end-of-turn token strings a template writes, which generation should stop on
    (besides the model's EOS ids). Templates ending turns with EOS itself give ().

    >>> end_of_turn_tokens(BUILTIN_TEMPLATES["gemma"])
    ('<end_of_turn>',)
    """
    return tuple(marker for marker in _END_OF_TURN_MARKERS if marker in template)


def render(template: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", tools: Sequence[Mapping] | None = None,
           documents: Sequence[Mapping] | None = None, **variables) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]), rendered like
    transformers' apply_chat_template(tokenize=False): `tools` (JSON-schema dicts) and
    `documents` are always defined for the template (None when not given), extra `variables`
    (enable_thinking, ...) are passed as they are, message keys set to None are dropped, and a
    message's reasoning is also given as `reasoning_content` and `thinking`. A message's content
    may be a string or a list of parts ([{"type": "text", "text": ...}]). The template sees
    plain copies (dicts, lists, strings, numbers) of everything, never the caller's objects.

    >>> render(BUILTIN_TEMPLATES["chatml"], [{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    _check_messages(messages)
    _check_tools(tools)
    compiled = _compile(template)
    try:
        shown = [_with_reasoning_aliases(_without_nones(_plain(message))) for message in messages]
        return compiled.render(messages=shown, tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
                               **_plain(variables))
    except ChatTemplateError:
        raise
    except Exception as error:  # the template is foreign code: any failure is the template's
        raise ChatTemplateError(f"chat template failed: {type(error).__name__}: {error}") from error


def _template_name_for_family(family: str, vocabulary: Collection[str]) -> str:
    if family.startswith("gemma"):
        return "gemma"
    if family.startswith("qwen"):
        return "chatml"
    if family.startswith("mistral"):
        return "mistral"
    if family.startswith("phi3"):
        return "phi3"
    if family.startswith("llama"):
        return "llama3" if "<|start_header_id|>" in vocabulary else "llama2"
    raise ChatTemplateError(f"no built-in chat template for model family {family!r}; "
                            f"known: gemma*, llama, mistral, phi3, qwen*, or one of {sorted(BUILTIN_TEMPLATES)}")


def _check_messages(messages: Sequence[Mapping]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{index}] must be a dict with a string 'role', got {message!r}")


def _check_tools(tools) -> None:
    if tools is None:
        return
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{index}] must be a JSON-schema dict ({{'type': 'function', 'function': "
                                    f"{{'name': ..., 'parameters': ...}}}}), got {type(tool).__name__}; "
                                    f"transformers.utils.get_json_schema turns a Python function into one")


def _plain(value):
    """A copy of `value` built from dicts, lists, tuples, strings, numbers, booleans and None:
    rich objects (numpy arrays, images, str subclasses) carry methods the sandbox does not know to
    be harmful, so anything else reaches the template as a "<TypeName>" placeholder string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # bool cannot be subclassed: an int subclass here is an enum or the like
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"


def _without_nones(message: dict) -> dict:
    # OpenAI-style messages carry content=None or tool_calls=None; templates test for the key
    return {key: value for key, value in message.items() if value is not None}


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _with_reasoning_aliases(message: dict) -> dict:
    """Reasoning under any of its names is also given as `reasoning_content` (what most templates
    read) and `thinking` (gpt-oss templates), as transformers gives it."""
    reasoning = next((message[key] for key in _REASONING_KEYS if key in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"chat template line {error.lineno}: {error.message}") from None


@functools.lru_cache(maxsize=1)
def _environment():
    """transformers' rendering rules (trim/lstrip blocks, loop controls, its globals
    raise_exception, strftime_now, namespace and dict, and its tojson with ensure_ascii, indent,
    separators and sort_keys), in an immutable sandbox where unsafe attribute access fails loudly."""
    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for training masks;
        for a prompt it only renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            # jinja's default yields an Undefined that prints as "": blocked code would go unnoticed
            raise SecurityError(f"chat template tried to access {type(obj).__name__}.{attribute}, "
                                "which the sandbox blocks")

    class TemplateNamespace(jinja2.utils.Namespace):
        """namespace(...) whose attribute names may not start with "_", so that a template cannot
        shadow the object's own internals through it."""

        def __init__(*args, **kwargs):  # jinja's signature: `self` may be an attribute name too
            self, attributes = args[0], dict(*args[1:], **kwargs)
            for name in attributes:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat template tried to set namespace attribute {name!r}, "
                                    "which the sandbox blocks")

    class TemplateDict:
        """dict(...) and dict.fromkeys(...) without the dict type itself, whose class attributes
        lead to Python's internals."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise ChatTemplateError(f"chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols],
                  undefined=jinja2.Undefined)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = TemplateNamespace
    env.globals["dict"] = TemplateDict()
    return env

