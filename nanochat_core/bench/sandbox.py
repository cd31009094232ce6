"""
Sandbox benchmark (numbers, not a test):

    python -m nanochat_core.bench sandbox [--calls 30] [--against OLD_EXECUTION_PY]

Times run_sandboxed on a trivial program (print(1)) and on one HumanEval-style check-mode call, and prints
the median wall time per call. With --against, another version of nanochat_core/node/sandbox.py (for example
`git show main:nanochat_core/node/sandbox.py > /tmp/old.py`) is loaded beside ours and the two are called in
turn, one call each, so both see the same machine load; the ratio new/old is then the number to quote.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

from nanochat_core.node import sandbox as execution
from nanochat_core.common import NanochatError

_CHECK = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
_CASES = {"trivial": ("print(1)\n", {}),
          "check": ("def add(a, b):\n    return a + b\n", {"check": _CHECK, "entry_point": "add"})}


def _load(path: str):
    spec = importlib.util.spec_from_file_location("nanochat_bench_other_execution", path)
    if spec is None or spec.loader is None:
        raise NanochatError(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m nanochat_core.bench sandbox")
    ap.add_argument("--calls", type=int, default=30, help="calls per version and case")
    ap.add_argument("--against", help="another node/sandbox.py to interleave with ours")
    args = ap.parse_args()
    versions = {"new": execution}
    if args.against:
        versions["old"] = _load(args.against)
    for name, mod in versions.items():
        why = mod.unavailable_reason()
        if why:
            raise NanochatError(f"{name}: {why}")
    for case, (program, kw) in _CASES.items():
        times: dict[str, list[float]] = {name: [] for name in versions}
        for _ in range(args.calls):
            for name, mod in versions.items():
                t0 = time.perf_counter()
                r = mod.run_sandboxed(program, timeout=10, **kw)
                times[name].append(time.perf_counter() - t0)
                if not r.passed:
                    raise NanochatError(f"{name} {case}: {r.status} {r.stderr[-300:]}")
        medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
        line = "  ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items())
        if "old" in medians:
            line += f"  ratio new/old {medians['new'] / medians['old']:.3f}"
        print(f"{case:8s} median of {args.calls}: {line}")
