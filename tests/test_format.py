"""Round trips through BlobWriter and blobstore.open, checked against the raw bytes of the file."""
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import blobstore
from blobstore import quant
from blobstore._native import crc32c, crc32c_portable
from blobstore.format import FILE_ALIGN, HEADER_SIZE, HEADER_STRUCT, MAGIC, ROW_ALIGN, DType, layout

SHAPES = [(), (0,), (1,), (7,), (3, 0), (0, 5), (1, 1), (5, 33), (4, 64), (2, 3, 5), (2, 1, 3, 37)]
FLOAT_DTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]


def write(path, tensors, alignment=4096, **extras):
    with blobstore.BlobWriter(path, alignment=alignment) as w:
        for name, (array, dtype) in tensors.items():
            w.add(name, array, dtype=dtype)
        w.metadata.update(extras)
    return path


def manifest_of(path):
    raw = open(path, "rb").read()
    fields = HEADER_STRUCT.unpack(raw[:HEADER_SIZE])
    offset, size = fields[8], fields[9]
    return raw, json.loads(raw[offset:offset + size])


def error_bound(dtype, x):
    """Largest error each stored type may add, per element: half a step of its grid; for q4_0, whose
    searched scale may let a block's extreme values clip, one step of a scale at most peak / 7."""
    peak = float(np.abs(x).max()) if x.size else 0.0
    return {"f32": 0.0, "f16": peak * 2**-11 + 2**-24, "bf16": peak * 2**-8,
            "q8_0": peak / 127 * 0.5 * 1.01 + 1e-6, "q4_0": peak / 7 * 1.01 + 1e-6}[dtype]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_float_dtypes(tmp_path, dtype, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    path = write(tmp_path / "t.blob", {"x": (x, dtype)}, alignment=64)
    with blobstore.open(path, verify="full") as r:
        back = r.float32("x")
        assert back.shape == shape and back.dtype == np.float32
        assert np.abs(back - x).max(initial=0) <= error_bound(dtype, x)
        assert r.info("x").dtype is DType.parse(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32, np.int64])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 7), (2, 3, 4)], ids=str)
def test_round_trip_integer_dtypes_exact(tmp_path, dtype, shape):
    x = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape).astype(dtype)
    path = write(tmp_path / "t.blob", {"x": (x, None)})
    with blobstore.open(path) as r:
        assert r["x"].dtype == x.dtype and np.array_equal(r["x"], x)


def test_f32_is_bit_exact_and_quantized_matches_reference(tmp_path):
    x = np.random.default_rng(1).standard_normal((9, 100)).astype(np.float32)
    path = write(tmp_path / "t.blob", {"f": (x, "f32"), "q8": (x, "q8_0"), "q4": (x, "q4_0")})
    with blobstore.open(path) as r:
        assert r["f"].tobytes() == x.tobytes()
        for name, dtype in (("q8", "q8_0"), ("q4", "q4_0")):
            quants, scales = quant.quantize(x, dtype)
            assert np.array_equal(r[name].quants, quants) and np.array_equal(r[name].scales, scales)


def test_raw_bf16_bits_are_stored_verbatim(tmp_path):
    bits = np.random.default_rng(2).integers(0, 2**15, size=(3, 10), dtype=np.uint16)
    with blobstore.BlobWriter(tmp_path / "t.blob") as w:
        w.add("b", bits.tobytes(), dtype="bf16", shape=(3, 10))
    with blobstore.open(tmp_path / "t.blob") as r:
        assert np.array_equal(r["b"], bits)
        assert np.array_equal(r.float32("b"), quant.bf16_to_f32(bits))


def test_every_blob_and_row_is_aligned_in_the_raw_bytes(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {f"t{i}.{dtype}": (rng.standard_normal((3, 5 + 17 * i)).astype(np.float32), dtype)
               for i, dtype in enumerate(FLOAT_DTYPES * 2)}
    path = write(tmp_path / "t.blob", tensors, alignment=256)
    raw, manifest = manifest_of(path)
    assert len(raw) % FILE_ALIGN == 0
    assert raw[:HEADER_SIZE] == raw[-HEADER_SIZE:] and raw[:8] == MAGIC
    for record in manifest["tensors"]:
        assert record["offset"] % 256 == 0
        assert record["row_stride"] % ROW_ALIGN == 0
        lay = layout(DType.parse(record["dtype"]), tuple(record["shape"]))
        assert lay.scales_offset % ROW_ALIGN == 0
        blob = raw[record["offset"]:record["offset"] + record["nbytes"]]
        assert crc32c(blob) == record["crc32c"]
        if DType.parse(record["dtype"]) in (DType.F32, DType.F16, DType.BF16):
            itemsize = DType.parse(record["dtype"]).numpy.itemsize
            rows = np.frombuffer(blob, np.uint8).reshape(lay.rows, lay.row_stride)
            assert not rows[:, lay.cols * itemsize:].any(), "row padding must be zero"


def test_views_are_zero_copy_read_only_and_survive_close(tmp_path):
    x = np.arange(4000, dtype=np.float32).reshape(40, 100)
    path = write(tmp_path / "t.blob", {"x": (x, None), "q": (x, "q8_0")})
    r = blobstore.open(path)
    view, qview = r["x"], r["q"]
    whole = np.frombuffer(r._map, np.uint8)
    assert np.shares_memory(view, whole) and np.shares_memory(qview.quants, whole)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 1
    del whole
    r.close()
    assert view.sum() == x.sum()  # the map stays alive while views exist
    with pytest.raises(ValueError, match="closed"):
        r["x"]


def test_ties_resolve_to_their_target(tmp_path):
    x = np.ones((4, 8), np.float32)
    with blobstore.BlobWriter(tmp_path / "t.blob") as w:
        w.add("embed", x, dtype="q8_0")
        w.add_tie("lm_head", "embed", source="lm_head.weight")
    raw, manifest = manifest_of(tmp_path / "t.blob")
    assert {"name": "tie", "since": "1.0"} in manifest["features_required"]
    with blobstore.open(tmp_path / "t.blob") as r:
        assert r.info("lm_head").tie == "embed" and r.info("lm_head").source == "lm_head.weight"
        assert np.array_equal(r.float32("lm_head"), r.float32("embed"))
        assert r.header.blob_count == 1


def test_metadata_and_file_blobs(tmp_path):
    payload = bytes(range(256)) * 3
    with blobstore.BlobWriter(tmp_path / "t.blob") as w:
        w.add_file("tokenizer.model", payload)
        w.metadata["model"] = {"arch": "gemma3", "layers": 2, "ünïcode": "✓"}
    with blobstore.open(tmp_path / "t.blob") as r:
        assert r.file_bytes("tokenizer.model") == payload
        assert r.metadata == {"model": {"arch": "gemma3", "layers": 2, "ünïcode": "✓"}}
        assert r.info("tokenizer.model").component == "tokenizer"
        with pytest.raises(blobstore.MissingTensor, match="nope"):
            r.info("nope")


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write(tmp_path / "t.blob", {"a": (np.ones(3, np.float32), None)})
    finally:
        os.umask(umask)
    if os.name == "posix":
        assert os.stat(tmp_path / "t.blob").st_mode & 0o777 == 0o644


def test_writer_failure_leaves_nothing_at_the_target(tmp_path):
    target = tmp_path / "out.blob"
    with pytest.raises(RuntimeError):
        with blobstore.BlobWriter(target) as w:
            w.add("a", np.ones(10, np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_interrupted_by_ctrl_c_leaves_nothing(tmp_path):
    # a shell without job control starts its background jobs with SIGINT ignored: restore Ctrl-C
    script = textwrap.dedent(f"""
        import os, signal, numpy as np, blobstore
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with blobstore.BlobWriter({str(tmp_path / 'out.blob')!r}) as w:
            w.add("a", np.ones((100, 100), np.float32))
            os.kill(os.getpid(), signal.SIGINT)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert "KeyboardInterrupt" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad_call, message", [
    (lambda w: w.add("a", np.ones(3, np.float32)), "already added"),
    (lambda w: w.add("bad name!", np.ones(3, np.float32)), "must be 1-255 characters"),
    (lambda w: w.add("x", b"\0" * 6, dtype="f32", shape=(2,)), "do not hold"),
    (lambda w: w.add("x", np.array([np.nan], np.float32), dtype="q8_0"), "NaN or infinity"),
    (lambda w: w.add("x", np.array([1e6], np.float32), dtype="f16"), "float16 range"),
    (lambda w: w.add("x", np.array([1.5], np.float32), dtype="i32"), "lossy cast"),
    (lambda w: w.add("x", np.ones(3, np.float32), dtype="f8"), "unknown dtype"),
])
def test_writer_rejects_bad_input_with_a_named_error(tmp_path, bad_call, message):
    with blobstore.BlobWriter(tmp_path / "t.blob") as w:
        w.add("a", np.ones(3, np.float32))
        with pytest.raises(ValueError, match=message):
            bad_call(w)


def test_writer_rejects_a_tie_to_nothing(tmp_path):
    w = blobstore.BlobWriter(tmp_path / "t.blob")
    w.add_tie("lm_head", "embed")
    with pytest.raises(ValueError, match="never added"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_crc32c_hardware_path_matches_portable_table():
    rng = np.random.default_rng(4)
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC32C check value
    for n in (0, 1, 7, 8, 9, 63, 64, 1000, 4097):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == crc32c_portable(data)
        assert crc32c(data[n // 2:], crc32c(data[:n // 2])) == crc32c(data)  # streaming


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantization_follows_the_block_definition(dtype):
    """Recompute one block by the FORMAT.md rule, element by element, and compare (for q4_0, the
    levels given the stored scale, and the scale within the documented range)."""
    x = np.random.default_rng(5).standard_normal((1, 32)).astype(np.float32)
    quants, scales = quant.quantize(x, dtype)
    block = x[0]
    if dtype == "q8_0":
        d = np.float16(np.abs(block).max() / np.float32(127))
        expected = [int(np.clip(np.rint(v * (np.float32(1) / np.float32(d))), -127, 127)) for v in block]
        assert list(quants[0, :32]) == expected
        assert scales[0, 0] == d
    else:
        d = scales[0, 0]
        nib = [int(np.clip(np.rint(v * (np.float32(1) / np.float32(d))) + 8, 0, 15)) for v in block]
        assert list(quants[0, :16]) == [nib[j] | nib[j + 16] << 4 for j in range(16)]
        peak = block[np.argmax(np.abs(block))]
        opposite = max(0.0, float(-block.min() if peak > 0 else block.max()))
        assert np.sign(d) == -np.sign(peak)
        assert max(abs(peak) / 9, opposite / 8) <= abs(float(d)) <= abs(peak) / 7 * (1 + 2**-10)


def test_bf16_rounds_to_nearest_even():
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, np.inf, 0.0], np.float32)
    assert list(quant.bf16_to_f32(quant.f32_to_bf16(values))) == [1.0, 1.0, 1 + 2**-6, -2.5, np.inf, 0.0]
    assert np.isnan(quant.bf16_to_f32(quant.f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_opening_a_large_file_does_not_read_it(tmp_path):
    """Resident memory after open() + taking views grows by a small fraction of the file size."""
    path = tmp_path / "big.blob"
    with blobstore.BlobWriter(path) as w:
        for i in range(8):
            w.add(f"w{i}", np.full((1024, 8192), i, np.float32))  # 8 x 32 MiB
    script = textwrap.dedent(f"""
        import blobstore
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        before = rss()
        r = blobstore.open({str(path)!r})
        views = [r[k] for k in r.keys()]
        print(rss() - before)
    """)
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("resident memory is read from /proc (Linux only)")
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               cwd=tmp_path.parent).stdout)
    assert grown < os.path.getsize(path) * 0.02, f"open() made {grown} bytes resident"


def test_header_fields_describe_the_file(tmp_path):
    path = write(tmp_path / "t.blob", {"a": (np.ones(3, np.float32), None)}, alignment=128)
    raw = open(path, "rb").read()
    magic, major, minor, header_size, alignment, flags, blobs, size, m_off, m_size, m_crc, h_crc = \
        HEADER_STRUCT.unpack(raw[:HEADER_SIZE])
    assert (magic, major, minor, header_size, alignment, flags, blobs, size) == (MAGIC, 1, 0, 64, 128, 0, 1, len(raw))
    assert crc32c(raw[m_off:m_off + m_size]) == m_crc
    assert crc32c(raw[:60]) == h_crc == struct.unpack("<I", raw[60:64])[0]
