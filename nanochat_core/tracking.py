"""
Experiment tracking with Weights & Biases: every stage's progress events (loss, tokens/s, MFU, $ spent,
evals) go to ONE wandb run per training run, which continues when the run restarts (a resume, a spot
preemption, the next stage).

On when WANDB_API_KEY is set (SkyPilot passes it to the node as a secret) or NANOCHAT_WANDB=1
(`nanochat train --wandb`; then wandb uses whatever login or WANDB_MODE=offline it finds); NANOCHAT_WANDB=0
forces it off. Off means off: common.emit checks the environment and never imports this module, let alone
wandb.

How it fits the pipeline:
- the hook sits in common.emit, so there is nothing to add per stage: whatever a stage prints as an event
  is what wandb gets, and the CLI's panel and wandb can never disagree;
- the pipeline names the run directory in NANOCHAT_RUN_DIR for its stage processes (not for itself), so
  exactly one process at a time writes to the wandb run: stages run one after another;
- the wandb run id is made once and kept in run_dir/.wandb.json with the moment tracking started (for $
  spent), so every later stage, and the same run started again, resumes that id. The id is random rather
  than a hash of the path because on the node every run of the same name has the same path;
- a stage's own step counter is its x-axis (`base/step` for `base/loss`...), since wandb's global step has
  to grow monotonically across stages;
- tracking must never cost a run: a missing wandb, a network error or a bad key prints one warning and
  turns tracking off for that process; training goes on.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from nanochat_core.common import atomic_write_json, tracking_enabled

enabled = tracking_enabled   # the one rule, in common.py
STATE_FILE = ".wandb.json"
_run: Any = None          # the live wandb run of this process (None until the first event)
_off = False              # set after a failure: stop trying in this process
_state: dict = {}


def run_state(run_dir: Path, now: float | None = None) -> dict:
    """{id, started}: read from the run directory, or made (and written) the first time."""
    path = run_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if isinstance(state.get("id"), str) and isinstance(state.get("started"), (int, float)):
            return state
    except (OSError, ValueError, RecursionError, AttributeError):
        pass
    state = {"id": f"{run_dir.name.lower()[:40]}-{secrets.token_hex(4)}", "started": now or time.time()}
    state["id"] = "".join(c if c.isalnum() or c in "-_" else "-" for c in state["id"])
    atomic_write_json(path, state)
    return state


def _start(run_dir: Path, now: float) -> Any:
    import wandb   # lazy: an optional dependency
    global _state
    _state = run_state(run_dir, now)
    config: dict = {"run_dir": str(run_dir)}
    try:
        config["plan"] = json.loads((run_dir / "plan.json").read_text())
    except (OSError, ValueError, RecursionError):
        pass
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")
    kwargs = {} if offline else {"resume": "allow"}   # offline, each process writes its own file (same id)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "nanochat"), id=_state["id"], name=run_dir.name,
                      dir=str(run_dir), config=config, **kwargs,
                      # console="off": wandb must not wrap stdout, which carries our event stream
                      settings=wandb.Settings(silent=True, console="off"))


def metrics_of(record: dict, price_per_hour: float | None, started: float) -> dict:
    """The wandb row for one event ({} for events that carry no numbers)."""
    stage, kind = record.get("stage") or "run", record.get("event")
    row: dict = {}
    if kind == "progress":
        for key in ("loss", "tokens_per_sec", "mfu", "elapsed_s"):
            if isinstance(record.get(key), (int, float)):
                row[f"{stage}/{key}"] = record[key]
    elif kind == "eval":
        for key, value in (record.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                row[f"{stage}/eval/{key}"] = value
    elif kind == "stage_end" and isinstance(record.get("seconds"), (int, float)):
        row[f"{stage}/seconds"] = record["seconds"]
    if not row:
        return row
    step = record.get("step", (record.get("metrics") or {}).get("step"))
    if isinstance(step, int):
        row[f"{stage}/step"] = step
    if price_per_hour:
        row["usd_spent"] = round(price_per_hour * max(0.0, float(record.get("time", time.time())) - started) / 3600, 4)
    return row


def log_event(record: dict) -> None:
    """Called by common.emit for every event of a stage process (rank 0)."""
    global _run, _off
    if _off:
        return
    run_dir = os.environ.get("NANOCHAT_RUN_DIR")
    if not run_dir:
        return   # not inside a pipeline stage (a bench, a test, a stage run by hand): nothing to name the run by
    try:
        if _run is None:
            _run = _start(Path(run_dir), float(record.get("time") or time.time()))
        price = os.environ.get("NANOCHAT_PRICE_PER_HOUR")
        row = metrics_of(record, float(price) if price else None, _state["started"])
        if row:
            stage = record.get("stage") or "run"
            for key in row:
                if key.startswith(stage + "/") and key != f"{stage}/step":
                    _run.define_metric(key, step_metric=f"{stage}/step")
            _run.log(row)
    except Exception as e:  # noqa: BLE001 - any wandb failure: warn once, keep training
        _off = True
        print(f"warning: wandb tracking is off for this stage ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
