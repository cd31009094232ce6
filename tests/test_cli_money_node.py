"""The node side of the money path, with the REAL pipeline and real processes (each stage a stand-in
process, tests/stage_standins.py): base trains against the plan's own base deadline; a base stage cut far
short ends the run as budget-truncated (exit 0, never a failure to retry), with a manifest of what exists;
at the job deadline a stage that ignores SIGTERM in its own session dies with its whole tree; the manifest
is rewritten after every stage; train.yaml's run script lets the steps SkyPilot appends after it run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nanochat_core.common import parse_event
from nanochat_core.node.proctree import pid_alive

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_pipeline(run_dir: Path, args: list[str], env: dict, timeout: float = 30):
    full = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}", **env)
    t0 = time.time()
    r = subprocess.run([sys.executable, str(HERE / "stage_standins.py"), "pipeline", "--run-dir", str(run_dir),
                        "--preset", "cloud", *args], capture_output=True, text=True, env=full, timeout=timeout)
    events = [e for e in map(parse_event, r.stdout.splitlines()) if e]
    return r, events, time.time() - t0


def manifest_names(run_dir: Path) -> set[str]:
    return {ln.split("  ", 1)[1] for ln in (run_dir / "MANIFEST.sha256").read_text().splitlines() if ln}


def test_base_cut_far_short_by_its_deadline_ends_the_run_budget_truncated(tmp_path):
    now = time.time()
    rd = tmp_path / "run"
    # base stops at its deadline at step 10 of 100 (what base_train does when NANOCHAT_DEADLINE arrives): the
    # deadline itself is far away, so a busy machine cannot make it pass before base even starts
    r, events, _ = run_pipeline(rd, ["--stages", "tok,base,sft,eval", "--deadline-at", str(now + 3600),
                                     "--base-deadline-at", str(now + 1800)],
                                {"STANDIN_BASE": "cut:100:10"})
    assert r.returncode == 0, r.stdout + r.stderr               # a clean end: no managed-job "recovery"
    # base trained against exactly the plan's base deadline, not the job deadline less a fixed reserve
    assert float((rd / "base.deadline").read_text()) == pytest.approx(now + 1800)
    outcome = json.loads((rd / "outcome.json").read_text())
    assert outcome["state"] == "BUDGET_TRUNCATED" and "of 100 planned" in outcome["why"]
    assert not (rd / "sft.out").exists()                          # no SFT/eval on a barely trained model
    done = [e for e in events if e["event"] == "done"]
    assert done and done[-1]["state"] == "BUDGET_TRUNCATED"
    assert "base" not in json.loads((rd / "stages.json").read_text())   # a larger budget resumes base
    assert any(n.startswith("base/ckpt_") for n in manifest_names(rd))  # pull can verify what exists


def test_a_base_that_gets_its_planned_steps_runs_on_and_succeeds(tmp_path):
    now = time.time()
    rd = tmp_path / "run"
    r, events, _ = run_pipeline(rd, ["--stages", "tok,base,sft", "--deadline-at", str(now + 3600),
                                     "--base-deadline-at", str(now + 600)], {"STANDIN_BASE": "train:5:0.01"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (rd / "sft.out").exists() and not (rd / "outcome.json").exists()
    assert [e for e in events if e["event"] == "done"][-1].get("state") is None


def test_the_job_deadline_kills_a_stage_that_ignores_sigterm_in_its_own_session(tmp_path):
    rd = tmp_path / "run"
    # the job deadline is an hour away; the pipeline's (injected) clock jumps past it as sft starts
    r, events, took = run_pipeline(rd, ["--stages", "tok,sft,eval", "--deadline-at", str(time.time() + 3600)],
                                   {"STANDIN_SFT": "hang", "STANDIN_CLOCK_JUMP": "sft:3700"})
    pids = [int(p) for p in (rd / "pids.txt").read_text().split()]
    time.sleep(0.3)
    leaked = [p for p in pids if pid_alive(p)]
    for p in leaked:  # never leave them behind, even when the test fails
        os.kill(p, 9)
    assert not leaked, "a stage process outlived the budget's deadline"
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((rd / "outcome.json").read_text())["state"] == "BUDGET_TRUNCATED"
    assert not (rd / "eval.out").exists()
    # The manifest was rewritten after tok finished (and at the deadline): pull can verify what exists.
    assert "tok.out" in manifest_names(rd)
    assert [e for e in events if e["event"] == "done"][-1]["state"] == "BUDGET_TRUNCATED"


def test_the_run_scripts_backstop_kills_the_whole_tree_even_when_the_pipeline_hangs(tmp_path):
    """proctree (what train.yaml's run script wraps the pipeline in) at its deadline: SIGTERM, then SIGKILL
    to every process below it - in any session, orphaned or not - and a clean exit 0."""
    pidfile = tmp_path / "pids"
    script = (f"trap '' TERM; setsid bash -c \"trap '' TERM; sleep 1000\" & echo $! >> {pidfile}; "
              f"(trap '' TERM; sleep 1000) & echo $! >> {pidfile}; echo $$ >> {pidfile}; sleep 1000")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "nanochat_core.node.proctree", "--deadline-at", str(time.time() + 1),
                        "--grace", "1", "--", "bash", "-c", script], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr   # (in time: the 30 s timeout above is the bound)
    time.sleep(0.3)
    pids = [int(p) for p in pidfile.read_text().split()]
    leaked = [p for p in pids if pid_alive(p)]
    for p in leaked:
        os.kill(p, 9)
    assert len(pids) == 3 and not leaked


def test_kill_tree_also_ends_what_was_re_parented_out_of_the_tree(tmp_path):
    """The pipeline's deadline stop of a stage (proctree.kill_tree): a parent that exits on SIGTERM (torchrun)
    leaves a child that ignores it; the child is re-parented out of the tree and must still be killed."""
    from nanochat_core.node.proctree import kill_tree
    pidfile = tmp_path / "child"
    parent = subprocess.Popen(["bash", "-c", f"(trap '' TERM; sleep 1000) & echo $! > {pidfile}.tmp; "
                               f"mv {pidfile}.tmp {pidfile}; wait"])
    end = time.time() + 20
    while not pidfile.exists() and time.time() < end:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    try:
        kill_tree(parent.pid, grace_s=1.0)
        assert parent.wait(timeout=10) != 0
        end = time.time() + 5
        while pid_alive(child) and time.time() < end:   # SIGKILL was sent; the kernel needs a moment
            time.sleep(0.05)
        assert not pid_alive(child)
    finally:
        if pid_alive(child):
            os.kill(child, 9)


def skypilot_job(tmp_path: Path, spec, args: str, rclone_log: str | None, timeout: float = 120):
    """train.yaml's run script as SkyPilot 0.14 really runs it: its task codegen appends the MOUNT_CACHED
    upload wait (TaskCodeGen.build_task_bash_script), log_lib wraps it (make_task_bash_script: the env
    exports, `cd ~/sky_workdir`) and it runs as `/bin/bash -i SCRIPT`. Faked at the node's boundary only:
    `findmnt` reports an rclone mount, `sleep` returns at once (SkyPilot's loop polls every 10 s; the waits
    that matter here are our own, in Python), and the rclone log is the given text. Returns (result, s)."""
    from sky.backends.task_codegen import TaskCodeGen
    from sky.skylet import log_lib
    from nanochat_core import run_spec
    home = tmp_path / "home"
    (home / "nanochat-venv" / "bin").mkdir(parents=True)
    (home / "nanochat-venv" / "bin" / "python").symlink_to(sys.executable)
    (home / "sky_workdir").mkdir()
    run_spec.write(home / ".nanochat" / "specs" / "r", spec)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mounted = "/nanochat-bucket bucket fuse.rclone rw" if rclone_log is not None else ""
    (bin_dir / "findmnt").write_text(f"#!/bin/sh\necho '{mounted}'\n" if mounted else "#!/bin/sh\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for f in ("findmnt", "sleep"):
        (bin_dir / f).chmod(0o755)
    if rclone_log is not None:
        (home / ".sky" / "rclone_log").mkdir(parents=True)
        (home / ".sky" / "rclone_log" / "bucket.log").write_text(rclone_log)
    run = yaml.safe_load((ROOT / "sky" / "train.yaml").read_text())["run"]
    envs = {"NANOCHAT_RUN": "r", "NANOCHAT_ARGS": args, "NANOCHAT_SPEC": "~/.nanochat/specs/r/plan.json",
            "NANOCHAT_BUCKET_DIR": ""}
    script = tmp_path / "job.sh"
    script.write_text(log_lib.make_task_bash_script(TaskCodeGen.build_task_bash_script(run), env_vars=envs))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    r = subprocess.run(["/bin/bash", "-i", str(script)], capture_output=True, text=True, env=env,
                       timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
    return r, time.time() - t0


def rclone_lines(n: int, last: str) -> str:
    """An rclone log as MOUNT_CACHED writes it at INFO (one cache status line per poll), ending in `last`."""
    line = ("2026/01/01 00:00:00 INFO  : vfs cache: cleaned: objects 12 (was 12) in use 1, to upload 1, "
            "uploading 1, total size 9.5Gi (was 9.5Gi)\n")
    return line * n + f"2026/01/01 01:00:00 INFO  : vfs cache: cleaned: objects 12 (was 12) {last}, " \
                      "total size 9.5Gi (was 9.5Gi)\n"


def spec_ending_in(seconds: float):
    from nanochat_core.run_spec import RunSpec
    now = time.time()
    return RunSpec(run="r", preset="cloud", offer={}, budget=10.0, spend_cap=10.0, launched_at=now,
                   deadline_at=now + seconds, base_deadline_at=now + seconds)


def test_the_upload_wait_skypilot_appends_ends_once_uploads_are_done_with_a_large_rclone_log(tmp_path):
    """An hour into a bucket run the rclone log is megabytes: the appended wait's `tac LOG | grep -m 1 ...`
    then dies of SIGPIPE, and under our script's pipefail the wait looped forever (the node billed on,
    since autodown waits for the job). The tail of our script now hands SkyPilot's steps the shell state
    they expect: the wait sees "to upload 0, uploading 0" and ends, and the job's exit code is still the
    pipeline's."""
    log = rclone_lines(20000, "in use 0, to upload 0, uploading 0")     # ~2.6 MB, far above a pipe buffer
    assert len(log) > 1_000_000
    r, _ = skypilot_job(tmp_path, spec_ending_in(3600), "--stages nosuchstage", log, timeout=90)
    out = r.stdout + r.stderr
    assert "unknown stage(s) nosuchstage" in out
    assert "skypilot: cached mount upload complete" in out, out[-2000:]
    assert r.returncode == 2                                      # the pipeline's own exit code


def test_nothing_after_the_job_deadline_runs_unbounded(tmp_path):
    """An upload that never finishes (the wait would poll forever): the watchdog ends the job script -
    SkyPilot's appended steps included - WATCHDOG_S after the job deadline, as a clean end (exit 0, never a
    failure a managed job would "recover" onto a new node)."""
    from nanochat_core.run_spec import WATCHDOG_S
    log = rclone_lines(10, "in use 1, to upload 3, uploading 1")
    r, took = skypilot_job(tmp_path, spec_ending_in(-WATCHDOG_S + 2), "", log, timeout=90)
    out = r.stdout + r.stderr
    assert "budget deadline already passed; not starting" in out              # the backstop started nothing
    assert "cached mount is still uploading" in out                          # the wait did run, and loop
    assert "the watchdog stops what is left of the job" in out and "the job ends now (watchdog)" in out
    assert r.returncode == 0, out[-2000:]


# Node 1's real pipeline (stand-in stages), plus one line of output: each time its wait for node 0's tokenizer
# looks and does not find it, it says so before sleeping. Test code only: nothing in the pipeline is changed,
# the wait itself is the real one.
_NODE1_SAYS_WHEN_IT_WAITS = """
import sys, time, types
from nanochat_core.node import lead_link
from nanochat_core.stages import pipeline as pl
import stage_standins
real_wait = pl.wait_for_file

def polling_sleep(seconds):
    print("TEST: the tokenizer is not there yet", flush=True)
    time.sleep(seconds)

def wait_for_file(*args, **kwargs):
    lead_link.time = types.SimpleNamespace(monotonic=time.monotonic, sleep=polling_sleep)
    try:
        return real_wait(*args, **kwargs)
    finally:
        lead_link.time = time

pl.wait_for_file = wait_for_file
stage_standins.pipeline(sys.argv[1:])
"""


def test_only_node_0_keeps_the_books_and_the_others_follow_its_word_and_wait_for_its_tokenizer(tmp_path):
    """Multi-node: node 1 must not run tok/report or write stages.json, the report, the manifest, the outcome
    (all nodes share one bucket directory); it runs what node 0 says it runs (lead_link.py: here the test is
    node 0), with node 0's tokenizer - which, as through a bucket mount, becomes visible only some time after
    node 0 said so - and it ends when node 0 ends the run. Told by the order of what happened, not by seconds:
    the tokenizer lands only once node 1 has looked for it and is waiting, and sft must come after that."""
    import datetime
    import socket
    import threading
    from torch.distributed import TCPStore
    from nanochat_core.common import sha256_file
    rd = tmp_path / "run"
    rd.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    node0 = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    node0.set("plan", json.dumps({"run": ["tok", "sft", "eval", "report"]}))
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    node0.set("stage/sft", json.dumps({"tokenizer": sha256_file(tok)}))
    ran = tmp_path / "ran.log"      # the stand-in stages' "<stage> <tokenizer sha prefix>" lines

    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}", SKYPILOT_NODE_RANK="1",
               SKYPILOT_NODE_IPS="127.0.0.1\n127.0.0.1", NANOCHAT_LEAD_PORT=str(port), STANDIN_LOG=str(ran))
    proc = subprocess.Popen([sys.executable, "-c", _NODE1_SAYS_WHEN_IT_WAITS, "--run-dir", str(rd), "--preset", "cloud",
                             "--stages", "tok,sft,eval,report", "--deadline-at", str(time.time() + 600),
                             "--nnodes", "2", "--nproc-per-node", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    guard = threading.Timer(120, proc.kill)   # a hang guard: our own child, by its handle
    guard.start()
    happened, out = [], []
    try:
        for line in proc.stdout:   # node 0's side of the conversation, driven by what node 1 says
            out.append(line)
            if line.startswith("TEST: the tokenizer is not there yet") and "tokenizer landed" not in happened:
                happened.append("node 1 waits for the tokenizer")
                if (rd / "sft.out").exists():
                    happened.append("sft ran")
                (rd / "tokenizer").mkdir()        # node 0's upload lands, late
                (rd / "tokenizer" / "tokenizer.json").write_text("{}")
                happened.append("tokenizer landed")
            event = parse_event(line)
            if event and event["event"] == "stage_end" and event.get("stage") == "sft":
                happened.append("sft ran")
                node0.set("end", json.dumps({"code": 0, "why": "the budget's deadline"}))   # instead of "stage/eval"
        proc.wait()
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    stdout = "".join(out)
    assert proc.returncode == 0, stdout
    assert happened == ["node 1 waits for the tokenizer", "tokenizer landed", "sft ran"], (happened, stdout[-3000:])
    # sft ran once, on node 0's tokenizer; tok and report are node 0's alone
    assert ran.read_text().splitlines() == [f"sft {sha256_file(tok)[:12]}"]
    assert (rd / "sft.out").exists() and "node 0 ended the run" in stdout
    assert not (rd / "tok.out").exists() and not (rd / "eval.out").exists() and not (rd / "report.out").exists()
    for book in ("stages.json", "MANIFEST.sha256", "report.md", "outcome.json"):
        assert not (rd / book).exists(), book
    assert node0.add("bye", 0) == 1          # it said it heard the last word, so node 0 may exit
