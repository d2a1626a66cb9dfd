"""The interleave8 arrangement of q8_0 tensors (format 1.2): written, read, refused, rewritten, run."""
import numpy as np
import pytest

import blobstore
from blobstore import cli, errors, quant, reader
from blobstore.format import INTERLEAVE8, KNOWN_FEATURES, PLANAR, layout
from blobstore.relayout import relayout
from blobfile import BlobImage

SHAPES = [(13, 100), (8, 32), (1, 40), (24, 640), (2, 3, 64)]


def write_pair(path, shape, seed=0):
    """One float tensor stored twice in q8_0: planar as "p", interleave8 as "i", plus a tie to "i"."""
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with blobstore.BlobWriter(path) as w:
        w.add("p", values, dtype="q8_0")
        w.add("i", values, dtype="q8_0", layout="interleave8")
        w.add_tie("t", "i")
    return values


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_reads_the_same_values_zero_copy(tmp_path, shape):
    write_pair(tmp_path / "a.blob", shape)
    with blobstore.open(tmp_path / "a.blob", verify="full") as r:
        assert r.version == (1, 2)
        assert (r.info("p").layout, r.info("i").layout, r.info("t").layout) == ("planar", INTERLEAVE8, INTERLEAVE8)
        view = r["i"]
        lay = layout(blobstore.DType.Q8_0, shape, INTERLEAVE8)
        groups = -(-lay.rows // 8)
        assert view.layout == INTERLEAVE8
        assert [p.shape for p in view.planes] == [(groups, lay.blocks * 256), (groups, lay.blocks * 8)]
        assert all(not p.flags.writeable and not p.flags.owndata for p in view.planes)   # views on the map
        np.testing.assert_array_equal(r.float32("i"), r.float32("p"))
        np.testing.assert_array_equal(r["t"].dequantize(), r.float32("p"))
        planar = r["p"]
        back = quant.deinterleave8(*view.planes, rows=lay.rows)
        np.testing.assert_array_equal(back[0], planar.quants[:, :lay.blocks * 32])
        np.testing.assert_array_equal(back[1], planar.scales)


def test_the_file_requires_the_feature_and_an_older_reader_refuses_it(tmp_path, monkeypatch):
    write_pair(tmp_path / "a.blob", (9, 64))
    document = BlobImage(tmp_path / "a.blob").document
    assert {"name": "interleave8", "since": "1.2"} in document["features_required"]
    assert document["format"]["minor"] == 2
    with blobstore.BlobWriter(tmp_path / "planar.blob") as w:   # no interleave8 tensor: still a 1.0 file
        w.add("p", np.ones((2, 32), np.float32), dtype="q8_0")
    assert blobstore.open(tmp_path / "planar.blob").version == (1, 0)
    monkeypatch.setattr(reader, "KNOWN_FEATURES", {k: v for k, v in KNOWN_FEATURES.items() if k != INTERLEAVE8})
    with pytest.raises(errors.UnsupportedFeature, match="requires feature 'interleave8' \\(added in format 1.2\\)"):
        blobstore.open(tmp_path / "a.blob")


def test_hostile_layout_records_are_refused_by_name(tmp_path):
    write_pair(tmp_path / "a.blob", (9, 64))
    image = BlobImage(tmp_path / "a.blob")

    def without_feature(d):
        d["features_required"] = [f for f in d["features_required"] if f["name"] != INTERLEAVE8]

    def on_the_wrong_type(d):
        d["tensors"][0]["layout"] = "interleave8"   # "p" keeps its planar nbytes: mismatch
        d["tensors"][0]["dtype"] = "q4_0"

    cases = [(without_feature, errors.CorruptManifest, "'i' has layout 'interleave8', but the file's features_required"),
             (on_the_wrong_type, errors.InvalidTensor, r"'p': layout: expected one of \['planar'\] for q4_0")]
    for change, kind, message in cases:
        bad = tmp_path / "bad.blob"
        bad.write_bytes(BlobImage.from_bytes(image.to_bytes()).edit(change).to_bytes())
        with pytest.raises(kind, match=message):
            blobstore.open(bad)


@pytest.mark.parametrize("dtype,data", [("q4_0", np.ones((8, 32), np.float32)), ("f16", np.ones((8, 32), np.float32))])
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
        w.add("n", rng.standard_normal(7).astype(np.float32), dtype="bf16")
        w.add_tie("head", "m")
        w.metadata["model"] = {"x": 1}
    assert relayout(src, tmp_path / "i.blob", "interleave8") == 1
    assert cli.main(["relayout", str(tmp_path / "i.blob"), "-o", str(tmp_path / "p.blob"), "--layout", "planar"]) == 0
    assert (tmp_path / "p.blob").read_bytes() == src.read_bytes()
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "i.blob")]) == 0
    table = capsys.readouterr().out
    assert "blob file format 1.2" in table
    assert next(line for line in table.splitlines() if line.startswith("m ")).split()[1:3] == ["q8_0", "interleave8"]
    assert next(line for line in table.splitlines() if line.startswith("k ")).split()[1:3] == ["q4_0", "planar"]
    assert cli.main(["relayout", str(src), "-o", str(tmp_path / "i.blob"), "--layout", "interleave8"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_converted_interleave8_model_runs_as_the_planar_one(checkpoints, tmp_path):
    """A model converted with --layout interleave8 (q8_0 matrices, embedding and tied head) gives
    on the scalar path exactly the planar file's logits (the same sums, read in another order),
    and on this machine's fastest path the same up to the float rounding of the other kernels."""
    from blobstore.convert import convert
    from blobstore.runtime import kernels, load

    convert(checkpoints("gemma3"), tmp_path / "p.blob", dtype="q8_0", layout=PLANAR, quiet=True)
    convert(checkpoints("gemma3"), tmp_path / "i.blob", dtype="q8_0", layout="interleave8", quiet=True)
    for name, expected in (("p.blob", PLANAR), ("i.blob", INTERLEAVE8)):
        with blobstore.open(tmp_path / name) as r:
            assert {info.layout for info in r.infos() if info.dtype is blobstore.DType.Q8_0} == {expected}
    ids = list(range(3, 40))
    fastest = kernels.get_isa()

    def logits(name: str) -> np.ndarray:
        with load(tmp_path / name) as model:
            return model.forward(ids)

    interleaved = logits("i.blob")
    kernels.set_isa("scalar")
    try:
        planar = logits("p.blob")
        np.testing.assert_array_equal(logits("i.blob"), planar)
    finally:
        kernels.set_isa(fastest)
    assert np.abs(interleaved - planar).max() <= 1e-3 * np.abs(planar).max()
