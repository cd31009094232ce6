"""
Bringing a run home: a plain copy for a run on this machine, else rsync (resumable: --partial keeps
half-copied files, a re-run only sends what is missing or changed), followed by verification against MANIFEST.sha256, the sha256sum-format list the
pipeline writes on the node when it finishes. A file that does not match is reported by name and the
command fails: a checkpoint that silently differs from what was trained is worse than none. Manifest
entries are confined to the run directory: an absolute path, a `..` or a symlink that leads outside is
refused, never hashed (the manifest comes from a remote machine).

Host keys: SkyPilot's own ssh config for a cluster (~/.sky/generated/ssh/<cluster>, included from
~/.ssh/config, written by `sky status`) gives host, user, key, port and proxy, but turns host-key checking
off (StrictHostKeyChecking no, known-hosts files /dev/null): it trusts any machine at that address. We
keep everything else from it and override the three host-key options on the command line, which take
precedence over config files: trust on first use, pinned per cluster. The first pull from a newly
launched cluster records its key in $NANOCHAT_HOME/known_hosts/<cluster>-<launch time> under the alias
nanochat-<cluster>; every later pull from that cluster must present the same key, whatever its IP. A
cluster launched again under the same name gets a new file (its launch time differs).
"""
from __future__ import annotations

import re
import shlex
import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

from nanochat_core.common import NanochatError, nanochat_home, sha256_file
from nanochat_cli import state

MANIFEST = "MANIFEST.sha256"
# What a run needs at home: checkpoints, tokenizer, evals, report, plan; optimizer shards stay behind by
# default (they are only needed to resume training, and are 2-3x the model's size).
EXCLUDES = ["optim_rank*.pt", ".logpos", ".job.json", ".*.tmp", ".lock", ".pipeline.lock"]


def rsync(src: str, dest: Path, ssh: bool = False) -> None:
    if shutil.which("rsync") is None:
        raise NanochatError("rsync is not installed: install it (e.g. `apt-get install rsync` or "
                            "`brew install rsync`) and run `nanochat pull` again")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["rsync", "-a", "--partial", "--human-readable", "--info=progress2"]
    for pattern in EXCLUDES:
        cmd += ["--exclude", pattern]
    if ssh:
        cmd += ["-e", ssh_command(src.partition(":")[0])]
    cmd += [src.rstrip("/") + "/", str(dest) + "/"]
    # rsync's own one-line progress (bytes, rate, ETA) when a person is watching; silent otherwise.
    show = sys.stdout.isatty()
    proc = subprocess.run(cmd, stdout=None if show else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise NanochatError(f"rsync from {src} failed (exit {proc.returncode}): {last}; run `nanochat pull` "
                            "again to resume where it stopped")


def known_hosts_file(cluster: str) -> Path:
    """Where this cluster's host key is pinned: one file per launch of the cluster (see the module doc)."""
    rec = state.get_cluster(cluster) or {}
    launched = int(rec.get("launched_at") or 0)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", cluster)
    return nanochat_home() / "known_hosts" / f"{safe}-{launched}"


def ssh_command(cluster: str) -> str:
    """The ssh command rsync uses to reach `cluster`: SkyPilot's config, our host-key checking."""
    pinned = known_hosts_file(cluster)
    pinned.parent.mkdir(parents=True, exist_ok=True)
    return shlex.join(["ssh", "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={pinned}",
                       "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlias=nanochat-{cluster}",
                       "-o", "ConnectTimeout=20"])


def copy_local(src: Path, dest: Path) -> int:
    """A run on this machine comes home by a plain copy - no rsync needed. Same contract as rsync: the
    excluded patterns match a file or folder name at any depth; a file whose size and mtime already match is
    skipped (a re-run only copies what is missing or changed); each file is written to a temp name and renamed,
    so an interrupted copy never leaves a half-written file under its real name. Returns files copied."""
    src = Path(src)

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pat) for pat in EXCLUDES)
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
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not rel:
            raise NanochatError(f"{path} is not in sha256sum format (line {n}: {line[:80]!r})")
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or "\\" in rel or rel.startswith("~"):
            raise NanochatError(f"{path} line {n} names a file outside the run directory ({rel[:80]!r}): the "
                                "manifest is damaged or not from nanochat; nothing was verified")
        entries.append((digest, rel))
    return entries


def verify(run_dir: Path) -> int:
    """Check every manifest entry in run_dir but the optimizer shards (EXCLUDES); returns how many were verified."""
    manifest = run_dir / MANIFEST
    if not manifest.exists():
        raise NanochatError(f"{manifest} is missing: the run has not finished (the pipeline writes it at the "
                            "end); wait for `nanochat status` to say SUCCEEDED, then pull again")
    bad, checked = [], 0
    root = run_dir.resolve()
    for digest, rel in read_manifest(manifest):
        if Path(rel).match("optim_rank*.pt"):
            continue
        f = run_dir / rel
        if not f.resolve().is_relative_to(root):  # a symlink in the pulled tree that leads out of it
            raise NanochatError(f"{rel} in {run_dir} leads outside the run directory (a symlink to "
                                f"{f.resolve()}): remove it and pull again; nothing was verified")
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
    from nanochat_cli.backends import bucket   # lazy: only the commands that need it load it
    bucket.sync(src, dest, EXCLUDES)
