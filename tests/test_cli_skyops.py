"""SkyBackend's own logic with SkyPilot's request functions faked at the cloud boundary: log reconnects
(SkyPilot replays a job's log from the start on every connection), job-state mapping, an idempotent down,
the final cost from SkyPilot's cost report."""
import json
import time

import pytest
from typer.testing import CliRunner

from test_cli_skyfakes import cloud_boundary  # (also: SKY_RUNTIME_DIR before sky is imported)
from nanochat_cli import state
from nanochat_cli.main import app
from nanochat_cli.stream import resilient

OFFER = {"cloud": "lambda", "region": "us-east-1", "instance_type": "gpu_8x_h100_sxm5", "accelerators": "H100:8",
         "spot": False, "price_per_hour": 36.0, "interconnect": "nvlink", "enabled": True}


@pytest.fixture
def cluster(monkeypatch):
    """A recorded cluster that SkyPilot reports UP (sky.status at the cloud boundary; requests are tuples
    whose payload sky.get returns)."""
    import sky
    from sky.utils import status_lib
    monkeypatch.setattr(sky, "status", lambda names: ("status", [{"name": "nc-test",
                                                                  "status": status_lib.ClusterStatus.UP}]))
    monkeypatch.setattr(sky, "get", lambda req: req[1] if isinstance(req, tuple) else None)
    rec = state.new_cluster_record("nc-test", "sky", OFFER, budget=100.0)
    rec["launched_at"] = time.time() - 600          # up for 10 minutes at $36/h -> $6
    rec["runs"] = ["d12"]
    state.save_cluster(rec)
    state.write_job(state.run_dir("d12"), {"backend": "sky", "cluster": "nc-test", "run": "d12", "job_id": 3,
                                           "managed": False, "state": "RUNNING"})
    return rec


def test_tail_reconnects_without_repeats(cluster, monkeypatch):
    import sky
    from nanochat_cli.backends.skypilot import SkyBackend
    lines = [f"line {i}\n" for i in range(1, 31)]
    # SkyPilot's chunks need not end at line ends: split each line in two pieces.
    chunks = [piece for ln in lines for piece in (ln[:3], ln[3:])]
    connections = []

    def fake_tail_logs(name, job_id, follow, preload_content):
        assert (name, job_id, preload_content) == ("nc-test", 3, False)
        connections.append(1)
        for i, chunk in enumerate(chunks):
            if len(connections) <= 2 and i == 15 * len(connections):
                raise ConnectionError("stream closed")
            yield chunk

    monkeypatch.setattr(sky, "tail_logs", fake_tail_logs)
    backend = SkyBackend()
    rd = state.run_dir("d12")
    got = list(resilient(lambda pos: backend.tail(cluster, rd, pos), 0, backoff_s=0.01))
    assert [ln for ln, _ in got] == [ln.strip() for ln in lines]
    assert [p for _, p in got] == list(range(1, 31)) and len(connections) == 3


def test_job_state_mapping(cluster, monkeypatch):
    import sky
    from sky.skylet import job_lib
    from nanochat_cli.backends.skypilot import SkyBackend
    for status, expected in [(job_lib.JobStatus.SETTING_UP, "RUNNING"), (job_lib.JobStatus.SUCCEEDED, "SUCCEEDED"),
                             (job_lib.JobStatus.FAILED_SETUP, "FAILED"), (job_lib.JobStatus.CANCELLED, "CANCELLED")]:
        monkeypatch.setattr(sky, "job_status", lambda name, ids, s=status: ("req", {3: s}))
        monkeypatch.setattr(sky, "get", lambda req: req[1])
        assert SkyBackend().job_state(cluster, state.run_dir("d12")) == expected


def test_down_is_idempotent_and_reports_cost(cluster, monkeypatch):
    import sky
    from sky import exceptions
    calls = []

    def fake_down(name):
        calls.append(name)
        if len(calls) > 1:
            raise exceptions.ClusterDoesNotExist(f"Cluster {name} does not exist.")
        return ("down", None)

    monkeypatch.setattr(sky, "down", fake_down)
    monkeypatch.setattr(sky, "cost_report", lambda: ("cost", None))
    monkeypatch.setattr(sky, "get", lambda req: [{"name": "nc-test", "total_cost": 6.42}] if req[0] == "cost"
                        else None)
    r = CliRunner().invoke(app, ["down", "--yes"])
    assert r.exit_code == 0, r.stderr
    assert "down: 'nc-test' (stopped run d12); final cost $6.42" in r.stdout
    assert state.load_clusters() == {}
    # Recorded again (e.g. by a second laptop) but already gone at the cloud: not an error.
    state.save_cluster(cluster)
    monkeypatch.setattr(sky, "get", lambda req: None)
    r = CliRunner().invoke(app, ["down", "--yes"])
    assert r.exit_code == 0 and "final cost $" in r.stdout and calls == ["nc-test", "nc-test"]


def test_down_refuses_without_yes_when_not_interactive(cluster):
    r = CliRunner().invoke(app, ["down"])
    assert r.exit_code == 2 and "add --yes" in r.stderr and state.load_clusters()


def test_status_shows_spend_and_budget_left(cluster, monkeypatch):
    from nanochat_cli.backends import skypilot as sky_backend
    monkeypatch.setattr(sky_backend.SkyBackend, "cluster_state", lambda self, rec: "UP")
    monkeypatch.setattr(sky_backend.SkyBackend, "job_state", lambda self, rec, rd: "RUNNING")
    r = CliRunner().invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    (c,) = s["clusters"]
    assert c["state"] == "UP" and c["price_per_hour"] == 36.0
    assert c["spent"] == pytest.approx(6.0, abs=0.05) and c["budget_left"] == pytest.approx(94.0, abs=0.05)
    assert s["jobs"] == [{"run": "d12", "cluster": "nc-test", "job_id": 3, "state": "RUNNING",
                          "run_dir": str(state.run_dir("d12")), "submitted_at": None}]


def test_budget_counts_what_the_cluster_already_cost(cluster, monkeypatch):
    # $6 already spent (10 min at $36/h): a $100 budget plans with $94 and the deadline counts from launch.
    r = CliRunner().invoke(app, ["train", "--budget", "100", "--dryrun", "--json"])
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["offer"]["instance_type"] == "gpu_8x_h100_sxm5" and plan["cost"] <= 94.0
    r = CliRunner().invoke(app, ["train", "--budget", "5", "--dryrun"])
    assert r.exit_code == 2 and "already cost $6.00 of the $5.00 budget" in r.stderr


def test_train_launches_with_a_cluster_side_hard_cap(cluster, monkeypatch):
    """What `nanochat train` hands SkyPilot: the deadline (budget from the cluster's launch), autostop with
    teardown, the run's arguments; and what it records."""
    import sky
    launched = {}

    def fake_launch(task, cluster_name, idle_minutes_to_autostop, down, wait_for=None, dryrun=False):
        launched.update(task=task, cluster=cluster_name, autostop=idle_minutes_to_autostop, down=down,
                        wait_for=wait_for)
        return "launch-request"

    monkeypatch.setattr(sky, "launch", fake_launch)
    monkeypatch.setattr(sky, "stream_and_get", lambda req: (7, None))
    with cloud_boundary(["lambda"], monkeypatch):
        r = CliRunner().invoke(app, ["train", "--budget", "100", "--yes", "--detach", "--name", "r1"])
    assert r.exit_code == 0, r.stderr
    envs = launched["task"].envs
    from nanochat_core import run_spec
    spec = run_spec.read(launched["task"].file_mounts[envs["NANOCHAT_SPEC"]])    # what the node reads
    expected_deadline = cluster["launched_at"] + 100 / 36.0 * 3600 - 600   # budget from launch, less the margin
    # never later; up to 3.6 s earlier (the plan's hours are rounded down to 1/1000 h, which the node enforces)
    assert expected_deadline - 6 < spec.deadline_at <= expected_deadline + 1
    assert "deadline" not in envs["NANOCHAT_ARGS"] and spec.spend_cap == 100.0
    # Autodown waits for jobs only (an open ssh session must not keep the node billing), 1 idle minute.
    from sky.skylet.autostop_lib import AutostopWaitFor
    assert launched["wait_for"] == AutostopWaitFor.JOBS and launched["autostop"] == 1
    assert "--preset cloud" in envs["NANOCHAT_ARGS"] and envs["NANOCHAT_RUN"] == "r1"
    assert launched["cluster"] == "nc-test" and launched["down"] is True and launched["autostop"] >= 1
    job = state.read_job(state.run_dir("r1"))
    assert job["job_id"] == 7 and job["cluster"] == "nc-test"
    plan = json.loads((state.run_dir("r1") / "plan.json").read_text())
    assert plan["price_per_hour"] == 36.0 and plan["budget"] == 100.0 and plan["cost"] <= 94.0
    assert "r1" in state.get_cluster("nc-test")["runs"]


def test_logs_of_a_vanished_cluster_is_one_clear_line(cluster, monkeypatch):
    import sky
    from sky import exceptions

    def gone(*a, **k):
        raise exceptions.ClusterDoesNotExist("Cluster 'nc-test' does not exist.")
        yield  # a generator, like the real one

    monkeypatch.setattr(sky, "tail_logs", gone)
    r = CliRunner().invoke(app, ["logs", "--name", "d12"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.startswith("error: reading the log of run 'd12' on nc-test failed (ClusterDoesNotExist")


def test_status_of_a_cluster_that_tore_itself_down(cluster, monkeypatch):
    import sky
    monkeypatch.setattr(sky, "status", lambda names: ("status", names))
    monkeypatch.setattr(sky, "cost_report", lambda: ("cost", None))
    monkeypatch.setattr(sky, "get", lambda req: [] if req[0] == "status" else [{"name": "nc-test", "total_cost": 4.2}])
    monkeypatch.setattr(sky, "job_status", lambda name, ids: ("status", None))
    r = CliRunner().invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.stderr
    (c,) = json.loads(r.stdout)["clusters"]
    assert c["state"] == "DOWN" and c["spent"] == 4.2 and c["budget_left"] == pytest.approx(95.8)


def test_up_spot_provisions_nothing_and_points_to_train_spot():
    r = CliRunner().invoke(app, ["up", "--spot", "--yes"])
    assert r.exit_code == 2 and "nanochat train --spot" in r.stderr and state.load_clusters() == {}


def test_train_spot_refuses_an_on_demand_cluster(cluster):
    r = CliRunner().invoke(app, ["train", "--budget", "100", "--spot", "--yes"])
    assert r.exit_code == 2 and "is on-demand" in r.stderr and "nanochat down --cluster nc-test" in r.stderr


def test_down_of_a_spot_run_cancels_its_job_and_leaves_no_cluster(cluster, monkeypatch):
    import sky
    from sky import exceptions
    rec = state.get_cluster("nc-test")
    rec["spot"] = True
    state.save_cluster(rec)
    cancelled, downed = [], []

    def fake_down(name):
        downed.append(name)
        raise exceptions.ClusterDoesNotExist(f"Cluster {name} does not exist.")

    monkeypatch.setattr(sky.jobs, "cancel", lambda job_ids: cancelled.extend(job_ids) or ("cancel", None))
    monkeypatch.setattr(sky, "down", fake_down)
    monkeypatch.setattr(sky, "cost_report", lambda: ("cost", None))
    monkeypatch.setattr(sky, "get", lambda req: None)
    r = CliRunner().invoke(app, ["down", "--yes"])
    assert r.exit_code == 0, r.stderr
    assert cancelled == [3] and downed == ["nc-test"] and "stopped run d12" in r.stdout
    assert state.load_clusters() == {}


def test_skypilot_saying_the_cluster_is_gone_is_read_from_the_error_class_after_the_api_server(cluster, monkeypatch):
    """One test of "SkyPilot says it is gone" (sky_replies.already_gone): the classes SkyPilot raises for it
    survive the API server's serialisation; another error that merely says "does not exist" leaves the
    record (the node may be billing) and stops `down` with one line."""
    import sky
    from sky import exceptions
    from nanochat_cli.backends.sky_replies import already_gone
    via_server = lambda e: exceptions.deserialize_exception(exceptions.serialize_exception(e))  # noqa: E731
    assert already_gone(via_server(exceptions.ClusterDoesNotExist("Cluster 'nc-test' does not exist.")))
    assert already_gone(via_server(exceptions.ClusterNotUpError("The jobs controller is not up.")))
    assert not already_gone(via_server(RuntimeError("Request 4f2a does not exist.")))

    def down_fails(name):
        raise RuntimeError(f"Storage mount of {name}: bucket does not exist yet")

    monkeypatch.setattr(sky, "down", down_fails)
    monkeypatch.setattr(sky, "get", lambda req: req)
    r = CliRunner().invoke(app, ["down", "--yes"])
    assert r.exit_code == 2 and "tearing down nc-test failed" in r.stderr, (r.stdout, r.stderr)
    assert "nc-test" in state.load_clusters()


def test_train_spot_launches_a_managed_job_priced_at_spot(monkeypatch):
    """No `up` cluster: --spot plans on the cheapest spot offer and hands SkyPilot a managed job whose
    resources are all spot (SkyPilot re-provisions after a preemption; the pipeline then resumes)."""
    import sky
    launched = {}

    def fake_jobs_launch(task, name):
        launched.update(task=task, name=name)
        return "jobs-launch-request"

    monkeypatch.setattr(sky.jobs, "launch", fake_jobs_launch)
    monkeypatch.setattr(sky, "stream_and_get", lambda req: ([11], None))
    with cloud_boundary(["aws", "nebius"], monkeypatch):
        dry = CliRunner().invoke(app, ["up", "--spot", "--dryrun", "--json"])
        no_bucket = CliRunner().invoke(app, ["train", "--budget", "100", "--spot", "--yes", "--detach"])
        r = CliRunner().invoke(app, ["train", "--budget", "100", "--spot", "--yes", "--detach", "--name", "s1",
                                     "--bucket", "s3://my-bucket"])
    assert dry.exit_code == 0 and r.exit_code == 0, dry.stderr + r.stderr
    cheapest_spot = json.loads(dry.stdout)["offers"][0]
    # Without a bucket nothing a spot run trained could be resumed or pulled: refused before any spending.
    assert no_bucket.exit_code == 2 and "--spot needs --bucket" in no_bucket.stderr
    assert launched["name"] == "nanochat-s1"
    assert launched["task"].resources and all(res.use_spot for res in launched["task"].resources)
    job = state.read_job(state.run_dir("s1"))
    assert job["managed"] is True and job["job_id"] == 11
    plan = json.loads((state.run_dir("s1") / "plan.json").read_text())
    # The whole job's price is the spot node's plus SkyPilot's jobs controller, which goes to the cheapest of the
    # job's clouds (aws, nebius) on the cheapest VM with 4+ vCPUs and 4 GiB each: in the test catalog Nebius's
    # cpu-d3_4vcpu-16gb at $0.12/h (AWS's m6i.xlarge: $0.192-0.202/h).
    assert plan["spot"] is True and plan["controller_per_hour"] == 0.12
    assert plan["price_per_hour"] == pytest.approx(cheapest_spot["price_per_hour"] + 0.12)
    assert plan["offer"]["spot"] is True and plan["cost"] <= 100
    # One restart after an error, the one the plan reserves time for (planner.SPOT_RECOVERIES).
    assert {res.job_recovery["max_restarts_on_errors"] for res in launched["task"].resources} == {1}
    assert [s["name"] for s in plan["stages"]][:2] == ["setup", "recovery"]
