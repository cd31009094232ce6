"""`nanochat up` / `train --dryrun` against the real SkyPilot catalog reader and optimizer, on catalog
files written by the test (several clouds, spot and on-demand, a PCIe offer, a cloud without a catalog)."""
import json

import pytest
from typer.testing import CliRunner

from test_cli_skyfakes import cloud_boundary
from nanochat_cli.main import app

ALL = ["aws", "lambda", "nebius", "runpod"]
KEYS = {"cloud", "region", "instance_type", "accelerators", "spot", "price_per_hour", "interconnect", "enabled"}


def run(*args):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def offers(*args):
    code, out, err = run("up", "--dryrun", "--json", *args)
    assert code == 0, err
    return json.loads(out)["offers"], err


def test_ranks_cheapest_first_and_excludes_pcie(monkeypatch):
    with cloud_boundary(["aws", "lambda"], monkeypatch):
        got, err = offers("--clouds", "aws,lambda,nebius,runpod,gcp")
    assert all(set(o) == KEYS for o in got)
    assert [(o["cloud"], o["region"], o["price_per_hour"]) for o in got] == [
        ("nebius", "eu-north1", 23.6), ("lambda", "us-east-1", 31.92),
        ("aws", "us-east-1", 55.04), ("aws", "us-west-2", 57.0)]
    assert {o["interconnect"] for o in got} == {"nvlink"}
    assert [o["enabled"] for o in got] == [False, True, True, True]
    assert "PCIe" in err and "8x_H100_SECURE" in err       # the exclusion is explained
    # A cloud whose catalog cannot be fetched is named, in one line however many there are.
    (skipped,) = [ln for ln in err.splitlines() if "skipped" in ln]
    assert "skipped 1 cloud(s)" in skipped and skipped.endswith(": gcp")


def test_allow_pcie_includes_the_cheaper_pcie_offer(monkeypatch):
    with cloud_boundary(ALL, monkeypatch):
        got, _ = offers("--clouds", ",".join(ALL), "--allow-pcie")
    assert (got[0]["cloud"], got[0]["instance_type"], got[0]["interconnect"]) == ("runpod", "8x_H100_SECURE", "pcie")
    assert got[0]["price_per_hour"] == 23.12


def test_spot_prices_and_cloud_restriction(monkeypatch):
    with cloud_boundary(ALL, monkeypatch):
        got, _ = offers("--clouds", ",".join(ALL), "--spot")
        only_aws, _ = offers("--clouds", "aws")
    # Lambda and RunPod have no spot price: not offered as spot.
    assert [(o["cloud"], o["price_per_hour"], o["spot"]) for o in got] == [
        ("nebius", 10.0, True), ("aws", 10.5, True), ("aws", 11.2, True)]
    assert {o["cloud"] for o in only_aws} == {"aws"}


def test_price_cap(monkeypatch):
    with cloud_boundary(ALL, monkeypatch):
        got, _ = offers("--clouds", ",".join(ALL), "--max-price", "40")
        code, _, err = run("up", "--dryrun", "--clouds", "aws", "--max-price", "20")
    assert got and all(o["price_per_hour"] <= 40 for o in got)
    assert code == 2 and "no H100:8 offer costs $20.00/h or less" in err and "Traceback" not in err


def test_optimizer_picks_cheapest_enabled_offer_for_the_plan(monkeypatch):
    # Nebius is cheaper but has no credentials here: SkyPilot's optimizer must place the run on Lambda.
    with cloud_boundary(["aws", "lambda"], monkeypatch):
        code, out, err = run("train", "--budget", "150", "--dryrun", "--json", "--clouds", "aws,lambda,nebius")
    assert code == 0, err
    plan = json.loads(out)
    # The run spec as it will be launched (not yet: no absolute deadlines), with the plan's keys as before.
    assert {"offer", "depth", "params", "tokens", "hours", "cost", "stages", "max_price_per_hour",
            "spend_cap", "deadline_hours", "base_deadline_hours", "margin_hours", "capped_note",
            "num_shards"} <= set(plan)
    from nanochat_core.run_spec import RunSpec
    spec = RunSpec.from_json(plan)
    assert spec.spec == 1 and spec.budget == 150 and spec.deadline_at is None and spec.launched_at is None
    assert (plan["offer"]["cloud"], plan["offer"]["instance_type"]) == ("lambda", "gpu_8x_h100_sxm5")
    assert 0 < plan["cost"] <= 150
    assert abs(sum(s["cost"] for s in plan["stages"]) - plan["cost"]) < 0.05
    assert [s["name"] for s in plan["stages"]][:4] == ["setup", "preflight", "tok", "base"]


def test_no_credentials_is_a_clear_error(monkeypatch):
    with cloud_boundary([], monkeypatch):
        code, out, err = run("up", "--yes", "--clouds", "aws,lambda")
    assert code == 2
    assert "`sky check` shows enabled: none" in err and "lambda" in err and "Traceback" not in err


def test_unknown_gpu_and_unreachable_catalog(monkeypatch):
    with cloud_boundary(ALL, monkeypatch):
        code, _, err = run("up", "--dryrun", "--gpus", "H10:8", "--clouds", "aws,lambda")
        assert code == 2 and "unknown GPU name 'H10'" in err and "H100" in err
        code, _, err = run("up", "--dryrun", "--gpus", "H100:3", "--clouds", "aws")
        assert code == 2 and "available counts: 8" in err
        code, _, err = run("up", "--dryrun", "--clouds", "gcp")
        assert code == 2 and "no cloud price catalog could be read" in err
        code, _, err = run("up", "--dryrun", "--clouds", "moon")
        assert code == 2 and "unknown cloud" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("cloud, acc, count, itype, info, expected", [
    ("aws", "H100", 8, "p5.48xlarge", "{'Gpus': [{'Name': 'H100'}]}", "nvlink"),      # family rule
    ("lambda", "H100", 8, "gpu_8x_h100_sxm5", "", "nvlink"),                          # "sxm" in the name
    ("runpod", "H100", 8, "8x_H100_SECURE", "{'Gpus': [{'Name': 'H100'}]}", "pcie"),  # RunPod bare name
    ("runpod", "H100-SXM", 8, "8x_H100-SXM_SECURE", "", "nvlink"),
    ("azure", "H100", 2, "Standard_NC80adis_H100_v5", "H100 NVL PCIe", "pcie"),       # "PCIe" in GpuInfo
    ("vast", "RTX4090", 8, "8x-RTX4090", "", "unknown"),
    ("aws", "A10G", 1, "g5.xlarge", "", "single-gpu"),
])
def test_interconnect_rule(cloud, acc, count, itype, info, expected):
    from nanochat_cli.planning.offers import interconnect
    assert interconnect(cloud, acc, count, itype, info) == expected


def test_dryrun_plan_needs_no_credentials(monkeypatch):
    with cloud_boundary([], monkeypatch):
        code, out, err = run("train", "--budget", "100", "--dryrun", "--json", "--clouds", ",".join(ALL))
    assert code == 0, err
    plan = json.loads(out)
    assert plan["offer"]["cloud"] == "nebius" and plan["offer"]["enabled"] is False
    assert "sky check" in err and plan["cost"] <= 100
