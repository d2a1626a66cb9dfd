"""Handcrafted corrupt files: one case per validation rule of the reader.

Each case starts from a valid file, breaks exactly one thing (fixing up every CRC it does not
target, see blobfile.BlobImage), and asserts the specific FormatError subclass and that the
message names the file and the field or tensor at fault.
"""
import subprocess
import sys
from pathlib import Path

import pytest

import blobstore
from blobstore import cli
from blobstore.errors import (
    ChecksumMismatch, CorruptHeader, CorruptManifest, InvalidTensor, InvalidTie, NotABlobFile, TruncatedFile,
    UnsupportedFeature, UnsupportedVersion,
)
from blobstore.format import FILE_ALIGN, MAX_MANIFEST_SIZE
from blobfile import BlobImage, blob_ranges, flip_byte, write_sample

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 536870912\n")


# ---- ways to break a file: each returns a function BlobImage -> file bytes ----

def header(**fields):
    """Header (and footer) fields set to values; callables get the image and return the value."""
    return lambda image: image.to_bytes(**{k: v(image) if callable(v) else v for k, v in fields.items()})


def raw(transform):
    """The whole valid file's bytes passed through `transform`."""
    return lambda image: transform(image.to_bytes())


def manifest_text(old: bytes, new: bytes):
    """The manifest's raw JSON text with its first `old` replaced by `new` (CRCs fixed up)."""
    def build(image):
        assert old in image.manifest, old
        image.manifest = image.manifest.replace(old, new, 1)
        return image.to_bytes()
    return build


def manifest(change):
    """The manifest document edited by `change(document)` (CRCs fixed up)."""
    return lambda image: image.edit(change).to_bytes()


def tensor_fields(tensor, **fields):
    """Fields of the record of `tensor` set to values, or to value(record, image) for callables."""
    def build(image):
        document = image.document
        record = next(t for t in document["tensors"] if t["name"] == tensor)
        record.update({k: v(record, image) if callable(v) else v for k, v in fields.items()})
        image.document = document
        return image.to_bytes()
    return build


def drop_field(name, field):
    return manifest(lambda document: next(t for t in document["tensors"] if t["name"] == name).pop(field))


def add_records(*records):
    return manifest(lambda d: d["tensors"].extend(records))


def shifted_manifest(by):
    """The manifest moved `by` bytes further into the file, the header pointing at it (CRCs fixed up)."""
    def build(image):
        image.body += bytes(by)
        return image.to_bytes(manifest_offset=image.fields["manifest_offset"] + by)
    return build


def require_new_tensor_kind(document):
    """What a later format version could write: a record of a new dtype with a new field, announced by a
    features_required entry; a reader must name that feature, not trip over the record."""
    document["features_required"].append({"name": "iq4_xs", "since": "1.2"})
    record = next(t for t in document["tensors"] if t["name"] == "proj.q4")
    record.update(dtype="iq4_xs", super_scales_offset=4096)


def tie(name, target):
    return {"name": name, "tie": target, "component": "text", "source": None}


# (id, how to break the file, the error class, fragments the message must contain)
CASES = [
    # -- the header and footer --
    ("bad magic", header(magic=b"GGUF\x03\x00\x00\x00"), NotABlobFile, ["magic"]),
    ("git-lfs pointer", raw(lambda _: LFS_POINTER), NotABlobFile, ["magic", "b'version '"]),
    ("empty file", raw(lambda _: b""), TruncatedFile, ["0 bytes"]),
    ("header cut short", raw(lambda b: b[:40]), TruncatedFile, ["40 bytes", "header"]),
    ("future major version", header(major=2), UnsupportedVersion, ["version 2.0", "major version 1"]),
    ("header CRC", header(header_crc32c=0xDEADBEEF), ChecksumMismatch, ["header CRC32C", "deadbeef"]),
    ("manifest CRC", header(manifest_crc32c=0xDEADBEEF), ChecksumMismatch, ["manifest CRC32C", "deadbeef"]),
    ("truncated by one byte", raw(lambda b: b[:-1]), TruncatedFile, ["file_size", str(FILE_ALIGN - 1)]),
    ("file_size beyond the file", header(file_size=lambda im: im.size + FILE_ALIGN), TruncatedFile, ["file_size"]),
    ("file_size short of the file", header(file_size=lambda im: im.size - FILE_ALIGN), CorruptHeader, ["file_size"]),
    ("extra trailing bytes", raw(lambda b: b + bytes(FILE_ALIGN)), CorruptHeader, ["file_size", "extra bytes"]),
    ("file size not padded to 64 KiB", lambda im: im.to_bytes(length=im.size + 4096), CorruptHeader,
     ["file_size", f"multiple of {FILE_ALIGN}"]),
    ("footer differs", lambda im: im.to_bytes(footer={"minor": 9}), CorruptHeader, ["footer"]),
    ("header_size", header(header_size=128), CorruptHeader, ["header_size", "128"]),
    ("unknown flags", header(flags=1), CorruptHeader, ["flags"]),
    ("alignment not a power of two", header(alignment=96), CorruptHeader, ["alignment", "96"]),
    ("alignment below the minimum", header(alignment=32), CorruptHeader, ["alignment", "32"]),
    ("manifest offset past the end", header(manifest_offset=lambda im: im.size), CorruptHeader, ["manifest_offset"]),
    ("manifest offset inside the header", header(manifest_offset=16), CorruptHeader, ["manifest_offset"]),
    ("manifest offset not a multiple of 64", shifted_manifest(8), CorruptHeader, ["manifest_offset", "multiple of 64"]),
    ("oversized manifest", header(manifest_size=MAX_MANIFEST_SIZE + 1), CorruptManifest,
     ["manifest_size", str(MAX_MANIFEST_SIZE)]),
    ("wrong blob_count", header(blob_count=lambda im: im.fields["blob_count"] + 1), CorruptHeader, ["blob_count"]),
    # -- the manifest as a document --
    ("non-UTF-8 manifest", manifest_text(b'"embed"', b'"emb\xffd"'), CorruptManifest, ["UTF-8"]),
    ("manifest not JSON", manifest_text(b'}}', b'}'), CorruptManifest, ["JSON"]),
    ("NaN in the manifest", manifest_text(b'"layers":1', b'"layers":NaN'), CorruptManifest, ["NaN"]),
    ("Infinity from an overflowing number", manifest_text(b'"layers":1', b'"layers":1e999'), CorruptManifest,
     ["1e999"]),
    ("duplicate JSON keys", manifest_text(b'"metadata":', b'"metadata":{},"metadata":'), CorruptManifest,
     ["duplicate key", "metadata"]),
    ("manifest not an object", manifest_text(b'{"format"', b'[{"format"'), CorruptManifest, ["JSON"]),
    ("manifest section missing", manifest(lambda d: d.pop("tensors")), CorruptManifest, ["'tensors'"]),
    ("format section not an object", manifest(lambda d: d.update(format="blobstore")), CorruptManifest, ["'format'"]),
    ("format name of another format", manifest(lambda d: d["format"].update(name="gguf")), CorruptManifest,
     ["format.name", "'blobstore'", "'gguf'"]),
    ("format name missing", manifest(lambda d: d["format"].pop("name")), CorruptManifest, ["format.name", "None"]),
    ("format major unlike the header's", manifest(lambda d: d["format"].update(major=2)), CorruptManifest,
     ["format.major", "expected 1", "found 2"]),
    ("format minor unlike the header's", manifest(lambda d: d["format"].update(minor=3)), CorruptManifest,
     ["format.minor", "expected 0", "found 3"]),
    ("format major as a bool", manifest(lambda d: d["format"].update(major=True)), CorruptManifest,
     ["format.major", "True"]),
    ("format minor as a float", manifest(lambda d: d["format"].update(minor=0.0)), CorruptManifest,
     ["format.minor", "0.0"]),
    ("unknown required feature", manifest(lambda d: d["features_required"].append({"name": "iq2_xs", "since": "1.4"})),
     UnsupportedFeature, ["'iq2_xs'", "1.4"]),
    ("malformed feature entry", manifest(lambda d: d["features_required"].append("iq2_xs")), CorruptManifest,
     ["features_required"]),
    ("feature without its version", manifest(lambda d: d["features_required"].append({"name": "iq2_xs"})),
     CorruptManifest, ["features_required", "since"]),
    # -- tensor records --
    ("non-ASCII name", tensor_fields("norm", name="normé"), InvalidTensor, ["'normé'", "name"]),
    ("lone surrogate in a name", manifest_text(b'"norm"', b'"n\\ud800rm"'), InvalidTensor, ["name"]),
    ("empty name", tensor_fields("norm", name=""), InvalidTensor, ["name"]),
    ("record not an object", add_records(42), InvalidTensor, ["#8", "name"]),
    ("duplicate names", tensor_fields("norm", name="embed"), InvalidTensor, ["'embed'", "twice"]),
    ("unknown field without a feature", tensor_fields("norm", scale=1.0), CorruptManifest,
     ["'norm'", "'scale'", "features_required"]),
    ("new field and dtype behind a feature", manifest(require_new_tensor_kind), UnsupportedFeature, ["'iq4_xs'", "1.2"]),
    ("missing field", drop_field("norm", "offset"), InvalidTensor, ["'norm'", "offset"]),
    ("unknown dtype", tensor_fields("norm", dtype="iq3_s"), InvalidTensor, ["'norm'", "dtype", "iq3_s"]),
    ("dtype as a number", tensor_fields("norm", dtype=2), InvalidTensor, ["'norm'", "dtype"]),
    ("dimension of 2^62", tensor_fields("embed", shape=[2**62, 40]), InvalidTensor, ["'embed'", "shape"]),
    ("negative dimension", tensor_fields("embed", shape=[-6, 40]), InvalidTensor, ["'embed'", "shape"]),
    ("bool as a dimension", tensor_fields("embed", shape=[True, 40]), InvalidTensor, ["'embed'", "shape"]),
    ("float as a dimension", tensor_fields("embed", shape=[6.0, 40]), InvalidTensor, ["'embed'", "shape"]),
    ("too many dimensions", tensor_fields("embed", shape=[1] * 8 + [6, 40]), InvalidTensor, ["'embed'", "shape"]),
    ("shape not a list", tensor_fields("embed", shape="6x40"), InvalidTensor, ["'embed'", "shape"]),
    ("unaddressable empty shape", tensor_fields("empty", shape=[2**39, 2**39, 0], row_stride=0, nbytes=0),
     InvalidTensor, ["'empty'", "shape"]),
    ("nbytes not shape x dtype", tensor_fields("embed", nbytes=lambda t, _: t["nbytes"] + 64), InvalidTensor,
     ["'embed'", "nbytes", "1152"]),  # 6 rows of 40 f32 padded to 192 bytes
    ("quantized nbytes off by one", tensor_fields("proj.q4", nbytes=lambda t, _: t["nbytes"] - 1), InvalidTensor,
     ["'proj.q4'", "nbytes"]),
    ("unpadded row_stride", tensor_fields("embed", row_stride=160), InvalidTensor, ["'embed'", "row_stride", "192"]),
    ("wrong layout", tensor_fields("proj.q8", layout="rows"), InvalidTensor, ["'proj.q8'", "layout", "planar"]),
    ("crc32c beyond 32 bits", tensor_fields("norm", crc32c=2**32), InvalidTensor, ["'norm'", "crc32c"]),
    ("component not a string", tensor_fields("norm", component=7), InvalidTensor, ["'norm'", "component"]),
    ("component null", tensor_fields("norm", component=None), InvalidTensor, ["'norm'", "component"]),
    ("misaligned offset", tensor_fields("norm", offset=lambda t, _: t["offset"] + 8), InvalidTensor,
     ["'norm'", "offset", "alignment"]),
    ("negative offset", tensor_fields("norm", offset=-64), InvalidTensor, ["'norm'", "offset", "non-negative"]),
    ("offset as a string", tensor_fields("norm", offset="1856"), InvalidTensor, ["'norm'", "offset"]),
    ("offset before the data area", tensor_fields("norm", offset=0), InvalidTensor, ["'norm'", "data area"]),
    ("blob running into the manifest", tensor_fields("embed", offset=lambda _, im: im.fields["manifest_offset"] - 64),
     InvalidTensor, ["'embed'", "data area"]),
    ("blob past the end of the file", tensor_fields("norm", offset=lambda _, im: im.size), InvalidTensor,
     ["'norm'", "data area"]),
    ("overlapping tensors", tensor_fields("proj.q8", offset=lambda t, _: t["offset"] - 64), InvalidTensor,
     ["overlap", "'embed'", "'proj.q8'"]),
    # -- ties --
    ("tie to a missing tensor", tensor_fields("lm_head", tie="nowhere"), InvalidTie, ["'lm_head'", "'nowhere'"]),
    ("tie cycle", add_records(tie("a", "b"), tie("b", "a")), InvalidTie, ["cycle", "a -> b -> a"]),
    ("tie to itself", add_records(tie("a", "a")), InvalidTie, ["cycle", "a -> a"]),
    ("tie target not a string", tensor_fields("lm_head", tie=["embed"]), InvalidTie, ["'lm_head'", "tie"]),
    ("tie with data fields", tensor_fields("lm_head", offset=64), CorruptManifest, ["'lm_head'", "offset"]),
]
CASE_IDS = [case[0] for case in CASES]


@pytest.fixture
def sample(tmp_path):
    return write_sample(tmp_path / "sample.blob")


def broken_file(sample, build) -> Path:
    path = sample.with_name("broken.blob")
    path.write_bytes(build(BlobImage(sample)))
    return path


def test_the_sample_is_valid_and_the_image_round_trips(sample):
    assert BlobImage(sample).to_bytes() == sample.read_bytes()
    with blobstore.open(sample, verify="full") as r:
        assert r.float32("lm_head").shape == (6, 40)


@pytest.mark.parametrize("build, error, fragments", [case[1:] for case in CASES], ids=CASE_IDS)
def test_each_rule_raises_its_own_error_naming_file_and_field(sample, build, error, fragments):
    path = broken_file(sample, build)
    with pytest.raises(blobstore.FormatError) as caught:
        blobstore.open(path)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    for fragment in [str(path), *fragments]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("build", [case[1] for case in CASES], ids=CASE_IDS)
def test_inspect_prints_one_line_and_exits_1(sample, build, capsys):
    path = broken_file(sample, build)
    assert cli.main(["inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"blob-pack: error: {path}: ") and err.count("\n") == 1, err


def damage_two_blobs(path):
    """Flip one byte inside 'embed' and the last byte of 'proj.q4' (its scale plane)."""
    ranges = blob_ranges(path)
    flip_byte(path, ranges["embed"][0] + 100)
    flip_byte(path, ranges["proj.q4"][1] - 1, mask=0x01)


def test_verify_names_every_damaged_blob(sample):
    damage_two_blobs(sample)
    with blobstore.open(sample) as r:  # header-level validation does not read the blobs
        with pytest.raises(ChecksumMismatch) as caught:
            r.verify()
    assert caught.value.damaged == ("embed", "proj.q4")
    for fragment in (str(sample), "2 damaged", "embed", "proj.q4"):
        assert fragment in str(caught.value)
    with pytest.raises(ChecksumMismatch):
        blobstore.open(sample, verify="full")


def test_bytes_in_padding_are_not_covered_by_blob_checksums(sample):
    ranges = sorted(blob_ranges(sample).values())
    gaps = [end for (_, end), (start, _) in zip(ranges, ranges[1:]) if end < start]
    assert gaps, f"the sample should have padding between blobs: {ranges}"
    flip_byte(sample, gaps[0])
    blobstore.open(sample, verify="full").close()


def blob_pack(file, command):
    """`python -m blobstore COMMAND FILE` (= blob-pack), run outside the source tree so that it
    imports the installed package."""
    return subprocess.run([sys.executable, "-m", "blobstore", command, str(file)], cwd=file.parent,
                          capture_output=True, text=True, timeout=120)


def test_cli_verify_exit_status_and_damaged_list(sample):
    good = blob_pack(sample, "verify")
    assert good.returncode == 0 and "OK" in good.stdout, good
    damage_two_blobs(sample)
    bad = blob_pack(sample, "verify")
    assert bad.returncode == 1, bad
    assert "embed" in bad.stderr and "proj.q4" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_cli_inspect_on_a_corrupt_file_has_no_traceback(sample):
    path = broken_file(sample, header(major=2))
    result = blob_pack(path, "inspect")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "UnsupportedVersion" not in result.stderr, result.stderr
    assert "version 2.0" in result.stderr
