"""
The local backend: runs the pipeline as a detached process on this machine, with the same surface as
the SkyPilot backend (launch, job state, log tail, pull, down). It is what `--local` uses, and what the
tests drive end to end without a cloud.

A job is a small supervisor process (`python -m nanochat_cli.backends.local supervise ...`) in its own
session: closing the terminal or pressing Ctrl-C in `nanochat train` does not stop it, exactly like a job
on a cluster. The pipeline's stdout and stderr go straight into run_dir/pipeline.log (append mode, so a
relaunched job continues the same log); readers follow that file by byte offset. The supervisor records
the exit code in run_dir/.job.json.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from nanochat_core.common import NanochatError
from nanochat_core.node.proctree import kill_tree, pid_alive
from nanochat_cli import pull as pull_mod
from nanochat_cli import state
from nanochat_cli.backends.base import start_of

# Tests and developers may point the backend at another module with the pipeline's command line.
PIPELINE_MODULE_ENV = "NANOCHAT_PIPELINE_MODULE"

RUNNING, SUCCEEDED, FAILED, CANCELLED = "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"


def _supervisor_alive(pid: int | None) -> bool:
    """Alive AND still our supervisor: after a reboot the recorded pid may belong to something else."""
    if not pid_alive(pid):
        return False
    try:
        return b"nanochat_cli.backends.local" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid


class LocalBackend:
    name = "local"

    def provision(self, cluster: dict) -> None:
        """This machine exists already."""

    def cluster_state(self, cluster: dict) -> str:
        return "UP"

    def final_cost(self, cluster: dict) -> float | None:
        return 0.0

    def launch(self, cluster: dict, rd: Path, args: list[str], spec_file: Path | None = None,
               dryrun: bool = False) -> dict:
        """Start the pipeline for run dir `rd` (reading its run spec from `spec_file`); returns the job record
        (also written to rd/.job.json). A relaunch appends to the same log: the job's cursor is where this
        job's output starts."""
        pipeline_args = [*args, "--spec", str(spec_file)] if spec_file is not None else args
        old = state.read_job(rd)
        if old and self.job_state(cluster, rd) == RUNNING:
            raise NanochatError(f"run '{rd.name}' is already running (pid {old.get('pid')}): "
                                "`nanochat logs` attaches to it, `nanochat down` stops it")
        rd.mkdir(parents=True, exist_ok=True)
        job_id = int((old or {}).get("job_id", 0)) + 1
        module = os.environ.get(PIPELINE_MODULE_ENV, "nanochat_core.stages.pipeline")
        cmd = [sys.executable, "-u", "-m", module, "--run-dir", str(rd), *pipeline_args]
        log = rd / "pipeline.log"
        job = {"job_id": job_id, "backend": "local", "cluster": cluster["name"], "run": rd.name,
               "cmd": cmd, "state": RUNNING, "submitted_at": time.time(), "pid": None,
               "cursor": log.stat().st_size if log.exists() else 0}
        if dryrun:
            return job
        state.write_job(rd, job)
        sup = [sys.executable, "-m", "nanochat_cli.backends.local", "supervise", "--run-dir", str(rd), "--", *cmd]
        # NANOCHAT_DIE_WITH_PARENT: the pipeline stops (and its stage saves) if the supervisor is killed.
        env = dict(os.environ, PYTHONUNBUFFERED="1", NANOCHAT_DIE_WITH_PARENT="1")
        # The supervisor's own output is tiny; it goes to the log too so nothing is ever silently lost.
        with open(rd / "pipeline.log", "ab") as log:
            proc = subprocess.Popen(sup, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                    start_new_session=True, cwd=str(Path.cwd()))
        job["pid"] = proc.pid
        state.write_job(rd, job)
        return job

    def job_state(self, cluster: dict, rd: Path) -> str | None:
        job = state.read_job(rd)
        if not job:
            return None
        if job.get("state") == RUNNING and job.get("pid") and not _supervisor_alive(job["pid"]):
            # The supervisor died without recording an exit (killed, machine rebooted): a "preemption".
            return FAILED if job.get("returncode") is None else job["state"]
        return job.get("state")

    def tail(self, cluster: dict, rd: Path, cursor: int | None, follow: bool = True,
             poll_s: float = 0.1) -> Iterator[tuple[str, int]]:
        """Complete lines of rd/pipeline.log from byte offset `cursor`, as (line, offset after it).
        Follows until the job is no longer running and the file is fully read."""
        pos = start_of(cursor)
        path = rd / "pipeline.log"
        buf = b""
        while True:
            running = self.job_state(cluster, rd) == RUNNING
            try:
                with open(path, "rb") as f:
                    f.seek(pos + len(buf))
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                pos += len(line) + 1
                yield line.decode("utf-8", errors="replace"), pos
            if not chunk:
                if not running or not follow:
                    if buf:  # a last line without a newline, from a job that has ended
                        pos += len(buf)
                        yield buf.decode("utf-8", errors="replace"), pos
                    return
                time.sleep(poll_s)

    def pull(self, cluster: dict, rd: Path, dest: Path) -> int:
        if dest.resolve() != rd.resolve():
            pull_mod.copy_local(rd, dest)   # same machine: a copy, no rsync needed
        return pull_mod.verify(dest)

    def cancel(self, cluster: dict, rd: Path, sig: int = signal.SIGTERM, wait_s: float = 30.0) -> bool:
        """Stop the run's job and everything it started. True if something was running."""
        job = state.read_job(rd)
        if not job or not _supervisor_alive(job.get("pid")):
            return False
        # The whole tree: the pipeline starts each stage in its own session, so a group kill would miss them.
        kill_tree(job["pid"], wait_s, first=sig)
        job = state.read_job(rd) or job
        if job.get("state") == RUNNING:
            job.update(state=CANCELLED, ended_at=time.time())
            state.write_job(rd, job)
        return True

    def down(self, cluster: dict) -> list[str]:
        """Stop every running local job; returns the run names stopped."""
        stopped = []
        for rd in state.list_runs():
            job = state.read_job(rd)
            if job and job.get("backend") == "local" and self.cancel(cluster, rd):
                stopped.append(rd.name)
        return stopped


# -----------------------------------------------------------------------------
# The supervisor: runs the pipeline, forwards SIGTERM/SIGINT to it, records how it ended.

def _supervise(rd: Path, cmd: list[str]) -> int:
    job = state.read_job(rd) or {}
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)  # inherits our stdout/stderr: the log file
    job.update(pid=os.getpid(), child_pid=child.pid, started_at=time.time())
    state.write_job(rd, job)

    cancelled = []

    def forward(signum, _frame):
        cancelled.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    job = state.read_job(rd) or job
    if job.get("state") == RUNNING:
        job.update(state=SUCCEEDED if rc == 0 else (CANCELLED if cancelled else FAILED),
                   returncode=rc, ended_at=time.time())
        state.write_job(rd, job)
    return rc


def main(argv: list[str] | None = None) -> None:
    # Hand-parsed on purpose: everything after "--" is the pipeline's own command line, untouched.
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 4 or argv[0] != "supervise" or argv[1] != "--run-dir" or argv[3] != "--":
        print("usage: python -m nanochat_cli.backends.local supervise --run-dir DIR -- CMD...", file=sys.stderr)
        sys.exit(2)
    sys.exit(_supervise(Path(argv[2]), argv[4:]))


if __name__ == "__main__":
    main()
