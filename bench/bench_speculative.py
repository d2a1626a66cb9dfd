"""Speculative decoding benchmark: decode tokens per second of plain greedy decoding against prompt
lookup and (with --draft) a draft model, on prompts whose answer repeats the prompt.

Two chat prompts: "summarize" (two paragraphs of bench/quality_corpus.txt, to summarize quoting
it) and "edit code" (a 30-line Python function, to return with a variable renamed). Each mode
generates up to --new-tokens greedy tokens in a fresh session (EOS ends it: the measure is the
answer, not what a model rambles after it); the tokens of every
mode must equal plain decoding's (checked: the run stops otherwise). Decode tok/s is the stats'
figure (tokens after the first / time after the first), best of --repeats rounds; the modes take
turns within a round so that a busy spell on a shared machine does not fall on one mode only.
Prints markdown on stdout: tokens, decode tok/s, the ratio to plain, drafts accepted. Not a test:
nothing here asserts speed.

    python bench/bench_speculative.py                                     (the demo model)
    python bench/bench_speculative.py ~/.cache/blobstore/bench/gemma3-270m-q8_0.blob \\
        --draft ~/.cache/blobstore/bench/gemma3-270m-q4_k_m.blob --threads 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blobstore.runtime import demo, load
from blobstore.runtime.api import DEFAULT_DRAFT_TOKENS

CORPUS = Path(__file__).resolve().parent / "quality_corpus.txt"
CODE = '''def summarize(records, field, limit=None):
    """Count, total, mean, smallest and largest value of `field` over `records`."""
    total = 0.0
    count = 0
    smallest = None
    largest = None
    for record in records:
        if limit is not None and count >= limit:
            break
        value = record.get(field)
        if value is None:
            continue
        value = float(value)
        total = total + value
        count = count + 1
        if smallest is None or value < smallest:
            smallest = value
        if largest is None or value > largest:
            largest = value
    if count == 0:
        raise ValueError(f"no record has a value for {field!r}")
    return {
        "count": count,
        "total": total,
        "mean": total / count,
        "smallest": smallest,
        "largest": largest,
    }
'''


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def chat_prompts(model) -> dict[str, list[int]]:
    text = "\n\n".join(CORPUS.read_text(encoding="utf-8").split("\n\n")[:2])
    requests = {
        "summarize": "Summarize the following text in a few sentences, quoting its key sentences word for word.\n\n"
                     + text,
        "edit code": "Rename the variable `total` to `running_sum` in this Python function and return the whole "
                     "function:\n\n" + CODE,
    }
    return {name: model.tokenizer.encode(model.apply_chat_template([{"role": "user", "content": content}]),
                                         add_bos=False)
            for name, content in requests.items()}


def modes(lookups: list[int], draft) -> dict[str, dict]:
    """mode name → its generate() options."""
    off = dict(draft_tokens=0) if draft is not None else {}
    found = {"plain": off}
    found.update({f"lookup {n}": dict(off, lookup=n) for n in lookups})
    if draft is not None:
        found[f"draft model {DEFAULT_DRAFT_TOKENS}"] = {}
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="a .blob file (default: the demo model)")
    p.add_argument("--draft", default=None, help="a draft .blob of the same vocabulary")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: the performance cores)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per prompt (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration, taking turns; the best counts (default 3)")
    p.add_argument("--lookup", type=int, nargs="+", default=[4, 7], help="draft lengths of prompt lookup")
    args = p.parse_args(argv)
    model = load(args.model or demo.demo_path(), threads=args.threads, max_seq_len=2048, draft=args.draft)
    options = modes(args.lookup, model.draft)
    prompts = chat_prompts(model)
    best, results = {}, {}
    for round_ in range(args.repeats):
        for prompt_name, prompt in prompts.items():
            for mode, mode_options in options.items():
                result = model.generate(prompt, session=model.new_session(), max_new_tokens=args.new_tokens,
                                        temperature=0, **mode_options)
                plain = results.setdefault((prompt_name, "plain"), result)
                if result.token_ids != plain.token_ids:
                    raise SystemExit(f"{prompt_name}, {mode}: the tokens differ from plain decoding's")
                speed = result.stats.decode_tokens_per_second
                if speed > best.get((prompt_name, mode), (0.0,))[0]:
                    best[prompt_name, mode] = speed, result.stats
                log(f"round {round_ + 1} {prompt_name:9} {mode:28} {speed:7.1f} tok/s")
    name = Path(args.model).name if args.model else "demo"
    print(f"\n### Speculative decoding, {name}, greedy, {model.transformer.stack.vocab} vocab"
          f"{', draft ' + Path(args.draft).name if args.draft else ''}\n")
    print("| prompt (tokens) | mode | generated | decode tok/s | × plain | drafts accepted |")
    print("|---|---|---:|---:|---:|---|")
    for prompt_name, prompt in prompts.items():
        plain_speed = best[prompt_name, "plain"][0]
        for mode in options:
            speed, stats = best[prompt_name, mode]
            accepted = (f"{stats.accepted_tokens}/{stats.drafted_tokens} ({stats.acceptance_rate:.0%})"
                        if stats.drafted_tokens else "")
            print(f"| {prompt_name} ({len(prompt)}) | {mode} | {stats.generated_tokens} | {speed:.1f} | "
                  f"{speed / plain_speed:.2f} | {accepted} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
