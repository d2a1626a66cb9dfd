"""Property tests: no damaged or hostile file gets past the reader as anything but a FormatError.

1. Random bytes of a valid file flipped: open() raises a FormatError, or the damage lies inside
   blobs and verify() names exactly those blobs, or it lies in padding that no checksum covers
   and everything still verifies. A file cut short anywhere raises TruncatedFile.
2. Manifest records rewritten with hostile values, the CRCs fixed up so the validation of the
   records themselves is exercised: open() raises a FormatError, or every tensor it accepted can
   be viewed and converted, and verify() either passes or raises ChecksumMismatch.

Derandomized and bounded (about 30 s together) for CI; the open-ended version, to run for hours
by hand, is tests/fuzz/fuzz_open.py (smoke-tested here for a few hundred inputs).
"""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import blobstore
from blobstore.errors import ChecksumMismatch, FormatError, TruncatedFile
from blobstore.format import HEADER_SIZE
from blobfile import BlobImage, make_layout_consistent, read_everything

CI = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STORED_DTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "i32", "u8"]
SMALL_SHAPES = st.lists(st.integers(0, 40), max_size=3).map(tuple)


@st.composite
def tensor_sets(draw):
    """A few named tensors of random stored dtype and small shape, maybe with a tie."""
    count = draw(st.integers(1, 4))
    tensors = [(f"t{i}", draw(st.sampled_from(STORED_DTYPES)), draw(SMALL_SHAPES)) for i in range(count)]
    return tensors, draw(st.booleans())


def write_tensors(path, tensor_set):
    tensors, with_tie = tensor_set
    rng = np.random.default_rng(len(tensors))
    with blobstore.BlobWriter(path, alignment=64) as w:
        for name, dtype, shape in tensors:
            if dtype in ("i32", "u8"):
                array = rng.integers(0, 256, shape).astype(np.int32 if dtype == "i32" else np.uint8)
            else:
                array = rng.standard_normal(shape).astype(np.float32) * 50
            w.add(name, array, dtype=dtype)
        if with_tie:
            w.add_tie("head", tensors[0][0])
    return path


STRUCTURE = ("header", "footer", "manifest")


def regions(path):
    """Byte ranges [start, end) of a valid file that some check covers, by name: the header, the
    footer, the manifest, and every data blob (named after its tensor)."""
    size = path.stat().st_size
    image = BlobImage(path)
    covered = {"header": (0, HEADER_SIZE), "footer": (size - HEADER_SIZE, size),
               "manifest": (len(image.body), len(image.body) + len(image.manifest))}
    with blobstore.open(path) as r:
        covered.update({i.name: (i.offset, i.offset + i.nbytes) for i in r.infos() if i.tie is None})
    return covered


# Where to aim a flip: the header, footer or manifest; some non-empty blob; anywhere (mostly padding).
TARGETS = st.sampled_from(["structure", "blob", "anywhere"])
FLIPS = st.lists(st.tuples(TARGETS, st.integers(0, 2**32), st.integers(1, 255)), min_size=1, max_size=3)


def aim(target, spot, covered, size):
    """A byte offset chosen by `spot` inside a region of kind `target`."""
    names = {"structure": STRUCTURE,
             "blob": [n for n, (start, end) in covered.items() if n not in STRUCTURE and end > start]}
    candidates = [covered[n] for n in names.get(target, ())] or [(0, size)]
    start, end = candidates[spot % len(candidates)]
    return start + spot // len(candidates) % (end - start)


@settings(CI, max_examples=500)
@given(tensor_set=tensor_sets(), flips=FLIPS)
def test_flipped_bytes_raise_format_errors_or_are_named_by_verify(tmp_path_factory, tensor_set, flips):
    path = write_tensors(tmp_path_factory.getbasetemp() / "flip.blob", tensor_set)
    original = path.read_bytes()
    covered = regions(path)
    data = bytearray(original)
    for target, spot, mask in flips:
        data[aim(target, spot, covered, len(data))] ^= mask
    path.write_bytes(data)

    changed = [i for i, (a, b) in enumerate(zip(original, data)) if a != b]  # two flips may cancel
    hit = {name for name, (start, end) in covered.items() if any(start <= i < end for i in changed)}
    if hit & set(STRUCTURE):
        with pytest.raises(FormatError) as caught:
            blobstore.open(path).close()
        event(f"open raised {type(caught.value).__name__}")
        return
    with blobstore.open(path) as r:
        if not hit:  # only padding changed: no checksum covers it, everything must still hold
            event("padding only")
            read_everything(r)
            return
        event("blobs damaged")
        with pytest.raises(ChecksumMismatch) as caught:
            read_everything(r)
        assert set(caught.value.damaged) == hit
        assert all(name in str(caught.value) for name in hit)


@settings(CI, max_examples=100)
@given(tensor_set=tensor_sets(), keep=st.floats(0, 1, exclude_max=True))
def test_a_file_cut_anywhere_raises_truncated_file(tmp_path_factory, tensor_set, keep):
    path = write_tensors(tmp_path_factory.getbasetemp() / "cut.blob", tensor_set)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(TruncatedFile, match="bytes"):
        blobstore.open(path)


# Hostile values for manifest fields: wrong types, boundary integers, huge dimensions.
BOUNDARY_INTS = st.sampled_from([0, 1, 31, 32, 33, 63, 64, 2**31, 2**32, 2**39, 2**40 - 1, 2**40, 2**62, 2**63,
                                 2**64, -1, -64])
DIMS = st.one_of(st.integers(0, 70), BOUNDARY_INTS)
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), BOUNDARY_INTS, st.floats(), st.text(max_size=6),
    st.sampled_from(["f32", "q8_0", "q4_0", "bf16", "rows", "planar", "t0", "t1", "head", "text"]),
    st.lists(DIMS, max_size=10), st.lists(st.none() | st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELDS = st.sampled_from(["name", "dtype", "shape", "layout", "row_stride", "offset", "nbytes", "crc32c",
                          "component", "source", "tie", "extra"])


def mutate_record(document, index, field, value, keep_layout_consistent):
    """Set one field of one record; optionally recompute row_stride/nbytes so they still agree."""
    record = document["tensors"][index % len(document["tensors"])]
    record[field] = value
    if keep_layout_consistent:
        make_layout_consistent(record)


# An edit: (record index, field, value, recompute row_stride/nbytes). Shapes get edits of their
# own, always kept consistent, so that empty and huge shapes reach the checks past nbytes.
EDITS = st.one_of(st.tuples(st.integers(0, 10), FIELDS, HOSTILE, st.booleans()),
                  st.tuples(st.integers(0, 10), st.just("shape"), st.lists(DIMS, max_size=9), st.just(True)))


@settings(CI, max_examples=2500)
@given(tensor_set=tensor_sets(), edits=st.lists(EDITS, min_size=1, max_size=3))
def test_hostile_manifest_records_raise_format_errors_or_read_cleanly(tmp_path_factory, tensor_set, edits):
    path = write_tensors(tmp_path_factory.getbasetemp() / "records.blob", tensor_set)
    image = BlobImage(path)
    document = image.document
    for index, field, value, consistent in edits:
        mutate_record(document, index, field, value, consistent)
    image.manifest = json.dumps(document).encode("utf-8")  # NaN and Infinity written as such
    image.save(path)
    try:
        reader = blobstore.open(path)
    except FormatError as error:
        event(f"open raised {type(error).__name__}")  # --hypothesis-show-statistics: which checks were reached
        return
    event("opened")
    with reader:
        try:
            read_everything(reader)
        except ChecksumMismatch:
            pass  # an offset moved onto other bytes: caught by the CRC, as it should be


def test_fuzz_harness_short_run_has_no_findings():
    from fuzz.fuzz_open import run  # tests/fuzz/fuzz_open.py, the harness to run for hours by hand

    findings = run(iterations=2000, seed=0)
    assert not findings, findings[0]
