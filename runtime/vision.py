"""Gemma 3's vision tower on the kernels: the SigLIP encoder and the projector that the converter
stores as the blob's `vision` and `projector` components, bound once, zero copy, to the encoder
block in csrc/vision.c.

`VisionTower.encode` turns normalized pixel values into the image tokens' embeddings, equal to
transformers' `Gemma3ForConditionalGeneration.get_image_features(pixel_values).pooler_output`.
Preprocessing (resizing, normalizing) and placing the tokens in a prompt happen elsewhere.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..errors import MissingTensor
from . import kernels
from .model import MATRIX_DTYPES, bound_matrix, bound_vector

ENCODER_ACTIVATION = "gelu_pytorch_tanh"   # the MLP activation csrc/vision.c computes
LAYER = "vision.encoder.layers.{i}."
# each encoder layer's tensors: VisionLayer field → stored name after the layer prefix
LAYER_MATRICES = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
                  "o": "self_attn.out_proj.weight", "fc1": "mlp.fc1.weight", "fc2": "mlp.fc2.weight"}
LAYER_VECTORS = {"norm1": "layer_norm1.weight", "norm1_bias": "layer_norm1.bias", "norm2": "layer_norm2.weight",
                 "norm2_bias": "layer_norm2.bias", "q_bias": "self_attn.q_proj.bias",
                 "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
                 "o_bias": "self_attn.out_proj.bias", "fc1_bias": "mlp.fc1.bias", "fc2_bias": "mlp.fc2.bias"}
PATCH, PATCH_BIAS = "vision.embeddings.patch_embedding.weight", "vision.embeddings.patch_embedding.bias"
POSITION = "vision.embeddings.position_embedding.weight"
POST_NORM, POST_NORM_BIAS = "vision.post_layernorm.weight", "vision.post_layernorm.bias"
PROJECTION_NORM, PROJECTION = "projector.mm_soft_emb_norm.weight", "projector.mm_input_projection.weight"
# what blob-pack stored before it stored the projection transposed and the patch embedding flattened
OLD_PROJECTION = "projector.mm_input_projection_weight"
CONVERT_HINT = ("convert a Gemma3ForConditionalGeneration checkpoint with blob-pack, without --text-only, "
                "to get one")


@dataclass
class VisionLayer:
    """One encoder layer's weights, as kernels.VisionStack binds them."""

    q: kernels.Matrix
    k: kernels.Matrix
    v: kernels.Matrix
    o: kernels.Matrix
    fc1: kernels.Matrix
    fc2: kernels.Matrix
    norm1: np.ndarray
    norm1_bias: np.ndarray
    norm2: np.ndarray
    norm2_bias: np.ndarray
    q_bias: np.ndarray
    k_bias: np.ndarray
    v_bias: np.ndarray
    o_bias: np.ndarray
    fc1_bias: np.ndarray
    fc2_bias: np.ndarray


class VisionTower:
    """A blob's vision encoder and projector, bound to the kernels.

    >>> tower = VisionTower.from_reader(blobstore.open("gemma-3-4b-it.blob"))   # doctest: +SKIP
    >>> tower.encode(np.zeros((1, 3, 896, 896), np.float32)).shape              # doctest: +SKIP
    (1, 256, 2560)
    """

    def __init__(self, stack: kernels.VisionStack, *, image_size: int, patch_size: int, channels: int):
        self.stack = stack
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels
        self.mm_tokens_per_image = stack.tokens
        self.text_hidden = stack.text_hidden
        self._lock = threading.Lock()   # one encode at a time: the stack's scratch memory is shared

    @classmethod
    def from_reader(cls, reader) -> "VisionTower":
        """Bind the `vision` and `projector` components of an open blob (blobstore.open).

        Raises MissingTensor when the file has no vision tower, or lacks or misshapes a tensor
        of it (every problem listed at once).
        """
        vision, projector = _component_configs(reader)
        if vision.get("hidden_act") != ENCODER_ACTIVATION:
            raise ValueError(f"{reader.path}: vision config field hidden_act: expected {ENCODER_ACTIVATION!r}, "
                             f"found {vision.get('hidden_act')!r}")
        hidden, layers = int(vision["hidden_size"]), int(vision["num_hidden_layers"])
        image_size, patch_size = int(vision["image_size"]), int(vision["patch_size"])
        tokens = int(projector["mm_tokens_per_image"])
        _check_tensors(reader, hidden, int(vision["intermediate_size"]), layers, int(vision["num_channels"]),
                       image_size, patch_size)
        side = round(tokens ** 0.5)
        if side * side != tokens:
            raise ValueError(f"{reader.path}: projector config field mm_tokens_per_image: expected a square, "
                             f"found {tokens}")
        stack = kernels.VisionStack(
            bound_matrix(reader, PATCH), bound_vector(reader, PATCH_BIAS), bound_matrix(reader, POSITION),
            [_bind_layer(reader, i) for i in range(layers)], bound_vector(reader, POST_NORM),
            bound_vector(reader, POST_NORM_BIAS), bound_vector(reader, PROJECTION_NORM), bound_matrix(reader, PROJECTION),
            n_heads=int(vision["num_attention_heads"]), ffn=int(vision["intermediate_size"]),
            channels=int(vision["num_channels"]), image_size=image_size, patch_size=patch_size,
            tokens_per_side=side, norm_eps=float(vision["layer_norm_eps"]))
        return cls(stack, image_size=image_size, patch_size=patch_size, channels=int(vision["num_channels"]))

    def encode(self, pixel_values) -> np.ndarray:
        """float32 pixel values (n_images, channels, image_size, image_size), already normalized
        -> float32 image-token embeddings (n_images, mm_tokens_per_image, text_hidden). Calls
        from several threads run one at a time.

        >>> tower.encode(pixels).shape     # doctest: +SKIP
        (2, 256, 2560)
        """
        with self._lock:
            return self.stack.encode(pixel_values)

    def __repr__(self):
        return (f"VisionTower(image_size={self.image_size}, patch_size={self.patch_size}, "
                f"mm_tokens_per_image={self.mm_tokens_per_image}, text_hidden={self.text_hidden})")


def _component_configs(reader) -> tuple[dict, dict]:
    components = reader.metadata.get("components") or {}
    missing = [name for name in ("vision", "projector") if name not in components]
    if missing:
        raise MissingTensor(f"{reader.path}: the file has no vision tower (no {' or '.join(missing)} component); "
                            f"{CONVERT_HINT}")
    return components["vision"].get("config") or {}, components["projector"].get("config") or {}


def _expected_tensors(hidden: int, ffn: int, layers: int, channels: int, image_size: int, patch_size: int) -> dict:
    grid = image_size // patch_size
    expected = {PATCH: (hidden, channels * patch_size * patch_size), PATCH_BIAS: (hidden,),
                POSITION: (grid * grid, hidden), POST_NORM: (hidden,), POST_NORM_BIAS: (hidden,),
                PROJECTION_NORM: (hidden,), PROJECTION: (None, hidden)}
    shapes = {"fc1": (ffn, hidden), "fc2": (hidden, ffn), "fc1_bias": (ffn,)}
    for i in range(layers):
        prefix = LAYER.format(i=i)
        for part, name in {**LAYER_MATRICES, **LAYER_VECTORS}.items():
            expected[prefix + name] = shapes.get(part, (hidden, hidden) if part in LAYER_MATRICES else (hidden,))
    return expected


def _check_tensors(reader, hidden, ffn, layers, channels, image_size, patch_size):
    """One MissingTensor listing every vision tensor absent, misshapen or of a dtype the kernels
    cannot read."""
    problems = []
    for name, shape in _expected_tensors(hidden, ffn, layers, channels, image_size, patch_size).items():
        if name not in reader:
            problems.append(f"  {name}: missing (expected shape {list(shape)})")
            continue
        info = reader.info(name)
        if len(info.shape) != len(shape) or any(want not in (None, got) for want, got in zip(shape, info.shape)):
            problems.append(f"  {name}: shape {list(info.shape)}, expected {list(shape)}")
        if info.dtype not in MATRIX_DTYPES or (len(shape) == 1 and info.dtype.is_quantized):
            problems.append(f"  {name}: dtype {info.dtype.label} cannot be read by the vision encoder")
    if problems:
        hint = (f"\n  (the file stores {OLD_PROJECTION}: it was converted by an older blob-pack; convert it again)"
                if OLD_PROJECTION in reader else "")
        raise MissingTensor(f"{reader.path}: the vision tower cannot run ({len(problems)} problem(s)):\n"
                            + "\n".join(problems) + hint)


def _bind_layer(reader, i: int) -> VisionLayer:
    prefix = LAYER.format(i=i)
    return VisionLayer(**{part: bound_matrix(reader, prefix + name) for part, name in LAYER_MATRICES.items()},
                       **{part: bound_vector(reader, prefix + name) for part, name in LAYER_VECTORS.items()})
