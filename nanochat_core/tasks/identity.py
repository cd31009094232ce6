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

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class Conversations(Task):
    """Conversations already in memory (the user's, checked by user_data.py, or identity ones made from
    --identity): training data only."""

    def __init__(self, rows: list[dict[str, Any]], name: str = "Conversations", **kw: Any):
        self.name = name
        super().__init__(**kw)
        self.rows = rows

    def get_example(self, index: int) -> dict[str, Any]:
        return self.rows[index]


class JSONLChat(Conversations):
    def __init__(self, path: str | os.PathLike, name: str | None = None, **kw: Any):
        path, name = Path(path), name or Path(path).stem
        if not path.exists():
            raise NanochatError(f"{name} is unavailable: {path} does not exist")
        rows = []
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
            rows.append(row)
        super().__init__(rows, name, **kw)


class Identity(JSONLChat):
    def __init__(self, **kw: Any):
        super().__init__(DATA_DIR / "identity.jsonl", name="Identity", **kw)


class ChatLocal(JSONLChat):
    def __init__(self, **kw: Any):
        super().__init__(DATA_DIR / "chat_local.jsonl", name="ChatLocal", **kw)


def shipped_chat(custom_identity: bool = False) -> Task:
    """The shipped local chat set; with a custom identity, without its who-are-you answers: they name 'nanochat',
    and with --identity they would teach the model two names."""
    local = ChatLocal()
    if not custom_identity:
        return local
    rows = [r for r in local.rows
            if not any(m["role"] == "assistant" and "nanochat" in str(m["content"]).lower() for m in r["messages"])]
    return Conversations(rows, "ChatLocal")
