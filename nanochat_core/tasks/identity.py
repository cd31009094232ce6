"""Conversations from a JSONL file we ship or the user writes: one {"messages": [...]} per line.
Identity turns ("who are you?") live in nanochat_core/data/identity.jsonl; the tiny local chat set
(identity + arithmetic + spelling, see data/build_chat_local.py) in data/chat_local.jsonl."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nanochat_core.common import NanochatError
from nanochat_core.tasks.common import Task
from nanochat_core.data.user_data import without_shipped_identity

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class JSONLChat(Task):
    name = "JSONLChat"

    def __init__(self, path: str | os.PathLike, name: str | None = None, **kw: Any):
        self.name = name or Path(path).stem
        super().__init__(**kw)
        path = Path(path)
        if not path.exists():
            raise NanochatError(f"{self.name} is unavailable: {path} does not exist")
        self.rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanochatError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
                raise NanochatError(f'{path}:{n}: expected {{"messages": [...]}} ending with an assistant turn')
            self.rows.append(row)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        raise NanochatError(f"{self.name} is training data only: it has no answer checking")


class Identity(JSONLChat):
    def __init__(self, **kw: Any):
        super().__init__(DATA_DIR / "identity.jsonl", name="Identity", **kw)


class ChatLocal(JSONLChat):
    def __init__(self, **kw: Any):
        super().__init__(DATA_DIR / "chat_local.jsonl", name="ChatLocal", **kw)


class Conversations(Task):
    """Conversations already in memory (the user's, checked by user_data.py, or identity ones made from
    --identity): training data only."""

    def __init__(self, rows: list[dict[str, Any]], name: str = "Conversations", **kw: Any):
        self.name = name
        super().__init__(**kw)
        self.rows = rows

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        raise NanochatError(f"{self.name} is training data only: it has no answer checking")


def shipped_chat(custom_identity: bool = False) -> Task:
    """The shipped local chat set; with a custom identity, without its answers that name 'nanochat'."""
    local = ChatLocal()
    if not custom_identity:
        return local
    return Conversations(without_shipped_identity(local.rows), "ChatLocal")
