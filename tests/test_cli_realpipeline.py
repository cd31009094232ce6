"""The real pipeline through the CLI: `nanochat train --local --steps 5` (tokenizer -> base -> SFT -> eval ->
report, every stage the Quickstart runs, with short horizons), then pull and chat. About 45 s on 2 idle cores;
the job-script flow tests (test_cli_flow.py) cover preemption and dropped connections on the CLI's side."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

NANOCHAT = str(Path(sys.executable).parent / "nanochat")


@pytest.mark.slow
def test_train_local_pull_chat(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([NANOCHAT, "train", "--local", "--steps", "5"], capture_output=True, text=True, env=env,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "== done" in r.stdout and "run 'local': SUCCEEDED" in r.stderr
    rd = Path(env["NANOCHAT_HOME"]) / "runs" / "local"
    assert (rd / "MANIFEST.sha256").exists() and (rd / "report.md").exists()
    assert "sample from your model:" in r.stdout and "next: `nanochat chat`" in r.stdout
    report = (rd / "report.md").read_text()
    assert "| bpb" in report and "SpellingBee" in report  # offline evals ran; hub ones listed as unavailable
    assert {"tok", "base", "sft", "eval", "report"} <= set(__import__("json").loads((rd / "stages.json").read_text()))
    r = subprocess.run([NANOCHAT, "pull", "--dest", str(tmp_path / "copy")], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    r = subprocess.run([NANOCHAT, "chat", "--prompt", "Hello", "--max-tokens", "8"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
