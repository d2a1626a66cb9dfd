"""q4_0's scale search (blobstore/quant.py): never worse than the max-abs rule, same bit layout."""
from __future__ import annotations

import numpy as np
import pytest

from blobstore import quant

RNG = np.random.default_rng(14)
DATA = {
    "normal": RNG.standard_normal((64, 320)).astype(np.float32),
    "heavy-tailed (Student t, 2 dof)": RNG.standard_t(2, (64, 320)).astype(np.float32),
    "sparse outliers": (RNG.standard_normal((64, 320)) * (1 + 30 * (RNG.random((64, 320)) < 0.01))).astype(np.float32),
    # a 5-bit grid like GGUF's Q5_0 (levels -16..15 times a per-block scale): what re-quantizing a
    # Q4_K_M file's tensors to q4_0 meets
    "q5_0 grid": (RNG.integers(-16, 16, (64, 320)) * np.repeat(RNG.random((64, 10)) * 0.01, 32, axis=1)).astype(np.float32),
}


def max_abs_reference(x: np.ndarray) -> np.ndarray:
    """Values after ggml's reference q4_0 rule: scale = the signed largest-magnitude value / -8."""
    blocks = x.reshape(x.shape[0], -1, 32)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)
    d = (peak / np.float32(-8)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(d != 0, np.clip(np.rint(blocks / d), -8, 7), 0)
    return (levels * d).reshape(x.shape)


def round_trip(x: np.ndarray):
    quants, scales = quant.quantize(x, "q4_0")
    return quant.dequantize((quants, scales), x.shape[1], "q4_0"), quants, scales


def block_errors(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((x - y) ** 2).reshape(x.shape[0], -1, 32).sum(axis=2)


@pytest.mark.parametrize("kind", DATA)
def test_no_block_is_worse_than_the_max_abs_rule(kind):
    x = DATA[kind]
    ours, reference = block_errors(x, round_trip(x)[0]), block_errors(x, max_abs_reference(x))
    assert (ours <= reference * (1 + 1e-6)).all()
    gain = 1 - ours.sum() / reference.sum()
    print(f"{kind}: squared error {gain:.1%} below the max-abs rule")
    assert gain > {"q5_0 grid": 0.2, "sparse outliers": 0.01}.get(kind, 0.03)


@pytest.mark.parametrize("kind", DATA)
def test_every_value_is_within_one_step_of_its_block_scale(kind):
    x = DATA[kind]
    y, _, scales = round_trip(x)
    step = np.repeat(np.abs(scales.astype(np.float32)), 32, axis=1)
    assert (np.abs(x - y) <= step * (1 + 2**-8)).all()


def test_bit_layout_is_the_format_one():
    """Byte j of a block holds value j in its low nibble and value j + 16 in its high nibble; the
    value of nibble n is (n - 8) x scale (docs/FORMAT.md 5.2), padding past the row is level 8."""
    x = DATA["heavy-tailed (Student t, 2 dof)"][:3, :40]
    y, quants, scales = round_trip(x)
    assert quants.shape == (3, 64) and quants.dtype == np.uint8 and scales.shape == (3, 2) and scales.dtype == np.float16
    assert not quants[:, 32:].any()
    block_bytes = quants[:, :32].reshape(3, 2, 16)
    nibbles = np.concatenate([block_bytes & 0x0F, block_bytes >> 4], axis=2)  # (rows, blocks, 32)
    decoded = ((nibbles.astype(np.float32) - 8) * scales.astype(np.float32)[..., None]).reshape(3, 64)
    np.testing.assert_array_equal(decoded[:, :40], y)
    assert (nibbles[:, 1, 8:] == 8).all()  # the 24 padding zeros of block 1


def test_values_on_a_q4_0_grid_come_back_exactly():
    levels = RNG.integers(-8, 8, (4, 64)).astype(np.float32)
    levels[:, 0] = levels[:, 32] = -8  # each block reaches the grid's end
    x = levels * np.float32(0.125)
    np.testing.assert_array_equal(round_trip(x)[0], x)


def test_zero_and_constant_blocks():
    x = np.zeros((2, 64), np.float32)
    x[1, 32:] = 3.5
    y, quants, scales = round_trip(x)
    np.testing.assert_array_equal(y, x)
    assert scales[0, 0] == 0 and (quants[0, :32] == 0x88).all()
