"""
CORE: the DCLM paper's 22-task in-context-learning suite, the base model's headline number.

Each task is one of three few-shot formats, scored without sampling:
- multiple_choice: the same context continued by each choice; the choice whose continuation tokens
  have the lowest mean loss is the model's answer.
- schema: several contexts continued by the same text (e.g. Winograd: which referent makes the rest
  likely); the context under which the shared continuation has the lowest mean loss wins.
- language_modeling: context + continuation; correct only if greedy (argmax) prediction reproduces
  every continuation token.
Few-shot examples are drawn per item with a fixed seed (1234 + item index), excluding the item itself,
and joined with blank lines. Per-task accuracy is centred against the task's random baseline
(0 = chance, 1 = perfect) and CORE is the mean of the centred accuracies.

The data is DCLM's eval bundle (~162 MB zip: core.yaml, eval_meta_data.csv, eval_data/*.jsonl),
downloaded once into $NANOCHAT_HOME/eval_bundle under a file lock.
"""
from __future__ import annotations

import csv
import json
import os
import random
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanochat_core.common import NanochatError, nanochat_home
from nanochat_core.tasks.common import file_lock
import httpx
import yaml
import torch.distributed as dist

EVAL_BUNDLE_URL = os.environ.get("NANOCHAT_EVAL_BUNDLE_URL",
                                 "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip")


@dataclass
class CoreTask:
    label: str
    task_type: str            # "multiple_choice" | "schema" | "language_modeling"
    num_fewshot: int
    delimiter: str
    random_baseline: float    # percent, as in eval_meta_data.csv
    data: list[dict[str, Any]] = field(default_factory=list)


# -----------------------------------------------------------------------------
# The bundle

def eval_bundle_dir() -> Path:
    return nanochat_home() / "eval_bundle"


def ensure_eval_bundle(url: str = EVAL_BUNDLE_URL) -> Path:
    """The unpacked bundle directory, downloading it the first time (one process at a time)."""
    dest = eval_bundle_dir()
    if (dest / "core.yaml").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock("eval_bundle"):
        if (dest / "core.yaml").exists():  # another rank finished while we waited
            return dest
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".eval_bundle.") as tmp:
            zpath = Path(tmp) / "bundle.zip"
            try:
                with httpx.stream("GET", url, follow_redirects=True, timeout=60) as r:
                    r.raise_for_status()
                    with open(zpath, "wb") as f:
                        for chunk in r.iter_bytes(1 << 20):
                            f.write(chunk)
            except httpx.HTTPError as e:
                raise NanochatError(f"CORE is unavailable: could not download the eval bundle from {url} ({e}); "
                                    "connect to the network or set NANOCHAT_EVAL_BUNDLE_URL") from e
            with zipfile.ZipFile(zpath) as z:
                z.extractall(tmp)
            found = next((p.parent for p in Path(tmp).rglob("core.yaml")), None)
            if found is None:
                raise NanochatError(f"CORE is unavailable: the archive at {url} has no core.yaml")
            os.replace(found, dest)  # same filesystem: the directory appears in one step
    return dest


def load_core_tasks(bundle: Path, max_per_task: int = 0) -> list[CoreTask]:
    """Tasks in core.yaml order with their data, shuffled once with a fixed seed so that
    --max-per-task takes the same representative subset every time."""
    config = yaml.safe_load((bundle / "core.yaml").read_text())
    with open(bundle / "eval_meta_data.csv", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for t in config["icl_tasks"]:
        shots = t["num_fewshot"]
        data_path = bundle / "eval_data" / t["dataset_uri"]
        data = [json.loads(line) for line in data_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        if t["label"] not in baselines:
            raise NanochatError(f"eval_meta_data.csv has no random baseline for {t['label']}")
        tasks.append(CoreTask(label=t["label"], task_type=t["icl_task_type"],
                              num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                              delimiter=t.get("continuation_delimiter", " "),
                              random_baseline=baselines[t["label"]], data=data))
    return tasks


# -----------------------------------------------------------------------------
# Prompts (text), then token positions of the part being scored

def render_prompts(item: dict[str, Any], task_type: str, delim: str, shots: list[dict[str, Any]]) -> list[str]:
    """multiple_choice / schema: one prompt per option; language_modeling: [without, with] continuation."""
    if task_type == "multiple_choice":
        prefix = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{delim}{c}" for c in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        prefix = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
        # strip the prompt without the continuation: trailing spaces would merge into the next token
        # when the continuation follows, and the "without" tokens would no longer be a prefix
        without = f"{prefix}{item['context'].strip()}{delim}"
        return [without.strip(), f"{without}{item['continuation']}"]
    raise NanochatError(f"unknown CORE task type {task_type!r}")


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) shared by all sequences."""
    n = 0
    for column in zip(*(reversed(s) if from_end else s for s in seqs)):
        if any(x != column[0] for x in column):
            break
        n += 1
    return n


def score_spans(tokenizer, prompts: list[str], task_type: str) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids per prompt (BOS first) and the [start, end) span whose tokens are scored."""
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":   # shared context, different continuations
        start = common_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":            # different contexts, shared continuation
        n = common_length(tokens, from_end=True)
        return tokens, [len(t) - n for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens
    if len(without) >= len(with_) or with_[:len(without)] != without:
        raise NanochatError("language_modeling prompt: the context tokens are not a prefix of context+continuation")
    return [with_], [len(without)], [len(with_)]


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def evaluate_item(model, tokenizer, task: CoreTask, idx: int, device: Any, max_seq_len: int | None = None) -> bool:
    item = task.data[idx]
    shots = []
    if task.num_fewshot > 0:
        rng = random.Random(1234 + idx)
        others = [i for i in range(len(task.data)) if i != idx]
        shots = [task.data[i] for i in rng.sample(others, min(task.num_fewshot, len(others)))]
    prompts = render_prompts(item, task.task_type, task.delimiter, shots)
    tokens, starts, ends = score_spans(tokenizer, prompts, task.task_type)
    if max_seq_len:  # keep the end (the part being scored), drop the oldest few-shot context
        crop = [max(0, len(t) - max_seq_len) for t in tokens]
        tokens = [t[c:] for t, c in zip(tokens, crop)]
        starts = [max(1, s - c) for s, c in zip(starts, crop)]
        ends = [e - c for e, c in zip(ends, crop)]
    width = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), width), tokenizer.get_bos_token_id(), dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()
    # position p predicts token p+1: the span [s, e) is predicted by positions [s-1, e-1)
    if task.task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1:e - 1].argmax(-1), ids[0, s:e]))
    mean_losses = [F.cross_entropy(logits[i, s - 1:e - 1], ids[i, s:e]).item()
                   for i, (s, e) in enumerate(zip(starts, ends))]
    pred = min(range(len(mean_losses)), key=mean_losses.__getitem__)
    return pred == item["gold"]


def _count_dtype(device: Any):
    return torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64


def evaluate_task(model, tokenizer, task: CoreTask, device: Any, rank: int = 0, world_size: int = 1,
                  max_seq_len: int | None = None) -> float:
    """Accuracy over the task's data; items are strided across ranks and the counts summed."""
    correct = torch.zeros(len(task.data), dtype=_count_dtype(device), device=device)
    for idx in range(rank, len(task.data), world_size):
        correct[idx] = float(evaluate_item(model, tokenizer, task, idx, device, max_seq_len))
    if world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item() if len(task.data) else 0.0


def centered_accuracy(accuracy: float, random_baseline_percent: float) -> float:
    """0 at chance, 1 at perfect: (acc - b) / (1 - b) with b the random baseline as a fraction."""
    b = 0.01 * random_baseline_percent
    return (accuracy - b) / (1.0 - b)


def evaluate_core(model, tokenizer, device: Any, tasks: list[CoreTask], rank: int = 0, world_size: int = 1,
                  max_seq_len: int | None = None, log=None) -> dict[str, Any]:
    """{"accuracy": {label: acc}, "centered": {label: c}, "CORE": mean of centred accuracies}."""
    accuracy, centered = {}, {}
    for task in tasks:
        acc = evaluate_task(model, tokenizer, task, device, rank, world_size, max_seq_len)
        accuracy[task.label] = acc
        centered[task.label] = centered_accuracy(acc, task.random_baseline)
        if log:
            log(f"CORE {task.label:<36} acc {acc:.4f}  centred {centered[task.label]:+.4f}  (n={len(task.data)})")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"accuracy": accuracy, "centered": centered, "CORE": core}
