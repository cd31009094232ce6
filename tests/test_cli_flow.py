"""The whole CLI flow through the local backend in a temp $NANOCHAT_HOME:
up -> train -> logs -> status -> pull -> eval -> down, with a dropped log connection, a detach/re-attach
(Ctrl-C) that must neither lose nor repeat lines, and a preemption (the job is killed and relaunched; it
resumes from its last checkpoint). The job is tests/test_cli_jobscript.py: the pipeline's command line
and observable behaviour, in a fraction of a second per step."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanochat_cli import state
from nanochat_cli.backends import local as local_backend
from nanochat_cli.main import app

TESTS = Path(__file__).parent
NANOCHAT = str(Path(sys.executable).parent / "nanochat")


@pytest.fixture
def job_env(monkeypatch):
    monkeypatch.setenv(local_backend.PIPELINE_MODULE_ENV, "test_cli_jobscript")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKEJOB_STEP_S", "0.01")
    return monkeypatch


def cli(*args):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def wait_for(pred, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def body_lines(text):
    return re.findall(r"^(?:base|sft) line \d{4}$", text, flags=re.M)


def test_whole_flow_with_dropped_connection(job_env, tmp_path):
    code, out, _ = cli("up", "--local")
    assert code == 0 and "local" in out
    code, out, err = cli("train", "--local", "--steps", "12", "--detach")
    assert code == 0, err
    rd = state.run_dir("local")
    assert json.loads((rd / "plan.json").read_text())["price_per_hour"] == 0.0

    # The log transport drops twice mid-stream; the reader reconnects at the last delivered offset.
    real_tail = local_backend.LocalBackend.tail
    drops = {"left": 2}

    def flaky_tail(self, cluster, rd, pos, follow=True, poll_s=0.05):
        for i, item in enumerate(real_tail(self, cluster, rd, pos, follow, poll_s)):
            if drops["left"] and i == 5:
                drops["left"] -= 1
                raise ConnectionResetError("connection reset by peer")
            yield item

    job_env.setattr(local_backend.LocalBackend, "tail", flaky_tail)
    code, out, err = cli("logs", "--from-start")
    assert code == 0, err
    assert err.count("reconnecting") == 2
    expected = [f"{s} line {i:04d}" for s in ("base", "sft") for i in range(1, 13)]
    assert body_lines(out) == expected                      # every line once, in order
    assert "== done" in out and "spent $0.00" in out

    code, out, _ = cli("status", "--json")
    status = json.loads(out)
    assert [c["name"] for c in status["clusters"]] == ["local"]
    assert status["jobs"][0]["state"] == "SUCCEEDED" and status["jobs"][0]["run"] == "local"

    dest = tmp_path / "pulled"
    code, out, err = cli("pull", "--dest", str(dest))
    assert code == 0, err
    assert (dest / "base" / "ckpt_000012" / "model.safetensors").exists()
    assert not (dest / ".job.json").exists() and "verified" in out

    code, out, err = cli("eval", "--local", "--json")
    assert code == 0, err
    assert json.loads(out)["BASE"]["CORE"] == pytest.approx(0.0123)

    code, out, _ = cli("down", "--yes")
    assert code == 0 and "final cost $0.00" in out
    code, out, _ = cli("down", "--yes")                   # idempotent
    assert code == 0 and "nothing to tear down" in out


def test_pull_detects_a_corrupted_file_and_resumes(job_env, tmp_path):
    cli("train", "--local", "--steps", "5", "--detach")
    rd = state.run_dir("local")
    wait_for(lambda: local_backend.LocalBackend().job_state({}, rd) == "SUCCEEDED")
    dest = tmp_path / "home_copy"
    assert cli("pull", "--dest", str(dest))[0] == 0
    (dest / "tokenizer" / "tokenizer.json").write_text("tampered")
    # rsync's quick check (size + mtime) would skip a same-size file; ours differs in size, so it is re-sent.
    code, out, err = cli("pull", "--dest", str(dest))
    assert code == 0, err
    (dest / "report.md").write_text("# changed locally after the pull\n")
    from nanochat_cli import pull as pull_mod
    with pytest.raises(Exception, match="report.md"):
        pull_mod.verify(dest)


def test_detach_and_reattach_lose_and_repeat_nothing(job_env, tmp_path):
    job_env.setenv("FAKEJOB_STEP_S", "0.04")
    gate = tmp_path / "go"                      # the job holds at base step 20 until the test has detached:
    job_env.setenv("FAKEJOB_HOLD_FILE", str(gate))   # on a busy machine the viewer's start-up outlasted the job
    assert cli("train", "--local", "--steps", "80", "--detach")[0] == 0
    rd = state.run_dir("local")
    env = dict(os.environ)
    viewer = subprocess.Popen([NANOCHAT, "logs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(viewer.stdout.readline, "")), daemon=True)
    reader.start()
    # Detach only once the viewer is really streaming (not while it is still starting up).
    wait_for(lambda: len(body_lines("".join(seen))) >= 3)
    viewer.send_signal(signal.SIGINT)                         # Ctrl-C: detach, the job keeps running
    viewer.wait(timeout=120)          # hang guards only: a viewer took over 20 s to detach beside a CI run
    reader.join(timeout=60)
    out1, err1 = "".join(seen), viewer.stderr.read()
    assert "detached" in err1 and "nanochat logs" in err1 and "nanochat down" in err1
    assert "Traceback" not in err1
    assert local_backend.LocalBackend().job_state({}, rd) == "RUNNING"
    gate.write_text("")
    out2 = subprocess.run([NANOCHAT, "logs"], capture_output=True, text=True, env=env, timeout=60).stdout
    expected = [f"{s} line {i:04d}" for s in ("base", "sft") for i in range(1, 81)]
    assert body_lines(out1) and body_lines(out2)
    assert body_lines(out1) + body_lines(out2) == expected


def test_preempted_job_resumes_when_relaunched(job_env):
    job_env.setenv("FAKEJOB_STEP_S", "0.05")
    assert cli("train", "--local", "--steps", "40", "--detach")[0] == 0
    rd = state.run_dir("local")
    wait_for(lambda: (rd / "base" / "ckpt_000010").exists())
    # Preemption: the whole process tree dies at once, no chance to clean up.
    local_backend.LocalBackend().cancel({}, rd, sig=signal.SIGKILL, wait_s=5)
    job = state.read_job(rd)
    assert job["state"] in ("CANCELLED", "FAILED")
    done_before = max(int(p.name.split("_")[1]) for p in (rd / "base").glob("ckpt_*"))
    assert 10 <= done_before < 40

    job_env.setenv("FAKEJOB_STEP_S", "0.005")
    code, out, err = cli("train", "--local", "--steps", "40")    # same command again, attached this time
    assert code == 0, err
    assert f"resumed base from step {done_before}" in out
    assert f"base line {done_before + 1:04d}" in out and f"base line {done_before:04d}" not in out
    assert state.read_job(rd)["job_id"] == 2 and state.read_job(rd)["state"] == "SUCCEEDED"
    assert (rd / "MANIFEST.sha256").exists()


def test_stages_option_runs_only_those(job_env):
    code, out, err = cli("train", "--local", "--steps", "3", "--stages", "tok,base")
    assert code == 0, err
    rd = state.run_dir("local")
    assert set(json.loads((rd / "stages.json").read_text())) == {"tok", "base"}
    code, _, err = cli("train", "--local", "--stages", "tok,typo")
    assert code == 2 and "--stages takes a comma list" in err


def test_down_stops_a_running_local_job(job_env):
    job_env.setenv("FAKEJOB_STEP_S", "0.2")
    assert cli("train", "--local", "--steps", "100", "--detach")[0] == 0
    rd = state.run_dir("local")
    wait_for(lambda: "base line 0002" in (rd / "pipeline.log").read_text())
    code, out, _ = cli("down")          # the local "cluster" costs nothing: no confirmation needed
    assert code == 0 and "stopped run local" in out and "final cost $0.00" in out
    assert state.read_job(rd)["state"] == "CANCELLED"
    assert local_backend.LocalBackend().job_state({}, rd) == "CANCELLED"


def test_chat_and_eval_default_to_the_latest_trained_run(tmp_path):
    from nanochat_cli.commands.run import resolve_checkpoint
    old, new, empty = (state.run_dir(n) for n in ("old", "new", "empty"))
    (old / "base").mkdir(parents=True)
    time.sleep(0.05)
    (new / "sft").mkdir(parents=True)
    time.sleep(0.05)
    empty.mkdir(parents=True)           # newest, but has no checkpoint: skipped
    assert resolve_checkpoint(None) == new
    assert resolve_checkpoint(old) == old
    with pytest.raises(Exception, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_chat_by_hand_and_the_cli_agree_on_the_latest_trained_model():
    """`python -m nanochat_core.inference.chat` (no --checkpoint) and `nanochat chat` load the same run: one rule,
    common.latest_trained_run. Run a holds the newest checkpoint, run b was active last."""
    from nanochat_cli.commands.run import resolve_checkpoint
    from nanochat_core.inference.chat import find_checkpoint
    a, b = state.run_dir("a"), state.run_dir("b")
    (a / "sft" / "ckpt_000002").mkdir(parents=True)
    (b / "base" / "ckpt_000001").mkdir(parents=True)
    (b / "pipeline.log").write_text("")
    for path, t in ((a / "sft" / "ckpt_000002", 3000), (b / "base" / "ckpt_000001", 1000), (a, 1000), (b, 1000),
                    (b / "pipeline.log", 2000)):
        os.utime(path, (t, t))
    assert resolve_checkpoint(None) == b
    assert find_checkpoint(None) == b


def test_a_failing_run_exits_non_zero_and_says_how_to_resume(job_env):
    code, out, err = cli("train", "--local", "--steps", "3", "--data", "fail")
    assert code == 2 and "no data source named 'fail'" in out
    assert "failed" in err and "The same command resumes it" in err and "Traceback" not in err


def test_a_restart_of_an_unfinished_run_does_not_say_it_already_finished(job_env):
    """MANIFEST.sha256 is written after every stage, so it said "already finished" on every restart (issue 21)."""
    code, out, err = cli("train", "--local", "--steps", "3", "--data", "fail")
    assert code == 2
    rd = state.run_dir("local")
    (rd / "MANIFEST.sha256").write_text("")   # what the node writes once a stage is done
    code, out, err = cli("train", "--local", "--steps", "3", "--data", "fail")
    assert "did not finish (last seen FAILED)" in err and "already finished" not in err, err
    code, out, err = cli("train", "--local", "--steps", "3")
    assert code == 0, err
    code, out, err = cli("train", "--local", "--steps", "3")
    assert "already finished" in err and "did not finish" not in err, err
