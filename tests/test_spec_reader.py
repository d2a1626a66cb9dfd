"""docs/FORMAT.md is implementable: tests/spec_reader.py, written from it alone, reads every file the
project writes exactly as blobstore.open does, and refuses every damaged file with the error §7 names."""
import math

import numpy as np
import pytest

import blobstore
from blobstore.convert import convert
from blobstore.format import PLANAR, DType
from blobstore.relayout import relayout
from blobstore.runtime.demo import DEMO_PATH
from blobfile import BlobImage, write_sample
from kquant_blocks import NEW_TYPES, random_planes
from spec_reader import INTERLEAVE8, SpecError, SpecFile
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


@pytest.mark.parametrize("dtype, shape", [("q8_0", (13, 100)), ("q4_0", (13, 100)), ("q5_0", (2, 7, 96)),
                                          ("q4_0", (1, 40))])
def test_interleaved_tensors_read_alike(tmp_path, dtype, shape):
    """§5.5-§5.7: q8_0, q4_0 and q5_0 rows interleaved eight at a time, partial groups (and for q8_0
    and q4_0 partial blocks) included, read the same values as the same tensor planar."""
    values = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    with blobstore.BlobWriter(tmp_path / "i.blob") as w:
        w.add("i", values, dtype=dtype, layout="interleave8")
        w.add("p", values, dtype=dtype)
        w.add_tie("t", "i")
    spec = assert_reads_alike(tmp_path / "i.blob")
    assert spec.records["i"]["layout"] == "interleave8" and same_bits(spec.float32("i"), spec.float32("p"))


def interleaved_types(spec: SpecFile) -> set:
    return {r["dtype"] for r in spec.records.values() if r["layout"] == "interleave8"}


CONVERSIONS = {"defaults": (None, None), "q4_0": ("q4_0", None), "q5_0": ("q5_0", None), "planar": ("q8_0", PLANAR)}


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_converted_and_relayout_files_read_alike(converted_gemma3, tmp_path, conversion):
    """What `blob-pack convert` writes (its defaults, other types, --layout planar) and what
    `blob-pack relayout` makes of it in the other arrangement read alike."""
    dtype, kind = CONVERSIONS[conversion]
    spec = assert_reads_alike(converted_gemma3(dtype, kind))
    types = {r["dtype"] for r in spec.records.values()} & set(INTERLEAVE8)
    assert interleaved_types(spec) == (set() if kind == PLANAR else interleaved_types(spec) | {dtype or "q8_0"})
    other = "interleave8" if kind == PLANAR else PLANAR
    relayout(converted_gemma3(dtype, kind), tmp_path / "r.blob", other)
    assert interleaved_types(assert_reads_alike(tmp_path / "r.blob")) == (types if other == "interleave8" else set())


def test_a_kept_q4_k_m_like_gguf_reads_alike(tmp_path, spm_model):
    """A GGUF mixing the types of a Q4_K_M file (q4_k, q6_k, and q5_0 / q8_0 / q4_0 where rows are
    not whole 256-value super-blocks in real models) converted with the defaults: every type kept,
    the q8_0 / q4_0 / q5_0 matrices interleaved."""
    from test_gguf_keep import T, write_random_gguf

    types = {"token_embd.weight": T.Q8_0, "output.weight": T.Q6_K}
    for layer, kinds in enumerate([(T.Q4_K, T.Q4_K, T.Q6_K, T.Q4_K, T.Q4_K, T.Q4_K, T.Q6_K),
                                   (T.Q5_0, T.Q5_0, T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q5_0)]):
        names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        types.update({f"blk.{layer}.{n}.weight": kind for n, kind in zip(names, kinds)})
    write_random_gguf(tmp_path / "m.gguf", "llama", types, spm_model)
    convert(tmp_path / "m.gguf", tmp_path / "m.blob", quiet=True, strict=True)
    spec = assert_reads_alike(tmp_path / "m.blob")
    assert {r["dtype"] for r in spec.records.values()} >= {"q4_k", "q6_k", "q8_0", "q4_0", "q5_0"}
    assert interleaved_types(spec) == {"q8_0", "q4_0", "q5_0"}


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
