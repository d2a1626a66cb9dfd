"""Gemma 3's vision tower on the kernels (runtime/vision.py, csrc/vision.c) against transformers'
`Gemma3ForConditionalGeneration.get_image_features(pixel_values).pooler_output`, eager, float32.

Tolerances, as a share of the reference's largest magnitude:
- f32 weights: 1e-4; only the summation order differs (measured ~4e-7).
- bf16 and q8_0 weights against transformers run with the same rounded weights (the blob's values
  dequantized into the torch model): bf16 values are exact in f32, so 1e-4 as above; q8_0 adds
  the kernels' rounding of activations to int16 blocks (step amax/32639 per 32 values), 5e-4
  (measured ~4e-5).
- bf16 and q8_0 against the original float32 model: the weights' own rounding, through two
  layers and the projection (bf16 keeps 8 significant bits, q8_0 about 8 per block): 2e-2 and
  5e-2 (measured ~6e-3 and ~1e-2).
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import blobstore
from blobstore.convert import convert
from blobstore.errors import MissingTensor
from blobstore.runtime import kernels as K
from blobstore.runtime.vision import VisionTower
from conftest import build_multimodal_gemma3

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# 32 px in 4 px patches: an 8x8 grid, pooled 2x2 into 16 image tokens; two layers
VISION = dict(image_size=32, patch_size=4, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
              intermediate_size=64)
MM_TOKENS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, spm_model):
    """The checkpoint folder, its blobs by dtype, and transformers' model of it."""
    root = tmp_path_factory.mktemp("vision")
    folder = root / "checkpoint"
    folder.mkdir()
    build_multimodal_gemma3(folder, spm_model, mm_tokens_per_image=MM_TOKENS, **VISION)
    blobs = {}
    for dtype in ("f32", "bf16", "q8_0"):
        blobs[dtype] = root / f"{dtype}.blob"
        convert(folder, blobs[dtype], dtype=dtype, quiet=True)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    return folder, blobs, model


def pixels(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


def image_features(model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.get_image_features(torch.from_numpy(pixel_values)).pooler_output.numpy()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def encode(path, pixel_values):
    with blobstore.open(path) as reader:
        return VisionTower.from_reader(reader).encode(pixel_values)


@pytest.mark.parametrize("isa", K.available_isas())
def test_f32_matches_transformers_on_every_isa(tiny, isa):
    _, blobs, model = tiny
    previous = K.get_isa()
    K.set_isa(isa)
    try:
        with blobstore.open(blobs["f32"]) as reader:
            tower = VisionTower.from_reader(reader)
            assert (tower.image_size, tower.patch_size, tower.mm_tokens_per_image, tower.text_hidden) == (32, 4, 16, 64)
            got = tower.encode(pixels(2))
    finally:
        K.set_isa(previous)
    want = image_features(model, pixels(2))
    assert got.shape == want.shape == (2, MM_TOKENS, 64) and got.dtype == np.float32
    assert relative_error(got, want) <= 1e-4


@pytest.mark.parametrize("geometry", ["conftest", "large"])
def test_other_geometries_match_transformers(checkpoints, spm_model, tmp_path, geometry):
    """conftest's multimodal checkpoint: 28 px in 14 px patches, 2x2 of them to 4 tokens (no
    pooling); and 72 px in 4 px patches, 324 of them (more than a block of 256 queries, and a
    partial second block) pooled 3x3 into 36 tokens."""
    if geometry == "conftest":
        folder, size = checkpoints("gemma3_mm"), 28
    else:
        folder, size = tmp_path / "large", 72
        folder.mkdir()
        build_multimodal_gemma3(folder, spm_model, mm_tokens_per_image=36, image_size=72, patch_size=4)
    convert(folder, tmp_path / "mm.blob", dtype="f32", quiet=True)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    values = pixels(2, size=size, seed=5)
    assert relative_error(encode(tmp_path / "mm.blob", values), image_features(model, values)) <= 1e-4


def with_blob_weights(model, path):
    """A copy of `model` whose vision tower and projector hold the blob's values, dequantized."""
    clone = transformers.Gemma3ForConditionalGeneration(model.config).eval()
    clone.load_state_dict(model.state_dict())
    params = dict(clone.named_parameters())
    with blobstore.open(path) as reader, torch.no_grad():
        for name in reader.keys():
            component = reader.info(name).component
            if component not in ("vision", "projector"):
                continue
            values = reader.float32(name)
            if name == "projector.mm_input_projection.weight":
                target, values = "model.multi_modal_projector.mm_input_projection_weight", values.T
            elif component == "projector":
                target = "model.multi_modal_projector." + name.removeprefix("projector.")
            else:
                target = "model.vision_tower." + name.removeprefix("vision.")
            params[target].copy_(torch.from_numpy(np.ascontiguousarray(values)).reshape(params[target].shape))
    return clone


@pytest.mark.parametrize("dtype, same_weights, original", [("bf16", 1e-4, 2e-2), ("q8_0", 5e-4, 5e-2)])
def test_rounded_weights(tiny, dtype, same_weights, original):
    _, blobs, model = tiny
    values = pixels(2, seed=1)
    got = encode(blobs[dtype], values)
    assert relative_error(got, image_features(with_blob_weights(model, blobs[dtype]), values)) <= same_weights
    assert relative_error(got, image_features(model, values)) <= original


def test_hub_style_names_store_the_same_tower(tiny, tmp_path):
    """The hub's checkpoints nest the tower under vision_tower.vision_model.: the same blob tensors."""
    folder, blobs, _ = tiny
    hub = tmp_path / "hub"
    hub.mkdir()
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (hub / item.name).write_bytes(item.read_bytes())
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    renamed = {name.replace("vision_tower.", "vision_tower.vision_model.", 1): t for name, t in tensors.items()}
    safetensors_torch.save_file(renamed, hub / "model.safetensors", metadata={"format": "pt"})
    convert(hub, tmp_path / "hub.blob", dtype="f32", quiet=True)
    with blobstore.open(blobs["f32"]) as ours, blobstore.open(tmp_path / "hub.blob") as theirs:
        vision = sorted(n for n in ours.keys() if ours.info(n).component in ("vision", "projector"))
        assert vision == sorted(n for n in theirs.keys() if theirs.info(n).component in ("vision", "projector"))
        for name in vision:
            np.testing.assert_array_equal(ours.float32(name), theirs.float32(name))
    values = pixels(1, seed=2)
    np.testing.assert_array_equal(encode(tmp_path / "hub.blob", values), encode(blobs["f32"], values))


def test_threads_do_not_change_the_result(tiny):
    _, blobs, _ = tiny
    previous = K.get_threads()
    try:
        results = []
        for count in (1, 2):
            K.set_threads(count)
            results.append(encode(blobs["q8_0"], pixels(1, seed=3)))
    finally:
        K.set_threads(previous)
    assert np.array_equal(results[0], results[1])


def test_images_are_independent(tiny):
    """Two images in one call are each what they are alone."""
    _, blobs, _ = tiny
    both = encode(blobs["f32"], pixels(2, seed=4))
    np.testing.assert_array_equal(both[1], encode(blobs["f32"], pixels(2, seed=4)[1:])[0])


def test_bad_pixel_values(tiny):
    _, blobs, _ = tiny
    with blobstore.open(blobs["f32"]) as reader:
        tower = VisionTower.from_reader(reader)
        with pytest.raises(TypeError, match="pixel values must be float32, found float64"):
            tower.encode(pixels(1).astype(np.float64))
        with pytest.raises(ValueError, match=r"must be \(n_images, 3, 32, 32\), found shape \(1, 3, 16, 16\)"):
            tower.encode(pixels(1, size=16))
        with pytest.raises(ValueError, match=r"must be \(n_images, 3, 32, 32\), found shape \(3, 32, 32\)"):
            tower.encode(pixels(1)[0])
        assert tower.encode(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, MM_TOKENS, 64)


def test_a_text_only_blob_says_it_has_no_vision_tower(tiny, tmp_path):
    folder, _, _ = tiny
    convert(folder, tmp_path / "text.blob", text_only=True, quiet=True)
    with blobstore.open(tmp_path / "text.blob") as reader, \
            pytest.raises(MissingTensor, match=r"has no vision tower .*without --text-only"):
        VisionTower.from_reader(reader)


def test_missing_and_old_style_tensors_are_listed(tiny, tmp_path):
    """A missing bias and the projection as blob-pack stored it before (untransposed): one error
    naming both, and saying to convert again."""
    _, blobs, _ = tiny
    out = tmp_path / "broken.blob"
    with blobstore.open(blobs["f32"]) as reader, blobstore.BlobWriter(out) as writer:
        for name in reader.keys():
            component = reader.info(name).component
            if component not in ("vision", "projector") or name == "vision.encoder.layers.1.mlp.fc2.bias":
                continue
            values = reader.float32(name)
            if name == "projector.mm_input_projection.weight":
                name, values = "projector.mm_input_projection_weight", np.ascontiguousarray(values.T)
            writer.add(name, values, dtype="f32", component=component)
        writer.metadata["components"] = json.loads(json.dumps(reader.metadata["components"]))
    with blobstore.open(out) as reader, pytest.raises(MissingTensor) as error:
        VisionTower.from_reader(reader)
    message = str(error.value)
    assert "vision.encoder.layers.1.mlp.fc2.bias: missing (expected shape [32])" in message
    assert "projector.mm_input_projection.weight: missing" in message
    assert "converted by an older blob-pack; convert it again" in message


def test_threads_share_a_tower(tiny):
    """Encodes from two threads at once both finish, each with its own images' result."""
    _, blobs, _ = tiny
    with blobstore.open(blobs["f32"]) as reader:
        tower = VisionTower.from_reader(reader)
        want = [tower.encode(pixels(1, seed=s)) for s in (6, 7)]
        got = [None, None]

        def run(i):
            got[i] = tower.encode(pixels(1, seed=6 + i))
        workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
