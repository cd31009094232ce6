"""
What a SkyPilot task reads from this machine: the task YAMLs (sky/) and the workdir it ships to the node.
No SkyPilot import here (backends/skypilot.py is the only module that has one); this is file work.
"""
from __future__ import annotations

from pathlib import Path

from nanochat_core.common import NanochatError, nanochat_home
import importlib.metadata as md
import shutil

REPO_ROOT = Path(__file__).resolve().parents[2]

# Where a run lives on the node: NODE_RUNS/<run> on its disk, or with --bucket <bucket>/runs/<run>, the bucket
# being mounted at BUCKET_MOUNT on every node. sky/train.yaml spells the first $HOME/nanochat_runs (it must
# also work alone with `sky launch`); tests/test_cli_yaml.py checks that the two agree.
NODE_RUNS = "~/nanochat_runs"
BUCKET_MOUNT = "/nanochat-bucket"


def bucket_runs(root: str) -> str:
    """The runs folder of a bucket, by its URL (s3://b, where pull reads) or its mount point on the node."""
    return root.rstrip("/") + "/runs"


def yaml_path(name: str) -> Path:
    """sky/<name>.yaml from the source tree (next to nanochat_cli), or the copy packaged inside it."""
    for p in (REPO_ROOT / "sky" / f"{name}.yaml", Path(__file__).parents[1] / "sky" / f"{name}.yaml"):
        if p.exists():
            return p
    raise NanochatError(f"sky/{name}.yaml not found next to nanochat_cli; reinstall nanochat")


def workdir() -> Path:
    """What `workdir` ships to the node: the source tree when we run from one (.skyignore trims it);
    for a pip-installed nanochat, a staging copy of nanochat_core with a pyproject.toml listing the
    installed distribution's own requirements (never site-packages itself)."""
    if (REPO_ROOT / "pyproject.toml").exists() and (REPO_ROOT / "nanochat_core").is_dir():
        return REPO_ROOT
    import nanochat_core   # lazy: loads torch, which `nanochat --help` must not
    stage = nanochat_home() / "workdir"
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(Path(nanochat_core.__file__).parent, stage / "nanochat_core",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    reqs = [r for r in (md.requires("nanochat") or []) if "extra ==" not in r or 'extra == "tasks"' in r]
    reqs = [r.split(";")[0].strip() for r in reqs]
    deps = ",\n".join(f"    {r!r}".replace("'", '"') for r in reqs)
    (stage / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "nanochat"\nversion = "{md.version("nanochat")}"\ndependencies = [\n{deps}\n]\n'
        '[project.optional-dependencies]\ntasks = []\n\n'
        '[tool.setuptools.packages.find]\ninclude = ["nanochat_core*"]\n\n'
        '[tool.setuptools.package-data]\nnanochat_core = ["data/*", "data/**/*", "static/*", "static/**/*"]\n')
    # The node's setup installs with these pins (sky/train.yaml); they ship in the package beside the YAMLs
    # (sky/constraints.txt is a link to the top-level file).
    pins = Path(__file__).parents[1] / "sky" / "constraints.txt"
    if not pins.exists():
        raise NanochatError("constraints.txt is not packaged beside the task YAMLs; reinstall nanochat")
    shutil.copyfile(pins, stage / "constraints.txt")
    return stage


# Your own data travels with a cloud run as SkyPilot file mounts: the prepared bundle (user_data.py) from
# this machine, synced to the node before the job starts (for a managed spot job SkyPilot stages it in its
# own bucket once, and a recovered job mounts those same bytes); a bucket of shards (--data s3://...) is
# copied from the bucket instead. The pipeline verifies the bundle against its manifest digest either way.
USER_DATA_MOUNT = "/nanochat-user-data"
BUCKET_DATA_MOUNT = "/nanochat-data"


def data_mounts(plan: dict | None) -> dict[str, str]:
    """{remote path: local path or bucket URL} for what the plan says travels with the run."""
    out = {}
    rec = (plan or {}).get("user_data") or {}
    if rec.get("path"):
        out[USER_DATA_MOUNT] = rec["path"]
    if (plan or {}).get("data_bucket"):
        out[BUCKET_DATA_MOUNT] = plan["data_bucket"]
    return out
