"""The cloud on-ramp, as a newcomer meets it: the install command the CLI and the README give is this checkout's
(pinned), credentials are explained before the first error, `up --dryrun` says what to do when nothing is
enabled, a spot dry run says it needs a bucket, and the plan says what its price leaves out, what the model will
be able to do, and that the hours rest on an estimated throughput. The commands run for real against SkyPilot's
catalog reader and optimizer on the test's catalogs (tests/test_cli_skyfakes.py); the node's install lines are
read from the task YAMLs SkyPilot launches."""
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from test_cli_skyfakes import cloud_boundary
from nanochat_cli.main import app

ROOT = Path(__file__).resolve().parent.parent
ALL = ["aws", "lambda", "nebius", "runpod"]
CLOUD_INSTALL = "pip install -c constraints.txt torch==2.13.0 -e '.[cloud]'"


def run(*args):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def flat(text: str) -> str:
    """Rich wraps at the test console's 80 columns: compare words, not line breaks."""
    return " ".join(text.split())


def test_missing_skypilot_names_this_checkouts_pinned_install(monkeypatch):
    # "nanochat" on the package index is another project: the hint must be the install from this checkout.
    monkeypatch.setitem(sys.modules, "sky", None)   # makes `import sky` raise ImportError
    import nanochat_cli.backends
    monkeypatch.delitem(sys.modules, "nanochat_cli.backends.skypilot", raising=False)
    monkeypatch.delattr(nanochat_cli.backends, "skypilot", raising=False)
    code, _, err = run("up", "--dryrun")
    assert code == 2 and "Traceback" not in err and "nanochat[cloud]" not in err
    hint = re.search(r"`(cd .*?)`", err).group(1)
    cd, _, install = hint.partition(" && ")
    assert Path(shlex.split(cd)[1]) == ROOT                     # run from this checkout...
    assert shlex.split(install)[:3] == [sys.executable, "-m", "pip"]   # ...into the Python running nanochat
    assert install.endswith(CLOUD_INSTALL)
    assert f"`.venv/bin/{CLOUD_INSTALL}`" in (ROOT / "README.md").read_text()   # the README's, word for word


def test_bucket_pull_without_its_library_names_the_same_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    from nanochat_cli.backends import bucket
    from nanochat_core.common import NanochatError
    with pytest.raises(NanochatError) as e:
        bucket._need("boto3", "s3")
    assert CLOUD_INSTALL in str(e.value) and "nanochat[cloud]" not in str(e.value)


def test_up_dryrun_with_no_cloud_enabled_says_what_to_do_next(monkeypatch):
    with cloud_boundary([], monkeypatch):
        code, out, err = run("up", "--dryrun", "--clouds", ",".join(ALL))
        assert code == 0 and "enabled" in out
        assert "next:" in err and "sky check" in err and "aws configure" in err
        code, _, err = run("up", "--dryrun", "--clouds", "aws")     # the same, however few clouds are asked
        assert code == 0 and "next:" in err
    with cloud_boundary(["lambda"], monkeypatch):                     # a row is enabled: nothing to add
        code, _, err = run("up", "--dryrun", "--clouds", ",".join(ALL))
    assert code == 0 and "next:" not in err


def test_spot_dry_runs_say_the_real_run_needs_a_bucket(monkeypatch):
    with cloud_boundary(["aws", "nebius"], monkeypatch):
        code, _, err = run("train", "--budget", "100", "--spot", "--dryrun", "--clouds", ",".join(ALL))
        assert code == 0 and "--bucket s3://" in err
        code, out, err = run("train", "--budget", "100", "--spot", "--dryrun", "--json", "--clouds", ",".join(ALL))
        assert code == 0 and "--bucket s3://" in err and json.loads(out)["offer"]["spot"] is True  # stdout stays JSON
        code, _, err = run("up", "--spot", "--dryrun", "--clouds", ",".join(ALL))
        assert code == 0 and "nanochat train --spot --budget USD --bucket s3://BUCKET" in err
        code, _, err = run("train", "--budget", "100", "--spot", "--dryrun", "--bucket", "s3://b", "--clouds", "aws")
        assert code == 0 and "--bucket" not in err                    # it has one: nothing to say
        code, _, err = run("train", "--budget", "100", "--dryrun", "--clouds", "aws")
        assert code == 0 and "--bucket" not in err                    # on-demand runs do not need one


def test_the_plan_says_what_its_price_leaves_out_what_the_model_can_do_and_that_hours_are_estimates(monkeypatch):
    with cloud_boundary(["lambda"], monkeypatch):
        code, out, err = run("train", "--budget", "100", "--dryrun", "--clouds", ",".join(ALL))
        assert code == 0, err
        text = flat(out)
        assert "not in the price:" in text
        assert all(w in text for w in ("disk", "bucket", "leaving the cloud"))
        assert "estimate until this code is measured" in text and "preflight" in text
        depth = int(re.search(r"Plan: depth (\d+)", text).group(1))
        big = re.search(r"what it will be able to do, roughly: (.*?) the hours", text).group(1)
        code, out, _ = run("train", "--budget", "100", "--depth", "4", "--dryrun", "--clouds", ",".join(ALL))
        small = re.search(r"what it will be able to do, roughly: (.*?) the hours", flat(out)).group(1)
    from nanochat_cli.planning.planner import capability
    assert code == 0 and depth >= 16 and big == capability(depth) and "toy" in small and "toy" not in big


def test_capability_covers_every_depth_the_planner_trains():
    from nanochat_cli.planning.planner import CAPABILITY, DEPTHS, capability
    lines = [capability(d) for d in DEPTHS]
    rows = [[text for _, text in CAPABILITY].index(line) for line in lines]
    assert rows == sorted(rows)                                          # a larger model never reads as less able
    assert "toy" in capability(DEPTHS[0]) and "GPT-2" in capability(DEPTHS[-1])
    assert capability(1) == capability(DEPTHS[0])                        # --depth below the table: the smallest row
    assert len(set(lines)) > 2                                           # it changes with the size


def test_readme_explains_credentials_for_every_cloud_nanochat_offers():
    from nanochat_cli.planning.offers import GPU_CLOUDS
    readme = (ROOT / "README.md").read_text()
    cloud = readme.split("## Running on a real cloud", 1)[1].split("\n## ", 1)[0]
    creds = flat(cloud.split("**Credentials.**", 1)[1].split("**", 1)[0])
    assert all(re.search(rf"\b{c}\b", creds) for c in GPU_CLOUDS), creds
    assert "sky check" in creds and "aws configure" in creds and "lambda_keys" in creds
    assert "disk" in flat(cloud) and "storage and requests" in flat(cloud)     # what the plan's price leaves out


@pytest.mark.parametrize("name", ["train", "serve"])
def test_the_nodes_install_is_pinned_like_the_readmes(name):
    """The node's setup installs with constraints.txt (shipped with the workdir), uv at its pinned version, and
    the Python the pins were made with; a change to the pins rebuilds the cached environment."""
    setup = yaml.safe_load((ROOT / "sky" / f"{name}.yaml").read_text())["setup"]
    installs = [ln.strip() for ln in setup.splitlines() if " install " in ln and "apt-get" not in ln]
    assert installs and all("-c constraints.txt" in ln for ln in installs), installs
    assert any("uv pip install" in ln and "torch==2.13.0" in ln for ln in installs)
    made_on = (ROOT / "constraints.txt").read_text().splitlines()[1].split("Python ")[1].split(";")[0]
    assert f"--python {made_on.rsplit('.', 1)[0]} " in setup
    assert "constraints.txt" in next(ln for ln in setup.splitlines() if "STAMP=" in ln)
    assert "constraints.txt" not in (ROOT / ".skyignore").read_text()
    pins = {ln.split("==")[0].lower() for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln}
    assert {"uv", "triton", "nvidia-nccl-cu13"} <= pins     # the installer and the CUDA side are pinned too


def test_ci_checks_the_cloud_and_node_installs_with_the_oldest_pip():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip==23.0.1" in ci
    assert "--dry-run -c constraints.txt torch==2.13.0 -e '.[cloud]'" in ci
    assert "--dry-run -c constraints.txt torch==2.13.0 -e '.[tasks]'" in ci
    assert "pip is looking at multiple versions" in ci        # a search is a failure, not just a slow pass
    assert "--python-platform x86_64-manylinux_2_28" in ci and ".ci/pinned.py" in ci
