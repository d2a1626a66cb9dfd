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
    # §4 and §5.4, format 1.1: quants, high, sub_scales, scales, mins
    "q4_1": (32, [("u1", 16), ("<f2", 1), ("<f2", 1)]),
    "q5_0": (32, [("u1", 16), ("u1", 4), ("<f2", 1)]),
    "q5_1": (32, [("u1", 16), ("u1", 4), ("<f2", 1), ("<f2", 1)]),
    "q2_k": (256, [("u1", 64), ("u1", 16), ("<f2", 1), ("<f2", 1)]),
    "q3_k": (256, [("u1", 64), ("u1", 32), ("u1", 12), ("<f2", 1)]),
    "q4_k": (256, [("u1", 128), ("u1", 12), ("<f2", 1), ("<f2", 1)]),
    "q5_k": (256, [("u1", 128), ("u1", 32), ("u1", 12), ("<f2", 1), ("<f2", 1)]),
    "q6_k": (256, [("u1", 128), ("u1", 64), ("i1", 16), ("<f2", 1)]),
}
PLANE_NAMES = {  # §4: the planes of the types of §5.4, in order
    "q4_1": ("Q", "d", "m"), "q5_0": ("Q", "H", "d"), "q5_1": ("Q", "H", "d", "m"), "q2_k": ("Q", "S", "d", "m"),
    "q3_k": ("Q", "H", "S", "d"), "q4_k": ("Q", "S", "d", "m"), "q5_k": ("Q", "H", "S", "d", "m"),
    "q6_k": ("Q", "H", "S", "d"),
}
# §5.5-§5.7: the types that may be stored as layout "interleave8", the feature each then requires, and the
# bytes of one block of a group of eight rows in the quant plane
INTERLEAVE8 = {"q8_0": ("interleave8", 256), "q4_0": ("interleave8_q4_0", 128), "q5_0": ("interleave8_q5_0", 128)}
# §6.1: format 1.0, then 1.1, then 1.2 and 1.3
FEATURES = {"tie", "q8_0", "q4_0", *PLANE_NAMES, *(feature for feature, _ in INTERLEAVE8.values())}
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


def layout(dtype: str, shape, kind: str = ""):
    """§5.1 / §5.2 / §5.5-§5.7: (rows, cols, blocks, row_stride, offsets of the planes, nbytes)."""
    rows, cols = rows_and_cols(shape)
    block, planes = TYPES[dtype]
    (element, per_block), *later = planes
    blocks = -(-cols // block)
    if kind == "interleave8":
        groups = -(-rows // 8)
        row_stride = blocks * INTERLEAVE8[dtype][1]
        offsets = [0, groups * row_stride]                      # quants, then q5_0's high plane (§5.7)
        if dtype == "q5_0":
            offsets.append(round_up(offsets[1] + groups * blocks * 32, 64))
        return rows, cols, blocks, row_stride, offsets, offsets[-1] + groups * blocks * 16   # ... then the scales
    row_stride = round_up(blocks * per_block * np.dtype(element).itemsize, 64)
    offsets, end = [0], rows * row_stride
    for element, per_block in later:
        offsets.append(round_up(end, 64))
        end = offsets[-1] + rows * blocks * per_block * np.dtype(element).itemsize
    return rows, cols, blocks, row_stride, offsets, end


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
        default = "rows" if len(TYPES[dtype][1]) == 1 else "planar"
        if record["layout"] not in (default, *(["interleave8"] if dtype in INTERLEAVE8 else [])):
            raise SpecError("InvalidTensor", "layout")
        if record["layout"] == "interleave8" and \
                INTERLEAVE8[dtype][0] not in {f["name"] for f in self.manifest["features_required"]}:
            raise SpecError("CorruptManifest", f"{dtype} interleave8 without its feature")
        _, cols, _, row_stride, _, nbytes = layout(dtype, shape, record["layout"])
        if dtype in PLANE_NAMES and cols % TYPES[dtype][0]:
            raise SpecError("InvalidTensor", "shape: whole blocks")
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

    def planes(self, name: str) -> list[np.ndarray]:
        """§5.2: each plane of a planar quantized tensor as (rows, blocks, elements per block)."""
        r = self.records[name]
        rows, _, blocks, row_stride, offsets, nbytes = layout(r["dtype"], r["shape"], r["layout"])
        raw = np.frombuffer(self.blob(name), np.uint8)
        result = []
        for index, (element, per_block) in enumerate(TYPES[r["dtype"]][1]):
            size = per_block * np.dtype(element).itemsize
            if index == 0:
                plane = raw[:rows * row_stride].reshape(rows, row_stride)[:, :blocks * size]
            else:
                plane = raw[offsets[index]:offsets[index] + rows * blocks * size]
            result.append(np.ascontiguousarray(plane).view(element).reshape(rows, blocks, per_block))
        return result

    def interleaved(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """§5.5-§5.7, byte by byte: an interleave8 tensor's signed levels (rows, blocks, 32) as int32 and
        its float16 scales (rows, blocks, 1)."""
        r = self.records[name]
        dtype = r["dtype"]
        rows, _, blocks, row_stride, offsets, _ = layout(dtype, r["shape"], r["layout"])
        raw = np.frombuffer(self.blob(name), np.uint8)
        row, block, i = np.ix_(np.arange(rows), np.arange(blocks), np.arange(32))
        g, j = row // 8, row % 8
        if dtype == "q8_0":   # §5.5: level 2i' + e at 16i' + 2j + e
            levels = raw[g * row_stride + 256 * block + 16 * (i // 2) + 2 * j + i % 2].view(np.int8).astype(np.int32)
        else:                 # §5.6 / §5.7: run c = i div 8, lane j, byte m = i mod 4, high nibble for i mod 8 >= 4
            byte = raw[g * row_stride + 128 * block + 32 * (i // 8) + 4 * j + i % 4]
            nibble = np.where((i // 4) % 2 == 1, byte >> 4, byte & 15).astype(np.int32)
            if dtype == "q4_0":
                levels = nibble - 8
            else:             # §5.7: the fifth bit at bit t mod 8 of high-plane byte t div 8 of the group block
                t = 32 * (i // 4) + 4 * j + i % 4
                fifth = (raw[offsets[1] + 32 * (g * blocks + block) + t // 8] >> (t % 8)) & 1
                levels = (nibble | fifth.astype(np.int32) << 4) - 16
        scale_at = offsets[-1] + 2 * ((g[..., 0] * blocks + block[..., 0]) * 8 + j[..., 0])
        scales = raw[scale_at] | raw[scale_at + 1].astype(np.uint16) << 8
        return levels, scales.view(np.float16)[..., None]

    def float32(self, name: str) -> np.ndarray:
        """The tensor's values as binary32 (§4, §5.2, §5.4)."""
        r = self.records[name]
        dtype = r["dtype"]
        if dtype == "bf16":
            return (self.stored(name).astype(np.uint32) << 16).view(np.float32)
        if dtype not in ("q8_0", "q4_0", *PLANE_NAMES):
            return self.stored(name).astype(np.float32)
        rows, cols = rows_and_cols(r["shape"])
        if r["layout"] == "interleave8":   # level times scale, both converted to binary32 exactly (§5.2, §5.4)
            levels, scales = self.interleaved(name)
            values = (levels.astype(np.float32) * scales.astype(np.float32)).reshape(rows, -1)
        elif dtype in PLANE_NAMES:
            fields = dict(zip(PLANE_NAMES[dtype], self.planes(name)))
            values = _block_values(dtype, fields).reshape(rows, -1)
        else:
            quants, scales = self.planes(name)
            blocks = scales.shape[1]
            scales = scales.astype(np.float32)
            if dtype == "q8_0":
                levels = quants.astype(np.float32)
            else:
                levels = np.concatenate([quants & 0x0F, quants >> 4], axis=2).astype(np.float32) - np.float32(8)
            values = (levels * scales).reshape(rows, blocks * 32)
        return np.ascontiguousarray(values[:, :cols]).reshape(r["shape"])


# ---- §5.4, formula by formula; index arrays i = 0 .. B - 1 within a block ----

def _low_nibbles_32(Q):
    """Value i's 4 low bits in a 32-block: the low nibble of Q[i] (i < 16), else the high nibble of Q[i - 16]."""
    i = np.arange(32)
    return np.where(i < 16, Q[..., i % 16] & 15, Q[..., i % 16] >> 4).astype(np.int32)


def _fifth_bits_32(H):
    """Bit i of the 4 high bytes read as a little-endian 32-bit word."""
    i = np.arange(32)
    return ((H[..., i // 8] >> (i % 8)) & 1).astype(np.int32)


def _two_bits_256(Q):
    """q2_k / q3_k: (Q[32h + l] >> 2k) & 3 with h = i div 128, k = (i mod 128) div 32, l = i mod 32."""
    i = np.arange(256)
    h, k, l = i // 128, (i % 128) // 32, i % 32
    return ((Q[..., 32 * h + l] >> (2 * k)) & 3).astype(np.int32)


def _nibbles_256(Q):
    """q4_k / q5_k: the low nibble of Q[32c + l] when i mod 64 < 32, else its high nibble; c = i div 64."""
    i = np.arange(256)
    byte = Q[..., 32 * (i // 64) + i % 32]
    return np.where(i % 64 < 32, byte & 15, byte >> 4).astype(np.int32)


def _six_bit_scales_mins(S):
    """q4_k / q5_k's 12 bytes → (sc, mn), 8 each."""
    S = S.astype(np.int32)
    sc = [S[..., s] & 63 if s < 4 else (S[..., s + 4] & 15) | (S[..., s - 4] >> 6) << 4 for s in range(8)]
    mn = [S[..., s + 4] & 63 if s < 4 else (S[..., s + 4] >> 4) | (S[..., s] >> 6) << 4 for s in range(8)]
    return np.stack(sc, axis=-1), np.stack(mn, axis=-1)


def _q3_scales(S):
    """q3_k's 12 bytes → 16 signed scales."""
    S = S.astype(np.int32)
    out = []
    for s in range(16):
        low = S[..., s] & 15 if s < 8 else S[..., s - 8] >> 4
        high = (S[..., 8 + s % 4] >> (2 * (s // 4))) & 3
        out.append((low | high << 4) - 32)
    return np.stack(out, axis=-1)


def _f32(x):
    return np.asarray(x).astype(np.float32)


def _block_values(dtype, f):
    """(rows, blocks, B) binary32 values, in the operation order §5.4 gives."""
    d = _f32(f["d"])                      # (rows, blocks, 1)
    m = _f32(f["m"]) if "m" in f else None
    if dtype in ("q4_1", "q5_0", "q5_1"):
        q = _low_nibbles_32(f["Q"])
        if dtype != "q4_1":
            q = q | _fifth_bits_32(f["H"]) << 4
        if dtype == "q5_0":
            return _f32(q - 16) * d
        return d * _f32(q) + m
    i = np.arange(256)
    if dtype in ("q2_k", "q3_k"):
        low = _two_bits_256(f["Q"])
        if dtype == "q2_k":
            S = f["S"].astype(np.int32)
            sc, mn = (S & 15)[..., i // 16], (S >> 4)[..., i // 16]
            return (d * _f32(sc)) * _f32(low) - (m * _f32(mn))
        bit = (f["H"][..., i % 32] >> (i // 32)) & 1
        q = np.where(bit == 1, low, low - 4)
        return (d * _f32(_q3_scales(f["S"])[..., i // 16])) * _f32(q)
    if dtype in ("q4_k", "q5_k"):
        q = _nibbles_256(f["Q"])
        if dtype == "q5_k":
            q = q | ((f["H"][..., i % 32] >> (i // 32)) & 1).astype(np.int32) << 4
        sc, mn = _six_bit_scales_mins(f["S"])
        return (d * _f32(sc[..., i // 32])) * _f32(q) - (m * _f32(mn[..., i // 32]))
    a, r = i // 128, i % 128
    byte = f["Q"][..., 64 * a + r % 64]
    low = np.where(r < 64, byte & 15, byte >> 4).astype(np.int32)
    high = ((f["H"][..., 32 * a + r % 32] >> (2 * (r // 32))) & 3).astype(np.int32)
    q = (low | high << 4) - 32
    return (d * _f32(f["S"][..., i // 16])) * _f32(q)
