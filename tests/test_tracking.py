"""wandb tracking, offline (WANDB_MODE=offline: real wandb, real run files, no network): the base stage's
loss curve lands in one wandb run per training run, a restart resumes that run's id, and without a key or
--wandb nothing is imported."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest

from nanochat_core import tracking
from nanochat_core.common import parse_event

PY = sys.executable
TINY = ["--depth", "1", "--head-dim", "32", "--seq-len", "64", "--device-batch-size", "4", "--log-every", "1",
        "--device", "cpu", "--save-every-minutes", "0"]


def wandb_env(tmp_path, run_dir, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", NANOCHAT_WANDB="1", WANDB_MODE="offline",
               NANOCHAT_RUN_DIR=str(run_dir), WANDB_CONFIG_DIR=str(tmp_path / "wb_config"),
               WANDB_CACHE_DIR=str(tmp_path / "wb_cache"), WANDB_DATA_DIR=str(tmp_path / "wb_data"))
    env.update(extra)
    for k in ("WANDB_API_KEY", "NANOCHAT_DEADLINE"):
        env.pop(k, None)
    return env


def history(run_dir):
    """{run id: [rows]} from the offline .wandb files under run_dir/wandb (wandb's own reader)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore
    runs: dict = {}
    for f in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        ds = datastore.DataStore()
        ds.open_for_scan(f)
        run_id, rows = None, []
        while (data := ds.scan_data()) is not None:
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
            elif kind == "history":
                rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
        runs.setdefault(run_id, []).extend(rows)
    return runs


@pytest.fixture
def run_dir(tmp_path, tiny_tokenizer):
    d = tmp_path / "run"
    tiny_tokenizer.save(d / "tokenizer")
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from nanochat_core.data.dataset import ensure_bundled
    d = tmp_path_factory.mktemp("data")
    ensure_bundled(d)
    return d


def base_train(run_dir, data_dir, env, steps, stop_after=None):
    """Run the base stage; with stop_after, SIGTERM it (a preemption) once it has logged that step."""
    cmd = [PY, "-m", "nanochat_core.stages.base_train", "--run-dir", str(run_dir), "--data", str(data_dir), *TINY,
           "--steps", str(steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    losses, out = {}, []
    for line in proc.stdout:
        out.append(line)
        e = parse_event(line)
        if e and e["event"] == "progress":
            losses[e["step"]] = e["loss"]
            if stop_after is not None and e["step"] == stop_after:
                proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=180) == 0, "".join(out)[-2000:] + err[-3000:]
    return losses


@pytest.mark.slow   # two real base-stage processes: 9-15 s on a busy 2-core machine
def test_base_loss_curve_in_one_wandb_run_resumed_on_restart(run_dir, data_dir, tmp_path):
    env = wandb_env(tmp_path, run_dir, NANOCHAT_PRICE_PER_HOUR="2.5")
    first = base_train(run_dir, data_dir, env, 12, stop_after=3)    # preempted: checkpoint, exit
    assert 3 <= max(first) < 12
    run_id = json.loads((run_dir / tracking.STATE_FILE).read_text())["id"]
    again = base_train(run_dir, data_dir, env, 12)                   # started again: resumes, finishes
    assert min(again) == max(first) + 1
    runs = history(run_dir)
    assert list(runs) == [run_id]                                    # one wandb run, two processes
    curve = {r["base/step"]: r["base/loss"] for r in runs[run_id] if "base/loss" in r}
    assert curve == {**first, **again} and sorted(curve) == list(range(1, 13))
    spent = [r["usd_spent"] for r in runs[run_id] if "base/loss" in r]
    assert spent == sorted(spent) and spent[0] >= 0 and spent[-1] > 0          # $ spent at 2.50/h, growing
    assert any("base/eval/val_bpb" in r for r in runs[run_id])       # the stage's eval event too


def test_without_a_key_or_flag_nothing_is_imported(tmp_path):
    code = ("import sys; from nanochat_core.common import emit; "
            "emit('progress', stage='base', step=1, loss=1.0); "
            "print(sorted(m for m in ('wandb', 'nanochat_core.tracking') if m in sys.modules))")
    env = wandb_env(tmp_path, tmp_path / "run")
    env.pop("NANOCHAT_WANDB")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    assert out.strip().endswith("[]")
    env["NANOCHAT_WANDB"] = "0"
    env["WANDB_API_KEY"] = "x" * 40                         # a key, but switched off explicitly
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    assert out.strip().endswith("[]")


def test_a_wandb_failure_warns_once_and_training_goes_on(tmp_path):
    code = ("from nanochat_core.common import emit\n"
            "for i in range(3): emit('progress', stage='base', step=i, loss=1.0)\n"
            "print('still running')")
    env = wandb_env(tmp_path, tmp_path / "run", WANDB_MODE="not-a-mode")
    (tmp_path / "run").mkdir()
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0 and "still running" in p.stdout, p.stderr[-2000:]
    assert p.stderr.count("warning: wandb tracking is off") == 1


def test_rows_carry_stage_metrics_and_dollars():
    row = tracking.metrics_of({"event": "progress", "stage": "sft", "step": 30, "loss": 1.5, "tokens_per_sec": 900.0,
                               "mfu": 12.5, "time": 1000.0 + 1800}, price_per_hour=20.0, started=1000.0)
    assert row == {"sft/loss": 1.5, "sft/tokens_per_sec": 900.0, "sft/mfu": 12.5, "sft/step": 30, "usd_spent": 10.0}
    row = tracking.metrics_of({"event": "eval", "stage": "base", "metrics": {"CORE": 0.2, "step": 9, "name": "x"}},
                              None, 0.0)
    assert row == {"base/eval/CORE": 0.2, "base/step": 9}
    assert tracking.metrics_of({"event": "sample", "stage": "base", "text": "hi"}, 1.0, 0.0) == {}


def test_train_wandb_flag(monkeypatch):
    from typer.testing import CliRunner
    from nanochat_cli.main import app
    monkeypatch.setenv("NANOCHAT_WANDB", "")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    r = CliRunner().invoke(app, ["train", "--budget", "50", "--wandb", "--dryrun"])
    assert r.exit_code == 2 and "needs WANDB_API_KEY" in r.stderr and "Traceback" not in r.stderr
    r = CliRunner().invoke(app, ["train", "--local", "--wandb", "--dryrun"])
    assert r.exit_code == 0, r.stderr
    assert os.environ["NANOCHAT_WANDB"] == "1"        # what the local job inherits


def test_eval_results_reach_wandb_through_the_pipeline_not_the_secret_free_stage(run_dir, tmp_path):
    """The eval stage runs model-written code, so it gets no WANDB_API_KEY and tracking off; the pipeline, which
    has the key, logs what eval wrote to eval/*.json into the same wandb run once the stage is done."""
    from nanochat_core.stages.pipeline import stage_env
    env = stage_env("eval", {"WANDB_API_KEY": "k", "NANOCHAT_WANDB": "1", "PATH": "/bin"})
    assert "WANDB_API_KEY" not in env and env["NANOCHAT_WANDB"] == "0" and env["PATH"] == "/bin"
    assert stage_env("base", {"WANDB_API_KEY": "k"})["WANDB_API_KEY"] == "k"

    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "sft.json").write_text(json.dumps({"stage": "sft", "metrics": {"ARC-Easy": 0.31, "GSM8K": 0.02}}))
    env = wandb_env(tmp_path, run_dir)
    env.pop("NANOCHAT_RUN_DIR")   # the pipeline's own environment does not name it
    code = f"from pathlib import Path; from nanochat_core.stages.pipeline import track_results; track_results(Path({str(run_dir)!r}))"
    r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [row for rows in history(run_dir).values() for row in rows]
    assert any(row.get("sft/eval/ARC-Easy") == 0.31 and row.get("sft/eval/GSM8K") == 0.02 for row in rows), rows
