"""The real pipeline through the CLI: `nanochat train --local --steps 5`, then pull and chat - opt-in
(NANOCHAT_REAL_PIPELINE=1) because on a loaded 2-core CI machine the local preset's eval stage alone takes
minutes; the job-script flow tests (test_cli_flow.py) cover the CLI's side of the same contract."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

NANOCHAT = str(Path(sys.executable).parent / "nanochat")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NANOCHAT_REAL_PIPELINE") != "1", reason="set NANOCHAT_REAL_PIPELINE=1")
def test_train_local_pull_chat(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([NANOCHAT, "train", "--local", "--steps", "5"], capture_output=True, text=True, env=env,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "== done" in r.stdout and "run 'local': SUCCEEDED" in r.stderr
    rd = Path(env["NANOCHAT_HOME"]) / "runs" / "local"
    assert (rd / "MANIFEST.sha256").exists() and (rd / "report.md").exists()
    r = subprocess.run([NANOCHAT, "pull", "--dest", str(tmp_path / "copy")], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    r = subprocess.run([NANOCHAT, "chat", "--prompt", "Hello", "--max-tokens", "8"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
