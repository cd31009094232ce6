"""
A sandbox for running model-written code (HumanEval), isolated by the operating system.

Python-level guards (replacing os.remove, blocking socket, hiding ctypes) do not hold: the program can
reach the same system calls through posix, _socket, importlib.reload or a fresh ctypes import. So the
isolation here is the kernel's, set up by bubblewrap (`bwrap`, a small, widely packaged tool built for
exactly this; Flatpak uses it):
- new user, pid, network, ipc, uts and cgroup namespaces: the program sees only its own processes (it
  cannot signal or read /proc/<pid>/environ of ours), has no network but a loopback of its own, and
  when the pid namespace's first process ends, the kernel kills every process left in it (setsid and
  double-forked children included), which also closes every copy of the output pipes;
- a filesystem of its own, read-only: /usr (and the interpreter's own prefix), a fresh /proc and /dev,
  plus a small private /tmp in memory, nothing else: no home directory, no run directory, no /etc;
- a cleared environment (PATH, LANG, HOME=/tmp only), a new session (no terminal to inject into),
  and --die-with-parent: if the evaluating process dies, the sandbox dies with it;
- when we run as root (typical on cloud nodes) bwrap is started as user nobody (65534), so the program
  is an unprivileged user on the host too: the process-count limit applies (the kernel exempts root from
  it) and no root-owned file is its own;
- limits (set by the runner in the child before any model code runs; raising a hard limit needs a
  privilege the sandbox does not have): CPU time, address space, file size, open files, processes;
- on our side: a wall-clock deadline, output read through a fixed-size buffer (a program printing
  gigabytes is killed at OUTPUT_LIMIT, our memory stays bounded), and the sandbox killed on any exit.

What bwrap needs: unprivileged user namespaces (Debian 11+, Ubuntu, Fedora allow them by default;
Ubuntu 24.04 ships an AppArmor profile that allows them for bwrap; a container must not forbid the
clone/unshare system calls in its seccomp profile) and, when we are root, an interpreter that user nobody
can read (the running one, else /usr/bin/python3; only the standard library is available inside).
CI runs as root in a VM: there bwrap runs as nobody and creates the user namespace unprivileged (checked
on Debian 12, bwrap 0.8). A call costs bwrap ~5 ms over starting Python.
Whether it works is probed once per process (a tiny program must run inside and see a new pid
namespace). If it does not, nothing runs: run_sandboxed returns status "unavailable" and the HumanEval
task reports itself not evaluated, with the reason. There is no weaker fallback on purpose.

Who decides "passed". The child can print anything, exit with any code, and read anything in its own
memory (a nonce kept there can be printed), so nothing the child says can prove the tests ran to the end.
With `check=` (what HumanEval uses) the tests run in a SECOND sandbox, trusted: it executes the test code
with `candidate` standing for a stub that sends the arguments to the candidate's sandbox over a pipe and
reads back the repr of the result, which it parses with ast.literal_eval (data only, never code: an object
whose __eq__ always says True cannot come back). The verdict is the checker's own exit status, read by us
from the kernel; the candidate runs in another pid namespace and cannot see, signal or write to the
checker or its status. An early exit, a crash or garbage from the candidate is simply a failed call.
The price: arguments and results must be plain literals (numbers, strings, lists, dicts, ...), which
every HumanEval test uses; anything else fails the test rather than being trusted.
Without `check=`, passed only means "the program exited 0 after running to its end": fine for trusted
programs, but untrusted code can forge it (posix._exit(0)), so do not use it for verdicts on model code.
"""
from __future__ import annotations

import math
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from nanochat_core.proctree import children_map, signal_all

NOBODY = 65534
OUTPUT_LIMIT = 1 << 20   # bytes per stream; more and the sandbox is killed (status "output_limit")
KEEP_CHARS = 10_000      # the tail of each stream kept in the result
MAX_PROCS = 32           # processes of the sandbox's user inside its namespace
FILE_LIMIT = 16 << 20    # largest file the program may write (its /tmp is memory)
TMP_SIZE = 64 << 20      # size of the private /tmp, where bwrap supports --size
EXIT_MEMORY = 99         # the runner's exit code when the program ran out of memory (a label, not a verdict)

# The child's runner, shared by both modes. It sets the limits, then runs the program from the read-only
# file bwrap put at /sandbox/program.py. Everything after the limits is within the program's reach.
_LIMITS = r'''
import os, resource, sys
cpu, mem, nproc, fsize = (int(x) for x in sys.argv[1:5])
for name, soft, hard in [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", mem, mem), ("RLIMIT_DATA", mem, mem),
                         ("RLIMIT_FSIZE", fsize, fsize), ("RLIMIT_NOFILE", 64, 64), ("RLIMIT_CORE", 0, 0),
                         ("RLIMIT_NPROC", nproc, nproc)]:
    resource.setrlimit(getattr(resource, name), (soft, hard))
'''

_RUN = _LIMITS + r'''
code = compile(open("/sandbox/program.py", encoding="utf-8").read(), "<program>", "exec")
try:
    exec(code, {"__name__": "__main__"})
except MemoryError:
    os.write(2, b"MemoryError: the program ran out of memory\n")
    os._exit(%d)
except SystemExit as e:
    if e.code not in (None, 0):
        raise
    print("program called exit() before finishing", file=sys.stderr)
    sys.exit(1)
''' % EXIT_MEMORY

# The candidate's side of check mode: define the program's functions, then answer calls one at a time.
# Frames on the pipes are a 10-digit length and the repr of a Python literal.
_FRAMES = r'''
def _send(fd, text):
    data = text.encode("utf-8", "backslashreplace")
    data = b"%010d" % len(data) + data
    while data:
        data = data[os.write(fd, data):]

def _recv(fd, limit):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError("the other side of the sandbox closed the pipe")
            buf += chunk
        return buf
    n = int(exact(10))
    if n > limit:
        raise ValueError("frame too large")
    return exact(n).decode("utf-8")
'''

_SERVE = _LIMITS + _FRAMES + r'''
import ast
entry, req, resp = sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
g = {"__name__": "__main__"}
try:
    exec(compile(open("/sandbox/program.py", encoding="utf-8").read(), "<program>", "exec"), g)
    fn = g[entry]
except MemoryError:
    os._exit(%d)
while True:
    try:
        args, kwargs = ast.literal_eval(_recv(req, 1 << 24))
    except EOFError:
        break
    try:
        reply = repr(("ok", fn(*args, **kwargs)))
    except MemoryError:
        os._exit(%d)
    except BaseException as e:
        reply = repr(("err", type(e).__name__ + ": " + str(e)[:500]))
    _send(resp, reply)
''' % (EXIT_MEMORY, EXIT_MEMORY)

# The checker (trusted test code, its own sandbox): runs check(candidate) with a stub for the candidate.
# Exit status 0 only if check() returned; that status is the verdict.
_CHECK = _LIMITS + _FRAMES + r'''
import ast
req, resp, limit, entry = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]

def candidate(*args, **kwargs):
    text = repr((args, kwargs))
    if ast.literal_eval(text) != (args, kwargs):
        raise TypeError("the test passed an argument that is not a plain literal")
    _send(req, text)
    kind, value = ast.literal_eval(_recv(resp, limit))  # data only: never code, never a custom __eq__
    if kind != "ok":
        raise AssertionError("the candidate raised " + str(value))
    return value

g = {"__name__": "__check__"}
exec(compile(open("/sandbox/program.py", encoding="utf-8").read(), "<check>", "exec"), g)
g[entry] = candidate  # some tests call the function by its name (HumanEval/33), not as `candidate`
g["check"](candidate)
os._exit(0)
'''


@dataclass
class ExecutionResult:
    passed: bool
    status: str   # "passed" | "failed" | "timeout" | "memory" | "output_limit" | "unavailable"
    stdout: str
    stderr: str


# -----------------------------------------------------------------------------
# Finding a sandbox that works, once per process.

_probe_lock = threading.Lock()
_probed: dict[tuple, tuple[list[str], dict] | str] = {}


def _bwrap_prefix(bwrap: str, interpreter: str, features: str) -> list[str]:
    """bwrap's arguments up to the interpreter: namespaces and the filesystem the program sees."""
    args = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "HOME", "/tmp", "--setenv", "PYTHONHASHSEED", "0", "--setenv", "OMP_NUM_THREADS", "1",
            "--ro-bind", "/usr", "/usr"]
    if "--disable-userns" in features:  # no nested user namespaces: less kernel surface inside
        args.append("--disable-userns")
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr links, or real dirs
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(interpreter))  # .../bin/python3 -> its installation
    if not prefix.startswith("/usr/") and prefix != "/usr":
        args += ["--ro-bind", prefix, prefix]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev"]
    if "--size" in features:
        args += ["--size", str(TMP_SIZE)]
    return args + ["--tmpfs", "/tmp", "--dir", "/sandbox", "--chdir", "/tmp"]


# Last of the setup (after the program file is in place): the sandbox's root and /dev are tmpfs that bwrap
# builds; made read-only, the program can write only its size-capped /tmp (the device nodes keep working).
_READ_ONLY = ["--remount-ro", "/dev", "--remount-ro", "/"]


def sandbox() -> tuple[list[str], dict] | str:
    """(bwrap argv prefix, Popen keyword arguments) of a sandbox that works here, or why there is none.
    Cached per bwrap path and user, so that a changed PATH (or a test hiding bwrap) is seen."""
    bwrap = shutil.which("bwrap")
    key = (bwrap, os.geteuid())
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _probe(bwrap)
        return _probed[key]


def unavailable_reason() -> str | None:
    """None if model code can be run isolated here, else a one-line reason."""
    found = sandbox()
    return found if isinstance(found, str) else None


def _probe(bwrap: str | None) -> tuple[list[str], dict] | str:
    if bwrap is None:
        return ("no sandbox: bubblewrap (bwrap) is not installed; install it (apt-get install bubblewrap) "
                "to evaluate model-written code")
    # As root, run bwrap as nobody (see the module docstring); otherwise as ourselves.
    popen = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    try:
        features = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"no sandbox: {bwrap} does not run ({e})"
    candidates = list(dict.fromkeys(p for p in (os.path.realpath(sys.executable), "/usr/bin/python3")
                                    if os.path.exists(p)))
    why = "no Python interpreter found"
    for python in candidates:
        python = os.path.realpath(python)
        prefix = _bwrap_prefix(bwrap, python, features)
        # The probe must really be inside: a new pid namespace (we are pid 1 or 2), no network but lo, and
        # a root it cannot write to.
        probe = ("import os, socket\nprint(os.getpid() <= 3, [n for _, n in socket.if_nameindex()] == ['lo'])\n"
                 "try:\n    open('/x', 'w')\nexcept OSError:\n    print(True)\n")
        try:
            p = subprocess.run(prefix + _READ_ONLY + ["--", python, "-I", "-S", "-c", probe], capture_output=True,
                               text=True, timeout=20, env={}, stdin=subprocess.DEVNULL, **popen)
        except (OSError, subprocess.SubprocessError) as e:
            why = str(e)
            continue
        if p.returncode == 0 and p.stdout.split() == ["True", "True", "True"]:
            return prefix + ["--", python, "-I", "-S"], popen
        why = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:300]
    return (f"no sandbox: bubblewrap cannot isolate here ({why}); it needs unprivileged user namespaces"
            + (" and an interpreter readable by user nobody" if os.geteuid() == 0 else ""))


# -----------------------------------------------------------------------------
# Running.

def run_sandboxed(program: str, timeout: float = 5.0, memory_mb: int = 512, *, check: str | None = None,
                  entry_point: str | None = None) -> ExecutionResult:
    """Run a Python program in the sandbox.

    Without `check`: passed = the program ran to its end and exited 0 (its own word, see module docstring).
    With `check` (trusted test code defining `check(candidate)`) and `entry_point` (the function the
    program defines): passed = check(candidate) returned in a separate sandbox, calls forwarded to the
    program's function. status "unavailable": no working isolation here, nothing was run."""
    found = sandbox()
    if isinstance(found, str):
        return ExecutionResult(False, "unavailable", "", found)
    prefix, popen = found
    limits = [str(max(1, math.ceil(timeout))), str(memory_mb << 20), str(MAX_PROCS), str(FILE_LIMIT)]
    deadline = time.monotonic() + timeout + 1.0
    if check is None:
        proc = _start(prefix, popen, program, _RUN, limits, [])
        out = _supervise([proc], proc, deadline)
        (so, se), = out.streams
        rc = proc.returncode
        if out.timed_out or _cpu_killed(proc, out):
            return ExecutionResult(False, "timeout", so, se)
        if out.overflow:
            return ExecutionResult(False, "output_limit", so, se + "\n[output limit exceeded]")
        if rc == EXIT_MEMORY:
            return ExecutionResult(False, "memory", so, se)
        return ExecutionResult(rc == 0, "passed" if rc == 0 else "failed", so, se)

    if not entry_point:
        raise ValueError("check mode needs the entry_point the program defines")
    req_r, req_w = os.pipe()     # checker -> candidate: arguments
    resp_r, resp_w = os.pipe()   # candidate -> checker: results
    try:
        cand = _start(prefix, popen, program, _SERVE, limits + [entry_point, str(req_r), str(resp_w)],
                      [req_r, resp_w])
        try:
            checker = _start(prefix, popen, check, _CHECK,
                             limits + [str(req_w), str(resp_r), str(OUTPUT_LIMIT), entry_point], [req_w, resp_r])
        except BaseException:
            _kill(cand)
            raise
    finally:
        for fd in (req_r, req_w, resp_r, resp_w):   # only the two sandboxes hold the pipes now
            os.close(fd)
    out = _supervise([checker, cand], checker, deadline)
    (c_out, c_err), (k_out, k_err) = out.streams
    so, se = k_out + c_out, c_err + k_err
    if cand.returncode == EXIT_MEMORY and cand not in out.killed:
        return ExecutionResult(False, "memory", so, se)
    if out.timed_out or _cpu_killed(checker, out) or _cpu_killed(cand, out):
        return ExecutionResult(False, "timeout", so, se)
    if out.overflow:
        return ExecutionResult(False, "output_limit", so, se + "\n[output limit exceeded]")
    passed = checker.returncode == 0
    return ExecutionResult(passed, "passed" if passed else "failed", so, se)


def _start(prefix: list[str], popen: dict, source: str, runner: str, argv: list[str],
           fds: list[int]) -> subprocess.Popen:
    """One sandbox: `source` appears read-only at /sandbox/program.py (copied in by bwrap from a memfd)."""
    memfd = os.memfd_create("program", os.MFD_CLOEXEC)
    try:
        data = source.encode("utf-8")
        while data:
            data = data[os.write(memfd, data):]
        os.lseek(memfd, 0, os.SEEK_SET)
        argv0 = prefix.index("--")
        cmd = (prefix[:argv0] + ["--ro-bind-data", str(memfd), "/sandbox/program.py"] + _READ_ONLY + prefix[argv0:]
               + ["-c", runner] + argv)
        # env={}: bwrap itself runs as a host process (as nobody when we are root); nothing to read there.
        return subprocess.Popen(cmd, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=[memfd] + fds, start_new_session=True, **popen)
    finally:
        os.close(memfd)


@dataclass
class _Watched:
    streams: list[tuple[str, str]]  # (stdout, stderr) per process, tails
    timed_out: bool
    overflow: bool
    killed: list                    # the processes we killed (their exit status is ours, not theirs)


def _cpu_killed(proc: subprocess.Popen, out: _Watched) -> bool:
    """Ended by the CPU-time limit: bwrap reports a signal as 128 + its number (SIGXCPU, then SIGKILL)."""
    return proc not in out.killed and proc.returncode in (128 + 24, 128 + 9)


def _supervise(procs: list[subprocess.Popen], main: subprocess.Popen, deadline: float) -> _Watched:
    """Read every process's output into bounded buffers until `main` has exited and closed its pipes,
    the deadline passes or a stream exceeds OUTPUT_LIMIT; then kill whatever is left."""
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    main_fds = {main.stdout.fileno(), main.stderr.fileno()}
    for p in procs:
        for f in (p.stdout, p.stderr):
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ)
            bufs[f.fileno()] = bytearray()
    timed_out = overflow = False
    exited_at = None
    try:
        while main_fds & set(sel.get_map()):
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if main.poll() is not None:   # its pid namespace is gone, so EOF follows at once; just in case:
                exited_at = exited_at or now
                if now - exited_at > 0.5:
                    break
            for key, _ in sel.select(timeout=min(deadline - now, 0.1)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                elif len(bufs[key.fd]) + len(chunk) > OUTPUT_LIMIT:
                    overflow = True
                    break
                else:
                    bufs[key.fd] += chunk
            if overflow:
                break
    finally:
        if not (timed_out or overflow):
            # The others normally end by themselves once main has (the candidate sees its request pipe
            # close); a moment for that keeps their own exit status (a CPU-limit kill) rather than ours.
            end = time.monotonic() + 0.5
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        killed = [p for p in procs if p.poll() is None]
        for p in procs:
            _kill(p)
        sel.close()
    for fd, buf in bufs.items():   # what the others wrote before they ended: every writer is gone now
        try:
            while len(buf) < OUTPUT_LIMIT and (chunk := os.read(fd, min(65536, OUTPUT_LIMIT - len(buf)))):
                buf += chunk
        except (BlockingIOError, OSError):
            pass
    streams = []
    for p in procs:
        pair = tuple(bytes(bufs[f.fileno()]).decode("utf-8", "replace")[-KEEP_CHARS:] for f in (p.stdout, p.stderr))
        p.stdout.close()
        p.stderr.close()
        streams.append(pair)
    return _Watched(streams, timed_out, overflow, killed)


def _kill(proc: subprocess.Popen) -> None:
    """Kill a sandbox and return only when every process in it is gone.

    bwrap is two processes: ours (proc) and its child, the first process of the new pid namespace. The
    kernel finishes that process's exit only after it has killed and reaped everything else in the
    namespace, and proc exits only after reaping it. So: SIGKILL the namespace's first process, then wait
    for proc. (Killing proc first would also end the sandbox through --die-with-parent, but the namespace
    would be torn down after we returned.) proc is killed too if it has not gone within 2 s."""
    if proc.poll() is None:
        signal_all(children_map().get(proc.pid, []), 9)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()

