"""
Bringing a run home: a plain copy for a run on this machine, else rsync (resumable: --partial keeps
half-copied files, a re-run only sends what is missing or changed), followed by verification against MANIFEST.sha256, the sha256sum-format list the
pipeline writes on the node when it finishes. A file that does not match is reported by name and the
command fails: a checkpoint that silently differs from what was trained is worse than none.
"""
from __future__ import annotations

import fnmatch
import os
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


def copy_local(src: Path, dest: Path, excludes: list[str] | None = None) -> int:
    """A run on this machine comes home by a plain copy - no rsync needed. Same contract as rsync: the
    excluded patterns match a file or folder name at any depth; a file whose size and mtime already match is
    skipped (a re-run only copies what is missing or changed); each file is written to a temp name and renamed,
    so an interrupted copy never leaves a half-written file under its real name. Returns files copied."""
    src, excludes = Path(src), (excludes if excludes is not None else EXCLUDES)

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pat) for pat in excludes)
    copied = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not excluded(d)]
        out_dir = dest / Path(root).relative_to(src)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            if excluded(name):
                continue
            s, d = Path(root) / name, out_dir / name
            st = s.stat()
            if d.is_file() and d.stat().st_size == st.st_size and int(d.stat().st_mtime) == int(st.st_mtime):
                continue
            tmp = out_dir / f".{name}.tmp"
            shutil.copy2(s, tmp)
            os.replace(tmp, d)
            copied += 1
    return copied


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
    """Pull a run from a bucket with that cloud's own CLI (sync: resumable, only what differs)."""
    dest.mkdir(parents=True, exist_ok=True)
    if src.startswith("s3://"):
        cmd = ["aws", "s3", "sync", src, str(dest), "--exclude", "*/optim_rank*.pt"]
    elif src.startswith("gs://"):
        cmd = ["gcloud", "storage", "rsync", "-r", "-x", r".*optim_rank.*\.pt$", src, str(dest)]
    else:
        raise NanochatError(f"pulling from '{src}' is not supported; use an s3:// or gs:// bucket")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise NanochatError(f"`{cmd[0]}` is not installed; install that cloud's CLI to pull from {src}") from None
    if proc.returncode != 0:
        raise NanochatError(f"sync from {src} failed: {(proc.stderr.strip().splitlines() or [''])[-1]}; "
                            "run `nanochat pull` again to resume")
