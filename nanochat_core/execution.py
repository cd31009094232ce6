"""
A sandbox for running model-written code (HumanEval): a separate Python process with hard limits.

What it guarantees, and how:
- time: a CPU-time rlimit (the kernel kills a busy loop) plus a wall-clock timeout on our side that
  kills the whole process group (a sleeping or blocked program);
- memory: an address-space rlimit, so a memory bomb dies with MemoryError instead of taking the node;
- processes and files: rlimits on forks, open files and written file size;
- network: a fresh network namespace when the kernel lets us make one (root, or user namespaces), and
  in every case the socket module is disabled inside the child;
- destructive calls: before the program runs, the child replaces os.remove / unlink / rmdir / kill /
  fork / system, shutil.rmtree, subprocess and friends with a function that raises.
It runs in an empty temporary directory that is deleted afterwards.

This is defence in depth for benchmark code, not a security boundary against a determined attacker
(nanochat's and OpenAI's HumanEval harnesses make the same trade): do not run untrusted code outside it.
"""
from __future__ import annotations

import ctypes
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs inside the child before the program: limits Python-level escape hatches, then executes it.
# The "passed" nonce is printed only if the program ran to the end without raising, so an early
# exit(0) in the program cannot fake a pass.
_RUNNER = r'''
import builtins, os, sys
nonce = os.environ.pop("NANOCHAT_SANDBOX_NONCE", "")
program = open(sys.argv[1], encoding="utf-8").read()

def _blocked(*args, **kwargs):
    raise PermissionError("disabled in the nanochat sandbox")

class _NoSocket:  # a class, so that modules subclassing socket.socket (ssl) still import
    def __init__(self, *args, **kwargs):
        _blocked()

import socket
socket.socket = socket.SocketType = _NoSocket
socket.create_connection = socket.socketpair = socket.fromfd = socket.getaddrinfo = _blocked
for name in ["remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
             "kill", "killpg", "fork", "forkpty", "system", "popen", "putenv", "chmod", "chown",
             "fchmod", "fchown", "lchown", "chroot", "setuid", "setgid", "execv", "execve", "execvp",
             "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle",
             "posix_spawn", "posix_spawnp", "_exit", "abort", "link", "symlink", "mkfifo", "mknod"]:
    if hasattr(os, name):
        setattr(os, name, _blocked)
import shutil, subprocess
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = _blocked
subprocess.check_output = subprocess.getoutput = subprocess.getstatusoutput = _blocked
sys.modules["ctypes"] = None  # no calling libc behind our back
sys.modules["_ctypes"] = None
builtins.exit = builtins.quit = _blocked

try:
    exec(compile(program, "<program>", "exec"), {"__name__": "__main__"})
except SystemExit as e:
    if e.code not in (None, 0):
        raise
    print("program called exit() before finishing", file=sys.stderr)
    sys.exit(1)
sys.stdout.flush()
print("\n" + nonce, flush=True)
'''

_CLONE_NEWNET = 0x40000000
try:  # looked up here, not in the forked child: dlopen after fork in a threaded process can deadlock
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


@dataclass
class ExecutionResult:
    passed: bool
    status: str   # "passed" | "failed" | "timeout" | "memory"
    stdout: str
    stderr: str


def _limit_child(timeout: float, memory_mb: int) -> None:
    """preexec_fn: runs in the child between fork and exec."""
    cpu = max(1, int(timeout + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:  # forks: effective for non-root users (root ignores it; the runner blocks fork anyway)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass
    if _LIBC is not None:  # an empty network namespace: no interfaces, not even loopback to the host's services
        _LIBC.unshare(_CLONE_NEWNET)  # fails quietly (returns -1) without the privilege: socket guard remains


def run_sandboxed(program: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run a Python program under the limits above. passed = it ran to the end without an exception."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="nanochat_sandbox_") as work:
        path = Path(work) / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "NANOCHAT_SANDBOX_NONCE": nonce, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER, str(path)], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=lambda: _limit_child(timeout, memory_mb))
        try:
            out, err = proc.communicate(timeout=timeout + 1.0)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
    out_s = out.decode("utf-8", "replace")[-10_000:]
    err_s = err.decode("utf-8", "replace")[-10_000:]
    killed_by_cpu = proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    if timed_out or killed_by_cpu:
        return ExecutionResult(False, "timeout", out_s, err_s)
    if "MemoryError" in err_s:
        return ExecutionResult(False, "memory", out_s, err_s)
    passed = proc.returncode == 0 and out_s.rstrip().endswith(nonce)
    if passed:
        out_s = out_s.rstrip()[: -len(nonce)].rstrip("\n")
    return ExecutionResult(passed, "passed" if passed else "failed", out_s, err_s)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
