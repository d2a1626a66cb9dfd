"""Chat templates: built-in fallbacks and HF-style templates render as transformers renders
them; the sandbox stops template code from reaching Python internals."""

import pytest

tokenizers = pytest.importorskip("tokenizers")
HfTokenizer, models = tokenizers.Tokenizer, tokenizers.models
PreTrainedTokenizerFast = pytest.importorskip("transformers").PreTrainedTokenizerFast

from blobstore.runtime.chat import (
    BUILTIN_TEMPLATES, ChatTemplateError, builtin_template, end_of_turn_tokens, render,
)

BOS, EOS = "<bos>", "<eos>"

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi!"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    "multi-turn": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello  "},
        {"role": "assistant", "content": " Bonjour !"},
        {"role": "user", "content": "Ça va ? 你好 👋"},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    return PreTrainedTokenizerFast(tokenizer_object=HfTokenizer(models.BPE()), bos_token=BOS, eos_token=EOS)


def hf_render(hf_tokenizer, template, messages, add_generation_prompt=True, **variables):
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, **variables)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_templates_render_as_transformers_does(hf_tokenizer, name, conversation, add_generation_prompt):
    template, messages = BUILTIN_TEMPLATES[name], CONVERSATIONS[conversation]
    ours = render(template, messages, add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS)
    assert ours == hf_render(hf_tokenizer, template, messages, add_generation_prompt)


EXPECTED = {
    "gemma": "<bos><start_of_turn>user\nYou answer in French.\n\nHello<end_of_turn>\n"
             "<start_of_turn>model\nBonjour !<end_of_turn>\n"
             "<start_of_turn>user\nÇa va ? 你好 👋<end_of_turn>\n<start_of_turn>model\n",
    "chatml": "<|im_start|>system\nYou answer in French.<|im_end|>\n<|im_start|>user\nHello  <|im_end|>\n"
              "<|im_start|>assistant\n Bonjour !<|im_end|>\n<|im_start|>user\nÇa va ? 你好 👋<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<bos><|start_header_id|>system<|end_header_id|>\n\nYou answer in French.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nBonjour !<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nÇa va ? 你好 👋<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<bos>[INST] <<SYS>>\nYou answer in French.\n<</SYS>>\n\nHello [/INST] Bonjour ! <eos>"
              "<bos>[INST] Ça va ? 你好 👋 [/INST]",
    "mistral": "<bos>[INST] You answer in French.\n\nHello [/INST] Bonjour !<eos>[INST] Ça va ? 你好 👋 [/INST]",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_templates_write_the_documented_turn_format(name):
    rendered = render(BUILTIN_TEMPLATES[name], CONVERSATIONS["multi-turn"], bos_token=BOS, eos_token=EOS)
    assert rendered == EXPECTED[name]


@pytest.mark.parametrize("family, vocabulary, name", [
    ("gemma", (), "gemma"), ("gemma2", (), "gemma"), ("gemma3_text", (), "gemma"),
    ("qwen2", (), "chatml"), ("qwen3", (), "chatml"), ("mistral", (), "mistral"), ("Mistral", (), "mistral"),
    ("llama", (), "llama2"), ("llama", {"<|start_header_id|>", "<|eot_id|>"}, "llama3"),
    ("chatml", (), "chatml"), ("llama3", (), "llama3"), ("phi3forcausallm", (), "phi3"),
])
def test_family_picks_its_builtin_template(family, vocabulary, name):
    assert builtin_template(family, vocabulary) == BUILTIN_TEMPLATES[name]


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="no built-in chat template for model family 'falcon'"):
        builtin_template("falcon")


@pytest.mark.parametrize("name, tokens", [
    ("gemma", ("<end_of_turn>",)), ("llama3", ("<|eot_id|>",)), ("chatml", ("<|im_end|>",)),
    ("llama2", ()), ("mistral", ()),  # these end a turn with EOS, which always stops generation
])
def test_end_of_turn_tokens(name, tokens):
    assert end_of_turn_tokens(BUILTIN_TEMPLATES[name]) == tokens


def test_gemma_template_rejects_non_alternating_roles():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render(BUILTIN_TEMPLATES["gemma"], messages)


# A template in the style of real HF ones: namespace, loop controls, tojson, the generation
# tag, strftime_now, tools and extra variables.
HF_STYLE = """{%- set ns = namespace(system='') -%}
{%- for m in messages if m.role == 'system' %}{% set ns.system = m.content %}{% endfor -%}
{%- if tools %}Tools: {{ tools | tojson }}
{% endif -%}
{%- if ns.system %}[{{ ns.system }}]
{% endif -%}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
  {%- if m.role == 'assistant' %}{% generation %}A: {{ m.content }}{% endgeneration %}
  {%- else %}U: {{ m.content | trim }}{% endif %}
{{ '\\n' if not loop.last }}
{%- endfor %}
{%- if add_generation_prompt %}A:{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}{% endif %}
{{- ' ' ~ strftime_now('%Y') | length }}"""


@pytest.mark.parametrize("variables", [{}, {"tools": [{"name": "get_weather", "description": "Météo <today>"}]},
                                       {"enable_thinking": False}])
def test_hf_style_template_features_render_as_transformers_does(hf_tokenizer, variables):
    messages = CONVERSATIONS["multi-turn"]
    ours = render(HF_STYLE, messages, bos_token=BOS, eos_token=EOS, **variables)
    assert ours == hf_render(hf_tokenizer, HF_STYLE, messages, **variables)
    if variables.get("tools"):
        assert '"Météo <today>"' in ours  # tojson keeps non-ASCII and does not HTML-escape


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{% set x = messages.append({'role': 'user'}) %}",
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_sandbox_blocks_python_internals_with_a_clear_error(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="sandbox blocks"):
        render(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_template_errors_are_reported_clearly():
    with pytest.raises(ChatTemplateError, match="chat template line 2"):
        render("ok\n{% if %}", [])
    with pytest.raises(ChatTemplateError, match="refused the messages: no tools allowed"):
        render("{{ raise_exception('no tools allowed') }}", [])
    with pytest.raises(ChatTemplateError, match="chat template failed: TypeError"):
        render("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])


def test_content_given_as_a_list_of_parts_passes_the_message_check(hf_tokenizer):
    template = "{% for m in messages %}{% for part in m.content %}{{ part.text }}{% endfor %}|{% endfor %}"
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert render(template, messages) == hf_render(hf_tokenizer, template, messages) == "Be brief.|Hi there|"


@pytest.mark.parametrize("messages, found", [
    ("hello", "str"), ([{"content": "no role"}], "messages\\[0\\]"), ([{"role": "user"}, "text"], "messages\\[1\\]"),
])
def test_malformed_messages_are_rejected(messages, found):
    with pytest.raises(ChatTemplateError, match=found):
        render(BUILTIN_TEMPLATES["chatml"], messages)

