"""The HumanEval sandbox: an honest solution passes, limits hold, and the escapes of the old Python-level
sandbox (issue 12 section 1) fail against the operating-system one. Real bwrap, real processes, real
sockets; the only fake is a `bwrap` that cannot create namespaces (a kernel or container that forbids them)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from nanochat_core import execution
from nanochat_core.common import NanochatError
from nanochat_core.execution import run_sandboxed

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


@pytest.mark.needs_tool("bwrap")
def test_infinite_loop_is_killed():
    t0 = time.time()
    r = run_sandboxed("while True:\n    pass\n", timeout=1)
    assert not r.passed and r.status == "timeout"
    assert time.time() - t0 < 5
    r = run_sandboxed("def add(a, b):\n    while True: pass\n", timeout=1, check=ADD_CHECK, entry_point="add")
    assert not r.passed and r.status == "timeout"


@pytest.mark.needs_tool("bwrap")
def test_sleeping_program_is_killed():
    t0 = time.time()
    r = run_sandboxed("import time\ntime.sleep(60)\n", timeout=1)
    assert r.status == "timeout" and time.time() - t0 < 5


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
    p = _helper("import os\nfrom nanochat_core.execution import run_sandboxed\n"
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
    p = _helper("import os\nfrom nanochat_core.execution import run_sandboxed\n"
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
    p = _helper("import re, resource, time\nresource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
                "from nanochat_core.execution import run_sandboxed\n"
                "t0 = time.time()\n"
                "flood = 'import os\\nb = b\"x\" * (1 << 20)\\nwhile True:\\n    os.write(1, b)\\n'\n"
                "r = run_sandboxed(flood, timeout=2)\n"
                "print(r.status, len(r.stdout), round(time.time() - t0, 2), "
                "int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)\n")
    status, kept, seconds, peak_mb = p.stdout.split()
    assert status == "output_limit" and int(kept) <= execution.KEEP_CHARS, p.stdout
    assert float(seconds) < 3 and int(peak_mb) < 100, p.stdout


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
    marker = f"59.{uuid.uuid4().int % 10**6:06d}"  # a sleep that ends by itself even on a broken sandbox
    prog = ("import os, posix, time\n"
            "if posix.fork() == 0:\n"
            "    os.setsid()\n"
            "    if posix.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            "    time.sleep(30)\n"   # holds the output pipe
            "    posix._exit(0)\n"
            "time.sleep(0.3)\n"
            "print('parent done', flush=True)\n"
            + ("" if main_ends else "time.sleep(60)\n"))
    t0 = time.time()
    r = run_sandboxed(prog, timeout=1)
    assert time.time() - t0 < 4, "a grandchild holding the pipe stretched the call"
    assert r.status == ("passed" if main_ends else "timeout")
    assert "parent done" in r.stdout
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
    from nanochat_core.evaluation import evaluate_tasks
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
