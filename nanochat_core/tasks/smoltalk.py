"""SmolTalk (the small 460K-conversation version): general chat, the bulk of SFT/midtraining data."""
from __future__ import annotations

import os
from typing import Any

from nanochat_core.common import NanochatError
from nanochat_core.tasks.common import Task, load_rows


class SmolTalk(Task):
    name = "SmolTalk"

    def __init__(self, split: str = "train", data_files: str | os.PathLike | None = None, **kw: Any):
        if split not in ("train", "test"):
            raise NanochatError(f"SmolTalk split must be train or test, not {split!r}")
        super().__init__(**kw)
        self.rows = load_rows(self.name, "HuggingFaceTB/smol-smoltalk", None, split, data_files)

    def get_example(self, index: int) -> dict[str, Any]:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        # the tokenizer folds an optional leading system message into the first user turn; drop a
        # trailing user turn (nothing to learn from) so every conversation ends with the assistant
        if messages and messages[-1]["role"] == "user":
            messages = messages[:-1]
        return {"messages": messages}
