"""
One writer per run directory, and no stage outliving its pipeline.

Two trainers on one run dir write two interleaved checkpoint series, and pruning (keep the newest 3)
assumes nobody else writes there. So:

- The pipeline takes an exclusive flock on run_dir/.lock for its whole life. A second pipeline on the
  same run dir fails at once with one line naming the pid that holds it. The lock file's text records who
  holds it ("pipeline PID", "stage PID"); the kernel lock, not the text, is what counts, so a stale text
  after a crash means nothing: the lock dies with the last process holding it.
- Each stage inherits the locked file descriptor (Popen pass_fds; its number in $NANOCHAT_RUN_LOCK_FD).
  An flock belongs to the open file, not the process, so if the pipeline is killed with -9 the lock
  stays held until its stage has also exited: a restart can never start a trainer beside an orphan.
- Stages die with their pipeline: PR_SET_PDEATHSIG (Linux) makes the kernel send the stage SIGTERM the
  moment its parent dies - SIGTERM, not SIGKILL, so a trainer still saves its checkpoint on the way out
  (the same path as a spot preemption). Where that is not available (macOS) or not inherited (torchrun's
  workers are grandchildren) `watch_parent` - started by common.run_main when $NANOCHAT_DIE_WITH_PARENT
  is set - notices that the process was re-parented and does the same.
- Is a pipeline alive? The pipeline also holds a second flock, on run_dir/.pipeline.lock, that it never
  passes on (close-on-exec, not in pass_fds): it is released the instant the pipeline dies, whatever its
  stages are doing. So a restart that can take .pipeline.lock knows the run's pipeline is gone, and that
  whoever still holds .lock is what it left behind (a stage saving, or still compiling and not yet at a
  point where it can save): it waits for that, bounded (ORPHAN_WAIT_S, longer than the ORPHAN_GRACE_S
  after which an orphaned stage kills itself), saying so and naming the processes that hold the lock
  (found through /proc, whatever the lock file's text says). One that cannot take it fails at once.
- save_checkpoint calls `check_writer`: a stage run by hand on a run dir that a pipeline (not its own
  ancestor) is using refuses to write, and otherwise takes the lock itself for the rest of its life.

flock is advisory and local to one machine; on a filesystem that does not support it (some bucket
mounts) the lock is skipped with a warning - multi-node runs are coordinated by torchrun, not by this.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path

from nanochat_core.common import NanochatError
from nanochat_core.node.proctree import PPID, pid_alive, stat_fields
import fcntl

LOCK_NAME = ".lock"
PIPELINE_LOCK_NAME = ".pipeline.lock"   # held by the pipeline alone: see the module docstring
FD_ENV = "NANOCHAT_RUN_LOCK_FD"
DIE_ENV = "NANOCHAT_DIE_WITH_PARENT"
PR_SET_PDEATHSIG = 1
ORPHAN_WAIT_S = 300.0      # how long a restart waits for an orphaned stage to save and exit
ORPHAN_GRACE_S = 240.0     # how long an orphaned stage gets to save after SIGTERM before SIGKILL

_held: dict[str, int] = {}  # resolved run dir -> fd this process holds (-1: held by an ancestor)


def holders(path: Path) -> list[tuple[str, int]]:
    """(role, pid) of the live processes the lock file names."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        role, _, pid = line.partition(" ")
        if pid.strip().isdigit() and pid_alive(int(pid)):
            out.append((role, int(pid)))
    return out


def _describe(pid: int) -> str:
    """'pid N (python -m module)' from /proc, or 'pid N' where that cannot be read."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return f"pid {pid}"
    if "-m" in argv[:-1]:
        what = "python -m " + argv[argv.index("-m") + 1]
    else:
        what = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv[:2]))
    return f"pid {pid} ({what[:80]})" if what else f"pid {pid}"


def lock_holders(path: Path) -> list[int] | None:
    """Every other process that has `path` open (so holds its flock, if anyone does), from /proc/*/fd;
    None where /proc cannot tell (not Linux). The lock file's text can be stale or wrong; this is not."""
    if not Path("/proc/self/fd").is_dir():
        return None
    try:
        st = os.stat(path)
    except OSError:
        return []
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:   # gone, or another user's
            continue
        with fds:
            for fd in fds:
                try:
                    t = os.stat(fd.path)
                except OSError:
                    continue
                if (t.st_dev, t.st_ino) == (st.st_dev, st.st_ino):
                    found.append(int(entry.name))
                    break
    return found


def _ancestors() -> set[int]:
    """This process and every process above it (/proc; elsewhere just the parent)."""
    pids, pid = {os.getpid()}, os.getpid()
    for _ in range(64):
        fields = stat_fields(pid)
        if fields is None:
            pids.add(os.getppid())
            break
        pid = int(fields[PPID])
        if pid <= 1:
            break
        pids.add(pid)
    return pids


def _write(fd: int, entries: list[tuple[str, int]]) -> None:
    data = "".join(f"{role} {pid}\n" for role, pid in entries).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _try_lock(fd: int) -> bool:
    """True if locked, False if someone else holds it; raises OSError if the filesystem cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _busy(run_dir: Path, who: list[tuple[str, int]], waited: float | None = None) -> NanochatError:
    if waited is not None:   # no pipeline alive: what a stopped run left behind did not exit in time
        named = ", ".join(_describe(p) for _, p in who) or "a process"
        return NanochatError(f"run directory {run_dir} is still locked by {named}, left running by a stopped run, "
                             f"after waiting {waited:g} s: stop it (kill {' '.join(str(p) for _, p in who)}), "
                             "then run the same command again")
    if who:
        role, pid = next(((r, p) for r, p in who if r == "pipeline"), who[0])
        named = f"pid {pid} (a nanochat {role})"
    else:
        named = "another process"
    return NanochatError(f"run directory {run_dir} is in use by {named}: one writer per run - wait for it to "
                         f"finish, or stop it (`nanochat down`, or kill it), then run the same command again")


def acquire(run_dir: str | os.PathLike, role: str = "pipeline", wait_s: float = ORPHAN_WAIT_S) -> int | None:
    """Take the run dir's lock for this process; returns the locked fd (keep it open; pass it to stages).
    A pipeline (role "pipeline") also takes .pipeline.lock for its life and fails at once with one line
    naming the holder if another pipeline is alive; if the lock is held only by what a dead pipeline left
    behind, it waits up to wait_s for that to exit, saying what it waits for. A stage (role "stage") never
    waits. None if the filesystem cannot lock, or the holder is our own ancestor."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    pfd = None
    try:
        if role == "pipeline":
            pfd = os.open(run_dir / PIPELINE_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if not _try_lock(pfd):
                who = holders(path)
                if any(p in _ancestors() for _, p in who):
                    return _inside_holder(run_dir, fd, pfd)
                live = lock_holders(run_dir / PIPELINE_LOCK_NAME)   # the pipeline itself, whatever the text says
                raise _busy(run_dir, [("pipeline", p) for p in live] if live else
                            [(r, p) for r, p in who if r == "pipeline"] or who)
        deadline, said = time.time() + wait_s, False
        while not _try_lock(fd):
            who = holders(path)
            if any(p in _ancestors() for _, p in who):
                return _inside_holder(run_dir, fd, pfd)   # e.g. a test driving a stage inside the holder's tree
            if pfd is None or time.time() >= deadline:
                left = lock_holders(path)
                if left is not None and pfd is not None:
                    who = [("process", p) for p in left]
                raise _busy(run_dir, who, waited=wait_s if pfd is not None else None)
            left = lock_holders(path) if not said else None
            if not said and (left or time.time() > deadline - wait_s + 1):
                # No pipeline is alive (we hold its lock), so these are what a stopped run left behind.
                names = (", ".join(_describe(p) for p in left) if left else
                         ", ".join(f"{r} pid {p}" for r, p in who) or "the process holding it")
                print(f"{run_dir} is locked by what a stopped run left running: waiting for {names} to save "
                      f"and exit (up to {wait_s:g} s; an orphaned stage stops itself within "
                      f"{ORPHAN_GRACE_S:.0f} s)", file=sys.stderr, flush=True)
                said = True
            time.sleep(0.2)
    except BaseException as e:
        for f in (fd, pfd):
            if f is not None:
                os.close(f)
        if not isinstance(e, OSError):
            raise
        print(f"warning: cannot lock {path} ({e.strerror}); not guarding against a second writer",
              file=sys.stderr, flush=True)
        return None
    if said:
        print(f"{run_dir}: the stopped run's processes are gone; starting", file=sys.stderr, flush=True)
    _write(fd, [(role, os.getpid())])
    _held[str(run_dir.resolve())] = fd
    if pfd is not None:
        _pipeline_fds[str(run_dir.resolve())] = pfd   # kept open (and locked) for the life of the process
    return fd


_pipeline_fds: dict[str, int] = {}


def _inside_holder(run_dir: Path, fd: int, pfd: int | None) -> None:
    for f in (fd, pfd):
        if f is not None:
            os.close(f)
    _held[str(run_dir.resolve())] = -1


def record_stage(fd: int | None, stage_pid: int) -> None:
    """Note the running stage in the lock file (for the message a second writer gets)."""
    if fd is not None:
        _write(fd, [("pipeline", os.getpid()), ("stage", stage_pid)])


def stage_env(fd: int | None) -> dict[str, str]:
    """What a stage's environment needs to inherit the lock and die with the pipeline."""
    env = {DIE_ENV: "1"}
    if fd is not None:
        env[FD_ENV] = str(fd)
    return env


def check_writer(run_dir: str | os.PathLike) -> None:
    """Called before a checkpoint is written: fine if this process (or an ancestor, or the pipeline that
    passed us its lock) holds the run dir's lock; if nobody does, take it for the rest of this process;
    otherwise refuse with one line naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _held:
        return
    path = run_dir / LOCK_NAME
    inherited = os.environ.get(FD_ENV, "")
    if inherited.isdigit():
        try:
            a, b = os.fstat(int(inherited)), os.stat(path)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                _held[key] = int(inherited)
                return
        except OSError:
            pass  # not ours (a grandchild that did not inherit it, or another run dir): check below
    acquire(run_dir, role="stage", wait_s=0)


def child_setup(parent_pid: int):
    """preexec_fn for a stage: die (SIGTERM) when the pipeline dies. libc is looked up before the fork so
    the child only makes one system call."""
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def setup() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the pipeline died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return setup


def watch_parent(poll_s: float = 0.5, grace_s: float = ORPHAN_GRACE_S) -> None:
    """Background thread: when this process is re-parented (its parent died), SIGTERM ourselves - a
    trainer saves and exits - and SIGKILL after grace_s if that did not end it."""
    parent = os.getppid()
    if parent <= 1:
        return

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"parent process {parent} is gone: stopping (pid {os.getpid()})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=loop, name="watch-parent", daemon=True).start()
