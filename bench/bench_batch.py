"""Batched decoding benchmark: aggregate tokens per second of 1, 2, 4 concurrent streams through
BatchEngine, against one `generate()` call, on one model.

Each stream has its own session and its own --prompt-tokens prompt (bench/quality_corpus.txt from
a different offset) and generates --new-tokens greedy tokens (ignore EOS). A round submits every
stream at once and ends when the last token arrives; aggregate tok/s = streams x new tokens /
wall time (their prefills included: the engine runs newcomers' prompts in its batched steps).
`generate()` is timed the same way, one request in a fresh session. The ratios (N streams / 1 stream, engine-1 / generate) come from the
same run; each figure is the best of --repeats rounds, and the rounds of the configurations take
turns (generate, 1, 2, 4, generate, 1, ...) so that a busy spell on a shared machine does not
fall on one configuration only.

Then, to show where the time goes: the engine's steps in the best round of each stream count
(the steps that prefill, the decode steps, the median time between two steps — the engine
sampling and handing tokens out — and the rest of the wall time: sampling, queues, threads), and
one decode step of n = 1, 2, 4 sequences (run_batch, at position --prompt-tokens)
beside the output head alone (the lm_head matrix product of n rows), best of 5 each. Prints
markdown on stdout. Not a test: nothing here asserts speed.

    blob-pack convert ~/.cache/blobstore/gemma-3-270m-q4_k_m.gguf -o /tmp/g-q8.blob --dtype q8_0
    python bench/bench_batch.py /tmp/g-q8.blob --threads 2 [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import blobstore
from blobstore.runtime import BatchEngine, SamplingParams, kernels, load
from blobstore.runtime.model import bound_matrix

CORPUS = Path(__file__).resolve().parent / "quality_corpus.txt"
GREEDY = SamplingParams(temperature=0)


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def prompts(model, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens: the corpus from different offsets, each after a BOS."""
    body = model.tokenizer.encode(CORPUS.read_text(encoding="utf-8"), add_bos=False)
    return [model.tokenizer.encode("")[:1] + body[50 * i:50 * i + length - 1] for i in range(count)]


class StepClock:
    """Stands in for the engine's transformer: times each batched step, notes whether it fed a
    prompt (a run of more than one token), and times the engine's work between two steps (the
    sampling of the last step's rows, handing their tokens out, admitting newcomers)."""

    def __init__(self, transformer):
        self.transformer, self.steps, self.gaps = transformer, [], []
        self._last_end = None

    def run_batch(self, runs, *args, **kwargs):
        started = time.perf_counter()
        if self._last_end is not None:
            self.gaps.append(started - self._last_end)
        logits = self.transformer.run_batch(runs, *args, **kwargs)
        self._last_end = time.perf_counter()
        self.steps.append((max(len(run) for run in runs) > 1, self._last_end - started))
        return logits


def engine_round(model, engine, ids: list[list[int]], new_tokens: int) -> tuple[float, tuple[list, list]]:
    """(seconds from submitting every prompt at once to the last stream's last token, (the steps
    as (fed a prompt, seconds), the seconds between consecutive steps))."""
    clock = engine.transformer = StepClock(model.transformer)
    started = time.perf_counter()
    streams = [engine.submit(model.new_session(), p, GREEDY, new_tokens) for p in ids]
    counts = [sum(1 for _ in s) for s in streams]
    seconds = time.perf_counter() - started
    assert counts == [new_tokens] * len(ids), counts
    return seconds, (clock.steps, clock.gaps)


def generate_round(model, ids: list[int], new_tokens: int) -> float:
    started = time.perf_counter()
    result = model.generate(ids, session=model.new_session(), max_new_tokens=new_tokens, temperature=0,
                            ignore_eos=True)
    assert len(result.token_ids) == new_tokens
    return time.perf_counter() - started


def step_breakdown(model, path, prompt_length: int, counts) -> list[tuple[int, float, float]]:
    """(n, seconds of one run_batch step of n sequences, seconds of the head's product of n rows)."""
    sessions = [model.new_session() for _ in range(max(counts))]
    for session, ids in zip(sessions, prompts(model, len(sessions), prompt_length)):
        model.transformer.run(ids, session.cache, start=0)
        session.cache.token_ids.extend(ids)
    best = {}
    with blobstore.open(path) as reader:
        head = bound_matrix(reader, "lm_head")
        for _ in range(5):   # n = 1, 2, 4 taking turns, as the rounds above
            for n in counts:
                caches = [s.cache for s in sessions[:n]]
                step = _timed(lambda: model.transformer.run_batch([[5]] * n, caches, [c.length for c in caches]))
                x = np.random.default_rng(0).standard_normal((n, head.cols)).astype(np.float32)
                product = _timed(lambda: kernels.matmul(head, x))
                old = best.get(n, (float("inf"), float("inf")))
                best[n] = (min(old[0], step), min(old[1], product))
    return [(n, *best[n]) for n in counts]


def spread(values) -> str:
    """The slowest of the rounds against the fastest, e.g. '+4%'."""
    return f"+{max(values) / min(values) - 1:.0%}"


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(
        description="Batched decoding benchmark: aggregate tok/s of concurrent streams through "
        "BatchEngine against one generate() call, on one model (markdown on stdout).")
    parser.add_argument("model", type=Path, help="a .blob file (blob-pack convert's output)")
    parser.add_argument("--threads", type=int, default=2, help="kernel threads (default 2)")
    parser.add_argument("--streams", default="1,2,4",
                        help="comma-separated counts of concurrent streams to measure (default 1,2,4)")
    parser.add_argument("--prompt-tokens", type=int, default=64,
                        help="prompt tokens of each stream (default 64)")
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="greedy tokens each stream generates, EOS ignored (default 128)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of every configuration, taking turns; the best is reported (default 3)")
    args = parser.parse_args()
    counts = [int(c) for c in args.streams.split(",")]
    model = load(args.model, threads=args.threads, max_seq_len=args.prompt_tokens + args.new_tokens + 8)
    ids = prompts(model, max(counts), args.prompt_tokens)
    seconds, all_seconds, round_steps = {}, {}, {}
    with BatchEngine(model, max_active=max(counts)) as engine:
        for repeat in range(args.repeats):
            log(f"round {repeat + 1} of {args.repeats} ...")
            rounds = {"generate": lambda: (generate_round(model, ids[0], args.new_tokens), ([], []))}
            rounds.update({n: lambda n=n: engine_round(model, engine, ids[:n], args.new_tokens) for n in counts})
            for key, work in rounds.items():
                took, timed_steps = work()
                all_seconds.setdefault(key, []).append(took)
                if took < seconds.get(key, float("inf")):
                    seconds[key], round_steps[key] = took, timed_steps
    alone = args.new_tokens / seconds["generate"]
    rates = {n: n * args.new_tokens / seconds[n] for n in counts}
    log("step breakdown ...")
    steps = step_breakdown(model, args.model, args.prompt_tokens, counts)

    print(f"{args.model.name}, {args.threads} threads, {args.prompt_tokens}-token prompts, {args.new_tokens} new "
          f"tokens per stream, best of {args.repeats}; path {kernels.cpu_info()['isa']}\n")
    print("| streams | aggregate tok/s | vs 1 stream | per stream tok/s | rounds' spread |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| generate() | {alone:.1f} | | {alone:.1f} | {spread(all_seconds['generate'])} |")
    for n in counts:
        print(f"| {n} | {rates[n]:.1f} | {rates[n] / rates[counts[0]]:.2f}x | {rates[n] / n:.1f} | "
              f"{spread(all_seconds[n])} |")
    print(f"\none stream vs generate(): {rates[counts[0]] / alone:.2f}x\n")
    print("| streams | prefill steps | their seconds | decode steps | ms each | between steps ms | rest of the round |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        timed_steps, gaps = round_steps[n]
        prefill = [t for fed_prompt, t in timed_steps if fed_prompt]
        decode = [t for fed_prompt, t in timed_steps if not fed_prompt]
        rest = seconds[n] - sum(prefill) - sum(decode)
        print(f"| {n} | {len(prefill)} | {sum(prefill):.3f} s | {len(decode)} | {np.mean(decode) * 1e3:.2f} | "
              f"{np.median(gaps) * 1e3:.3f} | {rest:.3f} s |")
    print()
    print("| n | decode step ms | head product ms | head share | ms per sequence |")
    print("|---:|---:|---:|---:|---:|")
    for n, step, product in steps:
        print(f"| {n} | {step * 1e3:.1f} | {product * 1e3:.1f} | {product / step:.0%} | {step * 1e3 / n:.1f} |")


if __name__ == "__main__":
    main()
