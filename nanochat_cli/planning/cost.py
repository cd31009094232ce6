"""
The cost meter: dollars spent so far, projected total and ETA, computed from the node's progress events
alone (plus the price and the moment the meter started), so it works the same live, on re-attach and on a
recorded log. Time comes from the events' own `time` field where there is one, which makes a replay of a
recorded stream give exactly the numbers the live run showed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from nanochat_core.run_spec import left, spent

WARN_FRACTION = 0.8  # the meter warns once when spending crosses 80% of the hard cap


@dataclass
class CostMeter:
    price_per_hour: float              # whole job ($/h, all nodes)
    started_at: float                  # unix time the meter (cluster) started charging
    budget: float | None = None        # the hard cap the node enforces: the budget, or a capped plan's own
    planned_stages: dict[str, float] = field(default_factory=dict)  # stage -> planned hours
    # live state from events
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    unit: str = "steps"                # what `step` counts (the tokenizer counts characters read, up to a cap)
    stage_elapsed_s: float = 0.0
    stage_started: float | None = None  # event time of the current stage's start
    progress_time: float | None = None  # event time of its latest progress event
    finished_stages: set[str] = field(default_factory=set)
    last_time: float | None = None
    done: bool = False
    outcome: str | None = None         # the pipeline's own verdict on `done` (e.g. BUDGET_TRUNCATED)
    warned: bool = False

    def feed(self, event: dict) -> None:
        t = event.get("time")
        if isinstance(t, (int, float)):
            self.last_time = float(t)
        kind = event.get("event")
        if kind == "stage_start":
            self.stage, self.step, self.total_steps, self.stage_elapsed_s = event.get("stage"), 0, 0, 0.0
            self.unit, self.stage_started, self.progress_time = "steps", self.last_time, None
        elif kind == "progress":   # the pipeline's name for the stage wins (its tok stage reports as "tokenizer")
            self.stage = self.stage or event.get("stage")
            self.step = int(event.get("step") or 0)
            self.total_steps = int(event.get("total_steps") or 0)
            self.stage_elapsed_s = float(event.get("elapsed_s") or 0.0)
            self.unit = str(event.get("unit") or "steps")
            self.progress_time = self.last_time
        elif kind == "stage_end":
            self.finished_stages.add(event.get("stage"))
        elif kind == "done":
            self.done = True
            self.outcome = event.get("state")

    def spent(self, now: float | None = None) -> float:
        return spent(self.price_per_hour, self.started_at, time.time() if now is None else now)

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds until the run ends: the current stage from its measured rate (steps only: the tokenizer's
        character count runs to a cap it may never reach), else from the plan less the time it has already
        run; the stages not yet started from the plan. It counts down between events (`now`), so the panel
        moves while a stage compiles or saves. None when there is nothing to estimate from."""
        if self.done:
            return 0.0
        now = time.time() if now is None else now
        remaining = 0.0
        known = False
        if self.stage and self.step > 0 and self.total_steps > 0 and self.unit == "steps":
            rate = self.stage_elapsed_s / self.step
            since = max(0.0, now - self.progress_time) if self.progress_time is not None else 0.0
            remaining += max(0.0, rate * max(0, self.total_steps - self.step) - since)
            known = True
        elif self.stage in self.planned_stages:
            since = max(0.0, now - self.stage_started) if self.stage_started is not None else 0.0
            remaining += max(0.0, self.planned_stages[self.stage] * 3600 - since)
            known = True
        for name, hours in self.planned_stages.items():
            if name != self.stage and name not in self.finished_stages and not self._before_current(name):
                remaining += hours * 3600
                known = True
        return remaining if known else None

    def _before_current(self, name: str) -> bool:
        order = list(self.planned_stages)
        if self.stage not in order or name not in order:
            return False
        return order.index(name) < order.index(self.stage)

    def projected_total(self, now: float | None = None) -> float | None:
        eta = self.eta_s(now)
        if eta is None:
            return None
        return self.spent(now) + eta / 3600 * self.price_per_hour

    def budget_left(self, now: float | None = None) -> float | None:
        return left(self.budget, self.spent(now))

    def check_warning(self, now: float | None = None) -> str | None:
        """A one-time warning when spending crosses 80% of the hard cap (None otherwise)."""
        if self.warned or not self.budget or self.price_per_hour <= 0:
            return None
        spent = self.spent(now)
        if spent >= WARN_FRACTION * self.budget:
            self.warned = True
            return (f"${spent:.2f} spent: {spent / self.budget:.0%} of the ${self.budget:.2f} hard cap. "
                    f"The run stops itself there; `nanochat down` stops spending now.")
        return None


def replay(events: list[dict], price_per_hour: float, budget: float | None = None,
           planned_stages: dict[str, float] | None = None) -> tuple[CostMeter, list[str]]:
    """Feed a recorded event stream through a meter that started at the first event's time.
    Returns the meter and the warnings it raised, in order (what the live panel would have shown)."""
    start = next((float(e["time"]) for e in events if isinstance(e.get("time"), (int, float))), time.time())
    meter = CostMeter(price_per_hour, start, budget, dict(planned_stages or {}))
    warnings = []
    for e in events:
        meter.feed(e)
        w = meter.check_warning(meter.last_time)
        if w:
            warnings.append(w)
    return meter, warnings


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
