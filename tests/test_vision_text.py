"""Gemma 3 image input, text side: prompts expanded as transformers' Gemma3Processor expands them,
image features placed at the soft tokens, attention bidirectional inside each image (on sliding
and global layers), prefix reuse that tells pictures apart — against a tiny
Gemma3ForConditionalGeneration at float32.

The image features come from transformers' own `get_image_features`, injected through
`image_features=` (the path `images=` takes after the vision tower encodes), so the numbers
compared are the language model's alone.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from blobstore.convert import convert
from blobstore.errors import FormatError
from blobstore.runtime import kernels, load
from blobstore.runtime.image_prompt import images_in_messages, runs_in_ids
from conftest import randomize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
           "<end_of_image>", "<image_soft_token>"]
BOI, EOI, IMAGE = 6, 7, 8
MM_TOKENS = 4
TEXT = ["The quick brown fox jumps over the lazy dog.", "Describe this image.\n\nWhat is in it?",
        "Here is the original image and here are some crops to help you see better"] * 20
PROMPT_ONE = "A photo:<start_of_image>Describe this image in a few words, please."
PROMPT_TWO = "First<start_of_image> and second<start_of_image>: which one is brighter, and why?"


def _tokenizer_json(path):
    """A byte-level BPE tokenizer.json with Gemma 3's image markers as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(path))


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    """(folder, f32 blob, transformers model) of a tiny Gemma 3 with a 28-px SigLIP (2×2 patches of
    14 px → 4 image tokens), a sliding layer with a 5-token window and a global one."""
    folder = tmp_path_factory.mktemp("gemma3_vision")
    text = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=5,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS,
                                       boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    randomize(model, torch)
    model.save_pretrained(folder, safe_serialization=True)
    _tokenizer_json(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<bos>",
                                                              "eos_token": "<eos>"}))
    blob = tmp_path_factory.mktemp("gemma3_vision_blob") / "gemma3_vision.blob"
    convert(folder, blob, dtype="f32", quiet=True)
    reference = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    return folder, blob, reference


@pytest.fixture(scope="module")
def model(vision_checkpoint):
    with load(vision_checkpoint[1], max_seq_len=256) as m:
        yield m


@pytest.fixture(scope="module")
def processor(vision_checkpoint):
    pytest.importorskip("PIL")
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(vision_checkpoint[0] / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"})
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return transformers.Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=MM_TOKENS)


def _pictures(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + 7 * i, 33 - 5 * i, 3), dtype=np.uint8) for i in range(count)]


def _features(reference, pixel_values) -> np.ndarray:
    with torch.no_grad():
        return reference.model.get_image_features(torch.from_numpy(pixel_values), return_dict=True) \
            .pooler_output.numpy()


def _reference_logits(reference, inputs) -> np.ndarray:
    with torch.no_grad():
        out = reference(input_ids=torch.from_numpy(inputs["input_ids"]),
                        pixel_values=torch.from_numpy(inputs["pixel_values"]),
                        token_type_ids=torch.from_numpy(inputs["token_type_ids"]))
    return out.logits[0].numpy()


@pytest.mark.parametrize("prompt, count", [(PROMPT_ONE, 1), (PROMPT_TWO, 2)])
def test_logits_equal_transformers_at_every_position(vision_checkpoint, model, processor, prompt, count):
    reference = vision_checkpoint[2]
    inputs = processor(text=prompt, images=_pictures(count), return_tensors="np")
    features = _features(reference, inputs["pixel_values"])
    ids, spans = model.encode_prompt(prompt, image_features=list(features))
    assert ids == inputs["input_ids"][0].tolist()   # the expansion is the processor's, token for token
    assert [(s.begin, s.end) for s in spans] == _runs(inputs["token_type_ids"][0])
    ours = model.forward(prompt, image_features=list(features))
    expected = _reference_logits(reference, inputs)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)


def _runs(token_types) -> list[tuple[int, int]]:
    marked = np.flatnonzero(token_types)
    starts = [int(p) for i, p in enumerate(marked) if i == 0 or marked[i - 1] != p - 1]
    return [(start, start + MM_TOKENS) for start in starts]


def test_attention_inside_an_image_is_bidirectional(vision_checkpoint, model, processor):
    """Changing the last image feature changes the logits at the image's first token (it sees
    the token after it) but no logit before the image."""
    reference = vision_checkpoint[2]
    inputs = processor(text=PROMPT_ONE, images=_pictures(1), return_tensors="np")
    features = _features(reference, inputs["pixel_values"])
    changed = features.copy()
    changed[0, -1] += 1.0
    before, after = model.forward(PROMPT_ONE, image_features=list(features)), \
        model.forward(PROMPT_ONE, image_features=list(changed))
    begin = _runs(inputs["token_type_ids"][0])[0][0]
    np.testing.assert_array_equal(before[:begin], after[:begin])
    assert np.abs(before[begin] - after[begin]).max() > 1e-3


def test_attention_kernel_span_mask_equals_transformers_mask():
    """The kernel's visibility with spans and a window is transformers' Gemma 3 rule:
    AND(window, OR(causal, same image)) — checked through the outputs of one-hot values."""
    positions, window, spans = 14, 4, [(2, 6), (8, 13)]
    k = np.zeros((positions, 1, positions), np.float32)
    v = np.eye(positions, dtype=np.float32)[:, None, :]     # value j is the j-th unit vector
    q = np.zeros((positions, 1, positions), np.float32)     # equal scores: weights = 1 / visible count
    out = kernels.attention(q, k, v, p0=0, scale=1.0, window=window, spans=spans)[:, 0]
    image = np.full(positions, -1)
    for number, (begin, end) in enumerate(spans):
        image[begin:end] = number
    p, j = np.arange(positions)[:, None], np.arange(positions)[None, :]
    visible = ((j <= p) | ((image[p] == image[j]) & (image[p] >= 0))) & (j > p - window)
    np.testing.assert_allclose(out, visible / visible.sum(1, keepdims=True), atol=1e-6)


def test_greedy_tokens_equal_transformers(vision_checkpoint, model, processor):
    reference = vision_checkpoint[2]
    inputs = processor(text=PROMPT_TWO, images=_pictures(2, seed=3), return_tensors="np")
    features = _features(reference, inputs["pixel_values"])
    with torch.no_grad():
        expected = reference.generate(input_ids=torch.from_numpy(inputs["input_ids"]),
                                      pixel_values=torch.from_numpy(inputs["pixel_values"]),
                                      token_type_ids=torch.from_numpy(inputs["token_type_ids"]),
                                      max_new_tokens=32, do_sample=False, min_new_tokens=32)
    prompt_length = inputs["input_ids"].shape[1]
    result = model.generate(PROMPT_TWO, image_features=list(features), max_new_tokens=32, temperature=0,
                            ignore_eos=True, session=model.new_session())
    assert result.token_ids == expected[0, prompt_length:].tolist()


def test_processor_style_ids_are_taken_as_given(vision_checkpoint, model, processor):
    inputs = processor(text=PROMPT_TWO, images=_pictures(2), return_tensors="np")
    features = list(_features(vision_checkpoint[2], inputs["pixel_values"]))
    ids = inputs["input_ids"][0].tolist()
    assert runs_in_ids(ids, model.image_tokens) == [s.begin for s in model.encode_prompt(ids, image_features=features)[1]]
    np.testing.assert_array_equal(model.forward(ids, image_features=features),
                                  model.forward(PROMPT_TWO, image_features=features))


def test_prefix_reuse_tells_pictures_apart(vision_checkpoint, model, processor):
    """The same picture again is reused from the cache; another picture at the same place is
    recomputed from its first soft token, and the logits equal a fresh session's."""
    inputs = processor(text=PROMPT_TWO, images=_pictures(2), return_tensors="np")
    first, second = list(_features(vision_checkpoint[2], inputs["pixel_values"]))
    session = model.new_session()
    options = dict(max_new_tokens=2, temperature=0, ignore_eos=True, session=session)
    model.generate(PROMPT_TWO, image_features=[first, second], **options)
    begins = [s.begin for s in model.encode_prompt(PROMPT_TWO, image_features=[first, second])[1]]
    prompt_length = len(model.encode_prompt(PROMPT_TWO, image_features=[first, second])[0])
    again = model.generate(PROMPT_TWO, image_features=[first, second], **options)
    assert again.stats.reused_prompt_tokens == prompt_length - 1
    swapped = model.generate(PROMPT_TWO, image_features=[first, first], **options)
    assert swapped.stats.reused_prompt_tokens == begins[1]
    fresh = model.generate(PROMPT_TWO, image_features=[first, first], max_new_tokens=2, temperature=0,
                           ignore_eos=True, session=model.new_session())
    assert swapped.token_ids == fresh.token_ids


def test_long_prompt_chunks_never_split_a_picture(vision_checkpoint, model, prefill_chunk, processor):
    """With 6-token prefill chunks, each picture's run is computed in one call, and the logits
    equal one whole-prompt pass."""
    inputs = processor(text=PROMPT_TWO, images=_pictures(2), return_tensors="np")
    features = list(_features(vision_checkpoint[2], inputs["pixel_values"]))
    whole = model.forward(PROMPT_TWO, image_features=features)
    prefill_chunk(6)
    chunked = model.forward(PROMPT_TWO, image_features=features)
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=0)


def test_a_batch_engine_prefills_pictures_beside_other_streams(vision_checkpoint, model, prefill_chunk, processor):
    """Through a BatchEngine, with 6-token prompt chunks (a picture's 4 soft tokens never split),
    an image prompt prefills beside a text stream: each gets its lone greedy tokens, and the
    session remembers the pictures for prefix reuse."""
    from blobstore.runtime import batch
    from blobstore.runtime.sampling import SamplingParams
    inputs = processor(text=PROMPT_TWO, images=_pictures(2), return_tensors="np")
    features = list(_features(vision_checkpoint[2], inputs["pixel_values"]))
    ids, spans = model.encode_prompt(PROMPT_TWO, image_features=features)
    text = model.tokenizer.encode(PROMPT_ONE.replace("<start_of_image>", " "))
    prefill_chunk(6)
    options = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    expected = [model.generate(PROMPT_TWO, image_features=features, session=model.new_session(), **options).token_ids,
                model.generate(text, session=model.new_session(), **options).token_ids]
    session = model.new_session()
    with batch.BatchEngine(model) as engine:
        streams = [engine.submit(model.new_session(), text, SamplingParams(temperature=0), 8),
                   engine.submit(session, ids, SamplingParams(temperature=0), 8, images=spans)]
        assert [list(streams[1]), list(streams[0])] == expected
    assert session.cache.images == spans and session.reusable_prefix(ids, spans) == len(ids) - 1


def test_session_file_keeps_the_pictures(vision_checkpoint, model, processor, tmp_path):
    inputs = processor(text=PROMPT_ONE, images=_pictures(1), return_tensors="np")
    features = list(_features(vision_checkpoint[2], inputs["pixel_values"]))
    session = model.new_session()
    model.generate(PROMPT_ONE, image_features=features, max_new_tokens=2, temperature=0, session=session)
    session.save(tmp_path / "s.session")
    loaded = model.load_session(tmp_path / "s.session")
    assert loaded.cache.images == session.cache.images
    other = [f + 1.0 for f in features]
    begin = session.cache.images[0].begin
    assert loaded.reusable_prefix(*model.encode_prompt(PROMPT_ONE, image_features=other)) == begin
    assert loaded.reusable_prefix(*model.encode_prompt(PROMPT_ONE, image_features=features)) > begin


def test_chat_renders_image_parts_as_markers(vision_checkpoint, model):
    messages = [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                             {"type": "text", "text": "What is it?"}]}]
    shown, images = images_in_messages(messages)
    assert images == ["cat.png"]
    assert "<start_of_image>What is it?" in model.apply_chat_template(shown)


@pytest.mark.parametrize("prompt, count, message", [
    (PROMPT_TWO, 1, "2 image marker(s)"), (PROMPT_ONE, 2, "1 image marker(s)"), ("no marker", 1, "0 image marker(s)")])
def test_markers_and_images_must_pair_up(model, prompt, count, message):
    features = [np.zeros((MM_TOKENS, 64), np.float32)] * count
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.forward(prompt, image_features=features)


def test_processor_ids_with_too_few_features(model):
    ids = [2, 5, BOI] + [IMAGE] * MM_TOKENS + [EOI, 9]
    with pytest.raises(ValueError, match=r"holds 1 picture\(s\) .* but 2 were given"):
        model.forward(ids, image_features=[np.zeros((MM_TOKENS, 64), np.float32)] * 2)
    with pytest.raises(ValueError, match="a run of 3 image tokens"):
        model.forward([2, BOI] + [IMAGE] * 3 + [EOI], image_features=[np.zeros((MM_TOKENS, 64), np.float32)])


def test_features_of_the_wrong_shape(model):
    with pytest.raises(ValueError, match=r"expected shape \(4, 64\), found \(4, 63\)"):
        model.forward(PROMPT_ONE, image_features=[np.zeros((MM_TOKENS, 63), np.float32)])


def test_a_text_only_blob_refuses_images(checkpoints, tmp_path):
    blob = tmp_path / "text.blob"
    convert(checkpoints("gemma3"), blob, dtype="f32", quiet=True)
    with load(blob, max_seq_len=64) as text_model:
        with pytest.raises(FormatError, match="has no vision component"):
            text_model.generate("<start_of_image>What is it?", images=[np.zeros((4, 4, 3), np.uint8)])
        with pytest.raises(FormatError, match="has no vision component"):
            text_model.chat([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}])


def test_reusable_prefix_stops_at_the_first_picture_that_differs():
    from blobstore.runtime.image_prompt import ImageSpan
    from blobstore.runtime.kv_cache import KVCache
    cache = KVCache(num_layers=1, max_seq_len=32, num_kv_heads=1, head_dim=4)
    ids = [2, 5, BOI] + [IMAGE] * 4 + [EOI, 9, 10, BOI] + [IMAGE] * 4 + [EOI, 11, 12]
    a, b, c = ImageSpan(3, 7, "a"), ImageSpan(12, 16, "b"), ImageSpan(12, 16, "c")
    cache.token_ids[:] = ids
    cache.images[:] = [a, b]
    assert cache.reusable_prefix(ids + [13], [a, b]) == len(ids)       # the same pictures: all of it
    assert cache.reusable_prefix(ids + [13], [a, c]) == 12              # another second picture
    assert cache.reusable_prefix(ids + [13], [ImageSpan(3, 7, "z"), b]) == 3
    assert cache.reusable_prefix(ids + [13], []) == 3                   # the soft-token ids as text
    assert cache.reusable_prefix(ids[:14] + [40] * 5, [a, b]) == 12     # a prefix never ends inside one
    cache.truncate(14)
    assert cache.images == [a]


@pytest.mark.parametrize("images", [[[3, 2, "k"]], [[0, 99, "k"]], [[1, 3, 7]], "k", [[1, 3, "k"], [2, 5, "k"]]])
def test_a_session_file_with_bad_pictures_is_refused(vision_checkpoint, model, processor, tmp_path, images):
    from blobstore import open as open_blob
    from blobstore.writer import BlobWriter
    inputs = processor(text=PROMPT_ONE, images=_pictures(1), return_tensors="np")
    session = model.new_session()
    model.generate(PROMPT_ONE, image_features=list(_features(vision_checkpoint[2], inputs["pixel_values"])),
                   max_new_tokens=1, session=session)
    session.save(tmp_path / "good.session")
    with open_blob(tmp_path / "good.session") as saved, BlobWriter(tmp_path / "bad.session") as writer:
        for name in ("session.k", "session.v", "session.token_ids"):
            writer.add(name, np.array(saved[name]), component="session")
        writer.metadata["session"] = {**saved.metadata["session"], "images": images}
    with pytest.raises(FormatError, match="session.images"):
        model.load_session(tmp_path / "bad.session")


def test_q8_0_top1_agrees_with_transformers(vision_checkpoint, processor, tmp_path):
    """The language model at q8_0 with transformers' image features: the greedy choice at every
    position of a two-image prompt is transformers' float32 one (measured: 61 of 61)."""
    folder, _, reference = vision_checkpoint
    convert(folder, tmp_path / "q8.blob", dtype="q8_0", quiet=True)
    inputs = processor(text=PROMPT_TWO, images=_pictures(2, seed=7), return_tensors="np")
    features = list(_features(reference, inputs["pixel_values"]))
    with load(tmp_path / "q8.blob", max_seq_len=256) as quantized:
        ours = quantized.forward(PROMPT_TWO, image_features=features)
    expected = _reference_logits(reference, inputs)
    assert (ours.argmax(1) == expected.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("spans, message", [
    ([(2, 12, None)], "crosses the call's positions 0..7"),
    ([(4, 6, None), (1, 3, None)], "spans sorted, disjoint"),
    ([(3, 3, None)], "begin < end"),
    ([(2, 4, np.zeros((3, 64), np.float32))], r"embeds must be \(2, 64\)"),
    ([(2, 4, np.zeros((2, 64), np.float64))], "must be float32")])
def test_the_stack_refuses_bad_spans(model, spans, message):
    cache = model.new_session(max_seq_len=16).cache
    with pytest.raises((ValueError, TypeError), match=message):
        model.transformer.stack.run([2] * 8, cache.k, cache.v, 0, spans=spans)
