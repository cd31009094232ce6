"""
Small shared utilities used by every stage: where files live, atomic writes, the structured
progress events the CLI reads, distributed/device setup, and a few hardware facts.

Everything here is dependency-light on purpose: torch is imported lazily so that tools which only
need paths or events (the CLI's log reader) stay fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
import random

# -----------------------------------------------------------------------------
# Paths

def nanochat_home() -> Path:
    """Root of everything nanochat keeps on disk (runs, data, cluster records)."""
    return Path(os.environ.get("NANOCHAT_HOME") or Path.home() / ".cache" / "nanochat").expanduser()


def runs_dir() -> Path:
    return nanochat_home() / "runs"


# The stages that leave a model, most trained first. A run dir's model is that of the first one it has;
# the run with a trained model is one that has any of them.
TRAINED_STAGES = ("rl", "sft", "mid", "base")


def list_runs() -> list[Path]:
    """Run directories under runs_dir(), most recently active first: a run's own mtime, or that of the
    files that move while it runs or is followed (the CLI's .job.json, the log, the manifest, stages.json)."""
    def active(p: Path) -> float:
        return max([p.stat().st_mtime] + [(p / f).stat().st_mtime for f in
                                          (".job.json", "pipeline.log", "MANIFEST.sha256", "stages.json")
                                          if (p / f).exists()])
    root = runs_dir()
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    return sorted(runs, key=active, reverse=True)


def latest_trained_run() -> Path | None:
    """The one rule for "the latest trained model" (chat, serve, eval, export, by hand or through the CLI):
    the most recently active run that has a trained stage, or None."""
    return next((rd for rd in list_runs() if any((rd / s).is_dir() for s in TRAINED_STAGES)), None)


def data_dir() -> Path:
    """Shared by all runs: downloaded / unpacked parquet shards live under data/<source>/."""
    return nanochat_home() / "data"


# -----------------------------------------------------------------------------
# Errors the user can act on

class NanochatError(Exception):
    """An error caused by input or environment, not a bug: printed as one line, exit code 2."""


def run_main(main: Callable[[], Any]) -> None:
    """Entry-point wrapper for `python -m nanochat_core.<stage>`: one-line errors, no tracebacks
    for user errors, exit code 130 on Ctrl-C (stages that checkpoint handle SIGINT themselves).
    A stage started by the pipeline stops (SIGTERM, so it saves) if the pipeline dies: see runlock.py."""
    if os.environ.get("NANOCHAT_DIE_WITH_PARENT"):
        from nanochat_core.node.runlock import watch_parent   # lazy: breaks an import cycle
        watch_parent()
    try:
        main()
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


# -----------------------------------------------------------------------------
# Atomic writes: a reader (or a crash) never sees a half-written file under its final name.

def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a hidden temp sibling, then rename it into place in one step.
    If the body raises (or the process dies) the final name is never created.
    An existing directory at `final` is replaced (moved aside first, then deleted)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` in place of `final` (which may exist: it is swapped out, then removed)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Structured progress events: one JSON object per line on stdout, behind a prefix that a log
# reader can find among ordinary output. The CLI's cost meter and progress panel are built
# from these alone, so the schema is the contract between the node and the laptop:
#   {"event": "progress", "stage": "base", "step": 10, "total_steps": 100, "loss": 3.2,
#    "tokens_per_sec": 1.2e5, "mfu": 41.0, "elapsed_s": 12.3, "time": <unix seconds>}
# Other event names: stage_start, stage_end, eval, checkpoint, resumed, sample, done, error.

EVENT_PREFIX = "@@nanochat "


def emit(event: str, /, all_ranks: bool = False, **fields: Any) -> dict:
    """Print one progress event (rank 0 only unless all_ranks). Returns the event dict."""
    record = {"event": event, "time": round(time.time(), 3), **fields}
    if all_ranks or int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(EVENT_PREFIX + json.dumps(record, default=json_default) + "\n")
        sys.stdout.flush()
        if int(os.environ.get("RANK", "0")) == 0 and tracking_enabled():
            from nanochat_core import tracking   # wandb (see tracking.py); never imported when off
            tracking.log_event(record)
    return record


def tracking_enabled() -> bool:
    """wandb tracking (tracking.py) is on with WANDB_API_KEY or NANOCHAT_WANDB=1; NANOCHAT_WANDB=0 wins. Decided
    here, so that emit() never imports tracking (let alone wandb) when it is off."""
    flag = os.environ.get("NANOCHAT_WANDB", "")
    return flag != "0" and (flag == "1" or bool(os.environ.get("WANDB_API_KEY")))


def json_default(x: Any) -> Any:
    if hasattr(x, "item"):  # torch / numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def parse_event(line: str) -> dict | None:
    """The event carried by a log line, or None for ordinary output (or a garbled event)."""
    i = line.find(EVENT_PREFIX)
    if i < 0:
        return None
    try:
        obj = json.loads(line[i + len(EVENT_PREFIX):])
    except (json.JSONDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) and "event" in obj else None


# -----------------------------------------------------------------------------
# Distributed runtime and device

def print0(*args: Any, **kwargs: Any) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def autodetect_device_type() -> str:
    import torch   # lazy: the CLI imports this module, and must not load torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class Runtime:
    ddp: bool          # launched by torchrun with more than one process
    rank: int
    local_rank: int
    world_size: int
    device: Any        # torch.device
    device_type: str   # "cuda" | "cpu" | "mps"

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_runtime(device_type: str | None = None) -> Runtime:
    """Set up torch.distributed if torchrun launched us (env RANK/WORLD_SIZE), pick the device.
    NCCL on CUDA, gloo on CPU. Multi-node rendezvous comes from torchrun's own env/flags."""
    import torch   # lazy: the CLI imports this module, and must not load torch
    import torch.distributed as dist   # lazy: the CLI imports this module, and must not load torch

    device_type = device_type or autodetect_device_type()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ddp = "RANK" in os.environ and world_size > 1
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return Runtime(ddp, rank, local_rank, world_size, device, device_type)


def cleanup_runtime() -> None:
    import torch.distributed as dist   # lazy: the CLI imports this module, and must not load torch
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    import torch   # lazy: the CLI imports this module, and must not load torch
    random.seed(seed)
    torch.manual_seed(seed)


def device_memory_gb(device: Any = None) -> float | None:
    """Total memory of the accelerator in GB, or None on CPU."""
    import torch   # lazy: the CLI imports this module, and must not load torch
    dev = torch.device(device) if device is not None else torch.device(autodetect_device_type())
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory / 1e9
    return None
