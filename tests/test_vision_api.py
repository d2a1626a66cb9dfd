"""Gemma 3 image input through the public surfaces: `images=` of forward / generate / chat,
`blob-run --image`, the server's image_url parts, end to end: preprocessing, the blob's own
vision tower and projector on the C kernels (VisionTower), the token runs, where the features go,
the memo; the logits equal transformers' Gemma3ForConditionalGeneration given the processor's
pixel values.
"""
from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest

from blobstore.runtime import cli, image_prompt
from blobstore.runtime.image_prompt import ImageEncoder
from test_vision_text import PROMPT_ONE, PROMPT_TWO, _pictures, _reference_logits, model, processor, \
    vision_checkpoint  # noqa: F401 (fixtures)

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


class CountingTower:
    """The model's own VisionTower, counting its encode calls (the memo's test)."""

    def __init__(self, tower):
        self.tower, self.calls = tower, 0
        self.image_size = tower.image_size

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.tower.encode(pixel_values)


@pytest.fixture
def tower(model, monkeypatch):
    counting = CountingTower(model.image_encoder.tower())
    monkeypatch.setattr(ImageEncoder, "tower", lambda self: counting)
    return counting


@pytest.fixture
def fresh_memo(model):
    model.image_encoder._memo.clear()


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_forward_with_images_equals_transformers(vision_checkpoint, model, processor, tower, fresh_memo):
    pictures = _pictures(2, seed=5)
    inputs = processor(text=PROMPT_TWO, images=pictures, return_tensors="np")
    ours = model.forward(PROMPT_TWO, images=[pictures[0], _png(pictures[1])])
    np.testing.assert_allclose(ours, _reference_logits(vision_checkpoint[2], inputs), atol=1e-3, rtol=0)


def test_pan_and_scan_prompt_equals_transformers(vision_checkpoint, model, processor, tower, fresh_memo):
    wide = np.random.default_rng(2).integers(0, 256, (12, 40, 3), dtype=np.uint8)
    settings = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=4, pan_and_scan_max_num_crops=3,
                    pan_and_scan_min_ratio_to_activate=1.2)
    inputs = processor(text=PROMPT_ONE, images=[wide], return_tensors="np", **settings)
    from blobstore.runtime.images import PanAndScan
    ids, spans = model.encode_prompt(PROMPT_ONE, images=[wide], pan_and_scan=PanAndScan(4, 3, 1.2))
    assert ids == inputs["input_ids"][0].tolist() and len(spans) == 4
    ours = model.forward(PROMPT_ONE, images=[wide], pan_and_scan=PanAndScan(4, 3, 1.2))
    np.testing.assert_allclose(ours, _reference_logits(vision_checkpoint[2], inputs), atol=1e-3, rtol=0)


def test_a_picture_is_encoded_once_for_the_next_turn(model, tower, fresh_memo):
    picture = _pictures(1)[0]
    session = model.new_session()
    first = model.generate(PROMPT_ONE, images=[picture], max_new_tokens=3, temperature=0, session=session)
    again = model.generate(PROMPT_ONE, images=[_png(picture)], max_new_tokens=3, temperature=0, session=session)
    assert tower.calls == 1
    assert again.stats.reused_prompt_tokens == again.stats.prompt_tokens - 1
    assert again.token_ids == first.token_ids


def test_chat_with_image_parts_equals_generate_on_the_rendered_prompt(model, tower, fresh_memo):
    picture = _pictures(1, seed=8)[0]
    url = "data:image/png;base64," + base64.b64encode(_png(picture)).decode()
    for part in ({"type": "image", "image": picture}, {"type": "image_url", "image_url": {"url": url}}):
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]
        answer = model.chat(messages, max_new_tokens=6, temperature=0, ignore_eos=True, session=model.new_session())
        text = model.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What is it?"}]}])
        expected = model.generate(text, images=[picture], add_bos=False, max_new_tokens=6, temperature=0,
                                  ignore_eos=True, session=model.new_session())
        assert answer.token_ids == expected.token_ids


def test_image_urls_must_be_base64_data_urls(model, tower):
    for url, message in [("https://example.com/cat.png", "the runtime does not download images"),
                         ("data:image/png,rawbytes", "must be base64-encoded"),
                         ("data:image/png;base64,@@@", "invalid base64")]:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with pytest.raises(ValueError, match=message):
            model.chat(messages, max_new_tokens=1)


def test_blob_run_with_an_image(vision_checkpoint, model, tower, tmp_path, capsys):
    picture = _pictures(1, seed=9)[0]
    path = tmp_path / "picture.png"
    path.write_bytes(_png(picture))
    assert cli.main([str(vision_checkpoint[1]), "--image", str(path), "-p", "Describe this image.", "-n", "5",
                     "--temp", "0", "--ctx", "128"]) == 0
    expected = model.generate("<start_of_image>Describe this image.", images=[picture], max_new_tokens=5,
                              temperature=0, session=model.new_session())
    assert capsys.readouterr().out.startswith(expected.text)


def test_blob_run_reports_a_missing_image(vision_checkpoint, tower, tmp_path, capsys):
    assert cli.main([str(vision_checkpoint[1]), "--image", str(tmp_path / "absent.png"), "-p", "Hi", "-n", "2",
                     "--ctx", "64"]) == 1
    assert "absent.png: no such image file" in capsys.readouterr().err


def test_server_answers_image_url_parts_like_the_python_api(model, tower, fresh_memo, monkeypatch):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from blobstore.runtime.serve.app import create_app
    from blobstore.runtime.serve.engine import ModelEngine
    picture = _pictures(1, seed=11)[0]
    url = "data:image/png;base64," + base64.b64encode(_png(picture)).decode()
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
    spans_made = []
    spans = image_prompt.spans
    monkeypatch.setattr(image_prompt, "spans", lambda *args: spans_made.append(args) or spans(*args))
    with TestClient(create_app(ModelEngine(model), "tiny")) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
        refused = client.post("/v1/chat/completions", json={
            **body, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]})
    assert len(spans_made) == 1   # the server's prompt: its spans made once, when it was checked
    expected = model.chat([{"role": "user", "content": [content[0], {"type": "image", "image": picture}]}],
                          max_new_tokens=6, temperature=0, session=model.new_session())
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["usage"]["prompt_tokens"] == expected.stats.prompt_tokens
    assert refused.status_code == 400 and "data: URL" in refused.json()["error"]["message"]


def test_sessions_in_threads_encode_concurrently_without_mixing_pictures(model, tower, fresh_memo):
    pictures = _pictures(3, seed=12)
    alone = [model.generate(PROMPT_ONE, images=[p], max_new_tokens=4, temperature=0, session=model.new_session())
             .token_ids for p in pictures]
    model.image_encoder._memo.clear()
    results = [None] * 3

    def run(i):
        results[i] = model.generate(PROMPT_ONE, images=[pictures[i]], max_new_tokens=4, temperature=0,
                                    session=model.new_session()).token_ids
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == alone


def test_image_spans_go_with_ids_only(model):
    features = np.ones((model.image_tokens.per_image, model.config.hidden_size), np.float32)
    ids, spans = model.encode_prompt(PROMPT_ONE, image_features=[features])
    with pytest.raises(ValueError, match="image_spans go with the token ids"):
        model.generate(PROMPT_ONE, image_spans=spans, max_new_tokens=1)
    with pytest.raises(ValueError, match="image_spans go with the token ids"):
        model.generate(ids, image_spans=spans, image_features=[spans[0].embeds], max_new_tokens=1)
    assert model.generate(ids, image_spans=spans, max_new_tokens=3, temperature=0).token_ids == \
        model.generate(ids, image_features=[spans[0].embeds], max_new_tokens=3, temperature=0).token_ids
