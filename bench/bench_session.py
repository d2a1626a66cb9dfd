"""Prompt-cache benchmark: a long system prompt prefilled, against the same prompt's session saved
to a blob file and loaded back.

For each model: a --tokens-token prompt (bench/quality_corpus.txt repeated, cut to that length) is
  - prefilled in a new session, with one token sampled (what a first run pays);
  - saved with Session.save (file size, seconds);
  - loaded with Model.load_session (every blob's CRC32C checked, the rows copied into a new cache)
    and then asked for one token after the same prompt: all but its last token are reused.
Best of --repeats for each; the speedup is prefill / (load + first token). The reloaded session's
first token is checked to equal the prefilled one. Prints a markdown table on stdout. Not a test:
nothing here asserts speed.

    python bench/bench_session.py                               # the demo model
    python bench/bench_session.py --model gemma-3-270m-q8_0.blob --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from blobstore.runtime import load
from blobstore.runtime.demo import demo_path

CORPUS = Path(__file__).resolve().parent / "quality_corpus.txt"


def prompt_ids(model, count: int) -> list[int]:
    text = CORPUS.read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text)
    body = model.tokenizer.encode(text, add_bos=False)
    while len(ids) < count:
        ids += body
    return ids[:count]


def best(seconds_of, repeats: int):
    """The fastest of `repeats` runs of seconds_of() -> (seconds, value), and the last value."""
    runs = [seconds_of() for _ in range(repeats)]
    return min(s for s, _ in runs), runs[-1][1]


def timed(work):
    started = time.perf_counter()
    value = work()
    return time.perf_counter() - started, value


def measure(path, tokens: int, repeats: int, threads: int | None) -> dict:
    model = load(path, threads=threads, max_seq_len=tokens + 16)
    ids = prompt_ids(model, tokens)
    greedy = dict(max_new_tokens=1, temperature=0, ignore_eos=True)

    def prefill():
        session = model.new_session()
        seconds, result = timed(lambda: model.generate(ids, session=session, **greedy))
        return seconds, (session, result.token_ids)

    prefill_s, (session, first) = best(prefill, repeats)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "prompt.session"
        save_s, _ = best(lambda: timed(lambda: session.save(file)), repeats)
        load_s, _ = best(lambda: timed(lambda: model.load_session(file)), repeats)

        def reload_and_answer():
            reloaded = model.load_session(file)
            return timed(lambda: model.generate(ids, session=reloaded, **greedy))

        answer_s, answer = best(reload_and_answer, repeats)
        size = os.path.getsize(file)
    if answer.token_ids != first or answer.stats.reused_prompt_tokens != tokens - 1:
        sys.exit(f"{path}: the reloaded session answered {answer.token_ids} reusing "
                 f"{answer.stats.reused_prompt_tokens} tokens; the prefill answered {first}")
    return dict(model=Path(path).name, tokens=tokens, kv=model.kv_dtype, prefill=prefill_s, save=save_s,
                load=load_s, answer=answer_s, size=size, speedup=prefill_s / (load_s + answer_s))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="a .blob file (repeatable; default: the demo model)")
    p.add_argument("--tokens", type=int, default=2000, help="prompt length in tokens (default 2000)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement, best kept (default 3)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    args = p.parse_args(argv)
    print("| model | prompt tokens | KV | prefill + 1 token | save | file | load_session | load + 1 token | speedup |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for path in args.model or [demo_path()]:
        r = measure(path, args.tokens, args.repeats, args.threads)
        print(f"| {r['model']} | {r['tokens']} | {r['kv']} | {r['prefill'] * 1000:.0f} ms | {r['save'] * 1000:.1f} ms | "
              f"{r['size'] / 1e6:.1f} MB | {r['load'] * 1000:.1f} ms | {(r['load'] + r['answer']) * 1000:.1f} ms | "
              f"{r['speedup']:.0f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
