"""The run spec (nanochat_core/run_spec.py): one typed record from `nanochat train` to the node. A plan.json
written by the version before specs existed is read as a spec (its deadlines included), anything unusable is
refused in one line - by the CLI, by the node's pipeline and by the run script's own reader."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat_core import run_spec
from nanochat_core.common import NanochatError

ROOT = Path(__file__).resolve().parent.parent

# A plan.json exactly as `nanochat train` wrote it before this change (main 34351c9), keys in its order.
TODAYS_PLAN = {
    "offer": {"cloud": "lambda", "region": "us-east-1", "instance_type": "gpu_8x_h100_sxm5",
              "accelerators": "H100:8", "spot": False, "price_per_hour": 31.92, "interconnect": "nvlink",
              "enabled": True},
    "price_per_hour": 31.92, "budget": 30.0, "depth": 6, "params": 73400320, "tokens": 268435456, "hours": 0.731,
    "cost": 23.34, "stages": [{"name": "setup", "hours": 0.1, "cost": 3.19}, {"name": "base", "hours": 0.3, "cost": 9.58}],
    "tokens_per_sec": 2.1e6, "throughput_source": "estimate", "expected_core": None, "expected_core_source": "",
    "nodes": 1, "gpus": 8, "num_shards": 8, "capped_by": "", "capped_note": "", "max_price_per_hour": 31.92,
    "spend_cap": 30.0, "deadline_hours": 0.773, "base_deadline_hours": 0.5, "margin_hours": 0.1667,
    "deadline_at": 1_800_002_782.0, "base_deadline_at": 1_800_001_800.0, "launched_at": 1_800_000_000.0,
    "run": "d6", "created_at": 1_800_000_000.0, "preset": "cloud", "spot": False, "keep": False, "bucket": None,
}


def test_a_plan_written_by_todays_version_is_read_as_a_spec(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps(TODAYS_PLAN))
    spec = run_spec.read(tmp_path)
    assert (spec.run, spec.preset, spec.depth, spec.nodes) == ("d6", "cloud", 6, 1)
    assert spec.deadline_at == 1_800_002_782.0 and spec.base_deadline_at == 1_800_001_800.0
    assert spec.spend_cap == 30.0 and spec.price_per_hour == 31.92 and spec.spec == run_spec.SPEC_VERSION
    # ... and the node's pipeline trains against those very moments.
    from nanochat_core.stages.pipeline import Pipeline, parse_args
    pipe = Pipeline(parse_args(["--run-dir", str(tmp_path), "--preset", "cloud", "--spec", str(tmp_path / "plan.json")]))
    assert pipe.stage_deadline("base") == 1_800_001_800.0 and pipe.stage_deadline("sft") == 1_800_002_782.0
    assert pipe.a.price_per_hour == 31.92


@pytest.mark.parametrize("text, why", [
    ("{not json", "is not valid JSON"),
    ("[]", "is not a JSON object"),
    (json.dumps({**TODAYS_PLAN, "deadline_at": "tomorrow"}), "'deadline_at' is \"tomorrow\""),
    (json.dumps({**TODAYS_PLAN, "spec": 2}), "spec version 2"),
])
def test_an_unusable_spec_is_refused_in_one_line_everywhere(tmp_path, text, why):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(NanochatError, match=why.replace("(", r"\(")):
        run_spec.read(path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in ([sys.executable, "-m", "nanochat_core.run_spec", str(path)],
                [sys.executable, "-m", "nanochat_core.stages.pipeline", "--run-dir", str(tmp_path), "--spec", str(path)],
                [sys.executable, "-m", "nanochat_core.node.proctree", "--spec", str(path), "--", "true"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("error: ") and why in line


def test_the_cli_reads_a_run_of_todays_version_and_warns_once_on_a_damaged_one(tmp_path, monkeypatch, capsys):
    from nanochat_cli import state
    rd = state.run_dir("old")
    rd.mkdir(parents=True)
    (rd / "plan.json").write_text(json.dumps({**TODAYS_PLAN, "bucket": "s3://b"}))
    assert state.read_spec(rd).bucket == "s3://b"
    (rd / "plan.json").write_text(json.dumps({**TODAYS_PLAN, "spec": 9}))
    assert state.read_spec(rd) is None and state.read_spec(rd) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spec version 9" in err[0]


def test_a_spec_launched_counts_its_deadlines_from_that_moment_and_ships_only_its_shape_as_arguments():
    spec = run_spec.RunSpec(run="r", preset="cloud", offer={}, depth=12, nodes=2, budget=100.0, spend_cap=90.0,
                            deadline_hours=2.5, base_deadline_hours=2.0, num_shards=20, planned_tokens_per_sec=1e5)
    now = time.time()
    live = spec.launched(now)
    assert (live.launched_at, live.deadline_at, live.base_deadline_at) == (now, now + 9000, now + 7200)
    assert live.backstop_at() == now + 9000 + run_spec.BACKSTOP_S
    assert live.watchdog_at() == now + 9000 + run_spec.WATCHDOG_S
    args = live.node_args()
    assert args == ["--preset", "cloud", "--depth", "12", "--nnodes", "2", "--num-shards", "20",
                    "--planned-tokens-per-sec", "100000"]
    assert not any("deadline" in a or "price" in a or "budget" in a for a in args)
    with pytest.raises(Exception):
        live.deadline_at = 0        # frozen: built once


def test_the_money_functions():
    assert run_spec.job_price(10.0, 4) == 40.0
    assert run_spec.spend_cap(100.0) == 100.0 and run_spec.spend_cap(100.0, 6.0, 40.0) == 46.0
    assert run_spec.spend_cap(100.0, 70.0, 40.0) == 100.0
    assert run_spec.deadline_hours(100.0, 25.0, 1 / 6) == pytest.approx(4 - 1 / 6)
    assert run_spec.spent(36.0, 1000.0, 1600.0) == pytest.approx(6.0) and run_spec.spent(36.0, 5.0, 1.0) == 0.0
    assert run_spec.left(100.0, 6.0) == 94.0 and run_spec.left(None, 6.0) is None
