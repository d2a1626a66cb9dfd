"""The quantizers from floats (blobstore/kquant.py): their bytes are ggml's blocks (the gguf package
reads them back as blobstore does), their error-minimizing search beats plain max-abs / min-max
rounding and is not worse than a plain per-block reference search, and hostile input fails clearly.
"""
from __future__ import annotations

import numpy as np
import pytest

from blobstore import kquant, quant
from blobstore.format import DType
from blobstore.writer import BlobWriter

gguf = pytest.importorskip("gguf")

TYPES = ["q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
SEARCH_CHECKED = ["q4_k", "q5_k", "q6_k"]  # against the plain per-block search too


def gguf_values(raw: np.ndarray, label: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, label.upper()))


def round_trip(x: np.ndarray, label: str) -> np.ndarray:
    return gguf_values(kquant.quantize_ggml(x, label), label)


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def weights(kind: str, rows: int = 16, cols: int = 1024, seed: int = 0) -> np.ndarray:
    """Weight-like data: normal, or heavy-tailed (Student t, 3 degrees of freedom: outliers in most blocks)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) if kind == "normal" else rng.standard_t(3, (rows, cols))
    return (0.02 * x).astype(np.float32)


# ---- plain reference quantizers, written out per block in the most direct way ----

def _code_scales(values: np.ndarray, top: int) -> np.ndarray:
    """Per super-block (rows of `values` ≥ 0): the values rounded to multiples of max/top in float16."""
    d = (values.max(axis=1) / top).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.clip(np.rint(np.where(d[:, None] > 0, values / d[:, None], 0)), 0, top)
    return codes * d[:, None]


def _affine_values(x, scale, minimum, nmax):
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.clip(np.rint(np.where(scale > 0, (x - minimum) / scale, 0)), 0, nmax)
    return levels * scale + minimum


def _k_affine_reference(x: np.ndarray, nmax: int, fit, size: int = 32, top: int = 63) -> np.ndarray:
    """q2_k / q4_k / q5_k values: each `size`-value sub-block's (scale, minimum ≤ 0) from `fit`, both
    coded in 0..top against max/top (llama.cpp's reference coding), then the levels rounded against them."""
    sub = x.reshape(-1, 256 // size, size).astype(np.float64)
    fits = np.array([[fit(block, nmax) for block in superblock] for superblock in sub])
    scale = _code_scales(fits[..., 0], top)[..., None]
    minimum = -_code_scales(-fits[..., 1], top)[..., None]
    return _affine_values(sub, scale, minimum, nmax).reshape(x.shape)


def max_min_fit(block, nmax):
    lo = min(block.min(), 0.0)
    return (block.max() - lo) / nmax, lo


def searched_fit(block, nmax, steps=np.arange(-1.0, 1.01, 0.1)):
    """Least-squares (scale, minimum) of the levels rounded on each of 21 grids around the span;
    the candidate with the smallest squared error (as llama.cpp's make_qkx2_quants)."""
    lo = min(block.min(), 0.0)
    span = block.max() - lo
    best = (np.inf, span / nmax, lo)
    if span == 0:
        return best[1:]
    for step in steps:
        levels = np.clip(np.rint((block - lo) * (nmax + step) / span), 0, nmax)
        design = np.stack([levels, np.ones_like(levels)], axis=1)
        scale, minimum = np.linalg.lstsq(design, block, rcond=None)[0]
        if minimum > 0:
            minimum, scale = 0.0, float(levels @ block / (levels @ levels))
        err = float(np.sum((scale * levels + minimum - block) ** 2))
        if err < best[0]:
            best = (err, scale, minimum)
    return best[1:]


def _symmetric_reference(x: np.ndarray, search: bool, nmax: int = 32, top: int = 128) -> np.ndarray:
    """q3_k / q6_k values: each 16-value sub-block's signed scale (max-abs / -nmax, or the best
    least-squares scale over 19 grids), coded in -top..top-1 against max/-top, then the levels
    (-nmax..nmax-1) rounded against them."""
    sub = x.reshape(-1, 16, 16).astype(np.float64)
    scales = np.zeros(sub.shape[:2])
    for i, j in np.ndindex(*scales.shape):
        block = sub[i, j]
        peak = block[np.abs(block).argmax()]
        if peak == 0:
            continue
        scales[i, j] = peak / -nmax
        if search:
            best = 0.0
            for step in np.arange(-0.9, 0.91, 0.1):
                levels = np.clip(np.rint(block * -(nmax + step) / peak), -nmax, nmax - 1)
                score = (levels @ block) ** 2 / (levels @ levels)
                if score > best:
                    best, scales[i, j] = score, levels @ block / (levels @ levels)
    peak = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)
    d = (peak / -top).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        coded = np.clip(np.rint(np.where(d != 0, scales / d, 0)), -top, top - 1) * d
        levels = np.clip(np.rint(np.where(coded[..., None] != 0, sub / coded[..., None], 0)), -nmax, nmax - 1)
    return (levels * coded[..., None]).reshape(x.shape)


def reference(x: np.ndarray, label: str, search: bool) -> np.ndarray:
    """A plain reference quantizer's values: max-abs / min-max rounding, or a per-block search."""
    if label == "q6_k":
        return _symmetric_reference(x, search)
    if label == "q3_k":
        return _symmetric_reference(x, search, nmax=4, top=32)
    if label == "q2_k":
        return _k_affine_reference(x, 3, searched_fit if search else max_min_fit, size=16, top=15)
    if label in ("q4_k", "q5_k"):
        return _k_affine_reference(x, 15 if label == "q4_k" else 31, searched_fit if search else max_min_fit)
    raw = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, label.upper()))  # gguf-py's own: max-abs
    return gguf_values(raw, label)


# ---- the tests ----

@pytest.mark.parametrize("label", TYPES)
def test_gguf_reads_our_blocks_as_blobstore_does(label):
    x = weights("heavy", rows=6, cols=512)
    raw = kquant.quantize_ggml(x, label)
    assert raw.shape == (6, 512 // DType.parse(label).spec.block * DType.parse(label).spec.block_bytes)
    ours = quant.dequantize(quant.planes_from_ggml(label, raw), 512, label)
    np.testing.assert_array_equal(ours, gguf_values(raw, label))
    assert rmse(ours, x) < 1.25 * 2.0 ** (1 - DType.parse(label).spec.bits) * x.std()  # about half a level


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("label", TYPES)
def test_the_search_beats_max_abs_rounding_and_a_plain_reference_search(label, kind):
    x = weights(kind, rows=4)
    ours = rmse(round_trip(x, label), x)
    plain = rmse(reference(x, label, search=False), x)
    print(f"{label} {kind}: RMSE / std ours {ours / x.std():.4f}, max-abs rounding {plain / x.std():.4f}")
    assert ours < 0.99 * plain
    if label in SEARCH_CHECKED:
        searched = rmse(reference(x, label, search=True), x)
        print(f"  plain reference search {searched / x.std():.4f}")
        assert ours <= 1.005 * searched


@pytest.mark.parametrize("label", TYPES)
def test_all_zero_and_constant_blocks(label):
    block = DType.parse(label).spec.block
    x = np.zeros((3, 2 * block), np.float32)
    x[1] = 0.375
    x[2] = -1.5
    np.testing.assert_array_equal(round_trip(x[:1], label), 0)
    np.testing.assert_allclose(round_trip(x, label), x, rtol=2e-3)


@pytest.mark.parametrize("label", TYPES)
def test_a_single_outlier_keeps_its_value_and_costs_only_its_own_block(label):
    x = weights("normal", rows=2, cols=512, seed=3)
    x[0, 100] = 1.0  # 50 standard deviations
    y = round_trip(x, label)
    block = DType.parse(label).spec.block
    assert abs(y[0, 100] - 1.0) < 0.03
    others = np.ones(x.shape, bool)
    others[0, (100 // block) * block:(100 // block + 1) * block] = False
    assert rmse(y[others], x[others]) <= 1.02 * rmse(round_trip(np.where(others, x, 0), label)[others], x[others])


@pytest.mark.parametrize("label", TYPES)
def test_negative_only_data(label):
    x = -np.abs(weights("heavy", rows=3, cols=512, seed=5))
    y = round_trip(x, label)
    # a least-squares grid may put its top level a little above zero, never a whole 4-bit step
    assert y.max() < np.abs(x).max() / 15
    assert rmse(y, x) < rmse(reference(x, label, search=False), x)


@pytest.mark.parametrize("label", TYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinity_are_refused_naming_the_tensor(label, bad, tmp_path):
    x = weights("normal", rows=4, cols=512)
    x[2, 300] = bad
    with BlobWriter(tmp_path / "bad.blob") as writer:
        with pytest.raises(ValueError, match=f"tensor 'layers.0.q': cannot quantize to {label}: the values hold NaN "
                                             f"or infinity"):
            writer.add("layers.0.q", x, dtype=label)
        writer.add("fine", x[:2], dtype=label)  # the writer stays usable


def test_values_beyond_the_float16_scales_are_refused():
    with pytest.raises(ValueError, match="float16 range"):
        kquant.quantize_ggml(np.full((1, 256), 1e9, np.float32), "q6_k")


def test_rows_must_hold_whole_blocks():
    with pytest.raises(ValueError, match="q4_k needs rows of a multiple of 256 values, got 640"):
        kquant.quantize_ggml(np.zeros((2, 640), np.float32), "q4_k")
    with pytest.raises(ValueError, match="no float quantizer for q8_0"):
        kquant.quantize_ggml(np.zeros((2, 256), np.float32), "q8_0")


@pytest.mark.parametrize("label", TYPES)
def test_blob_writer_quantizes_and_the_reader_reads_the_same_values(label, tmp_path):
    import blobstore
    x = weights("heavy", rows=5, cols=768, seed=7)
    with BlobWriter(tmp_path / "w.blob") as writer:
        writer.add("w", x, dtype=label)
    with blobstore.open(tmp_path / "w.blob", verify="full") as blob:
        assert blob.info("w").dtype.label == label
        np.testing.assert_array_equal(blob.float32("w"), round_trip(x, label))
        np.testing.assert_array_equal(quant.ggml_from_planes(label, blob["w"].planes), kquant.quantize_ggml(x, label))
