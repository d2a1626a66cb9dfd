"""blob-pack: write, inspect and verify blob files.

    blob-pack convert SRC -o OUT.blob     a Hugging Face folder or Hub id, or a GGUF file → a blob file
    blob-pack inspect FILE [--json]     what is inside: version, metadata, every tensor
    blob-pack verify FILE               check every checksum (exit 1 names the damaged blobs)
    blob-pack relayout SRC -o OUT --layout L   the same file with its q8_0/q4_0/q5_0 tensors arranged as L
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .convert.cli import add_parser as add_convert_parser
from .errors import ChecksumMismatch, FormatError
from .format import INTERLEAVED, DType, layouts_of
from .reader import open as open_blob
from .relayout import relayout


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except FormatError as error:
        print(f"blob-pack: error: {error}", file=sys.stderr)
        return 1
    except FileNotFoundError as error:
        print(f"blob-pack: error: {error.filename}: no such file", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blob-pack", description="Convert models into blob files, and inspect or verify blob files.")
    parser.add_argument("--version", action="version", version=f"blob-pack {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert_parser(commands)

    inspect = commands.add_parser("inspect", help="show a blob file's header, metadata and tensors",
                                  description="Validate a blob file's header and manifest, then print its "
                                              "version, alignment, metadata summary and a table of tensors.")
    inspect.add_argument("file", help="the .blob file")
    inspect.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    inspect.set_defaults(func=run_inspect)

    verify = commands.add_parser("verify", help="check every blob's CRC32C checksum",
                                 description="Check the header, manifest and every blob's CRC32C. Exit status 0 "
                                             "when all hold, 1 when any is damaged (each one is listed).")
    verify.add_argument("file", help="the .blob file")
    verify.set_defaults(func=run_verify)

    relayout = commands.add_parser("relayout", help=f"rewrite a blob file with its {'/'.join(INTERLEAVED)} tensors "
                                                    "in another layout",
                                   description=f"Check SRC in full, then write it again as OUT with every "
                                               f"{'/'.join(INTERLEAVED)} tensor "
                                               "stored in --layout (planar, or interleave8: the tile the matrix "
                                               "kernels read fastest); everything else is copied unchanged.")
    relayout.add_argument("src", metavar="SRC.blob", help="the blob file to read")
    relayout.add_argument("-o", "--output", required=True, metavar="OUT.blob", help="the blob file to write")
    relayout.add_argument("--layout", required=True, choices=layouts_of(DType.Q8_0),
                          help="planar: rows one after another; interleave8: eight rows block by block")
    relayout.add_argument("--force", action="store_true", help="overwrite OUT.blob if it exists")
    relayout.set_defaults(func=run_relayout)
    return parser


def run_inspect(args) -> int:
    with open_blob(args.file) as reader:
        rows = [_tensor_row(info) for info in reader.infos()]
        if args.json:
            print(json.dumps({"file": args.file, "version": "%d.%d" % reader.version, "alignment": reader.alignment,
                              "file_size": reader.header.file_size, "metadata": reader.metadata,
                              "tensors": rows}, indent=1))
            return 0
        print(f"{args.file}: blob file format {reader.version[0]}.{reader.version[1]}, "
              f"{reader.header.file_size:,} bytes, alignment {reader.alignment}, {len(rows)} tensors")
        for key, value in reader.metadata.items():
            print(f"  {key}: {_summary(value)}")
        _print_table(rows)
    return 0


def run_verify(args) -> int:
    with open_blob(args.file) as reader:
        try:
            reader.verify()
        except ChecksumMismatch as error:
            print(f"blob-pack: {error}", file=sys.stderr)
            return 1
        blobs = sum(1 for info in reader.infos() if info.tie is None)
        print(f"{args.file}: OK — header, manifest and {blobs} blobs match their CRC32C")
    return 0


def run_relayout(args) -> int:
    try:
        changed = relayout(args.src, args.output, args.layout, force=args.force)
    except (ValueError, OSError) as error:
        print(f"blob-pack relayout: error: {error}", file=sys.stderr)
        return 1
    print(f"{args.output}: {changed} {'/'.join(INTERLEAVED)} tensor(s) rewritten as {args.layout}")
    return 0


def _tensor_row(info) -> dict:
    return {"name": info.name, "dtype": info.dtype.label, "layout": info.layout, "shape": list(info.shape),
            "bytes": 0 if info.tie else info.nbytes, "offset": info.offset, "component": info.component,
            "tie": info.tie, "source": info.source}


def _summary(value, width=100) -> str:
    """One line for a metadata value: scalars as they are, dicts by their keys."""
    if isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {_summary(v, 30)}" for k, v in value.items()) + "}"
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 1] + "…"


def _print_table(rows):
    headers = ["name", "dtype", "layout", "shape", "bytes", "offset", "component"]
    cells = [[r["name"], r["dtype"], r["layout"], "x".join(map(str, r["shape"])) or "scalar",
              f"→ {r['tie']}" if r["tie"] else f"{r['bytes']:,}", str(r["offset"]), r["component"]] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    for line in [headers, *cells]:
        print("  ".join(c.ljust(w) if i in (0, 1, 2, 3, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


if __name__ == "__main__":
    sys.exit(main())
