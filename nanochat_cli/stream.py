"""
Watching a run: raw log lines scroll, one rich panel below them shows stage, step/total, loss, tokens/s,
MFU, elapsed, dollars spent, projected total and ETA - all built from the `@@nanochat {json}` progress
events in the log (common.parse_event), so the panel is the same live, on re-attach and on a replay.

The transport (a file on this machine, SkyPilot's log tail for a cluster) can drop. `resilient()`
reconnects from the last position it delivered, so a dropped connection neither loses nor repeats lines.
Positions are opaque to this module: byte offsets for the local backend, line counts for SkyPilot.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from nanochat_core.common import NanochatError, parse_event
from nanochat_cli.planning.cost import CostMeter, fmt_duration
from rich.panel import Panel
from rich.table import Table

TailFn = Callable[[Any], Iterator[tuple[str, Any]]]


def resilient(open_tail: TailFn, pos: Any, retries: int = 8, backoff_s: float = 0.5,
              on_retry: Callable[[Exception, int], None] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (line, cursor) from open_tail(cursor), reopening it at the last delivered cursor when the
    transport fails. Gives up after `retries` consecutive failures with a one-line, actionable error."""
    failures = 0
    while True:
        try:
            for line, new_pos in open_tail(pos):
                pos, failures = new_pos, 0
                yield line, new_pos
            return
        except (ConnectionError, TimeoutError, OSError) as e:
            failures += 1
            if failures > retries:
                raise NanochatError(f"lost the log stream ({type(e).__name__}: {e}) and could not reconnect; "
                                    "the job keeps running - `nanochat logs` re-attaches") from None
            if on_retry:
                on_retry(e, failures)
            time.sleep(min(10.0, backoff_s * failures))


class RunView:
    """Holds the latest progress and renders the panel (or plain lines when not on a terminal)."""

    # A checkpoint line at most this often per stage (event time): a CPU run saves every minute, which on a
    # busy machine is every few steps, and those lines pushed everything else out of the scroll-back.
    CHECKPOINT_LINE_EVERY_S = 300.0

    def __init__(self, meter: CostMeter, title: str, run_started_at: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.meter = meter
        self.title = title
        self.clock = clock   # the panel's "now": elapsed, $ spent and ETA move with it between events
        # "elapsed" is this run's time; "spent" counts the whole cluster's uptime (that is what is billed).
        self.run_started_at = run_started_at if run_started_at is not None else meter.started_at
        self.loss: float | None = None
        self.reward: float | None = None   # RL reports its mean reward instead of a loss
        self.tps: float | None = None
        self.mfu: float | None = None
        self.last_plain = 0.0
        self.checkpoint_shown: dict[str, float] = {}   # stage -> event time of its last checkpoint line
        self.checkpoints_hidden: dict[str, int] = {}

    def feed(self, event: dict) -> str | None:
        """Update from one event; returns a human line worth printing for it (or None)."""
        self.meter.feed(event)
        kind = event.get("event")
        if kind == "progress":
            self.loss, self.tps, self.mfu = event.get("loss"), event.get("tokens_per_sec"), event.get("mfu")
            self.reward = event.get("reward")
            return None
        # Stages announce themselves too; print the pipeline's own lines so each shows once.
        if kind in ("stage_start", "stage_end") and not event.get("pipeline"):
            return None
        if kind == "stage_start":
            return f"== stage {event.get('stage')} started"
        if kind == "stage_end":
            return f"== stage {event.get('stage')} finished in {fmt_duration(event.get('seconds'))}"
        if kind == "checkpoint":
            stage, t = str(event.get("stage")), event.get("time")
            t = float(t) if isinstance(t, (int, float)) else self.clock()
            last = self.checkpoint_shown.get(stage)
            if last is not None and t - last < self.CHECKPOINT_LINE_EVERY_S:
                self.checkpoints_hidden[stage] = self.checkpoints_hidden.get(stage, 0) + 1
                return None
            self.checkpoint_shown[stage] = t
            hidden = self.checkpoints_hidden.pop(stage, 0)
            more = f" ({hidden} more since the last one shown)" if hidden else ""
            return f"   checkpoint {stage} step {event.get('step')}: {event.get('path')}{more}"
        if kind == "resumed":
            return f"   resumed {event.get('stage')} from step {event.get('step')}"
        if kind == "eval":
            metrics = event.get("metrics") or {}
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            return f"   eval {event.get('stage')}: {shown}"
        if kind == "sample":
            return f"   sample: {str(event.get('text', ''))[:200]!r}"
        if kind == "error":
            return f"!! {event.get('stage')}: {event.get('message')}"
        if kind == "done":
            if event.get("state"):
                return f"== {str(event['state']).lower().replace('_', '-')}: {event.get('message') or ''}"
            return f"== done: {event.get('run_dir')}"
        return None

    def fields(self, now: float | None = None) -> list[tuple[str, str]]:
        m = self.meter
        now = self.clock() if now is None else now
        if m.unit != "steps":   # e.g. the tokenizer's characters read: a count up to a cap, not steps
            step = (f"{_count(m.step)} {m.unit} read" + (f" (of up to {_count(m.total_steps)})" if m.total_steps else "")
                    if m.step else "-")
        else:
            step = f"{m.step}/{m.total_steps}" if m.total_steps else (str(m.step) if m.step else "-")
        spent = m.spent(now)
        proj = m.projected_total(now)
        loss = (("reward", f"{self.reward:.4f}") if isinstance(self.reward, (int, float)) else
                ("loss", f"{self.loss:.4f}" if isinstance(self.loss, (int, float)) else "-"))
        rows = [("stage", m.stage or "starting"), ("step" if m.unit == "steps" else "progress", step), loss,
                ("tok/s", f"{self.tps:,.0f}" if isinstance(self.tps, (int, float)) else "-"),
                ("MFU", f"{self.mfu:.1f}%" if isinstance(self.mfu, (int, float)) else "-"),
                ("elapsed", fmt_duration(now - self.run_started_at)),
                ("spent", f"${spent:,.2f}"),
                ("projected", f"${proj:,.2f}" if proj is not None else "-"),
                ("ETA", fmt_duration(m.eta_s(now)))]
        if m.budget:
            rows.append(("cap", f"${m.budget:,.2f} (${m.budget_left(now):,.2f} left)"))
        return rows

    def panel(self):
        t = Table.grid(padding=(0, 2))
        rows = self.fields()
        for i in range(0, len(rows), 5):
            t.add_row(*[f"[dim]{k}[/] [bold]{v}[/]" for k, v in rows[i:i + 5]])
        return Panel(t, title=self.title, border_style="cyan")

    def spending(self) -> bool:
        return self.meter.price_per_hour > 0

    def plain_status(self) -> str:
        return "   [" + " | ".join(f"{k} {v}" for k, v in self.fields()) + "]"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e4 else str(n)


def watch(lines: Iterator[tuple[str, Any]], view: RunView, save: Callable[[Any], None], console, live: bool,
          pos: Any, save_every_s: float = 1.0) -> Any:
    """Print lines and keep the panel current until the stream ends. Saves how far it got with `save(cursor)`
    (periodically and on the way out, Ctrl-C included) and returns the final cursor."""
    last_save = time.time()

    def handle(line: str) -> None:
        event = parse_event(line)
        if event is None:
            out(line)
            return
        if human := view.feed(event):
            out(human)
        if warning := view.meter.check_warning():
            out(f"[warning] {warning}")
        if not live and event.get("event") == "progress" and time.time() - view.last_plain > 5:
            view.last_plain = time.time()
            out(view.plain_status())

    def follow(refresh: Callable[[], None]) -> None:
        nonlocal pos, last_save
        for line, p in lines:
            handle(line)
            pos = p  # only after the line was shown: Ctrl-C in between must not skip it
            refresh()
            if time.time() - last_save > save_every_s:
                save(pos)
                last_save = time.time()

    try:
        if live:
            from rich.live import Live  # heavy-ish: only when a terminal is watching
            from rich.markup import escape
            # get_renderable: Live's own refresh thread re-renders the panel from the view several times a
            # second, so elapsed, $ spent and ETA tick while no line arrives (compiling, saving, downloading).
            with Live(console=console, get_renderable=view.panel, refresh_per_second=4, transient=False) as lv:
                def out(text: str) -> None:
                    lv.console.print(escape(text), highlight=False, soft_wrap=True)
                follow(lv.refresh)
        else:
            def out(text: str) -> None:
                print(text, flush=True)
            follow(lambda: None)
            if view.meter.stage:
                print(view.plain_status(), flush=True)
    finally:
        save(pos)
    return pos
