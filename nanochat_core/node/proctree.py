"""
Killing a whole job tree at a deadline, whatever its processes do.

Why this exists: the budget is a hard cap enforced on the node, so at the deadline every process of the job
must end. `timeout --kill-after` signals only its own process group, and the pipeline starts each stage in
its own session (so a signal it forwards reaches torchrun's whole tree): a stage that ignores SIGTERM would
survive `timeout` and keep the job - and the billing node - alive. Here we find processes by ancestry
(/proc/<pid>/stat's parent pid, Linux) instead of by group, and the supervisor below makes itself a child
subreaper, so a process orphaned when its parent dies is re-parented to us, not to init, and stays findable.

    python -m nanochat_core.node.proctree --spec RUN_SPEC [--grace S] -- CMD ...
    python -m nanochat_core.node.proctree --watch PID --spec RUN_SPEC

The first form runs CMD under the backstop: at the spec's job deadline plus run_spec.BACKSTOP_S (or at a
hand-made run's --deadline-at) it sends SIGTERM to CMD (the pipeline then stops its stage, writes the
manifest and exits 0), `--grace` seconds later SIGKILL to every process still below us. A deadline stop exits 0: it
is the budget doing its job, not a failure, and must never make SkyPilot's managed-job controller
"recover" (restart) the run. Otherwise CMD's own exit code is returned. A spec whose deadline has already
passed starts nothing and ends the same clean way.

The second form is the job script's watchdog (sky/train.yaml): the backstop covers only CMD, but SkyPilot
appends steps of its own after the script (the wait for a bucket's uploads), which must not run unbounded
either; at the spec's deadline plus run_spec.WATCHDOG_S it ends the script's shell and all below it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanochat_core.common import NanochatError
from nanochat_core import run_spec


# Fields of /proc/<pid>/stat after the command name, counted from 0 (proc(5) numbers them from 3).
STATE, PPID, STARTTIME = 0, 1, 19


def stat_fields(pid: int | str) -> list[str] | None:
    """The one parser of /proc/<pid>/stat: its fields after the command name, which may hold spaces and
    parentheses (so they start after the LAST ')'); None without that process or without /proc (macOS)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields or None


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process we can see (without /proc, through psutil if it is there)."""
    out: dict[int, list[int]] = {}
    if os.path.isdir("/proc"):
        pairs = ((int(f[PPID]), int(n)) for n in os.listdir("/proc") if n.isdigit() and (f := stat_fields(n)))
    else:
        try:
            import psutil   # optional (SkyPilot brings it): for a machine without /proc, e.g. macOS
        except ImportError:
            return out
        pairs = ((p.info["ppid"], p.info["pid"]) for p in psutil.process_iter(["pid", "ppid"]))
    for parent, pid in pairs:
        out.setdefault(parent, []).append(pid)
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (any session, any process group), parents before children."""
    kids = children_map()
    found, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in found:
                found.append(c)
                todo.append(c)
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(pid: int, grace_s: float, include_self: bool = True, first: int = signal.SIGTERM) -> None:
    """`first` (SIGTERM) to `pid` and everything below it, then SIGKILL to whatever is left after `grace_s`.
    Every process ever seen in the tree stays on the list: one whose parent dies meanwhile is re-parented out
    of the tree (to init, unless we are its subreaper) and must still end."""
    def tree() -> list[int]:
        return ([pid] if include_self else []) + descendants(pid)
    seen = tree()
    signal_all(seen, first)
    end = time.time() + grace_s
    while time.time() < end and any(pid_alive(p) for p in seen):
        time.sleep(0.1)
        seen += [p for p in tree() if p not in seen]
    signal_all(seen + [p for p in tree() if p not in seen], signal.SIGKILL)


def pid_alive(pid: int | None) -> bool:
    """Is process `pid` running? A zombie (exited, not yet reaped by its parent) counts as gone. Without /proc
    (macOS) the answer of kill(pid, 0) stands. The one test of liveness the pipeline, the run lock and the
    local backend share."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # someone else's process: it exists
    fields = stat_fields(pid)
    if fields is None:
        return not os.path.isdir("/proc/self")   # no /proc at all: trust kill; else the pid just went away
    return fields[STATE] != "Z"


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER (Linux >= 3.4): orphans below us are re-parented to us. False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def wait_or_stop(proc: subprocess.Popen, deadline_at: float | None, grace_s: float, what: str,
                 term_tree: bool = True, clock=time.time) -> int | None:
    """The one deadline wait (the pipeline's for a stage, the supervisor's below for the pipeline): wait for
    `proc`; at `deadline_at` SIGTERM to its tree (term_tree=False: to `proc` alone, which stops its own), and
    `grace_s` later SIGKILL to what is left. Returns the exit code, or None when the deadline ended it.
    `clock`: the caller's clock (the pipeline's, which tests inject)."""
    while True:
        left = None if deadline_at is None else deadline_at - clock()
        try:
            return proc.wait(timeout=None if left is None else max(0.0, min(left, 5.0)))
        except subprocess.TimeoutExpired:
            if left is not None and left <= 0:
                break
    print(f"budget deadline reached: stopping {what}", flush=True)
    if term_tree:
        kill_tree(proc.pid, grace_s)
    else:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid, 0)
    proc.wait()
    return None


def supervise(cmd: list[str], deadline_at: float | None, grace_s: float) -> int:
    become_subreaper()
    proc = subprocess.Popen(cmd)
    forward = lambda signum, _f: proc.send_signal(signum)  # noqa: E731 - a preemption notice reaches CMD
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = wait_or_stop(proc, deadline_at, grace_s, f"the job (everything is killed in {grace_s:.0f} s)",
                      term_tree=False)
    # Whatever CMD left behind (orphans re-parented to us, stages in their own sessions) ends with it: after
    # a deadline stop at once (the grace is spent), else after a short grace of its own.
    if descendants(os.getpid()):
        kill_tree(os.getpid(), 0 if rc is None else min(grace_s, 10.0), include_self=False)
    for _ in range(50):  # reap the orphans we adopted
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    return 0 if rc is None else rc   # a deadline stop is the budget doing its job, not a failure


LATE_START_GRACE_S = 10.0


def watch(pid: int, at: float, grace_s: float = 10.0, poll_s: float = 1.0) -> bool:
    """The job's watchdog: once `at` has passed, `pid` (the job script's shell) and everything below it -
    except this watchdog - get SIGTERM, and SIGKILL `grace_s` later. It returns as soon as `pid` is gone
    (within `poll_s`), so it never outlives a job that ended in time. True if it had to stop the job."""
    me = os.getpid()
    while pid_alive(pid):
        if time.time() < at:
            time.sleep(min(poll_s, max(0.0, at - time.time())))
            continue
        print("budget deadline passed: the watchdog stops what is left of the job", flush=True)
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
            for p in [pid] + [d for d in descendants(pid) if d != me]:
                try:
                    os.kill(p, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            end = time.time() + wait
            while time.time() < end and pid_alive(pid):
                time.sleep(0.1)
        return True
    return False


def deadline_from_spec(path: str) -> float | None:
    """The backstop moment of a run spec file (its job deadline plus run_spec.BACKSTOP_S); None without one."""
    return run_spec.read(Path(path)).backstop_at() if path.strip() else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m nanochat_core.node.proctree [--spec FILE | --deadline-at T] [--grace S] -- CMD ...\n"
             "       python -m nanochat_core.node.proctree --watch PID --spec FILE")
    i = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m nanochat_core.node.proctree", usage=usage)
    p.add_argument("--spec", default="", help="run spec file: its deadline (+ BACKSTOP_S) is the one enforced")
    p.add_argument("--deadline-at", default="", help="unix time; empty = no deadline (runs by hand)")
    p.add_argument("--grace", type=float, default=30.0)
    p.add_argument("--watch", type=int, default=None, help="be the watchdog of this process (the job script)")
    a = p.parse_args(argv[:i])
    try:
        spec = run_spec.read(Path(a.spec)) if a.spec.strip() else None
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.watch is not None:
        at = spec.watchdog_at() if spec else None
        if at is not None:
            # A job that starts after its deadline (a relaunch, a late spot recovery) still gets a few seconds
            # to end itself cleanly (the backstop then ends the pipeline at once) before the watchdog fires.
            watch(a.watch, max(at, time.time() + LATE_START_GRACE_S))
        return 0
    cmd = argv[i + 1:]
    if not cmd:
        print(usage + "\nerror: nothing to run after --", file=sys.stderr)
        return 2
    deadline = spec.backstop_at() if spec else (float(a.deadline_at) if a.deadline_at.strip() else None)
    if spec is not None and spec.deadline_at is not None and spec.deadline_at <= time.time():
        # A clean end (exit 0), not a failure: a managed job must not be "recovered" onto a new node.
        print("budget deadline already passed; not starting", flush=True)
        print('@@nanochat {"event": "done", "state": "BUDGET_TRUNCATED", "message": "budget deadline already '
              'passed"}', flush=True)
        return 0
    return supervise(cmd, deadline, a.grace)


if __name__ == "__main__":
    sys.exit(main())
