"""
Checkpoints that survive anything: crashes, kill -9, spot preemption, a full disk mid-write.

One checkpoint is one directory, `<stage_dir>/ckpt_{step:06d}/`:
    model.safetensors      fp32 master weights (rank 0)
    optim_rank{r:03d}.pt   this rank's optimizer shard (every rank; ZeRO-style sharded state)
    meta.json              written LAST: config, step, loader + RNG states of every rank, tokenizer hash,
                           world size, and the size + sha256 of every other file
The directory is assembled under a hidden temp name and renamed into place in one step, so a reader
(or the next run) never sees a half-written checkpoint under its final name. `find_latest` still
checks every file against meta.json, because a rename protects against crashes but not against a
disk that lies, a copy that was cut short, or a person poking at files: a corrupt checkpoint is
reported on stderr and the previous one is used.

Multi-rank saving needs all ranks to see the same directory (one node, or a shared/bucket-mounted run
dir on several nodes): every rank writes its optimizer shard into the temp dir, rank 0 writes the rest
and does the rename. Collectives (gather, barrier) keep the ranks in step.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from nanochat_core.common import NanochatError, _fsync_dir, sha256_file

CKPT_RE = re.compile(r"^ckpt_(\d{6,})$")
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


def _broadcast(obj: Any) -> Any:
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
    token = _broadcast(secrets.token_hex(8))
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


def _write_fsynced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(stage_dir: str | os.PathLike, step: int, model: Any, optimizer: Any, meta: dict,
                    rank: int = 0, world_size: int = 1, *, loader_state: dict | None = None,
                    keep: int = DEFAULT_KEEP) -> Path:
    """Write `stage_dir/ckpt_{step:06d}` atomically. Every rank must call this (it is collective).
    `meta` is the caller's record (stage, args, horizon, ...); `loader_state` is this rank's data
    loader state - all ranks' states are gathered into meta.json. Keeps the newest `keep` checkpoints.
    Returns the final directory."""
    import torch
    from safetensors.torch import save_file

    stage_dir = Path(stage_dir)
    final = stage_dir / ckpt_name(step)
    tmp = stage_dir / f".{ckpt_name(step)}.tmp"

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
        text = json.dumps(record, indent=2, sort_keys=True, default=_json_default) + "\n"
        _write_fsynced(tmp / "meta.json", lambda f: f.write(text.encode("utf-8")))
        if final.exists():  # re-saving the same step (e.g. stopped right after a resume)
            old = stage_dir / f".{ckpt_name(step)}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(stage_dir)
        _prune(stage_dir, keep)
    _barrier()  # nobody moves on (or exits) before the checkpoint exists
    return final


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable in checkpoint meta: {type(x).__name__}")


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

def verify_checkpoint(ckpt_dir: str | os.PathLike, hashes: bool = True, weights_only: bool = False) -> str | None:
    """None if the checkpoint is complete and intact, else a short reason. weights_only: for inference, where
    the optimizer shards may be absent (`nanochat pull` leaves them on the node)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing (the save did not finish)"
    except (OSError, json.JSONDecodeError) as e:
        return f"meta.json is unreadable ({e.__class__.__name__})"
    files = meta.get("files") or {}
    if "model.safetensors" not in files:
        return "meta.json lists no model.safetensors"
    shards = [f for f in files if f.startswith("optim_rank")]
    if weights_only:
        files = {k: v for k, v in files.items() if k not in shards}
    elif len(shards) != meta.get("world_size", len(shards)):
        return f"{len(shards)} optimizer shards for world size {meta.get('world_size')}"
    for name, info in files.items():
        p = ckpt_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["size"]:
            return f"{name} is {p.stat().st_size} bytes, expected {info['size']} (truncated?)"
        if hashes and sha256_file(p) != info["sha256"]:
            return f"{name} does not match its sha256"
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
    return json.loads((Path(ckpt_dir) / "meta.json").read_text())


# -----------------------------------------------------------------------------
# Loading

def load_checkpoint(ckpt_dir: str | os.PathLike, model: Any, optimizer: Any = None) -> dict:
    """Load weights into `model` (any device/dtype: values are copied in) and, if given, the optimizer
    state from ALL shards (the optimizer re-shards for the current world size). Returns meta.
    Loader and RNG states are in meta["loader_states"] / meta["rng_states"] for the caller to apply."""
    import torch
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    state = load_file(str(ckpt_dir / "model.safetensors"), device="cpu")
    target = _unwrap(model)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NanochatError(f"checkpoint {ckpt_dir} does not fit this model (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]}): check --depth and the other model flags")
    if optimizer is not None:
        names = sorted(n for n in meta["files"] if n.startswith("optim_rank"))
        # mmap: with many ranks each one reads every shard; only the pages it needs come into memory
        shards = [torch.load(ckpt_dir / n, map_location="cpu", weights_only=True, mmap=True) for n in names]
        if hasattr(optimizer, "load_state_dict_shards"):
            optimizer.load_state_dict_shards(shards)
        else:
            optimizer.load_state_dict(shards[0])
    return meta


def _resolve_checkpoint(path: Path, stage: str | None) -> Path:
    if (path / "meta.json").is_file():
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
    from nanochat_core.model import GPT, GPTConfig
    from nanochat_core.tokenizer import Tokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise NanochatError(f"{path} does not exist: pass a run directory or a checkpoint directory")
    ckpt = _resolve_checkpoint(path, stage)
    meta = read_meta(ckpt)
    tokenizer = Tokenizer.load(_find_tokenizer_dir(ckpt))
    if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer.hash:
        raise NanochatError(f"the tokenizer next to {ckpt} is not the one this model was trained with")
    device = torch.device(device)
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["config"]))
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the file; weights are overwritten next
    load_checkpoint(ckpt, model)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    meta["path"] = str(ckpt)
    return model, tokenizer, meta
