"""A blob-file reader written from docs/FORMAT.md alone: the proof that the document is a complete
specification. It uses struct, json and numpy, and nothing of blobstore; tests/test_spec_reader.py
compares what it reads with blobstore.open, value by value and error by error.

Section numbers (§) are those of docs/FORMAT.md.
"""
from __future__ import annotations

import json
import math
import re
import struct

import numpy as np

# §3
MAGIC = b"BLOBST\x00\x1a"
HEADER = struct.Struct("<8sHHIIIQQQQII")
HEADER_FIELDS = ("magic", "major", "minor", "header_size", "alignment", "flags", "blob_count", "file_size",
                 "manifest_offset", "manifest_size", "manifest_crc32c", "header_crc32c")

# §4: name -> (values per block, [(plane element type, elements per block), ...])
TYPES = {
    "f32": (1, [("<f4", 1)]), "f16": (1, [("<f2", 1)]), "bf16": (1, [("<u2", 1)]),
    "q8_0": (32, [("i1", 32), ("<f2", 1)]), "q4_0": (32, [("u1", 16), ("<f2", 1)]),
    "u8": (1, [("u1", 1)]), "i8": (1, [("i1", 1)]), "i32": (1, [("<i4", 1)]), "i64": (1, [("<i8", 1)]),
}
FEATURES = {"tie", "q8_0", "q4_0"}  # §6.1, format 1.0
NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,255}")
DATA_KEYS = {"name", "dtype", "shape", "layout", "row_stride", "offset", "nbytes", "crc32c", "component", "source"}
TIE_KEYS = {"name", "tie", "component", "source"}


class SpecError(Exception):
    """A file the specification says to refuse; `kind` is the error name §7 gives."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _table()


def crc32c(data: bytes) -> int:
    """§1: reflected Castagnoli polynomial, initial value and final XOR 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def rows_and_cols(shape):
    """§5: rows x cols of the stored matrix."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def layout(dtype: str, shape):
    """§5.1 / §5.2: (rows, cols, blocks, row_stride, scale plane offset, nbytes)."""
    rows, cols = rows_and_cols(shape)
    block, planes = TYPES[dtype]
    (element, per_block), *scale = planes
    blocks = -(-cols // block)
    row_stride = round_up(blocks * per_block * np.dtype(element).itemsize, 64)
    if not scale:
        return rows, cols, blocks, row_stride, None, rows * row_stride
    scales_at = rows * row_stride
    return rows, cols, blocks, row_stride, scales_at, scales_at + rows * blocks * np.dtype(scale[0][0]).itemsize


def _is_int(value) -> bool:
    return type(value) is int


def _pairs(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError("number overflows to infinity")
    return value


class SpecFile:
    """A blob file read and validated by the rules of docs/FORMAT.md."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.raw = f.read()
        self.header = self._header()
        self.manifest = self._manifest()
        self.records = self._records()

    # ---- §3 and §7 steps 1-3 ----

    def _header(self) -> dict:
        raw = self.raw
        if raw[:8] != MAGIC:
            if MAGIC.startswith(raw[:8]) and len(raw) < 8:
                raise SpecError("TruncatedFile", "a prefix of the magic")
            raise SpecError("NotABlobFile", "magic")
        if len(raw) < 64:
            raise SpecError("TruncatedFile", "shorter than the header")
        h = dict(zip(HEADER_FIELDS, HEADER.unpack(raw[:64])))
        if h["major"] != 1:
            raise SpecError("UnsupportedVersion", f"major {h['major']}")
        if crc32c(raw[:60]) != h["header_crc32c"]:
            raise SpecError("ChecksumMismatch", "header")
        if h["header_size"] != 64 or h["flags"] != 0:
            raise SpecError("CorruptHeader", "header_size / flags")
        alignment = h["alignment"]
        if not (64 <= alignment <= 1 << 30 and alignment & (alignment - 1) == 0):
            raise SpecError("CorruptHeader", "alignment")
        if h["file_size"] > len(raw):
            raise SpecError("TruncatedFile", "file_size")
        if h["file_size"] != len(raw) or h["file_size"] % 65536:
            raise SpecError("CorruptHeader", "file_size")
        if h["manifest_size"] > 64 * 1024 * 1024:
            raise SpecError("CorruptManifest", "manifest_size")
        self.data_start = round_up(64, alignment)
        start, end = h["manifest_offset"], h["manifest_offset"] + h["manifest_size"]
        if start < self.data_start or end > h["file_size"] - 64 or start % 64:
            raise SpecError("CorruptHeader", "manifest_offset")
        if raw[-64:] != raw[:64]:
            raise SpecError("CorruptHeader", "footer")
        return h

    # ---- §6 and §7 step 4 ----

    def _manifest(self) -> dict:
        h = self.header
        text = self.raw[h["manifest_offset"]:h["manifest_offset"] + h["manifest_size"]]
        if crc32c(text) != h["manifest_crc32c"]:
            raise SpecError("ChecksumMismatch", "manifest")
        try:
            document = json.loads(text.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_no_constant,
                                  parse_float=_float)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise SpecError("CorruptManifest", str(error)) from None
        kinds = {"format": dict, "features_required": list, "tensors": list, "metadata": dict}
        if not isinstance(document, dict) or any(not isinstance(document.get(k), t) for k, t in kinds.items()):
            raise SpecError("CorruptManifest", "top-level keys")
        if len(document["tensors"]) > 1_000_000:
            raise SpecError("CorruptManifest", "too many tensors")
        expected = {"name": "blobstore", "major": h["major"], "minor": h["minor"]}
        for key, value in expected.items():
            found = document["format"].get(key)
            if type(found) is not type(value) or found != value:
                raise SpecError("CorruptManifest", f"format.{key}")
        for feature in document["features_required"]:
            if not (isinstance(feature, dict) and isinstance(feature.get("name"), str)
                    and isinstance(feature.get("since"), str)):
                raise SpecError("CorruptManifest", "features_required entry")
            if feature["name"] not in FEATURES:
                raise SpecError("UnsupportedFeature", feature["name"])
        return document

    # ---- §6.2 and §7 step 5 ----

    def _records(self) -> dict:
        data, ties = {}, {}
        for record in self.manifest["tensors"]:
            name = record.get("name") if isinstance(record, dict) else None
            if not (isinstance(name, str) and NAME.fullmatch(name)) or name in data or name in ties:
                raise SpecError("InvalidTensor", f"name {name!r}")
            if "tie" in record:
                self._check_keys(record, TIE_KEYS, {"name", "tie"})
                if not isinstance(record["tie"], str):
                    raise SpecError("InvalidTie", name)
                ties[name] = record
            else:
                data[name] = self._data_record(record)
        if len(data) != self.header["blob_count"]:
            raise SpecError("CorruptHeader", "blob_count")
        spans = sorted((r["offset"], r["offset"] + r["nbytes"]) for r in data.values() if r["nbytes"])
        if any(start < end for (_, end), (start, _) in zip(spans, spans[1:])):
            raise SpecError("InvalidTensor", "overlap")
        resolved = {}
        for name, record in ties.items():
            seen, target = {name}, record["tie"]
            while target in ties:
                if target in seen:
                    raise SpecError("InvalidTie", "cycle")
                seen.add(target)
                target = ties[target]["tie"]
            if target not in data:
                raise SpecError("InvalidTie", f"{name} -> {target}")
            resolved[name] = dict(data[target], name=name, tie=target, source=record.get("source"),
                                  component=record.get("component", data[target]["component"]))
        return {r["name"]: data.get(r["name"]) or resolved[r["name"]] for r in self.manifest["tensors"]}

    @staticmethod
    def _check_keys(record, allowed, required):
        if set(record) - allowed:
            raise SpecError("CorruptManifest", f"unknown keys {set(record) - allowed}")
        if required - set(record):
            raise SpecError("InvalidTensor", f"missing keys {required - set(record)}")
        if "component" in record and not isinstance(record["component"], str):
            raise SpecError("InvalidTensor", "component")
        if record.get("source") is not None and not isinstance(record["source"], str):
            raise SpecError("InvalidTensor", "source")

    def _data_record(self, record) -> dict:
        self._check_keys(record, DATA_KEYS, DATA_KEYS - {"source"})
        dtype, shape = record["dtype"], record["shape"]
        if not (isinstance(dtype, str) and dtype in TYPES):
            raise SpecError("InvalidTensor", "dtype")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d < 2**40 for d in shape)
                and math.prod(d for d in shape if d) < 2**40):
            raise SpecError("InvalidTensor", "shape")
        if not all(_is_int(record[k]) and record[k] >= 0 for k in ("row_stride", "offset", "nbytes", "crc32c")):
            raise SpecError("InvalidTensor", "integers")
        _, _, _, row_stride, _, nbytes = layout(dtype, shape)
        if record["layout"] != ("rows" if len(TYPES[dtype][1]) == 1 else "planar"):
            raise SpecError("InvalidTensor", "layout")
        if record["row_stride"] != row_stride or record["nbytes"] != nbytes or record["crc32c"] >= 2**32:
            raise SpecError("InvalidTensor", "row_stride / nbytes / crc32c")
        offset = record["offset"]
        if offset % self.header["alignment"] or offset < self.data_start \
                or offset + nbytes > self.header["manifest_offset"]:
            raise SpecError("InvalidTensor", "offset")
        return dict(record, source=record.get("source"), tie=None)

    # ---- reading values (§5) ----

    def blob(self, name: str) -> bytes:
        r = self.records[name]
        return self.raw[r["offset"]:r["offset"] + r["nbytes"]]

    def check_blob_crc(self, name: str) -> bool:
        return crc32c(self.blob(name)) == self.records[name]["crc32c"]

    def stored(self, name: str) -> np.ndarray:
        """A plain tensor's elements as stored (bf16 as its uint16 bits), in the tensor's shape."""
        r = self.records[name]
        (element, _), = TYPES[r["dtype"]][1]
        rows, cols, _, row_stride, _, _ = layout(r["dtype"], r["shape"])
        itemsize = np.dtype(element).itemsize
        matrix = np.frombuffer(self.blob(name), np.uint8).reshape(rows, row_stride)[:, :cols * itemsize]
        return np.ascontiguousarray(matrix).view(element).reshape(r["shape"])

    def float32(self, name: str) -> np.ndarray:
        """The tensor's values as binary32 (§4, §5.2)."""
        r = self.records[name]
        dtype = r["dtype"]
        if dtype == "bf16":
            return (self.stored(name).astype(np.uint32) << 16).view(np.float32)
        if dtype not in ("q8_0", "q4_0"):
            return self.stored(name).astype(np.float32)
        rows, cols, blocks, row_stride, scales_at, nbytes = layout(dtype, r["shape"])
        raw = np.frombuffer(self.blob(name), np.uint8)
        scales = raw[scales_at:nbytes].view("<f2").reshape(rows, blocks).astype(np.float32)
        quants = raw[:scales_at].reshape(rows, row_stride)
        if dtype == "q8_0":
            levels = quants[:, :blocks * 32].view(np.int8).reshape(rows, blocks, 32).astype(np.float32)
        else:
            packed = quants[:, :blocks * 16].reshape(rows, blocks, 16)
            levels = np.concatenate([packed & 0x0F, packed >> 4], axis=2).astype(np.float32) - np.float32(8)
        values = (levels * scales[:, :, None]).reshape(rows, blocks * 32)[:, :cols]
        return np.ascontiguousarray(values).reshape(r["shape"])
