"""
Checkpoints that survive anything: crashes, kill -9, spot preemption, a full disk mid-write.

One checkpoint is one directory, `<stage_dir>/ckpt_{step:06d}/`:
    model.safetensors      fp32 master weights (rank 0)
    optim_rank{r:03d}.pt   this rank's optimizer shard (every rank; ZeRO-style sharded state)
    meta.json              written LAST: config, step, loader + RNG states of every rank, tokenizer hash,
                           world size, the size + sha256 of every other file, and `meta_sha256`: the
                           sha256 of meta.json's own canonical text without that field (so a damaged
                           meta.json - a flipped digit in the config or a size - is caught too)
The directory is assembled under a hidden temp name and renamed into place in one step, so a reader
(or the next run) never sees a half-written checkpoint under its final name. `find_latest` still
checks every file against meta.json, because a rename protects against crashes but not against a
disk that lies, a copy that was cut short, or a person poking at files: a corrupt checkpoint is
reported on stderr and the previous one is used. Every load path verifies (a checkpoint dir passed by
hand included), and file names in meta.json are confined to the checkpoint dir: only model.safetensors
and optim_rankNNN.pt are accepted, so a meta.json naming `../../etc/passwd` is refused, never read.
A save that fails (a full disk) removes its temp dir and says so in one line.

Multi-rank saving needs all ranks to see the same directory (one node, or a shared/bucket-mounted run
dir on several nodes): every rank writes its optimizer shard into the temp dir, rank 0 writes the rest
and does the rename. Collectives (gather, barrier) keep the ranks in step.
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
from pathlib import Path
from typing import Any

from nanochat_core.common import NanochatError, fsync_dir, json_default, sha256_file

CKPT_RE = re.compile(r"^ckpt_(\d{6,})$")
FILE_RE = re.compile(r"^(model\.safetensors|optim_rank\d{3,}\.pt)$")  # the only names a checkpoint may list
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
STAGE_PRIORITY = ["rl", "sft", "mid", "base"]  # load_model on a run dir picks the most trained stage
DEFAULT_KEEP = 3


def ckpt_name(step: int) -> str:
    return f"ckpt_{step:06d}"


# -----------------------------------------------------------------------------
# Small distributed helpers (no-ops when torch.distributed is not initialised)

def _dist_active() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _dist_active():
        import torch.distributed as dist
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not _dist_active():
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's value of obj on every rank (a no-op without torch.distributed)."""
    if not _dist_active():
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_shared_dir(stage_dir: str | os.PathLike) -> None:
    """Collective. All ranks must see the same stage dir (every rank writes its optimizer shard into the
    checkpoint rank 0 renames into place). One node always does; several nodes only with a shared or
    bucket-mounted run dir. Checked at start-up so a misconfigured multi-node run fails in seconds, not
    at its first checkpoint."""
    if not _dist_active():
        return
    import secrets
    stage_dir = Path(stage_dir)
    token = broadcast(secrets.token_hex(8))
    probe = stage_dir / f".shared-probe-{token}"
    if int(os.environ.get("RANK", "0")) == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    _barrier()
    seen = _all_gather(probe.is_file())
    _barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        probe.unlink(missing_ok=True)
    if not all(seen):
        raise NanochatError(f"{stage_dir} is not shared by all nodes ({seen.count(False)} ranks cannot see it): "
                            "multi-node training needs the run dir on shared storage (e.g. a bucket mount)")


# -----------------------------------------------------------------------------
# RNG states as JSON (so meta.json stays the one readable record of a checkpoint)

def capture_rng_state() -> dict:
    import torch
    state = {
        "python": _jsonable(random.getstate()),
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def restore_rng_state(state: dict) -> None:
    import torch
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


def save_checkpoint(stage_dir: str | os.PathLike, step: int, model: Any, optimizer: Any, meta: dict,
                    rank: int = 0, world_size: int = 1, *, loader_state: dict | None = None,
                    keep: int = DEFAULT_KEEP) -> Path:
    """Write `stage_dir/ckpt_{step:06d}` atomically. Every rank must call this (it is collective).
    `meta` is the caller's record (stage, args, horizon, ...); `loader_state` is this rank's data
    loader state - all ranks' states are gathered into meta.json. Keeps the newest `keep` checkpoints.
    Returns the final directory. A failed save removes its temp dir (a full disk is not left full) and
    a full disk raises NanochatError("no space left on device ..."); the previous checkpoint is untouched."""
    stage_dir = Path(stage_dir)
    final = stage_dir / ckpt_name(step)
    tmp = stage_dir / f".{ckpt_name(step)}.tmp"
    if rank == 0:
        from nanochat_core import runlock
        runlock.check_writer(stage_dir.parent)  # one writer per run dir (see runlock.py)
    try:
        _save(stage_dir, step, model, optimizer, meta, rank, world_size, loader_state, keep, final, tmp)
    except BaseException as e:
        full = _disk_full(e, stage_dir) if not isinstance(e, (KeyboardInterrupt, NanochatError)) else False
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise NanochatError(f"no space left on device while saving checkpoint {final.name} in {stage_dir}; "
                                "the unfinished save was removed and the previous checkpoint is intact: free "
                                "some space (old runs, caches) and run again to resume") from None
        raise
    return final


def _save(stage_dir: Path, step: int, model: Any, optimizer: Any, meta: dict, rank: int, world_size: int,
          loader_state: dict | None, keep: int, final: Path, tmp: Path) -> None:
    import torch
    from safetensors.torch import save_file

    # 1. rank 0 clears any leftover temp dir of a save that was killed half-way, then everyone writes.
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    shard_name = f"optim_rank{rank:03d}.pt"
    _write_fsynced(tmp / shard_name, lambda f: torch.save(_optimizer_shard(optimizer), f))
    mine = {
        "file": shard_name,
        "size": (tmp / shard_name).stat().st_size,
        "sha256": sha256_file(tmp / shard_name),
        "loader_state": loader_state,
        "rng": capture_rng_state(),
    }
    everyone = _all_gather(mine)  # also a barrier: all shards are on disk after this line

    # 2. rank 0 writes the weights and, last, the meta that vouches for all files; then renames.
    if rank == 0:
        sd = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous()
              for k, v in _unwrap(model).state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"))
        with open(tmp / "model.safetensors", "rb") as f:
            os.fsync(f.fileno())
        del sd
        files = {r["file"]: {"size": r["size"], "sha256": r["sha256"]} for r in everyone}
        files["model.safetensors"] = {"size": (tmp / "model.safetensors").stat().st_size,
                                      "sha256": sha256_file(tmp / "model.safetensors")}
        record = {
            **meta,
            "step": step,
            "world_size": world_size,
            "config": meta.get("config") or _model_config(model),
            "loader_states": [r["loader_state"] for r in everyone],
            "rng_states": [r["rng"] for r in everyone],
            "files": files,
        }
        # Through JSON once so the digest is taken over exactly what a reader will parse back.
        record = json.loads(json.dumps(record, default=json_default))
        record["meta_sha256"] = meta_digest(record)
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        _write_fsynced(tmp / "meta.json", lambda f: f.write(text.encode("utf-8")))
        if final.exists():  # re-saving the same step (e.g. stopped right after a resume)
            old = stage_dir / f".{ckpt_name(step)}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(stage_dir)
        _prune(stage_dir, keep)
    _barrier()  # nobody moves on (or exits) before the checkpoint exists


def list_checkpoints(stage_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint directory under its final name, newest first (unverified)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in stage_dir.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def _prune(stage_dir: Path, keep: int) -> None:
    for _, path in list_checkpoints(stage_dir)[max(keep, 1):]:
        shutil.rmtree(path, ignore_errors=True)
    for p in stage_dir.glob(".ckpt_*"):  # temp dirs of saves that were killed; nobody is writing now
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


def verify_checkpoint(ckpt_dir: str | os.PathLike, hashes: bool = True, weights_only: bool = False) -> str | None:
    """None if the checkpoint is complete and intact, else a short reason. weights_only: for inference, where
    the optimizer shards may be absent (`nanochat pull` leaves them on the node)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({e.__class__.__name__})"
    problem = _meta_problem(meta, ckpt_dir, weights_only)
    if problem:
        return problem
    files = {k: v for k, v in meta["files"].items() if not (weights_only and k.startswith("optim_rank"))}
    for name, info in files.items():
        p = ckpt_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["size"]:
            return f"{name} is {p.stat().st_size} bytes, expected {info['size']} (truncated?)"
    if hashes:
        stamp = _stamp(ckpt_dir)   # a full verification also vouches for the weights alone, not the reverse
        if (stamp, False) not in _VERIFIED and (stamp, weights_only) not in _VERIFIED:
            for name, info in files.items():
                if sha256_file(ckpt_dir / name) != info["sha256"]:
                    return f"{name} does not match its sha256"
            if stamp is not None:
                _VERIFIED.add((stamp, weights_only))
    return None


def find_latest(stage_dir: str | os.PathLike, hashes: bool = True, weights_only: bool = False) -> Path | None:
    """The newest complete, intact checkpoint in `stage_dir`, or None. Corrupt ones are reported on
    stderr and skipped (the previous one is used)."""
    for step, path in list_checkpoints(stage_dir):
        problem = verify_checkpoint(path, hashes=hashes, weights_only=weights_only)
        if problem is None:
            return path
        print(f"warning: checkpoint {path} is corrupt: {problem}; falling back to the previous one",
              file=sys.stderr, flush=True)
    return None


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
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
    import torch
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    hashes = int(os.environ.get("RANK", "0")) == 0
    problem = verify_checkpoint(ckpt_dir, hashes=hashes, weights_only=optimizer is None)   # weights: no shards needed
    if problem:
        raise NanochatError(f"checkpoint {ckpt_dir} is corrupt: {problem}; use another one or the run directory")
    meta = read_meta(ckpt_dir)
    try:
        state = load_file(str(ckpt_dir / "model.safetensors"), device="cpu")
    except Exception as e:  # safetensors' own error types; a file that passed the checks above but not this
        raise NanochatError(f"{ckpt_dir / 'model.safetensors'} cannot be read ({str(e)[:120]})") from None
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
        try:
            shards = [torch.load(ckpt_dir / n, map_location="cpu", weights_only=True, mmap=True) for n in names]
        except (RuntimeError, OSError, ValueError) as e:
            raise NanochatError(f"an optimizer shard of {ckpt_dir} cannot be read ({str(e)[:120]})") from None
        if hasattr(optimizer, "load_state_dict_shards"):
            optimizer.load_state_dict_shards(shards)
        else:
            optimizer.load_state_dict(shards[0])
    return meta


def _resolve_checkpoint(path: Path, stage: str | None) -> Path:
    if (path / "meta.json").is_file():
        # A checkpoint dir named directly gets the same check find_latest gives the others (for inference:
        # a pulled run has no optimizer shards).
        problem = verify_checkpoint(path, weights_only=True)
        if problem:
            raise NanochatError(f"checkpoint {path} is corrupt: {problem}; pass an intact checkpoint or the run "
                                "directory (its newest intact checkpoint is used)")
        return path
    if CKPT_RE.match(path.name):
        raise NanochatError(f"{path} is not a complete checkpoint (no meta.json): pass the run directory instead")
    stages = [stage] if stage else STAGE_PRIORITY
    for s in stages:
        found = find_latest(path / s, weights_only=True)   # inference: no optimizer needed
        if found is not None:
            return found
    if list_checkpoints(path):
        found = find_latest(path, weights_only=True)  # a stage dir was passed
        if found is not None:
            return found
    what = f"stage '{stage}'" if stage else "any stage (rl, sft, mid, base)"
    raise NanochatError(f"no complete checkpoint for {what} under {path}: train one first "
                        f"(nanochat train --local) or pass --checkpoint DIR")


def _find_tokenizer_dir(ckpt: Path) -> Path:
    for d in [ckpt.parent.parent / "tokenizer", ckpt.parent / "tokenizer", ckpt / "tokenizer"]:
        if (d / "tokenizer.json").is_file():
            return d
    raise NanochatError(f"no tokenizer/tokenizer.json found next to {ckpt}: it belongs in the run directory")


def load_model(path: str | os.PathLike, device: Any = "cpu", stage: str | None = None):
    """(model, tokenizer, meta) ready for inference. `path` is a run dir (the latest checkpoint of
    rl > sft > mid > base, or of `stage`), a stage dir, or one checkpoint dir. Eval mode; bf16 on CUDA."""
    import torch
    from nanochat_core.model import GPT
    from nanochat_core.tokenizer import Tokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise NanochatError(f"{path} does not exist: pass a run directory or a checkpoint directory")
    ckpt = _resolve_checkpoint(path, stage)
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
    device = torch.device(device)
    try:
        model = GPT.build(meta["config"], device)  # buffers (rotary tables) are not in the file; weights come next
    except Exception as e:  # unknown keys, zero heads, a width heads do not divide
        raise NanochatError(f"the model config in {ckpt / 'meta.json'} is not valid ({e.__class__.__name__}: "
                            f"{str(e)[:100]})") from None
    load_checkpoint(ckpt, model)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    meta["path"] = str(ckpt)
    return model, tokenizer, meta
