"""docs/FORMAT.md is implementable: tests/spec_reader.py, written from it alone, reads every file the
project writes exactly as blobstore.open does, and refuses every damaged file with the error §7 names."""
import math

import numpy as np
import pytest

import blobstore
from blobstore.format import DType
from blobstore.runtime.demo import DEMO_PATH
from blobfile import BlobImage, write_sample
from kquant_blocks import NEW_TYPES, random_planes
from spec_reader import SpecError, SpecFile
from test_corrupt import CASES, CASE_IDS

SHAPES = [(), (0,), (7,), (3, 0), (1, 1), (5, 33), (2, 64), (2, 3, 40), (3, 100)]
BLOCK_SHAPES = [(0,), (3, 0), (1,), (2, 1), (2, 3, 2), (5, 3)]  # in blocks: the new types need whole ones


def every_dtype_file(path, alignment):
    """BlobWriter output holding every dtype in several shapes, tie chains, files and components."""
    rng = np.random.default_rng(7)
    with blobstore.BlobWriter(path, alignment=alignment) as w:
        for dtype in NEW_TYPES:  # added as ggml blocks: random bytes, float16 scales of every sign and size
            for i, blocks in enumerate(BLOCK_SHAPES):
                shape = (*blocks[:-1], blocks[-1] * dtype.spec.block)
                rows = math.prod(shape[:-1])
                w.add_quantized(f"{dtype.label}.{i}", random_planes(dtype, rows, blocks[-1], rng), dtype=dtype,
                                shape=shape, component="text", source=f"blk.{i}" if i % 2 else None)
        for dtype in (d for d in DType if not d.spec.whole_blocks):
            for i, shape in enumerate(SHAPES):
                if dtype.is_quantized or dtype in (DType.F32, DType.F16, DType.BF16):
                    x = (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
                    if x.size > 32:
                        x.reshape(-1)[:32] = 0  # an all-zero block: scale 0
                else:
                    info = np.iinfo(dtype.numpy)
                    x = rng.integers(info.min, info.max, size=shape, dtype=dtype.numpy, endpoint=True)
                w.add(f"{dtype.label}.{i}", x, dtype=dtype, component="vision" if i % 3 == 1 else "text",
                      source=f"src/{dtype.label}/{i}" if i % 2 else None)
        w.add("bf16.raw", np.arange(60, dtype=np.uint16).tobytes(), dtype="bf16", shape=(6, 10))
        w.add_tie("head", "q8_0.5", source="lm_head.weight")
        w.add_tie("head.again", "head", component="projector")
        w.add_file("tokenizer.json", '{"vocab": {"ünï": 1}}'.encode())
        w.add_file("empty.bin", b"")
        w.metadata.update(model={"layers": 2, "eps": 1e-6}, notes=["a", None, True])
    return path


@pytest.fixture(scope="module", params=[64, 4096], ids=["align64", "align4096"])
def written(request, tmp_path_factory):
    return every_dtype_file(tmp_path_factory.mktemp("spec") / "all.blob", request.param)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.ascontiguousarray(a).tobytes() == \
        np.ascontiguousarray(b).tobytes()


def assert_reads_alike(path):
    spec = SpecFile(path)
    with blobstore.open(path) as r:
        assert r.version == (spec.header["major"], spec.header["minor"]) and r.alignment == spec.header["alignment"]
        assert r.metadata == spec.manifest["metadata"]
        assert r.keys() == list(spec.records)
        for name in r.keys():
            info, record = r.info(name), spec.records[name]
            assert (info.dtype.label, list(info.shape), info.component, info.source, info.tie) == \
                (record["dtype"], record["shape"], record["component"], record["source"], record["tie"]), name
            assert (info.offset, info.nbytes, info.crc32c) == (record["offset"], record["nbytes"], record["crc32c"])
            if not info.dtype.is_quantized:
                assert same_bits(np.asarray(r[name]), spec.stored(name)), name
            if info.dtype.is_quantized or info.dtype in (DType.F32, DType.F16, DType.BF16):
                assert same_bits(r.float32(name), spec.float32(name)), name  # -0.0 and all
    return spec


def test_the_demo_model_reads_alike():
    spec = assert_reads_alike(DEMO_PATH)
    assert {r["dtype"] for r in spec.records.values()} >= {"q8_0", "f32", "u8"}
    assert spec.manifest["metadata"]["tokenizer"]["files"] in spec.records


def test_a_file_of_every_dtype_reads_alike(written):
    spec = assert_reads_alike(written)
    assert {r["dtype"] for r in spec.records.values()} == {d.label for d in DType}
    assert spec.records["head.again"]["tie"] == "q8_0.5" and spec.records["head.again"]["component"] == "projector"
    assert all(spec.check_blob_crc(name) for name, r in spec.records.items() if r["tie"] is None)
    with blobstore.open(written) as r:
        assert r.file_bytes("tokenizer.json") == spec.stored("tokenizer.json").tobytes()
        assert r.file_bytes("empty.bin") == spec.stored("empty.bin").tobytes() == b""


def test_interleaved_q8_0_reads_alike(tmp_path):
    """§5.5: q8_0 rows interleaved eight at a time, a partial group and a partial block included."""
    values = np.random.default_rng(8).standard_normal((13, 100)).astype(np.float32)
    with blobstore.BlobWriter(tmp_path / "i.blob") as w:
        w.add("i", values, dtype="q8_0", layout="interleave8")
        w.add("p", values, dtype="q8_0")
    spec = assert_reads_alike(tmp_path / "i.blob")
    assert same_bits(spec.float32("i"), spec.float32("p"))


def test_the_sample_of_the_corruption_tests_reads_alike(tmp_path):
    assert_reads_alike(write_sample(tmp_path / "sample.blob"))


@pytest.mark.parametrize("build, error", [(case[1], case[2]) for case in CASES], ids=CASE_IDS)
def test_damaged_files_are_refused_with_the_error_the_spec_names(tmp_path, build, error):
    sample = write_sample(tmp_path / "sample.blob")
    path = tmp_path / "broken.blob"
    path.write_bytes(build(BlobImage(sample)))
    with pytest.raises(error):
        blobstore.open(path)
    with pytest.raises(SpecError) as caught:
        SpecFile(path)
    assert caught.value.kind == error.__name__, caught.value
