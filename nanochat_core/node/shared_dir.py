"""
One directory, several nodes: what a run dir on a bucket mount may and may not do, and the small helpers that
let checkpoint.py hold there.

What the mount is. `nanochat train --nodes N --bucket s3://...` mounts the bucket on every node with SkyPilot's
MOUNT_CACHED mode. SkyPilot 0.14 (sky/data/mounting_utils.py `get_mount_cached_cmd`, sky/data/storage.py
`MountCachedConfig.to_rclone_flags`) runs, on each node:

    rclone mount --vfs-cache-mode full --dir-cache-time 10s --vfs-cache-poll-interval 10s --vfs-fast-fingerprint
                 --vfs-cache-max-size 10G --vfs-write-back 1s ...

What that means for two nodes A and B sharing the run dir:
- A's write goes to A's local cache and is uploaded as ONE object after A closes the file and leaves it alone
  for the write-back delay (1 s), plus however long the upload takes (seconds to minutes for GBs). An object
  appears in the bucket whole or not at all.
- B sees it only once the upload is done AND B's cached listing of that directory expires (up to 10 s later).
  Until then B sees no file there, or the previous version of it. A sees its own writes at once - which says
  nothing about whether they have reached the bucket.
- A bucket has no directories, only key prefixes: A's mkdir is invisible to B until a file lands under it.
- A rename is a server-side copy + delete of each object A knows about; a directory rename on A moves only the
  files A lists, so what B wrote into that directory and A cannot see yet is left behind under the old name.
- A delete (unlink) is a synchronous remote call: once it returns, the object is gone from the bucket (B may
  still list it until its listing expires).

So, on several nodes: never rename a directory other nodes write into; write files under their final names;
let one commit marker (a checkpoint's meta.json) be written last, and only after the files it vouches for are
SEEN - which, seen from another node, also proves they are in the bucket; and never read another node's output
once: poll, with a bound, and fail with one line naming what never appeared.
"""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from nanochat_core.common import NanochatError

# How long to wait for another node's files. The listing cache alone is 10 s and a checkpoint upload can take
# a minute or more; it must stay below the process group's collective timeout (NCCL's default is 10 min),
# because the other ranks wait for us in a collective meanwhile. Tests shorten it with NANOCHAT_SHARED_WAIT_S.
DEFAULT_WAIT_S = 480.0
POLL_S = 1.0


def wait_s(default: float = DEFAULT_WAIT_S) -> float:
    """The bound on every wait for another node's files (env NANOCHAT_SHARED_WAIT_S overrides it)."""
    return float(os.environ.get("NANOCHAT_SHARED_WAIT_S") or default)


def spans_nodes() -> bool:
    """True when this torchrun job runs on more than one node (its ranks then share the run dir only through
    shared storage, usually a bucket mount). torchrun sets WORLD_SIZE and LOCAL_WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def missing(directory: Path, expected: dict[str, int | None]) -> list[str]:
    """The names in `expected` that this node does not see in `directory` as a file of the expected size
    (None: any size)."""
    out = []
    for name, size in sorted(expected.items()):
        try:
            st = (directory / name).stat()
        except OSError:
            out.append(name)
            continue
        if size is not None and st.st_size != size:
            out.append(name)
    return out


def wait_until_seen(directory: Path, expected: dict[str, int | None], timeout_s: float) -> list[str]:
    """Poll until every expected file is visible here with its size, for at most timeout_s. Returns what is
    still missing ([] = all seen). Never raises: the caller decides, usually after telling the other ranks."""
    end = time.monotonic() + timeout_s
    while True:
        left = missing(directory, expected)
        if not left or time.monotonic() >= end:
            return left
        time.sleep(min(POLL_S, max(0.05, end - time.monotonic())))


# -----------------------------------------------------------------------------
# Collectives (no-ops when torch.distributed is not initialised)

def dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist_active() else 0


def barrier() -> None:
    if dist_active():
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank."""
    if not dist_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's value of obj on every rank (a no-op without torch.distributed)."""
    if not dist_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_shared_dir(stage_dir: str | os.PathLike) -> None:
    """Collective. All ranks must see the same stage dir (every rank writes its optimizer shard into the
    checkpoint rank 0 commits). One node always does; several nodes only with a shared or bucket-mounted run
    dir. Checked both ways and with patience, since another node's file shows up late: every rank writes a
    probe, every rank waits to see rank 0's, rank 0 waits to see every rank's. A misconfigured multi-node run
    fails at start-up (after 3 min, or $NANOCHAT_SHARED_WAIT_S), not at its first checkpoint."""
    if not dist_active():
        return
    stage_dir, me, world = Path(stage_dir), dist.get_rank(), dist.get_world_size()
    token = broadcast(secrets.token_hex(8))
    probe = [f".shared-probe-{token}-{r:03d}" for r in range(world)]
    stage_dir.mkdir(parents=True, exist_ok=True)   # on every node: a bucket has no empty directories
    (stage_dir / probe[me]).write_text(token)
    t0 = time.monotonic()
    unseen = wait_until_seen(stage_dir, dict.fromkeys(probe if me == 0 else probe[:1]), wait_s(180.0))
    blind = [r for r, u in enumerate(all_gather(unseen)) if u]
    (stage_dir / probe[me]).unlink(missing_ok=True)
    if blind:
        raise NanochatError(f"{stage_dir} is not shared by all nodes (after {time.monotonic() - t0:.0f} s, ranks "
                            f"{', '.join(map(str, blind[:8]))} still could not see the other ranks' files): multi-node "
                            "training needs the run dir on shared storage (e.g. a bucket mount)")
