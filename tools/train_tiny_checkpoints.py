"""Train the tiny trained checkpoints of the quantization-quality tests: a Llama (untied output head)
and a Qwen3 (tied), 256 wide so the k-quants' 256-value super-blocks fit, on the demo model's
corpus and tokenizer (tools/train_demo_model.py), on the CPU.

Random weights make chaotic networks whose top tokens flip under any rounding (docs/CONVERT.md),
so quantization quality is measured on trained ones: these learn the same King James verses as the
demo model (the same training split; Revelation 21-22, the tests' held-out text, stays unseen).

    nice -n 19 python tools/train_tiny_checkpoints.py    # a few minutes each on 2 shared cores

writes tests/fixtures/tiny-llama/ and tests/fixtures/tiny-qwen3/ (bfloat16 safetensors, the demo
model's tokenizer files). Everything is seeded; run it by hand: it is not part of CI.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as demo  # noqa: E402

FIXTURES = demo.ROOT / "tests" / "fixtures"
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=demo.PAD_ID,
             eos_token_id=demo.EOS_ID, bos_token_id=demo.BOS_ID)
# name → (config class, model class, config overrides)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=64, rope_theta=10000.0)),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="which of " + ", ".join(MODELS))
    demo.add_training_options(p, steps=300, batch=16)
    p.add_argument("--out", type=Path, default=FIXTURES, help="folder for the tiny-<model> folders")
    return p.parse_args(argv)


def build(name: str):
    config_cls, model_cls, extra = MODELS[name]
    config = getattr(transformers, config_cls)(**SHAPE, **extra)
    return getattr(transformers, model_cls)(config)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    verses = demo.read_verses()
    split = int(len(verses) * (1 - demo.HELD_OUT_SHARE))
    tokenizer = spm.SentencePieceProcessor(model_file=str(demo.FIXTURE / "tokenizer.model"))
    train_stream, train_starts = demo.encode_verses(tokenizer, verses[:split])
    held_stream, held_starts = demo.encode_verses(tokenizer, verses[split:])
    held = demo.evaluation_windows(held_stream, held_starts, args.seq_len)
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        model = build(name)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
        began = time.monotonic()
        demo.train(model, train_stream, train_starts, args)
        print(f"{name}: {args.steps} steps in {(time.monotonic() - began) / 60:.1f} min; held-out perplexity "
              f"{demo.held_out_perplexity(model, held):.2f} vs unigram "
              f"{demo.unigram_perplexity(train_stream, held, SHAPE['vocab_size']):.2f}", flush=True)
        folder = args.out / f"tiny-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
        for file in TOKENIZER_FILES:
            shutil.copyfile(demo.FIXTURE / file, folder / file)
        print(f"wrote {folder} ({sum(f.stat().st_size for f in folder.iterdir()) / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
