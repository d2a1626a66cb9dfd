"""The runtime on the real Gemma 3 270M: parity with transformers and quantized agreement.

Not in the default run: `pytest -m real_model tests/test_runtime_real.py` (fetches the GGUF).
"""
import numpy as np
import pytest

from blobstore.convert import convert
from blobstore.runtime import load

pytestmark = pytest.mark.real_model

# Some plain English prose (written for this test) for the agreement measurement.
TEXT = """The old lighthouse stood at the end of a narrow spit of rock, and for as long as anyone in the
village could remember, its keeper had climbed the hundred and twelve steps each evening to light the lamp.
In winter the storms came in from the west, throwing spray over the gallery rail, and the fishermen
steered by the steady white beam that swept across the water every nine seconds. When the keeper grew
too old for the stairs, his granddaughter took over the work. She kept a logbook of every ship that passed,
every change in the weather, and every repair she made to the great brass mechanism that turned the lens.
Years later, after the light was automated and the keeper's cottage became a small museum, visitors could
read her careful handwriting: the barometer readings, the names of schooners, the note about the night
the harbour froze solid and the children skated out to the moored boats. Science tells us that light
travels at nearly three hundred thousand kilometres per second, yet in her logbook the light seems
patient, almost slow, arriving each evening like an old friend who knows the way."""


@pytest.fixture(scope="module")
def blobs(tmp_path_factory, gemma3_270m_gguf):
    root = tmp_path_factory.mktemp("real-runtime")
    paths = {}
    for dtype in ("f32", "q8_0", "q4_0"):
        paths[dtype] = root / f"gemma3-270m-{dtype}.blob"
        convert(gemma3_270m_gguf, paths[dtype], dtype=dtype, quiet=True)
    return paths


def test_f32_logits_match_transformers(blobs, gemma3_270m_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gemma3_270m_gguf.parent, gguf_file=gemma3_270m_gguf.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    model = load(blobs["f32"], max_seq_len=512)
    ids = model.tokenizer.encode(TEXT)[:96]
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(model.forward(ids) - theirs).max() <= 1e-3


# q4_0's bar here is not the 90 % a model quantized from bf16 would meet: this model's only
# source is a Q4_K_M GGUF (mostly Q5_0 and Q4_K blocks), and requantizing those grids to any
# 4-bit grid loses most of the agreement: llama.cpp's own Q4_0 of the same file agrees 69.8 %,
# a simulated asymmetric q4_1 at best 75 % (docs/CONVERT.md). The demo model, trained here in
# f32, holds q4_0 to the 90 % bar (tests/test_demo_model.py).
@pytest.mark.parametrize("dtype, bar", [("q8_0", 0.97), ("q4_0", 0.60)])
def test_quantized_top1_agrees_with_f32(blobs, dtype, bar):
    exact = load(blobs["f32"], max_seq_len=512)
    ids = exact.tokenizer.encode(TEXT)
    assert len(ids) >= 200
    agreement = float((exact.forward(ids).argmax(1) == load(blobs[dtype], max_seq_len=512).forward(ids).argmax(1)).mean())
    print(f"{dtype}: top-1 agreement with f32 over {len(ids)} positions: {agreement:.1%}")
    assert agreement >= bar


def test_greedy_text_is_fluent_english(blobs):
    result = load(blobs["q8_0"], max_seq_len=512).generate("The capital of France is", max_new_tokens=12,
                                                           temperature=0)
    assert "France" in result.text or "Paris" in result.text, result.text


def test_generate_on_the_rendered_chat_prompt_equals_chat(blobs):
    """The rendered template already starts with <bos>: generate() must not add a second one
    (the model answers differently after two), so both paths run the same ids."""
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    model = load(blobs["q8_0"], max_seq_len=512)
    text = model.apply_chat_template(messages)
    ids = model.tokenizer.encode(text)
    assert text.startswith("<bos>") and ids[0] == model.tokenizer.bos_id and ids[1] != model.tokenizer.bos_id
    chat = model.chat(messages, temperature=0, max_new_tokens=24)
    generated = load(blobs["q8_0"], max_seq_len=512).generate(text, temperature=0, max_new_tokens=24)
    assert chat.text.strip() and generated.token_ids == chat.token_ids
    assert generated.stats.prompt_tokens == chat.stats.prompt_tokens == len(ids)
