"""
Benchmarks (numbers, not tests):  python -m nanochat_core.bench {tokenizer,train,infer,preflight} [flags]
Each subcommand lives in its own module; this file only dispatches.
"""
import sys

from nanochat_core.common import run_main

COMMANDS = {
    "tokenizer": "nanochat_core.bench_tokenizer",
    "train": "nanochat_core.bench_train",
    "infer": "nanochat_core.bench_infer",
    "preflight": "nanochat_core.preflight",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m nanochat_core.bench {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        sys.exit(2)
    import importlib
    name = sys.argv.pop(1)
    sys.argv[0] = f"nanochat_core.bench {name}"
    importlib.import_module(COMMANDS[name]).main()


if __name__ == "__main__":
    run_main(main)
