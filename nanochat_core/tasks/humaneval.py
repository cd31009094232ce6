"""HumanEval: 164 Python functions to complete from a signature and docstring; a completion passes if
the task's unit tests run clean in the sandbox (nanochat_core.execution)."""
from __future__ import annotations

import os
import re
from typing import Any

from nanochat_core.execution import run_sandboxed
from nanochat_core.tasks.common import Task, load_rows

# What HumanEval solutions may take for granted without importing it themselves.
_PRELUDE = "import math\nimport re\nimport sys\nimport string\nimport itertools\nimport collections\n" \
           "import heapq\nimport functools\nfrom typing import *\n\n"
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(response: str) -> str:
    """The code in a response: the first fenced block if there is one, else the whole text."""
    m = _FENCE.search(response)
    return (m.group(1) if m else response).strip("\n")


class HumanEval(Task):
    name = "HumanEval"
    eval_type = "generative"

    def __init__(self, data_files: str | os.PathLike | None = None, timeout: float = 5.0, **kw: Any):
        super().__init__(**kw)
        self.rows = load_rows(self.name, "openai/openai_humaneval", None, "test", data_files)
        self.timeout = timeout

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        solution = row["prompt"] + row["canonical_solution"]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": f"```python\n{solution.strip()}\n```"}],
                "entry_point": row["entry_point"], "test": row["test"], "prompt": row["prompt"]}

    def build_program(self, conversation: dict[str, Any], response: str) -> str:
        code = extract_code(response)
        # a model that only writes the body is given the signature back
        if f"def {conversation['entry_point']}" not in code:
            code = conversation["prompt"] + code
        return f"{_PRELUDE}{code}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        return run_sandboxed(self.build_program(conversation, response), timeout=self.timeout).passed
