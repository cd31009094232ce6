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
OFFER_LAMBDA = {"cloud": "lambda", "region": "us-east-1", "instance_type": "gpu_8x_h100_sxm5",
                "accelerators": "H100:8", "spot": False, "price_per_hour": 31.92, "interconnect": "nvlink",
                "enabled": True}


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
    # Base may run until base_deadline_hours after launch: at least its planned end (setup + the node's
    # preflight + tok + base).
    assert plan["base_deadline_hours"] >= hours["setup"] + hours["preflight"] + hours["tok"] + hours["base"] - 1e-3
    # At the dearest offer the launch may fail over to, the whole run (and its margin) stays within budget.
    assert plan["max_price_per_hour"] >= plan["offer"]["price_per_hour"]
    assert plan["max_price_per_hour"] * plan["hours"] <= budget
    assert plan["max_price_per_hour"] * (plan["deadline_hours"] + plan["margin_hours"]) <= budget + 0.01
    assert plan["deadline_hours"] >= plan["hours"] - 1e-3


@pytest.mark.parametrize("spot", [False, True], ids=["on-demand", "spot"])
@pytest.mark.parametrize("budget", [20, 30, 50])
def test_the_smallest_budgets_survive_a_slow_setup_or_say_they_cannot(budget, spot, monkeypatch):
    """At $20 on-demand the plan left 1.9 min between base training's planned end and its deadline: a setup
    4 minutes slower than the 6 planned cut base short after most of the money was spent. Every plan now
    keeps SLOW_SETUP_H free there, or says it cannot and names the budget that does."""
    from nanochat_cli.planning import planner
    r = dryrun(budget, spot, monkeypatch)
    if r.exit_code == 2:
        pytest.skip(f"${budget} is refused outright (the test above checks it names a budget that works)")
    plan = json.loads(r.stdout)
    hours = {s["name"]: s["hours"] for s in plan["stages"]}
    spare = plan["base_deadline_hours"] - sum(hours[n] for n in ("setup", "preflight", "tok", "base"))
    if spare >= planner.SLOW_SETUP_H - 2e-3:
        assert not plan["setup_note"]
        return
    note = plan["setup_note"]
    assert "cuts base short" in note, plan
    better = int(note.split("--budget ")[1].split()[0])
    roomy = json.loads(dryrun(better, spot, monkeypatch).stdout)
    hours = {s["name"]: s["hours"] for s in roomy["stages"]}
    assert roomy["base_deadline_hours"] - sum(hours[n] for n in ("setup", "preflight", "tok", "base")) \
        >= planner.SLOW_SETUP_H - 2e-3


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
    # The deadlines travel in one file, the run spec, and nowhere else (no argument, no environment variable).
    task = launched["task"]
    spec = shipped_spec(task)
    assert "deadline" not in task.envs["NANOCHAT_ARGS"] and not any("DEADLINE" in k for k in task.envs)
    assert spec.spend_cap == plan["spend_cap"] and spec.max_price_per_hour == plan["max_price_per_hour"]
    base_at, end_at = spec.base_deadline_at, spec.deadline_at
    assert t0 + plan["base_deadline_hours"] * 3600 - 2 <= base_at <= t0 + plan["base_deadline_hours"] * 3600 + 5
    assert end_at == pytest.approx(t0 + plan["deadline_hours"] * 3600, abs=5)
    # The pipeline trains base against exactly that moment (not a fixed reserve before the job's end).
    from nanochat_core.stages.pipeline import Pipeline, parse_args
    spec_file = task.file_mounts[task.envs["NANOCHAT_SPEC"]]
    pipe = Pipeline(parse_args(["--run-dir", "/tmp/x", "--spec", spec_file] + task.envs["NANOCHAT_ARGS"].split()))
    assert pipe.stage_deadline("base") == base_at and pipe.stage_deadline("sft") == end_at
    assert pipe.a.price_per_hour == spec.price_per_hour
    # Failover only to offers at which this plan fits the budget: every candidate SkyPilot may launch.
    prices = sorted(res.get_cost(3600) for res in launched["task"].resources)
    assert prices and prices[-1] == pytest.approx(plan["max_price_per_hour"])
    assert all(p * (plan["hours"] + plan["margin_hours"]) <= 30 for p in prices)
    # The record existed when the provisioning request went out.
    assert "nanochat-m1" in launched["records"]


def shipped_spec(task):
    """The run spec a SkyPilot task carries to the node: the local file its NANOCHAT_SPEC mount copies."""
    from nanochat_core import run_spec
    return run_spec.read(task.file_mounts[task.envs["NANOCHAT_SPEC"]])


def launch_recording(monkeypatch, *args):
    """`nanochat train ... --yes --detach` with SkyPilot's launch faked at the cloud boundary: (result, start
    time, the node's pipeline arguments, the cluster records when the request went out)."""
    import sky
    launched = {}

    def fake_launch(task, cluster_name, idle_minutes_to_autostop, down, wait_for=None, dryrun=False):
        launched.update(args=task.envs["NANOCHAT_ARGS"].split(), records=state.load_clusters(),
                        spec=shipped_spec(task))
        return "launch-request"

    monkeypatch.setattr(sky, "launch", fake_launch)
    monkeypatch.setattr(sky, "stream_and_get", lambda req: (5, None))
    with cloud_boundary(CLOUDS, monkeypatch):
        t0 = time.time()
        r = CliRunner().invoke(app, ["train", "--yes", "--detach", *args])
    return r, t0, launched.get("args"), launched.get("records"), launched.get("spec")


def test_the_nodes_preflight_stage_is_planned_priced_and_not_taken_out_of_base(monkeypatch):
    """The cloud pipeline opens with preflight (compile and a few steps at the planned depth): the plan counts
    it, in the pipeline's order, so base's deadline leaves base its planned time after it. At $20 the old plan
    (no preflight) chose d14 and set base's deadline 3 minutes before preflight + base could end."""
    from nanochat_cli.planning import planner
    from nanochat_core.stages.pipeline import DEFAULT_STAGES
    node = DEFAULT_STAGES["cloud"].split(",")
    to_base = node[:node.index("base") + 1]                      # what runs on the node before base ends
    for budget in (20, 100):
        r = dryrun(budget, False, monkeypatch)
        assert r.exit_code == 0, r.stderr
        plan = json.loads(r.stdout)
        hours = {s["name"]: s["hours"] for s in plan["stages"]}
        assert [s["name"] for s in plan["stages"]][:len(to_base) + 1] == ["setup"] + to_base
        assert hours["preflight"] == pytest.approx(planner.PREFLIGHT_H, abs=1e-3)
        assert plan["hours"] == pytest.approx(sum(hours.values()), abs=2e-3)
        assert plan["cost"] == pytest.approx(plan["hours"] * plan["offer"]["price_per_hour"], abs=0.05)
        assert plan["base_deadline_hours"] >= sum(hours[n] for n in ["setup"] + to_base) - 1e-3


def test_preflight_only_is_planned_priced_and_capped_as_setup_plus_preflight(monkeypatch):
    """`--preflight-only` checks the depth the budget would train, and pays for setup and preflight alone: its
    plan says so, and its own cost plus the margin - not the training budget - is the hard cap on the node."""
    from nanochat_cli.planning import planner
    full = json.loads(dryrun(100, False, monkeypatch).stdout)
    r = dryrun(100, False, monkeypatch, ["--preflight-only"])
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["depth"] == full["depth"]                        # the depth the full run would train
    assert [s["name"] for s in plan["stages"]] == ["setup", "preflight"]
    assert plan["hours"] == pytest.approx(planner.SETUP_H + planner.PREFLIGHT_H, abs=1e-3)
    price = plan["max_price_per_hour"]
    assert plan["hours"] <= plan["deadline_hours"] <= plan["hours"] + 1 / price
    assert plan["spend_cap"] == math.ceil(price * (plan["hours"] + plan["margin_hours"]))
    assert price * (plan["deadline_hours"] + plan["margin_hours"]) <= plan["spend_cap"] + 0.01
    assert "preflight" in plan["capped_note"] and f"${plan['spend_cap']}" in plan["capped_note"]
    r, t0, args, records, spec = launch_recording(monkeypatch, "--budget", "100", "--preflight-only", "--name", "pf1")
    assert r.exit_code == 0, r.stderr
    assert args[args.index("--stages") + 1] == "preflight" and args[args.index("--depth") + 1] == str(plan["depth"])
    assert spec.deadline_at == pytest.approx(t0 + plan["deadline_hours"] * 3600, abs=5)
    assert records["nanochat-pf1"]["budget"] == plan["spend_cap"]  # status counts down from the real cap


def test_a_plan_capped_at_the_largest_depth_is_capped_at_its_own_cost_on_the_node_too(monkeypatch):
    """$1000 buys more than d32: the plan trains d32, and its deadlines (so what a run gone wrong can spend)
    follow the plan's own cost plus the margin at the dearest failover price - not the whole $1000."""
    from nanochat_cli.planning import planner
    r = dryrun(1000, False, monkeypatch)
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["depth"] == planner.DEPTHS[-1]
    price = plan["max_price_per_hour"]
    cap = math.ceil(price * (plan["hours"] + plan["margin_hours"] + planner.SLOW_SETUP_H))
    assert plan["hours"] <= plan["deadline_hours"] <= plan["hours"] + planner.SLOW_SETUP_H + 1 / price  # not 1000/$
    assert plan["spend_cap"] == cap < 1000
    assert price * (plan["deadline_hours"] + plan["margin_hours"]) <= cap + 0.01
    assert plan["base_deadline_hours"] >= plan["hours"] - sum(s["hours"] for s in plan["stages"]
                                                              if s["name"] in ("mid", "sft", "eval")) - 1e-3
    assert f"${cap}" in plan["capped_note"] and "$1000" in plan["capped_note"]
    with cloud_boundary(CLOUDS, monkeypatch):                    # the human plan says what is spent at most
        human = CliRunner().invoke(app, ["train", "--budget", "1000", "--dryrun"])
    assert human.exit_code == 0 and f"at most ${cap}.00" in " ".join(human.stdout.split()), human.stdout
    r, t0, args, records, spec = launch_recording(monkeypatch, "--budget", "1000", "--name", "c1")
    assert r.exit_code == 0, r.stderr
    assert spec.deadline_at == pytest.approx(t0 + plan["deadline_hours"] * 3600, abs=5)
    assert spec.base_deadline_at == pytest.approx(t0 + plan["base_deadline_hours"] * 3600, abs=5)
    assert records["nanochat-c1"]["budget"] == cap               # status and the meter count down from it
    assert state.read_json(state.run_dir("c1") / "plan.json")["spend_cap"] == cap


def test_a_budget_truncated_end_is_shown_as_such_not_as_success():
    from nanochat_cli.planning.cost import CostMeter
    from nanochat_cli.stream import RunView
    view = RunView(CostMeter(23.6, time.time(), 30.0), title="t")
    line = view.feed({"event": "done", "run_dir": "/r", "state": "BUDGET_TRUNCATED",
                      "message": "base training reached step 3 of 100 planned (3%)"})
    assert line.startswith("== budget-truncated: base training reached step 3 of 100")
    assert view.meter.outcome == "BUDGET_TRUNCATED"


# -----------------------------------------------------------------------------
# The record exists before provisioning; a failed or interrupted launch leaves nothing billing

def launch_that(monkeypatch, outcome, down_error=None):
    """sky.launch/stream_and_get/down at the cloud boundary: the launch request goes out (the node may now
    exist), then `outcome` happens while we wait for it."""
    import sky
    seen = {"downed": [], "cancelled": []}

    def fake_launch(task, cluster_name, **kw):
        seen["records_at_launch"] = set(state.load_clusters())
        seen["cluster"] = cluster_name
        return "launch-req"

    def fake_stream_and_get(req):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def fake_down(name):
        seen["downed"].append(name)
        if down_error:
            raise down_error
        return "down-req"

    monkeypatch.setattr(sky, "launch", fake_launch)
    monkeypatch.setattr(sky, "stream_and_get", fake_stream_and_get)
    monkeypatch.setattr(sky, "down", fake_down)
    monkeypatch.setattr(sky, "api_cancel", lambda req: seen["cancelled"].append(req) or "cancel-req")
    monkeypatch.setattr(sky, "get", lambda req: None)
    return seen


def train(monkeypatch, *args):
    with cloud_boundary(CLOUDS, monkeypatch):
        return CliRunner().invoke(app, ["train", "--budget", "100", "--yes", "--detach", *args])


def test_a_launch_that_fails_in_setup_tears_the_new_cluster_down(monkeypatch):
    from sky import exceptions
    seen = launch_that(monkeypatch, exceptions.CommandError(1, "setup", "Failed to run setup", None))
    r = train(monkeypatch, "--name", "f1")
    assert "nanochat-f1" in seen["records_at_launch"]           # recorded before the provisioning request
    assert r.exit_code == 2 and "torn down" in r.stderr and "nothing is billing" in r.stderr, r.stderr
    assert seen["downed"] == ["nanochat-f1"] and state.load_clusters() == {}


def test_ctrl_c_while_provisioning_cancels_the_request_and_tears_down(monkeypatch):
    seen = launch_that(monkeypatch, KeyboardInterrupt())
    r = train(monkeypatch, "--name", "f2")
    assert r.exit_code == 2 and "interrupted" in r.stderr and "torn down" in r.stderr, r.stderr
    assert seen["cancelled"] == ["launch-req"] and seen["downed"] == ["nanochat-f2"]
    assert state.load_clusters() == {}


def test_when_teardown_fails_too_the_record_stays_and_the_error_names_the_command(monkeypatch):
    seen = launch_that(monkeypatch, RuntimeError("provisioner lost"), down_error=RuntimeError("cloud API down"))
    r = train(monkeypatch, "--name", "f3")
    assert r.exit_code == 2 and "`nanochat down --cluster nanochat-f3`" in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert seen["downed"] == ["nanochat-f3"]                    # the teardown was tried
    assert "nanochat-f3" in state.load_clusters()               # still known: status/down find it


def skypilot_reports(monkeypatch, states: dict):
    """sky.status at the cloud boundary: {cluster name: ClusterStatus name}; a name not listed is gone."""
    import sky
    from sky.utils import status_lib
    monkeypatch.setattr(sky, "status", lambda names: ("status", [
        {"name": n, "status": getattr(status_lib.ClusterStatus, states[n])} for n in names if n in states]))
    monkeypatch.setattr(sky, "get", lambda req: req[1] if isinstance(req, tuple) else None)


def test_a_record_whose_node_is_gone_is_not_reused_and_a_relaunch_tears_down_what_it_made(monkeypatch):
    """The newest on-demand record was reused even when SkyPilot reported it DOWN (autodown had removed it),
    and `created = rec is None` meant a failed setup on the re-provisioned node left it up, without autostop.
    Now a gone cluster is skipped (or, named with --cluster, refused in one line), and any launch onto a
    cluster that is not up is torn down when it fails."""
    from sky import exceptions
    old = state.new_cluster_record("nanochat-old", "sky", {**OFFER_LAMBDA}, budget=30.0)
    old["launched_at"] = time.time() - 7200
    state.save_cluster(old)
    setup_fails = exceptions.CommandError(1, "setup", "Failed to run setup", None)
    seen = launch_that(monkeypatch, setup_fails)
    skypilot_reports(monkeypatch, {})                            # SkyPilot: nanochat-old is gone
    r = train(monkeypatch, "--name", "n2")
    assert seen["cluster"] == "nanochat-n2" and seen["downed"] == ["nanochat-n2"], r.stderr
    assert "already cost" not in r.stderr                        # the gone node's hours are not charged
    r = train(monkeypatch, "--name", "n3", "--cluster", "nanochat-old")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "is gone" in r.stderr
    # A recorded cluster that is stopped: this launch provisions it again, so a failure tears it down.
    seen = launch_that(monkeypatch, setup_fails)
    skypilot_reports(monkeypatch, {"nanochat-old": "STOPPED"})
    r = train(monkeypatch, "--name", "n4", "--cluster", "nanochat-old")
    assert seen["cluster"] == "nanochat-old" and seen["downed"] == ["nanochat-old"], r.stderr
    assert r.exit_code == 2 and "torn down" in r.stderr
    # One that is up stays up (it was billing before this launch, with its autostop), and the error says so.
    state.save_cluster(old)
    seen = launch_that(monkeypatch, setup_fails)
    skypilot_reports(monkeypatch, {"nanochat-old": "UP"})
    r = train(monkeypatch, "--name", "n5", "--cluster", "nanochat-old", "--budget", "200")
    assert seen["downed"] == [] and "`nanochat down --cluster nanochat-old`" in r.stderr, r.stderr


def test_the_launched_price_is_read_back_and_metered(monkeypatch):
    """SkyPilot may fail over to another offer: the record (and so the meter and status) carry the price of
    what was actually launched, read from the handle SkyPilot returns."""
    import sky
    from types import SimpleNamespace
    with cloud_boundary(CLOUDS, monkeypatch):
        lambda_res = sky.Resources(infra="lambda/us-east-1", instance_type="gpu_8x_h100_sxm5",
                                   accelerators={"H100": 8})
        launch_that(monkeypatch, (4, SimpleNamespace(launched_resources=lambda_res)))
        # a small plan, so every candidate fits the budget and SkyPilot may fail over to any of them
        r = CliRunner().invoke(app, ["train", "--budget", "100", "--depth", "12", "--yes", "--detach", "--name", "p1"])
    assert r.exit_code == 0, r.stderr
    rec = state.get_cluster("nanochat-p1")
    assert rec["offer"]["cloud"] == "nebius" and rec["price_per_hour"] == pytest.approx(31.92)
    assert rec["launched"]["cloud"] == "lambda" and rec["price_per_hour"] <= rec["max_price_per_hour"]
    assert rec["max_price_per_hour"] == pytest.approx(57.0)      # the dearest candidate set the deadlines


# -----------------------------------------------------------------------------
# status and down also find nanochat's clusters and managed jobs from SkyPilot itself

def skypilot_knows(monkeypatch, clusters, jobs):
    import sky
    from sky.server import common as server_common
    monkeypatch.setattr(server_common, "get_api_server_status",
                        lambda *a, **k: server_common.ApiServerInfo(status=server_common.ApiServerStatus.HEALTHY))
    monkeypatch.setattr(sky, "status", lambda *a, **k: ("status", clusters))
    monkeypatch.setattr(sky.jobs, "queue_v2", lambda **k: ("queue", (jobs, len(jobs), {}, len(jobs))))
    downed, cancelled = [], []
    monkeypatch.setattr(sky, "down", lambda name: downed.append(name) or ("down", None))
    monkeypatch.setattr(sky.jobs, "cancel", lambda **k: cancelled.append(k) or ("cancel", None))
    monkeypatch.setattr(sky, "get", lambda req: req[1])
    return downed, cancelled


def test_status_and_down_find_unrecorded_nanochat_clusters_and_jobs_through_skypilot(monkeypatch):
    from sky.utils import status_lib
    from sky.jobs.state import ManagedJobStatus
    downed, cancelled = skypilot_knows(
        monkeypatch, [{"name": "nanochat-lost", "status": status_lib.ClusterStatus.INIT},
                      {"name": "someone-elses", "status": status_lib.ClusterStatus.UP}],
        [{"job_name": "nanochat-s9", "job_id": 9, "status": ManagedJobStatus.RUNNING}])
    r = CliRunner().invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.stderr
    found = {d["name"]: d for d in json.loads(r.stdout)["unrecorded"]}
    assert set(found) == {"nanochat-lost", "nanochat-s9"} and found["nanochat-s9"]["kind"] == "managed"
    r = CliRunner().invoke(app, ["down", "--yes"])
    assert r.exit_code == 0, r.stderr
    assert downed == ["nanochat-lost"] and cancelled == [{"job_ids": [9]}]


# -----------------------------------------------------------------------------
# Money shown right; stale records clearable

def test_a_damaged_clusters_json_still_lets_down_tear_down_what_skypilot_lists(monkeypatch):
    """`down` used to stop at the damaged file and tear down nothing, not even clusters SkyPilot itself
    lists. Now everything nanochat SkyPilot lists comes down, and the damaged file is still named, in one line."""
    from sky.utils import status_lib
    downed, _ = skypilot_knows(monkeypatch, [{"name": "nanochat-d1", "status": status_lib.ClusterStatus.UP}], [])
    state.clusters_file().parent.mkdir(parents=True, exist_ok=True)
    state.clusters_file().write_text('{"clusters": [')             # cut off mid-write by some other tool
    r = CliRunner().invoke(app, ["down", "--yes"])
    assert downed == ["nanochat-d1"], r.output
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()
    assert "clusters.json is not valid JSON" in line and "torn down" in line


def test_the_run_table_does_not_call_a_run_ended_while_skypilot_still_has_its_cluster(monkeypatch):
    """A run whose cluster has no record here (another laptop's record, a deleted clusters.json) was shown
    as "ENDED (cluster gone)" while its cluster was up and billing."""
    from sky.utils import status_lib
    skypilot_knows(monkeypatch, [{"name": "nanochat-u1", "status": status_lib.ClusterStatus.UP}], [])
    state.write_job(state.run_dir("u1"), {"backend": "sky", "cluster": "nanochat-u1", "run": "u1", "job_id": 1,
                                          "managed": False, "state": "RUNNING"})
    state.write_job(state.run_dir("g1"), {"backend": "sky", "cluster": "nanochat-g1", "run": "g1", "job_id": 1,
                                          "managed": False, "state": "RUNNING"})
    r = CliRunner().invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.stderr
    jobs = {j["run"]: j["state"] for j in json.loads(r.stdout)["jobs"]}
    assert jobs["u1"].startswith("UNKNOWN (cluster UP") and jobs["g1"] == "ENDED (cluster gone)"



def test_a_finished_spot_run_stops_counting_and_its_record_clears_with_the_controller_down(monkeypatch):
    import sky
    from sky import exceptions
    from sky.jobs.state import ManagedJobStatus
    monkeypatch.setattr(sky.jobs, "launch", lambda task, name: "jobs-launch")
    monkeypatch.setattr(sky, "stream_and_get", lambda req: ([21], None))
    with cloud_boundary(CLOUDS, monkeypatch):
        r = CliRunner().invoke(app, ["train", "--budget", "50", "--spot", "--yes", "--detach", "--name", "s2",
                                     "--bucket", "s3://my-bucket"])
    assert r.exit_code == 0, r.stderr
    # Two days later (the whole record shifted back in time, as if train had run then): the job ended.
    rec = state.get_cluster("nanochat-s2")
    shift = 2 * 86400
    state.update_cluster("nanochat-s2", launched_at=rec["launched_at"] - shift, ends_by=rec["ends_by"] - shift)
    ended = rec["launched_at"] - shift + 3600
    monkeypatch.setattr(sky.jobs, "queue_v2", lambda **k: ("queue", ([{"job_id": 21, "status":
                        ManagedJobStatus.SUCCEEDED, "end_at": ended}], 1, {}, 1)))
    monkeypatch.setattr(sky, "get", lambda req: req[1])
    r = CliRunner().invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.stderr
    (c,) = json.loads(r.stdout)["clusters"]
    assert c["spent"] == pytest.approx(rec["price_per_hour"], rel=0.01)   # one hour, not two days
    assert 0 <= c["budget_left"] <= 50

    def controller_down(**k):
        raise exceptions.ClusterNotUpError("The jobs controller is not up.", cluster_status=None)

    monkeypatch.setattr(sky.jobs, "cancel", controller_down)
    monkeypatch.setattr(sky, "down", lambda name: (_ for _ in ()).throw(exceptions.ClusterDoesNotExist(name)))
    r = CliRunner().invoke(app, ["down", "--yes"])
    assert r.exit_code == 0, r.stderr
    assert state.load_clusters() == {}
    cost = float(r.stdout.split("final cost $")[1].split()[0])
    assert cost == pytest.approx(rec["price_per_hour"], rel=0.01)


def test_train_without_spot_never_reuses_a_spot_record(monkeypatch):
    spot_offer = {"cloud": "aws", "region": "us-east-1", "instance_type": "p5.48xlarge", "accelerators": "H100:8",
                  "spot": True, "price_per_hour": 10.5, "interconnect": "nvlink", "enabled": True}
    state.save_cluster(state.new_cluster_record("nanochat-old-spot", "sky", spot_offer, spot=True))
    r = dryrun(100, False, monkeypatch)
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["offer"]["spot"] is False and plan["offer"]["price_per_hour"] > 20


def test_multi_node_without_a_bucket_is_refused_at_plan_time(monkeypatch):
    r = dryrun(100, False, monkeypatch, ["--nodes", "2"])
    assert r.exit_code == 2 and "--nodes 2 needs --bucket" in r.stderr


def eval_on(monkeypatch, cluster_status, spec: dict, *flags):
    """`nanochat eval --name e1` of a cloud run whose cluster SkyPilot reports in `cluster_status` (None: gone),
    with SkyPilot's launch faked at the cloud boundary. Returns (result, what the launch was sent or None)."""
    import sky
    from sky.utils import status_lib
    from test_cli_skyops import OFFER
    rec = state.new_cluster_record("nc-ev", "sky", OFFER, budget=100.0)
    rec["launched_at"] = time.time() - 1800
    state.save_cluster(rec)
    rd = state.run_dir("e1")
    state.write_job(rd, {"backend": "sky", "cluster": "nc-ev", "run": "e1", "job_id": 1, "managed": False})
    from nanochat_core.common import atomic_write_json
    atomic_write_json(rd / "plan.json", spec)
    sent = {}
    states = [] if cluster_status is None else [{"name": "nc-ev", "status": getattr(status_lib.ClusterStatus,
                                                                                    cluster_status)}]

    def fake_launch(task, cluster_name, **kw):
        sent.update(task=task, cluster=cluster_name)
        raise RuntimeError("stop here")                         # what happens after is not this test's

    monkeypatch.setattr(sky, "status", lambda names: ("status", states))
    monkeypatch.setattr(sky, "get", lambda req: req[1] if isinstance(req, tuple) else None)
    monkeypatch.setattr(sky, "launch", fake_launch)
    monkeypatch.setattr(sky, "stream_and_get", lambda req: req)
    with cloud_boundary(CLOUDS, monkeypatch):
        r = CliRunner().invoke(app, ["eval", "--name", "e1", "--json", *flags])
    return r, sent


def test_eval_never_launches_a_node_the_run_no_longer_has(monkeypatch):
    """The cluster tore itself down (autodown at the budget's end): eval used to launch a fresh 8xH100 node
    with no deadline and no prompt. Now it says how to evaluate (pulled, here, for $0) and launches nothing."""
    today = {"preset": "cloud", "budget": 100.0, "spend_cap": 100.0, "deadline_at": time.time() + 3600,
             "offer": {"cloud": "lambda"}, "stages": []}                 # a plan.json as today's version wrote it
    for gone in (None, "STOPPED"):
        r, sent = eval_on(monkeypatch, gone, today, "--yes")
        assert r.exit_code == 2 and not sent, r.output
        (line,) = r.stderr.strip().splitlines()
        assert "is not up" in line and "`nanochat eval --local --name e1`" in line
    # Up, but past the run's deadline (the node is on its way down): refused too, never a new deadline.
    r, sent = eval_on(monkeypatch, "UP", {**today, "deadline_at": time.time() - 60}, "--yes")
    assert r.exit_code == 2 and not sent and "past its budget's deadline" in r.stderr


def test_eval_on_an_up_cluster_asks_and_ships_the_runs_own_spec(monkeypatch):
    """On a cluster that is up (and billing anyway), eval shows what it spends and asks; the node gets the
    run's own spec file, so its hard cap and deadline still hold (eval cannot extend them)."""
    deadline = time.time() + 3600
    spec = {"preset": "cloud", "budget": 100.0, "spend_cap": 80.0, "deadline_at": deadline,
            "offer": {"cloud": "lambda"}, "stages": []}
    r, sent = eval_on(monkeypatch, "UP", spec)                  # no --yes, and no terminal to ask on
    assert r.exit_code == 2 and not sent and "hard cap $80.00" in r.stderr and "add --yes" in r.stderr
    r, sent = eval_on(monkeypatch, "UP", spec, "--yes")
    assert sent["cluster"] == "nc-ev"
    assert shipped_spec(sent["task"]).deadline_at == deadline and shipped_spec(sent["task"]).spend_cap == 80.0
    assert "--stages eval,report" in sent["task"].envs["NANOCHAT_ARGS"]
    assert "--eval-dtype" not in sent["task"].envs["NANOCHAT_ARGS"]   # training's own weights unless asked
    r, sent = eval_on(monkeypatch, "UP", spec, "--yes", "--dtype", "int8")
    assert "--eval-dtype int8" in sent["task"].envs["NANOCHAT_ARGS"]   # the node's eval stages get it


def test_skypilot_errors_reach_the_user_as_one_plain_line(monkeypatch):
    from nanochat_cli.backends.sky_replies import sky_error
    e = sky_error("launching run 'x'", RuntimeError("\x1b[31mFailed to provision\x1b[0m: no capacity\nmore"))
    assert str(e).startswith("launching run 'x' failed (RuntimeError: Failed to provision: no capacity)")
    assert "\x1b" not in str(e) and "\n" not in str(e)


def test_logs_of_a_cluster_that_is_gone_says_so(monkeypatch):
    import sky
    from sky import exceptions
    from test_cli_skyops import OFFER
    state.save_cluster(state.new_cluster_record("nc-gone", "sky", OFFER, budget=100.0))
    state.write_job(state.run_dir("g1"), {"backend": "sky", "cluster": "nc-gone", "run": "g1", "job_id": 2,
                                          "managed": False, "state": "RUNNING"})
    monkeypatch.setattr(sky, "tail_logs", lambda *a, **k: iter(()))          # the server sends nothing

    def no_cluster(*a, **k):
        raise exceptions.ClusterDoesNotExist("Cluster 'nc-gone' does not exist.")

    monkeypatch.setattr(sky, "job_status", no_cluster)
    monkeypatch.setattr(sky, "status", lambda names: ("status", []))
    monkeypatch.setattr(sky, "get", lambda req: req[1])
    r = CliRunner().invoke(app, ["logs", "--name", "g1"])
    assert r.exit_code == 2 and "is gone" in r.stderr, (r.stdout, r.stderr)


def test_piped_offer_tables_keep_whole_rows_and_say_prices_are_per_node(monkeypatch):
    with cloud_boundary(CLOUDS, monkeypatch):
        r = CliRunner().invoke(app, ["up", "--dryrun", "--nodes", "2"])
    assert r.exit_code == 0, r.stderr
    assert "gpu-h100-sxm_8gpu-128vcpu-1600gb" in r.stdout and "2 nodes cost 2x" in r.stdout


def test_a_closed_terminal_while_provisioning_tears_down_like_ctrl_c(monkeypatch):
    import os
    import signal
    seen = launch_that(monkeypatch, None)
    import sky

    def hangup_while_waiting(req):
        os.kill(os.getpid(), signal.SIGHUP)      # the laptop lid closes; the terminal hangs up
        time.sleep(1)
        raise AssertionError("SIGHUP did not interrupt the wait")

    def unhandled(*_):  # stands in for the default action (which would end this test process)
        raise AssertionError("SIGHUP was not handled by nanochat during the launch")

    monkeypatch.setattr(sky, "stream_and_get", hangup_while_waiting)
    before = signal.signal(signal.SIGHUP, unhandled)
    try:
        r = train(monkeypatch, "--name", "f4")
        assert signal.getsignal(signal.SIGHUP) is unhandled          # restored after the launch
    finally:
        signal.signal(signal.SIGHUP, before)
    assert r.exit_code == 2 and "interrupted" in r.stderr and seen["downed"] == ["nanochat-f4"], r.stderr
    assert state.load_clusters() == {}


def test_with_a_remote_api_server_enabled_clouds_and_the_optimizer_come_from_the_server(monkeypatch):
    """`sky api login`: this laptop's own SkyPilot state has no credentials (cloud_boundary([]) below); the
    server (its two SDK calls faked at that boundary, the optimizer itself real) says Lambda is enabled."""
    import sky
    from sky.optimizer import Optimizer
    from sky.server import common as server_common
    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", "http://203.0.113.5:46580")
    server_common.get_server_url.cache_clear()            # SkyPilot caches the endpoint per process
    asked = []

    def server_optimize(dag, **kw):
        asked.append("optimize")
        Optimizer.optimize(dag, quiet=True)     # what the server runs, here with Lambda enabled
        return ("optimize", dag)

    from sky.client import sdk as sky_sdk
    monkeypatch.setattr(sky_sdk, "enabled_clouds", lambda **kw: asked.append("enabled") or ("enabled", ["Lambda"]))
    monkeypatch.setattr(sky, "optimize", server_optimize)
    monkeypatch.setattr(sky, "get", lambda req: req[1])
    with cloud_boundary([], monkeypatch):
        from sky import check as sky_check
        from sky.utils import registry
        monkeypatch.setattr(sky_check, "get_cached_enabled_clouds_or_refresh",
                            lambda *a, **k: [registry.CLOUD_REGISTRY.from_str("lambda")] if "optimize" in asked else [])
        r = CliRunner().invoke(app, ["train", "--budget", "100", "--dryrun", "--json"])
    assert r.exit_code == 0, r.stderr
    server_common.get_server_url.cache_clear()
    assert json.loads(r.stdout)["offer"]["cloud"] == "lambda", (asked, r.stderr)
    assert asked[:1] == ["enabled"] and "optimize" in asked


def test_a_managed_spot_run_is_metered_at_the_offer_skypilot_placed_it_on(monkeypatch):
    import sky
    from sky.jobs.state import ManagedJobStatus
    monkeypatch.setattr(sky.jobs, "launch", lambda task, name: "jobs-launch")
    monkeypatch.setattr(sky, "stream_and_get", lambda req: ([31], None))
    with cloud_boundary(CLOUDS, monkeypatch):
        r = CliRunner().invoke(app, ["train", "--budget", "100", "--spot", "--yes", "--detach", "--name", "s3",
                                     "--bucket", "s3://my-bucket"])
    assert r.exit_code == 0, r.stderr
    rec = state.get_cluster("nanochat-s3")
    assert rec["offer"]["cloud"] == "nebius" and any(c["cloud"] == "aws" for c in rec["candidates"])
    # Nebius had no spot capacity: SkyPilot failed over to AWS us-west-2 (the queue says where, not the price).
    monkeypatch.setattr(sky.jobs, "queue_v2", lambda **k: ("queue", ([{"job_id": 31, "status":
                        ManagedJobStatus.RUNNING, "cloud": "AWS", "region": "us-west-2"}], 1, {}, 1)))
    monkeypatch.setattr(sky, "get", lambda req: req[1])
    r = CliRunner().invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.stderr
    (c,) = json.loads(r.stdout)["clusters"]
    # (the whole job's $/h: that node's spot price plus the jobs controller the plan counted)
    assert c["price_per_hour"] == pytest.approx(11.2 + rec["controller_per_hour"]) and rec["controller_per_hour"] > 0
    assert c["cloud"] == "aws" and c["region"] == "us-west-2"


def test_a_spot_launch_only_tries_zones_whose_price_the_plan_allowed_and_records_the_zone_paid(monkeypatch):
    """SkyPilot lists a region at its cheapest zone but, launched on the region alone, its provisioner tries
    every zone of it (AWS us-east-1 here: $10.50 and $17.63 spot): a spot run could land above the price its
    deadlines were computed from, and the record showed the region's price. Every zone SkyPilot's real zone
    loop would try is now within the plan's max price, and the price recorded is the zone's."""
    import sky
    from sky.backends.cloud_vm_ray_backend import RetryingVmProvisioner
    from sky.jobs.state import ManagedJobStatus
    launched = {}
    monkeypatch.setattr(sky.jobs, "launch", lambda task, name: launched.update(task=task) or "jobs-launch")
    monkeypatch.setattr(sky, "stream_and_get", lambda req: ([31], None))
    with cloud_boundary(["aws", "nebius"], monkeypatch):
        r = CliRunner().invoke(app, ["train", "--budget", "100", "--spot", "--depth", "12", "--yes", "--detach",
                                     "--name", "z1", "--bucket", "s3://my-bucket"])
        assert r.exit_code == 0, r.stderr
        spec = shipped_spec(launched["task"])
        tried = {}
        for res in launched["task"].resources:     # what the provisioner tries for each resource it may launch
            for zones in RetryingVmProvisioner._yield_zones(None, res, 1, "nanochat-z1", None, False):
                for z in zones or [None]:
                    name = z.name if z is not None else None
                    tried[(str(res.cloud).lower(), res.region, name)] = sky.catalog.get_hourly_cost(
                        res.instance_type, True, res.region, name, clouds=str(res.cloud).lower())
    assert ("aws", "us-east-1", "us-east-1a") in tried and ("aws", "us-east-1", "us-east-1b") not in tried
    per_node_cap = spec.max_price_per_hour - spec.controller_per_hour   # one node; the controller is not a zone's
    assert spec.controller_per_hour > 0 and max(tried.values()) <= per_node_cap + 1e-9, (tried, per_node_cap)
    # SkyPilot placed the job in us-east-1a: the meter and `status` charge that zone's price.
    import sky.jobs
    monkeypatch.setattr(sky.jobs, "queue_v2", lambda **k: ("queue", ([{"job_id": 31, "status":
                        ManagedJobStatus.RUNNING, "cloud": "AWS", "region": "us-east-1", "zone": "us-east-1a"}],
                        1, {}, 1)))
    monkeypatch.setattr(sky, "get", lambda req: req[1])
    r = CliRunner().invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.stderr
    rec = state.get_cluster("nanochat-z1")
    assert rec["launched"]["zone"] == "us-east-1a"
    assert rec["price_per_hour"] == pytest.approx(10.5 + spec.controller_per_hour)


def test_train_json_prints_only_json_on_stdout_and_skypilots_launch_output_goes_to_stderr_plain(monkeypatch):
    """SkyPilot streams a launch (its "Considered resources" table in colour, failover warnings from its
    logger) to stdout: in a pipe, `train --json` printed that before its JSON. Now stdout is one JSON object
    and SkyPilot's lines reach stderr without colour codes."""
    import logging
    import sys
    import sky

    def chatty_stream_and_get(req):
        print("\x1b[1mConsidered resources (1 node):\x1b[0m", file=sys.stdout, flush=True)
        logging.getLogger("sky.optimizer").warning("\x1b[33mFailed to provision in us-east-1; trying next\x1b[0m")
        return (5, None)

    monkeypatch.setattr(sky, "launch", lambda task, cluster_name, **kw: "launch-request")
    monkeypatch.setattr(sky, "stream_and_get", chatty_stream_and_get)
    with cloud_boundary(CLOUDS, monkeypatch):
        r = CliRunner().invoke(app, ["train", "--budget", "30", "--yes", "--json", "--name", "j1"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)                                     # nothing else on stdout
    assert out["run"] == "j1" and out["cluster"] == "nanochat-j1" and out["job_id"] == 5
    assert "Considered resources (1 node):" in r.stderr and "trying next" in r.stderr
    assert "\x1b[" not in r.stderr


def test_keep_never_goes_to_a_cloud_whose_nodes_cannot_stop(monkeypatch):
    """--keep stops the node instead of tearing it down, which Lambda (and RunPod, Fluidstack, Cudo,
    Shadeform) cannot do: such a node would never stop. SkyPilot's own feature table decides; the plan goes
    elsewhere, or is refused in one line when nothing else is enabled."""
    with cloud_boundary(["aws", "lambda"], monkeypatch):
        plain = CliRunner().invoke(app, ["train", "--budget", "150", "--dryrun", "--json"])
        kept = CliRunner().invoke(app, ["train", "--budget", "150", "--dryrun", "--json", "--keep"])
        only = CliRunner().invoke(app, ["train", "--budget", "150", "--dryrun", "--keep", "--clouds", "lambda"])
    assert json.loads(plain.stdout)["offer"]["cloud"] == "lambda"          # the cheapest enabled offer
    assert kept.exit_code == 0 and json.loads(kept.stdout)["offer"]["cloud"] == "aws", kept.stderr
    assert "left out lambda" in kept.stderr
    assert only.exit_code == 2 and "Traceback" not in only.output
    (line,) = only.stderr.strip().splitlines()
    assert "stop itself (--keep)" in line and "lambda" in line.lower()
