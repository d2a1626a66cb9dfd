"""`blob-pack convert`: argparse setup and handler (wired into blobstore/cli.py by add_parser)."""
from __future__ import annotations

import argparse
import sys

from . import convert
from ..format import INTERLEAVE8, INTERLEAVED, DType, layouts_of
from .plan import DTYPE_CHOICES, KEEP, WEIGHT_DTYPES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `convert` subcommand to blob-pack's subparsers; it runs `run(args)`."""
    parser = subparsers.add_parser(
        "convert", help="convert a Hugging Face model (folder or Hub id) or a GGUF file into a blob file",
        description="Convert SRC — a Hugging Face model folder (config.json, model.safetensors or shards with "
                    "model.safetensors.index.json, tokenizer files), a .gguf file, or a Hugging Face Hub id "
                    "such as google/gemma-3-270m — into one blob file. Before any tensor is converted, "
                    "everything loading the file will need is checked: the config, the tokenizer, and every "
                    "tensor (unmapped, missing or mis-shaped); all problems are reported together and nothing "
                    "is written. The output appears only when complete.",
    )
    parser.add_argument("src", metavar="SRC",
                        help="Hugging Face model folder, .gguf file, or Hub id (org/name) when no such local path "
                             "exists: read from the local Hugging Face cache (HF_HUB_CACHE / HF_HOME), downloading "
                             "what is missing unless offline; needs pip install 'blobstore-runtime[hub]'")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.blob", help="the blob file to write")
    parser.add_argument("--dtype", choices=(KEEP, *DTYPE_CHOICES), default=None,
                        help="stored type of 2-D weight matrices (norms and biases stay f32). Default: keep for a "
                             "GGUF — each matrix keeps its GGUF type, bytes unchanged, where the kernels multiply "
                             "it, and is re-quantized to the nearest type that runs otherwise (one warning names "
                             "them; docs/CONVERT.md has the table); q8_0 for a Hugging Face model, where keep "
                             "means its float type (f32, f16 or bf16). q4_k_m / q5_k_m: llama.cpp-style mixes, "
                             "q4_k / q5_k with the most sensitive matrices in q6_k")
    parser.add_argument("--strict", action="store_true",
                        help="with --dtype keep, refuse a GGUF whose matrices cannot all keep their type instead "
                             "of re-quantizing them")
    parser.add_argument("--keep-f32", nargs="+", action="extend", default=[], metavar="PATTERN",
                        help="keep stored tensors whose name matches any of these shell patterns in f32, "
                             "e.g. 'layers.0.*' 'lm_head'")
    parser.add_argument("--embed-dtype", choices=(KEEP, *WEIGHT_DTYPES), default=None, metavar="D",
                        help="stored type of the embedding and output head (a tied head shares it). Default: "
                             "q8_0 when --dtype is 4-bit (q4_0, q4_k_m), since the head's rounding error decides the "
                             "top token and it costs ~4 bits more per weight of that one matrix; q6_k under "
                             "q5_k_m; otherwise as --dtype")
    parser.add_argument("--layout", choices=layouts_of(DType.Q8_0), default=INTERLEAVE8,
                        help=f"how {'/'.join(INTERLEAVED)} tensors are arranged: interleave8 (rows in groups of "
                             "eight, block by block: the tile the matrix kernels read fastest; needs a reader of "
                             "format 1.2 for q8_0, 1.3 for q4_0 and q5_0) or planar (row after row, as format 1.0 stores "
                             "them). Default: interleave8"),
    parser.add_argument("--text-only", action="store_true",
                        help="leave out a vision tower and projector (the summary says how many tensors)")
    parser.add_argument("--allow-unknown", action="store_true",
                        help="keep source tensors that map to nothing under 'extra.<source name>' instead of failing")
    parser.add_argument("--align", type=int, default=4096, metavar="N",
                        help="blob alignment in bytes: a power of two, at least 64 (default 4096)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT.blob if it exists")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check of a conversion (config, tokenizer, tensors), print the mapping plan "
                             "(source name -> stored name, dtype, shape) and write nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    hub = parser.add_argument_group("Hub ids (SRC given as org/name)")
    hub.add_argument("--revision", metavar="REV", default=None,
                     help="branch, tag or commit of the Hub repo to convert (default: main)")
    hub.add_argument("--offline", action="store_true",
                     help="use only the local Hugging Face cache, never the network (as HF_HUB_OFFLINE=1 does)")
    hub.add_argument("--gguf-file", metavar="NAME", default=None,
                     help="the .gguf file to convert from a repo of GGUF files (needed when it holds several)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    """Run `blob-pack convert`; returns the exit status (1 with one message listing every problem).

    ValueError covers ConversionError (config and tokenizer problems included) and the writer's
    errors, which all name the file or tensor at fault.
    """
    try:
        summary = convert(args.src, args.output, dtype=args.dtype, embed_dtype=args.embed_dtype,
                          keep_f32=args.keep_f32, text_only=args.text_only, allow_unknown=args.allow_unknown,
                          align=args.align, force=args.force, dry_run=args.dry_run, quiet=args.quiet,
                          revision=args.revision, offline=args.offline, gguf_file=args.gguf_file, strict=args.strict,
                          layout=args.layout,
                          log=lambda line: print(line, file=sys.stdout if args.dry_run else sys.stderr))
    except (ValueError, OSError) as error:
        print(f"blob-pack convert: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("blob-pack convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not args.quiet or args.dry_run:
        print(summary.format())
    return 0
