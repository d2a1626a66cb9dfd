"""Helpers for tests that damage blob files on purpose.

`BlobImage` takes a valid file apart (header fields, the bytes before the manifest, the manifest)
and puts it back together with the manifest size, file size and both CRCs recomputed, so that a
test changing one field reaches the check for that field instead of stopping at a checksum.
"""
from __future__ import annotations

import json

import numpy as np

import blobstore
from blobstore._native import crc32c
from blobstore.format import HEADER_SIZE, HEADER_STRUCT, DType, layout, padded_file_size

HEADER_FIELDS = ("magic", "major", "minor", "header_size", "alignment", "flags", "blob_count", "file_size",
                 "manifest_offset", "manifest_size", "manifest_crc32c", "header_crc32c")


def write_sample(path, alignment: int = 64):
    """A small valid file: plain, quantized, empty and 0-d tensors, a tie and a file blob."""
    rng = np.random.default_rng(1)
    with blobstore.BlobWriter(path, alignment=alignment) as w:
        w.add("embed", rng.standard_normal((6, 40)).astype(np.float32))
        w.add("proj.q8", rng.standard_normal((3, 70)).astype(np.float32), dtype="q8_0")
        w.add("proj.q4", rng.standard_normal((2, 33)).astype(np.float32), dtype="q4_0")
        w.add("norm", rng.standard_normal(5).astype(np.float32), dtype="bf16")
        w.add("empty", np.zeros((0, 3), np.float16))
        w.add("scalar", np.int64(7))
        w.add_tie("lm_head", "embed")
        w.add_file("tokenizer.json", b'{"vocab": {}}')
        w.metadata["model"] = {"family": "test", "layers": 1}
    return path


def pack_header(fields: dict) -> bytes:
    """The 64 header bytes of `fields`; header_crc32c=None means 'compute the right one'."""
    values = [fields[name] for name in HEADER_FIELDS]
    if fields["header_crc32c"] is None:
        values[-1] = 0
        body = HEADER_STRUCT.pack(*values)[:-4]
        return body + crc32c(body).to_bytes(4, "little")
    return HEADER_STRUCT.pack(*values)


class BlobImage:
    """A blob file in pieces, to be edited and reassembled with its CRCs fixed up."""

    def __init__(self, path):
        self._split(open(path, "rb").read())

    @classmethod
    def from_bytes(cls, raw: bytes) -> "BlobImage":
        image = cls.__new__(cls)
        image._split(raw)
        return image

    def _split(self, raw: bytes):
        self.fields = dict(zip(HEADER_FIELDS, HEADER_STRUCT.unpack(raw[:HEADER_SIZE])))
        offset, size = self.fields["manifest_offset"], self.fields["manifest_size"]
        self.body = raw[:offset]          # header slot, blobs and the padding between them
        self.manifest = raw[offset:offset + size]

    @property
    def document(self) -> dict:
        return json.loads(self.manifest)

    @document.setter
    def document(self, document: dict):
        self.manifest = json.dumps(document, separators=(",", ":")).encode("utf-8")

    def edit(self, change):
        """Apply `change(document)` (which edits the manifest dict in place) and store the result."""
        document = self.document
        change(document)
        self.document = document
        return self

    @property
    def size(self) -> int:
        """The natural (padded) size of the reassembled file."""
        return padded_file_size(len(self.body) + len(self.manifest))

    def to_bytes(self, *, length: int | None = None, footer: dict | None = None, **fields) -> bytes:
        """The file: manifest size/CRC, file size and header CRC recomputed, then `fields` applied.

        `length` lays the file out to that many bytes (footer in the last 64) instead of the
        natural padded size; `footer` overrides fields of the footer only.
        """
        manifest_end = len(self.body) + len(self.manifest)
        length = self.size if length is None else length
        header = dict(self.fields, manifest_size=len(self.manifest), manifest_crc32c=crc32c(self.manifest),
                      file_size=length, header_crc32c=None)
        header.update(fields)
        head = pack_header(header)
        tail = pack_header(dict(header, **footer)) if footer else head
        gap = length - HEADER_SIZE - manifest_end
        return head + self.body[HEADER_SIZE:] + self.manifest + bytes(gap) + tail

    def save(self, path, **options):
        with open(path, "wb") as f:
            f.write(self.to_bytes(**options))
        return path


def make_layout_consistent(record: dict):
    """Recompute a manifest record's row_stride and nbytes from its dtype and shape, when those
    make a computable layout, so that an edited shape or dtype reaches the checks past nbytes."""
    try:
        lay = layout(DType.parse(record["dtype"]), tuple(record["shape"]))
    except (KeyError, TypeError, ValueError):
        return
    record.update(row_stride=lay.row_stride, nbytes=lay.nbytes)


def read_everything(reader):
    """Touch every tensor a reader accepted: info, view, float32 conversion; then every CRC."""
    with np.errstate(all="ignore"):  # damaged bytes may decode to inf or NaN: fine, they are data
        for name in reader.keys():
            reader.info(name)
            reader[name]
            reader.float32(name)
    reader.verify()


def blob_ranges(path) -> dict[str, tuple[int, int]]:
    """Byte range [start, end) of every data blob in a valid file, by tensor name."""
    with blobstore.open(path) as r:
        return {i.name: (i.offset, i.offset + i.nbytes) for i in r.infos() if i.tie is None}


def flip_byte(path, offset: int, mask: int = 0xFF):
    """XOR one byte of the file in place with a non-zero `mask`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ mask]))


def repair_checksums(data: bytes) -> bytes:
    """`data` with the manifest CRC, header CRC and footer recomputed from its other header fields.

    Works on any bytes (a fuzzer's mutant): whatever cannot be repaired is left as it is, so
    mutations past the checksums reach the reader's deeper checks.
    """
    if len(data) < 2 * HEADER_SIZE:
        return data
    fields = dict(zip(HEADER_FIELDS, HEADER_STRUCT.unpack(data[:HEADER_SIZE])))
    start, size = fields["manifest_offset"], fields["manifest_size"]
    if start + size <= len(data):
        fields["manifest_crc32c"] = crc32c(data[start:start + size])
    head = pack_header(dict(fields, header_crc32c=None))
    return head + data[HEADER_SIZE:-HEADER_SIZE] + head
