"""Fuzz blobstore.open() with damaged and hostile blob files, for as long as you like.

The reader may answer any input with a FormatError (ChecksumMismatch from verify() included) and
nothing else: no other exception, no crash, no hang. Every input is tried twice: as it is, and
with its checksums repaired (blobfile.repair_checksums), so that mutations get past the CRCs to
the checks behind them. A tried file is opened, every tensor it accepts is viewed and converted
to float32, and verify() is called.

Running it by hand
------------------
Pure Python (no extra packages; seeded, so a run can be repeated exactly):

    python tests/fuzz/fuzz_open.py --seconds 14400 --seed 7 --crashes /tmp/blob-crashes

It applies one to three structured mutations per input (byte flips aimed at the header and
manifest, header fields set to boundary values, manifest records rewritten with hostile values,
manifest text spliced, the file cut or extended) to valid seed files, and prints a progress line
every minute.

Coverage-guided, with atheris (`pip install atheris`); arguments after --atheris go to libFuzzer:

    mkdir -p /tmp/blob-corpus
    python tests/fuzz/fuzz_open.py --atheris -max_total_time=14400 -timeout=10 /tmp/blob-corpus

The corpus directory is seeded with valid files on first use; libFuzzer mixes its own byte-level
mutations with the structured ones above, and writes a finding as ./crash-<sha1> (change the
directory with -artifact_prefix=DIR/).

Findings: an input that raised anything but a FormatError, or took over --slow seconds, is saved
as <crashes>/<sha1>.blob with the traceback in <sha1>.txt. A hard crash (a segfault) kills the
process; the input that caused it is the file printed as "scratch" at start-up. Replay one with

    python tests/fuzz/fuzz_open.py --replay /tmp/blob-crashes/<sha1>.blob
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]  # tests/ (blobfile) and the source tree

import blobstore  # noqa: E402
from blobstore.format import HEADER_SIZE, HEADER_STRUCT  # noqa: E402
from blobfile import (  # noqa: E402
    HEADER_FIELDS, BlobImage, make_layout_consistent, read_everything, repair_checksums, write_sample,
)

INTERESTING_INTS = [0, 1, 2, 7, 8, 31, 32, 33, 63, 64, 65, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1,
                    2**32, 2**39, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
HOSTILE_VALUES = [None, True, False, -1, -64, 1.5, float("nan"), float("inf"), "", "f32", "q8_0", "q4_0", "bf16",
                  "u8", "rows", "planar", "embed", "lm_head", "norm", "é", [], [0], [1] * 9, [2**39, 2**39, 0],
                  [0, 2**40 - 1], [-1, 4], [True], {}, {"name": "x"}, *INTERESTING_INTS]
RECORD_FIELDS = ["name", "dtype", "shape", "layout", "row_stride", "offset", "nbytes", "crc32c", "component",
                 "source", "tie", "extra"]
SPLICE_TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"0", b"-", b"1e999", b"NaN", b"\xff", b"\\ud800",
                 b'"name":"x",', b"[" * 64]


def _header_field_offsets():
    """Byte offset and struct code of every header field after the magic, to write values in place."""
    offsets, position = {}, 0
    codes = re.findall(r"\d*[A-Za-z]", HEADER_STRUCT.format.lstrip("<"))  # '8s', 'H', 'H', 'I', ...
    for name, code in zip(HEADER_FIELDS, codes):
        if name != "magic":
            offsets[name] = (position, code)
        position += struct.calcsize("<" + code)
    return offsets


FIELD_LAYOUT = _header_field_offsets()


# ---- mutations: bytes -> bytes, each drawing from `rng` ----

def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    """XOR a few bytes, aimed at the header, the manifest, or anywhere."""
    out = bytearray(data)
    if not out:
        return data
    whole = (0, len(out))
    manifest = _manifest_range(data)
    if manifest is None or manifest[0] == manifest[1]:
        manifest = whole
    for _ in range(rng.randint(1, 8)):
        start, end = rng.choice([(0, min(HEADER_SIZE, len(out))), manifest, whole])
        out[rng.randrange(start, end)] ^= rng.randint(1, 255)
    return bytes(out)


def set_header_field(data: bytes, rng: random.Random) -> bytes:
    """One header field set to a boundary value, or nudged from its current one."""
    if len(data) < HEADER_SIZE:
        return data
    name = rng.choice(list(FIELD_LAYOUT))
    offset, code = FIELD_LAYOUT[name]
    bits = 8 * struct.calcsize("<" + code)
    current = struct.unpack_from("<" + code, data, offset)[0]
    value = rng.choice(INTERESTING_INTS + [current + rng.randint(-64, 64)]) % (1 << bits)
    out = bytearray(data)
    struct.pack_into("<" + code, out, offset, value)
    return bytes(out)


def edit_record(data: bytes, rng: random.Random) -> bytes:
    """One manifest record rewritten: a field set to a hostile value (layout kept consistent
    half the time), the record duplicated, or the records reordered."""
    image, document = _parsed(data)
    if document is None or not isinstance(document.get("tensors"), list) or not document["tensors"]:
        return splice_manifest(data, rng)
    records = document["tensors"]
    record = rng.choice(records)
    action = rng.randrange(4)
    if action == 0:
        records.append(json.loads(json.dumps(record)))
    elif action == 1:
        rng.shuffle(records)
    elif isinstance(record, dict):
        record[rng.choice(RECORD_FIELDS)] = rng.choice(HOSTILE_VALUES)
        if action == 3:
            make_layout_consistent(record)
    image.manifest = json.dumps(document).encode("utf-8")
    return image.to_bytes()


def edit_document(data: bytes, rng: random.Random) -> bytes:
    """A top-level manifest section replaced by a hostile value or an unknown feature."""
    image, document = _parsed(data)
    if document is None:
        return splice_manifest(data, rng)
    key = rng.choice(["format", "features_required", "tensors", "metadata", "extra"])
    document[key] = rng.choice(HOSTILE_VALUES + [[{"name": "q2_k", "since": "1.9"}], [{"since": 1}]])
    image.manifest = json.dumps(document).encode("utf-8")
    return image.to_bytes()


def splice_manifest(data: bytes, rng: random.Random) -> bytes:
    """The manifest text with a slice deleted, duplicated, or replaced by a JSON token."""
    manifest = _manifest_range(data)
    if manifest is None or manifest[1] == manifest[0]:
        return flip_bytes(data, rng)
    start, end = manifest
    text = data[start:end]
    cut = rng.randrange(len(text))
    stop = min(len(text), cut + rng.randint(0, 16))
    replacement = rng.choice([b"", text[cut:stop] * 2, rng.choice(SPLICE_TOKENS)])
    image = BlobImage.from_bytes(data)
    image.manifest = text[:cut] + replacement + text[stop:]
    return image.to_bytes()


def resize(data: bytes, rng: random.Random) -> bytes:
    """The file cut at a random point, or extended with zeros or random bytes."""
    if rng.random() < 0.6 or not data:
        return data[:rng.randrange(len(data) + 1)]
    return data + rng.choice([bytes(rng.choice([1, 64, 65536])), rng.randbytes(rng.randint(1, 256))])


MUTATIONS = [flip_bytes, set_header_field, edit_record, edit_record, edit_document, splice_manifest, resize]


def _manifest_range(data: bytes):
    """[start, end) of the manifest the header points at, if it lies inside `data`."""
    if len(data) < HEADER_SIZE:
        return None
    fields = dict(zip(HEADER_FIELDS, HEADER_STRUCT.unpack_from(data)))
    start, end = fields["manifest_offset"], fields["manifest_offset"] + fields["manifest_size"]
    return (start, end) if HEADER_SIZE <= start <= end <= len(data) else None


def _parsed(data: bytes):
    """(image, manifest document), or (None, None) when the manifest is not JSON in place."""
    if _manifest_range(data) is None:
        return None, None
    image = BlobImage.from_bytes(data)
    try:
        document = json.loads(image.manifest)
    except ValueError:
        return None, None
    return (image, document) if isinstance(document, dict) else (None, None)


def mutate(seed: bytes, rng: random.Random) -> bytes:
    data = seed
    for _ in range(rng.randint(1, 3)):
        data = rng.choice(MUTATIONS)(data, rng)
    return data


# ---- the property ----

def check(data: bytes, scratch: Path):
    """Open `data` as a file and read everything it accepts; only FormatError may escape."""
    for candidate in (data, repair_checksums(data)):
        scratch.write_bytes(candidate)
        try:
            with blobstore.open(scratch) as reader:
                read_everything(reader)
        except blobstore.FormatError:
            pass


def seeds(directory: Path) -> list[bytes]:
    """Valid files to mutate: the shared sample at two alignments."""
    return [write_sample(directory / f"seed-{alignment}.blob", alignment).read_bytes() for alignment in (64, 4096)]


def save_finding(crashes: Path, data: bytes, report: str) -> Path:
    crashes.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()
    (crashes / f"{digest}.txt").write_text(report)
    path = crashes / f"{digest}.blob"
    path.write_bytes(data)
    return path


def run(iterations=None, seconds=None, seed=0, crashes=None, slow=5.0, log=None) -> list[str]:
    """The pure-Python loop: mutate seeds, check each mutant; return a report per finding."""
    rng = random.Random(seed)
    findings = []
    with tempfile.TemporaryDirectory(prefix="blob-fuzz-") as tmp:
        corpus, scratch = seeds(Path(tmp)), Path(tmp) / "scratch.blob"
        if log:
            log(f"scratch: {scratch}")
        started = last_report = time.monotonic()
        count = 0
        while (iterations is None or count < iterations) and (seconds is None or time.monotonic() - started < seconds):
            data = mutate(rng.choice(corpus), rng)
            began = time.monotonic()
            try:
                check(data, scratch)
                elapsed = time.monotonic() - began
                report = f"took {elapsed:.1f} s (limit {slow} s)\n" if elapsed > slow else None
            except Exception:  # anything but a FormatError is a finding
                report = traceback.format_exc()
            if report:
                findings.append(report)
                where = save_finding(crashes, data, report) if crashes else "(not saved: no --crashes)"
                if log:
                    log(f"FINDING #{len(findings)} saved as {where}:\n{report}")
            count += 1
            if log and time.monotonic() - last_report > 60:
                last_report = time.monotonic()
                log(f"{count} inputs, {len(findings)} findings, {count / (last_report - started):.0f} inputs/s")
    if log:
        log(f"done: {count} inputs, {len(findings)} findings")
    return findings


def run_atheris(libfuzzer_args: list[str]):
    import atheris

    atheris.instrument_all()
    tmp = Path(tempfile.mkdtemp(prefix="blob-fuzz-"))
    scratch = tmp / "scratch.blob"
    corpus_dirs = [Path(a) for a in libfuzzer_args if not a.startswith("-")]
    for directory in corpus_dirs:
        if directory.is_dir() and not any(directory.iterdir()):
            for index, data in enumerate(seeds(tmp)):
                (directory / f"seed{index}.blob").write_bytes(data)
    print(f"scratch: {scratch}", file=sys.stderr)

    def custom_mutator(data, max_size, seed):
        rng = random.Random(seed)
        mutant = mutate(data, rng) if rng.random() < 0.5 else atheris.Mutate(data, max_size)
        return mutant[:max_size]

    args = [sys.argv[0], *libfuzzer_args]
    if not any(a.startswith("-max_len=") for a in args):
        args.append("-max_len=262144")  # seeds are 64 KiB files
    atheris.Setup(args, lambda data: check(data, scratch), custom_mutator=custom_mutator)
    atheris.Fuzz()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, help="stop after this long (default: never)")
    parser.add_argument("--iterations", type=int, help="stop after this many inputs")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the pure-Python loop")
    parser.add_argument("--crashes", type=Path, default=Path("blob-fuzz-crashes"), help="where findings go")
    parser.add_argument("--slow", type=float, default=5.0, help="seconds after which an input counts as a hang")
    parser.add_argument("--replay", type=Path, help="check one saved input and show what it raises")
    parser.add_argument("--atheris", nargs=argparse.REMAINDER, help="run under atheris; the rest goes to libFuzzer")
    args = parser.parse_args(argv)
    if args.replay:
        with tempfile.TemporaryDirectory() as tmp:
            check(args.replay.read_bytes(), Path(tmp) / "scratch.blob")
        print(f"{args.replay}: only FormatErrors (or nothing) raised")
        return 0
    if args.atheris is not None:
        run_atheris(args.atheris)
        return 0
    findings = run(args.iterations, args.seconds, args.seed, args.crashes, args.slow,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
