"""report.md from what the stages leave on disk: the metric table in the anchor's layout and the costs."""
import json
import subprocess
import sys

import pytest
import torch

from nanochat_core.gpt import checkpoint
from nanochat_core.evaluation import report
from nanochat_core.common import NanochatError
from nanochat_core.gpt.model import GPT, config_for_depth, count_params


def _run_dir(tmp_path, price=None):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "stages.json").write_text(json.dumps({
        "tok": {"seconds": 120.0, "started": 0, "finished": 120},
        "base": {"seconds": 5400.0, "started": 120, "finished": 5520},
        "sft": {"seconds": 900.0, "started": 5520, "finished": 6420},
        "eval": {"seconds": 1080.0, "started": 6420, "finished": 7500}}, sort_keys=True))  # as the pipeline writes it
    if price is not None:
        (run / "plan.json").write_text(json.dumps({"price_per_hour": price, "budget": 100, "nodes": 1}))
    (run / "eval" / "base.json").write_text(json.dumps(
        {"stage": "base", "metrics": {"CORE": 0.2219, "bpb": 0.8123}, "unavailable": []}))
    (run / "eval" / "sft.json").write_text(json.dumps(
        {"stage": "sft", "metrics": {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151,
                                     "ChatCORE": 0.0884, "SpellingBee": 0.5, "Arithmetic": 0.25},
         "unavailable": ["GSM8K", "HumanEval"]}))
    return run


def _base_checkpoint(run):
    cfg = config_for_depth(1, 512, sequence_len=64, head_dim=32)
    model = GPT.build(cfg, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = {"total_batch_size": 1024, "config": None}
    checkpoint.save_checkpoint(run / "base", 30, model, opt, {"stage": "base", "plan": plan, "train_seconds": 61.0})
    return count_params(cfg)


def test_collect_metrics_by_stage(tmp_path):
    m = report.collect_metrics(_run_dir(tmp_path))
    assert set(m) == {"BASE", "MID", "SFT", "RL"}
    assert m["BASE"]["CORE"] == 0.2219 and m["SFT"]["MMLU"] == 0.3151 and m["MID"] == {} and m["RL"] == {}


def test_report_has_table_and_costs(tmp_path):
    run = _run_dir(tmp_path, price=24.0)
    counts = _base_checkpoint(run)
    text = report.write_report(run).read_text()
    lines = text.splitlines()
    header = next(l for l in lines if l.startswith("| Metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Metric", "BASE", "MID", "SFT", "RL"]
    row = lambda name: [c.strip() for c in next(l for l in lines if l.startswith(f"| {name} ")).strip("|").split("|")]
    assert row("CORE") == ["CORE", "0.2219", "-", "-", "-"]
    assert row("ARC-Easy") == ["ARC-Easy", "-", "-", "0.3876", "-"]
    assert row("bpb") == ["bpb", "0.8123", "-", "-", "-"]
    assert row("Arithmetic")[3] == "0.2500"  # extra metrics are appended after the anchor's rows
    names = [l.split("|")[1].strip() for l in lines if l.startswith("| ")]
    anchor = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE", "SpellingBee", "bpb"]
    assert names[names.index("CORE"):names.index("CORE") + 10] == anchor + ["Arithmetic"]
    # costs: hours x $24/h per stage, and the total (7500 s = 2.0833 h -> $50.00)
    assert row("base") == ["base", "1h30m00s", "$36.00"]
    assert row("sft") == ["sft", "15m00s", "$6.00"]
    assert "| **Total** | 2h05m00s | $50.00 |" in text
    stage_rows = [l.split("|")[1].strip() for l in lines if l.startswith("| ") and ("$" in l or "n/a" in l)]
    assert stage_rows[:4] == ["tok", "base", "sft", "eval"]  # in the order they ran, not alphabetical
    assert "$24.00/h" in text and "Budget: $100.00" in text
    # model size and tokens come from the base checkpoint
    assert f"{counts['total']:,}" in text and "30,720" in text  # 30 steps x 1024 tokens
    assert "GSM8K, HumanEval" in text  # unavailable tasks are listed, not silently dropped
    assert "Git commit:" in text and "GPU:" in text and "Nodes: 1" in text


def test_local_report_without_price_says_na(tmp_path):
    run = _run_dir(tmp_path)
    text = report.write_report(run).read_text()
    assert "| base | 1h30m00s | n/a |" in text and "| **Total** | 2h05m00s | n/a |" in text
    assert "no base checkpoint yet" in text
    # an explicit price wins over the missing plan
    assert "$12.00" in report.build_report(run, price_per_hour=8.0)  # base: 1.5 h x $8


def test_cli_writes_report_and_prints_json(tmp_path):
    run = _run_dir(tmp_path)
    out = subprocess.run([sys.executable, "-m", "nanochat_core.evaluation.report", "--run-dir", str(run), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["BASE"]["CORE"] == 0.2219
    assert (run / "report.md").exists()
    bad = subprocess.run([sys.executable, "-m", "nanochat_core.evaluation.report", "--run-dir", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
    with pytest.raises(NanochatError):
        report.write_report(tmp_path / "nope")


def test_an_eval_that_could_not_run_is_reported_with_its_real_cause(tmp_path, monkeypatch):
    """Without the `datasets` package the hub-backed tasks cannot load. The report used to blame the network
    ("data unavailable, e.g. no network"); it names the cause the task loader gave."""
    from nanochat_core.common import atomic_write_json
    from nanochat_core.evaluation.runners import evaluate_tasks, merge_record
    monkeypatch.setitem(sys.modules, "datasets", None)     # `import datasets` now fails, as where it is missing
    why = {}
    metrics, unavailable = evaluate_tasks(None, None, ["ARC-Easy", "MMLU"], 5, "cpu", why=why)
    assert metrics == {} and unavailable == ["ARC-Easy", "MMLU"]
    run = tmp_path / "run"
    path = run / "eval" / "sft.json"
    atomic_write_json(path, merge_record(path, {"stage": "sft", "metrics": metrics, "unavailable": unavailable,
                                               "why_unavailable": why}))
    text = report.build_report(run)
    line = next(ln for ln in text.splitlines() if ln.startswith("- SFT:"))
    assert "ARC-Easy, MMLU" in line and "the 'datasets' package is missing" in line, text
    assert "no network" not in text
    # a later eval of the same stage that got one of them keeps the other's cause, drops the measured one's
    atomic_write_json(path, merge_record(path, {"stage": "sft", "metrics": {"ARC-Easy": 0.5}, "unavailable": []}))
    record = json.loads(path.read_text())
    assert record["unavailable"] == ["MMLU"] and list(record["why_unavailable"]) == ["MMLU"]


def test_a_run_that_did_not_finish_says_so_first(tmp_path):
    run = _run_dir(tmp_path)
    (run / "outcome.json").write_text(json.dumps({"state": "BUDGET_TRUNCATED", "stage": "base",
                                                  "why": "base training reached step 10 of 100 planned (10%)"}))
    text = report.build_report(run)
    assert text.index("## Outcome") < text.index("## Environment")
    assert "**This run was cut short by its budget in stage base**: base training reached step 10" in text
    (run / "outcome.json").unlink()
    assert "## Outcome" not in report.build_report(run)
