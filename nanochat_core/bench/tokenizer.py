"""
Tokenizer benchmark (numbers, not a test):

    python -m nanochat_core.bench tokenizer [--text FILE | --data DIR] [--mb 8] [--vocab-size 32768] [--threads 8]

Trains our BPE on the text and reports training seconds, then encode throughput (MB of UTF-8 per second)
single-threaded and threaded for three encoders over the SAME vocabulary:
  - ours:        nanochat Tokenizer.encode (a tiktoken Encoding built from our merges, plus list handling)
  - tiktoken:    the bare tiktoken Encoding (what `ours` must match: the wrapper should cost ~nothing)
  - tokenizers:  the Hugging Face encoder the vocabulary was trained with
and checks that all three give identical ids. Default text: the bundled corpus' training shards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from nanochat_core.common import NanochatError, data_dir
from nanochat_core.data.dataset import ensure_bundled, iter_training_text
from nanochat_core.data.tokenizer import Tokenizer
from rich.console import Console
from rich.table import Table


def _load_text(args: argparse.Namespace) -> list[str]:
    limit = int(args.mb * 1e6)
    if args.text:
        p = Path(args.text)
        if not p.is_file():
            raise NanochatError(f"--text {p} is not a file")
        raw = p.read_text(encoding="utf-8", errors="replace")[:limit]
        docs = [d for d in raw.split("\n\n") if d]   # paragraphs stand in for documents
    else:
        data = Path(args.data) if args.data else ensure_bundled(data_dir() / "bundled")
        docs = list(iter_training_text(data, limit, 10_000))
    if not docs:
        raise NanochatError("no text to benchmark on")
    return docs


def _best_times(fns: dict, repeat: int) -> dict[str, float]:
    """Best wall time of each function, taking turns (a, b, c, a, b, c, ...) so that a noisy, shared
    machine slows every contender alike instead of whichever happened to run during the noise."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nanochat_core.bench tokenizer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", help="a UTF-8 text file (default: the bundled corpus)")
    ap.add_argument("--data", help="a directory of parquet shards (default: the bundled corpus)")
    ap.add_argument("--mb", type=float, default=8.0, help="megabytes of text to use")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])


    docs = _load_text(args)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(iter(docs), vocab_size=args.vocab_size)
    train_s = time.perf_counter() - t0

    enc = tok._enc            # the bare tiktoken Encoding inside our tokenizer
    hf = tok.hf_tokenizer()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    single = {
        "ours": lambda: [tok.encode(d) for d in docs],
        "tiktoken": lambda: [enc.encode_ordinary(d) for d in docs],
        "tokenizers": lambda: [hf.encode(d, add_special_tokens=False).ids for d in docs],
    }
    threaded = {
        "ours": lambda: tok.encode(docs, num_threads=args.threads),
        "tiktoken": lambda: enc.encode_ordinary_batch(docs, num_threads=args.threads),
        "tokenizers": lambda: [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)],  # its own thread pool
    }
    ids = {name: fn() for name, fn in threaded.items()}
    identical = ids["ours"] == ids["tiktoken"] == ids["tokenizers"]
    n_tokens = sum(len(x) for x in ids["ours"])
    t_single, t_threaded = _best_times(single, args.repeat), _best_times(threaded, args.repeat)
    results = {
        "text_mb": round(mb, 2), "documents": len(docs), "vocab_size": tok.get_vocab_size(),
        "train_seconds": round(train_s, 2), "train_mb_per_s": round(mb / train_s, 2),
        "bytes_per_token": round(mb * 1e6 / n_tokens, 3), "identical_ids": identical, "threads": args.threads,
        "encode_mb_per_s": {
            name: {"single": round(mb / t_single[name], 2), "threaded": round(mb / t_threaded[name], 2)}
            for name in single
        },
    }
    if args.json:
        print(json.dumps(results))
        return
    con = Console()
    con.print(f"text: {mb:.1f} MB in {len(docs):,} documents; vocab {tok.get_vocab_size():,}; "
              f"{results['bytes_per_token']} bytes/token")
    con.print(f"training: {train_s:.2f} s ({results['train_mb_per_s']} MB/s)")
    t = Table(title=f"encode throughput, MB/s (best of {args.repeat})")
    t.add_column("encoder")
    t.add_column("1 thread", justify="right")
    t.add_column(f"{args.threads} threads", justify="right")
    for name, r in results["encode_mb_per_s"].items():
        t.add_row(name, f"{r['single']:.2f}", f"{r['threaded']:.2f}")
    con.print(t)
    con.print(f"identical ids across encoders: {'yes' if identical else '[red]NO[/]'}")


if __name__ == "__main__":
    from nanochat_core.common import run_main
    run_main(main)
