"""
Evaluation runners shared by the eval and post-training stages (chat_eval, base_eval, chat_sft, chat_rl):

- categorical tasks (ARC-Easy, ARC-Challenge, MMLU): one forward pass per question; the answer is the
  letter with the highest logit AMONG THE ANSWER LETTERS at the position after <|assistant_start|>.
  Restricting to the letters measures knowledge, not whether a small model has learnt the format.
- generative tasks (GSM8K, HumanEval, SpellingBee, Arithmetic): greedy generation with the engine (the
  calculator tool included), then the task's own answer check (HumanEval runs in the sandbox).
- ChatCORE: mean centred accuracy over the anchor's six tasks (ARC-E, ARC-C, MMLU centred against 25%
  chance; GSM8K, HumanEval, SpellingBee against 0) - reported only when all six could be evaluated.
Examples are strided across ranks and the counts summed. Tasks whose data cannot be had (no network,
nothing cached) are listed under "unavailable" instead of failing the run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nanochat_core.common import NanochatError, print0
from nanochat_core.inference.engine import decode_threads, Engine
from nanochat_core.tasks.arc import ARC
from nanochat_core.tasks.arithmetic import Arithmetic
from nanochat_core.tasks.gsm8k import GSM8K
from nanochat_core.tasks.humaneval import HumanEval
from nanochat_core.tasks.mmlu import MMLU
from nanochat_core.tasks.spelling import SpellingBee
import torch
import torch.distributed as dist
import json

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "Arithmetic"]
# The reference answers of the generated tasks are short: a model that has not learnt to stop should not
# cost the full generation limit on them.
TOKEN_CAPS = {"Arithmetic": 64, "SpellingBee": 128}
CHATCORE_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                      "SpellingBee": 0.0}


def load_task(name: str):
    """The evaluation split of a task by its report name (raises NanochatError if unavailable)."""
    makers = {"ARC-Easy": lambda: ARC("ARC-Easy", "test"), "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
              "MMLU": lambda: MMLU("all", "test"), "GSM8K": lambda: GSM8K("main", "test"),
              "HumanEval": lambda: HumanEval(), "SpellingBee": lambda: SpellingBee(256, "test"),
              "Arithmetic": lambda: Arithmetic(256, "test")}
    if name not in makers:
        raise NanochatError(f"unknown task {name!r}; choose from {', '.join(ALL_TASKS)}")
    return makers[name]()


def _subset(n: int, max_per_task: int) -> list[int]:
    return list(range(n if max_per_task <= 0 else min(n, max_per_task)))


def run_categorical(model, tokenizer, task, indices: list[int], rank: int, world: int, device, batch_size: int = 8) -> tuple[int, int]:
    """(correct, total) on this rank's share."""
    mine = indices[rank::world]
    correct = 0
    pad = tokenizer.get_bos_token_id()
    for b in range(0, len(mine), batch_size):
        convs = [task[i] for i in mine[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p)
        with torch.no_grad():
            logits = model(ids.to(device))
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            letter_ids = [tokenizer.encode(letter) for letter in conv["letters"]]
            if any(len(t) != 1 for t in letter_ids):
                raise NanochatError("answer letters must be single tokens for this tokenizer")
            scores = logits[r, len(p) - 1, [t[0] for t in letter_ids]]
            pred = conv["letters"][int(scores.argmax())]
            correct += int(task.evaluate(conv, pred))
    return correct, len(mine)


def run_generative(model, tokenizer, task, indices: list[int], rank: int, world: int, max_new_tokens: int,
                   log_first: int = 0) -> tuple[int, int]:
    with decode_threads(model.get_device()):
        return _run_generative(model, tokenizer, task, indices, rank, world, max_new_tokens, log_first)


def _run_generative(model, tokenizer, task, indices, rank, world, max_new_tokens, log_first):
    engine = Engine(model, tokenizer)
    mine = indices[rank::world]
    correct = 0
    for k, i in enumerate(mine):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        seqs, _ = engine.generate_batch(prompt, 1, max_tokens=max_new_tokens, temperature=0.0, seed=i)
        response = tokenizer.decode(seqs[0][len(prompt):])
        ok = task.evaluate(conv, response)
        correct += int(ok)
        if k < log_first:
            print0(f"  [{task.name}] {'ok ' if ok else 'bad'} {response[:160]!r}")
    return correct, len(mine)


def evaluate_tasks(model, tokenizer, names: list[str], max_per_task: int, device, rank: int = 0, world: int = 1,
                   max_new_tokens: int = 256, why: dict[str, str] | None = None) -> tuple[dict[str, float], list[str]]:
    """({task: accuracy, ..., "ChatCORE": ...}, [unavailable task names]); `why`, when given, gets each
    unavailable task's cause (the loader's one line: no network, a missing package, ...) for report.md."""
    metrics, unavailable = {}, []
    for name in names:
        t0 = time.time()
        try:
            task = load_task(name)
        except NanochatError as e:
            print0(f"{name}: unavailable ({e})")
            unavailable.append(name)
            if why is not None:
                why[name] = unavailable_cause(str(e))
            continue
        indices = _subset(len(task), max_per_task)
        if task.eval_type == "categorical":
            c, n = run_categorical(model, tokenizer, task, indices, rank, world, device)
        else:
            limit = min(max_new_tokens, TOKEN_CAPS.get(name, max_new_tokens))
            c, n = run_generative(model, tokenizer, task, indices, rank, world, limit, log_first=2)
        counts = torch.tensor([c, n], dtype=torch.float32 if torch.device(device).type == "mps" else torch.float64,
                              device=device)
        if world > 1:
            dist.all_reduce(counts)
        metrics[name] = (counts[0] / counts[1].clamp(min=1)).item()
        print0(f"{name}: {metrics[name]:.4f} ({int(counts[0])}/{int(counts[1])}, {time.time() - t0:.1f}s)")
    score = chatcore(metrics)
    if score is not None:
        metrics["ChatCORE"] = score
    return metrics, unavailable


def unavailable_cause(message: str) -> str:
    """'ARC-Easy is unavailable: the 'datasets' package is missing (...)' -> the part after the task's name."""
    head, sep, rest = message.partition(" is unavailable: ")
    return (rest if sep else message).strip()[:300]


def chatcore(metrics: dict[str, float]) -> float | None:
    """Mean centred accuracy over the ChatCORE tasks: (acc - chance) / (1 - chance), so 0 is guessing and
    1 is perfect. None unless every task was measured (a partial mean would not be comparable)."""
    if not all(k in metrics for k in CHATCORE_BASELINES):
        return None
    centred = [(metrics[k] - b) / (1 - b) for k, b in CHATCORE_BASELINES.items()]
    return sum(centred) / len(centred)


def merge_record(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """base_eval and chat_eval may both evaluate a stage: keep the other's metrics, ours win on overlap."""
    try:
        old = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, RecursionError):
        return record
    if not isinstance(old, dict):
        return record
    metrics = {**old.get("metrics", {}), **record["metrics"]}
    unavailable = sorted((set(old.get("unavailable", [])) - set(record["metrics"])) | set(record["unavailable"]))
    why = {k: v for k, v in {**old.get("why_unavailable", {}), **record.get("why_unavailable", {})}.items()
           if k in unavailable}
    return {**old, **record, "metrics": metrics, "unavailable": unavailable, "why_unavailable": why}
