"""The interleave8 arrangements of q8_0 (format 1.2), q4_0 and q5_0 (1.3) tensors: written, read,
refused, rewritten, run."""
import numpy as np
import pytest

import blobstore
from blobstore import cli, errors, quant, reader
from blobstore.format import INTERLEAVE8, INTERLEAVED, KNOWN_FEATURES, PLANAR, layout
from blobstore.relayout import relayout
from blobfile import BlobImage

SHAPES = [(13, 100), (8, 32), (1, 40), (24, 640), (2, 3, 64)]
MINORS = {"q8_0": 2, "q4_0": 3, "q5_0": 3}   # the format version each type's interleave8 came with


def write_pair(path, shape, seed=0, dtype="q8_0"):
    """One float tensor stored twice in `dtype`: planar as "p", interleave8 as "i", plus a tie to "i"."""
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with blobstore.BlobWriter(path) as w:
        w.add("p", values, dtype=dtype)
        w.add("i", values, dtype=dtype, layout="interleave8")
        w.add_tie("t", "i")
    return values


# elements of each plane in a block of a group of eight rows: quants, [q5_0's fifth bits,] float16 scales
GROUP_BLOCK = {"q8_0": (256, 8), "q4_0": (128, 8), "q5_0": (128, 32, 8)}
ROUND_TRIPS = [(dtype, shape) for dtype in ("q8_0", "q4_0") for shape in SHAPES] + \
    [("q5_0", shape) for shape in [(9, 64), (24, 640), (2, 3, 96)]]   # q5_0 rows are whole blocks


@pytest.mark.parametrize("dtype,shape", ROUND_TRIPS)
def test_round_trip_reads_the_same_values_zero_copy(tmp_path, dtype, shape):
    """Each plane is kept in interleave8, grouped (GROUP_BLOCK); the values and the planar planes
    read back unchanged."""
    write_pair(tmp_path / "a.blob", shape, dtype=dtype)
    with blobstore.open(tmp_path / "a.blob", verify="full") as r:
        assert r.version == (1, MINORS[dtype])
        assert (r.info("p").layout, r.info("i").layout, r.info("t").layout) == ("planar", INTERLEAVE8, INTERLEAVE8)
        view, planar = r["i"], r["p"]
        lay = layout(blobstore.DType.parse(dtype), shape, INTERLEAVE8)
        groups = -(-lay.rows // 8)
        assert view.layout == INTERLEAVE8
        assert [p.shape for p in view.planes] == [(groups, lay.blocks * elements) for elements in GROUP_BLOCK[dtype]]
        assert all(not p.flags.writeable and not p.flags.owndata for p in view.planes)   # views on the map
        np.testing.assert_array_equal(r.float32("i"), r.float32("p"))
        np.testing.assert_array_equal(r["t"].dequantize(), r.float32("p"))
        for back, stored, plane in zip(view.planar(), planar.planes, view.dtype.spec.planes, strict=True):
            assert back.shape == (lay.rows, lay.blocks * plane.per_block)
            np.testing.assert_array_equal(back, stored[:, :back.shape[1]])


def test_q4_0_interleave8_bytes_follow_the_format_definition():
    """FORMAT.md §5.6 written out: byte 32c + 4j + m of group g's block b holds level 8c + m of row
    8g + j in its low nibble and level 8c + 4 + m in its high one (levels + 8); scales as q8_0's."""
    rows, cols = 11, 70
    planes = quant.quantize(np.random.default_rng(7).standard_normal((rows, cols)).astype(np.float32), "q4_0")
    levels = quant.dequantize(planes, cols, "q4_0") / np.repeat(planes[1].astype(np.float32), 32, axis=1)[:, :cols]
    quants, scales = quant.interleave8(planes, blobstore.DType.Q4_0)
    for r in range(rows):
        for k in range(cols):
            b, i = divmod(k, 32)
            byte = quants[r // 8, 128 * b + 32 * (i // 8) + 4 * (r % 8) + i % 4]
            nibble = byte >> 4 if i // 4 % 2 else byte & 15
            if planes[1][r, b] != 0:
                assert int(nibble) - 8 == round(float(levels[r, k])), (r, k)
            assert scales[r // 8, 8 * b + r % 8] == planes[1][r, b]
    assert (quants[1, :][np.arange(quants.shape[1]) % 32 // 4 >= 3] == 0x88).all()   # rows 11-15: level 0


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q5_0"])
def test_the_file_requires_the_feature_and_an_older_reader_refuses_it(tmp_path, monkeypatch, dtype):
    write_pair(tmp_path / "a.blob", (9, 64), dtype=dtype)
    feature = INTERLEAVED[dtype].feature
    document = BlobImage(tmp_path / "a.blob").document
    assert {"name": feature, "since": f"1.{MINORS[dtype]}"} in document["features_required"]
    assert document["format"]["minor"] == MINORS[dtype]
    with blobstore.BlobWriter(tmp_path / "planar.blob") as w:   # no interleave8 tensor: the type's own version
        w.add("p", np.ones((2, 32), np.float32), dtype=dtype)
    assert blobstore.open(tmp_path / "planar.blob").version == (1, {"q5_0": 1}.get(dtype, 0))
    monkeypatch.setattr(reader, "KNOWN_FEATURES", {k: v for k, v in KNOWN_FEATURES.items() if k != feature})
    with pytest.raises(errors.UnsupportedFeature,
                       match=f"requires feature '{feature}' \\(added in format 1.{MINORS[dtype]}\\)"):
        blobstore.open(tmp_path / "a.blob")


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q5_0"])
def test_hostile_layout_records_are_refused_by_name(tmp_path, dtype):
    write_pair(tmp_path / "a.blob", (9, 64), dtype=dtype)
    image = BlobImage(tmp_path / "a.blob")

    def without_feature(d):
        d["features_required"] = [f for f in d["features_required"] if f["name"] != INTERLEAVED[dtype].feature]

    def on_the_wrong_type(d):
        d["tensors"][0]["layout"] = "interleave8"
        d["tensors"][0]["dtype"] = "q4_1"

    cases = [(without_feature, errors.CorruptManifest, "'i' has layout 'interleave8', but the file's features_required"),
             (on_the_wrong_type, errors.InvalidTensor, r"'p': layout: expected one of \['planar'\] for q4_1")]
    for change, kind, message in cases:
        bad = tmp_path / "bad.blob"
        bad.write_bytes(BlobImage.from_bytes(image.to_bytes()).edit(change).to_bytes())
        with pytest.raises(kind, match=message):
            blobstore.open(bad)


@pytest.mark.parametrize("dtype,data", [("q4_1", np.ones((8, 32), np.float32)), ("f16", np.ones((8, 32), np.float32))])
def test_writer_refuses_interleave8_for_other_types(tmp_path, dtype, data):
    with blobstore.BlobWriter(tmp_path / "a.blob") as w:
        with pytest.raises(ValueError, match=f"tensor 'w': {dtype} cannot be stored as 'interleave8'"):
            w.add("w", data, dtype=dtype, layout="interleave8")
        w.add("ok", data, dtype="q8_0")


def test_relayout_round_trips_byte_for_byte_and_inspect_shows_it(tmp_path, capsys):
    rng = np.random.default_rng(3)
    src = tmp_path / "a.blob"
    with blobstore.BlobWriter(src) as w:
        w.add("m", rng.standard_normal((13, 100)).astype(np.float32), dtype="q8_0")
        w.add("k", rng.standard_normal((5, 64)).astype(np.float32), dtype="q4_0")
        w.add("v", rng.standard_normal((11, 96)).astype(np.float32), dtype="q5_0")
        w.add("n", rng.standard_normal(7).astype(np.float32), dtype="bf16")
        w.add_tie("head", "m")
        w.metadata["model"] = {"x": 1}
        w.metadata["conversion"] = {"dtype": "q8_0", "layout": "planar"}
    assert relayout(src, tmp_path / "i.blob", "interleave8") == 3
    with blobstore.open(tmp_path / "i.blob") as r:   # the record of the conversion says what the file now is
        assert r.metadata["conversion"] == {"dtype": "q8_0", "layout": "interleave8"}
    assert cli.main(["relayout", str(tmp_path / "i.blob"), "-o", str(tmp_path / "p.blob"), "--layout", "planar"]) == 0
    assert (tmp_path / "p.blob").read_bytes() == src.read_bytes()
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "i.blob")]) == 0
    table = capsys.readouterr().out
    assert "blob file format 1.3" in table
    for name, dtype in {"m": "q8_0", "k": "q4_0", "v": "q5_0"}.items():
        assert next(line for line in table.splitlines() if line.startswith(name + " ")).split()[1:3] == [dtype, "interleave8"]
    assert cli.main(["relayout", str(src), "-o", str(tmp_path / "i.blob"), "--layout", "interleave8"]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q5_0"])
def test_a_converted_interleave8_model_runs_as_the_planar_one(converted_gemma3, dtype):
    """A model converted with --layout interleave8, the default (q8_0, q4_0 or q5_0 matrices; q4_0's
    embedding and tied head q8_0) gives on the scalar path exactly the planar file's logits (the
    same sums, read in another order), and on this machine's fastest path the same up to the float
    rounding of the other kernels."""
    from blobstore.runtime import kernels, load

    files = {PLANAR: converted_gemma3(dtype, PLANAR), INTERLEAVE8: converted_gemma3(dtype)}
    for expected, path in files.items():
        with blobstore.open(path) as r:
            assert {info.layout for info in r.infos() if info.dtype.label in INTERLEAVED} == {expected}
    ids = list(range(3, 40))
    fastest = kernels.get_isa()

    def logits(kind: str) -> np.ndarray:
        with load(files[kind]) as model:
            return model.forward(ids)

    interleaved = logits(INTERLEAVE8)
    kernels.set_isa("scalar")
    try:
        planar = logits(PLANAR)
        np.testing.assert_array_equal(logits(INTERLEAVE8), planar)
    finally:
        kernels.set_isa(fastest)
    # q4_0's int8 activations turn the other kernels' last-bit differences into whole steps of
    # 1/127 of a block's largest value (q8_0's int16 ones into 1/32639): a wider tolerance
    tolerance = {"q8_0": 1e-3, "q4_0": 1e-2, "q5_0": 1e-3}[dtype]
    assert np.abs(interleaved - planar).max() <= tolerance * np.abs(planar).max()


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q5_0"])
def test_the_writer_streams_a_tensor_in_chunks_of_whole_groups_with_the_bytes_of_one_piece(tmp_path, monkeypatch,
                                                                                          dtype):
    """With CHUNK_BYTES down to one or three groups' quant plane, add() and add_quantized() quantize
    and interleave no more than a chunk of rows at a time (peak memory bounded by a chunk) and write
    exactly the bytes of the whole-tensor path, planar files too."""
    from blobstore import writer

    shape = (45, 96)   # 6 groups, the last one partial
    values = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    planes = quant.quantize(values, dtype)

    def write(name):
        with blobstore.BlobWriter(tmp_path / name) as w:
            w.add("i", values, dtype=dtype, layout=INTERLEAVE8)
            w.add_quantized("k", planes, dtype=dtype, shape=shape, layout=INTERLEAVE8)
            w.add("p", values, dtype=dtype, layout=PLANAR)
        return (tmp_path / name).read_bytes()

    whole = write("whole.blob")
    group_bytes = layout(blobstore.DType.parse(dtype), shape, INTERLEAVE8).row_stride
    seen = []
    original = quant.interleave8
    monkeypatch.setattr(quant, "interleave8", lambda p, d: seen.append(len(p[-1])) or original(p, d))
    for groups in (1, 3):
        monkeypatch.setattr(writer, "CHUNK_BYTES", groups * group_bytes)
        seen.clear()
        assert write(f"{groups}.blob") == whole
        assert max(seen) == 8 * groups and sum(seen) == 2 * shape[0]   # both interleaved tensors, in chunks


def test_relayout_copies_what_keeps_its_layout_and_refuses_an_existing_output(tmp_path, monkeypatch):
    """Tensors already in the asked layout (and every other type) are copied as stored, not
    rearranged twice: with the rearrangements broken, relayout into the file's own layout still
    writes the same file. Like convert, it refuses an existing output unless forced."""
    from blobstore.convert import convert

    rng = np.random.default_rng(4)
    src = tmp_path / "a.blob"
    with blobstore.BlobWriter(src) as w:
        w.add("m", rng.standard_normal((13, 100)).astype(np.float32), dtype="q8_0", layout=INTERLEAVE8)
        w.add("v", rng.standard_normal((11, 96)).astype(np.float32), dtype="q5_0", layout=INTERLEAVE8)
        w.add("k", rng.standard_normal((3, 256)).astype(np.float32), dtype="q4_k")
        w.add("n", rng.standard_normal((2, 7)).astype(np.float32), dtype="bf16")

    def broken(*args, **kwargs):
        raise AssertionError("a tensor was rearranged")

    with monkeypatch.context() as m:
        m.setattr(quant, "interleave8", broken)
        m.setattr(quant, "deinterleave8", broken)
        assert relayout(src, tmp_path / "same.blob", INTERLEAVE8) == 0
    assert (tmp_path / "same.blob").read_bytes() == src.read_bytes()
    for refused in (lambda: relayout(src, tmp_path / "same.blob", PLANAR),
                    lambda: convert(src, tmp_path / "same.blob", quiet=True)):
        with pytest.raises(ValueError, match="same.blob already exists; pass --force to overwrite it"):
            refused()
    assert relayout(src, tmp_path / "same.blob", PLANAR, force=True) == 2
