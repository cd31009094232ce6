"""
StageRun: the set-up and tear-down every training stage's loop shares (base, mid, SFT, RL), so that a stage's
file holds only its own loop.

    run = StageRun("sft", run_dir, device=a.device, deadline=a.deadline, save_every_minutes=a.save_every_minutes)
    init = run.init_checkpoint()      # our own latest checkpoint (resume), else the latest of an earlier stage
    model = run.build_model(checkpoint.read_meta(init)["config"])
    optimizer = ...
    run.attach(model, optimizer)      # what every run.save(step, meta, loader_state) writes
    ...
    while ...:
        ...
        if training.save_or_stop(stop, due, done, save_now, step, run.guard):
            run.stopped = True
            break
    run.finish(step)                                  # stage_end, signal handlers back, exit code after a stop
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from nanochat_core.gpt import checkpoint
from nanochat_core.node import shared_dir
from nanochat_core.training import loop as training
from nanochat_core.common import TRAINED_STAGES, NanochatError, atomic_write_json, cleanup_runtime, emit, init_runtime
from nanochat_core.data.tokenizer import get_tokenizer
from nanochat_core.gpt.model import GPT


class StageRun:
    def __init__(self, stage: str, run_dir: str | Path, *, device: str | None = None, deadline: float | None = None,
                 save_every_minutes: float | None = None, save_every_steps: int | None = None,
                 gpu_save_minutes: float = 30.0):
        self.stage = stage
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / stage
        self.rt = init_runtime(device)
        self.guard = training.StopGuard(deadline)
        self.t_start = time.time()
        self.tokenizer = get_tokenizer(self.run_dir)
        # checkpoints every gpu_save_minutes on a GPU (a save of a big model takes a while), every minute on a CPU
        minutes = save_every_minutes if save_every_minutes is not None else (
            gpu_save_minutes if self.rt.device_type == "cuda" else 1.0)
        self.cadence = training.SaveCadence(minutes, save_every_steps)
        shared_dir.check_shared_dir(self.stage_dir)   # several nodes: every rank must see the same stage dir
        # our own latest good checkpoint
        self.resume_from: Path | None = checkpoint.pick_on_rank0(lambda: checkpoint.find_latest(self.stage_dir))
        self.stopped = False

    def init_checkpoint(self) -> Path:
        """Where the weights come from: our own latest checkpoint when resuming, else the latest checkpoint of
        the most trained earlier stage that has one (common.TRAINED_STAGES: RL starts from SFT, else mid, ...)."""
        if self.resume_from is not None:
            return self.resume_from
        sources = TRAINED_STAGES[TRAINED_STAGES.index(self.stage) + 1:]
        for s in sources:   # rank 0 looks (hashing a big checkpoint once, not once per GPU), every rank gets its answer
            found = checkpoint.pick_on_rank0(lambda: checkpoint.find_latest(self.run_dir / s))
            if found is not None:
                meta = checkpoint.read_meta(found)
                if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != self.tokenizer.hash:
                    raise NanochatError(f"{found} was trained with a different tokenizer than {self.run_dir}/tokenizer")
                return found
        raise NanochatError(f"no {' or '.join(sources)} checkpoint in {self.run_dir}: run the earlier stages first")

    def build_model(self, config: dict) -> Any:
        return GPT.build(config, self.rt.device)

    def resume(self, model: Any, optimizer: Any) -> dict:
        """Load our own checkpoint (weights, optimizer, the meta with loader states) - only when resume_from."""
        return training.resume(self.stage_dir, model, optimizer, self.stage, self.tokenizer.hash, ckpt=self.resume_from)

    def attach(self, model: Any, optimizer: Any) -> None:
        """The model and optimizer this stage trains: what every run.save from now on writes."""
        self.saver = checkpoint.Saver(self.stage_dir, model, optimizer, self.rt.rank, self.rt.world_size)

    def save(self, step: int, meta: dict, loader_state: dict | None = None) -> None:
        """A checkpoint of the attached model at `step` (collective), the `checkpoint` event, and what the
        guard learns from it: how long a save takes, so that a deadline stop leaves time for one."""
        t0 = time.time()
        path = self.saver.save(step, {"stage": self.stage, "tokenizer_hash": self.tokenizer.hash, **meta},
                               loader_state)
        self.guard.note_save(time.time() - t0)
        emit("checkpoint", stage=self.stage, step=step, path=str(path))
        self.cadence.saved()

    def write_end(self, steps: int) -> None:
        """<stage>/end.json: whether this process finished the stage's work, or what stopped it. The pipeline
        records a stage done only on this word (exit 0 is also a SIGTERM's or a deadline's clean stop)."""
        if not self.rt.master:
            return
        found = checkpoint.find_latest(self.stage_dir, hashes=False)
        saved = checkpoint.read_meta(found).get("step") if found else None
        finished = not self.stopped and steps > 0 and saved == steps
        atomic_write_json(self.stage_dir / "end.json", {"step": steps, "finished": finished, "checkpoint_step": saved,
                                                        "stopped_by": self.guard.reason() if self.stopped else None})

    def finish(self, steps: int, **fields: Any) -> None:
        """End of the stage: `stage_end` (with `fields`) unless stopped early, then signal handlers back and the
        process group gone; a stop by SIGTERM/deadline exits with the guard's code so the pipeline knows."""
        if not self.stopped:
            emit("stage_end", stage=self.stage, seconds=round(time.time() - self.t_start, 2), steps=steps, **fields)
        self.write_end(steps)
        self.guard.restore()
        cleanup_runtime()
        if self.stopped and self.guard.exit_code():
            sys.exit(self.guard.exit_code())
