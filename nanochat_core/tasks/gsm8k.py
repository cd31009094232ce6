"""GSM8K: grade-school math word problems. The reference solutions mark each arithmetic step as
<<48/2=24>>; we render those as calculator tool calls (python part "48/2", then the tool's output "24"),
so the model learns to call the calculator instead of doing arithmetic in its head. The final answer
follows "#### " - that line is what answer checking (and the RL reward) reads."""
from __future__ import annotations

import os
import re
from typing import Any

from nanochat_core.common import NanochatError
from nanochat_core.tasks.common import Task, load_rows

_CALL = re.compile(r"<<([^>]*)>>")
_FINAL = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text: str) -> str | None:
    """The number after the last '####', commas removed, trailing '.0' dropped; None if absent."""
    found = _FINAL.findall(text)
    if not found:
        return None
    num = found[-1].replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


def render_solution(answer: str) -> list[dict[str, str]]:
    """A GSM8K reference answer -> assistant parts with calculator calls."""
    parts: list[dict[str, str]] = []
    pos = 0
    for m in _CALL.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        expr, _, result = m.group(1).rpartition("=")
        if expr:
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class GSM8K(Task):
    name = "GSM8K"
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test",
                 data_files: str | os.PathLike | None = None, **kw: Any):
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise NanochatError(f"GSM8K has subsets main/socratic and splits train/test, not {subset}/{split}")
        super().__init__(**kw)
        self.rows = load_rows(self.name, "openai/gsm8k", subset, split, data_files)

    def get_example(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": render_solution(row["answer"])}]}

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        parts = conversation["messages"][-1]["content"]
        gold = extract_answer("".join(p["text"] for p in parts if p["type"] == "text"))
        return gold is not None and extract_answer(response) == gold
