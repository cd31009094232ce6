"""sky/*.yaml are valid SkyPilot 0.14 tasks on their own, and the task the CLI builds from train.yaml carries
the plan (resources, nodes, envs) with secrets as SkyPilot secrets, never as plain envs."""
from pathlib import Path

import pytest

from test_cli_skyfakes import cloud_boundary  # (also sets SKY_RUNTIME_DIR before sky is imported)

ROOT = Path(__file__).resolve().parent.parent
YAMLS = sorted((ROOT / "sky").glob("*.yaml"))


def test_there_are_task_yamls():
    assert {p.name for p in YAMLS} >= {"train.yaml", "serve.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_loads_with_sky(path):
    import sky
    task = sky.Task.from_yaml(str(path))
    assert task.run and task.setup and task.workdir == "."
    assert all(r.accelerators for r in task.resources)
    text = path.read_text()
    assert "hf_" not in text.lower() or "HF_TOKEN" in text  # no token values written down


def test_cli_task_carries_plan_and_secrets(monkeypatch, tmp_path):
    from nanochat_cli.backends import skypilot as sky_backend
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # The plan allows $21/h for the whole job (2 nodes): us-east-1a ($10.50 spot per node) fits, 1b does not.
    rec = {"name": "c1", "nodes": 2, "spot": True, "bucket": "s3://my-bucket", "max_price_per_hour": 21.0,
           "offer": {"cloud": "aws", "region": "us-east-1", "instance_type": "p5.48xlarge", "accelerators": "H100:8"}}
    with cloud_boundary(["aws"], monkeypatch):  # Resources are validated against the (test) catalog
        from nanochat_core import run_spec
        spec_file = run_spec.write(tmp_path, run_spec.RunSpec(run="d20", preset="cloud", offer=rec["offer"],
                                                              deadline_at=1_800_000_000.0))
        task = sky_backend.build_task(rec, "d20", ["--preset", "cloud", "--depth", "20"], spec_file)
    assert task.num_nodes == 2
    (res,) = task.resources
    assert res.zone == "us-east-1a" and res.use_spot and res.instance_type == "p5.48xlarge" and res.accelerators == {"H100": 8}
    assert task.envs["NANOCHAT_RUN"] == "d20" and task.envs["NANOCHAT_ARGS"] == "--preset cloud --depth 20"
    # The spec travels as a file mount: the node reads its deadline from that file alone.
    assert task.file_mounts[task.envs["NANOCHAT_SPEC"]] == str(spec_file)
    assert task.envs["NANOCHAT_SPEC"] == "~/.nanochat/specs/d20/plan.json"
    assert run_spec.read(spec_file).deadline_at == 1_800_000_000
    assert task.envs["NANOCHAT_BUCKET_DIR"] == "/nanochat-bucket/runs"
    mount = task.to_yaml_config()["file_mounts"]["/nanochat-bucket"]
    assert mount["source"] == "s3://my-bucket" and mount["mode"] == "MOUNT_CACHED"
    assert "hf_secret_value_123" not in str(task.envs)
    assert task.secrets["HF_TOKEN"].get_secret_value() == "hf_secret_value_123"
    # What SkyPilot stores about the task (its redacted YAML) does not contain the value either.
    from sky.task import redact_task_yaml_dict
    cfg = task.to_yaml_config()
    redact_task_yaml_dict(cfg)
    assert "hf_secret_value_123" not in str(cfg)


def test_skyignore_ships_only_what_the_node_needs():
    ignored = [ln.strip() for ln in (ROOT / ".skyignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for must in (".git/", ".venv/", "tests/", "nanochat_cli/"):
        assert must in ignored
    assert "nanochat_core/" not in ignored and "pyproject.toml" not in ignored and "constraints.txt" not in ignored


def test_pip_installed_workdir_is_a_staging_copy(monkeypatch, tmp_path):
    """Without a source tree (a pip install), the node gets nanochat_core + a generated pyproject.toml,
    never site-packages."""
    import tomllib
    from nanochat_cli.backends import task_files
    monkeypatch.setattr(task_files, "REPO_ROOT", tmp_path / "site-packages")
    wd = task_files.workdir()
    assert (wd / "nanochat_core" / "stages" / "pipeline.py").exists() and not (wd / "nanochat_cli").exists()
    meta = tomllib.loads((wd / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "nanochat"
    assert any(d.startswith("torch") for d in meta["project"]["dependencies"])
    assert not any("pytest" in d for d in meta["project"]["dependencies"])
    assert task_files.workdir() == wd                  # rebuilt in place, idempotent
    # the node's setup installs with the same pins as a checkout's (sky/train.yaml: -c constraints.txt)
    assert (wd / "constraints.txt").read_text() == (Path(__file__).parent.parent / "constraints.txt").read_text()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_scripts_are_valid_bash(path):
    import subprocess
    import yaml
    cfg = yaml.safe_load(path.read_text())
    for section in ("setup", "run"):
        r = subprocess.run(["bash", "-n"], input=cfg[section], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name} {section}: {r.stderr}"


def test_a_relaunch_after_the_deadline_installs_nothing_and_ends_cleanly(tmp_path):
    """The node-side hard cap for a spot recovery (or any relaunch) that starts after the budget's deadline:
    setup installs nothing (it used to build the whole environment first), and the run script - with no
    environment at all, only the node's python3 - ends at once as budget-truncated, exit 0, so a managed job
    is never "recovered" onto yet another node."""
    import subprocess
    import sys
    import yaml
    from nanochat_core import run_spec
    cfg = yaml.safe_load((ROOT / "sky" / "train.yaml").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)                  # the node's system python
    home = tmp_path / "home"
    run_spec.write(home / ".nanochat" / "specs" / "r", run_spec.RunSpec(
        run="r", preset="cloud", offer={}, budget=10.0, spend_cap=10.0, deadline_at=1000.0, base_deadline_at=900.0))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "NANOCHAT_RUN": "r", "NANOCHAT_ARGS": "",
           "NANOCHAT_SPEC": "~/.nanochat/specs/r/plan.json", "NANOCHAT_BUCKET_DIR": ""}
    setup = subprocess.run(["bash", "-c", cfg["setup"]], capture_output=True, text=True, env=env, timeout=60,
                           cwd=ROOT)                                    # SkyPilot runs setup in the workdir
    assert setup.returncode == 0 and "skipping setup" in setup.stdout, setup.stdout + setup.stderr
    assert not (home / "nanochat-venv").exists()
    r = subprocess.run(["bash", "-c", cfg["run"]], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and "budget deadline already passed" in r.stdout, r.stdout + r.stderr
    from nanochat_core.common import parse_event
    (done,) = [e for e in map(parse_event, r.stdout.splitlines()) if e]
    assert done["event"] == "done" and done["state"] == "BUDGET_TRUNCATED"


SKYLET_PROBE = """
import json, sys, time
from sky.skylet import autostop_lib, configs, events
cfg = autostop_lib.get_autostop_config()
stops = []
events.StopEvent._stop_cluster = lambda self, c: stops.append(c.down)   # the cloud call: the one thing faked
ev = events.StopEvent()                 # the skylet starts its idle clock
seen = []
for idle_min in (0, cfg.autostop_idle_minutes - 0.5, cfg.autostop_idle_minutes + 0.1):
    configs.set_config(autostop_lib._AUTOSTOP_LAST_ACTIVE_TIME, str(time.time() - idle_min * 60))
    ev._run()
    seen.append(list(stops))
print(json.dumps({"minutes": cfg.autostop_idle_minutes, "down": cfg.down, "wait_for": cfg.wait_for.value,
                  "stops": seen}))
"""


def test_setup_first_gives_the_node_its_own_teardown_which_skypilots_skylet_acts_on(monkeypatch, tmp_path):
    """Issue 19 item 5: SkyPilot sets autostop only after setup succeeds, so a node whose launcher went quiet
    during setup (a laptop asleep, a hung install) billed on. Setup's first step now runs SkyPilot's own
    autostop command (its codegen, built by build_task) on the head node, and SkyPilot's real skylet idle
    check then tears an idle node down after that many minutes - not a minute before. The task is built 2 h
    before the budget's deadline (the guard: planner.SETUP_GUARD_MIN); the node's copy of the spec says the
    deadline has passed, so setup installs nothing after the guard (a relaunch after the deadline)."""
    import json
    import subprocess
    import sys
    import time
    import yaml
    from nanochat_core import run_spec
    from nanochat_cli.backends import skypilot as sky_backend
    from nanochat_cli.planning.planner import SETUP_GUARD_MIN
    rec = {"name": "c1", "nodes": 1, "max_price_per_hour": 60.0,
           "offer": {"cloud": "aws", "region": "us-east-1", "instance_type": "p5.48xlarge", "accelerators": "H100:8"}}
    with cloud_boundary(["aws"], monkeypatch):
        spec_file = run_spec.write(tmp_path, run_spec.RunSpec(run="d20", preset="cloud", offer=rec["offer"],
                                                              deadline_at=time.time() + 7200))
        guard = sky_backend.build_task(rec, "d20", [], spec_file).envs["NANOCHAT_SETUP_GUARD"]
    home = tmp_path / "home"
    (home / ".sky").mkdir(parents=True)
    (home / ".sky" / "python_path").write_text(sys.executable)   # SkyPilot's runtime python on the node
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    run_spec.write(home / "specs", run_spec.RunSpec(run="d20", preset="cloud", offer={}, budget=10.0,
                                                    spend_cap=10.0, deadline_at=1000.0, base_deadline_at=900.0))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "SKY_RUNTIME_DIR": str(home),
           "NANOCHAT_SETUP_GUARD": guard, "NANOCHAT_SPEC": "~/specs/plan.json"}
    setup = yaml.safe_load((ROOT / "sky" / "train.yaml").read_text())["setup"]
    r = subprocess.run(["bash", "-c", setup], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "skipping setup" in r.stdout and "warning" not in r.stdout, r.stdout + r.stderr
    probe = subprocess.run([sys.executable, "-c", SKYLET_PROBE], capture_output=True, text=True, env=env,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert (got["minutes"], got["down"], got["wait_for"]) == (SETUP_GUARD_MIN, True, "jobs")
    assert got["stops"] == [[], [], [True]]      # idle 0 and 29.5 min: up; past 30: torn down (not stopped)
    # Nearer the deadline the guard is shorter, and with --keep the node stops instead of going away.
    now = time.time()
    near = sky_backend.setup_guard(now + 600, True, now)
    assert "set_autostop(10, " in near and "AutostopWaitFor.JOBS, False, " in near
    assert "set_autostop(1, " in sky_backend.setup_guard(now - 60, False, now)


def test_the_yamls_keep_a_run_where_the_cli_pulls_it_from(tmp_path):
    """sky/train.yaml's run script writes a run under task_files.NODE_RUNS on the node's disk (where `nanochat
    pull` rsyncs it from), and serve.yaml's default checkpoint is there too."""
    import subprocess
    import yaml
    from nanochat_cli.backends.task_files import NODE_RUNS
    run = yaml.safe_load((ROOT / "sky" / "train.yaml").read_text())["run"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NANOCHAT_RUN": "r", "NANOCHAT_ARGS": "",
           "NANOCHAT_DEADLINE_AT": "1000", "NANOCHAT_BUCKET_DIR": ""}   # a past deadline: it stops at once
    subprocess.run(["bash", "-c", run], capture_output=True, text=True, env=env, timeout=30)
    assert NODE_RUNS.startswith("~/") and (tmp_path / NODE_RUNS[2:] / "r").is_dir()
    serve = yaml.safe_load((ROOT / "sky" / "serve.yaml").read_text())["envs"]["NANOCHAT_CHECKPOINT"]
    assert serve.startswith(NODE_RUNS + "/")
