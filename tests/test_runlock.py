"""One trainer per run directory: the real pipeline (local preset, depth 1) as real processes, kill -9, and a
process watcher that counts trainers on the run dir every 20 ms."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nanochat_core.common import NanochatError

PY = sys.executable


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("NANOCHAT_DEADLINE", None)
    return env


def _trainers(run: Path) -> list[int]:
    """Live base_train processes working on `run` (zombies excluded)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"nanochat_core.stages.base_train" in cmd and str(run).encode() in cmd and stat.rsplit(")", 1)[-1].split()[0] != "Z":
            out.append(int(entry.name))
    return out


def _wait(cond, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _pipeline(run, log):
    return subprocess.Popen([PY, "-m", "nanochat_core.stages.pipeline", "--run-dir", str(run), "--preset", "local",
                             "--stages", "base", "--depth", "1", "--steps", "100000"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env())


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="counts processes through /proc")
def test_kill9_of_the_pipeline_then_restart_never_runs_two_trainers(tmp_path, tiny_tokenizer):
    run = tmp_path / "run"
    tiny_tokenizer.save(run / "tokenizer")
    most, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            most[0] = max(most[0], len(_trainers(run)))
            time.sleep(0.02)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs = []
    try:
        with open(tmp_path / "p1.log", "w") as log1:
            p1 = _pipeline(run, log1)
            procs.append(p1)
        first = _wait(lambda: _trainers(run), 120, "the first trainer")[0]
        _wait(lambda: '"event": "progress"' in (tmp_path / "p1.log").read_text(), 180, "the first trainer to train")

        # a second pipeline while the first is alive: refused at once, in one line naming the holder
        p2 = subprocess.run([PY, "-m", "nanochat_core.stages.pipeline", "--run-dir", str(run), "--preset", "local",
                             "--stages", "base", "--depth", "1", "--steps", "100000"],
                            capture_output=True, text=True, env=_env(), timeout=60)
        lines = p2.stderr.strip().splitlines()
        assert p2.returncode == 2 and len(lines) == 1, p2.stdout[-2000:] + p2.stderr[-2000:]
        assert lines[0].startswith("error: ") and f"pid {p1.pid}" in lines[0]
        assert _trainers(run) == [first]

        # kill -9 of the pipeline, and the same command again straight away
        os.kill(p1.pid, signal.SIGKILL)
        p1.wait()
        with open(tmp_path / "p3.log", "w") as log3:
            p3 = _pipeline(run, log3)
            procs.append(p3)
        _wait(lambda: first not in _trainers(run), 60, "the orphaned trainer to stop")      # no orphan
        # it stopped the way a preemption does: with a checkpoint, from which the restart resumes
        _wait(lambda: '"event": "resumed"' in (tmp_path / "p3.log").read_text(), 180, "the restart to resume")
        assert p3.poll() is None, (tmp_path / "p3.log").read_text()[-2000:]
        assert _trainers(run) and first not in _trainers(run)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            _wait(lambda: not _trainers(run), 60, "every trainer to stop")
        finally:
            for pid in _trainers(run):  # orphans (the bug this test is about) must not outlive the test
                os.kill(pid, signal.SIGKILL)
            stop.set()
            watcher.join()
    assert most[0] == 1, f"{most[0]} trainers ran at once on {run}"


def _holder(run: Path, role: str = "pipeline"):
    from nanochat_core.node import runlock  # noqa: F401 (fails early, in the test, where runlock is missing)
    """Another process (not our ancestor) holding the run dir's lock: as a pipeline does, or (role "stage") as
    what a killed pipeline leaves behind does - the run lock alone, not the pipeline's own."""
    code = textwrap.dedent(f"""
        import sys, time
        from nanochat_core.node import runlock
        runlock.acquire({str(run)!r}, role={role!r})
        print("locked", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_stage_run_by_hand_cannot_write_into_a_locked_run_dir(tmp_path):
    import torch
    from nanochat_core.gpt.checkpoint import save_checkpoint
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        model = torch.nn.Linear(4, 4)
        with pytest.raises(NanochatError, match=f"in use by pid {holder.pid}"):
            save_checkpoint(run / "base", 1, model, torch.optim.AdamW(model.parameters()), {}, 0, 1)
        assert not (run / "base" / "ckpt_000001").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock went with it (a stale .lock file means nothing)
    save_checkpoint(run / "base", 1, model, torch.optim.AdamW(model.parameters()), {}, 0, 1)


def test_a_restart_waits_for_an_orphaned_stage_but_not_for_a_live_pipeline(tmp_path, capsys):
    from nanochat_core.node import runlock
    run = tmp_path / "run"
    holder = _holder(run)
    try:   # a live pipeline: refused at once (not after wait_s), naming it
        with pytest.raises(NanochatError, match=f"in use by pid {holder.pid} \\(a nanochat pipeline\\)"):
            runlock.acquire(run, wait_s=60)
    finally:
        holder.kill()
        holder.wait()
    # What a killed pipeline left holding the lock (issue 21: a stage still compiling), with the lock file's
    # text even claiming it is a pipeline: the restart waits for it, says so and names it, then starts.
    holder = _holder(run, role="stage")
    try:
        (run / runlock.LOCK_NAME).write_text(f"pipeline {holder.pid}\n")
        threading.Timer(1.0, holder.kill).start()
        fd = runlock.acquire(run, wait_s=60)
        assert fd is not None and holder.poll() is not None   # it returned once the holder was gone
        err = capsys.readouterr().err
        assert f"waiting for pid {holder.pid} (python -c" in err and "up to 60 s" in err, err
        assert (run / runlock.LOCK_NAME).read_text() == f"pipeline {os.getpid()}\n"
        os.close(fd)
        os.close(runlock._pipeline_fds.pop(str(run.resolve())))
        runlock._held.clear()
    finally:
        holder.kill()
        holder.wait()
    # bounded: one that does not go is named, with what to do
    holder = _holder(run, role="stage")
    try:
        with pytest.raises(NanochatError, match=f"still locked by pid {holder.pid} .*after waiting 0.5 s.*kill {holder.pid}"):
            runlock.acquire(run, wait_s=0.5)
    finally:
        holder.kill()
        holder.wait()


def test_kill9_of_a_pipeline_whose_stage_cannot_stop_yet_then_restart_waits_for_it(tmp_path):
    """The real pipeline (stand-in stages): kill -9 of the pipeline while its base stage ignores SIGTERM (deep
    in a compile), then the same command at once: it waits, naming the stage, and runs when the stage is gone."""
    here = Path(__file__).resolve().parent
    run, release = tmp_path / "run", tmp_path / "release"
    env = dict(_env(), PYTHONPATH=f"{here.parent}{os.pathsep}{here}", STANDIN_BASE=f"busy:{release}")
    cmd = [PY, str(here / "stage_standins.py"), "pipeline", "--run-dir", str(run), "--preset", "cloud",
           "--stages", "base"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    stage_pid = None
    try:
        stage_pid = int(_wait(lambda: (run / "pids.txt").exists() and (run / "pids.txt").read_text().strip(), 60,
                              "the stage to start"))
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        env["STANDIN_BASE"] = "ok"
        again = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = again.stderr.readline()   # the first thing it says: what it waits for
        assert f"waiting for pid {stage_pid} (" in line and "stage_standins.py" in line, line
        assert again.poll() is None
        release.write_text("go")      # the stage finishes what it was doing and exits
        out, err = again.communicate(timeout=60)
        assert again.returncode == 0 and (run / "base.out").exists(), err[-2000:]
    finally:
        release.write_text("go")
        if first.poll() is None:
            first.kill()
        if stage_pid is not None:
            _wait(lambda: not Path(f"/proc/{stage_pid}").exists() or
                  Path(f"/proc/{stage_pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z", 30, "the stage")


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_a_grandchild_stage_stops_when_its_parent_is_killed(tmp_path):
    """torchrun's workers are grandchildren of the pipeline: no PDEATHSIG reaches them, the watchdog does.
    The middle process here is killed with -9; the stage below it (run_main + NANOCHAT_DIE_WITH_PARENT)
    gets SIGTERM, runs its handler (a trainer would save) and exits within seconds."""
    from nanochat_core.node import runlock
    marker = tmp_path / "terminated"
    stage = textwrap.dedent(f"""
        import signal, sys, time
        from nanochat_core.common import run_main
        def on_term(*_):
            open({str(marker)!r}, "w").write("saved")
            sys.exit(0)
        def main():
            signal.signal(signal.SIGTERM, on_term)
            print("stage up", flush=True)
            time.sleep(120)
        run_main(main)
    """)
    middle = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {stage!r}])
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    env = dict(_env(), **{runlock.DIE_ENV: "1"})
    mid = subprocess.Popen([PY, "-c", middle], stdout=subprocess.PIPE, text=True, env=env)
    stage_pid = int(mid.stdout.readline())
    time.sleep(1.0)
    os.kill(mid.pid, signal.SIGKILL)
    mid.wait()
    _wait(lambda: marker.exists(), 10, "the orphaned stage to get SIGTERM")
    _wait(lambda: not Path(f"/proc/{stage_pid}").exists() or
          Path(f"/proc/{stage_pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z", 10, "it to exit")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="counts processes through /proc")
def test_kill9_of_the_local_supervisor_stops_its_pipeline_and_trainer(tmp_path, tiny_tokenizer):
    """`nanochat train --local` runs supervisor -> pipeline -> stage; killing the supervisor with -9 leaves
    nothing running (the trainer saves on the way out), so `nanochat down` has no orphan to miss."""
    from nanochat_cli import state
    from nanochat_cli.backends.local import LocalBackend
    run = state.run_dir("lk")
    tiny_tokenizer.save(run / "tokenizer")
    job = LocalBackend().launch({"name": "local"}, run, ["--preset", "local", "--stages", "base", "--depth", "1",
                                                        "--steps", "100000"])
    try:
        trainer = _wait(lambda: _trainers(run), 120, "the trainer")[0]
        _wait(lambda: '"event": "progress"' in (run / "pipeline.log").read_text(), 180, "training")
        pipeline = _wait(lambda: (state.read_job(run) or {}).get("child_pid"), 30, "the pipeline pid")
        os.kill(job["pid"], signal.SIGKILL)
        _wait(lambda: not _trainers(run), 60, "the trainer to stop")
        _wait(lambda: not Path(f"/proc/{pipeline}").exists() or
              Path(f"/proc/{pipeline}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z", 30, "the pipeline")
        assert '"event": "checkpoint"' in (run / "pipeline.log").read_text()
        assert trainer not in _trainers(run)
    finally:
        for pid in _trainers(run):
            os.kill(pid, signal.SIGKILL)
        child = (state.read_job(run) or {}).get("child_pid")
        if child and Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)
