"""
Bringing a run home: rsync (resumable: --partial keeps half-copied files, a re-run only sends what is
missing or changed) followed by verification against MANIFEST.sha256, the sha256sum-format list the
pipeline writes on the node when it finishes. A file that does not match is reported by name and the
command fails: a checkpoint that silently differs from what was trained is worse than none.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from nanochat_core.common import NanochatError, sha256_file

MANIFEST = "MANIFEST.sha256"
# What a run needs at home: checkpoints, tokenizer, evals, report, plan; optimizer shards stay behind by
# default (they are only needed to resume training, and are 2-3x the model's size).
EXCLUDES = ["optim_rank*.pt", ".logpos", ".job.json", ".*.tmp"]


def rsync(src: str, dest: Path, excludes: list[str] | None = None, ssh: bool = False) -> None:
    if shutil.which("rsync") is None:
        raise NanochatError("rsync is not installed: install it (e.g. `apt-get install rsync` or "
                            "`brew install rsync`) and run `nanochat pull` again")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["rsync", "-a", "--partial", "--human-readable", "--info=progress2"]
    for pattern in excludes if excludes is not None else EXCLUDES:
        cmd += ["--exclude", pattern]
    if ssh:
        cmd += ["-e", "ssh -o StrictHostKeyChecking=no -o ConnectTimeout=20"]
    cmd += [src.rstrip("/") + "/", str(dest) + "/"]
    # rsync's own one-line progress (bytes, rate, ETA) when a person is watching; silent otherwise.
    show = sys.stdout.isatty()
    proc = subprocess.run(cmd, stdout=None if show else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise NanochatError(f"rsync from {src} failed (exit {proc.returncode}): {last}; run `nanochat pull` "
                            "again to resume where it stopped")


def read_manifest(path: Path) -> list[tuple[str, str]]:
    entries = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel:
            raise NanochatError(f"{path} is not in sha256sum format (line: {line[:80]!r})")
        entries.append((digest, rel))
    return entries


def verify(run_dir: Path, skip_excluded: bool = True) -> int:
    """Check every manifest entry in run_dir; returns how many files were verified."""
    manifest = run_dir / MANIFEST
    if not manifest.exists():
        raise NanochatError(f"{manifest} is missing: the run has not finished (the pipeline writes it at the "
                            "end); wait for `nanochat status` to say SUCCEEDED, then pull again")
    bad, checked = [], 0
    for digest, rel in read_manifest(manifest):
        if skip_excluded and Path(rel).match("optim_rank*.pt"):
            continue
        f = run_dir / rel
        if not f.is_file():
            bad.append(f"{rel} (missing)")
        elif sha256_file(f) != digest:
            bad.append(f"{rel} (checksum differs)")
        else:
            checked += 1
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NanochatError(f"pulled files do not match the manifest: {', '.join(bad[:3])}{more}; "
                            "run `nanochat pull` again (it resumes and re-sends what differs)")
    return checked


def bucket_sync(src: str, dest: Path) -> None:
    """Pull a run from a bucket with that cloud's Python library (bucket.py: resumable, only what is missing)."""
    from nanochat_cli import bucket
    bucket.sync(src, dest, EXCLUDES)
