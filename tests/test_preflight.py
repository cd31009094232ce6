"""`python -m nanochat_core.bench preflight` on CPU at toy size (the same checks a GPU machine runs), and the
pipeline's preflight stage through the CLI's local backend: a failed check stops the run with the reason."""
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

PY = sys.executable

# runs preflight in-process, then reports which server-side modules got imported (none may be)
RUN_AND_LIST_IMPORTS = """
import sys
from nanochat_core import bench
sys.argv = ["bench"] + sys.argv[1:]
try:
    bench.main()
finally:
    print("IMPORTED", sorted(m for m in ("fastapi", "uvicorn", "nanochat_core.inference.serve", "sky", "typer") if m in sys.modules))
"""


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("NANOCHAT_PREFLIGHT_FAIL", None)
    env.update(extra)
    return env


@pytest.mark.slow   # ~35 s on an idle 2-core machine: every check, compile on and off
def test_bench_preflight_runs_every_check_on_cpu_and_ends_with_a_verdict():
    # the timeout is a hang guard, not a speed check: 300 s ran out under a load of 18 (the whole matrix compiles)
    p = subprocess.run([PY, "-c", RUN_AND_LIST_IMPORTS, "preflight", "--depth", "4", "--steps", "1"],
                       capture_output=True, text=True, env=_env(), timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == "IMPORTED []"                     # the training stack only: no server, no CLI
    assert lines[-2].startswith("PREFLIGHT PASS: 10 checks, 1 skipped")   # fp8 skips on CPU
    for check in ("train[compile on, flex]", "train[compile on, sdpa]", "train[compile off, flex]",
                  "train[compile off, sdpa]", "bf16 vs fp32 loss", "fp8", "attention vs reference",
                  "decode (batch 1, KV cache)", "core batch (ragged rows)", "checkpoint round trip"):
        row = next(l for l in lines if l.startswith(f"d4 {check} "))
        assert (" skip " if check == "fp8" else " ok ") in row, row


def test_preflight_forced_failure_says_which_check_and_exits_non_zero():
    p = subprocess.run([PY, "-m", "nanochat_core.training.preflight", "--depth", "2", "--matrix", "train", "--steps", "1",
                        "--events"], capture_output=True, text=True, timeout=300,
                       env=_env(NANOCHAT_PREFLIGHT_FAIL="checkpoint"))
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    verdict = [l for l in p.stdout.splitlines() if l.startswith("PREFLIGHT")]
    assert verdict == ["PREFLIGHT FAIL: d2 checkpoint round trip: forced failure (NANOCHAT_PREFLIGHT_FAIL=checkpoint)"]
    from nanochat_core.common import parse_event
    events = [e for e in map(parse_event, p.stdout.splitlines()) if e]
    assert [e["name"] for e in events if e["event"] == "preflight_check" and e["ok"] is False] == \
        ["d2 checkpoint round trip"]
    err = [e for e in events if e["event"] == "error"]
    assert err and err[0]["stage"] == "preflight" and "forced failure" in err[0]["message"]


def test_train_preflight_only_through_the_local_backend_stops_on_a_failed_check(monkeypatch):
    """`nanochat train --local --preflight-only`: the real pipeline runs only its preflight stage; a failed
    check (forced here) ends the run at once, non-zero, with the reason on the stream - no tokenizer, no
    training."""
    from nanochat_cli import state
    from nanochat_cli.main import app
    monkeypatch.setenv("NANOCHAT_PREFLIGHT_FAIL", "train")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = CliRunner().invoke(app, ["train", "--local", "--preflight-only", "--depth", "2"])
    out = r.stdout + r.stderr
    assert r.exit_code != 0, out[-3000:]
    assert "PREFLIGHT FAIL: d2 train[compile off, auto]: forced failure" in out, out[-3000:]
    rd = state.run_dir("local")
    done = json.loads((rd / "stages.json").read_text()) if (rd / "stages.json").exists() else {}
    assert done == {} and not (rd / "tokenizer").exists() and not (rd / "base").exists()


def test_cloud_pipeline_opens_with_preflight_at_the_planned_depth_and_throughput(tmp_path):
    from nanochat_core.stages.pipeline import DEFAULT_STAGES, parse_args, stage_commands
    assert DEFAULT_STAGES["cloud"].split(",")[:2] == ["preflight", "tok"]
    a = parse_args(["--run-dir", str(tmp_path / "r"), "--preset", "cloud", "--depth", "24",
                    "--planned-tokens-per-sec", "100000"])
    (cmd,) = stage_commands("preflight", a, tmp_path, [PY, "-m", "torch.distributed.run", "--nproc_per_node=8"])
    assert cmd[:3] == [PY, "-m", "nanochat_core.training.preflight"]          # one process: per-device numbers
    assert cmd[cmd.index("--depth") + 1] == "24" and cmd[cmd.index("--planned-tokens-per-sec") + 1] == "100000.0"
    assert cmd[cmd.index("--matrix") + 1] == "train" and "--events" in cmd


def test_preflight_fails_a_node_slower_than_half_the_plan():
    p = subprocess.run([PY, "-m", "nanochat_core.training.preflight", "--depth", "1", "--matrix", "train", "--steps", "1",
                        "--planned-tokens-per-sec", "1e9"], capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    verdict = p.stdout.strip().splitlines()[-1]
    assert verdict.startswith("PREFLIGHT FAIL: d1 train[compile off, auto]: ") and \
        "is under half the plan's 1,000,000,000 per device" in verdict, verdict


def test_pipeline_stops_at_a_failed_preflight_before_fetching_data(tmp_path):
    home = tmp_path / "home"
    p = subprocess.run([PY, "-m", "nanochat_core.stages.pipeline", "--run-dir", str(tmp_path / "run"), "--depth", "1",
                        "--stages", "preflight,tok,base"], capture_output=True, text=True, timeout=300,
                       env=_env(NANOCHAT_HOME=str(home), NANOCHAT_PREFLIGHT_FAIL="bf16"))
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "PREFLIGHT FAIL: d1 bf16 vs fp32 loss: forced failure" in p.stdout
    assert "stage 'preflight' failed" in p.stderr and "Traceback" not in p.stderr
    assert not (home / "data").exists() and not (tmp_path / "run" / "tokenizer").exists()
    assert '"stage": "data"' not in p.stdout
