"""MMLU: 57 subjects of four-way multiple choice. Evaluated on "all"/test; the auxiliary_train subset
(~100K questions from other MC datasets) teaches the answer-with-a-letter format during SFT/midtraining."""
from __future__ import annotations

import os
from typing import Any

from nanochat_core.common import NanochatError
from nanochat_core.tasks.common import Task, evaluate_letter, load_rows, mc_conversation


class MMLU(Task):
    name = "MMLU"
    eval_type = "categorical"

    def __init__(self, subset: str = "all", split: str = "test",
                 data_files: str | os.PathLike | None = None, **kw: Any):
        if subset not in ("all", "auxiliary_train"):
            raise NanochatError(f"MMLU subset must be all or auxiliary_train, not {subset!r}")
        if subset == "auxiliary_train" and split != "train":
            raise NanochatError("MMLU auxiliary_train only has a train split")
        super().__init__(**kw)
        self.rows = load_rows(self.name, "cais/mmlu", subset, split, data_files)

    def get_example(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        if isinstance(row.get("train"), dict):  # auxiliary_train nests each row under a "train" key
            row = row["train"]
        return mc_conversation(row["question"], list(row["choices"]), int(row["answer"]),
                               subject=row.get("subject", ""))

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        return evaluate_letter(conversation, response)
