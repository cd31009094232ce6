"""`nanochat --help` answers fast: no torch, no sky, no rich.live at start-up; every command and option
has help text; bad input is one line and a non-zero exit, never a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanochat_cli.main import app

NANOCHAT = str(Path(sys.executable).parent / "nanochat")
COMMANDS = ["up", "train", "logs", "status", "pull", "eval", "chat", "serve", "export", "down"]


@pytest.mark.parametrize("argv", [["--help"], ["up", "--help"]])
def test_help_is_fast(argv):
    """The CPU time the command itself used, not the wall clock: on a busy machine the wall time measures the
    other processes (a loaded 2-core laptop took seconds of wall time for 0.3 s of CPU)."""
    import resource
    best = float("inf")
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run([NANOCHAT, *argv], capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        assert r.returncode == 0 and "Usage" in r.stdout
    assert best < 0.5, f"`nanochat {' '.join(argv)}` used {best:.3f} s of CPU"


def test_no_heavy_imports_for_help():
    code = ("import sys; from typer.testing import CliRunner; from nanochat_cli.main import app; "
            "[CliRunner().invoke(app, a) for a in (['--help'], ['up', '--help'], ['train', '--help'])]; "
            "print(sorted(m for m in ('sky', 'torch', 'rich.live', 'pydantic', 'nanochat_cli.backends.skypilot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_and_option_has_help():
    import typer.main
    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS)
    for name, cmd in group.commands.items():
        assert cmd.help, name
        for p in cmd.params:
            assert getattr(p, "help", None), f"{name} {p.name}"


def run(*args):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout + r.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--budget", "-5", "--dryrun"], "--budget must be a positive number"),
    (["train", "--budget", "lots", "--dryrun"], "--budget must be a number of US dollars"),
    (["train", "--local", "--depth", "0", "--dryrun"], "--depth must be between 1 and 64"),
    (["pull"], "nothing to pull"),
    (["pull", "--name", "nope"], "nothing to pull: no run named 'nope'"),
    (["logs"], "no run to show logs for"),
    (["logs", "--name", "nope"], "no run named 'nope'"),
    (["chat", "--prompt", "hi"], "nanochat train --local"),
    (["serve"], "nanochat pull"),
    (["eval", "--local"], "no trained model found"),
    (["up", "--dryrun", "--gpus", "H100:x"], "--gpus must look like H100:8"),
])
def test_clear_errors(args, message):
    code, out = run(*args)
    assert code == 2, out
    assert message in out and "Traceback" not in out
    assert out.strip().startswith("error: ") and out.strip().count("\n") == 0


def test_down_with_nothing_is_fine():
    code, out = run("down")
    assert code == 0 and "nothing to tear down" in out


def test_status_empty():
    code, out = run("status", "--json")
    assert code == 0 and out.strip() == '{"clusters": [], "jobs": []}'


def test_cloud_commands_without_skypilot_say_how_to_install(monkeypatch):
    # SkyPilot is the optional `cloud` extra: without it, a cloud command explains, it does not crash.
    monkeypatch.setitem(sys.modules, "sky", None)   # makes `import sky` raise ImportError
    import nanochat_cli.backends
    monkeypatch.delitem(sys.modules, "nanochat_cli.backends.skypilot", raising=False)
    monkeypatch.delattr(nanochat_cli.backends, "skypilot", raising=False)
    code, out = run("up", "--dryrun")
    assert code == 2 and "pip install -c constraints.txt torch==2.13.0 -e '.[cloud]'" in out and "Traceback" not in out


def test_environment_errors_are_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    os_env_home = str(blocker / "home")  # NANOCHAT_HOME under a regular file: cannot be created
    r = subprocess.run([NANOCHAT, "up", "--local"], capture_output=True, text=True,
                       env={**os.environ, "NANOCHAT_HOME": os_env_home})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
