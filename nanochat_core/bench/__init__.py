"""
Benchmarks (numbers, not tests):  python -m nanochat_core.bench {tokenizer,train,infer,preflight,sandbox} [flags]
Each subcommand lives in its own module of this package; this file only dispatches.
"""
import sys
import importlib

COMMANDS = {
    "tokenizer": "nanochat_core.bench.tokenizer",
    "train": "nanochat_core.bench.train",
    "infer": "nanochat_core.bench.infer",
    "preflight": "nanochat_core.training.preflight",
    "sandbox": "nanochat_core.bench.sandbox",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m nanochat_core.bench {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        sys.exit(2)
    name = sys.argv.pop(1)
    sys.argv[0] = f"nanochat_core.bench {name}"
    importlib.import_module(COMMANDS[name]).main()
