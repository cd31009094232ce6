"""The money path on SkyPilot's real SDK, task codegen, catalog reading and optimizer, faked only at the cloud
boundary (catalog CSVs on disk, which clouds have credentials, and SkyPilot's request functions that would
reach a cloud): one source of truth for the deadlines, failover within budget, the cluster record written
before any provisioning request and a failed or interrupted launch torn down, stale records clearable."""
import json
import math
import time

import pytest
from typer.testing import CliRunner

from test_cli_skyfakes import cloud_boundary  # (also: SKY_RUNTIME_DIR before sky is imported)
from nanochat_cli import state
from nanochat_cli.main import app

CLOUDS = ["aws", "lambda", "nebius"]


def dryrun(budget, spot, monkeypatch, extra=()):
    with cloud_boundary(CLOUDS, monkeypatch):
        return CliRunner().invoke(app, ["train", "--budget", str(budget), "--dryrun", "--json"]
                                  + (["--spot"] if spot else []) + list(extra))


@pytest.mark.parametrize("spot", [False, True], ids=["on-demand", "spot"])
@pytest.mark.parametrize("budget", [15, 20, 30, 50, 100])
def test_every_dryrun_plan_gives_base_its_tokens_within_budget_or_names_a_budget_that_works(budget, spot, monkeypatch):
    r = dryrun(budget, spot, monkeypatch)
    if r.exit_code == 2:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.output, r.output
        n = int(lines[0].split("--budget ")[1].split()[0])
        assert n > budget
        ok = dryrun(n, spot, monkeypatch)                         # the budget it names does work
        assert ok.exit_code == 0, ok.stderr
        r = ok
        budget = n
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    hours = {s["name"]: s["hours"] for s in plan["stages"]}
    # Base may run until base_deadline_hours after launch: at least its planned end (setup + tok + base).
    assert plan["base_deadline_hours"] >= hours["setup"] + hours["tok"] + hours["base"] - 1e-3
    # At the dearest offer the launch may fail over to, the whole run (and its margin) stays within budget.
    assert plan["max_price_per_hour"] >= plan["offer"]["price_per_hour"]
    assert plan["max_price_per_hour"] * plan["hours"] <= budget
    assert plan["max_price_per_hour"] * (plan["deadline_hours"] + plan["margin_hours"]) <= budget + 0.01
    assert plan["deadline_hours"] >= plan["hours"] - 1e-3


def test_train_hands_the_node_exactly_the_plans_deadlines_and_only_affordable_failover(monkeypatch):
    import sky
    launched = {}

    def fake_launch(task, cluster_name, idle_minutes_to_autostop, down, wait_for=None, dryrun=False):
        launched.update(task=task, cluster=cluster_name, records=state.load_clusters())
        return "launch-request"

    monkeypatch.setattr(sky, "launch", fake_launch)
    monkeypatch.setattr(sky, "stream_and_get", lambda req: (5, None))
    dry = dryrun(30, False, monkeypatch)
    plan = json.loads(dry.stdout)
    with cloud_boundary(CLOUDS, monkeypatch):
        t0 = time.time()
        r = CliRunner().invoke(app, ["train", "--budget", "30", "--yes", "--detach", "--name", "m1"])
    assert r.exit_code == 0, r.stderr
    args = launched["task"].envs["NANOCHAT_ARGS"].split()
    base_at = float(args[args.index("--base-deadline-at") + 1])
    end_at = float(args[args.index("--deadline-at") + 1])
    assert t0 + plan["base_deadline_hours"] * 3600 - 2 <= base_at <= t0 + plan["base_deadline_hours"] * 3600 + 5
    assert end_at == pytest.approx(t0 + plan["deadline_hours"] * 3600, abs=5)
    # The pipeline trains base against exactly that moment (not a fixed reserve before the job's end).
    from nanochat_core.pipeline import Pipeline, parse_args
    pipe = Pipeline(parse_args(["--run-dir", "/tmp/x", "--preset", "cloud"] + args[args.index("--deadline-at"):]))
    assert pipe.stage_deadline("base") == base_at and pipe.stage_deadline("sft") == end_at
    # Failover only to offers at which this plan fits the budget: every candidate SkyPilot may launch.
    prices = sorted(res.get_cost(3600) for res in launched["task"].resources)
    assert prices and prices[-1] == pytest.approx(plan["max_price_per_hour"])
    assert all(p * (plan["hours"] + plan["margin_hours"]) <= 30 for p in prices)
    # The record existed when the provisioning request went out.
    assert "nanochat-m1" in launched["records"]


def test_a_budget_truncated_end_is_shown_as_such_not_as_success():
    from nanochat_cli.cost import CostMeter
    from nanochat_cli.stream import RunView
    view = RunView(CostMeter(23.6, time.time(), 30.0), title="t")
    line = view.feed({"event": "done", "run_dir": "/r", "state": "BUDGET_TRUNCATED",
                      "message": "base training reached step 3 of 100 planned (3%)"})
    assert line.startswith("== budget-truncated: base training reached step 3 of 100")
    assert view.meter.outcome == "BUDGET_TRUNCATED"
