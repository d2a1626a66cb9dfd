"""The built-in demo model: its Hugging Face folder (tests/fixtures/demo-gemma3, real weights trained
by tools/train_demo_model.py on the King James Bible) and its packed q8_0 blob (runtime/data/demo.blob)."""
from pathlib import Path
import re

import numpy as np
import pytest

import blobstore
from blobstore.convert import convert
from blobstore.runtime import demo, load
from blobstore.runtime.cli import main as blob_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURE = Path(__file__).parent / "fixtures" / "demo-gemma3"

# Revelation 21:1-7 and 22:1-5: from the last 5 % of verses, which training never saw
HELD_OUT = """\
And I saw a new heaven and a new earth: for the first heaven and the first earth were passed away; and there was no more sea.
And I John saw the holy city, new Jerusalem, coming down from God out of heaven, prepared as a bride adorned for her husband.
And I heard a great voice out of heaven saying, Behold, the tabernacle of God is with men, and he will dwell with them, and they shall be his people, and God himself shall be with them, and be their God.
And God shall wipe away all tears from their eyes; and there shall be no more death, neither sorrow, nor crying, neither shall there be any more pain: for the former things are passed away.
And he that sat upon the throne said, Behold, I make all things new. And he said unto me, Write: for these words are true and faithful.
And he said unto me, It is done. I am Alpha and Omega, the beginning and the end. I will give unto him that is athirst of the fountain of the water of life freely.
He that overcometh shall inherit all things; and I will be his God, and he shall be my son.
And he shewed me a pure river of water of life, clear as crystal, proceeding out of the throne of God and of the Lamb.
In the midst of the street of it, and on either side of the river, was there the tree of life, which bare twelve manner of fruits, and yielded her fruit every month: and the leaves of the tree were for the healing of the nations.
And there shall be no more curse: but the throne of God and of the Lamb shall be in it; and his servants shall serve him:
And they shall see his face; and his name shall be in their foreheads.
And there shall be no night there; and they need no candle, neither light of the sun; for the Lord God giveth them light: and they shall reign for ever and ever.
"""

# the most frequent words of the KJV: English prose is largely made of them, token noise is not
COMMON_WORDS = set("""
the and of to that in he shall unto for i his a lord they be is him not them it with all thou thy was god
which my me said but ye their have will thee from as are when this out were upon man by you israel king son
up there hath then people came had house into on her come one we children before your also day land so men
against shalt if at let go us saying made went even do now behold saith therefore every these because or our
""".split())


@pytest.fixture(scope="module")
def fixture_blob(tmp_path_factory):
    """(dtype, embed dtype) → the fixture folder converted so (cached for the module)."""
    root, done = tmp_path_factory.mktemp("demo"), {}

    def get(dtype, embed_dtype=None):
        if (dtype, embed_dtype) not in done:
            done[dtype, embed_dtype] = root / f"demo-{dtype}-{embed_dtype}.blob"
            convert(FIXTURE, done[dtype, embed_dtype], dtype=dtype, embed_dtype=embed_dtype, quiet=True)
        return done[dtype, embed_dtype]
    return get


@pytest.fixture(scope="module")
def held_out_ids():
    model = load(demo.demo_path())
    ids = model.tokenizer.encode(HELD_OUT)
    model.close()
    assert ids[0] == model.tokenizer.bos_id and len(ids) >= 300
    return ids


@pytest.fixture(scope="module")
def f32_logits(fixture_blob, held_out_ids):
    with load(fixture_blob("f32")) as model:
        return model.forward(held_out_ids)


def top1_agreement(path, ids, reference) -> float:
    with load(path) as model:
        return float((model.forward(ids).argmax(axis=1) == reference.argmax(axis=1)).mean())


def test_transformers_and_runtime_give_the_same_logits_on_trained_weights(f32_logits, held_out_ids):
    reference = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = reference(torch.tensor([held_out_ids])).logits[0].numpy()
    assert f32_logits.shape == theirs.shape
    assert np.abs(f32_logits - theirs).max() <= 1e-3, f"max |logit difference| {np.abs(f32_logits - theirs).max()}"


def test_the_model_predicts_held_out_text_far_better_than_chance(f32_logits, held_out_ids):
    """Trained, not random: most next tokens of unseen verses are among the model's top 10."""
    top10 = np.argsort(f32_logits[:-1], axis=1)[:, -10:]
    hits = (top10 == np.array(held_out_ids[1:])[:, None]).any(axis=1).mean()
    assert hits >= 0.5, f"only {hits:.0%} of held-out tokens in the top 10"


def test_packaged_q8_0_demo_agrees_with_f32(f32_logits, held_out_ids):
    agreement = top1_agreement(demo.demo_path(), held_out_ids, f32_logits)
    assert agreement >= 0.97, f"top-1 agreement {agreement:.1%}"


# A 256-wide model feels 4-bit rounding more than a large one, most of all in its tied embedding /
# output head: q4_0 throughout agrees on 88 % of the tokens, 93 % with that one matrix at q8_0
# (the converter's default under --dtype q4_0).
@pytest.mark.parametrize("embed_dtype, least", [(None, 0.90), ("q4_0", 0.85)])
def test_q4_0_conversion_agrees_with_f32(fixture_blob, f32_logits, held_out_ids, embed_dtype, least):
    agreement = top1_agreement(fixture_blob("q4_0", embed_dtype), held_out_ids, f32_logits)
    print(f"q4_0, embedding {embed_dtype or 'default'}: top-1 agreement {agreement:.1%}")
    assert agreement >= least, f"top-1 agreement {agreement:.1%}"


def test_packaged_demo_is_the_q8_0_packing_of_the_fixture():
    path = demo.demo_path()
    assert path.stat().st_size <= 15_000_000
    with blobstore.open(path, verify="full") as blob:
        assert blob.info("layers.0.q").dtype == blobstore.DType.Q8_0
        assert blob.file_bytes("tokenizer.model") == (FIXTURE / "tokenizer.model").read_bytes()


def assert_reads_as_corpus_text(text):
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 10, f"too few words in {text!r}"
    common = sum(word in COMMON_WORDS for word in words) / len(words)
    assert common >= 0.4, f"only {common:.0%} common KJV words in {text!r}"


def test_load_without_a_path_uses_the_demo_and_says_so(capsys):
    with load() as model:
        text = model.generate("And God said unto Moses,", max_new_tokens=48, seed=0).text
    assert demo.NOTICE in capsys.readouterr().err
    assert_reads_as_corpus_text(text)


def test_blob_run_without_a_model_uses_the_demo(capsys):
    assert blob_run(["-p", "And Jesus answered and said unto them,", "-n", "48", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert demo.NOTICE in err
    assert_reads_as_corpus_text(out)


def test_a_missing_demo_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO_PATH", tmp_path / "demo.blob")
    with pytest.raises(FileNotFoundError, match="built-in demo model is missing"):
        load()
