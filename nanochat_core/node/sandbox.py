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
- a filesystem of its own, read-only: /usr (and the interpreter, see below), a fresh /proc and /dev,
  plus a small private /tmp in memory, nothing else: no home directory, no run directory, no /etc;
- a cleared environment (PATH, LANG, HOME=/tmp only), a new session (no terminal to inject into),
  and --die-with-parent: if the evaluating process dies, the sandbox dies with it;
- when we run as root (typical on cloud nodes) bwrap is started as user nobody (65534), so the program
  is an unprivileged user on the host too: the process-count limit applies (the kernel exempts root from
  it) and no root-owned file is its own;
- limits (CPU time, address space, file size, open files, processes), set by our runner as the first
  thing in the sandbox, where it is the pid namespace's first process (bwrap --as-pid-1: no reaper of
  bwrap's own stays in there, unbound). It then forks: the program runs in the child, and the runner stays
  as the namespace's init (it reaps, holds no pipe, and reports how the program ended, which is how a CPU
  kill is told from a program that killed itself). Every process of the sandbox descends from it after
  the limits are set, and raising a hard limit needs a privilege nobody has in there;
- a seccomp filter (a small BPF program built below, handed to bwrap with --seccomp) that refuses the
  calls that reach into another process's memory or into rarely needed kernel machinery: ptrace,
  process_vm_readv/writev, pidfd_getfd, kcmp, perf_event_open, bpf, userfaultfd, io_uring, the key
  store and kexec; and /proc is read-only, so /proc/<pid>/mem cannot be opened for writing either.
  Without a filter for this machine's architecture (x86_64 and aarch64 have one) nothing runs;
- the interpreter brings only what it needs to start: its executable, its standard library (without
  site-packages) and the shared libraries it maps, never its whole installation prefix, which can be a
  home directory (Python built with --prefix=$HOME) or / (a non-merged /bin/python3). An interpreter
  that would need a home directory, its parent or / is refused, with the reason;
- on our side: a wall-clock deadline, output read through a fixed-size buffer (a program printing
  gigabytes is killed at OUTPUT_LIMIT, our memory stays bounded), and the sandbox killed on any exit.

What bwrap needs: unprivileged user namespaces (Debian 11+, Ubuntu, Fedora allow them by default;
Ubuntu 24.04 ships an AppArmor profile that allows them for bwrap; a container must not forbid the
clone/unshare system calls in its seccomp profile) and, when we are root, an interpreter that user nobody
can read (the running one, else /usr/bin/python3; only the standard library is available inside).
CI runs as root in a VM: there bwrap runs as nobody and creates the user namespace unprivileged (checked
on Debian 12, bwrap 0.8). A call costs bwrap ~5 ms over starting Python.
Whether it works is probed once per process (_PROBE). If it does not, nothing runs: run_sandboxed returns
status "unavailable" and the HumanEval task reports itself not evaluated, with the reason. There is no weaker
fallback on purpose.

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

import ast
import math
import os
import selectors
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from nanochat_core.node.proctree import children_map, signal_all

NOBODY = 65534
OUTPUT_LIMIT = 1 << 20   # bytes per stream; more and the sandbox is killed (status "output_limit")
KEEP_CHARS = 10_000      # the tail of each stream kept in the result
MAX_PROCS = 32           # processes of the sandbox's user inside its namespace
FILE_LIMIT = 16 << 20    # largest file the program may write (its /tmp is memory)
TMP_SIZE = 64 << 20      # size of the private /tmp, where bwrap supports --size
EXIT_MEMORY = 99         # the runner's exit code when the program ran out of memory (a label, not a verdict)
EXIT_CPU = 98            # the init's exit code when the program was ended by its CPU-time limit (a label too)

# The runner, shared by all modes (the module docstring's "limits"): after its fork the child runs the program
# from the read-only file bwrap put at /sandbox/program.py, and is within the program's reach. The init is out of
# its reach: signals from inside the namespace to its init are dropped unless it installed a handler (SIGINT's
# is reset to the default here), ptrace is refused by the seccomp filter, /proc/1/mem is read-only, and it holds
# no descriptor (a pipe it kept would hide the candidate's end from the checker). When the program's process
# ends, so does the init, and the kernel then kills whatever is left in the namespace.
_LIMITS = r'''
import os, resource, sys
cpu, mem, nproc, fsize = (int(x) for x in sys.argv[1:5])
for name, soft, hard in [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", mem, mem), ("RLIMIT_DATA", mem, mem),
                         ("RLIMIT_FSIZE", fsize, fsize), ("RLIMIT_NOFILE", 64, 64), ("RLIMIT_CORE", 0, 0),
                         ("RLIMIT_NPROC", nproc, nproc)]:
    resource.setrlimit(getattr(resource, name), (soft, hard))
_child = os.fork()
if _child:
    import _signal
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    os.closerange(0, 1 << 16)
    while True:
        _pid, _status, _use = os.wait4(-1, 0)
        if _pid == _child:
            break
    _sig = os.WTERMSIG(_status) if os.WIFSIGNALED(_status) else 0
    # SIGKILL or SIGXCPU at the limit. The kernel's CPU accounting at that moment can read short of the
    # limit on a busy machine (0.93 s for 1 s was seen under load), so 0.8 of it counts: a program that kills
    # itself early has used next to none.
    if _sig in (9, 24) and _use.ru_utime + _use.ru_stime >= 0.8 * cpu:
        os._exit(%d)
    os._exit(128 + _sig if _sig else os.WEXITSTATUS(_status))
del _child


def _finish(body):
    # Run the runner's body, then end as Python's own exit would (wait for threads, atexit, flush, the
    # status of SystemExit, a traceback) minus tearing the heap down: in a forked process every page
    # that teardown touches is a page copied, which was most of what the init's fork cost.
    status = 0
    try:
        body()
    except MemoryError:
        os.write(2, b"MemoryError: the program ran out of memory\n")
        os._exit(%d)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        sys.excepthook(*sys.exc_info())
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            status = status or 120
    os._exit(status & 0xFF)
''' % (EXIT_CPU, EXIT_MEMORY)

_RUN = _LIMITS + r'''
def _body():
    code = compile(open("/sandbox/program.py", encoding="utf-8").read(), "<program>", "exec")
    try:
        exec(code, {"__name__": "__main__"})
    except SystemExit as e:
        if e.code in (None, 0):
            print("program called exit() before finishing", file=sys.stderr)
            raise SystemExit(1)
        raise


_finish(_body)
'''

# Both sides of check mode speak in frames on the pipes: a 10-digit length and the repr of a Python literal.
# The candidate's side (_SERVE) defines the program's functions, then answers calls one at a time.
_FRAMES = r'''
import ast

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

def _body():
    entry, req, resp = sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
    g = {"__name__": "__main__"}
    exec(compile(open("/sandbox/program.py", encoding="utf-8").read(), "<program>", "exec"), g)
    fn = g[entry]
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


_finish(_body)
''' % EXIT_MEMORY

# The checker (trusted test code, its own sandbox): runs check(candidate) with a stub for the candidate.
# Exit status 0 only if check() returned; that status is the verdict.
_CHECK = _LIMITS + _FRAMES + r'''
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


def _body():
    g = {"__name__": "__check__"}
    exec(compile(open("/sandbox/program.py", encoding="utf-8").read(), "<check>", "exec"), g)
    g[entry] = candidate  # some tests call the function by its name (HumanEval/33), not as `candidate`
    g["check"](candidate)
    os._exit(0)


_finish(_body)
'''


@dataclass
class ExecutionResult:
    passed: bool
    status: str   # "passed" | "failed" | "timeout" | "memory" | "output_limit" | "unavailable"
    stdout: str
    stderr: str


# -----------------------------------------------------------------------------
# The seccomp filter: a classic BPF program over struct seccomp_data (nr at offset 0, arch at offset 4),
# as an array of struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}, which bwrap installs right before it
# executes our runner (so the runner and everything after it is filtered; a filter cannot be removed).

# Per machine: the audit architecture the kernel reports (EM_* | 64-bit | little-endian) and the numbers of
# the refused calls, from the kernel's tables (x86_64's own; aarch64 uses the generic one).
_DENIED = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "perf_event_open", "bpf",
           "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "add_key", "request_key",
           "keyctl", "kexec_load", "kexec_file_load")
_SYSCALLS = {
    "x86_64": (0xC000003E, dict(zip(_DENIED, (101, 310, 311, 438, 312, 298, 321, 323, 425, 426, 427, 248, 249, 250,
                                              246, 320)))),
    "aarch64": (0xC00000B7, dict(zip(_DENIED, (117, 270, 271, 438, 272, 241, 280, 282, 425, 426, 427, 217, 218, 219,
                                               104, 294)))),
}
_EPERM = 0x00050000 | 1        # SECCOMP_RET_ERRNO | EPERM: the call fails as "Operation not permitted"
_ALLOW = 0x7FFF0000            # SECCOMP_RET_ALLOW


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The filter for this machine (or `machine`, as os.uname().machine names it); None where we have no
    table, and then there is no sandbox. A call from another ABI (i386's int 0x80 on x86_64, whose numbers
    differ) or with the x32 bit set is refused whole: nothing Python does needs either."""
    arch, numbers = _SYSCALLS.get(machine or os.uname().machine, (None, None))
    if arch is None:
        return None
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06   # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    n = len(numbers)
    prog = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, _EPERM),
            (load, 0, 0, 0), (jge, n + 1, 0, 0x40000000)]
    prog += [(jeq, n - i, 0, nr) for i, nr in enumerate(numbers.values())]   # each jumps to the final refusal
    prog += [(ret, 0, 0, _ALLOW), (ret, 0, 0, _EPERM)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _memfd(name: str, data: bytes) -> int:
    """A fresh in-memory file holding `data`, at offset 0 (bwrap reads it from there). Fresh per sandbox: two
    bwraps reading one shared descriptor would share its offset."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


# -----------------------------------------------------------------------------
# What the interpreter needs, and nothing of the host besides.

_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")   # bound whole (or as their links)

# Run by the candidate interpreter on the host (as we start it in the sandbox: -I -S): where it looks for
# its standard library, and every file it has mapped (itself, libpython when shared, libc, ...).
_NEEDS = ("import sys\n"
          "maps = [line.split(None, 5) for line in open('/proc/self/maps')]\n"
          "print(repr((sys.path, sorted({m[5].strip() for m in maps if len(m) == 6 and m[5].startswith('/')}))))\n")


def _covered(path: str) -> bool:
    return any(path == top or path.startswith(top + "/") for top in _SYSTEM)


def protected_dirs() -> list[str]:
    """Directories the sandbox must never show, even in part by showing a parent: this user's home, every
    user's (/home, /root) and the nanochat data directory (runs, keys' known_hosts, caches)."""
    found = {os.path.expanduser("~"), "/root", "/home", os.environ.get("NANOCHAT_HOME", "")}
    try:
        import pwd
        found.add(pwd.getpwuid(os.geteuid()).pw_dir)
    except (ImportError, KeyError):
        pass
    return sorted({os.path.realpath(d) for d in found if d and os.path.realpath(d) != "/"})


def _exposes(path: str, protected: list[str]) -> str | None:
    """The protected directory (or /) that binding `path` would show, else None."""
    path = os.path.realpath(path)
    if path == "/":
        return "/"
    return next((d for d in protected if d == path or d.startswith(path + "/")), None)


def interpreter_binds(python: str) -> list[str] | str:
    """bwrap arguments that give the sandbox what `python` needs to start and import its standard library
    (beyond the system directories), or a one-line reason why it cannot be given them safely.

    Not its installation prefix: that can be a home directory or /. Each needed path is bound at the path
    the interpreter uses (and at its real path where that differs); site-packages, never on the path under
    -S, is covered by an empty read-only tmpfs."""
    try:
        p = subprocess.run([python, "-I", "-S", "-c", _NEEDS], capture_output=True, text=True, timeout=20, env={},
                           stdin=subprocess.DEVNULL)
        paths, mapped = ast.literal_eval(p.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError, SyntaxError) as e:
        return f"{python} does not start ({e})"
    exe_dir = os.path.dirname(python)
    needs = [python] + [x for x in paths if os.path.exists(x)] + mapped + [
        cfg for cfg in (os.path.join(exe_dir, "pyvenv.cfg"), os.path.join(os.path.dirname(exe_dir), "pyvenv.cfg"))
        if os.path.exists(cfg)]
    protected = protected_dirs()
    args: list[str] = []
    dests: dict[str, str] = {}   # destination -> its real path
    for path in needs:
        real = os.path.realpath(path)
        for dest in dict.fromkeys((os.path.normpath(path), real)):
            if _covered(dest) or dest in dests or any(
                    dest.startswith(d + "/") and real == dr + dest[len(d):] for d, dr in dests.items()):
                continue   # the system dirs have it, or an enclosing bind shows the same file
            for shown in (dest, real):
                hit = _exposes(shown, protected)
                if hit:
                    return (f"{python} needs {shown}, which would show "
                            + ("the whole filesystem" if hit == "/" else f"{hit} (a home or data directory)")
                            + " to model code")
            dests[dest] = real
            args += ["--ro-bind", real, dest]
            if os.path.isdir(os.path.join(real, "site-packages")):
                hide = os.path.join(dest, "site-packages")
                args += ["--tmpfs", hide, "--remount-ro", hide]
    return args


# -----------------------------------------------------------------------------
# Finding a sandbox that works, once per process.

_probe_lock = threading.Lock()
_probed: dict[tuple, tuple[list[str], dict] | str] = {}


def _bwrap_prefix(bwrap: str, binds: list[str], features: str) -> list[str]:
    """bwrap's arguments up to the interpreter: namespaces and the filesystem the program sees."""
    args = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--as-pid-1",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "HOME", "/tmp", "--setenv", "PYTHONHASHSEED", "0", "--setenv", "OMP_NUM_THREADS", "1",
            "--ro-bind", "/usr", "/usr"]
    if "--disable-userns" in features:  # no nested user namespaces: less kernel surface inside
        args.append("--disable-userns")
    for top in _SYSTEM[1:]:  # merged-/usr links, or real dirs
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev"]
    if "--size" in features:
        args += ["--size", str(TMP_SIZE)]
    # the interpreter's binds after the private /tmp, which would otherwise cover one that lives under /tmp
    return args + ["--tmpfs", "/tmp"] + binds + ["--dir", "/sandbox", "--chdir", "/tmp"]


# Last of the setup (after the program file is in place): the sandbox's root and /dev are tmpfs that bwrap
# builds; made read-only, the program can write only its size-capped /tmp (the device nodes keep working).
# /proc read-only: /proc/<pid>/mem of another process in there cannot be opened for writing.
_READ_ONLY = ["--remount-ro", "/dev", "--remount-ro", "/proc", "--remount-ro", "/"]


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


# The probe, run directly as the sandbox's pid 1 (no runner): it must really be inside, a new pid namespace, no
# network but lo, a root it cannot write to, and our seccomp filter on it.
_PROBE = ("import os, socket\n"
          "print(os.getpid() == 1, [n for _, n in socket.if_nameindex()] == ['lo'],\n"
          "      'Seccomp:\\t2' in open('/proc/self/status').read())\n"
          "try:\n    open('/x', 'w')\nexcept OSError:\n    print(True)\n")


def _probe(bwrap: str | None) -> tuple[list[str], dict] | str:
    if bwrap is None:
        return ("no sandbox: bubblewrap (bwrap) is not installed; install it (apt-get install bubblewrap) "
                "to evaluate model-written code")
    if seccomp_filter() is None:
        return (f"no sandbox: no seccomp filter for this machine's architecture ({os.uname().machine}); "
                "model code is evaluated only on x86_64 and aarch64")
    # As root, run bwrap as nobody (see the module docstring); otherwise as ourselves.
    popen = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    try:
        features = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"no sandbox: {bwrap} does not run ({e})"
    candidates = list(dict.fromkeys(os.path.realpath(p) for p in (sys.executable, "/usr/bin/python3")
                                    if os.path.exists(p)))
    whys = []
    for python in candidates:
        binds = interpreter_binds(python)
        if isinstance(binds, str):
            whys.append(binds)
            continue
        prefix = _bwrap_prefix(bwrap, binds, features)
        sfd = _memfd("seccomp", seccomp_filter())
        try:
            p = subprocess.run(prefix + ["--seccomp", str(sfd)] + _READ_ONLY + ["--", python, "-I", "-S", "-c", _PROBE],
                               capture_output=True, text=True, timeout=20, env={}, stdin=subprocess.DEVNULL,
                               pass_fds=[sfd], **popen)
        except (OSError, subprocess.SubprocessError) as e:
            whys.append(f"{python}: {e}")
            continue
        finally:
            os.close(sfd)
        if p.returncode == 0 and p.stdout.split() == ["True"] * 4:
            return prefix + ["--", python, "-I", "-S"], popen
        whys.append(f"{python}: " + (p.stderr.strip().splitlines() or [f"exit code {p.returncode}, {p.stdout.split()}"])[-1][:300])
    why = "; ".join(whys) or "no Python interpreter found"
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
        if 128 < rc < 128 + 65:   # the init's word for "ended by a signal" (bwrap's own, if the init was killed)
            se += f"\n[the program was ended by signal {rc - 128}]"
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
    """One sandbox: `source` appears read-only at /sandbox/program.py (copied in by bwrap from a memfd), and the
    seccomp filter is read by bwrap from another."""
    memfd = sfd = None   # ours to close whatever happens: the sandbox gets its own copies
    try:
        memfd = _memfd("program", source.encode("utf-8"))
        sfd = _memfd("seccomp", seccomp_filter())
        argv0 = prefix.index("--")
        cmd = (prefix[:argv0] + ["--seccomp", str(sfd), "--ro-bind-data", str(memfd), "/sandbox/program.py"]
               + _READ_ONLY + prefix[argv0:] + ["-c", runner] + argv)
        # env={}: bwrap itself runs as a host process (as nobody when we are root); nothing to read there.
        return subprocess.Popen(cmd, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=[memfd, sfd] + fds, start_new_session=True, **popen)
    finally:
        for fd in (memfd, sfd):
            if fd is not None:
                os.close(fd)


@dataclass
class _Watched:
    streams: list[tuple[str, str]]  # (stdout, stderr) per process, tails
    timed_out: bool
    overflow: bool
    killed: list                    # the processes we killed (their exit status is ours, not theirs)


def _cpu_killed(proc: subprocess.Popen, out: _Watched) -> bool:
    """Ended by its CPU-time limit, as the sandbox's init saw it (the program's CPU time had reached the limit
    when SIGXCPU or SIGKILL ended it). A program that killed itself is not a timeout."""
    return proc not in out.killed and proc.returncode == EXIT_CPU


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

