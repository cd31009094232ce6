"""
Evaluate a chat model:  python -m nanochat_core.stages.chat_eval --run-dir DIR [--stage sft] [--max-per-task N]

The tasks and how each is scored live in nanochat_core/evaluation/runners.py; this stage picks the checkpoints,
runs them under torchrun (examples strided across ranks) and records the results.
Writes run_dir/eval/<stage>.json (per stage with --stage all) = {"stage", "metrics", "unavailable"} atomically.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from nanochat_core.gpt import checkpoint
from nanochat_core.common import (TRAINED_STAGES, NanochatError, atomic_write_json, cleanup_runtime, emit, init_runtime,
                                  print0, run_main)
from nanochat_core.evaluation.runners import ALL_TASKS, evaluate_tasks, merge_record
from nanochat_core.gpt.quantize import DTYPES
from nanochat_core.data import user_data
from nanochat_core.training.chat_loop import chat_reply


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.stages.chat_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--stage", default=None,
                   help="base | mid | sft | rl | all (every chat stage present); default: the most trained chat stage")
    p.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma list of tasks")
    p.add_argument("--max-per-task", type=int, default=0, help="examples per task, 0 = all")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation limit (default 256 GPU, 128 CPU)")
    p.add_argument("--held-out", type=Path, default=None, metavar="BUNDLE",
                   help="only answer the held-out questions of your conversations (user_data.py) with the latest "
                        "chat model; recorded in its eval record")
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="evaluate this checkpoint dir (or stage dir) of --stage instead of the stage's latest")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights to evaluate with (quantize.py; default: what training evaluated with: fp32 on a "
                        "CPU, bf16 on a GPU)")
    a = p.parse_args(argv)
    if a.held_out is not None:
        return answer_held_out(a)
    rt = init_runtime(a.device)
    # rank 0 looks and every rank gets its list: another node may not see the newest stage's files yet
    chat_stages = [s for s in reversed(TRAINED_STAGES) if s != "base"]   # least trained first
    present = checkpoint.broadcast([s for s in chat_stages if (a.run_dir / s).is_dir()
                                    and checkpoint.find_latest(a.run_dir / s, hashes=False, weights_only=True)]
                                   if rt.master else None)
    if a.checkpoint is not None and a.stage not in ("base", "mid", "sft", "rl"):
        raise NanochatError("--checkpoint needs --stage base, mid, sft or rl (the stage it belongs to)")
    if a.stage in (None, "all"):
        if not present:
            raise NanochatError(f"no chat checkpoint (mid, sft or rl) in {a.run_dir}: run chat_sft first")
        stages = present if a.stage == "all" else present[-1:]
    elif a.stage in TRAINED_STAGES:
        stages = [a.stage]
    else:
        raise NanochatError(f"--stage must be {', '.join(reversed(TRAINED_STAGES))} or all")
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if a.max_new_tokens is None:
        a.max_new_tokens = 256 if rt.device_type == "cuda" else 128
    for stage in stages:
        t0 = time.time()
        model, tokenizer, meta = checkpoint.load_model(a.checkpoint or a.run_dir, rt.device, stage=stage,
                                                       dtype=a.dtype)
        print0(f"chat_eval: {stage} checkpoint {meta['path']}, {meta['dtype']} weights (loaded in "
               f"{meta['load_s']:.1f} s, {meta['load_how']}), tasks {', '.join(names)}, "
               f"max per task {a.max_per_task or 'all'}")
        why: dict[str, str] = {}
        metrics, unavailable = evaluate_tasks(model, tokenizer, names, a.max_per_task, rt.device, rt.rank,
                                              rt.world_size, a.max_new_tokens, why=why)
        if rt.master:
            path = a.run_dir / "eval" / f"{stage}.json"
            record = {"stage": stage, "metrics": metrics, "unavailable": unavailable, "why_unavailable": why,
                      "checkpoint": meta["path"], "weights": meta["dtype"], "dtype_asked": a.dtype,
                      "max_per_task": a.max_per_task, "seconds": round(time.time() - t0, 1)}
            atomic_write_json(path, merge_record(path, record))
        emit("eval", stage=stage, metrics=metrics)
    cleanup_runtime()


def answer_held_out(a) -> None:
    """A few of the user's own questions the model never trained on, answered greedily (report.md shows them
    next to the answers the user wrote)."""
    bundle = user_data.load_bundle(a.held_out)
    _, held = user_data.split_held_out(user_data.conversations(bundle))
    stage = next((s for s in ("rl", "sft", "mid") if (a.run_dir / s).is_dir()), None)
    if not held or stage is None:
        print("chat_eval: no held-out conversations or no chat model; nothing to answer")
        return
    rt = init_runtime(a.device)
    model, tokenizer, meta = checkpoint.load_model(a.run_dir, rt.device, stage=stage, dtype=a.dtype)
    system = meta.get("system_prompt")
    answers = []
    for row in held:
        msgs = user_data.with_system(row, system)["messages"]
        prompt = msgs[:-1]
        question = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
        answers.append({"source": row["source"], "question": question, "expected": msgs[-1]["content"],
                        "answer": chat_reply(model, tokenizer, prompt, max_tokens=a.max_new_tokens or 96)})
        print0(f"held out {row['source']}: Q: {question!r} -> A: {answers[-1]['answer']!r}")
    path = a.run_dir / "eval" / f"{stage}.json"
    atomic_write_json(path, merge_record(path, {"stage": stage, "metrics": {}, "unavailable": [],
                                                "held_out_answers": answers}))
    cleanup_runtime()


if __name__ == "__main__":
    run_main(main)
