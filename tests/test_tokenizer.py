"""Tokenizers built at test time (no network): a byte-fallback SentencePiece model and an
in-memory byte-level BPE tokenizer.json. Streaming must reproduce the full decode exactly."""
import io

import pytest
import sentencepiece
from hypothesis import given, settings, strategies as st

tokenizers = pytest.importorskip("tokenizers")
HfTokenizer, decoders, models, pre_tokenizers, processors, trainers = (
    tokenizers.Tokenizer, tokenizers.decoders, tokenizers.models, tokenizers.pre_tokenizers, tokenizers.processors,
    tokenizers.trainers)
PreTrainedTokenizerFast = pytest.importorskip("transformers").PreTrainedTokenizerFast

from blobstore.runtime.tokenizer import IncrementalDecoder, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! Numbers 123 and 456.",
    "A café in Zürich serves naïve crème brûlée.",
    "Streaming text must come out exactly as the full decode.",
] * 20
# emoji and CJK are not in the corpus: they come out as byte-fallback / byte-level pieces
MIXED_TEXT = "Hello 👋 world — 你好，世界! Zürich café 🇯🇵 ok\n  two  spaces"


@pytest.fixture(scope="session")
def spm_proto():
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    return model.getvalue()


def byte_level_json(with_bos_post_processor):
    bpe = HfTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if with_bos_post_processor:
        bpe.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return bpe.to_str()


@pytest.fixture(scope="session")
def json_text():
    return byte_level_json(with_bos_post_processor=True)


@pytest.fixture(scope="session", params=["sentencepiece", "tokenizer.json"])
def tok(request, spm_proto, json_text):
    if request.param == "sentencepiece":
        return Tokenizer.from_sentencepiece(spm_proto)
    return Tokenizer.from_json(json_text.encode(), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def stream(decoder, ids):
    pieces = [decoder.add(i) for i in ids]
    return pieces + [decoder.flush()]


@pytest.mark.parametrize("text", ["Hello world", MIXED_TEXT, " leading space", "trailing  ", "x"])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text


def test_bos_follows_the_argument(tok):
    assert tok.encode("Hello", add_bos=False)[0] != tok.bos_id
    assert tok.encode("Hello", add_bos=True) == [tok.bos_id] + tok.encode("Hello", add_bos=False)


@pytest.mark.parametrize("add_bos", [True, None, False])
def test_text_that_starts_with_bos_never_gets_a_second_one(tok, add_bos):
    bos = tok.id_to_token(tok.bos_id)  # "<s>" / "<|begin_of_text|>", as a chat template writes it
    ids = tok.encode(bos + "Hello world", add_bos=add_bos)
    assert ids == [tok.bos_id] + tok.encode("Hello world", add_bos=False)
    hi = tok.encode("Hi", add_bos=False)
    assert tok.encode(bos + bos + "Hi", add_bos=add_bos) == [tok.bos_id, tok.bos_id] + hi  # the text's own two
    later = tok.encode("Hi" + bos, add_bos=add_bos)  # a BOS inside the text is the text's own
    assert later.count(tok.bos_id) == (1 if add_bos is False else 2) and later[-1] == tok.bos_id


def test_streaming_emoji_and_cjk_equals_the_full_decode(tok):
    ids = tok.encode(MIXED_TEXT, add_bos=False)
    pieces = stream(tok.decoder(), ids)
    assert "".join(pieces) == tok.decode(ids) == MIXED_TEXT
    assert not any("\ufffd" in piece for piece in pieces)  # no half characters on the way
    assert pieces.count("") > 3  # multi-byte characters really were split across tokens


def test_streaming_keeps_the_leading_space_after_context(tok):
    # SentencePiece drops the leading space of a decode's first piece: "▁world" alone is "world"
    context = tok.encode("Hello", add_bos=False)
    ids = tok.encode("Hello world again", add_bos=False)
    assert ids[:len(context)] == context
    assert "".join(stream(tok.decoder(context_ids=context), ids[len(context):])) == " world again"
    assert "".join(stream(tok.decoder(), ids)) == "Hello world again"


def test_text_less_tokens_do_not_swallow_a_later_leading_space(spm_proto):
    tok = Tokenizer.from_sentencepiece(spm_proto)
    ids = [tok.token_to_id("▁the"), 0, tok.eos_id, tok.token_to_id("▁the")]  # padding and EOS make no text
    assert "".join(stream(tok.decoder(), ids)) == tok.decode(ids) == "the the"


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_streaming_any_id_sequence_equals_the_full_decode(tok, data):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    assert "".join(stream(tok.decoder(), ids)) == tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=30))
def test_streaming_any_text_equals_the_text(tok, text):
    ids = tok.encode(text, add_bos=False)
    pieces = stream(tok.decoder(), ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces[:-1]) or "\ufffd" in text


def test_decoder_holds_an_unfinished_character_until_its_last_byte(spm_proto):
    tok = Tokenizer.from_sentencepiece(spm_proto)
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    decoder = tok.decoder()
    assert [decoder.add(i) for i in byte_ids] == ["", "", "€"]


def test_flush_emits_what_an_unfinished_stream_decodes_to(spm_proto):
    tok = Tokenizer.from_sentencepiece(spm_proto)
    ids = [tok.token_to_id("▁a"), tok.token_to_id("<0xE2>"), tok.token_to_id("<0x82>")]
    decoder = IncrementalDecoder(tok.decode)
    assert [decoder.add(i) for i in ids] == ["a", "", ""]
    assert decoder.flush() == tok.decode(ids)[1:]


def test_control_token_text_becomes_its_id(spm_proto):
    tok = Tokenizer.from_sentencepiece(spm_proto)
    ids = tok.encode("<s>Hi</s><start_of_turn>user", add_bos=False)
    assert ids[0] == tok.bos_id and tok.eos_id in ids and tok.token_to_id("<start_of_turn>") in ids
    assert ids == ([tok.bos_id] + tok.encode("Hi", add_bos=False) + [tok.eos_id]
                   + tok.encode("<start_of_turn>user", add_bos=False))


def test_sentencepiece_ids_and_pieces(spm_proto):
    tok = Tokenizer.from_sentencepiece(spm_proto)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (1, 2, 400, True)
    assert tok.token_to_id("<end_of_turn>") is not None and tok.token_to_id("no such piece") is None
    assert not Tokenizer.from_sentencepiece(spm_proto, add_bos=False).encode("Hi")[0] == tok.bos_id


def test_json_tokenizer_matches_transformers(json_text):
    tok = Tokenizer.from_json(json_text, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    reference = PreTrainedTokenizerFast(tokenizer_object=HfTokenizer.from_str(json_text))
    text = MIXED_TEXT + "<|eot_id|>"
    assert tok.encode(text) == reference(text, add_special_tokens=True)["input_ids"]
    assert tok.decode(tok.encode(text)) == reference.decode(reference(text)["input_ids"], skip_special_tokens=True)


def test_json_tokenizer_adds_bos_only_when_its_post_processor_does():
    plain = byte_level_json(with_bos_post_processor=False)
    tok = Tokenizer.from_json(plain, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert tok.add_bos is False and tok.encode("Hello")[0] != tok.bos_id
    assert Tokenizer.from_json(plain, eos_token="<|eot_id|>").bos_id is None
    with pytest.raises(ValueError, match="no BOS token"):
        Tokenizer.from_json(plain).encode("Hello", add_bos=True)


def test_bad_inputs_give_clear_errors(tok, json_text):
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="tokenizer.model: not a valid SentencePiece model"):
        Tokenizer.from_sentencepiece(b"definitely not a model")
    with pytest.raises(ValueError, match="tokenizer.json: cannot be loaded"):
        Tokenizer.from_json("{not json")
    with pytest.raises(ValueError, match="eos_token '<missing>' is not in the vocabulary"):
        Tokenizer.from_json(json_text, eos_token="<missing>")
