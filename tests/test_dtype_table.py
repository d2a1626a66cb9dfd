"""The dtype table in blobstore/format.py is the one source of dtype facts: the C kernels' header
must agree with it, and every Python consumer reads it instead of restating it."""
import re
from pathlib import Path

import numpy as np
import pytest

from blobstore import quant
from blobstore.convert import plan
from blobstore.format import DTYPE_SPECS, INTERLEAVE, KNOWN_FEATURES, ROW_ALIGN, DType, layout
from blobstore.reader import QuantizedTensor
from blobstore.runtime import kernels, model
from kquant_blocks import random_planes

KERNELS_H = Path(__file__).resolve().parents[1] / "csrc" / "kernels.h"
MATMUL = [d for d in DType if d.spec.matmul]


def c_header():
    """csrc/kernels.h with its comments removed."""
    return re.sub(r"/\*.*?\*/", "", KERNELS_H.read_text(), flags=re.S)


def c_enum(name: str) -> dict[str, int]:
    body = re.search(r"enum\s+%s\s*\{([^}]*)\}" % name, c_header())
    assert body, f"enum {name} not found in {KERNELS_H}"
    entries = [e.strip() for e in body.group(1).split(",") if e.strip()]
    pairs = [re.fullmatch(r"(\w+)\s*=\s*(\d+)", e) for e in entries]
    assert all(pairs), f"enum {name}: every entry needs an explicit value, found {entries}"
    return {p.group(1): int(p.group(2)) for p in pairs}


def c_define(name: str) -> int:
    found = re.search(r"#define\s+%s\s+(\d+)" % name, c_header())
    assert found, f"#define {name} not found in {KERNELS_H}"
    return int(found.group(1))


def c_table(name: str) -> list[list[int]]:
    """The brace initializer #define'd as `name`: one list of integers per inner brace (or one for a flat list)."""
    header = c_header().replace("\\\n", " ")
    found = re.search(r"#define\s+%s\s+(\{.*)" % name, header)
    assert found, f"#define {name} not found in {KERNELS_H}"
    inner = re.findall(r"\{([^{}]*)\}", found.group(1).split("\n")[0])
    return [[int(v) for v in group.split(",") if v.strip()] for group in inner]


def test_the_c_dtype_enum_is_the_matmul_rows_of_the_table():
    assert c_enum("blob_dtype") == {f"BLOB_{d.name}": int(d) for d in MATMUL}
    assert c_define("BLOB_NUM_DTYPES") == max(MATMUL) + 1  # the kernels' per-dtype tables are indexed by it


def test_the_c_interleave_width_is_the_formats():
    """The rows of a group of interleave8 (format.INTERLEAVE) are the kernels' BLOB_INTERLEAVE."""
    assert c_define("BLOB_INTERLEAVE") == INTERLEAVE


def test_the_c_block_and_plane_tables_are_the_tables():
    """kernels.h's per-dtype tables, indexed by the enum value: values per block and bytes per block of each
    plane for every dtype the kernels multiply, zeros for the stored types they do not (u8 .. i64)."""
    count = c_define("BLOB_NUM_DTYPES")
    expected_blocks = [DType(i).spec.block if DType(i).spec.matmul else 0 for i in range(count)]
    expected_planes = [[p.block_bytes for p in DType(i).spec.planes] if DType(i).spec.matmul else [0]
                       for i in range(count)]
    assert c_table("BLOB_DTYPE_BLOCKS") == [expected_blocks]
    assert c_table("BLOB_DTYPE_PLANE_BYTES") == expected_planes
    assert c_define("BLOB_MAX_PLANES") == max(len(d.spec.planes) for d in MATMUL)


def test_the_c_block_sizes_are_the_tables():
    """BLOB_QBLOCK is the 32-value block of q8_0 .. q5_1 and of the activations; BLOB_KBLOCK the k-quants'."""
    quantized = {d.spec.block for d in MATMUL if d.is_quantized}
    assert quantized == {c_define("BLOB_QBLOCK"), c_define("BLOB_KBLOCK")}
    assert DType.Q8_0.spec.block == c_define("BLOB_QBLOCK") and DType.Q4_K.spec.block == c_define("BLOB_KBLOCK")


def test_quantized_block_sizes_are_ggufs():
    """Every quantized type holds the numbers of GGUF's type of its name: same values per block and bytes
    per block (scales included), only laid out in planes (tests/test_kquant_format.py checks the values)."""
    gguf = pytest.importorskip("gguf")
    for dtype in (d for d in DType if d.is_quantized):
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[dtype.name]] == (dtype.spec.block, dtype.spec.block_bytes)


def test_bits_and_planes_are_consistent():
    for dtype, spec in DTYPE_SPECS.items():
        level_planes = [p for p in spec.planes if p.name in ("values", "quants", "high")]
        assert spec.planes[0] == level_planes[0]  # the first plane holds the values' (low) bits
        assert spec.block * spec.bits == 8 * sum(p.block_bytes for p in level_planes), dtype
        assert spec.label == dtype.label and DType.parse(spec.label) is dtype


@pytest.mark.parametrize("dtype", list(DType), ids=lambda d: d.label)
def test_layout_follows_the_planes(dtype):
    rows, cols = 3, 70
    lay = layout(dtype, (rows, cols))
    blocks = -(-cols // dtype.spec.block)
    first, *later = dtype.spec.planes
    assert lay.row_stride % ROW_ALIGN == 0 and lay.row_stride - ROW_ALIGN < blocks * first.block_bytes <= lay.row_stride
    sizes = [rows * lay.row_stride] + [rows * blocks * plane.block_bytes for plane in later]
    assert all(offset % ROW_ALIGN == 0 for offset in lay.plane_offsets)
    assert lay.nbytes == lay.plane_offsets[-1] + sizes[-1]


def test_consumers_read_the_table():
    assert plan.WEIGHT_DTYPES == tuple(d.label for d in DType if d.spec.weight_choice)
    assert plan.FOUR_BIT_DTYPES == ("q4_0", "q4_1", "q2_k", "q3_k", "q4_k")
    assert set(model.MATRIX_DTYPES) == set(MATMUL)
    assert KNOWN_FEATURES == {"tie": "1.0", "q8_0": "1.0", "q4_0": "1.0", "interleave8": "1.2", "interleave8_q4_0": "1.3",
                              "interleave8_q5_0": "1.3",
                              **{d.label: "1.1" for d in DType if d >= DType.Q4_1}}


@pytest.mark.parametrize("dtype", MATMUL, ids=lambda d: d.label)
def test_a_matrix_goes_to_c_as_its_dtype(dtype):
    """The binding passes the DType's integer and planes; the kernels read the weight as that type
    (blob_embed's dequantization equals numpy's bit for bit)."""
    rng = np.random.default_rng(0)
    cols = 512 if dtype.spec.whole_blocks else 70
    if dtype.spec.whole_blocks:
        planes = random_planes(dtype, 5, cols // dtype.spec.block, rng)
        weight = quant.dequantize(planes, cols, dtype)
    elif dtype.is_quantized:
        planes = quant.quantize(rng.standard_normal((5, cols)).astype(np.float32), dtype)
        weight = quant.dequantize(planes, cols, dtype)
    if dtype.is_quantized:
        matrix = kernels.Matrix(QuantizedTensor(dtype, (5, cols), padded_first_plane(dtype, planes, cols)))
    else:
        x = rng.standard_normal((5, cols)).astype(np.float32)
        stored = quant.f32_to_bf16(x) if dtype is DType.BF16 else x.astype(dtype.numpy)
        weight = quant.bf16_to_f32(stored) if dtype is DType.BF16 else stored.astype(np.float32)
        matrix = kernels.Matrix(stored, dtype=dtype.label)
    assert matrix.dtype == dtype.label
    np.testing.assert_array_equal(kernels.embed(matrix, [0, 4, 3]), weight[[0, 4, 3]])


def padded_first_plane(dtype, planes, cols):
    """The planes as the reader hands them out: the first one's rows padded to the row stride."""
    first, *later = planes
    stride = layout(dtype, (first.shape[0], cols)).row_stride // first.itemsize
    padded = np.zeros((first.shape[0], stride), first.dtype)
    padded[:, :first.shape[1]] = first
    return (padded, *later)


def test_a_type_the_kernels_do_not_multiply_is_refused_by_name():
    with pytest.raises(ValueError, match="unsupported weight dtype 'i32'; expected one of .*'q4_0'"):
        kernels.Matrix(np.zeros((2, 2), np.int32), dtype="i32")
