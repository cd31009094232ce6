"""
Tokenizer training stage: byte-level BPE on the first training shards (never the validation shard).

    python -m nanochat_core.stages.tok_train --data DIR --out RUN/tokenizer [--vocab-size 32768]
                                      [--max-chars 2000000000] [--doc-cap 10000]

nanochat's recipe: vocab 2^15, ~2B characters, every document cropped to 10,000 characters (so a few huge
documents cannot dominate the pair statistics). Prints the compression (UTF-8 bytes per token) measured on
the text it trained on, and saves OUT/tokenizer.json atomically.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator

from nanochat_core.common import NanochatError, data_dir, emit, print0, run_main, runs_dir
from nanochat_core.data.dataset import ensure_bundled, iter_training_text
from nanochat_core.data.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer

COMPRESSION_SAMPLE_CHARS = 20_000_000   # bytes/token is measured on (up to) the first 20M training characters


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    ids = tokenizer.encode(texts)
    n_tokens = sum(len(x) for x in ids)
    return sum(len(t.encode("utf-8")) for t in texts) / max(1, n_tokens)


def train(data: str | Path, out: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, max_chars: int = 2_000_000_000,
          doc_cap: int = 10_000) -> dict:
    """Train, save out/tokenizer.json, return the metrics (also emitted as an `eval` event)."""
    if max_chars < 1 or doc_cap < 1:
        raise NanochatError(f"--max-chars and --doc-cap must be positive (got {max_chars}, {doc_cap})")
    t0 = time.time()
    emit("stage_start", stage="tokenizer")
    sample: list[str] = []
    sample_chars = [0]
    last = [0.0]

    def on_chars(seen: int) -> None:
        now = time.time()
        if now - last[0] > 5:
            last[0] = now
            emit("progress", stage="tokenizer", step=seen, total_steps=max_chars, loss=None, tokens_per_sec=None,
                 mfu=None, elapsed_s=round(now - t0, 1), unit="chars")

    def texts() -> Iterator[str]:
        for t in iter_training_text(data, max_chars, doc_cap, on_chars):
            if sample_chars[0] < COMPRESSION_SAMPLE_CHARS:
                sample.append(t)
                sample_chars[0] += len(t)
            yield t

    print0(f"training a {vocab_size:,}-token BPE on up to {max_chars:,} characters of {data} (documents capped at {doc_cap:,})")
    tok = Tokenizer.train_from_iterator(texts(), vocab_size=vocab_size)
    train_s = time.time() - t0
    path = tok.save(out)
    bpt = bytes_per_token(tok, sample)
    metrics = {"vocab_size": tok.get_vocab_size(), "bytes_per_token": round(bpt, 4), "train_seconds": round(train_s, 2),
               "measured_chars": sample_chars[0], "hash": tok.hash}
    if tok.get_vocab_size() < vocab_size:
        print0(f"note: the corpus only supported {tok.get_vocab_size():,} tokens (asked for {vocab_size:,})")
    print0(f"tokenizer: {tok.get_vocab_size():,} tokens, {bpt:.3f} bytes/token on the training text "
           f"({sample_chars[0]:,} chars measured), trained in {train_s:.1f}s -> {path}")
    emit("eval", stage="tokenizer", metrics={k: v for k, v in metrics.items() if k != "hash"})
    emit("stage_end", stage="tokenizer", seconds=round(time.time() - t0, 2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer on the first training shards.")
    ap.add_argument("--data", default=None, help="directory of parquet shards (default: the bundled corpus)")
    ap.add_argument("--out", default=None, help="output directory for tokenizer.json (default: $NANOCHAT_HOME/runs/local/tokenizer)")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--max-chars", type=float, default=2e9, help="characters to train on (nanochat: 2B)")
    ap.add_argument("--doc-cap", type=int, default=10_000, help="crop every document to this many characters")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    data = Path(args.data) if args.data else ensure_bundled(data_dir() / "bundled")
    out = Path(args.out) if args.out else runs_dir() / "local" / "tokenizer"
    train(data, out, args.vocab_size, int(args.max_chars), args.doc_cap)


if __name__ == "__main__":
    run_main(main)
