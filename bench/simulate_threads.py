"""Thread scaling of the work split: a decode step and a prefill chunk as planned for 1 .. 16
threads, replayed on simulated threads.

This machine has 2 cores, so 8 and 16 threads cannot be timed here. Instead each step runs under
`kernels.trace_work_split` with its work planned for T threads (`set_threads(T)`): every pool job
runs on the calling thread and each of its work items is timed. The replay hands the items out as
the pool does (in order, each to the first free thread, as the atomic item counter does) to T
simulated threads, and every job ends at a barrier that costs --barrier-us; the time between jobs
(a decode step's per-row ops on the caller, Python) stays serial. Reported per T:

- items per job (the smallest job's count matters: fewer items than threads leaves threads idle),
- balance: the busy share of the threads' time inside jobs (100 % = nobody waits at a barrier),
- speedup over one thread if every item kept its one-thread duration. That is an upper bound: a
  memory-bound decode saturates DRAM bandwidth well before 16 threads, which no split can change;
  the balance is what the split itself decides.

`--slow F` adds hybrid rows: half of the threads run at F times the speed of the others (e.g.
Intel E-cores at about 0.6 of a P-core). At 1 and 2 threads the replayed step time is printed
next to the real one measured here. Prints markdown on stdout; not a test.

    python bench/simulate_threads.py ~/.cache/blobstore/bench/gemma3-270m-q8_0.blob
"""
from __future__ import annotations

import argparse
import heapq
import sys
import time
from pathlib import Path

import numpy as np

from blobstore.runtime import demo, kernels, load

THREADS = (1, 2, 4, 8, 16)


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def traced_jobs(step, repeats: int) -> tuple[list[np.ndarray], float]:
    """(each pool job's item durations in seconds, the step's serial seconds outside jobs), each
    the least of `repeats` traces (the plan is the same every time; a busy machine only adds)."""
    traces = []
    for _ in range(repeats):
        started = time.perf_counter()
        _, times, jobs = kernels.trace_work_split(step)
        total = time.perf_counter() - started
        durations, inside = [], 0.0
        for job in np.unique(jobs):
            at = times[jobs == job]          # its start, one event per item start, its end
            durations.append(np.diff(at[1:]))
            inside += at[-1] - at[0]
        traces.append((durations, total - inside))
    least = [np.min(np.stack(job), axis=0) for job in zip(*(d for d, _ in traces))]
    return least, min(serial for _, serial in traces)


def replay(items: np.ndarray, speeds: list[float]) -> tuple[float, float]:
    """(makespan, busy thread-seconds) of `items` handed out in order to the first free thread."""
    free = [(0.0, t) for t in range(len(speeds))]
    busy = 0.0
    for duration in items:
        at, t = heapq.heappop(free)
        cost = duration / speeds[t]
        busy += cost
        heapq.heappush(free, (at + cost, t))
    return max(at for at, _ in free), busy


def simulate(durations, serial: float, speeds: list[float], barrier: float) -> dict:
    spans = [replay(items, speeds) for items in durations]
    inside = sum(span for span, _ in spans)
    busy = sum(b for _, b in spans)
    one_thread = sum(float(items.sum()) for items in durations) + serial
    step = inside + barrier * len(durations) * (len(speeds) > 1) + serial
    return {"step": step, "balance": busy / (len(speeds) * inside) if inside else 1.0,
            "speedup": one_thread / step, "serial": serial / step,
            "min_items": min(len(items) for items in durations), "jobs": len(durations)}


def measured(step, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def phases(model, prompt_tokens: int):
    """(name, step): one prefill chunk of the prompt, and one decode step after it."""
    prompt = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 64)[:prompt_tokens]
    cache = model.new_session().cache

    def prefill():
        model.transformer.run(prompt, cache, start=0)

    def decode():
        model.transformer.run(prompt[-1:], cache, start=len(prompt))

    prefill()
    return [(f"prefill {len(prompt)} tokens", prefill), ("decode 1 token", decode)]


def report(path: Path, args):
    model = load(path, max_seq_len=args.prompt_tokens + 16)
    print(f"\n### {path.name}\n")
    print("| phase | threads | cores | jobs | fewest items | balance | speedup bound | serial share | "
          "replayed ms | measured ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, step in phases(model, args.prompt_tokens):
        for threads in args.threads:
            kernels.set_threads(threads)
            step()   # warm: workspace grown, pages touched
            durations, serial = traced_jobs(step, args.repeats)
            real = f"{measured(step) * 1e3:.2f}" if threads <= args.cores else ""
            kinds = [("same", [1.0] * threads)]
            if args.slow and threads >= 4:
                kinds.append((f"half at {args.slow}", [1.0] * (threads // 2) + [args.slow] * (threads // 2)))
            for kind, speeds in kinds:
                s = simulate(durations, serial, speeds, args.barrier_us * 1e-6)
                print(f"| {name} | {threads} | {kind} | {s['jobs']} | {s['min_items']} | {s['balance']:.0%} | "
                      f"{s['speedup']:.2f}x | {s['serial']:.0%} | {s['step'] * 1e3:.2f} | {real if kind == 'same' else ''} |")
    kernels.set_threads(args.cores)
    model.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="*", help="blob files (default: the demo model)")
    parser.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=list(THREADS),
                        help="thread counts to plan and replay (default 1,2,4,8,16)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length, and the decode position")
    parser.add_argument("--barrier-us", type=float, default=3.0,
                        help="cost of one job's wake-up and barrier in the replay, microseconds (default 3)")
    parser.add_argument("--slow", type=float, default=0.6,
                        help="speed of the slower half of the threads in the hybrid rows (0 to leave them out)")
    parser.add_argument("--repeats", type=int, default=3, help="traces per step; each item keeps its least time")
    parser.add_argument("--cores", type=int, default=min(2, kernels.physical_cores()),
                        help="thread counts up to this are also timed for real (default: this machine's cores, at most 2)")
    args = parser.parse_args()
    print(f"Work split replay, path {kernels.cpu_info()['isa']}, barrier {args.barrier_us} us per job")
    for path in args.models or [demo.demo_path()]:
        log(f"{path} ...")
        report(path, args)


if __name__ == "__main__":
    main()
