"""The planner's arithmetic: dollars -> depth, tokens, hours, cost; never above the budget."""
import pytest
from hypothesis import given, settings, strategies as st

from nanochat_core.common import NanochatError
from nanochat_cli.planning import planner

OFFER = {"cloud": "nebius", "region": "eu-north1", "instance_type": "gpu-h100-sxm_8gpu-128vcpu-1600gb",
         "accelerators": "H100:8", "spot": False, "price_per_hour": 23.6, "interconnect": "nvlink", "enabled": True}


def test_model_sizes_match_the_anchor():
    # the reference: d24 has ~730M scaling params; d12 ~286M total with value embeddings (vocab 32768).
    assert planner.model_config(24).n_embd == 1536
    assert 725e6 < planner.scaling_params(24) < 735e6
    assert 280e6 < planner.total_params(12) < 292e6


def test_throughput_anchor_and_sources():
    tps, src = planner.THROUGHPUT_TABLE[("H100", 24)]
    assert tps == 100_000 and src.startswith("anchor")
    for (gpu, depth), (tps, src) in planner.THROUGHPUT_TABLE.items():
        assert tps > 0 and src                           # every row says how it was derived
    # The MFU-based estimate at d24 agrees with the anchor within 20%.
    est, _ = planner.throughput("H100", 24)
    assert abs(est / 100_000 - 1) < 0.2


def test_plan_is_consistent():
    p = planner.make_plan(OFFER, 100)
    assert p.cost <= 100 and p.depth == 24
    assert p.tokens == planner.TOKENS_PER_PARAM * planner.scaling_params(24)
    assert p.hours == pytest.approx(sum(s.hours for s in p.stages))
    assert p.cost == pytest.approx(p.hours * 23.6)
    base = next(s for s in p.stages if s.name == "base")
    assert base.hours == pytest.approx(p.tokens / p.tokens_per_sec / 3600)
    assert p.expected_core == pytest.approx(0.2565)
    # One more depth step would not fit (with the teardown margin every plan keeps).
    assert not planner.plan_for_depth(OFFER, 26, 100).fits()


def test_budget_too_small_names_the_minimum():
    d4 = planner.plan_for_depth(OFFER, planner.DEPTHS[0], 1)
    need = d4.price_per_hour * (d4.hours + planner.MARGIN_H)      # the run plus its teardown margin
    with pytest.raises(NanochatError, match=rf"smallest model \(depth 4\) needs about \${d4.cost:.2f}") as e:
        planner.make_plan(OFFER, need * 0.99)
    named = int(str(e.value).split("--budget ")[1].split()[0])
    assert named == __import__("math").ceil(need)
    just_enough = planner.make_plan(OFFER, named)                   # the budget the error names works
    assert just_enough.depth >= 4 and just_enough.fits()


def test_depth_override():
    assert planner.make_plan(OFFER, 100, depth=12).depth == 12
    with pytest.raises(NanochatError, match=r"depth 32 needs about .* use --depth 24 or less"):
        planner.make_plan(OFFER, 100, depth=32)


def test_multi_node_is_faster_but_not_free():
    one = planner.plan_for_depth(OFFER, 20, 1000, nodes=1)
    two = planner.plan_for_depth(OFFER, 20, 1000, nodes=2)
    assert two.price_per_hour == 2 * one.price_per_hour
    assert next(s for s in two.stages if s.name == "base").hours < next(s for s in one.stages if s.name == "base").hours


@settings(max_examples=60, deadline=None)
@given(budget=st.floats(min_value=1, max_value=5000), price=st.floats(min_value=0.5, max_value=120),
       more=st.floats(min_value=1.0, max_value=10.0))
def test_never_above_budget_and_monotone(budget, price, more):
    offer = dict(OFFER, price_per_hour=price)
    try:
        p = planner.make_plan(offer, budget)
    except NanochatError as e:
        assert "too small" in str(e)
        return
    assert p.cost <= budget and p.max_price_per_hour * (p.hours + p.margin_hours) <= budget + 1e-6
    # The node's deadlines never let it spend more than the plan's hard cap, which is never above the budget.
    assert p.max_price_per_hour * (p.deadline_hours + p.margin_hours) <= p.spend_cap + 1e-6 <= budget + 2e-6
    assert p.base_deadline_hours >= p.pre_base_end_hours() - 1e-9
    bigger = planner.make_plan(offer, budget * more)
    assert bigger.cost <= budget * more and bigger.depth >= p.depth


@pytest.mark.parametrize("text", ["-5", "0", "abc", "", "nan", "inf", "1e999"])
def test_bad_budgets(text):
    with pytest.raises(NanochatError, match="--budget must be"):
        planner.parse_budget(text)


def test_good_budgets():
    assert planner.parse_budget("$1,000") == 1000.0 and planner.parse_budget(" 99.5 ") == 99.5


def test_deadlines_come_from_the_plan_and_the_dearest_failover_offer():
    """One source of truth: the job's deadline is the budget at the dearest allowed failover price less the
    margin; base must stop the planned post-base hours before it - never before base's planned end."""
    p = planner.make_plan(OFFER, 100)
    cands = [OFFER, dict(OFFER, cloud="lambda", price_per_hour=25.0), dict(OFFER, cloud="aws", price_per_hour=55.04)]
    kept = planner.limit_failover(p, cands)
    assert [c["cloud"] for c in kept] == ["nebius", "lambda"]           # aws at $55/h would overrun $100
    assert p.max_price_per_hour == 25.0
    assert p.deadline_hours == pytest.approx(100 / 25.0 - planner.MARGIN_H)
    assert p.base_deadline_hours == pytest.approx(p.deadline_hours - p.post_base_hours())
    assert p.base_deadline_hours >= p.pre_base_end_hours()
    assert 25.0 * (p.hours + planner.MARGIN_H) <= 100


def test_the_depth_cap_is_said_out_loud_and_is_the_hard_cap():
    p = planner.make_plan(OFFER, 5000)
    assert p.depth == planner.DEPTHS[-1] and "largest model" in p.capped_note
    assert "capped_note" in p.to_json() and not planner.make_plan(OFFER, 100).capped_note
    # The plan's own cost plus the margin and room for a slow setup, in whole dollars - not the $5000 -
    # bounds the node's deadlines.
    assert p.spend_cap == p.min_budget(slack=True) < 5000 and f"${p.spend_cap:.2f}" in p.capped_note
    assert p.hours <= p.deadline_hours == pytest.approx(p.spend_cap / 23.6 - planner.MARGIN_H)
    assert not p.setup_note and p.base_deadline_hours - p.pre_base_end_hours() >= planner.SLOW_SETUP_H
    # Failing over to a dearer offer raises the cap (and the note) with it, never the deadline past the plan.
    planner.limit_failover(p, [OFFER, dict(OFFER, cloud="lambda", price_per_hour=31.92)])
    assert p.spend_cap == p.min_budget(slack=True) and f"${p.spend_cap:.2f}" in p.capped_note
    assert "31.92/h" in p.capped_note
    assert p.hours <= p.deadline_hours <= p.hours + planner.SLOW_SETUP_H + 1 / 31.92
    assert planner.make_plan(OFFER, 100).spend_cap == 100        # an uncapped plan may use its whole budget


def test_preflight_is_planned_before_base_and_preflight_only_plans_nothing_else():
    p = planner.make_plan(OFFER, 100)
    assert [s.name for s in p.stages][:4] == ["setup", "preflight", "tok", "base"]
    assert p.pre_base_end_hours() == pytest.approx(planner.SETUP_H + planner.PREFLIGHT_H + planner.TOKENIZER_H
                                                   + next(s.hours for s in p.stages if s.name == "base"))
    depth = p.depth
    p.preflight_only()
    assert p.depth == depth and [s.name for s in p.stages] == ["setup", "preflight"]
    assert p.cost == pytest.approx((planner.SETUP_H + planner.PREFLIGHT_H) * 23.6)
    assert p.spend_cap == p.min_budget() and p.hours <= p.deadline_hours == p.base_deadline_hours


def test_the_node_downloads_enough_shards_for_the_planned_tokens():
    for budget in (100, 400, 2000):          # d24 ... d32: 7B to 17B tokens
        p = planner.make_plan(OFFER, budget)
        assert p.num_shards * planner.TOKENS_PER_SHARD >= p.tokens    # data never silently repeats
        assert p.num_shards >= planner.MIN_SHARDS
    assert planner.make_plan(OFFER, 2000).num_shards > 170             # the node's old fixed count


def test_anchor_scores_are_quoted_only_for_a_comparable_model():
    # The anchor's launch d20 (561M params, ~11B tokens) is not our d20 (897M params, 4.35B tokens).
    d20 = planner.plan_for_depth(OFFER, 20, 100)
    assert d20.params > 800e6 and d20.expected_core is None and "no comparable" in d20.expected_core_source
    assert planner.plan_for_depth(OFFER, 22, 100).expected_core is None    # no interpolation from d20
    assert planner.plan_for_depth(OFFER, 24, 100).expected_core == pytest.approx(0.2565)


@pytest.mark.parametrize("typed", ["$100", "$50", "$1000"])
def test_a_budget_whose_dollar_sign_the_shell_ate_gets_a_hint(typed):
    """Typed unquoted in a real shell, `--budget $100` reaches us as '00' ($1 is an empty positional parameter):
    one line that says what happened and how to write it."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    r = subprocess.run(["bash", "-c", f"{sys.executable} -m nanochat_cli.main train --budget {typed} --dryrun"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --budget must be"), r.stderr
    assert "the shell replaced '$1' with nothing" in lines[0] and "--budget '$100'" in lines[0]
    assert "shell" not in str(NanochatError(planner._shell_dollar_hint("100")))   # a real mistake gets no such hint


@settings(max_examples=40, deadline=None)
@given(budget=st.floats(min_value=10, max_value=2000), price=st.floats(min_value=0.5, max_value=40),
       controller=st.floats(min_value=0.0, max_value=2.0))
def test_a_spot_plan_pays_its_controller_and_its_recoveries_within_the_cap(budget, price, controller):
    """What a managed spot job costs beyond its node is in its plan (issue 19 item 6): the jobs controller's
    $/h is in the whole job's price at every failover offer; base's deadline keeps SPOT_RECOVERIES setups after
    base's planned end (one preemption, one restart after an error); and a recovery that provisions a node
    just before the job's deadline still ends inside the cap (one setup more of margin)."""
    spot = dict(OFFER, spot=True, price_per_hour=price)
    try:
        p = planner.make_plan(spot, budget, controller_per_hour=controller)
    except NanochatError as e:
        assert "too small" in str(e)
        return
    dearer = dict(spot, cloud="aws", price_per_hour=price * 1.05)
    planner.limit_failover(p, [spot, dearer])
    assert p.price_per_hour == pytest.approx(price + controller)
    assert p.max_price_per_hour >= p.price_per_hour
    names = [s.name for s in p.stages]
    assert names[:2] == ["setup", "recovery"] and "recovery" not in names[2:]
    planned_base_end = sum(s.hours for s in p.stages if s.name in ("setup", "preflight", "tok", "base"))
    assert p.base_deadline_hours - planned_base_end >= planner.SPOT_RECOVERIES * planner.SETUP_H - 1e-9
    # Worst case: billed at the dearest offer until the deadline, then a recovery's provisioning, then teardown.
    worst = p.max_price_per_hour * (p.deadline_hours + planner.SETUP_H + planner.MARGIN_H)
    assert worst <= p.spend_cap + 1e-6 <= budget + 2e-6
    on_demand = planner.make_plan(dict(spot, spot=False), budget, controller_per_hour=controller)
    assert "recovery" not in [s.name for s in on_demand.stages] and on_demand.margin_hours == planner.MARGIN_H
    assert on_demand.price_per_hour == pytest.approx(price)   # no controller without a managed job
