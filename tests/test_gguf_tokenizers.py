"""Byte-level BPE ("gpt2") GGUF vocabularies, and the tokenizer checks every conversion makes.

BPE merges are learnt here from whole lines of text, so that they cross every boundary a splitting
rule might cut at (digit runs, spaces, case changes, punctuation) and each rule shows in the ids.
For each supported tokenizer.ggml.pre, those merges behind that model family's own pre-tokenizer
(the regexes of its tokenizer.json, written out below) are the reference tokenizer; it is saved
into a GGUF file as llama.cpp's converter writes one, rebuilt by the converter, and compared with
the reference and with transformers loading the same GGUF file.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from blobstore import cli
from blobstore.config import ModelConfig
from blobstore.convert import ConversionError, convert
from blobstore.convert import tokenizer as tokenizer_data
from blobstore.convert.sources import open_source
from blobstore.convert.token_types import CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED
from blobstore.runtime import load
from blobstore.runtime.tokenizer import Tokenizer as RuntimeTokenizer

gguf = pytest.importorskip("gguf")
AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
from test_convert_gguf import LLAMA_NORMS, gguf_from_checkpoint, llama_transform  # noqa: E402

# The word regexes of each family's tokenizer.json, spelled out in full.
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
          r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def split(*regexes):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# pre → (the family's own pre-tokenizer, its BPE's ignore_merges)
FAMILIES = {
    "llama-bpe": (split(LLAMA3), True),
    "qwen2": (split(QWEN2), False),
    "smollm": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)]), False),
    "gpt-4o": (split(GPT4O), False),
    "tekken": (split(TEKKEN), True),
    "gpt-2": (pre_tokenizers.ByteLevel(add_prefix_space=False), False),
    # llama.cpp's own fallback: punctuation runs, GPT-2's words, digit runs, then groups of three digits
    "default": (split(r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
}
# transformers' GGUF loader splits "smollm" and "default" vocabularies as GPT-2 does: digit runs
# whole, where SmolLM's tokenizer.json and llama.cpp cut every digit (and "default" more).
TRANSFORMERS_SPLITS_ALIKE = sorted(set(FAMILIES) - {"smollm", "default"})

CONTROL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
USER_TOKENS = ["<think>", "</think>"]
BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"
TRAIN = [
    "The quick brown fox jumps over the lazy dog. It's a fine day, isn't it? We'll see; they'd've known.",
    "DON'T SHOUT! I'M HERE. You're RIGHT, they've GONE. HTTPServer iPhone McDonald's XMLHttpRequest",
    "def main(argv):\n    for i in range(10):\n        print(f\"{i:>4}\")  # comment\n\treturn 0\n",
    "if (x != y && z <= 42) { return a->b[i++]; } // C++ ~ ^ | $ + < = > a/b/c",
    "I 😀 love 🍕 and 👨‍👩‍👧 families 🇯🇵!",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم، هذا نص عربي.",
    "Call 0123456789 or 3.14159265358979, year 2024, 1,000,000 items.",
    "a  b   c    d\n\n\nend\r\n\ttab  \n   \n",
    "ÉCOLE École école naïve Ærøskøbing ΣΊΣΥΦΟΣ σίσυφος",
    "<|begin_of_text|>user\nHi<|eot_id|><think>hmm</think>",
]
HARD = TRAIN + [
    "", "x", "   leading spaces", "trailing newlines\n\n", "🦜🦩 unseen emoji", "٣٤٥ and 12345678901234567890",
    "cafe\u0301 \u00a0no-break", "<|eot_id|><|eot_id|>abc<|eot_id|>def", "<think>why</think>", "don't DON'T Don'T",
    "Hello\r\nWorld\t\t\tindent", "   \n  \n", "+++///\n// x", "ǅungla Ǆ", "<|end_of_text", "<think >",
]
TEXT_ONLY = [t for t in HARD if not any(c in t for c in CONTROL_TOKENS)]  # decode drops control tokens


def learn_merges(vocab_size: int) -> dict:
    """A byte-level BPE model ({"vocab", "merges"}) learnt from whole lines of TRAIN."""
    trainee = Tokenizer(models.BPE())
    trainee.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainee.train_from_iterator(TRAIN * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return json.loads(trainee.to_str())["model"]


def train(pre: str, vocab_size: int = 800) -> Tokenizer:
    """The tokenizer `pre`'s family would make of merges learnt here, its added tokens last."""
    pre_tokenizer, ignore_merges = FAMILIES[pre]
    learnt = learn_merges(vocab_size)
    tokenizer = Tokenizer(models.BPE(learnt["vocab"], [tuple(m) for m in learnt["merges"]],
                                     ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in CONTROL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in USER_TOKENS])
    return tokenizer


def bpe_vocabulary(tokenizer: Tokenizer, pre, *, padded_to: int = 0, add_bos=True, **overrides):
    """A function writing `tokenizer` into a GGUFWriter as llama.cpp's converter does: tokens by
    id (added tokens as their text, CONTROL when special, USER_DEFINED otherwise), "[PAD<id>]"
    UNUSED tokens up to the embedding's rows, merges as "a b". `overrides` replace or (None) drop keys."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    types = [CONTROL if t in CONTROL_TOKENS else USER_DEFINED if t in USER_TOKENS else NORMAL for t in tokens]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), padded_to)]
    types += [UNUSED] * (len(tokens) - len(types))
    merges = [" ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": vocab[BOS], "tokenizer.ggml.eos_token_id": vocab[EOS],
            "tokenizer.ggml.add_bos_token": add_bos, **overrides}

    def write(writer):
        for key, value in keys.items():
            if value is None:
                continue
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            else:
                (writer.add_string if isinstance(value, str) else writer.add_array)(key, value)
    return write


def tokenizer_gguf(path, vocabulary):
    """A GGUF file holding a vocabulary and the few qwen2 keys a reader needs to accept it (qwen2:
    its config has no default BOS id to stand in for one the vocabulary lacks)."""
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for key, value in [("context_length", 64), ("embedding_length", 16), ("block_count", 1),
                       ("feed_forward_length", 32), ("attention.head_count", 2), ("attention.head_count_kv", 2)]:
        writer.add_uint32(f"qwen2.{key}", value)
    writer.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-5)
    vocabulary(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rebuilt(path, **config_changes):
    """The converter's tokenizer for a GGUF file, checked against its (possibly changed) config."""
    source = open_source(path)
    config = dataclasses.replace(ModelConfig.from_hf(source.config), **config_changes)
    return tokenizer_data.from_gguf(source.metadata, config)


def runtime_tokenizer(data) -> RuntimeTokenizer:
    settings = data.settings
    return RuntimeTokenizer.from_json(data.files["tokenizer.json"], bos_token=settings["bos_id"],
                                      eos_token=settings["eos_ids"][0], add_bos=settings["add_bos"])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """pre → (trained tokenizer, its GGUF file), built on first use."""
    folder = tmp_path_factory.mktemp("bpe")
    built = {}

    def get(pre):
        if pre not in built:
            trained = train(pre)
            built[pre] = trained, tokenizer_gguf(folder / f"{pre}.gguf", bpe_vocabulary(trained, pre))
        return built[pre]
    return get


def one_bos(ids: list, bos: int) -> list:
    """`ids` with a doubled leading BOS made single: encode() never yields two, where
    transformers (and the trained tokenizer with BOS prepended) would for text starting with BOS."""
    return ids[1:] if ids[:2] == [bos, bos] else ids


@pytest.mark.parametrize("pre", sorted(FAMILIES))
def test_ids_equal_the_tokenizer_the_vocabulary_came_from(family, pre):
    trained, path = family(pre)
    data = rebuilt(path)
    ours = runtime_tokenizer(data)
    assert (data.settings["kind"], data.vocab_size, ours.bos_id, ours.eos_id) == (
        "tokenizers", trained.get_vocab_size(), trained.token_to_id(BOS), trained.token_to_id(EOS))
    for text in HARD:
        expected = one_bos([ours.bos_id] + trained.encode(text, add_special_tokens=False).ids, ours.bos_id)
        assert ours.encode(text) == expected, text


@pytest.mark.parametrize("pre", TRANSFORMERS_SPLITS_ALIKE)
def test_ids_equal_transformers_loading_the_same_gguf(family, pre):
    _, path = family(pre)
    ours = runtime_tokenizer(rebuilt(path))
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in HARD:
        assert ours.encode(text) == one_bos(reference(text)["input_ids"], ours.bos_id), text
    ids = ours.encode("".join(HARD))
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("pre", sorted(FAMILIES))
def test_any_text_gets_the_ids_of_the_original_and_of_transformers(family, pre):
    trained, path = family(pre)
    ours = runtime_tokenizer(rebuilt(path))
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    awkward = list(" \n\t\r'0123456789aZé日😀ğ,/<|>") + CONTROL_TOKENS + USER_TOKENS
    pieces = st.sampled_from(awkward) | st.characters(codec="utf-8")

    @settings(max_examples=150, deadline=None)
    @given(text=st.lists(pieces, max_size=30).map("".join))
    def check(text):
        ids = ours.encode(text)
        assert ids == one_bos([ours.bos_id] + trained.encode(text, add_special_tokens=False).ids, ours.bos_id)
        if pre in TRANSFORMERS_SPLITS_ALIKE:
            assert ids == one_bos(reference(text)["input_ids"], ours.bos_id)
    check()


# llama.cpp's regex lists for the two values whose splitting follows it (llama-vocab.cpp), each
# regex cutting the pieces the previous ones left.
LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_SPLITS = {"smollm": [r"\p{N}", LLAMA_CPP_GPT2],
                    "default": [r"[\p{P}\$\+<=>\^~\|]+", LLAMA_CPP_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]}


def split_in_turn(text: str, regexes) -> list:
    """Words as llama.cpp cuts them: every match and every stretch between matches, regex by regex."""
    regex = pytest.importorskip("regex")
    words = [text] if text else []
    for pattern in regexes:
        cut = []
        for word in words:
            start = 0
            for match in regex.finditer(pattern, word):
                cut += [piece for piece in (word[start:match.start()], match.group()) if piece]
                start = match.end()
            cut += [word[start:]] if start < len(word) else []
        words = cut
    return words


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_SPLITS))
def test_words_are_cut_as_llama_cpp_cuts_them(family, pre):
    pre_tokenizer = Tokenizer.from_str(rebuilt(family(pre)[1]).files["tokenizer.json"].decode()).pre_tokenizer
    for text in TEXT_ONLY:
        words = [text[start:end] for _, (start, end) in pre_tokenizer.pre_tokenize_str(text)]
        assert words == split_in_turn(text, LLAMA_CPP_SPLITS[pre]), text


@pytest.mark.parametrize("pre", sorted(FAMILIES))
def test_decode_round_trips_and_streams_byte_split_characters(family, pre):
    ours = runtime_tokenizer(rebuilt(family(pre)[1]))
    for text in TEXT_ONLY:
        assert ours.decode(ours.encode(text)) == text
    text = "🦜 日本語 مرحبا 😀"
    ids = ours.encode(text, add_bos=False)
    decoder = ours.decoder()
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") >= 3  # the parrot's four bytes at least were separate tokens


def test_ignore_merges_follows_the_pre_value(tmp_path):
    """llama.cpp (and Llama 3's tokenizer.json) take a word that is a token whole under llama-bpe,
    where the merges alone would stop at "a" + "bc"; qwen2 vocabularies run the merges."""
    def gguf_for(pre):
        def vocabulary(writer):
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(["a", "b", "c", "ab", "bc", "abc", BOS, EOS])
            writer.add_token_types([NORMAL] * 6 + [CONTROL] * 2)
            writer.add_token_merges(["b c", "a b", "ab c"])
            writer.add_bos_token_id(6)
            writer.add_eos_token_id(7)
        return tokenizer_gguf(tmp_path / f"{pre}.gguf", vocabulary)
    assert runtime_tokenizer(rebuilt(gguf_for("llama-bpe"))).encode("abc") == [6, 5]
    assert runtime_tokenizer(rebuilt(gguf_for("qwen2"))).encode("abc") == [0, 4]


@pytest.mark.parametrize("pre, adds_bos", [("llama-bpe", True), ("tekken", True), ("qwen2", False), ("smollm", False)])
def test_add_bos_defaults_to_llama_cpp_s_choice_for_the_pre_value(tmp_path, pre, adds_bos):
    path = tokenizer_gguf(tmp_path / "t.gguf", bpe_vocabulary(train(pre, 300), pre, add_bos=None))
    data = rebuilt(path)
    assert data.settings["add_bos"] is adds_bos
    assert (runtime_tokenizer(data).encode("Hi")[0] == data.settings["bos_id"]) is adds_bos
    assert (Tokenizer.from_str(data.files["tokenizer.json"].decode()).encode("Hi").ids[0]
            == data.settings["bos_id"]) is adds_bos  # the stored tokenizer.json says so itself


def test_gpt2_vocabulary_model_converts_loads_and_generates(checkpoints, tmp_path):
    trained = train("llama-bpe", 380)
    path = tmp_path / "llama-bpe.gguf"
    gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform, None,
                         vocabulary=bpe_vocabulary(trained, "llama-bpe", padded_to=400))
    out = tmp_path / "model.blob"
    assert cli.main(["convert", str(path), "-o", str(out), "--dtype", "q8_0", "--quiet"]) == 0
    model = load(out)
    assert model.reader.metadata["tokenizer"]["kind"] == "tokenizers"
    result = model.generate("The quick brown fox", max_new_tokens=8, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 8 and result.finish_reason == "length"
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert model.tokenizer.vocab_size == 400
    for text in HARD:
        assert model.tokenizer.encode(text) == one_bos(reference(text)["input_ids"], model.tokenizer.bos_id), text
    assert result.text == reference.decode(result.token_ids, skip_special_tokens=True)


# ---- refused vocabularies ----

def test_unknown_pre_is_refused_by_name_and_nothing_is_written(checkpoints, tmp_path):
    path = tmp_path / "model.gguf"
    gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform, None,
                         vocabulary=bpe_vocabulary(train("qwen2", 380), "deepseek-coder", padded_to=400))
    out = tmp_path / "model.blob"
    with pytest.raises(ConversionError, match=r"tokenizer.ggml.pre 'deepseek-coder' is not supported; known: "
                                              r"deepseek-r1-qwen, default, .*gpt-2, gpt-4o, llama-bpe, .*qwen2, "
                                              r"smollm, tekken"):
        convert(path, out, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_missing_pre_is_refused_rather_than_guessed(tmp_path):
    path = tokenizer_gguf(tmp_path / "t.gguf", bpe_vocabulary(train("qwen2", 300), None))
    with pytest.raises(ConversionError, match="without tokenizer.ggml.pre.*Known values: deepseek-r1-qwen, default, "):
        rebuilt(path)


@pytest.mark.parametrize("overrides, message", [
    ({"tokenizer.ggml.merges": None}, "without tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["Ġ t", "no_such_token x"]}, "the merges do not fit the tokens"),
    ({"tokenizer.ggml.merges": ["Ġ t", "Ġt h e"]}, "merge 1 is 'Ġt h e'; expected two tokens and one space"),
    ({"tokenizer.ggml.eos_token_id": 999}, "tokenizer.ggml.eos_token_id is 999, outside its 305 tokens"),
    ({"tokenizer.ggml.bos_token_id": None}, "set to add BOS to every prompt but has no BOS token"),
    ({"tokenizer.ggml.model": "bert"}, r"tokenizer.ggml.model 'bert'; supported: 'llama' \(sentencepiece\), "
                                       r"'gpt2' \(tokenizers\)"),
    ({"tokenizer.ggml.model": None}, "no tokenizer.ggml.model"),
    ({"tokenizer.ggml.token_type": [NORMAL] * 3}, "305 tokens but 3 token types"),
])
def test_broken_gguf_vocabularies_are_named(tmp_path, overrides, message):
    path = tokenizer_gguf(tmp_path / "t.gguf", bpe_vocabulary(train("qwen2", 300), "qwen2", **overrides))
    with pytest.raises(ConversionError, match=message):
        rebuilt(path)


def test_sentencepiece_vocabulary_sentencepiece_cannot_load_is_named():
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", ""],
                "tokenizer.ggml.token_type": [UNKNOWN, CONTROL, CONTROL, NORMAL]}
    config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 4, "hidden_size": 8,
                                  "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "rms_norm_eps": 1e-5, "max_position_embeddings": 16})
    with pytest.raises(ConversionError, match=r"GGUF tokenizer \(tokenizer.model rebuilt from it\): not a valid "
                                              r"SentencePiece model"):
        tokenizer_data.from_gguf(metadata, config)


def test_duplicate_bpe_tokens_are_named(tmp_path):
    trained = train("qwen2", 300)
    tokens = sorted(trained.get_vocab(True), key=trained.get_vocab(True).get)
    path = tokenizer_gguf(tmp_path / "t.gguf", bpe_vocabulary(
        trained, "qwen2", **{"tokenizer.ggml.tokens": tokens[:-1] + [tokens[0]]}))
    with pytest.raises(ConversionError, match=f"tokens 0 and {len(tokens) - 1} are both {tokens[0]!r}"):
        rebuilt(path)


def test_more_token_ids_than_embedding_rows_is_refused_fewer_is_fine(family):
    trained, path = family("qwen2")
    ids = trained.get_vocab_size()
    with pytest.raises(ConversionError, match=f"it has {ids} ids but the model's embedding has only {ids - 3} rows "
                                              rf"\(ids {ids - 3}..{ids - 1} would index past it\)"):
        rebuilt(path, vocab_size=ids - 3)
    assert rebuilt(path, vocab_size=ids + 64).vocab_size == ids  # a padded embedding: Gemma 3 has 64 spare rows


def test_folder_tokenizer_problems_are_named(checkpoint_copy):
    folder = checkpoint_copy("llama")
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert tokenizer_data.from_folder(folder, config).vocab_size == 400
    with pytest.raises(ConversionError, match="has 400 ids but the model's embedding has only 399 rows"):
        tokenizer_data.from_folder(folder, dataclasses.replace(config, vocab_size=399))
    with pytest.raises(ConversionError, match=r"the BOS id 400 is outside its 400 ids\n  the EOS id 401 is outside"):
        tokenizer_data.from_folder(folder, dataclasses.replace(config, bos_token_id=400, eos_token_ids=(401,)))
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConversionError, match="tokenizer.model: not a valid SentencePiece model"):
        tokenizer_data.from_folder(folder, config)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ConversionError, match=r"no tokenizer; expected tokenizer.model \(SentencePiece\) or "
                                              r"tokenizer.json"):
        tokenizer_data.from_folder(folder, config)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(ConversionError, match="tokenizer.json: the tokenizers library cannot load it"):
        tokenizer_data.from_folder(folder, config)
    (folder / "tokenizer_config.json").write_text("{}")  # add_bos then comes from the tokenizer.json itself
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConversionError, match="tokenizer.json: not valid JSON"):
        tokenizer_data.from_folder(folder, config)


def test_folder_tokenizer_json_is_checked_like_a_rebuilt_one(family, checkpoint_copy):
    trained, _ = family("llama-bpe")
    folder = checkpoint_copy("llama")
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_text(trained.to_str())
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    ids = trained.get_vocab_size()
    with pytest.raises(ConversionError, match=f"has {ids} ids but the model's embedding has only 400 rows"):
        tokenizer_data.from_folder(folder, config)
    without_bos = dataclasses.replace(config, vocab_size=ids, bos_token_id=None)
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    data = tokenizer_data.from_folder(folder, without_bos)
    assert (data.settings["kind"], data.vocab_size) == ("tokenizers", ids)
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    with pytest.raises(ConversionError, match="set to add BOS to every prompt but has no BOS token"):
        tokenizer_data.from_folder(folder, without_bos)
