"""Simple arithmetic with calculator calls, generated (no download). Part of the shipped local chat
set, and an offline generative eval: the answer follows '####', as in GSM8K."""
from __future__ import annotations

import random
from typing import Any

from nanochat_core.tasks.common import Generated
from nanochat_core.tasks.gsm8k import extract_answer

_QUESTIONS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "what's {a}{op}{b}", "Calculate {a} {op} {b} please.",
              "{a} {op} {b} = ?"]


def make_problem(rng: random.Random) -> tuple[int, str, int, int]:
    """(a, op, b, result) with an integer result: division only where it comes out even."""
    op = rng.choice("+-*/")
    if op == "/":
        b = rng.randint(2, 12)
        result = rng.randint(1, 50)
        return b * result, op, b, result
    a, b = rng.randint(0, 999 if op != "*" else 99), rng.randint(0, 999 if op != "*" else 99)
    return a, op, b, {"+": a + b, "-": a - b, "*": a * b}[op]


class Arithmetic(Generated):
    name = "Arithmetic"
    eval_type = "generative"
    test_seed = 20_000_003

    def get_example(self, index: int) -> dict[str, Any]:
        rng = random.Random(self.seed_base + index)
        a, op, b, result = make_problem(rng)
        question = rng.choice(_QUESTIONS).format(a=a, op=op, b=b)
        return {"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me use the calculator: "},
                {"type": "python", "text": f"{a}{op}{b}"},
                {"type": "python_output", "text": str(result)},
                {"type": "text", "text": f"\n{a} {op} {b} = {result}.\n\n#### {result}"},
            ]}]}

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        parts = conversation["messages"][-1]["content"]
        gold = extract_answer(parts[-1]["text"])
        return gold is not None and extract_answer(response) == gold
