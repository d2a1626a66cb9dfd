"""Train the built-in demo model: a small Gemma 3 on the King James Bible, on the CPU.

The corpus is the text of Debian's `bible-kjv` package (`apt-get install bible-kjv`). The King
James Version (1611) is in the public domain in most of the world (its copyright expired; the
Debian copyright file says so); only in the United Kingdom does the Crown keep a perpetual right,
by letters patent, over printing it.

Everything is seeded: with the default options, a re-run on the same torch version and thread
count rebuilds the committed artifacts.

    nice -n 19 python tools/train_demo_model.py         # 25-40 minutes on 2 shared cores

writes the Hugging Face folder to tests/fixtures/demo-gemma3/ and packs it (q8_0) into
runtime/data/demo.blob. Run it by hand: it is not part of CI.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "demo-gemma3"
BLOB = ROOT / "runtime" / "data" / "demo.blob"

BIBLE_RANGE = "Genesis1:1-Revelation22:21"
VERSE_REFERENCE = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ ")  # "Ge1:1 ", "1Cor13:4 ", "SSol1:1 "
HELD_OUT_SHARE = 0.05  # the last 5 % of verses (Colossians 4:4 to Revelation 22:21) are never trained on
NEWLINE = "\n"         # verses are separated by a newline token, as a reader sees them
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3  # Gemma's special ids

# Gemma's chat format, so model.chat() and blob-run --chat tokenize the turn markers as single tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def add_training_options(p: argparse.ArgumentParser, steps: int, batch: int) -> None:
    """The run's options `train()` reads, shared with train_tiny_checkpoints.py."""
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps (the run length; fixed for reproducibility)")
    p.add_argument("--batch", type=int, default=batch, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence, after the BOS")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--seed", type=int, default=1611, help="seed of the weights and the batches")
    p.add_argument("--threads", type=int, default=2, help="torch threads")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=4096, help="SentencePiece vocabulary size")
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--intermediate", type=int, default=768, help="FFN width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    add_training_options(p, steps=1200, batch=32)
    p.add_argument("--fixture", type=Path, default=FIXTURE, help="where the Hugging Face folder goes")
    p.add_argument("--blob", type=Path, default=BLOB, help="where the packed q8_0 demo goes")
    return p.parse_args(argv)


# ---- corpus and tokenizer ----

def read_verses() -> list[str]:
    """Every verse of the KJV as one line of plain text, in canonical order, references removed."""
    try:
        text = subprocess.run(["bible", "-f", BIBLE_RANGE], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise SystemExit("the `bible` command is missing: apt-get install bible-kjv") from None
    verses = []
    for number, line in enumerate(text.splitlines(), 1):
        if not VERSE_REFERENCE.match(line):
            raise SystemExit(f"bible output line {number}: expected 'Book1:1 text', found {line[:60]!r}")
        verses.append(VERSE_REFERENCE.sub("", line).strip())
    return verses


def train_tokenizer(verses: list[str], vocab_size: int, seed: int) -> bytes:
    """A byte-fallback BPE sentencepiece model with Gemma's special ids and turn markers.

    Trained from memory: with an input file, its (temporary) path would be recorded in the model."""
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(verses), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        user_defined_symbols=[START_OF_TURN, END_OF_TURN, NEWLINE],
        # as Gemma's tokenizer: text is kept exactly (no dummy prefix, no whitespace folding)
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return model.getvalue()


def encode_verses(tokenizer, verses: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One flat token stream (each verse followed by the newline token) and the offset of every verse."""
    newline = tokenizer.piece_to_id(NEWLINE)
    pieces = [ids + [newline] for ids in tokenizer.encode(verses)]
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    return np.fromiter((t for p in pieces for t in p), dtype=np.int64), starts


def windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """BOS + seq_len tokens from each given verse start (one row per start)."""
    rows = np.stack([stream[s:s + seq_len] for s in starts])
    return np.concatenate([np.full((len(starts), 1), BOS_ID), rows], axis=1)


# ---- model ----

def model_config(args) -> transformers.Gemma3TextConfig:
    """Gemma 3 in miniature: 1 KV head, q/k norms, sliding-window layers then one global layer."""
    return transformers.Gemma3TextConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
        query_pre_attn_scalar=64, sliding_window=64, max_position_embeddings=1024,
        layer_types=["sliding_attention"] * (args.layers - 1) + ["full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, tie_word_embeddings=True)


def learning_rate(step: int, args) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to a tenth."""
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def optimizer(model, lr: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm weights stay free)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def train(model, stream, starts, args) -> None:
    rng = np.random.default_rng(args.seed)
    usable = starts[starts + args.seq_len <= len(stream)]
    opt = optimizer(model, args.lr)
    model.train()
    began = time.monotonic()
    for step in range(args.steps):
        batch = torch.from_numpy(windows(stream, rng.choice(usable, args.batch), args.seq_len))
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {learning_rate(step, args):.2e}  "
                  f"{time.monotonic() - began:6.0f} s", flush=True)


# ---- evaluation ----

def evaluation_windows(stream, starts, seq_len) -> np.ndarray:
    """Consecutive, non-overlapping windows over the held-out stream, each from a verse start."""
    rows, position = [], 0
    for start in starts:
        if start >= position and start + seq_len <= len(stream):
            rows.append(start)
            position = start + seq_len
    return windows(stream, np.array(rows), seq_len)


@torch.no_grad()
def held_out_perplexity(model, batches: np.ndarray) -> float:
    """exp(mean next-token loss); every window has the same length, so chunk means weigh by rows."""
    model.eval()
    chunks = np.array_split(batches, max(1, len(batches) // 32))
    losses = [model(input_ids=torch.from_numpy(chunk), labels=torch.from_numpy(chunk)).loss.item() for chunk in chunks]
    return math.exp(np.average(losses, weights=[len(chunk) for chunk in chunks]))


def unigram_perplexity(train_stream, batches: np.ndarray, vocab_size: int) -> float:
    """The baseline: each token predicted by its training frequency (add-one smoothed), same targets."""
    counts = np.bincount(train_stream, minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    return math.exp(-log_p[batches[:, 1:]].mean())


# ---- output ----

def save_folder(model, tokenizer_model: bytes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": model.config.max_position_embeddings}, indent=2) + "\n")
    # sampled by default, mildly: greedy decoding of a model this small loops on a phrase
    transformers.GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=True,
                                  temperature=0.8, top_k=40, top_p=0.95).save_pretrained(folder)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    verses = read_verses()
    split = int(len(verses) * (1 - HELD_OUT_SHARE))
    print(f"{len(verses)} verses: {split} for training, {len(verses) - split} held out", flush=True)
    tokenizer_model = train_tokenizer(verses[:split], args.vocab_size, args.seed)
    tokenizer = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    train_stream, train_starts = encode_verses(tokenizer, verses[:split])
    held_stream, held_starts = encode_verses(tokenizer, verses[split:])
    print(f"{len(train_stream)} training tokens, {len(held_stream)} held-out tokens", flush=True)

    model = transformers.Gemma3ForCausalLM(model_config(args))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    began = time.monotonic()
    train(model, train_stream, train_starts, args)
    minutes = (time.monotonic() - began) / 60

    held = evaluation_windows(held_stream, held_starts, args.seq_len)
    print(f"trained {args.steps} steps in {minutes:.1f} min; held-out perplexity "
          f"{held_out_perplexity(model, held):.2f} vs unigram {unigram_perplexity(train_stream, held, args.vocab_size):.2f} "
          f"({held.shape[0] * args.seq_len} tokens)", flush=True)
    save_folder(model, tokenizer_model, args.fixture)

    from blobstore.convert import convert  # here: training needs only torch and transformers
    args.blob.parent.mkdir(parents=True, exist_ok=True)
    convert(args.fixture, args.blob, dtype="q8_0", force=True, quiet=True)
    print(f"wrote {args.fixture} and {args.blob} ({args.blob.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
