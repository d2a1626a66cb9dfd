"""Quality of each stored weight type: KL divergence and top-1 agreement with the model's own f32 blob.

A source (the real Gemma 3 270M GGUF, the demo model's checkpoint, or any path `blob-pack convert`
reads) is converted once to f32 and once per requested type with `blob-pack convert`; the same
held-out text (bench/quality_corpus.txt, written for this purpose: prose and a little Python) runs
through `blobstore.runtime` on each blob, and every scored position's next-token distribution is
compared with the f32 blob's: KL(p_f32 || p_type) and whether the top token is the same.

    python bench/bench_quality.py                                  # Gemma 3 270M, q8_0 and q4_0
    python bench/bench_quality.py --source demo --types q8_0,q4_0,q4_0/q4_0
    python bench/bench_quality.py --blob mine=/tmp/x.blob          # also score a blob made elsewhere
    python bench/bench_quality.py --llama-cpp q4_0,q8_0            # and llama.cpp's own requantizations

A type is `DTYPE` or `DTYPE/EMBED` (`--dtype DTYPE --embed-dtype EMBED`). `--blob LABEL=PATH` adds
a blob made by other means (for instance f32 weights quantized and dequantized by an experiment),
scored against the same f32 reference, which must share its tokenizer and vocabulary.

`--llama-cpp TYPES` (a GGUF source only; llama-cpp-python in bench_e2e.py's peer virtualenv) adds,
per type, llama.cpp's own requantization of the source (llama_model_quantize, as llama-quantize
makes it) measured two ways on the same token ids: `llama.cpp T` is llama.cpp running that file
against llama.cpp running its own F32 requantization (what `llama-perplexity --kl-divergence`
reports), and `llama.cpp T weights` is that file converted with `blob-pack convert --dtype f32` and
run by blobstore against the f32 blob (its weights alone, with our runtime and reference).

Scoring follows llama.cpp's `llama-perplexity --kl-divergence` so that figures are comparable with
its tables: the text is cut into chunks of `--ctx` tokens, each run from an empty cache with BOS
first, and only the second half of each chunk is scored (every scored token has at least ctx/2
tokens of context). `--ctx 0` runs the whole text as one sequence and scores every position.
On 2 cores the 270M model takes about 20 s per type (conversion and scoring) and a minute per
llama.cpp type; the example with `--llama-cpp q4_0,q8_0` 3½ minutes from nothing cached.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_e2e import GGML_TYPES, PEER_VENV, quantize_gguf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPUS = HERE / "quality_corpus.txt"


def _fetch_gemma() -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from fetch_gemma3_270m import fetch
    return fetch()


NAMED_SOURCES = {"demo": lambda: ROOT / "tests" / "fixtures" / "demo-gemma3", "gemma-3-270m": _fetch_gemma}


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def convert(source: Path, out: Path, spec: str) -> Path:
    """`blob-pack convert` of `source` to the type spec `DTYPE[/EMBED]`, skipped when `out` exists."""
    if out.exists():
        return out
    dtype, _, embed = spec.partition("/")
    command = [sys.executable, "-m", "blobstore", "convert", str(source), "-o", str(out), "--dtype", dtype, "--quiet"]
    if embed:
        command += ["--embed-dtype", embed]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    log(f"converted {spec} in {time.perf_counter() - started:.0f} s: {out.stat().st_size / 1e6:.0f} MB")
    return out


def chunks(ids: list, ctx: int, bos: int) -> list:
    """(token ids, first scored position) per chunk, as llama-perplexity cuts and scores its text."""
    if ctx == 0:
        return [([bos] + ids, 0)]
    body = ctx - 1
    return [([bos] + ids[i:i + body], ctx // 2) for i in range(0, len(ids) - body + 1, body)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (the KL sums over 262k terms)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def scored_log_probs(blob: Path, pieces: list, threads: int, vocab: int) -> list:
    """Each chunk's scored rows as log-probabilities over the first `vocab` ids (the tokenizer's)."""
    from blobstore.runtime import load
    model = load(blob, threads=threads, max_seq_len=max(len(ids) for ids, _ in pieces) + 1)
    return [log_softmax(model.forward(ids)[first:, :vocab]) for ids, first in pieces]


PEER_LOGITS = r'''
import json, sys, numpy as np, llama_cpp
path, pieces, vocab, threads, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
n_ctx = max(len(ids) for ids, _ in pieces)
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                      n_threads_batch=threads, logits_all=True, verbose=False)
rows = []
for ids, first in pieces:
    llm.reset()
    llm.eval(ids)
    rows.append(np.array(llm.scores[first:len(ids), :vocab], np.float32))
np.save(out, np.concatenate(rows))
'''


def llama_cpp_log_probs(gguf: Path, pieces: list, threads: int, vocab: int, work: Path) -> list:
    """llama.cpp's logits for the same chunks (llama-cpp-python in the peer virtualenv), as scored_log_probs."""
    import json
    out = work / f"{gguf.stem}-logits.npy"
    subprocess.run([str(PEER_VENV / "bin" / "python"), "-c", PEER_LOGITS, str(gguf), json.dumps(pieces), str(vocab),
                    str(threads), str(out)], check=True)
    rows, result, start = np.load(out), [], 0
    out.unlink()
    for ids, first in pieces:
        result.append(log_softmax(rows[start:start + len(ids) - first]))
        start += len(ids) - first
    return result


SOURCE = "source"  # --llama-cpp's name for the GGUF file as it is (no requantization)


def llama_cpp_rows(source: Path, types: list, pieces: list, threads: int, vocab: int, work: Path,
                   reference: list) -> tuple[dict, dict]:
    """Results and sizes of `llama.cpp T` and `llama.cpp T weights` per type (see the module doc)."""
    python = str(PEER_VENV / "bin" / "python")
    stem = source.name.split(".")[0]
    files = {t: source if t == SOURCE else work / f"{stem}-llama-{t}.gguf" for t in ["f32", *types]}
    for t, path in files.items():
        if t != SOURCE:
            quantize_gguf(python, source, path, t)
    own_reference = llama_cpp_log_probs(files["f32"], pieces, threads, vocab, work)
    results, sizes = {}, {}
    for t in types:
        results[f"llama.cpp {t}"] = compare(own_reference, llama_cpp_log_probs(files[t], pieces, threads, vocab, work))
        blob = convert(files[t], work / f"{stem}-llama-{t}-weights-f32.blob", "f32")
        results[f"llama.cpp {t} weights"] = compare(reference, scored_log_probs(blob, pieces, threads, vocab))
        sizes[f"llama.cpp {t}"] = sizes[f"llama.cpp {t} weights"] = files[t].stat().st_size
        log(f"llama.cpp {t}: {results[f'llama.cpp {t}']}; its weights in blobstore: {results[f'llama.cpp {t} weights']}")
    return results, sizes


def compare(reference: list, candidate: list) -> dict:
    """Mean / median KL(reference || candidate) and top-1 agreement over every scored position."""
    kl, same = [], []
    for p_log, q_log in zip(reference, candidate):
        kl.append((np.exp(p_log) * (p_log - q_log)).sum(axis=1))
        same.append(p_log.argmax(axis=1) == q_log.argmax(axis=1))
    kl, same = np.concatenate(kl), np.concatenate(same)
    return dict(mean=float(kl.mean()), median=float(np.median(kl)), p99=float(np.percentile(kl, 99)),
                top1=float(same.mean()), positions=int(kl.size))


def table(source_label: str, results: dict, sizes: dict, positions: int, ctx: int) -> str:
    scoring = f"chunks of {ctx}, second half scored" if ctx else "one sequence, every position"
    lines = [f"KL divergence to the f32 blob, {source_label}, {positions} scored positions ({scoring})", "",
             "| type | size | mean KLD | median KLD | 99th pct KLD | same top token |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {sizes[label] / 1e6:.0f} MB | {r['mean']:.4f} | {r['median']:.4f} | "
                     f"{r['p99']:.3f} | {r['top1']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="gemma-3-270m",
                        help="gemma-3-270m | demo | any path blob-pack convert reads (default gemma-3-270m)")
    parser.add_argument("--types", default="q8_0,q4_0", help="comma-separated DTYPE or DTYPE/EMBED (default q8_0,q4_0)")
    parser.add_argument("--blob", action="append", default=[], metavar="LABEL=PATH", help="also score this blob")
    parser.add_argument("--llama-cpp", default="", metavar="TYPES",
                        help="comma-separated llama.cpp types (q4_0, q8_0, ...) to requantize the GGUF source to and score; "
                             "'source': the GGUF file as it is")
    parser.add_argument("--text", type=Path, default=CORPUS, help="the held-out text (default bench/quality_corpus.txt)")
    parser.add_argument("--ctx", type=int, default=128, help="chunk length; 0 = the whole text, every position scored")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="kernel threads (default 2)")
    parser.add_argument("--workdir", type=Path, help="keep the converted blobs here and reuse them (default: a temp dir)")
    args = parser.parse_args(argv)

    source = NAMED_SOURCES[args.source]() if args.source in NAMED_SOURCES else Path(args.source)
    llama_types = list(filter(None, args.llama_cpp.split(",")))
    unknown = [t for t in llama_types if t not in {*GGML_TYPES, SOURCE} or t == "f32"]
    if unknown:
        parser.error(f"--llama-cpp: unknown type(s) {unknown}; expected some of "
                     f"{sorted(set(GGML_TYPES) - {'f32'})} or {SOURCE!r}")
    if llama_types and source.suffix != ".gguf":
        parser.error(f"--llama-cpp needs a GGUF source, not {source}")
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        stem = source.name.split(".")[0]
        reference_blob = convert(source, work / f"{stem}-f32.blob", "f32")
        blobs = {spec: convert(source, work / f"{stem}-{spec.replace('/', '-e')}.blob", spec)
                 for spec in filter(None, args.types.split(","))}
        for item in args.blob:
            label, _, path = item.partition("=")
            blobs[label] = Path(path)

        from blobstore.runtime import load
        probe = load(reference_blob, max_seq_len=8)
        vocab = min(probe.config.vocab_size, probe.tokenizer.vocab_size)
        ids = probe.tokenizer.encode(args.text.read_text(), add_bos=False)
        pieces = chunks(ids, args.ctx, probe.tokenizer.bos_id)
        del probe
        reference = scored_log_probs(reference_blob, pieces, args.threads, vocab)
        results, sizes = {}, {}
        for label, blob in blobs.items():
            started = time.perf_counter()
            results[label] = compare(reference, scored_log_probs(blob, pieces, args.threads, vocab))
            sizes[label] = blob.stat().st_size
            log(f"{label}: {results[label]} ({time.perf_counter() - started:.0f} s)")
        if llama_types:
            peer_results, peer_sizes = llama_cpp_rows(source, llama_types, pieces, args.threads, vocab, work, reference)
            results.update(peer_results)
            sizes.update(peer_sizes)
        positions = next(iter(results.values()))["positions"] if results else 0
        print(table(source.name, results, sizes, positions, args.ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
