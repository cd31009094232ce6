"""
report.md: the run's report card, rebuilt from what the stages left on disk (so it can be regenerated
at any time, and is written again as stages finish):

- environment: git commit, GPU, nodes, software;
- each stage's wall time and cost, from run_dir/stages.json (the pipeline) and the price per hour from
  run_dir/plan.json (the launcher) or --price-per-hour; "n/a" when there is no price (a local run);
- the model: parameters and training tokens, from the base checkpoint's meta.json;
- the metric table in the anchor's layout: one row per metric, columns BASE / MID / SFT / RL, built
  from run_dir/eval/<stage>.json = {"stage", "metrics": {...}, "unavailable": [task names], "weights",
  "dtype_asked"}; a stage evaluated with other weights than training's own evaluations (`nanochat eval
  --dtype`) is named under the table.

    python -m nanochat_core.evaluation.report --run-dir DIR [--price-per-hour 23.6] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nanochat_core.common import NanochatError, atomic_write_text, run_main

STAGES = ["BASE", "MID", "SFT", "RL"]
# The anchor's rows first, in its order; anything else a stage measured is appended after them.
METRIC_ROWS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE", "SpellingBee", "bpb"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError, RecursionError) as e:
        print(f"warning: ignoring unreadable {path} ({e})", file=sys.stderr)
        return None


def collect_evals(run_dir: str | os.PathLike) -> dict[str, dict]:
    """{"BASE": {"metrics": {...}, "unavailable": [...]}, ...} for every stage (empty when not evaluated)."""
    out = {}
    for stage in STAGES:
        rec = _read_json(Path(run_dir) / "eval" / f"{stage.lower()}.json") or {}
        out[stage] = {"metrics": dict(rec.get("metrics") or {}), "unavailable": list(rec.get("unavailable") or []),
                      "why_unavailable": dict(rec.get("why_unavailable") or {}),
                      "weights": rec.get("weights"), "dtype_asked": rec.get("dtype_asked")}
    return out


def collect_metrics(run_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """{"BASE": {...}, "MID": {...}, "SFT": {...}, "RL": {...}}: metric name -> value per stage."""
    return {stage: rec["metrics"] for stage, rec in collect_evals(run_dir).items()}


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-"
    if isinstance(v, (int, float)):
        return f"{v:.4f}"
    return str(v)


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """The BASE/MID/SFT/RL table (markdown). A stage without the metric shows '-'."""
    extra = sorted({k for m in metrics.values() for k in m} - set(METRIC_ROWS))
    rows = [r for r in METRIC_ROWS + extra]
    width = max(len(r) for r in rows)
    lines = [f"| {'Metric'.ljust(width)} | " + " | ".join(s.ljust(8) for s in STAGES) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * 10 for _ in STAGES) + "|"]
    for r in rows:
        lines.append(f"| {r.ljust(width)} | " + " | ".join(_fmt(metrics.get(s, {}).get(r)).ljust(8) for s in STAGES)
                     + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Environment, stage times, model

def _git_commit() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + (" (dirty)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "n/a (not a git checkout)"


def _torch_and_gpu() -> tuple[str, str]:
    """torch's version and the GPUs it sees; report.md is still written where torch is missing or broken."""
    try:
        import torch   # lazy: the CLI imports this module, and must not load torch
    except ImportError:
        return "n/a", f"none (CPU, {os.cpu_count()} cores)"
    try:
        if torch.cuda.is_available():
            return torch.__version__, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return torch.__version__, f"none (CPU, {os.cpu_count()} cores)"


def _environment(plan: dict) -> list[str]:
    torch_version, gpu = _torch_and_gpu()
    nodes = plan.get("nodes") or plan.get("num_nodes") or os.environ.get("SKYPILOT_NUM_NODES") or 1
    lines = [f"- Git commit: {_git_commit()}", f"- GPU: {gpu}", f"- Nodes: {nodes}"]
    offer = plan.get("offer")
    if isinstance(offer, dict):
        lines.append("- Offer: " + ", ".join(f"{k} {offer[k]}" for k in ("cloud", "region", "instance", "accelerators")
                                             if offer.get(k)))
    lines += [f"- Platform: {platform.platform()}", f"- Python {platform.python_version()}, PyTorch {torch_version}"]
    return lines


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def stage_costs(stages: dict, price_per_hour: float | None) -> tuple[list[str], float, float | None]:
    """Markdown rows of the stage table, total seconds, total cost (None without a price)."""
    rows, total_s = [], 0.0
    # in the order they ran (stages.json is written with sorted keys)
    for name, rec in sorted(stages.items(), key=lambda kv: (kv[1].get("started") or 0, kv[0])):
        s = float(rec.get("seconds", 0.0))
        total_s += s
        cost = f"${s / 3600 * price_per_hour:.2f}" if price_per_hour is not None else "n/a"
        rows.append(f"| {name} | {_duration(s)} | {cost} |")
    total_cost = total_s / 3600 * price_per_hour if price_per_hour is not None else None
    return rows, total_s, total_cost


def _model_lines(run_dir: Path) -> list[str]:
    from nanochat_core.gpt import checkpoint   # lazy: the CLI imports this module, and must not load torch
    ckpt = checkpoint.find_latest(run_dir / "base", hashes=False, weights_only=True) if (run_dir / "base").is_dir() else None
    if ckpt is None:
        return ["- no base checkpoint yet"]
    meta = checkpoint.read_meta(ckpt)
    plan = meta.get("plan") or {}
    lines = []
    config = meta.get("config") or plan.get("config")
    if config:
        from nanochat_core.gpt.model import GPTConfig, count_params   # lazy: the CLI imports this module, and must not load torch
        counts = count_params(GPTConfig.from_dict(config))
        lines.append(f"- Parameters: {counts['total']:,} ({counts['scaling']:,} scaling); depth {config['n_layer']}, "
                     f"width {config['n_embd']}, vocab {config['vocab_size']:,}, context {config['sequence_len']}")
    if plan.get("total_batch_size"):
        tokens = meta["step"] * plan["total_batch_size"]
        lines.append(f"- Training tokens: {tokens:,} ({meta['step']:,} steps x {plan['total_batch_size']:,})")
        if config:
            lines[-1] += f", {tokens / max(1, counts['scaling']):.3g} tokens per scaling parameter"
    if meta.get("train_seconds"):
        lines.append(f"- Base training time: {_duration(meta['train_seconds'])}")
    return lines or ["- (base checkpoint has no plan)"]


# What the pipeline writes to outcome.json when a run ends without finishing (pipeline.py), in words.
OUTCOME_WORDS = {"BUDGET_TRUNCATED": "was cut short by its budget", "FAILED": "failed",
                 "STOPPED": "was stopped before it finished"}


def outcome_lines(outcome: dict | None) -> list[str]:
    """A run that did not finish says so first, with why: the numbers below are then of a partial run."""
    if not outcome or not outcome.get("state"):
        return []
    words = OUTCOME_WORDS.get(outcome["state"], outcome["state"])
    stage = f" in stage {outcome['stage']}" if outcome.get("stage") else ""
    return ["## Outcome", "", f"**This run {words}{stage}**: {outcome.get('why') or 'no reason recorded'}.",
            "Everything below is what it had done by then.", ""]


def weights_lines(evals: dict[str, dict]) -> list[str]:
    """The stages evaluated with weights someone chose (`nanochat eval --dtype`): their numbers may differ a
    little from what training's own evaluations measure (int8 moved bpb by ~0.03%, docs/PERFORMANCE.md)."""
    asked = [f"{stage} {r['weights']}" for stage, r in evals.items() if r.get("dtype_asked") and r.get("metrics")]
    if not asked:
        return []
    return [f"Weights chosen with `nanochat eval --dtype`: {', '.join(asked)} (training's own evaluations use "
            "fp32 on a CPU, bf16 on a GPU).", ""]


def unavailable_lines(evals: dict[str, dict]) -> list[str]:
    """One line per stage and cause: the cause the task loader gave (no network, a missing package, ...)."""
    lines = []
    for stage, r in evals.items():
        by_why: dict[str, list[str]] = {}
        for name in r["unavailable"]:
            by_why.setdefault(r.get("why_unavailable", {}).get(name) or "no reason recorded", []).append(name)
        lines += [f"- {stage}: {', '.join(names)} ({why})" for why, names in by_why.items()]
    return lines


# -----------------------------------------------------------------------------

def build_report(run_dir: str | os.PathLike, price_per_hour: float | None = None) -> str:
    run_dir = Path(run_dir)
    plan = _read_json(run_dir / "plan.json") or {}
    if price_per_hour is None and plan.get("price_per_hour") is not None:
        price_per_hour = float(plan["price_per_hour"])
    stages = _read_json(run_dir / "stages.json") or {}
    evals = collect_evals(run_dir)

    out = [f"# nanochat report: {run_dir.name}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    out += outcome_lines(_read_json(run_dir / "outcome.json"))
    out += ["## Environment", "", *_environment(plan), "", "## Model", "", *_model_lines(run_dir), ""]
    out += ["## Time and cost", "",
            f"Price: {'$%.2f/h' % price_per_hour if price_per_hour is not None else 'n/a (local run, no price)'}", "",
            "| Stage | Wall time | Cost |", "|---|---|---|"]
    rows, total_s, total_cost = stage_costs(stages, price_per_hour)
    out += rows or ["| (no stage finished yet) | - | - |"]
    out += [f"| **Total** | {_duration(total_s)} | {'$%.2f' % total_cost if total_cost is not None else 'n/a'} |", ""]
    if plan.get("budget") is not None:
        out += [f"Budget: ${float(plan['budget']):.2f}", ""]
    out += ["## Metrics", "", metrics_table({s: r["metrics"] for s, r in evals.items()}), ""]
    out += weights_lines(evals)
    missing = unavailable_lines(evals)
    if missing:
        out += ["Not evaluated:", "", *missing, ""]
    out += your_data_lines(run_dir)
    out += ["Reference (nanochat d20, ~$100 on 8xH100): CORE 0.2219; after SFT ARC-Challenge 0.2807, ARC-Easy 0.3876, "
            "GSM8K 0.0455, HumanEval 0.0854, MMLU 0.3151, ChatCORE 0.0884; after RL GSM8K 0.0758.", ""]
    return "\n".join(out)


def your_data_lines(run_dir: str | os.PathLike) -> list[str]:
    """"Your data" (user_data.py): what the run read of the user's documents and conversations, how many
    passes base training made over the documents, bpb on their held-out slice (base and after SFT, also in the
    table as docs_bpb) and a few held-out questions answered by the model. Empty for a run without them."""
    run_dir = Path(run_dir)
    rec = _read_json(run_dir / "user_data.json")
    if not rec:
        return []
    info = rec.get("info") or {}
    out = ["## Your data", ""]
    docs = info.get("docs")
    if docs:
        out.append(f"- Documents: {docs['files_read']} file(s) read, {len(docs.get('skipped') or [])} skipped; "
                   f"{docs['characters']:,} characters in {docs['documents']:,} documents; "
                   f"{docs['held_out_documents']} held out for validation")
        for why in (docs.get("skipped") or [])[:10]:
            out.append(f"  - skipped {why}")
        tokens = rec.get("docs_tokens")
        if tokens:
            line = f"- Training tokens of your documents: {tokens:,} (counted with the run's tokenizer)"
            base_tokens = _base_tokens(run_dir)
            if base_tokens:
                share = rec.get("docs_share") or 1.0
                line += (f"; base training read {base_tokens * share:,.0f} tokens of them: "
                         f"{base_tokens * share / tokens:.1f} epoch(s)")
            out.append(line)
    chat = info.get("chat")
    if chat:
        out.append(f"- Conversations: {chat['conversations']} from {chat['file']} ({chat['skipped']} skipped as bad "
                   f"input, {chat['held_out']} held out)")
    if info.get("identity"):
        out.append("- Identity: the run was fine-tuned with your --identity, and chat/serve use it as the system prompt")
    evals = collect_metrics(run_dir)
    bpb = [f"{s} {evals[s]['docs_bpb']:.4f}" for s in STAGES if evals.get(s, {}).get("docs_bpb") is not None]
    if bpb:
        out.append(f"- bpb on your held-out documents: {', '.join(bpb)}")
    answers = held_out_answers(run_dir)
    if answers:
        out += ["", "Held-out questions (never trained on), answered by the model:", ""]
        for a in answers:
            out += [f"- **{a['source']}** Q: {a['question']}", f"  - expected: {a['expected']}",
                    f"  - model: {a['answer'] or '(empty)'}"]
    return out + [""]


def held_out_answers(run_dir: str | os.PathLike) -> list[dict]:
    for stage in ("rl", "sft", "mid"):
        rec = _read_json(Path(run_dir) / "eval" / f"{stage}.json") or {}
        if rec.get("held_out_answers"):
            return rec["held_out_answers"]
    return []


def _base_tokens(run_dir: Path) -> int | None:
    from nanochat_core.gpt import checkpoint   # lazy: the CLI imports this module, and must not load torch
    ckpt = checkpoint.find_latest(run_dir / "base", hashes=False, weights_only=True) if (run_dir / "base").is_dir() else None
    if ckpt is None:
        return None
    meta = checkpoint.read_meta(ckpt)
    batch = (meta.get("plan") or {}).get("total_batch_size")
    return meta["step"] * batch if batch else None


def write_report(run_dir: str | os.PathLike, price_per_hour: float | None = None) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NanochatError(f"{run_dir} is not a run directory")
    path = run_dir / "report.md"
    atomic_write_text(path, build_report(run_dir, price_per_hour))
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.evaluation.report", description="write run_dir/report.md")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--price-per-hour", type=float, default=None, help="USD per hour (default: from plan.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    a = p.parse_args(argv)
    if a.price_per_hour is not None and a.price_per_hour < 0:
        raise NanochatError("--price-per-hour must be >= 0")
    path = write_report(a.run_dir, a.price_per_hour)
    if a.json:
        print(json.dumps(collect_metrics(a.run_dir), indent=2, sort_keys=True))
    else:
        print(metrics_table(collect_metrics(a.run_dir)))
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
