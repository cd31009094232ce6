"""A newcomer's machine: `nanochat pull` of a local run needs no rsync; tests that need a missing system tool
skip with a reason (and fail under CI=true); constraints.txt pins the whole install."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanochat_cli import pull as pull_mod, state
from nanochat_cli.backends import local as local_backend
from nanochat_cli.main import app

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def test_copy_local_excludes_skips_unchanged_and_recopies_changed(tmp_path):
    src, dest = tmp_path / "run", tmp_path / "home"
    (src / "base" / "ckpt_000005").mkdir(parents=True)
    (src / "base" / "ckpt_000005" / "model.safetensors").write_bytes(b"w" * 100)
    (src / "base" / "ckpt_000005" / "optim_rank0.pt").write_bytes(b"o" * 300)   # stays behind
    (src / ".job.json").write_text("{}")
    (src / "report.md").write_text("# report\n")
    assert pull_mod.copy_local(src, dest) == 2
    assert (dest / "base" / "ckpt_000005" / "model.safetensors").read_bytes() == b"w" * 100
    assert not (dest / "base" / "ckpt_000005" / "optim_rank0.pt").exists() and not (dest / ".job.json").exists()
    assert pull_mod.copy_local(src, dest) == 0                       # nothing changed: nothing copied
    (dest / "report.md").write_text("tampered, longer than before")
    assert pull_mod.copy_local(src, dest) == 1                       # a changed file is sent again
    assert (dest / "report.md").read_text() == "# report\n"
    assert not list(dest.rglob("*.tmp"))


def test_pull_of_a_local_run_needs_no_rsync(monkeypatch, tmp_path):
    monkeypatch.setenv(local_backend.PIPELINE_MODULE_ENV, "test_cli_jobscript")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKEJOB_STEP_S", "0.01")
    r = CliRunner().invoke(app, ["train", "--local", "--steps", "3", "--detach"])
    assert r.exit_code == 0, r.stderr
    rd = state.run_dir("local")
    end = time.time() + 30
    while local_backend.LocalBackend().job_state({}, rd) != "SUCCEEDED":
        assert time.time() < end, "the job did not finish"
        time.sleep(0.05)
    empty = tmp_path / "bin_without_rsync"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))                          # no rsync (and nothing else) on PATH
    r = CliRunner().invoke(app, ["pull", "--dest", str(tmp_path / "copy")])
    assert r.exit_code == 0, r.stderr
    assert "verified" in r.stdout and (tmp_path / "copy" / "base" / "ckpt_000003" / "model.safetensors").exists()


NEEDS_MISSING_TOOL = '''
import pytest
@pytest.mark.needs_tool("surely-not-an-installed-tool")
def test_x():
    pass
'''


@pytest.mark.parametrize("ci,outcome", [("", "1 skipped"), ("true", "1 error")])
def test_a_missing_tool_skips_with_a_reason_but_fails_under_ci(tmp_path, ci, outcome):
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_tool.py").write_text(NEEDS_MISSING_TOOL)
    env = dict(os.environ, CI=ci)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert outcome in r.stdout and (r.returncode != 0) == (ci == "true"), r.stdout[-2000:]
    assert "test_x needs surely-not-an-installed-tool, which is not installed" in r.stdout


def test_constraints_pin_every_requirement_of_the_dev_install():
    """Every package the [dev] install needs has exactly one allowed version (so no pip ever searches):
    the lock script, run on this venv, must list the same packages as the committed constraints.txt."""
    header = (ROOT / "constraints.txt").read_text().splitlines()[1]
    made_on = header.split("Python ")[1].split(";")[0].rsplit(".", 1)[0]      # e.g. "3.11"
    if made_on != "%d.%d" % sys.version_info[:2]:
        pytest.skip(f"constraints.txt was made on Python {made_on}; its package set is checked there")
    pins = {ln.split("==")[0].lower().replace("_", "-") for ln in (ROOT / "constraints.txt").read_text().splitlines()
            if ln and not ln.startswith("#")}
    # the tests' venv has the dev extra only; the cloud and node pins are .ci/run's to check (they need the network)
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "lock.py"), "--extras", "dev", "--no-node"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wanted = {ln.split("==")[0].lower().replace("_", "-") for ln in r.stdout.splitlines() if ln and not ln.startswith("#")}
    assert {"transformers", "wandb", "huggingface-hub", "typer", "uvicorn", "click"} <= pins
    assert wanted - pins == set(), f"constraints.txt lacks {sorted(wanted - pins)}: regenerate it (README, Development)"
    assert all("==" in ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#"))


def test_readme_commands_use_the_constraints_and_ci_runs_the_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = [ln for ln in readme.splitlines() if ln.startswith("python3 -m venv .venv && ")]
    assert len(commands) == 2 and all("pip install -c constraints.txt torch==2.13.0 -e " in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "pip==23.0.1" in ci and "-c constraints.txt" in ci.split(commands[1])[0]   # the oldest-pip check first


def test_a_pulled_run_without_optimizer_shards_loads_for_inference(tmp_path, tiny_tokenizer):
    """`nanochat pull` leaves the optimizer shards on the node: chat, serve, eval and export must still load the
    pulled copy; only resuming training needs the shards."""
    import torch
    from nanochat_core.gpt import checkpoint
    from nanochat_core.gpt.model import GPT, config_for_depth
    with torch.device("meta"):
        model = GPT(config_for_depth(1, tiny_tokenizer.get_vocab_size(), sequence_len=32, head_dim=16))
    model.to_empty(device="cpu")
    model.init_weights()
    node = tmp_path / "node"
    tiny_tokenizer.save(node / "tokenizer")
    checkpoint.save_checkpoint(node / "sft", 3, model, torch.optim.SGD(model.parameters(), lr=0.1),
                               {"tokenizer_hash": tiny_tokenizer.hash})
    pull_mod.copy_local(node, tmp_path / "home")
    home = tmp_path / "home"
    assert not list(home.rglob("optim_rank*.pt"))
    assert checkpoint.find_latest(home / "sft") is None                     # not resumable: shards are missing
    assert checkpoint.find_latest(home / "sft", weights_only=True) is not None
    loaded, tok, meta = checkpoint.load_model(home)
    assert meta["step"] == 3 and tok.hash == tiny_tokenizer.hash


def test_no_test_skips_by_hand_for_a_missing_system_tool():
    """A missing tool of conftest.TOOLS is the needs_tool mark's business (a skip with a reason, a failure
    under CI=true); a hand-written pytest.skip for one would let CI go green by skipping."""
    import re
    sys.path.insert(0, str(TESTS))
    from conftest import TOOLS
    tools = re.compile("|".join(TOOLS), re.IGNORECASE)
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "pytest.skip(" in line and any(tools.search(l) for l in lines[max(0, i - 2):i + 1]):
                offenders.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not offenders, "use @pytest.mark.needs_tool(...) instead:\n" + "\n".join(offenders)


LEAVES_A_PROCESS = '''
import os, subprocess, sys, time
from pathlib import Path
def test_x():
    out = Path(os.environ["LEAK_DIR"])
    # ignores SIGTERM, in its own session: what SkyPilot's executors did
    p = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "open(%r, 'w').write('up'); time.sleep(1000)" % str(out / "up")], start_new_session=True)
    (out / "pid").write_text(str(p.pid))
    while not (out / "up").exists():
        time.sleep(0.05)
'''


def test_a_session_that_leaves_a_process_running_fails_and_the_process_is_killed(tmp_path):
    from nanochat_core.node.proctree import pid_alive
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_leak.py").write_text(LEAVES_A_PROCESS)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_leak.py")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=dict(os.environ, CI="", LEAK_DIR=str(tmp_path)))
    pid = int((tmp_path / "pid").read_text())
    try:
        assert r.returncode != 0 and "1 passed" in r.stdout, r.stdout[-2000:]
        assert "left 1 process(es) running (now killed)" in r.stdout and f"pid {pid}" in r.stdout, r.stdout[-2000:]
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)
