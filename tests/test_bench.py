"""The benchmarks print numbers, not verdicts; these only check they run end to end on CPU and that what
they print is well formed (a sweep: one JSON line per combination of the comma lists)."""
import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanochat_core.bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_train_sweep_prints_one_json_line_per_combination():
    p = _run("train", "--depth", "1,2", "--attn", "sdpa,reference", "--vocab-size", "512", "--seq-len", "64",
             "--head-dim", "32", "--steps", "1", "--warmup", "0", "--compile", "off")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert sorted((r["depth"], r["attn"]) for r in rows) == [(1, "reference"), (1, "sdpa"), (2, "reference"),
                                                               (2, "sdpa")]
    assert all(r["tokens_per_sec"] > 0 and r["device_batch_size"] >= 1 for r in rows)
    assert "tokens_per_sec" in p.stderr or "tok/s" in p.stderr   # the summary table goes to stderr


def test_tokenizer_bench_compares_against_tiktoken():
    p = _run("tokenizer", "--mb", "0.2", "--vocab-size", "512", "--repeat", "1", "--threads", "1", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["identical_ids"] is True          # our encoder and a bare tiktoken agree id for id
    speeds = out["encode_mb_per_s"]
    assert all(speeds[k]["single"] > 0 for k in ("ours", "tiktoken", "tokenizers"))
    assert out["train_seconds"] > 0 and out["bytes_per_token"] > 1


def test_unknown_benchmark_is_a_usage_error():
    p = _run("nope")
    assert p.returncode == 2 and "usage" in p.stderr
