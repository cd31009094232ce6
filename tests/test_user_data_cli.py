"""`nanochat train --data DIR --chat-data FILE --identity TEXT` on the CLI side: the plan counts your documents
and the upload; on the cloud the bundle travels as a SkyPilot file mount built by SkyPilot's real Task code
(faked only at the cloud boundary, as in test_cli_money.py), the node's pipeline verifies it before training,
and a relaunched (resumed / recovered) run must read the very same bytes; bad input is one line, exit 2."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from test_cli_skyfakes import cloud_boundary  # (also: SKY_RUNTIME_DIR before sky is imported)
from nanochat_cli.main import app

CLOUDS = ["aws", "lambda", "nebius"]
IDENTITY = "You are Ada, the support assistant of Acme."


@pytest.fixture
def mydata(tmp_path):
    docs = tmp_path / "my_docs"
    (docs / "guides").mkdir(parents=True)
    for i in range(30):
        (docs / "guides" / f"g{i}.md").write_text(f"# Guide {i}\n\n" + "Acme widgets are blue and sturdy. " * 60)
    (docs / "tickets.jsonl").write_text("".join(json.dumps({"text": f"ticket {i}: fixed"}) + "\n" for i in range(40)))
    chat = tmp_path / "chats.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"colour of widget {i}?"},
                                                     {"role": "assistant", "content": "Blue."}]}) + "\n"
                            for i in range(12)))
    return docs, chat


def train(monkeypatch, *args, launch=None):
    import sky
    if launch is not None:
        monkeypatch.setattr(sky, "launch", launch)
        monkeypatch.setattr(sky, "stream_and_get", lambda req: (5, None))
        # before launching, nanochat asks SkyPilot whether the cluster is up: it knows none yet
        real_get = sky.get
        monkeypatch.setattr(sky, "status", lambda names=None, **k: ("status", []))
        monkeypatch.setattr(sky, "get", lambda req: req[1] if isinstance(req, tuple) else real_get(req))
    with cloud_boundary(CLOUDS, monkeypatch):
        return CliRunner().invoke(app, ["train", *args])


def test_the_plan_counts_your_documents_and_prices_the_upload_into_setup(mydata, monkeypatch):
    from nanochat_cli.commands import run as flows
    docs, chat = mydata
    monkeypatch.setattr(flows, "UPLOAD_BYTES_PER_S", 100.0)     # a slow line, so that the upload shows in hours
    plain = json.loads(train(monkeypatch, "--budget", "100", "--dryrun", "--json").stdout)
    r = train(monkeypatch, "--budget", "100", "--dryrun", "--json", "--data", f"climbmix,{docs}:0.2",
              "--chat-data", str(chat), "--identity", IDENTITY)
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    mine = plan["user_data"]
    assert mine["docs_share"] == 0.2 and mine["bytes"] > 0 and len(mine["sha256"]) == 64
    assert mine["docs_epochs"] == pytest.approx(plan["tokens"] * 0.2 / mine["docs_tokens_estimate"], rel=0.01)
    setup = {s["name"]: s["hours"] for s in plan["stages"]}["setup"]
    plain_setup = {s["name"]: s["hours"] for s in plain["stages"]}["setup"]
    assert setup == pytest.approx(plain_setup + mine["upload_hours"], abs=1e-3) and mine["upload_hours"] > 0
    # the summary went to stderr: files read, characters, estimated tokens, conversations
    assert "your documents: 31 file(s) read" in r.stderr and "estimated" in r.stderr
    assert "your conversations: 12 read, 0 skipped, 1 held out" in r.stderr
    human = train(monkeypatch, "--budget", "100", "--dryrun", "--data", f"climbmix,{docs}:0.2")
    assert "times over at a 20% share" in human.stdout and "uploaded with the run" in human.stdout


def test_the_cloud_run_carries_the_bundle_and_the_node_verifies_it_on_every_launch(mydata, monkeypatch, tmp_path):
    from nanochat_core.common import NanochatError
    from nanochat_core.stages.pipeline import Pipeline, parse_args
    docs, chat = mydata
    launched = []

    def fake_launch(task, cluster_name, idle_minutes_to_autostop, down, wait_for=None, dryrun=False):
        launched.append(task)
        return "launch-request"

    args = ["--budget", "100", "--yes", "--detach", "--name", "ada", "--data", str(docs), "--chat-data", str(chat),
            "--identity", IDENTITY]
    r = train(monkeypatch, *args, launch=fake_launch)
    assert r.exit_code == 0, r.output
    task = launched[-1]
    # SkyPilot's own Task: a local-to-remote file mount of the prepared bundle (validated by SkyPilot: the
    # source must exist), next to the workdir, and in the YAML it would hand the backend.
    plan = json.loads((tmp_path / "nanochat_home" / "runs" / "ada" / "plan.json").read_text())
    bundle = plan["user_data"]["path"]
    assert task.get_local_to_remote_file_mounts()["/nanochat-user-data"] == bundle
    assert task.to_yaml_config()["file_mounts"]["/nanochat-user-data"] == bundle and task.workdir
    node_args = task.envs["NANOCHAT_ARGS"].split()
    assert node_args[node_args.index("--user-data") + 1] == "/nanochat-user-data"
    digest = node_args[node_args.index("--user-data-sha256") + 1]
    assert digest == plan["user_data"]["sha256"]

    # The node: what the file mount delivered (a copy of the bundle) is verified before anything trains.
    mount = tmp_path / "node" / "nanochat-user-data"
    shutil.copytree(bundle, mount)
    run_dir = tmp_path / "node" / "runs" / "ada"

    def node_pipeline(argv):
        argv = [str(mount) if a == "/nanochat-user-data" else a for a in argv]
        cut = [a for i, a in enumerate(argv) if a not in ("--deadline-at", "--base-deadline-at")
               and argv[i - 1] not in ("--deadline-at", "--base-deadline-at")]
        p = Pipeline(parse_args(["--run-dir", str(run_dir)] + cut))
        run_dir.mkdir(parents=True, exist_ok=True)
        p.check_user_data()
        return p

    node_pipeline(node_args)
    assert json.loads((run_dir / "user_data.json").read_text())["sha256"] == digest
    # A relaunch (resume, spot recovery) of the same run from the same data: the same bytes, the same digest.
    r = train(monkeypatch, *args, launch=fake_launch)
    assert r.exit_code == 0, r.output
    again = launched[-1].envs["NANOCHAT_ARGS"].split()
    assert again[again.index("--user-data-sha256") + 1] == digest
    node_pipeline(again)
    # A damaged upload is caught on the node, before training.
    shard = next((mount / "docs").glob("shard_*.parquet"))
    good = shard.read_bytes()
    shard.write_bytes(good[:-3] + b"xyz")
    with pytest.raises(NanochatError, match="missing or damaged"):
        node_pipeline(again)
    shard.write_bytes(good)
    # The data changed on the laptop and the same run is launched again: the node refuses to resume on it.
    (docs / "new.txt").write_text("a new document about red widgets " * 30)
    r = train(monkeypatch, *args, launch=fake_launch)
    changed = launched[-1].envs["NANOCHAT_ARGS"].split()
    new_digest = changed[changed.index("--user-data-sha256") + 1]
    assert new_digest != digest
    shutil.rmtree(mount)
    shutil.copytree(json.loads((tmp_path / "nanochat_home" / "runs" / "ada" / "plan.json").read_text())
                    ["user_data"]["path"], mount)
    with pytest.raises(NanochatError, match="was started with other data"):
        node_pipeline(changed)


def test_data_too_large_to_upload_is_refused_with_the_bucket_route(mydata, monkeypatch):
    from nanochat_cli.commands import run as flows
    docs, _ = mydata
    monkeypatch.setattr(flows, "MAX_UPLOAD_BYTES", 1000)
    r = train(monkeypatch, "--budget", "100", "--dryrun", "--data", str(docs))
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert "more than nanochat uploads from this machine" in line and "--data s3://" in line
    # the bucket route itself: copied onto the node by a SkyPilot file mount
    launched = []
    r = train(monkeypatch, "--budget", "100", "--yes", "--detach", "--name", "b", "--data", "s3://my-bucket/shards",
              launch=lambda task, **kw: launched.append(task) or "req")
    assert r.exit_code == 0, r.output
    assert launched[-1].to_yaml_config()["file_mounts"]["/nanochat-data"] == "s3://my-bucket/shards"
    node_args = launched[-1].envs["NANOCHAT_ARGS"].split()
    assert node_args[node_args.index("--data") + 1] == "/nanochat-data"


@pytest.mark.parametrize("line, why", [
    ("{oops", "chats.jsonl:3: not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}), "must alternate"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}), "is empty"),
    (json.dumps({"messages": [{"role": "human", "content": "a"}]}), "unknown role 'human'"),
])
def test_bad_conversations_are_one_line_refusals_or_skipped_on_request(mydata, monkeypatch, line, why):
    docs, chat = mydata
    lines = chat.read_text().splitlines()
    lines.insert(2, line)
    chat.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["train", "--local", "--dryrun", "--chat-data", str(chat)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    (err,) = r.stderr.strip().splitlines()
    assert err.startswith("error: 1 problem(s)") and why in err and "chats.jsonl:3" in err and "--skip-bad" in err
    r = CliRunner().invoke(app, ["train", "--local", "--dryrun", "--chat-data", str(chat), "--skip-bad"])
    assert r.exit_code == 0, r.output
    assert "skipped: chats.jsonl:3" in r.stderr and "skipped 1 bad item(s)" in r.stderr


def test_bad_folders_are_one_line_refusals(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    for args, why in [(["--data", str(tmp_path / "empty")], "holds no documents"),
                      (["--data", "./no/such/dir"], "no such folder"),
                      (["--chat-data", str(tmp_path / "nope.jsonl")], "no such file"),
                      (["--chat-share", "0.5"], "--chat-share needs --chat-data"),
                      (["--identity", "  "], "--identity is empty")]:
        r = CliRunner().invoke(app, ["train", "--local", "--dryrun", *args])
        assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)
        assert why in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes("ok\nna\xefve\n".encode("latin-1"))
    r = CliRunner().invoke(app, ["train", "--local", "--dryrun", "--data", str(latin)])
    assert r.exit_code == 2 and "a.txt:2: not UTF-8" in r.stderr


def test_local_train_and_eval_hand_the_pipeline_the_same_bundle(mydata, monkeypatch):
    """`nanochat train --local` points the pipeline at the prepared bundle in place, and `nanochat eval`
    later at the very same one (the plan kept its path and digest), so the report's docs bpb and held-out
    answers are recomputed on the user's data."""
    from test_cli_flow import cli    # the job script (test_cli_jobscript.py) stands in for the pipeline
    from nanochat_cli import state
    from nanochat_cli.backends import local as local_backend
    import os
    from pathlib import Path
    monkeypatch.setenv(local_backend.PIPELINE_MODULE_ENV, "test_cli_jobscript")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKEJOB_STEP_S", "0.01")
    docs, chat = mydata
    code, out, err = cli("train", "--local", "--steps", "3", "--data", str(docs), "--chat-data", str(chat),
                         "--identity", IDENTITY)
    assert code == 0, err
    rd = state.run_dir("local")
    plan = json.loads((rd / "plan.json").read_text())
    args = json.loads((rd / "job_args.json").read_text())
    assert args[args.index("--user-data") + 1] == plan["user_data"]["path"]
    assert args[args.index("--user-data-sha256") + 1] == plan["user_data"]["sha256"]
    code, out, err = cli("eval", "--local", "--name", "local")
    assert code == 0, err
    args = json.loads((rd / "job_args.json").read_text())
    assert "eval,report" in args and args[args.index("--user-data-sha256") + 1] == plan["user_data"]["sha256"]


def test_a_spot_run_hands_the_managed_job_the_same_mount(mydata, monkeypatch):
    """A spot run is a managed job: the task SkyPilot gets carries the bundle as a local file mount (SkyPilot
    stages such mounts once for the job, and a recovered job mounts those bytes; the node verifies them)."""
    import sky
    docs, chat = mydata
    got = []
    monkeypatch.setattr(sky.jobs, "launch", lambda task, name: got.append(task) or "jobs-launch")
    monkeypatch.setattr(sky, "stream_and_get", lambda req: ([21], None))
    r = train(monkeypatch, "--budget", "50", "--spot", "--yes", "--detach", "--name", "s1", "--bucket",
              "s3://my-bucket", "--data", str(docs), "--identity", IDENTITY)
    assert r.exit_code == 0, r.output
    (task,) = got
    # your data, and the run spec (the node's only source of money and deadlines), and nothing else
    assert set(task.get_local_to_remote_file_mounts()) == {"/nanochat-user-data", "~/.nanochat/specs/s1/plan.json"}
    assert "/nanochat-bucket" in task.storage_mounts                    # the checkpoints' bucket, as before
    args = task.envs["NANOCHAT_ARGS"].split()
    assert args[args.index("--user-data") + 1] == "/nanochat-user-data" and "--user-data-sha256" in args
