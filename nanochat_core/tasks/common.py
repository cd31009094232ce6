"""
What every task shares: a Task is an indexable list of conversations (optionally sliced), plus the
rule that checks an assistant's answer. TaskMixture interleaves several tasks for SFT/midtraining.

Two kinds of evaluation, as in nanochat:
- "categorical": multiple choice; evaluation/runners.py scores it by restricting the next-token logits to the
  answer letters (no sampling, so even a tiny model gets a meaningful number).
- "generative": the model writes a full answer (GSM8K, HumanEval, spelling) and `evaluate` checks it.

Hub datasets are loaded through `load_rows`: cached under HF_HOME, one download per machine (a file
lock keeps concurrent ranks from fetching the same files twice), and a one-line NanochatError naming
the task when the data cannot be had (no network and no cache).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
from pathlib import Path
from typing import Any

from nanochat_core.common import NanochatError

LETTERS = "ABCDEFGHIJ"


class Task:
    """Subclasses set `name` and `eval_type`, and implement get_example(i) and, unless their examples are in
    `self.rows`, num_examples(). start/stop/step take a slice of the underlying examples (e.g. the first 1000
    for a quick eval)."""

    name = "task"
    eval_type = "generative"  # or "categorical"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise NanochatError(f"{self.name}: bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range ({len(self)} examples)")
        return self.get_example(self.start + i * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        """Is `response` (the assistant's decoded answer) correct for this conversation?"""
        raise NanochatError(f"{self.name} is training data only: it has no answer checking")

    def reward(self, conversation: dict[str, Any], response: str) -> float:
        """RL reward: 1.0 for a correct answer, 0.0 otherwise (tasks may refine this)."""
        return float(self.evaluate(conversation, response))


class Generated(Task):
    """Examples made from (split, index) by a seeded generator, no download; train and test draw from
    disjoint random streams (test_seed)."""
    test_seed = 10_000_019

    def __init__(self, size: int = 1000, split: str = "train", **kw: Any):
        if split not in ("train", "test"):
            raise NanochatError(f"{self.name} split must be train or test, not {split!r}")
        super().__init__(**kw)
        self.size, self.seed_base = size, (0 if split == "train" else self.test_seed)

    def num_examples(self) -> int:
        return self.size


class TaskMixture(Task):
    """Several tasks as one, shuffled deterministically. `epochs[i]` is how many passes over task i
    go into the mixture (a fraction takes a random subset: 0.5 = half of it; 2 = every example twice),
    which is how a small set such as identity gets weight next to a large one such as SmolTalk."""

    name = "mixture"

    def __init__(self, tasks: list[Task], epochs: list[float] | None = None, seed: int = 42):
        super().__init__()
        epochs = [1.0] * len(tasks) if epochs is None else list(epochs)
        if len(epochs) != len(tasks) or any(e < 0 for e in epochs):
            raise NanochatError("TaskMixture: give one non-negative epoch count per task")
        self.tasks = tasks
        rng = random.Random(seed)
        index: list[tuple[int, int]] = []
        for ti, (task, ep) in enumerate(zip(tasks, epochs)):
            n = len(task)
            whole, frac = int(ep), ep - int(ep)
            index += [(ti, i) for _ in range(whole) for i in range(n)]
            if frac > 0:
                index += [(ti, i) for i in rng.sample(range(n), round(frac * n))]
        rng.shuffle(index)
        self.index = index

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict[str, Any]:
        ti, i = self.index[index]
        return self.tasks[ti][i]


# -----------------------------------------------------------------------------
# Rendering helpers

def render_mc(question: str, choices: list[str]) -> str:
    """A multiple-choice question as one user message; the answer is a single letter.
    The letters are plain capitals on their own line so that each is one token for any tokenizer."""
    lines = [f"Multiple choice question: {question.strip()}", ""]
    lines += [f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices)]
    lines += ["", "Answer with the letter of the correct choice only."]
    return "\n".join(lines)


def mc_conversation(question: str, choices: list[str], answer: int, **extra: Any) -> dict[str, Any]:
    if not 0 <= answer < len(choices) <= len(LETTERS):
        raise NanochatError(f"multiple choice answer {answer} out of range for {len(choices)} choices")
    letters = list(LETTERS[: len(choices)])
    return {"messages": [{"role": "user", "content": render_mc(question, choices)},
                         {"role": "assistant", "content": letters[answer]}],
            "letters": letters, **extra}


def evaluate_letter(conversation: dict[str, Any], response: str) -> bool:
    """The first letter-looking token of the response against the gold letter."""
    gold = conversation["messages"][-1]["content"]
    text = response.strip().lstrip("(").upper()
    return bool(text) and text[0] == gold


# -----------------------------------------------------------------------------
# Hub data

@contextlib.contextmanager
def file_lock(key: str):
    """Exclusive lock across processes on this machine (all ranks of a node share HF_HOME)."""
    root = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".nanochat-{key.replace('/', '_')}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_rows(task: str, path: str, config: str | None, split: str,
              data_files: str | os.PathLike | None = None):
    """Rows of a dataset: len() and [i] -> dict. Arrow-backed and memory-mapped, so a 460K-conversation set
    costs no RAM until a row is read. `data_files` (a local .parquet / .jsonl / .json) replaces the
    hub download: tests and air-gapped machines use it. Errors name the task that is unavailable."""
    try:
        import datasets  # lazy: heavy, and only the post-training stages need it
    except ImportError as e:
        raise NanochatError(f"{task} is unavailable: the 'datasets' package is missing "
                            "(in the checkout: .venv/bin/pip install -c constraints.txt -e '.[tasks]')") from e
    datasets.disable_progress_bars()
    if data_files is not None:
        p = Path(data_files)
        if not p.exists():
            raise NanochatError(f"{task} is unavailable: {p} does not exist")
        kind = "parquet" if p.suffix == ".parquet" else "json"
        return datasets.load_dataset(kind, data_files=str(p), split="train")
    try:
        with file_lock(f"{path}-{config}"):
            ds = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # offline, no cache, hub down, bad split: all mean "cannot have it"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise NanochatError(f"{task} is unavailable: could not load {path}"
                            f"{'/' + config if config else ''} split {split!r} ({first}); "
                            "connect to the network once to cache it") from e
    return ds
