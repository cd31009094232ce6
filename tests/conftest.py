"""Shared test fixtures. Tests never touch the network or the user's ~/.cache: every test gets its own
NANOCHAT_HOME / HF_HOME under a temp dir."""
import os
import shutil
import signal
import time
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a developer's WANDB_API_KEY must not send the suite's training runs to wandb (tests/test_tracking.py turns
# tracking on explicitly, offline)
os.environ["NANOCHAT_WANDB"] = "0"
# SkyPilot starts a local API server in the background (default port, its own session, outliving us) the first
# time anything asks it something with no server running. A test that reaches the real SDK by a path nobody
# faked must fail there, not leave a server behind (CI once found one at the session's end): SkyPilot's own
# switch refuses the start. tests/test_cli_skyserver.py starts its server on purpose and lifts it for its child.
os.environ["SKYPILOT_DISABLE_LOCAL_API_SERVER"] = "1"
# Every process this session starts inherits this mark (a fresh one per session, nested sessions included), so
# the session-end check below finds what the suite left running - in any session or process group, orphaned or
# not - by the mark in /proc/PID/environ, not by parentage.
SESSION_MARK = f"NANOCHAT_TEST_SESSION={uuid.uuid4().hex}"
os.environ["NANOCHAT_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


# Optional system tools a few tests drive for real, and how to get each. `@pytest.mark.needs_tool("rsync")`
# skips such a test with a one-line reason where the tool is missing - a newcomer's machine must still pass
# the README's test command - except under CI (CI=true), where a missing tool is a failure: CI installs every
# tool (.ci/run), so a skip there would mean a test silently stopped running.
TOOLS = {"rsync": "apt-get install rsync", "chromium": "apt-get install chromium",
         "bwrap": "apt-get install bubblewrap", "ssh": "apt-get install openssh-client"}


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_tool(name): needs this system tool; skipped where missing (not in CI)")


def tool_missing(name: str) -> bool:
    return shutil.which(name) is None


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_tool"):
        name = mark.args[0]
        if tool_missing(name):
            why = f"{item.name} needs {name}, which is not installed ({TOOLS.get(name, 'install it')})"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{why}; under CI=true a missing tool fails rather than skips", pytrace=False)
            pytest.skip(why)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "nanochat_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    yield


@pytest.fixture(scope="session")
def bundled_texts():
    """The first few hundred documents of the bundled corpus (the exact data path the cloud run uses)."""
    import pyarrow.parquet as pq
    import tempfile
    from pathlib import Path
    from nanochat_core.data.dataset import ensure_bundled, list_shards
    dest = Path(tempfile.mkdtemp(prefix="nanochat_bundled_"))
    ensure_bundled(dest)
    shards = list_shards(dest)
    texts = pq.read_table(shards[0], columns=["text"]).column("text").to_pylist()
    return texts[:400]


@pytest.fixture(scope="session")
def tiny_tokenizer(bundled_texts):
    """A byte-level BPE with a 512-token vocab trained on the bundled corpus: shared by model/engine tests."""
    from nanochat_core.data.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(iter(bundled_texts), vocab_size=512)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process tests use tiny models: a second intra-op thread gains nothing, and on a busy 2-core machine
    the thread pool's barriers made small ops 10-250x slower (measured: a 50-step test 65 s vs 7 s).
    Subprocesses the tests start (training stages) keep torch's default."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def leftover_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every live process other than this one that carries this session's mark."""
    me, found = os.getpid(), []
    mark = SESSION_MARK.encode()
    # multiprocessing's resource tracker, started by this process the first time something in it used
    # multiprocessing: it reads a pipe from us and ends when we do, so it is ours, not a leftover.
    from multiprocessing import resource_tracker
    own = {me, getattr(resource_tracker._resource_tracker, "_pid", None)}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) in own:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":   # exited, waiting to be reaped: gone
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found.append((int(entry), f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]))
        except OSError:   # gone meanwhile, or not ours to read
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    """The suite must leave nothing running: a process of this session still alive at its end (after a short
    wait for ones already on their way out) is killed, named, and fails the run."""
    left, end = leftover_processes(), time.monotonic() + 10
    while left and time.monotonic() < end:
        time.sleep(0.2)
        left = leftover_processes()
    if not left:
        return
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in left)
    session.config.get_terminal_writer().line(
        f"\nERROR: the test session left {len(left)} process(es) running (now killed):\n{lines}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
