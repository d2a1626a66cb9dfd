"""Chat templates in the styles the model families ship (Llama 3.1, Qwen 2.5/3, Mistral, Phi-4-mini,
Gemma 3) render exactly as transformers' apply_chat_template(tokenize=False) renders them: system
messages, several turns, tool definitions, tool calls and results, content given as a list of parts,
with and without the generation prompt. The templates are written here; each uses the Jinja
constructs its family's real template uses."""
import datetime

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

import test_chat  # noqa: E402  (tests/ is on sys.path under pytest)
from blobstore.runtime import chat
from blobstore.runtime.chat import ChatTemplateError, render

BOS, EOS = "<bos>", "<eos>"

# tool definitions and tool calls, a date from strftime_now, namespace, tojson(indent=4), |items,
# |reject, raise_exception on more than one call per turn
LLAMA31 = r"""
{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if builtin_tools is defined or tools is not none %}{{- 'Environment: ipython\n' }}{%- endif %}
{%- if builtin_tools is defined %}
    {{- 'Tools: ' + builtin_tools | reject('equalto', 'code_interpreter') | join(', ') + '\n\n' }}
{%- endif %}
{{- 'Today Date: ' + date_string + '\n\n' }}
{%- if tools is not none %}
    {{- 'Answer with a JSON function call {"name": ..., "parameters": ...} using one of:\n\n' }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\n\n' }}{%- endfor %}
{%- endif %}
{{- ns.system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message.role in ['tool', 'ipython'] %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {%- if message.content is mapping %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if message.tool_calls | length != 1 %}{{- raise_exception('one tool call per turn, please') }}{%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {%- if builtin_tools is defined and call.name in builtin_tools %}
            {{- '<|python_tag|>' + call.name + '.call(' }}
            {%- for name, value in call.arguments | items %}
                {{- name + '="' + value + '"' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}
            {%- endfor %}
            {{- ')' }}
        {%- else %}
            {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
        {%- endif %}
        {{- '<|eom_id|>' if builtin_tools is defined else '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

# ChatML with a <tools> block, <tool_call> for assistant calls, consecutive tool results grouped
# in one user turn (Qwen 2.5), and reasoning (Qwen 3): messages[::-1], string methods, enable_thinking
QWEN = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {{- messages[0].content + '\n\n' if messages[0].role == 'system' else '' }}
    {{- '# Tools\n\nFunction signatures inside <tools></tools>:\n<tools>' }}
    {%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\n</tools>\n\nCall one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string
          and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_query_index and reasoning %}
            {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}
        {%- endif %}
        {{- content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- ('\n' if content or not loop.first else '') + '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- (tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""

# [AVAILABLE_TOOLS] before the last user turn, tools rebuilt key by key with .items() and `is string`,
# |selectattr, [TOOL_CALLS] with 9-character ids checked by raise_exception, [TOOL_RESULTS]
MISTRAL = r"""
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}
{%- set ns = namespace(turn=0) %}
{%- for message in loop_messages if not (message.role == 'tool' or message.tool_calls is defined) %}
    {%- if (message.role == 'user') != (ns.turn % 2 == 0) %}
        {{- raise_exception('after the system message, roles must alternate user/assistant') }}
    {%- endif %}
    {%- set ns.turn = ns.turn + 1 %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}
        {%- if tools is not none and message == user_messages[-1] %}
            {{- '[AVAILABLE_TOOLS] [' }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != 'return' %}
                    {%- if val is string %}{{- '"' + key + '": "' + val + '"' }}
                    {%- else %}{{- '"' + key + '": ' + val | tojson }}{%- endif %}
                    {%- if not loop.last %}{{- ', ' }}{%- endif %}
                {%- endfor %}
                {{- '}}' }}{{- ', ' if not loop.last else ']' }}
            {%- endfor %}
            {{- '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if message == user_messages[-1] and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message.content + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message.content + '[/INST]' }}
        {%- endif %}
    {%- elif message.tool_calls is defined %}
        {{- '[TOOL_CALLS] [' }}
        {%- for call in message.tool_calls %}
            {%- if call.id is not defined or call.id | length != 9 %}
                {{- raise_exception('tool call ids must be 9 characters long') }}
            {%- endif %}
            {{- {'name': call.function.name, 'arguments': call.function.arguments, 'id': call.id} | tojson }}
            {{- ', ' if not loop.last else ']' + eos_token }}
        {%- endfor %}
    {%- elif message.role == 'assistant' %}
        {{- ' ' + message.content | trim + eos_token }}
    {%- elif message.role == 'tool' %}
        {{- '[TOOL_RESULTS] ' + {'content': message.content, 'call_id': message.tool_call_id} | tojson + '[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
"""

# <|tool|>...<|/tool|> inside the system turn, from the system message's own 'tools' string
PHI4_MINI = r"""
{%- for message in messages %}
    {%- if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}
        {{- '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}
    {%- else %}
        {{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- else %}{{- eos_token }}{%- endif %}
"""

# content as a string or as a list of {"type": "text" | "image"} parts, the system message folded
# into the first user turn, alternation enforced, 'model' for the assistant role
GEMMA3 = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {%- else %}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- elif message['content'] is iterable %}
        {%- for item in message['content'] %}
            {%- if item['type'] == 'image' %}{{- '<start_of_image>' }}
            {%- elif item['type'] == 'text' %}{{- item['text'] | trim }}{%- endif %}
        {%- endfor %}
    {%- else %}
        {{- raise_exception('invalid content type') }}
    {%- endif %}
    {{- '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}
"""

TEMPLATES = {"llama3.1": LLAMA31, "qwen": QWEN, "mistral": MISTRAL, "phi4-mini": PHI4_MINI, "gemma3": GEMMA3}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo <today> for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"},
                                                     "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]},
    "return": {"type": "number"}}}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "brave_search", "description": "Search the web",
                                                     "parameters": {"type": "object", "properties": {}}}}]


class Picture:
    """Stands for an image object in a content part: templates only test that the key is there."""


CONVERSATIONS = {
    **test_chat.CONVERSATIONS,
    "parts": [
        {"role": "system", "content": [{"type": "text", "text": "Describe images."}]},
        {"role": "user", "content": [{"type": "image", "image": Picture()}, {"type": "text", "text": " What is it? "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ],
    "tool-call": [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
        {"role": "tool", "tool_call_id": "call12345", "content": "21.5"},
        {"role": "assistant", "content": "It is 21.5 °C in Paris."},
        {"role": "user", "content": "And in Rome?"},
    ],
    "parallel-calls": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call67890", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "call12345", "content": "21"},
        {"role": "tool", "tool_call_id": "call67890", "content": "25"},
    ],
    "builtin-call": [
        {"role": "user", "content": "Search for blobstore"},
        {"role": "assistant", "tool_calls": [
            {"id": "call00001", "type": "function",
             "function": {"name": "brave_search", "arguments": {"query": "blobstore", "site": "example.org"}}}]},
        {"role": "tool", "content": {"results": ["a", "b"], "score": np.float32(0.5)}},
    ],
    "reasoning": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning": "another sum"},
    ],
    "phi-tools": [
        {"role": "system", "content": "You can call functions.", "tools": '[{"name": "get_weather"}]'},
        {"role": "user", "content": "Weather?"},
    ],
}

VARIABLES = {
    "none": {},
    "tools": {"tools": TOOLS},
    "builtin": {"tools": TOOLS, "builtin_tools": ["brave_search", "code_interpreter"]},
    "date-and-no-thinking": {"date_string": "26 Jul 2024", "enable_thinking": False},
}


class FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 3, 9, 14, 30)


@pytest.fixture
def frozen_time(monkeypatch):
    """strftime_now reads the same fixed time in both renderers."""
    monkeypatch.setattr(chat_template_utils, "datetime", FrozenClock)
    monkeypatch.setattr(chat, "datetime", FrozenClock)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE()),
                                                bos_token=BOS, eos_token=EOS)


def hf_render(hf_tokenizer, template, messages, add_generation_prompt, variables):
    """transformers' rendering, or the message of the template error it raised."""
    try:
        return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **variables)
    except Exception as error:  # noqa: BLE001 - any refusal of transformers' must be ours too
        return error


@pytest.mark.parametrize("variables", sorted(VARIABLES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_family_templates_render_as_transformers_does(hf_tokenizer, frozen_time, name, conversation, variables,
                                                      add_generation_prompt):
    template, messages, extra = TEMPLATES[name], CONVERSATIONS[conversation], VARIABLES[variables]
    theirs = hf_render(hf_tokenizer, template, messages, add_generation_prompt, extra)
    if isinstance(theirs, Exception):
        # the template refuses these messages (a second tool call, a tool role Gemma does not know...)
        with pytest.raises(ChatTemplateError):
            render(template, messages, add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS,
                   **extra)
        return
    ours = render(template, messages, add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS,
                  **extra)
    assert ours == theirs


def _ours(name, conversation, **variables):
    return render(TEMPLATES[name], CONVERSATIONS[conversation], bos_token=BOS, eos_token=EOS, **variables)


def test_the_parity_cases_render_the_constructs_they_are_meant_to(frozen_time):
    """The comparison above is only worth something if the templates really take these paths."""
    llama = _ours("llama3.1", "tool-call", tools=TOOLS)
    assert "Today Date: 09 Mar 2026" in llama and '{\n    "type": "function",\n    "function": {' in llama
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}<|eot_id|>' in llama
    builtin = _ours("llama3.1", "builtin-call", tools=TOOLS, builtin_tools=["brave_search", "code_interpreter"])
    assert "Tools: brave_search\n\n" in builtin
    assert '<|python_tag|>brave_search.call(query="blobstore", site="example.org")<|eom_id|>' in builtin
    assert '{"results": ["a", "b"], "score": 0.5}' in builtin
    assert "Today Date: 26 Jul 2024" in _ours("llama3.1", "single", date_string="26 Jul 2024")
    with pytest.raises(ChatTemplateError, match="one tool call per turn"):
        _ours("llama3.1", "parallel-calls")

    qwen = _ours("qwen", "parallel-calls", tools=TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in qwen
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>' in qwen
    assert ("<|im_start|>user\n<tool_response>\n21\n</tool_response>\n"
            "<tool_response>\n25\n</tool_response><|im_end|>") in qwen
    thinking = _ours("qwen", "reasoning", enable_thinking=False)
    assert "<|im_start|>assistant\n4<|im_end|>" in thinking  # earlier reasoning is dropped
    assert "<think>\nanother sum\n</think>\n\n6" in thinking  # `reasoning` is read as reasoning_content
    assert thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    mistral = _ours("mistral", "tool-call", tools=TOOLS)
    assert '[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", "description": "Mét' in mistral
    assert '"return"' not in mistral and mistral.index("[AVAILABLE_TOOLS]") > mistral.index("[TOOL_RESULTS]")
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}, "id": "call12345"}'
    assert f"[TOOL_CALLS] [{call}]<eos>" in mistral
    assert "[INST] Use tools when useful.\n\nAnd in Rome?[/INST]" in mistral

    assert "<|system|>You can call functions.<|tool|>[{\"name\": \"get_weather\"}]<|/tool|><|end|>" in _ours(
        "phi4-mini", "phi-tools")
    gemma = _ours("gemma3", "parts")
    assert gemma.startswith("<bos><start_of_turn>user\nDescribe images.\n\n<start_of_image>What is it?<end_of_turn>")


def test_tools_must_be_json_schema_dicts():
    def get_weather(city: str):
        """Weather of a city."""

    with pytest.raises(ChatTemplateError, match=r"tools\[0\] must be a JSON-schema dict.*get_json_schema"):
        render(QWEN, CONVERSATIONS["single"], tools=[get_weather])
    with pytest.raises(ChatTemplateError, match="tools must be a list"):
        render(QWEN, CONVERSATIONS["single"], tools=WEATHER)


def test_the_template_sees_plain_copies_and_the_callers_messages_stay_as_they_were():
    messages = [{"role": "user", "content": "hi", "meta": Picture(), "name": None}]
    shown = render("{{ messages[0].meta }}|{{ messages[0].name is defined }}|{{ messages[0] | length }}", messages)
    assert shown == "<Picture>|False|3"
    assert messages == [{"role": "user", "content": "hi", "meta": messages[0]["meta"], "name": None}]


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace(a=1) %}{% set ns._hidden = 2 %}",
    "{{ dict.__class__ }}",
])
def test_namespace_and_dict_keep_their_internals_out_of_reach(template):
    with pytest.raises(ChatTemplateError, match="sandbox blocks"):
        render(template, [])


def test_namespace_and_dict_work_as_templates_use_them():
    template = ("{% set ns = namespace(seen=[], n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                "{{ ns.n }} {{ dict(a=1, b=2) | tojson }} {{ dict.fromkeys(['x'], 0) | tojson(indent=None) }}")
    assert render(template, CONVERSATIONS["system"]) == '2 {"a": 1, "b": 2} {"x": 0}'
