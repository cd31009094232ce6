"""The whole "make it yours" path for real, on this machine: `nanochat train --local --data DIR --chat-data FILE
--identity TEXT` (tokenizer on your documents -> base on them -> SFT with your conversations and identity ->
eval -> report), then `nanochat chat --prompt "who are you?"` answers with the given name. The command is the
one a user types, with the local preset's default amount of training (~4 minutes on 2 idle cores): the toy model
learns its name because that preset lets the identity conversations dominate SFT (70% of it) and, with your
data, fine-tunes 3x as many steps as without (180). Measured: with --steps 8 (24 SFT steps) it says
"I am am a, the assistant"; with --steps 30 (90 SFT steps) and the default it says "I am Ada, the support"."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NANOCHAT = str(Path(sys.executable).parent / "nanochat")


def make_inputs(root: Path):
    docs = root / "my_docs"
    (docs / "manuals").mkdir(parents=True)
    for i in range(12):
        (docs / "manuals" / f"m{i}.md").write_text(
            f"# Widget manual {i}\n\n" + "Acme widgets are blue. Turn the dial left to start the widget. " * 40)
    (docs / "tickets.jsonl").write_text(
        "".join(json.dumps({"text": f"Ticket {i}: the customer turned the dial and the widget started."}) + "\n"
                for i in range(40)))
    (docs / "photo.jpg").write_bytes(b"\xff\xd8\xff")              # skipped, with the reason in the summary
    chat = root / "chats.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"How do I start widget {i}?"},
        {"role": "assistant", "content": "Turn the dial left."}]}) + "\n" for i in range(20)))
    return docs, chat


@pytest.mark.slow
def test_train_on_your_data_then_the_model_says_its_name(tmp_path):
    docs, chat = make_inputs(tmp_path)
    env = dict(os.environ)
    r = subprocess.run([NANOCHAT, "train", "--local", "--data", str(docs), "--chat-data", str(chat),
                        "--identity", "You are Ada, the support assistant of Acme."],
                       capture_output=True, text=True, env=env, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "your documents: 13 file(s) read, 1 skipped" in r.stderr
    assert "your conversations: 20 read, 0 skipped, 2 held out" in r.stderr
    assert "your data: verified" in r.stdout and "training tokens (counted with the trained tokenizer)" in r.stdout
    rd = Path(env["NANOCHAT_HOME"]) / "runs" / "local"
    report = (rd / "report.md").read_text()
    assert "## Your data" in report and "photo.jpg: not a document format" in report
    assert "bpb on your held-out documents: BASE" in report and "SFT" in report.split("bpb on your held-out")[1]
    assert "Held-out questions (never trained on)" in report and "How do I start widget" in report
    assert "| docs_bpb" in report
    r = subprocess.run([NANOCHAT, "chat", "--prompt", "who are you?", "--temperature", "0", "--max-tokens", "24"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert "Ada" in r.stdout, r.stdout
