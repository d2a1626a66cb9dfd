"""blob-run: generate text from a blob file.

    blob-run MODEL -p "Once upon a time" -n 64
    blob-run -p "And God said"                 (the built-in demo model)
    blob-run MODEL --chat                      (interactive)
    blob-run MODEL --prompt-cache sys.session -p "$(cat long-prompt.txt)"   (reuses the prompt's KV rows)
    blob-run MODEL --lookup 4 -p "$(cat code.py) Rename x to count:"       (speculative: prompt lookup)
    blob-run BIG.blob --draft SMALL.blob -p "..."                          (speculative: a draft model)
    blob-run gemma-3-4b.blob --image cat.jpg -p "Describe this image."     (a vision blob: Gemma 3)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .. import FormatError
from . import kernels
from .api import load
from .image_prompt import MARKER
from .kv_cache import ContextFull


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blob-run", description="Generate text with a model packed by blob-pack. Text goes to stdout; "
                                     "load time, the kernel path and speed go to stderr.")
    p.add_argument("model", nargs="?", default=None,
                   help="the .blob file (made with: blob-pack convert SRC -o MODEL.blob); "
                        "without it, the built-in demo model")
    p.add_argument("-p", "--prompt", help="the prompt text; '-' reads it from standard input. "
                                          "Without it, --chat starts an interactive conversation")
    p.add_argument("-n", "--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temp", type=float, default=None,
                   help="sampling temperature; 0 is greedy (default: the model's generation_config, else greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with probability >= P")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than P times the most likely one")
    p.add_argument("--repeat-penalty", type=float, default=None,
                   help="divide the logits of tokens already seen by this (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help=f"compute threads (default: physical performance cores, {kernels.physical_cores()} here)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length to allocate (default: the model's, capped to fit in RAM)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="a system message for --chat")
    p.add_argument("--isa", choices=kernels.available_isas(), default=None,
                   help="force a kernel path (default: the fastest this CPU supports)")
    p.add_argument("--prompt-cache", metavar="FILE", default=None,
                   help="keep the KV cache of the prompt in FILE (a blob file), as llama.cpp's --prompt-cache: "
                        "when FILE exists and was saved from this model, the part of the prompt it already holds "
                        "is not recomputed (the stats say how many tokens were reused); after generating, FILE is "
                        "rewritten with this run's prompt and output. A FILE from another model is an error")
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="speculative decoding by prompt lookup: draft up to N (1..7) tokens per forward from the "
                        "tokens that followed the last few tokens earlier in the prompt or output; the same text at "
                        "--temp 0, the same distribution when sampling; pays off when the answer repeats the "
                        "prompt (summaries, code edits)")
    p.add_argument("--draft", metavar="FILE", default=None,
                   help="speculative decoding with a draft model: a smaller .blob of the same vocabulary proposes "
                        "tokens that MODEL checks in one forward (the same text at --temp 0, the same distribution "
                        "when sampling)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="N",
                   help="tokens the --draft model proposes per forward (1..7, default 4)")
    p.add_argument("--image", metavar="PATH", action="append", default=[],
                   help="an image for the prompt (repeat for several; needs a vision blob, such as a converted "
                        "Gemma3ForConditionalGeneration, and Pillow). Each <start_of_image> in the prompt marks "
                        "where one goes; a prompt without markers gets them at its start. With --chat the "
                        "images open the first user message")
    p.add_argument("--pan-and-scan", action="store_true",
                   help="also show the model crops of long images (transformers' do_pan_and_scan)")
    p.add_argument("--stats-json", action="store_true", help="also print the statistics as one JSON line on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.isa:
        kernels.set_isa(args.isa)
    try:
        model = load(args.model, threads=args.threads, max_seq_len=args.ctx, verbose=True, draft=args.draft)
    except (FormatError, OSError, ValueError) as error:
        print(f"blob-run: error: {error}", file=sys.stderr)
        return 1
    try:
        session = _prompt_cache(model, args.prompt_cache)
    except (ValueError, OSError) as error:   # FormatError, SessionMismatch, ContextFull: all ValueErrors
        print(f"blob-run: error: --prompt-cache: {error}", file=sys.stderr)
        return 1
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                   min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed, session=session,
                   lookup=args.lookup, draft_tokens=args.draft_tokens, pan_and_scan=args.pan_and_scan)
    try:
        if args.chat and args.prompt is None:
            return _interactive(model, args.system, options, args.stats_json, args.prompt_cache, args.image)
        prompt = sys.stdin.read() if args.prompt == "-" else (args.prompt or "")
        if args.chat:
            chunks = model.chat(_messages(args.system, [("user", _with_images(prompt, args.image))]), stream=True,
                                **options)
        elif args.image:
            chunks = model.stream(_with_markers(prompt, len(args.image)), images=args.image, **options)
        else:
            chunks = model.stream(prompt, **options)
        _print_stream(chunks, model, args.stats_json)
        _save_prompt_cache(session, args.prompt_cache)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except ContextFull as error:
        print(f"blob-run: error: {error} (--ctx N sets the context length)", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError) as error:   # ImportError: image input without Pillow
        print(f"blob-run: error: {error}", file=sys.stderr)
        return 1
    return 0


def _prompt_cache(model, path):
    """The session to generate in: the one saved at `path` when it exists, else the model's own."""
    if path is None or not os.path.exists(path):
        return model.session
    return model.load_session(path)


def _save_prompt_cache(session, path):
    if path is None:
        return
    try:
        session.save(path)
    except OSError as error:
        raise OSError(f"--prompt-cache: cannot save the session to {path}: {error.strerror or error}") from None


def _print_stream(chunks, model, stats_json: bool) -> str:
    text = []
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        text.append(chunk.text)
        if chunk.stats is not None:
            print(file=sys.stdout)
            chunk.stats.report()
            if stats_json:
                fields = dict(vars(chunk.stats), prefill_tokens_per_second=chunk.stats.prefill_tokens_per_second,
                              decode_tokens_per_second=chunk.stats.decode_tokens_per_second,
                              finish_reason=chunk.finish_reason)
                print(json.dumps(fields), file=sys.stderr)
            if chunk.stats.context_full:
                _report_full_context(model, chunk.stats)
    return "".join(text)


def _report_full_context(model, stats) -> None:
    print(f"blob-run: the context of {model.max_seq_len} tokens is full: generation stopped after "
          f"{stats.generated_tokens} tokens; --ctx N allocates a longer one (this model takes up to "
          f"{model.config.max_position_embeddings})", file=sys.stderr)


def _with_markers(prompt: str, images: int) -> str:
    """The prompt, with one image marker per image at its start when it has none."""
    return prompt if MARKER in prompt else MARKER * images + prompt


def _with_images(text: str, images: list):
    """A user message's content: the images as image parts, then the text."""
    if not images:
        return text
    return [{"type": "image", "path": path} for path in images] + [{"type": "text", "text": text}]


def _messages(system, turns):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": role, "content": content} for role, content in turns]


def _interactive(model, system, options, stats_json, prompt_cache, images) -> int:
    turns = []
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        turns.append(("user", line if turns else _with_images(line, images)))
        started = time.perf_counter()
        try:
            reply = _print_stream(model.chat(_messages(system, turns), stream=True, **options), model, stats_json)
            _save_prompt_cache(options["session"], prompt_cache)
        except KeyboardInterrupt:
            print(f"\n[interrupted after {time.perf_counter() - started:.1f} s]", file=sys.stderr)
            turns.pop()
            continue
        turns.append(("assistant", reply.strip()))


if __name__ == "__main__":
    sys.exit(main())
