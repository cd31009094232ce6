"""
What the CLI remembers between invocations, under $NANOCHAT_HOME (see docs/ARCHITECTURE.md):

    clusters.json          {"clusters": {name: record}}  - every cluster `up`/`train` started, until `down`
    runs/<name>/plan.json  the run spec `train` built (nanochat_core/run_spec.py): offer, $/h, budget, cap,
                           deadlines, depth...; the node gets this very file; report.md reads the price
    runs/<name>/.job.json  the job running that plan (backend, cluster, job id, state); hidden, so the
                           node's MANIFEST.sha256 never covers this laptop-side record
    runs/<name>/.logpos    how far `nanochat logs` has shown the log (so a re-attach neither loses nor repeats)

All writes are atomic (temp file + rename): a crash or Ctrl-C never leaves half a record behind.
Every read checks the shape (valid JSON of the wrong shape - `[]`, a pid that is a string - is as
damaged as invalid JSON): clusters.json, which records what is costing money, stops the command with one
line saying what to fix, never silently treated as empty (the next write would drop the records); a
damaged run record (.job.json, plan.json) is ignored with a one-line warning, so one bad run never takes
`status` down with it.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any
from pathlib import Path

from nanochat_core.common import NanochatError, atomic_write_json, list_runs, nanochat_home, runs_dir
from nanochat_core.run_spec import SPEC_FILE, RunSpec, job_price

LOCAL_CLUSTER = "local"


def clusters_file() -> Path:
    return nanochat_home() / "clusters.json"


# The types each record field must have when present (None is always allowed). bool is not an int here.
NUM = (int, float)
CLUSTER_FIELDS = {"name": str, "backend": str, "offer": dict, "nodes": int, "spot": bool, "price_per_hour": NUM,
                  "launched_at": NUM, "budget": NUM, "autostop_minutes": int, "runs": list, "bucket": str,
                  "keep": bool, "candidates": list, "zone_prices": dict, "controller_per_hour": NUM}
JOB_FIELDS = {"job_id": int, "backend": str, "cluster": str, "run": str, "cmd": list, "state": str, "pid": int,
              "child_pid": int, "returncode": int, "managed": bool, "submitted_at": NUM, "started_at": NUM,
              "ended_at": NUM}


def shape_problem(obj, fields: dict, required: tuple[str, ...] = ()) -> str | None:
    """None if `obj` is a JSON object whose known fields have the right types, else what is wrong."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, found {type(obj).__name__}"
    for key, want in fields.items():
        value = obj.get(key)
        if value is None:
            if key in required:
                return f"'{key}' is missing"
            continue
        kinds = want if isinstance(want, tuple) else (want,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            return f"'{key}' is {json.dumps(value)[:40]}, not {' or '.join(k.__name__ for k in kinds)}"
    return None


def load_clusters() -> dict[str, dict]:
    path = clusters_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError, RecursionError) as e:   # RecursionError: nested deeper than Python's stack
        what = f"cannot be read ({e.strerror})" if isinstance(e, OSError) else "is not valid JSON"
        raise NanochatError(f"{path} {what}; fix or delete it (`sky status` still lists real clusters)") from None
    problem = shape_problem(data, {"clusters": dict}, required=("clusters",))
    for name, rec in (data.get("clusters") or {}).items() if problem is None else ():
        problem = shape_problem(rec, CLUSTER_FIELDS, required=("name",))
        if problem:
            problem = f"cluster '{name}': {problem}"
            break
    if problem:
        raise NanochatError(f"{path} is damaged ({problem}); fix or delete it "
                            "(`sky status` still lists real clusters)")
    return dict(data["clusters"])


def save_cluster(record: dict) -> dict:
    clusters = load_clusters()
    clusters[record["name"]] = record
    atomic_write_json(clusters_file(), {"clusters": clusters})
    return record


def update_cluster(name: str, **fields) -> dict | None:
    clusters = load_clusters()
    if name not in clusters:
        return None
    clusters[name].update(fields)
    atomic_write_json(clusters_file(), {"clusters": clusters})
    return clusters[name]


def remove_cluster(name: str) -> dict | None:
    clusters = load_clusters()
    record = clusters.pop(name, None)
    atomic_write_json(clusters_file(), {"clusters": clusters})
    return record


def get_cluster(name: str | None) -> dict | None:
    """The named cluster, or when name is None the most recently launched one."""
    clusters = load_clusters()
    if name is not None:
        return clusters.get(name)
    return max(clusters.values(), key=lambda r: r.get("launched_at", 0), default=None)


def new_cluster_record(name: str, backend: str, offer: dict, nodes: int = 1, spot: bool = False,
                       budget: float | None = None, autostop_minutes: int | None = None,
                       controller_per_hour: float = 0.0) -> dict:
    return {"name": name, "backend": backend, "offer": offer, "nodes": nodes, "spot": spot,
            "price_per_hour": job_price(offer.get("price_per_hour") or 0.0, nodes, controller_per_hour),
            "controller_per_hour": controller_per_hour,
            "launched_at": time.time(), "budget": budget, "autostop_minutes": autostop_minutes,
            "runs": []}


# -----------------------------------------------------------------------------
# Runs

def run_dir(name: str) -> Path:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise NanochatError(f"invalid run name '{name}': use letters, digits, '-' or '_'")
    return runs_dir() / name


_SCHEMAS = {".job.json": (JOB_FIELDS, ("backend",))}   # plan.json: the run spec checks its own shape
_warned: set[str] = set()


def read_json(path: Path) -> dict | None:
    """A run record, or None if it is missing or damaged (then with a one-line warning on stderr)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError, UnicodeDecodeError, RecursionError) as e:
        problem = str(e) if isinstance(e, OSError) else "not valid JSON"
    else:
        fields, required = _SCHEMAS.get(path.name, ({}, ()))
        problem = shape_problem(data, fields, required)
        if problem is None:
            return data
    if str(path) not in _warned:
        _warned.add(str(path))
        print(f"warning: ignoring {path}: {problem}; delete it if that run no longer matters",
              file=sys.stderr, flush=True)
    return None


def read_spec(rd: Path) -> RunSpec | None:
    """The run's spec (plan.json, today's or one written before specs existed), or None if it has none or it
    is damaged (then with a one-line warning, like any damaged run record)."""
    data = read_json(rd / SPEC_FILE)
    if data is None:
        return None
    try:
        return RunSpec.from_json(data, str(rd / SPEC_FILE))
    except NanochatError as e:
        if str(rd) not in _warned:
            _warned.add(str(rd))
            print(f"warning: ignoring the run spec: {e}", file=sys.stderr, flush=True)
        return None


def write_job(rd: Path, job: dict) -> None:
    atomic_write_json(rd / ".job.json", job)


def read_job(rd: Path) -> dict | None:
    return read_json(rd / ".job.json")


def log_cursor(rd: Path, backend: str) -> Any:
    """How far `nanochat logs` has shown this run's log: the cursor its backend last yielded (backends/base.py),
    or None (from the start) if none was saved, or it was saved by the other backend, or the file is damaged."""
    try:
        saved = json.loads((rd / ".logpos").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return saved.get("cursor") if isinstance(saved, dict) and saved.get("backend") == backend else None


def save_log_cursor(rd: Path, backend: str, cursor: Any) -> None:
    atomic_write_json(rd / ".logpos", {"backend": backend, "cursor": cursor})


def find_latest_run(name: str | None = None, *, nothing: str = "no run") -> Path:
    """The run a job command works on (logs, pull): the one named, else the most recent run that was started.
    (chat, serve, eval and export load common.latest_trained_run through chat.find_checkpoint.) `nothing`
    starts the error when there is none ("nothing to pull", ...)."""
    if name:
        rd = run_dir(name)
        if not (rd / ".job.json").exists():
            raise NanochatError(f"{nothing}: no run named '{name}' has been started; `nanochat status` lists runs")
        return rd
    for rd in list_runs():
        if (rd / ".job.json").exists():
            return rd
    raise NanochatError(f"{nothing}: no run has been started. Train one with `nanochat train` "
                        "(or `nanochat train --local` on this machine) first")
