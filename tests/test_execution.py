"""The HumanEval sandbox: limits hold, and an honest solution still passes."""
import time

from nanochat_core.execution import run_sandboxed

SOLUTION = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n"


def test_correct_solution_passes():
    r = run_sandboxed(SOLUTION, timeout=5)
    assert r.passed and r.status == "passed"
    assert r.stdout.strip() == "ok"


def test_wrong_solution_fails():
    r = run_sandboxed("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", timeout=5)
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr


def test_infinite_loop_is_killed():
    t0 = time.time()
    r = run_sandboxed("while True:\n    pass\n", timeout=1)
    assert not r.passed and r.status == "timeout"
    assert time.time() - t0 < 5


def test_sleeping_program_is_killed():
    t0 = time.time()
    r = run_sandboxed("import time\ntime.sleep(60)\n", timeout=1)
    assert r.status == "timeout" and time.time() - t0 < 5


def test_memory_bomb_is_stopped():
    r = run_sandboxed("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n", timeout=10, memory_mb=256)
    assert not r.passed and r.status == "memory"


def test_network_is_blocked():
    prog = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            "s.settimeout(2)\ns.connect(('127.0.0.1', 22))\n")
    r = run_sandboxed(prog, timeout=5)
    assert not r.passed and "PermissionError" in r.stderr
    r = run_sandboxed("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1', timeout=2)\n", timeout=5)
    assert not r.passed


def test_file_deletion_is_blocked(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for prog in [f"import os\nos.remove({str(victim)!r})\n",
                 f"import os\nos.unlink({str(victim)!r})\n",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                 f"import subprocess\nsubprocess.run(['rm', '-f', {str(victim)!r}])\n",
                 f"import os\nos.system('rm -f {victim}')\n"]:
        r = run_sandboxed(prog, timeout=5)
        assert not r.passed, prog
        assert victim.read_text() == "keep me"


def test_early_exit_does_not_fake_a_pass():
    for prog in ["import sys\nsys.exit(0)\nassert False\n", "exit(0)\nassert False\n",
                 "import os\nos._exit(0)\n"]:
        assert not run_sandboxed(prog, timeout=5).passed, prog
