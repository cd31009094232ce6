"""HumanEval: 164 Python functions to complete from a signature and docstring; a completion passes if
the task's unit tests pass against it. The completion runs in one sandbox and the tests in another, which
calls the completion's function over a pipe and alone decides the verdict (nanochat_core.node.sandbox).
Without a working sandbox the task is not evaluated at all (it reports why) rather than run model code
unisolated."""
from __future__ import annotations

import os
import re
from typing import Any

from nanochat_core.common import NanochatError
from nanochat_core.node.sandbox import run_sandboxed, unavailable_reason
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
        why = unavailable_reason()
        if why is not None:  # checked before the data: the eval lists HumanEval as unavailable, with this line
            raise NanochatError(f"HumanEval not evaluated: {why}")
        self.rows = load_rows(self.name, "openai/openai_humaneval", None, "test", data_files)
        self.timeout = timeout

    def get_example(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        solution = row["prompt"] + row["canonical_solution"]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": f"```python\n{solution.strip()}\n```"}],
                "entry_point": row["entry_point"], "test": row["test"], "prompt": row["prompt"]}

    def build_solution(self, conversation: dict[str, Any], response: str) -> str:
        """The model's code, as the candidate's sandbox runs it."""
        code = extract_code(response)
        # a model that only writes the body is given the signature back
        if f"def {conversation['entry_point']}" not in code:
            code = conversation["prompt"] + code
        return f"{_PRELUDE}{code}\n"

    def build_check(self, conversation: dict[str, Any]) -> str:
        """The trusted side: the prompt (its helpers, e.g. encode_cyclic, which some tests call; a def whose
        body is only its docstring is valid Python) and the dataset's check(candidate)."""
        prompt = conversation["prompt"]
        try:
            compile(prompt, "<prompt>", "exec")
        except SyntaxError:  # not standalone Python: the tests then get only the prelude and their own code
            prompt = ""
        return f"{_PRELUDE}{prompt}\n\n{conversation['test']}\n"

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        r = run_sandboxed(self.build_solution(conversation, response), timeout=self.timeout,
                          check=self.build_check(conversation), entry_point=conversation["entry_point"])
        if r.status == "unavailable":  # the sandbox worked when the task was made; never count this as a fail
            raise NanochatError(f"HumanEval not evaluated: {r.stderr}")
        return r.passed
