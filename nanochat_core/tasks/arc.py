"""ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge subsets."""
from __future__ import annotations

import os
from typing import Any

from nanochat_core.common import NanochatError
from nanochat_core.tasks.common import Task, evaluate_letter, load_rows, mc_conversation


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", split: str = "test",
                 data_files: str | os.PathLike | None = None, **kw: Any):
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise NanochatError(f"ARC subset must be ARC-Easy or ARC-Challenge, not {subset!r}")
        if split not in ("train", "validation", "test"):
            raise NanochatError(f"ARC split must be train, validation or test, not {split!r}")
        self.name = subset
        super().__init__(**kw)
        self.rows = load_rows(subset, "allenai/ai2_arc", subset, split, data_files)

    def get_example(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        # a few ARC questions use 1-4 instead of A-D: answer by position either way
        return mc_conversation(row["question"], texts, labels.index(row["answerKey"]))

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        return evaluate_letter(conversation, response)
