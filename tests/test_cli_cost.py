"""The cost meter and the live panel, from a recorded event stream (times in the events make it exact)."""
import json

import pytest

from nanochat_core.common import EVENT_PREFIX, parse_event
from nanochat_cli.planning.cost import CostMeter, replay
from nanochat_cli.stream import RunView

T0 = 1_700_000_000.0
PRICE = 36.0  # $/h -> $0.01 per second


def recorded_stream():
    """A 10-minute tokenizer stage, then base training at 2 s/step for 300 steps, as log lines."""
    ev = [{"event": "stage_start", "stage": "tok", "time": T0, "pipeline": True},
          {"event": "stage_end", "stage": "tok", "seconds": 600, "time": T0 + 600, "pipeline": True},
          {"event": "stage_start", "stage": "base", "time": T0 + 600, "pipeline": True}]
    for step in range(10, 301, 10):
        ev.append({"event": "progress", "stage": "base", "step": step, "total_steps": 300, "loss": 10 / step,
                   "tokens_per_sec": 5e5, "mfu": 48.5, "elapsed_s": 2.0 * step, "time": T0 + 600 + 2.0 * step})
    lines = ["booting...", *(EVENT_PREFIX + json.dumps(e) for e in ev), "done with base"]
    return lines


def test_replay_of_a_recorded_stream():
    events = [e for e in map(parse_event, recorded_stream()) if e]
    planned = {"tok": 0.1, "base": 0.2, "sft": 0.25, "eval": 0.25}
    # Cut the stream half-way through base: step 150 at T0 + 900.
    half = [e for e in events if e.get("step", 0) <= 150]
    meter, warnings = replay(half, PRICE, budget=60.0, planned_stages=planned)
    assert meter.stage == "base" and meter.step == 150
    assert meter.spent(T0 + 900) == pytest.approx(9.0)
    # ETA: 150 steps left at 2 s/step + SFT and eval from the plan (0.5 h).
    assert meter.eta_s(T0 + 900) == pytest.approx(300 + 1800)
    assert meter.projected_total(T0 + 900) == pytest.approx(9.0 + 2100 * 0.01)
    assert meter.budget_left(T0 + 900) == pytest.approx(51.0)
    assert warnings == []


def test_warns_once_at_80_percent():
    events = [e for e in map(parse_event, recorded_stream()) if e]
    meter, warnings = replay(events, PRICE, budget=14.2)   # 80% = $11.36, crossed at T0 + 1136 s
    assert len(warnings) == 1 and warnings[0].startswith("$11.40 spent: 80% of the $14.20 hard cap")
    assert "nanochat down" in warnings[0] and meter.warned


def test_no_warning_without_price_or_budget():
    events = [e for e in map(parse_event, recorded_stream()) if e]
    assert replay(events, 0.0, budget=1.0)[1] == []
    assert replay(events, PRICE, budget=None)[1] == []


def test_panel_fields_from_events():
    meter = CostMeter(PRICE, T0, budget=100.0, planned_stages={"base": 0.2, "sft": 0.1})
    view = RunView(meter, "test", run_started_at=T0 + 600)   # the run began 10 minutes after the cluster
    lines = recorded_stream()
    shown = [view.feed(e) for e in map(parse_event, lines) if e]
    assert "== stage tok finished in 10m00s" in shown
    fields = dict(view.fields(now=T0 + 1200))
    assert fields["stage"] == "base" and fields["step"] == "300/300"
    assert fields["loss"] == "0.0333" and fields["tok/s"] == "500,000" and fields["MFU"] == "48.5%"
    assert fields["spent"] == "$12.00" and fields["elapsed"] == "10m00s"
    assert fields["ETA"] == "6m00s"                         # base is at its last step; sft's 0.1 h remains
    assert fields["projected"] == "$15.60" and fields["cap"] == "$100.00 ($88.00 left)"


def test_inner_stage_announcements_are_not_printed_twice():
    view = RunView(CostMeter(PRICE, T0), "test")
    inner = {"event": "stage_end", "stage": "base", "seconds": 5, "time": T0 + 5}
    outer = dict(inner, pipeline=True)
    assert view.feed(inner) is None
    assert view.feed(outer) == "== stage base finished in 0m05s"


def test_rl_progress_shows_its_reward_instead_of_a_loss():
    """RL has no loss: its progress events carry loss null and the mean reward, which the panel shows."""
    view = RunView(CostMeter(PRICE, T0), "test")
    view.feed({"event": "progress", "stage": "rl", "step": 3, "total_steps": 10, "loss": None, "reward": 0.25,
               "tokens_per_sec": 100.0, "mfu": 1.0, "elapsed_s": 3.0, "time": T0 + 3})
    fields = dict(view.fields(now=T0 + 4))
    assert fields["reward"] == "0.2500" and "loss" not in fields


# -----------------------------------------------------------------------------
# The panel never freezes between log lines (issue 20 item 4); an injected clock stands for the time

def test_elapsed_spent_and_eta_move_with_the_clock_while_no_event_arrives():
    now = [T0]
    meter = CostMeter(PRICE, T0, planned_stages={"base": 0.05, "sft": 0.01})
    view = RunView(meter, "test", clock=lambda: now[0])
    view.feed({"event": "stage_start", "stage": "base", "time": T0, "pipeline": True})
    now[0] = T0 + 60    # a minute of compiling: no progress event yet; base's planned 3 min count down
    f = dict(view.fields())
    assert (f["elapsed"], f["spent"], f["ETA"]) == ("1m00s", "$0.60", "2m36s")   # 120 s of base + 36 s of sft
    view.feed({"event": "progress", "stage": "base", "step": 10, "total_steps": 100, "loss": 3.0, "tokens_per_sec": 1.0,
               "mfu": 1.0, "elapsed_s": 20.0, "time": T0 + 80})
    now[0] = T0 + 80
    assert dict(view.fields())["ETA"] == "3m36s"        # 90 steps at 2 s + sft
    now[0] = T0 + 110   # 30 s later, still no line: the same numbers must not stand still
    f = dict(view.fields())
    assert (f["elapsed"], f["spent"], f["ETA"]) == ("1m50s", "$1.10", "3m06s")


def test_the_live_panel_is_redrawn_while_the_log_is_silent():
    """rich's Live redraws from the view on its own clock: the panel moves although no line arrives."""
    import io
    import threading
    from rich.console import Console
    from nanochat_cli.stream import watch
    view = RunView(CostMeter(0.0, T0), "test")
    drawn = []
    original = view.panel
    view.panel = lambda: (drawn.append(1), original())[1]
    redrawn_while_silent = threading.Event()

    def lines():
        yield EVENT_PREFIX + json.dumps({"event": "stage_start", "stage": "base", "time": T0, "pipeline": True}), 1
        seen = len(drawn)
        for _ in range(600):    # up to a minute on a very busy machine; an order, not a duration, is asserted
            if len(drawn) >= seen + 3:
                redrawn_while_silent.set()
                break
            threading.Event().wait(0.1)
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    watch(lines(), view, lambda cursor: None, console, live=True, pos=0)
    assert redrawn_while_silent.is_set(), "the panel was not redrawn between log lines"


def test_the_tokenizer_shows_characters_read_not_steps_and_no_eta_from_its_cap():
    now = [T0 + 12]
    view = RunView(CostMeter(0.0, T0, planned_stages={"tok": 0.01}), "test", clock=lambda: now[0])
    view.feed({"event": "stage_start", "stage": "tok", "time": T0, "pipeline": True})
    view.feed({"event": "progress", "stage": "tokenizer", "step": 8922413, "total_steps": 20000000, "loss": None,
               "tokens_per_sec": None, "mfu": None, "elapsed_s": 11.5, "unit": "chars", "time": T0 + 11.5})
    f = dict(view.fields())
    assert "step" not in f and f["progress"] == "8.9M chars read (of up to 20.0M)"
    assert f["ETA"] == "0m24s"    # the plan's 36 s less the 12 s it has run, not 11.5 s x 20M / 8.9M


def test_checkpoint_lines_are_rate_limited_per_stage():
    view = RunView(CostMeter(0.0, T0), "test")
    shown = [view.feed({"event": "checkpoint", "stage": "base", "step": 3 * i, "path": f"/r/base/ckpt_{3 * i:06d}",
                        "time": T0 + 20 * i}) for i in range(1, 31)]          # every 3 steps, every 20 s
    lines = [s for s in shown if s]
    assert len(lines) == 2 and lines[0].endswith("ckpt_000003")
    assert "ckpt_000048" in lines[1] and "(14 more since the last one shown)" in lines[1]
    assert view.feed({"event": "checkpoint", "stage": "sft", "step": 1, "path": "/r/sft/ckpt_000001",
                      "time": T0 + 610})                                       # another stage: shown at once


def test_detaching_from_a_free_local_run_does_not_say_it_keeps_spending():
    from nanochat_cli.commands.run import detach_message
    local = detach_message("local", RunView(CostMeter(0.0, T0), "t").spending())
    cloud = detach_message("d20", RunView(CostMeter(PRICE, T0), "t").spending())
    assert "spending" not in local and "$0" in local and "nanochat logs --name local" in local
    assert "keeps running (and spending)" in cloud and "nanochat down" in cloud
