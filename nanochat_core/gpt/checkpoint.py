"""
Checkpoints that survive anything: crashes, kill -9, spot preemption, a full disk mid-write.

One checkpoint is one directory, `<stage_dir>/ckpt_{step:06d}/`:
    model.safetensors      fp32 master weights (rank 0)
    optim_rank{r:03d}.pt   this rank's optimizer shard (every rank; ZeRO-style sharded state)
    meta.json              written LAST: config, step, loader + RNG states of every rank, tokenizer hash,
                           world size, the size + sha256 of every other file, and `meta_sha256`: the
                           sha256 of meta.json's own canonical text without that field (so a damaged
                           meta.json - a flipped digit in the config or a size - is caught too)
Only a complete checkpoint ever gets a meta.json: every rank writes and fsyncs its files, rank 0 gathers
their sizes + sha256, every rank waits until it SEES every file at its size, and rank 0 then writes meta.json
(atomically). On one node all of that happens in a hidden temp dir that rank 0 renames into place, so a half-
written checkpoint never has its final name. On several nodes (a bucket-mounted run dir, see shared_dir.py)
no directory rename is safe, so every rank writes under the final name and meta.json alone commits; a file
seen from a node other than its writer's is in the bucket, so meta.json never vouches for one that is not.
A step dir without meta.json is an unfinished save: find_latest skips it, rank 0 removes it after a later
commit (when nobody writes into it any more). Readers on other nodes wait until they see, whole, the
checkpoint rank 0 picked (pick_on_rank0). Pruning keeps the checkpoint just committed and the keep-1
complete ones before it; nothing else.
`find_latest` still checks every file against meta.json, because no protocol protects against a disk that
lies, a copy that was cut short, or a person poking at files: a corrupt checkpoint is reported on stderr and
the previous one is used. Every load path verifies (a checkpoint dir passed by hand included), and file names
in meta.json are confined to the checkpoint dir: only model.safetensors and optim_rankNNN.pt are accepted, so
a meta.json naming `../../etc/passwd` is refused, never read. A save that fails (a full disk) removes what it
wrote and says so in one line. All ranks must see the same directory: shared_dir.check_shared_dir, at start.
Inference in bf16/int8 loads a copy cached next to the weights (`model.<fmt>.safetensors`, load_inference_state)
instead of the fp32 file, and then hashes that copy, not the fp32 file it does not read: the copy names the
sha256 of the weights it was made from (meta.json's), the fp32 file's size and mtime then, and its own sha256,
recomputed at every start (open_cached). Any mismatch and the fp32 file is hashed and the copy rebuilt.
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from nanochat_core.node import shared_dir, runlock
from nanochat_core.node.shared_dir import all_gather, barrier, broadcast   # broadcast and barrier: the stages' too
from nanochat_core.common import (TRAINED_STAGES, NanochatError, atomic_write_bytes, json_default, replace_dir,
                                  sha256_file)
import torch
from safetensors.torch import load_file, save_file
import mmap
import struct
from nanochat_core.gpt.quantize import FORMAT_VERSION, quantize_state, resolve_dtype
from nanochat_core.gpt.model import GPT
from nanochat_core.data.tokenizer import Tokenizer

CKPT_RE = re.compile(r"^ckpt_(\d{6,})$")
FILE_RE = re.compile(r"^(model\.safetensors|optim_rank\d{3,}\.pt)$")  # the only names a checkpoint may list
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_KEEP = 3


class CorruptCheckpoint(NanochatError):
    """A checkpoint whose files passed every size and sha256 check but cannot be read back (an optimizer shard
    that is not a plain tensor pickle - a __reduce__ payload with its hashes recomputed - or weights safetensors
    refuses). A resume falls back to the checkpoint before it (training.resume); anything else reports it."""


def ckpt_name(step: int) -> str:
    return f"ckpt_{step:06d}"


# -----------------------------------------------------------------------------
# RNG states as JSON (so meta.json stays the one readable record of a checkpoint)

def capture_rng_state() -> dict:
    state = {
        "python": _jsonable(random.getstate()),
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cuda"])), dtype=torch.uint8))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


# -----------------------------------------------------------------------------
# Saving

def _unwrap(model: Any) -> Any:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module; save the real one


def _model_config(model: Any) -> dict:
    cfg = getattr(_unwrap(model), "config", None)
    if cfg is None:
        return {}
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


def _optimizer_shard(optimizer: Any) -> dict:
    # MuonAdamW shards its state across ranks; a plain torch optimizer (tests, small tools) is one shard.
    return optimizer.state_dict_shard() if hasattr(optimizer, "state_dict_shard") else optimizer.state_dict()


class _Recording:
    """A file wrapper that remembers the OSError a write raised. torch.save reports a failed write of a
    Python file object as RuntimeError('... unexpected pos ...'), losing the errno; this keeps it so a
    full disk can be named as such."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_fsynced(path: Path, write) -> None:
    with open(path, "wb") as f:
        rec = _Recording(f)
        try:
            write(rec)
            f.flush()
        except Exception:
            if rec.error is not None:
                raise rec.error from None
            raise
        os.fsync(f.fileno())


def meta_digest(record: dict) -> str:
    """sha256 of meta.json's canonical text without its own `meta_sha256` field."""
    body = {k: v for k, v in record.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, indent=2, sort_keys=True).encode("utf-8")).hexdigest()


def _disk_full(e: BaseException, where: Path) -> bool:
    """Did this save fail because the disk (or quota) is full? The errno when we still have it (our own
    writes, safetensors' I/O error text), else how much room is left on that filesystem."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return isinstance(e, (OSError, RuntimeError)) and shutil.disk_usage(where).free < (1 << 20)
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class Saver:
    """One stage's checkpoints: where they go, what they hold, this rank's place in the job and how many to
    keep - fixed once (StageRun.attach builds it), so that a save is one call with what changes."""
    stage_dir: Path
    model: Any
    optimizer: Any
    rank: int = 0
    world_size: int = 1
    keep: int = DEFAULT_KEEP

    def save(self, step: int, meta: dict, loader_state: dict | None = None) -> Path:
        """Write `stage_dir/ckpt_{step:06d}`; only a complete one ever gets a meta.json. Every rank must call
        this (it is collective). `meta` is the caller's record (stage, args, horizon, ...); `loader_state` is
        this rank's data loader state - all ranks' states are gathered into meta.json. Keeps the newest `keep`
        checkpoints. Returns the final directory. A failed save removes what it wrote (a full disk is not left
        full) and a full disk raises NanochatError("no space left on device ..."); the previous checkpoint is
        untouched."""
        stage_dir = self.stage_dir
        final = stage_dir / ckpt_name(step)
        # One node: built in a hidden temp dir, renamed into place. Several nodes: written in place (see the
        # module docstring), meta.json last.
        work = final if shared_dir.spans_nodes() else stage_dir / f".{ckpt_name(step)}.tmp"
        if self.rank == 0:
            runlock.check_writer(stage_dir.parent)  # one writer per run dir (see runlock.py)
        written: list[Path] = []   # this rank's files, until they may belong to a committed checkpoint
        try:
            self._write(step, meta, loader_state, final, work, written)
        except BaseException as e:
            full = _disk_full(e, stage_dir) if not isinstance(e, (KeyboardInterrupt, NanochatError)) else False
            if work != final:
                shutil.rmtree(work, ignore_errors=True)
            for p in written:   # in place: only our own files - another rank may still be writing its own
                p.unlink(missing_ok=True)
            if full:
                raise NanochatError(f"no space left on device while saving checkpoint {final.name} in {stage_dir}; "
                                    f"the unfinished save was removed and {_previous(stage_dir, step)}: free "
                                    "some space (old runs, caches) and run again") from None
            raise
        return final

    def _write(self, step: int, meta: dict, loader_state: dict | None, final: Path, work: Path,
               written: list[Path]) -> None:
        stage_dir, model, rank = self.stage_dir, self.model, self.rank

        # 1. rank 0 clears what a killed save (or an earlier save of this very step) left there; then everyone
        # writes. Every rank makes the dir: on a bucket, rank 0's empty dir is not visible to another node.
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        barrier()
        work.mkdir(parents=True, exist_ok=True)
        shard = f"optim_rank{rank:03d}.pt"
        written.append(work / shard)
        _write_fsynced(work / shard, lambda f: torch.save(_optimizer_shard(self.optimizer), f))
        if rank == 0:
            sd = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous()
                  for k, v in _unwrap(model).state_dict().items()}
            written.append(work / "model.safetensors")
            save_file(sd, str(work / "model.safetensors"))
            with open(work / "model.safetensors", "rb") as f:
                os.fsync(f.fileno())
            del sd
        mine = {"files": {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in written},
                "loader_state": loader_state, "rng": capture_rng_state()}
        everyone = all_gather(mine)
        files = {name: info for r in everyone for name, info in r["files"].items()}

        # 2. Nothing is committed before every rank SEES every file at its size (at once on one node). A file seen
        # from a node other than its writer's is in the bucket, so meta.json never vouches for one that is not.
        patience = shared_dir.wait_s() if work == final else 0.0
        unseen = shared_dir.wait_until_seen(work, {n: i["size"] for n, i in files.items()}, patience)
        blind = [(r, u) for r, u in enumerate(all_gather(unseen)) if u]
        if blind:
            r, names = blind[0]
            raise NanochatError(f"checkpoint {final.name} in {stage_dir} was not saved: rank {r} still cannot see "
                                f"{', '.join(names[:4])} after {patience:.0f} s (is the run dir shared storage, is its "
                                f"upload stuck?); {_previous(stage_dir, step)}")
        if rank != 0:
            written.clear()   # rank 0 may commit from here on: our file is no longer ours to remove

        # 3. rank 0 writes, last, the meta that vouches for every file; on one node it then renames the dir into place.
        if rank == 0:
            record = {
                **meta,
                "step": step,
                "world_size": self.world_size,
                "config": meta.get("config") or _model_config(model),
                "loader_states": [r["loader_state"] for r in everyone],
                "rng_states": [r["rng"] for r in everyone],
                "files": files,
            }
            # Through JSON once so the digest is taken over exactly what a reader will parse back.
            record = json.loads(json.dumps(record, default=json_default))
            record["meta_sha256"] = meta_digest(record)
            atomic_write_bytes(work / "meta.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8"))
            written.clear()   # committed
            if work != final:
                replace_dir(work, final)   # re-saving the same step (e.g. stopped right after a resume) swaps it
            _prune(stage_dir, self.keep, step)
        barrier()  # nobody moves on (or exits) before the checkpoint exists


def save_checkpoint(stage_dir: str | os.PathLike, step: int, model: Any, optimizer: Any, meta: dict,
                    rank: int = 0, world_size: int = 1, *, loader_state: dict | None = None,
                    keep: int = DEFAULT_KEEP) -> Path:
    """One save without a Saver (tools, tests): Saver.save."""
    return Saver(Path(stage_dir), model, optimizer, rank, world_size, keep).save(step, meta, loader_state)


def _previous(stage_dir: Path, step: int) -> str:
    """What a failed save leaves to resume from, said truthfully (a first save has nothing before it)."""
    before = next((p for s, p in list_checkpoints(stage_dir) if s < step and (p / "meta.json").is_file()), None)
    return (f"the previous checkpoint ({before.name}) is intact" if before is not None
            else "there is no earlier checkpoint of this stage to resume from")


def list_checkpoints(stage_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint directory under its final name, newest first (unverified)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in stage_dir.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def _prune(stage_dir: Path, keep: int, newest: int) -> None:
    """Rank 0, right after committing step `newest`: keep it and the keep-1 complete checkpoints before it;
    remove the rest - older ones, unfinished saves, and step dirs after `newest` (an abandoned attempt's,
    which this run could not resume from) - and temp dirs. Nobody writes into those: this job's ranks
    finished writing before the commit, and runlock allows one job per run dir."""
    before = [p for s, p in list_checkpoints(stage_dir) if s < newest and (p / "meta.json").is_file()]
    for s, p in list_checkpoints(stage_dir):
        if s != newest and p not in before[:max(keep, 1) - 1]:
            shutil.rmtree(p, ignore_errors=True)
    for p in stage_dir.glob(".ckpt_*"):  # temp dirs of single-node saves that were killed
        shutil.rmtree(p, ignore_errors=True)


# -----------------------------------------------------------------------------
# Finding and verifying

_LEGACY_WARNED: set[str] = set()


def _meta_problem(meta: Any, where: Path | None = None, weights_only: bool = False) -> str | None:
    """None if meta.json has the shape a checkpoint needs and vouches for itself, else a short reason."""
    if not isinstance(meta, dict):
        return "meta.json is not a JSON object"
    if "meta_sha256" not in meta:
        # Saved before meta.json hashed itself: refusing it would make a resumed run start over (and its
        # pruning then delete real work), so it is accepted with everything else still checked.
        if str(where) not in _LEGACY_WARNED:
            _LEGACY_WARNED.add(str(where))
            print(f"warning: {where} was saved by an older nanochat: meta.json itself is not checksummed",
                  file=sys.stderr, flush=True)
    elif meta_digest(meta) != meta["meta_sha256"]:
        return "meta.json does not match its own sha256 (damaged or edited)"
    files = meta.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return "meta.json lists no model.safetensors"
    for name, info in files.items():
        # Only plain names of the files a checkpoint has: nothing outside the checkpoint dir is ever read.
        if not FILE_RE.match(name):
            return f"meta.json lists a file outside the checkpoint ({name[:60]!r})"
        if (not isinstance(info, dict) or not _is_int(info.get("size")) or info["size"] < 0
                or not isinstance(info.get("sha256"), str) or not SHA_RE.match(info["sha256"])):
            return f"meta.json has a malformed entry for {name}"
    ws = meta.get("world_size")
    if not _is_int(ws) or ws < 1 or not _is_int(meta.get("step")) or not isinstance(meta.get("config"), dict):
        return "meta.json lacks a valid step, world_size or config"
    shards = [f for f in files if f.startswith("optim_rank")]
    if len(shards) != ws and not weights_only:
        return f"{len(shards)} optimizer shards for world size {ws}"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Checkpoints this process has hashed already, by (path, inode/size/mtime of each file). find_latest
# verifies and the loader then loads the same dir; hashing a multi-GB checkpoint twice would be waste.
_VERIFIED: set[tuple] = set()


def _stamp(ckpt_dir: Path) -> tuple | None:
    try:
        files = sorted((p.name, p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt_dir.iterdir())
    except OSError:
        return None
    return (str(ckpt_dir.resolve()), tuple(files))


def verify_checkpoint(ckpt_dir: str | os.PathLike, hashes: bool = True, weights_only: bool = False,
                      cached: str | None = None) -> str | None:
    """None if the checkpoint is complete and intact, else a short reason. weights_only: for inference, where
    the optimizer shards may be absent (`nanochat pull` leaves them on the node). cached (bf16 | int8): the
    caller loads that format's cached copy, not the fp32 file, so where that copy vouches for the fp32 file
    (open_cached: made from the bytes meta.json's sha256 names, from the file as it is now, itself intact) the
    fp32 file's own sha256 is not recomputed - at d20 that hash was most of a start's load time."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing (the save did not finish)"
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: JSON nested deeper than Python's stack
        return f"meta.json is unreadable ({e.__class__.__name__})"
    problem = _meta_problem(meta, ckpt_dir, weights_only)
    if problem:
        return problem
    files = {k: v for k, v in meta["files"].items() if not (weights_only and k.startswith("optim_rank"))}
    for name, info in files.items():
        p = ckpt_dir / name
        if p.is_symlink():   # never followed: to /dev/zero it would be read forever, elsewhere it is not ours
            return f"{name} is a symbolic link (a checkpoint holds only its own regular files)"
        if not p.exists():
            return f"{name} is missing"
        if not p.is_file():
            return f"{name} is not a regular file"
        if p.stat().st_size != info["size"]:
            return f"{name} is {p.stat().st_size} bytes, expected {info['size']} (truncated?)"
    if hashes:
        stamp = _stamp(ckpt_dir)   # a full verification also vouches for the weights alone, not the reverse
        if (stamp, False) not in _VERIFIED and (stamp, weights_only) not in _VERIFIED:
            vouched = cached is not None and open_cached(ckpt_dir, meta, cached) is not None
            for name, info in files.items():
                if vouched and name == "model.safetensors":
                    continue
                if sha256_file(ckpt_dir / name) != info["sha256"]:
                    return f"{name} does not match its sha256"
            if stamp is not None and not vouched:   # only a real hash of the fp32 file is remembered as one
                _VERIFIED.add((stamp, weights_only))
    return None


def find_latest(stage_dir: str | os.PathLike, hashes: bool = True, weights_only: bool = False,
                older_than: int | None = None, cached: str | None = None) -> Path | None:
    """The newest complete, intact checkpoint in `stage_dir` (before step `older_than` if given), or None.
    Corrupt ones are reported on stderr and skipped (the previous one is used). cached: verify_checkpoint's."""
    for step, path in list_checkpoints(stage_dir):
        if older_than is not None and step >= older_than:
            continue
        problem = verify_checkpoint(path, hashes=hashes, weights_only=weights_only, cached=cached)
        if problem is None:
            return path
        print(f"warning: checkpoint {path} is corrupt: {problem}; falling back to the previous one",
              file=sys.stderr, flush=True)
    return None


def pick_on_rank0(find: Callable[[], Path | None], weights_only: bool = False) -> Path | None:
    """Rank 0 picks a checkpoint (hashing it once, not once per GPU) and every rank gets its answer - its
    NanochatError included, so that no rank is left waiting in a collective. On another node the answer is
    only usable once that node can see the checkpoint whole: wait_visible."""
    answer: dict = {}
    if shared_dir.rank() == 0:
        try:
            found = find()
            answer = {"path": str(found) if found else None}
        except NanochatError as e:
            answer = {"error": str(e)}
    answer = broadcast(answer)
    if "error" in answer:
        raise NanochatError(answer["error"])
    if answer["path"] is None:
        return None
    wait_visible(Path(answer["path"]), weights_only)
    return Path(answer["path"])


def wait_visible(ckpt_dir: Path, weights_only: bool = False) -> None:
    """On several nodes, wait (bounded) until this node sees the checkpoint rank 0 picked whole: meta.json and
    every file it lists at its size. A bucket mount shows another node's files late (shared_dir.py)."""
    if not shared_dir.spans_nodes():
        return
    end = time.monotonic() + shared_dir.wait_s()
    while (problem := verify_checkpoint(ckpt_dir, hashes=False, weights_only=weights_only)) is not None:
        if time.monotonic() > end:
            raise NanochatError(f"checkpoint {ckpt_dir} is still not complete as seen from this node after "
                                f"{shared_dir.wait_s():.0f} s ({problem}): is the run dir shared storage?")
        time.sleep(shared_dir.POLL_S)


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise NanochatError(f"{path} is unreadable ({e.__class__.__name__}): the checkpoint is damaged; "
                            "use another one or the run directory") from None
    problem = _meta_problem(meta, Path(ckpt_dir))
    if problem:
        raise NanochatError(f"checkpoint {ckpt_dir} is corrupt: {problem}; use another one or the run directory")
    return meta


# -----------------------------------------------------------------------------
# Loading

def load_checkpoint(ckpt_dir: str | os.PathLike, model: Any, optimizer: Any = None) -> dict:
    """Load weights into `model` (any device/dtype: values are copied in) and, if given, the optimizer
    state from ALL shards (the optimizer re-shards for the current world size). Returns meta.
    Loader and RNG states are in meta["loader_states"] / meta["rng_states"] for the caller to apply.
    Verifies first: sizes and meta.json always, sha256 of every file unless this process already did
    (find_latest) or this is rank > 0 of a job whose rank 0 picked and verified the checkpoint."""

    ckpt_dir = Path(ckpt_dir)
    hashes = int(os.environ.get("RANK", "0")) == 0
    problem = verify_checkpoint(ckpt_dir, hashes=hashes, weights_only=optimizer is None)   # weights: no shards needed
    if problem:
        raise NanochatError(f"checkpoint {ckpt_dir} is corrupt: {problem}; use another one or the run directory")
    meta = read_meta(ckpt_dir)
    try:
        state = load_file(str(ckpt_dir / "model.safetensors"), device="cpu")
    except Exception as e:  # safetensors' own error types; a file that passed the checks above but not this
        raise CorruptCheckpoint(f"{ckpt_dir / 'model.safetensors'} cannot be read ({_first_line(e)})") from None
    target = _unwrap(model)
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ: the config in meta.json does not describe these weights
        first = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), str(e)[:160])
        raise NanochatError(f"checkpoint {ckpt_dir} does not fit this model ({first}): check --depth and the "
                            "other model flags, or the checkpoint's meta.json") from None
    if missing or unexpected:
        raise NanochatError(f"checkpoint {ckpt_dir} does not fit this model (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]}): check --depth and the other model flags")
    if optimizer is not None:
        names = sorted(n for n in meta["files"] if n.startswith("optim_rank"))
        # mmap: with many ranks each one reads every shard; only the pages it needs come into memory
        shards = []
        for n in names:
            # weights_only: a pickle that asks for anything but tensors and plain containers is refused, never
            # run. Its refusal (UnpicklingError), like a zip or a pickle cut short, is one line here.
            try:
                shards.append(torch.load(ckpt_dir / n, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:
                raise CorruptCheckpoint(f"{ckpt_dir / n} cannot be read as an optimizer shard "
                                        f"({_first_line(e)})") from None
        if hasattr(optimizer, "load_state_dict_shards"):
            optimizer.load_state_dict_shards(shards)
        else:
            optimizer.load_state_dict(shards[0])
    return meta


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _resolve_checkpoint(path: Path, stage: str | None, cached: str | None = None) -> Path:
    """The checkpoint dir `path` names, verified (cached: the format whose cached copy will be loaded, see
    verify_checkpoint)."""
    if (path / "meta.json").is_file():
        # A checkpoint dir named directly gets the same check find_latest gives the others (for inference:
        # a pulled run has no optimizer shards).
        problem = verify_checkpoint(path, weights_only=True, cached=cached)
        if problem:
            raise NanochatError(f"checkpoint {path} is corrupt: {problem}; pass an intact checkpoint or the run "
                                "directory (its newest intact checkpoint is used)")
        return path
    if CKPT_RE.match(path.name):
        raise NanochatError(f"{path} is not a complete checkpoint (no meta.json): pass the run directory instead")
    stages = [stage] if stage else TRAINED_STAGES   # a run dir: its most trained stage
    for s in stages:
        found = find_latest(path / s, weights_only=True, cached=cached)   # inference: no optimizer needed
        if found is not None:
            return found
    if list_checkpoints(path):
        found = find_latest(path, weights_only=True, cached=cached)  # a stage dir was passed
        if found is not None:
            return found
    what = f"stage '{stage}'" if stage else f"any stage ({', '.join(TRAINED_STAGES)})"
    raise NanochatError(f"no complete checkpoint for {what} under {path}: train one first "
                        f"(nanochat train --local) or pass --checkpoint DIR")


def _find_tokenizer_dir(ckpt: Path) -> Path:
    for d in [ckpt.parent.parent / "tokenizer", ckpt.parent / "tokenizer", ckpt / "tokenizer"]:
        if (d / "tokenizer.json").is_file():
            return d
    raise NanochatError(f"no tokenizer/tokenizer.json found next to {ckpt}: it belongs in the run directory")


# Safetensors, memory-mapped: the file is an 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw tensor bytes.
# Tensors made with torch.frombuffer over a private (copy-on-write) mapping ARE the file's pages: loading copies
# nothing, pages come in as the model touches them (an embedding table only for the rows it looks up), and
# the kernel's page cache serves a second process for free.
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8",
              "I32": "int32", "I64": "int64", "BOOL": "bool", "F64": "float64"}
_ST_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error, RuntimeError, RecursionError)


def _map_safetensors(f) -> tuple[mmap.mmap, int, dict]:
    """(the whole file mapped copy-on-write, header length, parsed header) of an open safetensors file."""
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), n, header


def _tensors(mm: mmap.mmap, n: int, header: dict) -> dict:
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            state[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        if 8 + n + end > len(mm):
            raise ValueError(f"{name} runs past the end of the file")
        state[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin).view(info["shape"])
    return state


def mmap_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """({name: tensor backed by the file}, the header's __metadata__). NanochatError for a damaged file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            mm, n, header = _map_safetensors(f)
        return _tensors(mm, n, header), header.get("__metadata__") or {}
    except _ST_ERRORS as e:
        raise NanochatError(f"{path} cannot be read ({e.__class__.__name__}: {str(e)[:100]})") from None


def _raw(v: torch.Tensor) -> memoryview:
    return memoryview(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _self_digest(header: dict, data) -> str:
    """The sha256 a cached format copy records of itself (metadata `sha256`): its header as canonical JSON
    without that field, then its data bytes (`data`: buffers, in file order). The header is covered too: a
    damaged offset or shape would map the right bytes to the wrong tensor."""
    body = {**header, "__metadata__": {k: v for k, v in header.get("__metadata__", {}).items() if k != "sha256"}}
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for chunk in data:
        h.update(chunk)
    return h.hexdigest()


def write_safetensors(path: Path, state: dict, metadata: dict, self_digest: bool = False) -> None:
    """Write `state` as a safetensors file, one tensor at a time (safetensors' own save_file first turns every
    tensor into a bytes object: a second copy of the whole model in memory, at its peak). self_digest: record
    the file's own sha256 in its metadata (_self_digest; hashed from memory, before writing). fsynced; the
    caller renames it into place."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, offset = {"__metadata__": metadata}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": names[str(v.dtype).removeprefix("torch.")], "shape": list(v.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    if self_digest:
        header["__metadata__"] = {**metadata, "sha256": _self_digest(header, (_raw(v) for v in state.values()
                                                                               if v.numel()))}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the data starts 8-byte aligned, as the format recommends
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for v in state.values():
            if v.numel():
                f.write(_raw(v))
        f.flush()
        os.fsync(f.fileno())


def quantized_cache_path(ckpt: Path, fmt: str) -> Path:
    return ckpt / f"model.{fmt}.safetensors"


def _cache_key(meta: dict, fmt: str, source: os.stat_result) -> dict:
    """What a cached bf16/int8 copy must match: the sha256 of the weights it was made from (meta.json records it,
    so a checkpoint rewritten under the same name invalidates the copy), the layout's version, and the size and
    mtime the fp32 file had when it was hashed and converted (so a file written since - damaged, or replaced
    without its meta.json - is hashed again instead of being vouched for by an older copy)."""
    return {"source_sha256": str(meta["files"]["model.safetensors"]["sha256"]), "fmt": fmt,
            "format_version": str(FORMAT_VERSION), "source_size": str(source.st_size),
            "source_mtime_ns": str(source.st_mtime_ns)}


# Cached copies this process has hashed, by (device, inode, size, mtime) of the open file: verify_checkpoint
# checks the copy, then load_inference_state opens it again, and the second open must not hash it again.
_CACHES_VERIFIED: set[tuple] = set()


def open_cached(ckpt: Path, meta: dict, fmt: str) -> dict | None:
    """The cached `fmt` copy of this checkpoint's weights (tensors memory-mapped), or None where there is no
    copy this checkpoint may use instead of its fp32 file. A usable one was made from the bytes meta.json's
    sha256 names, from the fp32 file as it is now (size, mtime), and is intact: the sha256 it records of
    itself is recomputed (4x less to read than the fp32 file for int8, 2x for bf16; once per process) over the
    very mapping whose tensors are returned, so what was checked is what is used. None is never an error: the
    caller hashes the fp32 file and rebuilds the copy. `meta`: meta.json as read (its own hash checked)."""
    cache = quantized_cache_path(ckpt, fmt)
    try:
        if cache.is_symlink() or not cache.is_file():   # never followed: ours is a regular file
            return None
        key = _cache_key(meta, fmt, (ckpt / "model.safetensors").stat())
        with open(cache, "rb") as f:
            st = os.fstat(f.fileno())
            mm, n, header = _map_safetensors(f)
        cmeta = header.get("__metadata__")
        if (not isinstance(cmeta, dict) or {k: cmeta.get(k) for k in key} != key
                or not SHA_RE.match(str(cmeta.get("sha256")))):
            return None
        seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if seen not in _CACHES_VERIFIED:
            with memoryview(mm) as view:
                digest = _self_digest(header, [view[8 + n:]])
            if digest != cmeta["sha256"]:
                return None
            _CACHES_VERIFIED.add(seen)
        return _tensors(mm, n, header)
    except _ST_ERRORS:
        return None


def load_inference_state(ckpt: Path, meta: dict, fmt: str) -> tuple[dict, str]:
    """(state dict for GPT.from_state in format `fmt`, how it was obtained). fp32: the checkpoint's file,
    memory-mapped (the caller verified it). bf16/int8: the copy cached next to the checkpoint if open_cached
    vouches for it (memory-mapped), else converted tensor by tensor from the mapped fp32 file - hashed first
    - and written there atomically, with its own sha256, for the next start (a read-only checkpoint dir just
    skips the caching)."""
    source = ckpt / "model.safetensors"
    if fmt != "fp32":
        cached = open_cached(ckpt, meta, fmt)
        if cached is not None:
            return cached, f"cached {fmt} copy"
        # Converting reads the fp32 file, so it must be the one meta.json vouches for. Where the caller's check
        # hashed it (no usable copy then), _VERIFIED remembers that and this costs nothing; it hashes only where
        # that check relied on a copy that has changed since, or on a rank whose rank 0 did the check.
        before = os.stat(source)
        problem = verify_checkpoint(ckpt, weights_only=True)
        if problem:
            raise NanochatError(f"checkpoint {ckpt} is corrupt: {problem}; use another one or the run directory")
    state, _ = mmap_safetensors(source)
    if fmt == "fp32":
        return state, "memory-mapped"
    qstate = quantize_state(state, fmt)
    del state
    cache = quantized_cache_path(ckpt, fmt)
    key = _cache_key(meta, fmt, before)
    if _cache_key(meta, fmt, os.stat(source)) != key:   # written to while hashed or converted: vouch for nothing
        return qstate, f"converted to {fmt} (not cached: {source.name} changed while it was read)"
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    try:
        write_safetensors(tmp, qstate, key, self_digest=True)
        os.replace(tmp, cache)
        return qstate, f"converted to {fmt}, cached as {cache.name}"
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        return qstate, f"converted to {fmt} (not cached: {e.strerror or e})"


def load_model(path: str | os.PathLike, device: Any = "cpu", stage: str | None = None, dtype: str | None = None):
    """(model, tokenizer, meta) ready for inference. `path` is a run dir (the latest checkpoint of
    rl > sft > mid > base, or of `stage`), a stage dir, or one checkpoint dir. Eval mode.
    dtype: auto | fp32 | bf16 | int8 (quantize.py); None keeps the old behaviour (fp32 weights, bf16 on CUDA).
    The weights are memory-mapped, not copied; meta["dtype"] and meta["load_s"] say what was loaded how fast."""

    t0 = time.perf_counter()
    path = Path(path).expanduser()
    if not path.exists():
        raise NanochatError(f"{path} does not exist: pass a run directory or a checkpoint directory")
    device = torch.device(device)
    fmt = resolve_dtype(dtype, device) if dtype is not None else ("bf16" if device.type == "cuda" else "fp32")
    # on CUDA bf16 is the whole model in bf16 under autocast (as always); elsewhere bf16/int8 are weight-only
    whole_bf16 = device.type == "cuda" and fmt == "bf16"
    stored = "fp32" if whole_bf16 else fmt   # the format read from disk: the checkpoint's, or a cached copy
    cached = None if stored == "fp32" else stored
    ckpt = pick_on_rank0(lambda: _resolve_checkpoint(path, stage, cached), weights_only=True)   # every rank: the same
    meta = read_meta(ckpt)
    tok_dir = _find_tokenizer_dir(ckpt)
    try:
        tokenizer = Tokenizer.load(tok_dir)
    except NanochatError:
        raise
    except Exception as e:  # not JSON, not a tokenizer: the Rust library's errors are long and cryptic
        raise NanochatError(f"{tok_dir / 'tokenizer.json'} is not a valid tokenizer ({str(e)[:100]}); "
                            "restore it from the run (nanochat pull)") from None
    if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer.hash:
        raise NanochatError(f"the tokenizer next to {ckpt} is not the one this model was trained with")
    state, how = load_inference_state(ckpt, meta, stored)
    try:
        model = GPT.from_state(meta["config"], state, stored)
    except (ValueError, RuntimeError, TypeError, KeyError) as e:   # shapes/names differ, or a bad config
        first = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), str(e)[:160])
        raise NanochatError(f"checkpoint {ckpt} does not fit its config in meta.json ({first})") from None
    except NanochatError as e:   # the config itself refused (GPTConfig.from_dict): say which checkpoint
        raise NanochatError(f"checkpoint {ckpt}: {e}") from None
    del state
    if whole_bf16:
        model = model.to(device=device, dtype=torch.bfloat16)
    elif device.type != "cpu":
        model = model.to(device)
    meta["path"] = str(ckpt)
    meta["dtype"] = fmt
    meta["load_s"] = time.perf_counter() - t0
    meta["load_how"] = how
    return model, tokenizer, meta
