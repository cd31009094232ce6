"""
Killing a whole job tree at a deadline, whatever its processes do.

Why this exists: the budget is a hard cap enforced on the node, so at the deadline every process of the job
must end. `timeout --kill-after` signals only its own process group, and the pipeline starts each stage in
its own session (so a signal it forwards reaches torchrun's whole tree): a stage that ignores SIGTERM would
survive `timeout` and keep the job - and the billing node - alive. Here we find processes by ancestry
(/proc/<pid>/stat's parent pid, Linux) instead of by group, and the supervisor below makes itself a child
subreaper, so a process orphaned when its parent dies is re-parented to us, not to init, and stays findable.

    python -m nanochat_core.proctree --deadline-at UNIX_TIME [--grace S] -- CMD ...

runs CMD; at the deadline it sends SIGTERM to CMD (the pipeline then stops its stage, writes the manifest
and exits 0), `--grace` seconds later SIGKILL to every process still below us. A deadline stop exits 0: it
is the budget doing its job, not a failure, and must never make SkyPilot's managed-job controller
"recover" (restart) the run. Otherwise CMD's own exit code is returned.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process we can see."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                # comm may contain spaces and parentheses: the fields we want follow the LAST ')'
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out.setdefault(int(fields[1]), []).append(int(name))
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


def signal_tree(pid: int, sig: int, include_self: bool = True) -> None:
    for p in ([pid] if include_self else []) + descendants(pid):
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(pid: int, grace_s: float, include_self: bool = True) -> None:
    """SIGTERM to `pid` and everything below it, then SIGKILL to whatever is left after `grace_s`."""
    signal_tree(pid, signal.SIGTERM, include_self)
    end = time.time() + grace_s
    while time.time() < end and (descendants(pid) or (include_self and pid_alive(pid))):
        time.sleep(0.1)
    signal_tree(pid, signal.SIGKILL, include_self)


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
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return not os.path.isdir("/proc/self")   # no /proc at all: trust kill; else the pid just went away


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER (Linux >= 3.4): orphans below us are re-parented to us. False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def supervise(cmd: list[str], deadline_at: float | None, grace_s: float) -> int:
    become_subreaper()
    proc = subprocess.Popen(cmd)
    forward = lambda signum, _f: proc.send_signal(signum)  # noqa: E731 - a preemption notice reaches CMD
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    hit = False
    while True:
        left = None if deadline_at is None else deadline_at - time.time()
        try:
            rc = proc.wait(timeout=None if left is None else max(0.0, min(left, 5.0)))
            break
        except subprocess.TimeoutExpired:
            if left is not None and left <= 0 and not hit:
                hit = True
                print(f"budget deadline reached: stopping the job (everything is killed in {grace_s:.0f} s)",
                      flush=True)
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=grace_s)
                    break
                except subprocess.TimeoutExpired:
                    kill_tree(os.getpid(), 0, include_self=False)
                    rc = proc.wait()
                    break
    # Whatever CMD left behind (orphans re-parented to us, stages in their own sessions) ends with it.
    if descendants(os.getpid()):
        kill_tree(os.getpid(), min(grace_s, 10.0), include_self=False)
    for _ in range(50):  # reap the orphans we adopted
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    return 0 if hit else rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m nanochat_core.proctree [--deadline-at T] [--grace S] -- CMD ...", file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m nanochat_core.proctree")
    p.add_argument("--deadline-at", default="", help="unix time; empty = no deadline")
    p.add_argument("--grace", type=float, default=30.0)
    a = p.parse_args(argv[:i])
    cmd = argv[i + 1:]
    if not cmd:
        print("error: nothing to run after --", file=sys.stderr)
        return 2
    deadline = float(a.deadline_at) if a.deadline_at.strip() else None
    return supervise(cmd, deadline, a.grace)


if __name__ == "__main__":
    sys.exit(main())
