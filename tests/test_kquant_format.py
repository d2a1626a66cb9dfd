"""The ggml block types (q4_1, q5_0, q5_1, q2_k ... q6_k) in the blob format: the planes hold ggml's bytes
unchanged, and the values read back are bit for bit the gguf package's dequantization of those bytes."""
import re
from pathlib import Path

import numpy as np
import pytest

import blobstore
from blobstore import errors, quant
from blobstore.format import DType, layout
from kquant_blocks import GGML_TYPES, NEW_TYPES, random_ggml, random_planes
from spec_reader import SpecFile

gguf = pytest.importorskip("gguf")


def ggml_values(dtype: DType, raw: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(dtype.spec.ggml_type))


def same_bits(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("dtype", GGML_TYPES, ids=lambda d: d.label)
def test_the_table_names_ggml_types_of_the_same_size(dtype):
    qtype = gguf.GGMLQuantizationType(dtype.spec.ggml_type)
    assert qtype.name == dtype.name
    assert gguf.GGML_QUANT_SIZES[qtype] == (dtype.spec.block, dtype.spec.block_bytes)
    assert sorted(dtype.spec.ggml_fields) == sorted(p.name for p in dtype.spec.planes)


@pytest.mark.parametrize("dtype", GGML_TYPES, ids=lambda d: d.label)
def test_dequantize_equals_ggufs_bit_for_bit(dtype):
    rng = np.random.default_rng(int(dtype))
    raw = random_ggml(dtype, 7, 5, rng)
    expected = ggml_values(dtype, raw)
    got = quant.dequantize(quant.planes_from_ggml(dtype, raw), 5 * dtype.spec.block, dtype)
    assert same_bits(got, expected)
    assert (np.signbit(got) & (got == 0)).any() or dtype in (DType.Q4_1, DType.Q5_1, DType.Q2_K, DType.Q4_K, DType.Q5_K)


@pytest.mark.parametrize("dtype", GGML_TYPES, ids=lambda d: d.label)
def test_every_level_of_every_sub_block_reads_as_ggml_reads_it(dtype):
    """Blocks whose level bytes take every value 0..255 at every position, so each bit of the packing is hit."""
    spec = dtype.spec
    raw = random_ggml(dtype, 256, 1, np.random.default_rng(1))
    fields = quant.planes_from_ggml(dtype, raw)
    levels = [i for i, p in enumerate(spec.planes) if p.element in ("u1", "i1")]
    sweep = (np.arange(256)[:, None] + np.arange(4096)[None, :]).astype(np.uint8)  # row r, byte j: r + j
    planes = [sweep[:, :f.shape[1]].view(f.dtype) if i in levels else f for i, f in enumerate(fields)]
    raw = quant.ggml_from_planes(dtype, planes)
    assert same_bits(quant.dequantize(planes, spec.block, dtype), ggml_values(dtype, raw))


@pytest.mark.parametrize("dtype", GGML_TYPES, ids=lambda d: d.label)
def test_planes_and_ggml_bytes_convert_both_ways_unchanged(dtype):
    raw = np.random.default_rng(2).integers(0, 256, (3, 4 * dtype.spec.block_bytes), dtype=np.uint8)
    planes = quant.planes_from_ggml(dtype, raw)
    assert [(p.dtype, p.shape) for p in planes] == [(p.numpy, (3, 4 * p.per_block)) for p in dtype.spec.planes]
    assert np.array_equal(quant.ggml_from_planes(dtype, planes), raw)
    padded_first = np.zeros((3, layout(dtype, (3, 4 * dtype.spec.block)).row_stride), np.uint8).view(planes[0].dtype)
    padded_first[:, :planes[0].shape[1]] = planes[0]
    assert np.array_equal(quant.ggml_from_planes(dtype, (padded_first, *planes[1:])), raw)


def test_ggml_bytes_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"q4_k: ggml blocks must be uint8 \(rows, nblocks \* 144\)"):
        quant.planes_from_ggml("q4_k", np.zeros((2, 145), np.uint8))
    with pytest.raises(ValueError, match="f16 is not a ggml block type"):
        quant.planes_from_ggml("f16", np.zeros((2, 4), np.uint8))


@pytest.mark.parametrize("dtype", NEW_TYPES, ids=lambda d: d.label)
def test_a_blob_stores_the_planes_and_reads_ggmls_values(tmp_path, dtype):
    rng = np.random.default_rng(3)
    shape = (2, 3, 3 * dtype.spec.block)
    planes = random_planes(dtype, 6, 3, rng)
    with blobstore.BlobWriter(tmp_path / "k.blob") as w:
        w.add_quantized("w", planes, dtype=dtype.label, shape=shape)
        w.add("plain", np.ones(4, np.float32))
    with blobstore.open(tmp_path / "k.blob", verify="full") as r:
        assert r.version == (1, 1)
        view = r["w"]
        assert [p.shape[1] for p in view.planes[1:]] == [3 * p.per_block for p in dtype.spec.planes[1:]]
        assert view.quants.shape == (6, layout(dtype, shape).row_stride // planes[0].itemsize)
        assert np.array_equal(view.quants[:, :planes[0].shape[1]], planes[0]) and not view.quants[:, planes[0].shape[1]:].any()
        assert all(np.array_equal(a, b) for a, b in zip(view.planes[1:], planes[1:]))
        assert np.array_equal(view.scales, view.plane("scales"))
        expected = ggml_values(dtype, quant.ggml_from_planes(dtype, planes)).reshape(shape)
        assert same_bits(r.float32("w"), expected)


def test_a_file_without_new_types_stays_format_1_0(tmp_path):
    with blobstore.BlobWriter(tmp_path / "old.blob") as w:
        w.add("q", np.ones((2, 64), np.float32), dtype="q4_0")
    with blobstore.open(tmp_path / "old.blob") as r:
        assert r.version == (1, 0)


def test_pre_quantized_planes_are_checked(tmp_path):
    planes = random_planes(DType.Q6_K, 2, 1, np.random.default_rng(4))
    with blobstore.BlobWriter(tmp_path / "bad.blob") as w:
        with pytest.raises(ValueError, match=r"'w'.* q6_k needs rows of whole 256-value blocks; shape \[2, 100\]"):
            w.add_quantized("w", planes, dtype="q6_k", shape=(2, 100))
        with pytest.raises(ValueError, match=r"'x'.*q6_k plane 'high' must be uint8 of shape \(2, 64\), found uint8 \(2, 65\)"):
            w.add_quantized("x", (planes[0], np.zeros((2, 65), np.uint8), *planes[2:]), dtype="q6_k", shape=(2, 256))
        with pytest.raises(ValueError, match=r"'y'.*q6_k has 4 planes \(quants, high, sub_scales, scales\), got 3"):
            w.add_quantized("y", planes[:3], dtype="q6_k", shape=(2, 256))


def test_a_record_of_a_new_type_with_partial_blocks_is_refused(tmp_path):
    from blobfile import BlobImage
    planes = random_planes(DType.Q4_1, 2, 2, np.random.default_rng(5))
    with blobstore.BlobWriter(tmp_path / "ok.blob") as w:
        w.add_quantized("w", planes, dtype="q4_1", shape=(2, 64))
    image = BlobImage(tmp_path / "ok.blob")
    image.edit(lambda doc: doc["tensors"][0].update(shape=[2, 60]))  # same blocks and nbytes: only whole blocks broken
    image.save(tmp_path / "bad.blob")
    with pytest.raises(errors.InvalidTensor, match=r"'w': shape: expected rows of whole 32-value blocks for q4_1"):
        blobstore.open(tmp_path / "bad.blob")


FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
EXAMPLE = re.compile(r"^- \*\*(\w+)\*\*: (.*) → (.*)$", re.M)


def worked_examples() -> dict:
    """FORMAT.md §5.4's examples: type → (planes of one block, {value index: value})."""
    examples = {}
    for label, given, values in EXAMPLE.findall(FORMAT_MD.read_text(encoding="utf-8")):
        dtype = DType.parse(label)
        hex_bytes = dict(re.findall(r"(\w+) `([0-9A-F ]+)`", given))
        planes = []
        for plane in dtype.spec.planes:
            block = np.zeros(plane.block_bytes, np.uint8)
            start = bytes.fromhex(hex_bytes.pop(plane.name, ""))
            block[:len(start)] = list(start)
            planes.append(block.view(plane.numpy).reshape(1, -1))
        assert not hex_bytes, f"{label}: planes {list(hex_bytes)} are not {label}'s"
        expected = {int(i): float(v.replace("−", "-")) for i, v in re.findall(r"v(\d+) = (−?[\d.]+)", values)}
        examples[dtype] = (tuple(planes), expected)
    return examples


def test_format_md_has_a_worked_example_per_new_type_and_every_reader_agrees_with_it(tmp_path):
    examples = worked_examples()
    assert set(examples) == set(NEW_TYPES)
    with blobstore.BlobWriter(tmp_path / "examples.blob") as w:
        for dtype, (planes, _) in examples.items():
            w.add_quantized(dtype.label, planes, dtype=dtype, shape=(1, dtype.spec.block))
    spec = SpecFile(tmp_path / "examples.blob")
    with blobstore.open(tmp_path / "examples.blob") as r:
        for dtype, (planes, expected) in examples.items():
            by_gguf = ggml_values(dtype, quant.ggml_from_planes(dtype, planes))[0]
            for values in (r.float32(dtype.label)[0], spec.float32(dtype.label)[0], by_gguf):
                got = {i: float(values[i]) for i in expected}
                assert got == expected and all(np.signbit(values[i]) == np.signbit(v) for i, v in expected.items()), dtype


def test_inspect_shows_and_verify_checks_every_type(tmp_path, capsys):
    from blobstore import cli

    path = tmp_path / "all.blob"
    with blobstore.BlobWriter(path) as w:
        for dtype in NEW_TYPES:
            w.add_quantized(f"w.{dtype.label}", random_planes(dtype, 3, 2, np.random.default_rng(int(dtype))),
                            dtype=dtype, shape=(3, 2 * dtype.spec.block))
    assert cli.main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert "blob file format 1.1" in table
    for dtype in NEW_TYPES:
        row = next(line for line in table.splitlines() if line.startswith(f"w.{dtype.label} "))
        assert row.split()[1:4] == [dtype.label, "planar", f"3x{2 * dtype.spec.block}"]
    assert cli.main(["verify", str(path)]) == 0
    assert f"{len(NEW_TYPES)} blobs match" in capsys.readouterr().out
