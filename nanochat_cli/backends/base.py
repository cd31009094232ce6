"""
Where a run's job runs. Two backends keep one contract, `Backend` below, so the commands (commands/run.py, commands/manage.py)
call it without asking which one they hold:

  LocalBackend (backends/local.py)  this machine: the pipeline as a supervised subprocess, free
  SkyBackend   (backends/skypilot.py)    a SkyPilot cluster, or a managed job for spot runs; the only module that
                                   imports sky, loaded on first use

A log cursor is opaque to everyone but its backend: tail() yields it with every line and takes it back to go
on after that line (a byte offset in the local log, a line count of SkyPilot's replayed log). launch() returns
the cursor at which the new job's output starts. state.save_log_cursor() keeps it with the backend's name, so a
cursor is never handed to the other backend; None means "from the start".
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Iterator, Protocol

from nanochat_core.common import NanochatError


class Backend(Protocol):
    name: str   # "local" | "sky": what cluster records and job records call it

    def provision(self, cluster: dict) -> None:
        """Make the cluster exist (nanochat up); nothing to do for this machine."""

    def launch(self, cluster: dict, rd: Path, args: list[str], spec_file: Path | None = None,
               dryrun: bool = False) -> dict:
        """Start the pipeline with `args` for run dir `rd`, its money read from the run spec `spec_file` (the
        one channel for budget and deadlines); the job record (also in rd/.job.json), whose "cursor" is where
        this job's log starts."""

    def job_state(self, cluster: dict, rd: Path) -> str | None:
        """RUNNING, SUCCEEDED, FAILED, ... (SkyPilot's names), UNKNOWN, or None without a job."""

    def tail(self, cluster: dict, rd: Path, cursor: Any, follow: bool = True) -> Iterator[tuple[str, Any]]:
        """(line, cursor after it) from `cursor` on; follows the job until it ends unless follow=False."""

    def cluster_state(self, cluster: dict) -> str:
        """UP, STOPPED, INIT or DOWN."""

    def pull(self, cluster: dict, rd: Path, dest: Path) -> int:
        """Bring the run's results to `dest` and verify them against the manifest; files verified."""

    def down(self, cluster: dict) -> list[str]:
        """Stop the job(s) and the spending; what was done, one line each."""

    def final_cost(self, cluster: dict) -> float | None:
        """What the cluster cost in all, as the provider's records say (None if they do not)."""


def start_of(cursor: Any) -> int:
    """Both backends' cursors are non-negative ints; anything else (None, a damaged .logpos) means the start."""
    return cursor if isinstance(cursor, int) and cursor > 0 else 0


# The torch the README's install commands pin (a CPU machine gets the CPU build; a GPU user's CUDA build of the
# same version already satisfies it, so it is not replaced).
TORCH_PIN = "torch==2.13.0"


def install_hint(extra: str) -> str:
    """The command that adds an extra (cloud, tasks, dev) to the Python running nanochat, from this checkout,
    pinned like the README's. nanochat is installed from its repository, not from the package index: a
    package named "nanochat" there is another project, so `pip install 'nanochat[cloud]'` is never the
    answer."""
    root = Path(__file__).resolve().parents[2]
    cmd = f"pip install -c constraints.txt {TORCH_PIN} -e '.[{extra}]'"
    if (root / "pyproject.toml").exists() and (root / "constraints.txt").exists():
        return f"cd {shlex.quote(str(root))} && {shlex.quote(sys.executable)} -m {cmd}"
    return f"in your nanochat checkout: {cmd}"   # installed without its checkout (e.g. a built wheel)


def sky_backend():
    """The SkyPilot adapter module, imported on first use (SkyPilot is the optional `cloud` extra)."""
    try:
        from nanochat_cli.backends import skypilot as module
    except ImportError as e:
        raise NanochatError(f"SkyPilot is not installed ({e.name or e}): `{install_hint('cloud')}` adds it for "
                            "cloud commands, or use --local") from None
    return module


def backend_for(cluster: dict) -> Backend:
    if cluster.get("backend") == "local":
        from nanochat_cli.backends.local import LocalBackend   # lazy: breaks an import cycle
        return LocalBackend()
    return sky_backend().SkyBackend()
