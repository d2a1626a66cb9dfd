"""Structured output's token masks over both tokenizer backends the runtime has: SentencePiece
(byte fallback: pieces <0xHH>) and a byte-level BPE tokenizer.json. Random logits sampled under
the mask must always decode to JSON that validates, non-ASCII text included."""
import io
import json

import numpy as np
import pytest
import sentencepiece

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("starlette")

from blobstore.runtime.sampling import SamplingParams, sample  # noqa: E402
from blobstore.runtime.serve.grammar import Grammars  # noqa: E402
from blobstore.runtime.serve.protocol import APIError  # noqa: E402
from blobstore.runtime.tokenizer import Tokenizer  # noqa: E402

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Numbers 123 and 456, {\"a\": [1, 2]}.",
          "A café in Zürich serves naïve crème brûlée."] * 20
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Zürich", "東京", "Paris"]},
        "note": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": -5, "maximum": 500},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "count", "ok"],
    "additionalProperties": False,
}


class _Files(dict):
    """The two things Grammars reads of a model's reader: which files it holds, and their bytes."""

    def file_bytes(self, name):
        return self[name]


class _Model:
    def __init__(self, tokenizer, files):
        self.tokenizer, self.reader = tokenizer, _Files(files)


def sentencepiece_model():
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=proto, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    return _Model(Tokenizer.from_sentencepiece(proto.getvalue()), {"tokenizer.model": proto.getvalue()})


def byte_level_model():
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    text = bpe.to_str().encode()
    tokenizer = Tokenizer.from_json(text, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    return _Model(tokenizer, {"tokenizer.json": text})


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizer.json"])
def model(request):
    return sentencepiece_model() if request.param == "sentencepiece" else byte_level_model()


def constrained_text(model, grammars, response_format, seed, limit=200):
    """Sample random logits under the grammar's mask until EOS; the decoded text."""
    mask, rng, generated = grammars.processor(response_format), np.random.default_rng(seed), []
    params = SamplingParams(temperature=1.0)
    for _ in range(limit):
        logits = mask(generated, rng.normal(0, 3, model.tokenizer.vocab_size).astype(np.float32))
        token = sample(logits, params, rng)
        if token == model.tokenizer.eos_id:
            return model.tokenizer.decode(generated)
        generated.append(token)
    raise AssertionError(f"no EOS after {limit} tokens: {model.tokenizer.decode(generated)!r}")


def test_random_logits_under_the_schema_mask_always_validate(model):
    grammars = Grammars(model)
    for seed in range(20):
        text = constrained_text(model, grammars, {"type": "json_schema", "schema": SCHEMA}, seed)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_masks_give_objects(model):
    grammars = Grammars(model)
    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 3}}, "additionalProperties": False}
    for seed in range(5):
        assert isinstance(json.loads(constrained_text(model, grammars, {"type": "json_schema", "schema": schema},
                                                      seed)), dict)
    assert grammars.processor({"type": "json_object"}) is not None and grammars.processor(None) is None


def test_an_impossible_schema_is_an_api_error_naming_response_format(model):
    with pytest.raises(APIError) as error:
        Grammars(model).processor({"type": "json_schema", "schema": {"type": "object", "minProperties": "x"}})
    assert error.value.status == 400 and error.value.param == "response_format"


def test_the_ids_llguidance_forces_spell_the_text_exactly():
    """SentencePiece adds a word-start space to a text (add_dummy_prefix): forced ids must not."""
    from blobstore.runtime.serve.grammar import _SentencePieceVocabulary
    tokenizer = sentencepiece_model().tokenizer
    vocabulary = _SentencePieceVocabulary(tokenizer)
    assert tokenizer.decode(tokenizer.encode('{"', add_bos=False)) == '{"'  # the space is hidden by decode...
    for text in ['{"', "Zürich", " a b", "東京", '"count":']:
        assert b"".join(vocabulary.tokens[i] for i in vocabulary(text)) == text.encode()  # ...not in the bytes
