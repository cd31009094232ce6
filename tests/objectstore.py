"""
A simulated bucket mount for tests: one bucket directory and one mount view per node, kept in step by a
syncer thread per node with the visibility rules of SkyPilot's MOUNT_CACHED mode (rclone with a local
write-back cache; the facts are in nanochat_core/node/shared_dir.py), shrunk from seconds to fractions of one:

- a regular file written in a view is uploaded to the bucket as one whole object once it has been left
  alone for `write_back_s` (rclone: closed for --vfs-write-back); meanwhile only its own node sees it;
- a view learns what other nodes uploaded, changed or deleted only when its listing expires, every
  `dir_cache_s` (rclone: --dir-cache-time); until then it shows nothing there, or the previous version;
- directories are not objects: another node's mkdir never shows; a directory appears in a view when a file
  under it is downloaded there;
- a delete is a remote call at once (the next tick); a rename in a view is that node's local change, so it
  reaches the bucket as delete + upload of the files that node had: what another node wrote into a renamed
  directory and this node could not see yet stays behind under the old name.

No FUSE: the nodes' processes use their view directories as plain directories. Everything here is test
code; nothing in nanochat_core knows about it.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _File:
    size: int
    mtime_ns: int
    version: int = 0      # the bucket object's version this view's copy is (clean files)
    since: float = 0.0    # when this local state was first seen (dirty files: the write-back timer)


@dataclass
class _Mount:
    store: "ObjectStore"
    view: Path
    clean: dict[str, _File] = field(default_factory=dict)   # view files equal to a bucket object
    dirty: dict[str, _File] = field(default_factory=dict)   # local changes not uploaded yet
    scanned_at: float = 0.0
    refreshed_at: float = 0.0
    frozen: bool = False    # a listing that has not expired yet, for as long as a test needs it

    def local_files(self) -> dict[str, tuple[int, int]]:
        out = {}
        for dirpath, _, names in os.walk(self.view):
            for name in names:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                if p.is_file() and not p.is_symlink():
                    out[p.relative_to(self.view).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out

    def scan(self) -> None:
        """Local changes go up: uploads after the write-back delay, deletions at once."""
        now, s = time.monotonic(), self.store
        local = self.local_files()
        for key, st in local.items():
            c = self.clean.get(key)
            if c is not None and (c.size, c.mtime_ns) == st:
                continue
            d = self.dirty.get(key)
            if d is None or (d.size, d.mtime_ns) != st:
                self.dirty[key] = _File(*st, since=now)     # (re)written: the write-back timer starts again
            elif now - d.since >= s.write_back_s:
                self.upload(key, st)
        for key in [k for k in self.clean if k not in local]:
            with s.lock:   # deleted here: delete the object this node knew (not a newer one from another node)
                if s.versions.get(key) == self.clean[key].version:
                    (s.bucket / key).unlink(missing_ok=True)
                    del s.versions[key]
            del self.clean[key]
        for key in [k for k in self.dirty if k not in local]:
            del self.dirty[key]                                  # deleted before upload: nothing goes up
        self.scanned_at = now

    def upload(self, key: str, st: tuple[int, int]) -> None:
        s = self.store
        with s.lock:
            target = s.bucket / key
            target.parent.mkdir(parents=True, exist_ok=True)
            part = s.scratch / uuid.uuid4().hex
            try:
                shutil.copyfile(self.view / key, part)
            except FileNotFoundError:
                return
            os.replace(part, target)          # one whole object
            s.counter += 1
            s.versions[key] = s.counter
            version = s.counter
        try:
            after = (self.view / key).stat()
        except FileNotFoundError:
            return
        if (after.st_size, after.st_mtime_ns) == st:   # unchanged while copying: this copy is the object
            self.clean[key] = _File(*st, version=version)
            del self.dirty[key]

    def refresh(self) -> None:
        """The listing expired: take what other nodes uploaded, replaced or deleted since."""
        s = self.store
        self.refreshed_at = time.monotonic()
        with s.lock:
            bucket = dict(s.versions)
            for key, version in bucket.items():
                c = self.clean.get(key)
                if key in self.dirty or (c is not None and c.version == version):
                    continue
                p = self.view / key
                try:
                    st = p.stat()
                    if c is None or (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
                        continue   # a local file the next scan will upload: the local version wins
                except FileNotFoundError:
                    if c is not None:
                        continue   # deleted here, the next scan deletes the object
                p.parent.mkdir(parents=True, exist_ok=True)
                part = s.scratch / uuid.uuid4().hex
                shutil.copyfile(s.bucket / key, part)
                os.replace(part, p)
                st = p.stat()
                self.clean[key] = _File(st.st_size, st.st_mtime_ns, version=version)
        for key in [k for k in self.clean if k not in bucket]:
            p, c = self.view / key, self.clean[key]
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if (st.st_size, st.st_mtime_ns) == (c.size, c.mtime_ns):   # deleted by another node
                p.unlink(missing_ok=True)
                del self.clean[key]
                _remove_empty_parents(p.parent, self.view)


def _remove_empty_parents(d: Path, root: Path) -> None:
    """A prefix with no objects is no directory (rmdir refuses a directory that is not empty)."""
    while d != root:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


class ObjectStore:
    """`with ObjectStore(tmp_path, nodes=2) as store:` - store.view(i) is node i's mount point."""

    def __init__(self, root: Path, nodes: int = 2, write_back_s: float = 0.5, dir_cache_s: float = 1.0,
                 tick_s: float = 0.05):
        self.bucket, self.scratch = root / "bucket", root / "scratch"
        self.write_back_s, self.dir_cache_s, self.tick_s = write_back_s, dir_cache_s, tick_s
        self.lock = threading.Lock()
        self.versions: dict[str, int] = {}   # bucket key -> version of the object there
        self.counter = 0
        self.mounts = [_Mount(self, root / f"node{i}") for i in range(nodes)]
        for d in [self.bucket, self.scratch] + [m.view for m in self.mounts]:
            d.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(m, i), daemon=True)
                         for i, m in enumerate(self.mounts)]

    def view(self, node: int) -> Path:
        return self.mounts[node].view

    def freeze(self, node: int, frozen: bool = True) -> None:
        """Node `node` keeps its current listing (sees no other node's change) until freeze(node, False)."""
        self.mounts[node].frozen = frozen

    def __enter__(self) -> "ObjectStore":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _run(self, m: _Mount, node: int) -> None:
        # listings expire at different moments on different nodes
        next_refresh = time.monotonic() + self.dir_cache_s * (1 + node / max(1, len(self.mounts))) / 2
        while not self._stop.is_set():
            m.scan()
            if time.monotonic() >= next_refresh and not m.frozen:
                m.refresh()
                next_refresh = time.monotonic() + self.dir_cache_s
            time.sleep(self.tick_s)

    def settle(self, timeout_s: float = 30.0) -> None:
        """Wait until every node's writes are in the bucket and every view has refreshed after that."""
        t0 = time.monotonic()
        while True:
            if all(m.scanned_at > t0 and not m.dirty for m in self.mounts):
                break
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError("the simulated store did not settle")
            time.sleep(self.tick_s)
        t1 = time.monotonic()
        while not all(m.refreshed_at > t1 for m in self.mounts):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError("the simulated store did not settle")
            time.sleep(self.tick_s)

    def keys(self) -> list[str]:
        with self.lock:
            return sorted(self.versions)
