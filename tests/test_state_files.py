"""State files of the wrong shape (valid JSON, wrong types) never give a traceback: the real `nanochat`
command, run as a user would, on a NANOCHAT_HOME holding exactly such files."""
import json
import os
import subprocess
import sys

import pytest

PY = sys.executable


def _nanochat(home, *args):
    env = dict(os.environ, NANOCHAT_HOME=str(home))
    return subprocess.run([PY, "-m", "nanochat_cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def _no_traceback(p):
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]


@pytest.mark.parametrize("clusters", [
    [],
    {"clusters": []},
    {"clusters": {"a": "not a record"}},
    {"clusters": {"a": {"name": "a", "backend": "local", "launched_at": "yesterday"}}},
    {"clusters": {"a": {"name": "a", "backend": "local", "offer": [], "launched_at": 1.0}}},
])
def test_clusters_json_of_the_wrong_shape_is_one_line_exit_2(tmp_path, clusters):
    home = tmp_path / "home"
    home.mkdir()
    (home / "clusters.json").write_text(json.dumps(clusters))
    for cmd in (["status"], ["down", "--yes"], ["status", "--json"]):
        p = _nanochat(home, *cmd)
        _no_traceback(p)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "clusters.json" in lines[0], (cmd, p.stderr)
    # the file is left as it was: the records of what costs money are never overwritten
    assert json.loads((home / "clusters.json").read_text()) == clusters


@pytest.mark.parametrize("job", [{"pid": "abc", "backend": "local", "state": "RUNNING"},
                                 {"pid": 123}, [], {"backend": "local", "job_id": "7", "cluster": ["x"]}])
def test_a_damaged_job_file_is_skipped_with_a_warning(tmp_path, job):
    home = tmp_path / "home"
    good, bad = home / "runs" / "good", home / "runs" / "bad"
    for rd in (good, bad):
        rd.mkdir(parents=True)
    (good / ".job.json").write_text(json.dumps({"backend": "local", "cluster": "local", "job_id": 1,
                                                 "state": "SUCCEEDED", "pid": None, "returncode": 0}))
    (bad / ".job.json").write_text(json.dumps(job))
    os.utime(bad / ".job.json")  # the most recent run: what logs and pull pick by default

    p = _nanochat(home, "status", "--json")
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert [r["run"] for r in json.loads(p.stdout)["jobs"]] == ["good"]
    assert "warning: ignoring" in p.stderr and "bad/.job.json" in p.stderr

    for cmd in (["logs", "--name", "bad"], ["pull", "--name", "bad"], ["logs"], ["pull"]):
        p = _nanochat(home, *cmd)
        _no_traceback(p)
        assert p.returncode == 2, (cmd, p.stdout, p.stderr)
        assert p.stderr.strip().splitlines()[-1].startswith("error: "), (cmd, p.stderr)


def test_plan_and_logpos_of_the_wrong_shape(tmp_path):
    home = tmp_path / "home"
    rd = home / "runs" / "r"
    rd.mkdir(parents=True)
    (rd / ".job.json").write_text(json.dumps({"backend": "local", "cluster": "local", "job_id": 1,
                                               "state": "SUCCEEDED", "pid": None, "returncode": 0}))
    (rd / "plan.json").write_text(json.dumps({"budget": "lots", "stages": ["x"]}))
    (rd / ".logpos").write_text("-40\n")
    (rd / "pipeline.log").write_text("hello\n")
    p = _nanochat(home, "logs", "--name", "r")
    _no_traceback(p)
    assert p.returncode == 0 and "hello" in p.stdout, p.stderr  # the log is shown from its start (-40 is 0)
    assert "warning: ignoring" in p.stderr and "plan.json" in p.stderr  # and it said what it ignored


def test_state_module_reads(tmp_path, monkeypatch):
    """The same checks at the function level: what callers get back."""
    from nanochat_cli import state
    from nanochat_core.common import NanochatError
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    (tmp_path / "clusters.json").write_text("[]")
    with pytest.raises(NanochatError, match="clusters.json is damaged"):
        state.load_clusters()
    rd = tmp_path / "runs" / "x"
    rd.mkdir(parents=True)
    (rd / ".job.json").write_text('{"pid": "abc", "backend": "local"}')
    assert state.read_job(rd) is None
    (rd / ".job.json").write_text('{"pid": 12, "backend": "local", "submitted_at": 1.5}')
    assert state.read_job(rd)["pid"] == 12
    (rd / ".job.json").write_text('{"pid": true, "backend": "local"}')  # JSON true is not a pid
    assert state.read_job(rd) is None


DEEP = "[" * 100_000 + "]" * 100_000   # valid JSON, nested deeper than Python's recursion limit (issue 21)


def test_a_100000_deep_state_file_is_one_line_not_a_recursion_error(tmp_path):
    home = tmp_path / "home"
    rd = home / "runs" / "deep"
    rd.mkdir(parents=True)
    (home / "clusters.json").write_text(DEEP)
    for cmd in (["status"], ["status", "--json"]):
        p = _nanochat(home, *cmd)
        _no_traceback(p)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "clusters.json is not valid JSON" in lines[0], p.stderr
    (home / "clusters.json").unlink()
    for name in (".job.json", "plan.json", ".logpos"):
        (rd / name).write_text(DEEP)
    p = _nanochat(home, "status", "--json")
    _no_traceback(p)
    assert p.returncode == 0 and "deep/.job.json: not valid JSON" in p.stderr, p.stderr
    from nanochat_cli import state
    assert state.log_cursor(rd, "local") is None and state.read_json(rd / "plan.json") is None


def test_the_run_dirs_own_readers_take_a_100000_deep_file_too(tmp_path, capsys):
    from nanochat_core import common, tracking
    from nanochat_core.evaluation import runners as evaluation, report
    (tmp_path / "eval").mkdir()
    for name in ("eval/base.json", ".wandb.json"):
        (tmp_path / name).write_text(DEEP)
    assert common.parse_event(common.EVENT_PREFIX + " " + DEEP) is None     # a stage printing it
    assert report._read_json(tmp_path / "eval" / "base.json") is None
    record = {"stage": "base", "metrics": {"core": 0.1}, "unavailable": []}
    assert evaluation.merge_record(tmp_path / "eval" / "base.json", record) == record
    assert tracking.run_state(tmp_path, 1.0)["started"] == 1.0
