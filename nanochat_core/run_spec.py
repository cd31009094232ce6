"""
The run spec: everything a run needs to know about its money and its shape, built once by `nanochat train`
from the budget, the chosen offer and the flags, written once as `plan.json` in the run directory and
shipped to the node as that very file. The node's pipeline reads its deadlines and price from it, and so
does the run script's backstop and watchdog (proctree.py): no environment variable or argument carries a
deadline or the budget anywhere else.

Stdlib only (no torch, no typer, no sky): the CLI and the node both import it.

The money quantities each have one function here, and every other place calls it:

    job_price(per_node, nodes, controller)     whole-job $/h
    spend_cap(budget, already_spent, own_cap)  the hard cap: the budget, or less when the plan caps itself
    deadline_hours(cap, max_price, margin_h)   how long after launch the job must end
    spent(price, since, until)                 dollars a cluster has cost between two moments
    left(cap, spent)                           dollars of the cap still free

A `plan.json` written before the spec existed (no "spec" key) is read as a spec: its keys were the same
facts under the same names, and what it lacks (the two absolute deadlines of a run launched by that
version were in the node's arguments, not in the file) stays None. Anything else is refused in one line.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from nanochat_core.common import NanochatError, atomic_write_json
import sys
import time

SPEC_FILE = "plan.json"
SPEC_VERSION = 1
# The node's backstop kills the job's whole tree this long after the job deadline (the pipeline itself
# stops every stage at the deadline and gives it 30 s to save), and the watchdog ends whatever still runs
# of the job script (SkyPilot's appended steps included) this long after it. Both are well inside the
# planner's teardown margin (10 min), which also has to hold autodown's idle minute and the teardown.
BACKSTOP_S = 60
WATCHDOG_S = 150


# -----------------------------------------------------------------------------
# The money functions: one owner each.

def job_price(per_node: float, nodes: int, controller: float = 0.0) -> float:
    """$/h of the whole job: every node bills at its offer's price, and a spot run's managed job also keeps
    SkyPilot's jobs-controller VM up while it runs (`controller`, its $/h; 0 for on-demand)."""
    return float(per_node) * max(1, int(nodes)) + float(controller or 0.0)


def spend_cap(budget: float, already_spent: float = 0.0, own_cap: float | None = None) -> float:
    """The most a run may cost in all: the budget, or - when the plan spends less by design (own_cap, its
    own cost plus the margin) - what the cluster already cost plus that."""
    if own_cap is None:
        return float(budget)
    return min(float(budget), already_spent + own_cap)


def deadline_hours(cap_left: float, max_price: float, margin_h: float) -> float:
    """Hours after launch by which the job must end, so that at the dearest price the launch may land on
    the cap holds with the teardown margin on top. (The plan shows it rounded down to 1/1000 h, and the
    spec's absolute deadlines count from that: never later.)"""
    return cap_left / max_price - margin_h


def spent(price_per_hour: float, since: float, until: float) -> float:
    """Dollars billed at `price_per_hour` (whole job) between two unix times (0 if until <= since)."""
    return float(price_per_hour or 0.0) * max(0.0, until - since) / 3600


def left(cap: float | None, spent_usd: float) -> float | None:
    return None if cap is None else cap - spent_usd


# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    run: str
    preset: str                          # "cloud" | "local"
    offer: dict                          # the planned offer (per-node price), as the offers table shows it
    depth: int | None = None
    nodes: int = 1
    price_per_hour: float = 0.0          # whole job, at the planned offer (a spot run's controller included)
    max_price_per_hour: float = 0.0      # whole job, at the dearest offer the launch may land on
    budget: float | None = None          # what the user said (None: a free local run)
    spend_cap: float | None = None       # what the node enforces: the budget, or less (capped_note says why)
    launched_at: float | None = None     # the moment the deadlines count from (None: a dry run)
    deadline_at: float | None = None     # the whole job ends by then (unix time)
    base_deadline_at: float | None = None  # base training stops by then
    pipeline_stages: str | None = None   # --stages (None: the preset's)
    bucket: str | None = None
    spot: bool = False
    controller_per_hour: float = 0.0     # a spot run's jobs controller, inside price_per_hour
    keep: bool = False
    num_shards: int | None = None
    planned_tokens_per_sec: float | None = None   # per GPU: preflight stops the run below half of it
    steps: int | None = None
    minutes: float | None = None
    data: str | None = None
    user_data: dict | None = None        # your own data (flows.YourData): bundle path, digest, size, shares
    data_bucket: str | None = None       # --data s3://...: a bucket of shards the node mounts
    user_args: list = field(default_factory=list)   # the pipeline's flags for your data (--user-data ...)
    # The planner's numbers as `train --dryrun` shows them (today's keys kept, all in hours after launch).
    hours: float = 0.0
    cost: float = 0.0
    stages: list = field(default_factory=list)   # [{"name", "hours", "cost"}] in the pipeline's order
    deadline_hours: float | None = None
    base_deadline_hours: float | None = None
    margin_hours: float = 0.0
    capped_note: str = ""
    setup_note: str = ""                 # when base's deadline keeps little room for a slow setup
    params: int | None = None
    tokens: int | None = None
    tokens_per_sec: float = 0.0
    throughput_source: str = ""
    expected_core: float | None = None
    expected_core_source: str = ""
    spec: int = SPEC_VERSION

    def launched(self, now: float) -> "RunSpec":
        """This spec at launch time `now`: the planned hours become the two absolute deadlines the node
        enforces. A free local run has none."""
        if self.budget is None or self.deadline_hours is None:
            return replace(self, launched_at=now)
        base = self.base_deadline_hours if self.base_deadline_hours is not None else self.deadline_hours
        return replace(self, launched_at=now, deadline_at=now + self.deadline_hours * 3600,
                       base_deadline_at=now + base * 3600)

    def backstop_at(self) -> float | None:
        return None if self.deadline_at is None else self.deadline_at + BACKSTOP_S

    def watchdog_at(self) -> float | None:
        return None if self.deadline_at is None else self.deadline_at + WATCHDOG_S

    def node_args(self) -> list[str]:
        """The pipeline's command line for this run - its shape only; money comes from the file."""
        args = ["--preset", self.preset]
        if self.depth is not None:
            args += ["--depth", str(self.depth)]
        if self.preset == "cloud":
            args += ["--nnodes", str(self.nodes)]
        for flag, value in (("--num-shards", self.num_shards), ("--steps", self.steps),
                            ("--minutes", self.minutes), ("--data", self.data),
                            ("--stages", self.pipeline_stages)):
            if value is not None:
                args += [flag, str(value)]
        if self.planned_tokens_per_sec:
            args += ["--planned-tokens-per-sec", f"{self.planned_tokens_per_sec:.0f}"]
        return args + list(self.user_args)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data, where: str = "run spec") -> "RunSpec":
        """A spec from its JSON, or from a plan.json written before specs existed; one line if neither."""
        if not isinstance(data, dict):
            raise NanochatError(f"{where} is not a JSON object: delete it, or rerun `nanochat train`")
        if data.get("spec") not in (None, SPEC_VERSION):
            raise NanochatError(f"{where} is spec version {data.get('spec')!r}, this nanochat reads "
                                f"{SPEC_VERSION}: upgrade nanochat, or start the run afresh with --name NEW")
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in data.items() if k in known}
        if "spec" not in data:   # today's plan.json: the same facts, named as the spec names them
            kept.setdefault("preset", data.get("preset") or ("local" if data.get("budget") is None else "cloud"))
            kept.setdefault("run", data.get("run") or "")
            kept.setdefault("offer", data.get("offer") or {})
            kept["spec"] = SPEC_VERSION
        try:
            spec = cls(**kept)
        except TypeError as e:
            raise NanochatError(f"{where} lacks what a run needs ({e}): delete it, or rerun `nanochat train`") \
                from None
        problem = spec.problem()
        if problem:
            raise NanochatError(f"{where} is damaged ({problem}): delete it, or rerun `nanochat train`")
        return spec

    def problem(self) -> str | None:
        """What makes this spec unusable (a wrong type where money is decided), or None."""
        num = (int, float)
        checks = {"run": str, "preset": str, "offer": dict, "nodes": int, "price_per_hour": num,
                  "max_price_per_hour": num, "controller_per_hour": num, "budget": num, "spend_cap": num,
                  "launched_at": num, "deadline_at": num, "base_deadline_at": num, "stages": list, "spot": bool, "keep": bool}
        for name, kind in checks.items():
            value = getattr(self, name)
            if value is None and name not in ("run", "preset", "offer", "nodes", "stages", "spot", "keep"):
                continue
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                return f"'{name}' is {json.dumps(value)[:40]}, not {' or '.join(k.__name__ for k in kinds)}"
        if any(not isinstance(s, dict) for s in self.stages):
            return "'stages' holds something that is not an object"
        return None


def write(run_dir: Path, spec: RunSpec) -> Path:
    path = Path(run_dir) / SPEC_FILE
    atomic_write_json(path, spec.to_json())
    return path


def read(path: Path) -> RunSpec:
    """The spec at `path` (a file, or a run directory holding one); NanochatError in one line otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NanochatError(f"no run spec at {path}: `nanochat train` writes one") from None
    except (ValueError, OSError, UnicodeDecodeError) as e:
        why = "is not valid JSON" if isinstance(e, ValueError) else f"cannot be read ({e})"
        raise NanochatError(f"{path} {why}: delete it, or rerun `nanochat train`") from None
    return RunSpec.from_json(data, str(path))


def main(argv: list[str] | None = None) -> int:
    """`python -m nanochat_core.run_spec FILE`: one line saying what the spec enforces (the run script logs
    it, so a node's log shows the moments it stops at); exit 2 with one line if the file is unusable.
    `--passed FILE`: exit 0 if its job deadline has passed, 1 if not. Standard library only, so the node's
    system python3 runs it before any environment is installed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[:1] == ["--passed"]
    argv = argv[1:] if passed else argv
    if len(argv) != 1:
        print("usage: python -m nanochat_core.run_spec [--passed] FILE", file=sys.stderr)
        return 2
    try:
        s = read(Path(argv[0]))
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if passed:   # exit 0 when the job's deadline has passed (train.yaml's setup then installs nothing)
        return 0 if s.deadline_at is not None and s.deadline_at <= time.time() else 1
    if s.deadline_at is None:
        print(f"run spec: run '{s.run}', no deadline")
    else:
        print(f"run spec: run '{s.run}', hard cap ${s.spend_cap:.2f}; base training stops in "
              f"{(s.base_deadline_at - time.time()) / 60:.1f} min, everything in "
              f"{(s.deadline_at - time.time()) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
