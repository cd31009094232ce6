"""The HumanEval sandbox: an honest solution passes, limits hold, and the escapes of the old Python-level
sandbox (issue 12 section 1) fail against the operating-system one. Real bwrap, real processes, real
sockets; the only fake is a `bwrap` that cannot create namespaces (a kernel or container that forbids them)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from nanochat_core.node import sandbox as execution
from nanochat_core.common import NanochatError
from nanochat_core.node.sandbox import run_sandboxed

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n"
ADD_CHECK = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def _helper(code: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a separate Python process (ours, with this worktree's nanochat_core): for escapes that
    would take the test process down with them."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def _humaneval_task(tmp_path):
    from nanochat_core.tasks.humaneval import HumanEval
    row = {"task_id": "HumanEval/0", "entry_point": "add",
           "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
           "canonical_solution": "    return a + b\n", "test": ADD_CHECK}
    path = tmp_path / "he.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return HumanEval(data_files=path, timeout=2)


# ---- what must still work ----------------------------------------------------------------------

@pytest.mark.needs_tool("bwrap")
def test_correct_solution_passes():
    r = run_sandboxed(SOLUTION, timeout=5)
    assert r.passed and r.status == "passed"
    assert r.stdout.strip() == "ok"


@pytest.mark.needs_tool("bwrap")
def test_wrong_solution_fails():
    r = run_sandboxed("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", timeout=5)
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr


@pytest.mark.needs_tool("bwrap")
def test_check_mode_passes_honest_and_fails_wrong_code():
    r = run_sandboxed("def add(a, b):\n    print('adding', a, b)\n    return a + b\n", timeout=5,
                      check=ADD_CHECK, entry_point="add")
    assert r.passed and r.status == "passed" and "adding 2 3" in r.stdout
    r = run_sandboxed("def add(a, b):\n    return a * b\n", timeout=5, check=ADD_CHECK, entry_point="add")
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr
    r = run_sandboxed("def add(a, b):\n    raise ValueError('nope')\n", timeout=5, check=ADD_CHECK, entry_point="add")
    assert not r.passed and "ValueError: nope" in r.stderr
    # tests that call the function by its own name (HumanEval/33 does) reach the candidate too
    by_name = "def add(a, b):\n    pass\n\ndef check(candidate):\n    assert add(2, 3) == 5\n"
    assert run_sandboxed("def add(a, b):\n    return a + b\n", timeout=5, check=by_name, entry_point="add").passed
    assert not run_sandboxed("def add(a, b):\n    return 0\n", timeout=5, check=by_name, entry_point="add").passed


# "Killed" is an outcome, not a duration: each program below would run for a minute (60 x its timeout) and then
# exit 0 by itself, so "timeout" can only mean the sandbox ended it first. Those 60 s are the tests' hang
# guard on a broken sandbox, which fails them with "passed" instead of hanging. No wall-clock bound: a busy
# machine makes the call slower, not its outcome different.
_SPIN_A_MINUTE = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


@pytest.mark.needs_tool("bwrap")
def test_infinite_loop_is_killed():
    r = run_sandboxed(_SPIN_A_MINUTE, timeout=1)
    assert not r.passed and r.status == "timeout", (r.status, r.stderr[-500:])
    spin_in_add = "def add(a, b):\n    import time\n    end = time.time() + 60\n    while time.time() < end: pass\n"
    r = run_sandboxed(spin_in_add, timeout=1, check=ADD_CHECK, entry_point="add")
    assert not r.passed and r.status == "timeout", (r.status, r.stderr[-500:])


@pytest.mark.needs_tool("bwrap")
def test_sleeping_program_is_killed():
    """No CPU used: only the wall-clock deadline can end it before its own minute is up."""
    r = run_sandboxed("import time\ntime.sleep(60)\n", timeout=1)
    assert not r.passed and r.status == "timeout", (r.status, r.stderr[-500:])


@pytest.mark.needs_tool("bwrap")
def test_memory_bomb_is_stopped():
    r = run_sandboxed("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n", timeout=10, memory_mb=256)
    assert not r.passed and r.status == "memory"


# ---- the escapes ---------------------------------------------------------------------------------

@pytest.mark.needs_tool("bwrap")
def test_files_outside_cannot_be_deleted(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    v = str(victim)
    for prog in [f"import posix\nposix.unlink({v!r})\n",
                 f"import importlib, os\nimportlib.reload(os)\nos.remove({v!r})\n",
                 "import sys\nfor m in ('ctypes', '_ctypes'):\n    sys.modules.pop(m, None)\nimport ctypes\n"
                 f"libc = ctypes.CDLL(None)\nassert libc.unlink({v.encode()!r}) == 0\n",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                 f"import subprocess\nsubprocess.run(['rm', '-f', {v!r}], check=True)\n"]:
        run_sandboxed(prog, timeout=5)
        assert victim.read_text() == "keep me", prog
    r = run_sandboxed(f"import posix\nposix.unlink({v!r})\n", timeout=5)
    assert r.status == "failed" and "FileNotFoundError" in r.stderr  # the file is not even visible


@pytest.mark.needs_tool("bwrap")
def test_only_a_small_private_tmp_is_writable(tmp_path):
    prog = ("import os\n"
            f"for path in ['/x', '/dev/x', '/usr/x', {str(tmp_path / 'new.txt')!r}]:\n"
            "    try:\n"
            "        open(path, 'w')\n"
            "        print('wrote', path)\n"
            "    except OSError:\n"
            "        pass\n"
            "for i in range(8):\n"   # 8 x 15 MB > the 64 MB /tmp
            "    open(f'/tmp/f{i}', 'wb').write(bytes(15 << 20))\n")
    r = run_sandboxed(prog, timeout=5)
    assert "wrote" not in r.stdout and not (tmp_path / "new.txt").exists()
    supports_size = "--size" in subprocess.run(["bwrap", "--help"], capture_output=True, text=True).stdout
    if supports_size:   # bwrap >= 0.7 caps the tmpfs; older ones leave only the per-file limit
        assert r.status == "failed" and "No space left on device" in r.stderr


@pytest.mark.needs_tool("bwrap")
def test_the_evaluating_process_cannot_be_killed():
    # In a helper process, so that on a broken sandbox the helper dies and not pytest. Never kill(-1) here:
    # on a broken sandbox, as root, that would kill every process on the machine.
    prog = "import os, posix\\nposix.kill(os.getppid(), 9)\\nposix.kill(%d, 9)\\n"
    p = _helper("import os\nfrom nanochat_core.node.sandbox import run_sandboxed\n"
                f"r = run_sandboxed('{prog}' % os.getpid(), timeout=5)\n"
                "print('alive', r.status)\n")
    assert p.returncode == 0 and "alive failed" in p.stdout, (p.returncode, p.stdout, p.stderr)


@pytest.mark.needs_tool("bwrap")
def test_secrets_in_the_environment_cannot_be_read():
    """The evaluating process holds a token in its environment from its start (as a pipeline stage would):
    /proc/<pid>/environ shows that initial block, so the evaluation runs in a helper started with it."""
    secret = "hf_" + uuid.uuid4().hex
    # The program prints only HF_TOKEN entries and the helper only whether the secret came back: on a
    # broken sandbox this would otherwise print every process's environment into the test log.
    prog = ("import os\n"
            "print(os.environ.get('HF_TOKEN'))\n"
            "for pid in ['self', str(os.getppid()), '%d'] + os.listdir('/proc'):\n"
            "    try:\n"
            "        env = open(f'/proc/{pid}/environ', 'rb').read().split(bytes(1))\n"
            "        print(pid, [e for e in env if e.startswith(b'HF_TOKEN=')])\n"
            "    except OSError as e:\n"
            "        print(pid, e)\n")
    p = _helper("import os\nfrom nanochat_core.node.sandbox import run_sandboxed\n"
                f"r = run_sandboxed({prog!r} % os.getpid(), timeout=5)\n"
                "print(r.status, os.environ['HF_TOKEN'] in r.stdout + r.stderr)\n", env={"HF_TOKEN": secret})
    assert p.stdout.split() == ["passed", "False"], "the secret reached the sandbox (or it did not run)"


def test_stages_that_run_model_code_get_no_secrets():
    from nanochat_core.stages.pipeline import stage_env
    env = {"HF_TOKEN": "hf_x", "WANDB_API_KEY": "w", "AWS_SECRET_ACCESS_KEY": "a", "PATH": "/usr/bin",
           "TOKENIZERS_PARALLELISM": "false"}
    clean = {"PATH": "/usr/bin", "TOKENIZERS_PARALLELISM": "false", "NANOCHAT_WANDB": "0"}   # wandb: via the pipeline
    assert stage_env("eval", env) == clean
    assert stage_env("report", env) == clean
    assert stage_env("base", env) == env   # training may download gated data or log


@pytest.mark.needs_tool("bwrap")
def test_a_pass_cannot_be_forged(tmp_path):
    """The old runner kept a nonce in its globals and trusted the child to print it at the end."""
    task = _humaneval_task(tmp_path)
    conv = task[0]
    assert task.evaluate(conv, conv["messages"][1]["content"])   # the reference passes
    forged = ["import sys, posix\nprint(sys.modules['__main__'].nonce)\nposix._exit(0)\n",
              "import posix\ndef add(a, b):\n    posix._exit(0)\n",
              "import sys\ndef add(a, b):\n    sys.exit(0)\n",
              # an object equal to everything: must not survive the trip back to the checker
              "class Yes:\n    def __eq__(self, other):\n        return True\n"
              "def add(a, b):\n    return Yes()\n",
              # writing a plausible answer frame to every descriptor it can find
              "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0000000012(\"ok\", None)')\n"
              "    except OSError:\n        pass\nos._exit(0)\n"]
    for code in forged:
        assert not task.evaluate(conv, f"```python\n{code}```"), code


@pytest.mark.needs_tool("bwrap")
def test_memory_status_cannot_be_spoofed():
    r = run_sandboxed("import sys\nprint('MemoryError')\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)\n",
                      timeout=5)
    assert not r.passed and r.status == "failed"


@pytest.mark.needs_tool("bwrap")
def test_huge_output_keeps_the_caller_bounded():
    # Peak memory of the helper as VmHWM (this process image only; ru_maxrss would carry pytest's over exec).
    # The helper caps its own address space at 1.5 GB so a broken sandbox fails the test, not the machine.
    # "output_limit" rather than "timeout" says the flood was cut by the limit, not by its deadline (31 s: a busy
    # machine cannot make it win); how many seconds that took is not the point.
    p = _helper("import re, resource\nresource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
                "from nanochat_core.node.sandbox import run_sandboxed\n"
                "flood = 'import os\\nb = b\"x\" * (1 << 20)\\nwhile True:\\n    os.write(1, b)\\n'\n"
                "r = run_sandboxed(flood, timeout=30)\n"
                "print(r.status, len(r.stdout), "
                "int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)\n")
    status, kept, peak_mb = p.stdout.split()
    assert status == "output_limit" and int(kept) <= execution.KEEP_CHARS, p.stdout
    assert int(peak_mb) < 100, p.stdout


def _running(marker: str) -> list[str]:
    left = []
    for pid in os.listdir("/proc"):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(pid)
        except OSError:
            pass
    return left


@pytest.mark.needs_tool("bwrap")
@pytest.mark.parametrize("main_ends", [True, False], ids=["program-ends", "program-times-out"])
def test_forked_and_setsid_children_die_with_the_call(main_ends):
    """A setsid'd child holds the output pipe for a minute and then writes to it; its child is a `sleep`. The
    call must end with the program (or at its deadline) and take both with it. Told by outcomes, not seconds:
    a call the holder stretched would run into its deadline ("timeout" where the program ended by itself), or
    would carry the holder's last words; a survivor shows in /proc."""
    marker = f"59.{uuid.uuid4().int % 10**6:06d}"  # a sleep that ends by itself even on a broken sandbox
    prog = ("import os, posix, time\n"
            "if posix.fork() == 0:\n"
            "    os.setsid()\n"
            "    if posix.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            "    time.sleep(60)\n"   # holds the output pipe far longer than either call may last
            "    print('holder done', flush=True)\n"
            "    posix._exit(0)\n"
            "print('parent done', flush=True)\n"
            + ("" if main_ends else "time.sleep(120)\n"))
    # Program ends: a deadline (31 s) the program itself cannot miss however busy the machine, but the holder
    # (60 s) would. Program times out: a deadline (4 s) it reaches while asleep, with room to print first.
    r = run_sandboxed(prog, timeout=30 if main_ends else 3)
    assert r.status == ("passed" if main_ends else "timeout"), (r.status, r.stdout, r.stderr[-500:])
    assert "parent done" in r.stdout
    assert "holder done" not in r.stdout, "the call waited for the child holding the pipe"
    assert not _running(marker), "sandbox processes outlived the call"   # at once: no grace period


@pytest.mark.needs_tool("bwrap")
def test_network_is_unreachable(tmp_path):
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = str(tmp_path / "s.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen()
    accepted = []

    def serve(server):
        server.settimeout(10)
        try:
            accepted.append(server.accept())
        except OSError:
            pass
    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in (tcp, unix)]
    for t in threads:
        t.start()
    port = tcp.getsockname()[1]
    prog = ("import _socket\n"   # below the socket module: no Python-level guard can intercept this
            f"for family, addr in [(_socket.AF_INET, ('127.0.0.1', {port})), (_socket.AF_UNIX, {unix_path!r})]:\n"
            "    s = _socket.socket(family, _socket.SOCK_STREAM)\n"
            "    s.settimeout(2)\n"
            "    try:\n"
            "        s.connect(addr)\n"
            "        print('connected', addr)\n"
            "    except OSError as e:\n"
            "        print('refused', addr, e)\n")
    try:
        r = run_sandboxed(prog, timeout=5)
        lines = r.stdout.splitlines()
        assert r.status == "passed" and [x.split()[0] for x in lines] == ["refused", "refused"], r.stdout + r.stderr
        assert not accepted
    finally:
        tcp.close()
        unix.close()


# Issue 21: the sandbox's first process was bwrap's own reaper, outside the limits: a program could attach to
# it with ptrace and make it exec a program of its own, which then had the host's limits. This is that attack,
# for real (the register-level part on x86_64 only). It aims only at pid 1 of its own pid namespace, checks
# first that it is in one, and what the injected program does is bounded (a few sleeps, some memory, 3 s).
_ATTACK = r'''
import ctypes, os, platform, sys
MARK = %(mark)r
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
libc.syscall.restype = ctypes.c_long


def inject():
    # GETREGS order: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ...
    regs = (ctypes.c_ulonglong * 27)()
    libc.ptrace(12, 1, None, regs)
    code = ("import os, time\n"
            "for i in range(%(forks)d):\n"
            "    if os.fork() == 0:\n"
            "        os.execv('/bin/sleep', ['sleep', %(mark)r])\n"
            "b = bytearray(%(mb)d << 20)\n"
            "time.sleep(3)\n")
    strings = [sys.executable.encode(), b"-S", b"-c", code.encode(), MARK.encode()]
    sp = regs[19] - 65536
    blob, ptrs = b"", []
    for s in strings:
        ptrs.append(sp + len(blob))
        blob += s + bytes(1)
    blob += bytes(-len(blob) %% 8)
    argv = sp + len(blob)
    for p in ptrs + [0]:
        blob += p.to_bytes(8, "little")
    for i in range(0, len(blob), 8):   # POKEDATA, 8 bytes at a time, below its stack pointer
        libc.ptrace(5, 1, ctypes.c_void_p(sp + i), ctypes.c_void_p(int.from_bytes(blob[i:i + 8], "little")))
    regs[10], regs[15] = 59, 2**64 - 1               # rax = execve, orig_rax = -1 (no syscall restart)
    regs[14], regs[13], regs[12] = ptrs[0], argv, 0  # rdi, rsi, rdx
    regs[16] -= 2                                    # rip back onto the syscall instruction it stopped after
    libc.ptrace(13, 1, None, regs)


init = open("/proc/1/cmdline", "rb").read()
if os.getpid() > 10 or not (b"bwrap" in init or b"python" in init):
    raise SystemExit("not inside a sandbox's pid namespace: not attacking")   # never aim at a host's pid 1
try:
    open("/proc/1/mem", "r+b").close()
    print("mem-open ok")
except OSError as e:
    print("mem-open denied", e.errno)
buf = ctypes.create_string_buffer(8)
iov = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
nr = {"x86_64": 311, "aarch64": 271}[platform.machine()]   # process_vm_writev
r = libc.syscall(nr, 1, iov, 1, iov, 1, 0)
print("vm-writev", "denied" if r < 0 and ctypes.get_errno() == 1 else "ok")
if libc.ptrace(16, 1, None, None) != 0:   # PTRACE_ATTACH
    print("attach denied", ctypes.get_errno())
else:
    print("attach ok", flush=True)
    os.waitpid(1, 0x40000000)   # __WALL: wait for the stop
    if platform.machine() == "x86_64":
        inject()
    libc.ptrace(17, 1, None, None)   # DETACH: pid 1 runs on (on x86_64: our program, with its own limits)
    print("detached", flush=True)
'''


def _watch(marker: str, seen: dict, stop: threading.Event) -> None:
    # From outside: how many processes carry the marker at once, and the most memory any of them holds.
    while not stop.is_set():
        n = 0
        for pid in os.listdir("/proc"):
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    n += 1
                    rss = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
                    seen["rss_mb"] = max(seen["rss_mb"], int(rss.group(1)) // 1024 if rss else 0)
            except OSError:
                pass
        seen["procs"] = max(seen["procs"], n)
        stop.wait(0.05)


@pytest.mark.needs_tool("bwrap")
def test_ptrace_on_pid_1_is_refused_and_every_process_stays_within_the_limits(monkeypatch):
    monkeypatch.setattr(execution, "MAX_PROCS", 8)
    marker = f"57.{uuid.uuid4().int % 10**6:06d}"
    seen, stop = {"procs": 0, "rss_mb": 0}, threading.Event()
    watcher = threading.Thread(target=_watch, args=(marker, seen, stop), daemon=True)
    watcher.start()
    try:
        r = run_sandboxed(_ATTACK % {"mark": marker, "forks": 12, "mb": 300}, timeout=4, memory_mb=128)
    finally:
        stop.set()
        watcher.join()
    assert "attach denied 1" in r.stdout, r.stdout + r.stderr      # EPERM from the seccomp filter
    assert "mem-open denied 30" in r.stdout                         # EROFS: /proc is read-only
    assert "vm-writev denied" in r.stdout
    assert seen["procs"] <= 8 and seen["rss_mb"] < 128, seen
    assert not _running(marker)


@pytest.mark.needs_tool("bwrap")
def test_the_seccomp_filter_refuses_what_it_lists_and_nothing_else():
    prog = ("import ctypes, os, platform\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.syscall.restype = ctypes.c_long\n"
            "nrs = {'x86_64': (101, 321, 425, 39), 'aarch64': (117, 280, 425, 172)}[platform.machine()]\n"
            "for nr in nrs:\n"   # ptrace, bpf, io_uring_setup with bad arguments; getpid
            "    r = libc.syscall(nr, -1, 0, 0, 0)\n"
            "    print(r, ctypes.get_errno() if r < 0 else 0)\n")
    r = run_sandboxed(prog, timeout=5)
    lines = r.stdout.split("\n")
    assert r.status == "passed", r.stderr
    assert lines[:3] == ["-1 1"] * 3 and lines[3].split()[1] == "0" and int(lines[3].split()[0]) > 1, r.stdout
    assert execution.seccomp_filter("riscv64") is None   # no table: no sandbox, rather than no filter


@pytest.mark.needs_tool("bwrap")
def test_a_program_that_kills_itself_failed_it_did_not_time_out():
    r = run_sandboxed("import os\nprint('bye', flush=True)\nos.kill(os.getpid(), 9)\n", timeout=5)
    assert r.status == "failed" and "signal 9" in r.stderr and r.stdout == "bye\n"
    r = run_sandboxed("import os\nos.kill(1, 9)\nprint('still here')\n", timeout=5)   # the init ignores it
    assert r.status == "passed" and r.stdout == "still here\n"
    # the candidate dying mid-call: the checker sees its pipe close (the init holds no copy) and fails at once
    r = run_sandboxed("def add(a, b):\n    import os\n    os._exit(3)\n", timeout=5, check=ADD_CHECK, entry_point="add")
    assert r.status == "failed" and "EOFError" in r.stderr, r


@pytest.mark.needs_tool("bwrap")
def test_an_interpreter_installed_in_a_home_directory_does_not_show_that_home():
    # Python configured with --prefix=$HOME: a copy of the system interpreter in $HOME/bin finds its standard
    # library at $HOME/lib/python3.X, so its sys.prefix is the home. (Not under pytest's root-only tmp: the
    # sandbox may run as nobody, and a home is often world-readable; and not under /tmp where there is another
    # place, since the sandbox's private /tmp would hide it from the old, whole-prefix bind.)
    system = Path("/usr/bin/python3").resolve()
    if not system.exists():
        pytest.skip("needs a system /usr/bin/python3 to copy")
    stdlib = subprocess.run([str(system), "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    home = Path(tempfile.mkdtemp(prefix="nanochat_home_", dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else None))
    try:
        home.chmod(0o755)
        (home / "bin").mkdir()
        python = home / "bin" / "python3"
        shutil.copy2(system, python)
        (home / "lib").mkdir()
        (home / "lib" / Path(stdlib).name).symlink_to(stdlib)
        secret = "ssh-" + uuid.uuid4().hex
        (home / ".ssh").mkdir()
        (home / ".ssh" / "id_rsa").write_text(secret)
        (home / ".ssh" / "id_rsa").chmod(0o644)
        prog = ("import os, sys\n"
                "print(sys.executable, sys.prefix)\n"
                f"for path in [{str(home / '.ssh' / 'id_rsa')!r}, {str(home)!r}, '/']:\n"
                "    try:\n"
                "        print(path, open(path).read() if os.path.isfile(path) else sorted(os.listdir(path)))\n"
                "    except OSError as e:\n"
                "        print(path, type(e).__name__)\n")
        p = subprocess.run([str(python), "-c", "import sys\nfrom nanochat_core.node.sandbox import run_sandboxed\n"
                            f"r = run_sandboxed({prog!r}, timeout=10)\nprint(r.status)\nprint(r.stdout)\nprint(r.stderr)\n"],
                           capture_output=True, text=True, timeout=60,
                           env={"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
        out = p.stdout
        assert p.returncode == 0 and out.startswith("passed\n"), out + p.stderr
        assert f"{python} {home}" in out, out   # it really ran the interpreter under the home
        assert secret not in out
        assert f"{home / '.ssh' / 'id_rsa'} FileNotFoundError" in out
        assert f"{home} ['bin', 'lib']" in out   # only what the interpreter needs
        # and site-packages, not needed under -S, stays hidden (an empty read-only directory)
        binds = execution.interpreter_binds(str(python))
        assert str(home) not in binds[2::3] and not any(b.endswith("/.ssh") for b in binds)
    finally:
        shutil.rmtree(home)


def test_an_interpreter_that_would_show_a_home_or_data_dir_is_refused(monkeypatch, tmp_path):
    stdlib = os.path.dirname(os.__file__)
    monkeypatch.setenv("NANOCHAT_HOME", os.path.join(stdlib, "nanochat-data"))
    why = execution.interpreter_binds(os.path.realpath(sys.executable))
    if os.path.realpath(stdlib).startswith("/usr/"):   # covered by /usr, which is bound whole anyway
        assert isinstance(why, list)
    else:
        assert isinstance(why, str) and "nanochat-data" in why and "home or data directory" in why, why
    assert execution._exposes("/", ["/root"]) == "/"
    assert execution._exposes("/home", ["/home/ann"]) == "/home/ann"
    assert execution._exposes("/home/ann/.pyenv/versions/3.11/lib/python3.11", ["/home/ann"]) is None


# ---- no isolation: nothing runs -------------------------------------------------------------------

def test_without_bwrap_nothing_runs_and_humaneval_is_not_evaluated(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = run_sandboxed("print('ran')\n", timeout=5)
    assert r.status == "unavailable" and not r.passed and r.stdout == ""
    assert "bubblewrap" in r.stderr
    with pytest.raises(NanochatError, match="HumanEval not evaluated: no sandbox"):
        _humaneval_task(tmp_path)
    from nanochat_core.evaluation.runners import evaluate_tasks
    metrics, unavailable = evaluate_tasks(None, None, ["HumanEval"], 1, "cpu")
    assert unavailable == ["HumanEval"] and "HumanEval" not in metrics


def test_bwrap_without_namespaces_is_unavailable(monkeypatch):
    """A bwrap that exists but cannot create namespaces (as in a locked-down container) is no sandbox."""
    import shutil
    import tempfile
    bindir = Path(tempfile.mkdtemp(prefix="nanochat_fakebwrap_"))  # not under pytest's root-only tmp: nobody runs it
    try:
        bindir.chmod(0o755)
        fake = bindir / "bwrap"
        fake.write_text("#!/bin/sh\n[ \"$1\" = --help ] && exit 0\n"
                        "echo 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
        r = run_sandboxed("print('ran')\n", timeout=5)
        assert r.status == "unavailable" and r.stdout == ""
        assert "No permissions to creating new namespace" in r.stderr
    finally:
        shutil.rmtree(bindir)
