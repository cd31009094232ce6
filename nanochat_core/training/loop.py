"""
The pieces every training stage (base, mid, SFT, RL) shares, so that each stage's file is only its loop: the
stop guard (signals, deadline), the save cadence, every rank agreeing on when to stop and save, the schedules
(by step, or by the fraction of a time budget used), `progress` events (the CLI's cost meter and progress panel
read nothing else), resume, validation bits per byte, and the rows per device that fit in its memory.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from nanochat_core.gpt import checkpoint
from nanochat_core.common import NanochatError, emit, print0
from nanochat_core.node.proctree import STARTTIME, stat_fields
from nanochat_core.node.shared_dir import dist_active
import torch
import torch.distributed as dist
import gc


# -----------------------------------------------------------------------------
# How many rows fit on one device

# Per-GPU device-batch presets (rows of seq 2048 per GPU per micro-step), keyed by GPU memory and depth,
# so the default run fits instead of dying with OOM. Starting points: the reference trains d20 with 32
# rows on 80 GB cards and drops to 16 / 8 rows for deeper models; smaller cards scale down in proportion.
# Rows for other sequence lengths scale by 2048/T (same tokens per micro-step). docs/PERFORMANCE.md lists
# which rows were measured; an explicit --device-batch-size always wins.
#   (min GB, [(max depth, rows), ...])
GPU_PRESETS = [
    (120, [(12, 64), (20, 32), (26, 32), (10**9, 16)]),   # H200 141 GB, B200
    (70,  [(12, 32), (20, 32), (26, 16), (10**9, 8)]),    # H100 / A100 80 GB
    (36,  [(12, 16), (20, 16), (26, 8),  (10**9, 4)]),    # A100 40 GB, L40S / A6000 48 GB
    (20,  [(12, 8),  (20, 4),  (26, 2),  (10**9, 1)]),    # RTX 3090 / 4090 / A10G 24 GB
    (0,   [(12, 4),  (20, 2),  (26, 1),  (10**9, 1)]),    # smaller cards: may still need a smaller --depth
]
CPU_TOKENS_PER_MICRO_STEP = 2048   # CPU: memory is not the limit; ~2K tokens keeps a step under a second


def preset_device_batch(depth: int, seq_len: int, device_type: str, memory_gb: float | None) -> int:
    if device_type != "cuda" or memory_gb is None:
        return max(1, CPU_TOKENS_PER_MICRO_STEP // seq_len)
    rows = next(r for gb, r in GPU_PRESETS if memory_gb >= gb)
    at_2048 = next(b for max_depth, b in rows if depth <= max_depth)
    return max(1, at_2048 * 2048 // seq_len)


def process_start_time() -> float:
    """Unix time at which this process started (Linux: from /proc; elsewhere: first import of this
    module, which is close). `--deadline SECONDS` counts from here, so slow imports count too."""
    fields = stat_fields("self")
    if fields is None:
        return _IMPORT_TIME
    try:
        ticks = int(fields[STARTTIME])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORT_TIME


_IMPORT_TIME = time.time()


# -----------------------------------------------------------------------------
# Stopping: signals and deadlines

class StopGuard:
    """Turns SIGTERM (spot preemption notice, `kill`, torchrun shutting down) and SIGINT (Ctrl-C) into
    a flag the loop polls once per step, and knows the wall-clock deadline.

    deadline = min(process start + deadline_s, env NANOCHAT_DEADLINE [absolute unix time]).
    The loop must stop early enough to still write a checkpoint, so `should_stop()` fires at
    deadline - margin, where margin = 3 x the typical step time + 1.5 x the last save time (or an
    estimate before the first save) + 1 s."""

    def __init__(self, deadline_s: float | None = None, est_save_s: float = 1.0, clock=time.time):
        self.clock = clock   # injectable: tests drive the deadline with their own clock, not the machine's load
        limits = []
        if deadline_s is not None:
            limits.append(process_start_time() + deadline_s)
        if os.environ.get("NANOCHAT_DEADLINE"):
            try:
                limits.append(float(os.environ["NANOCHAT_DEADLINE"]))
            except ValueError:
                raise NanochatError("NANOCHAT_DEADLINE must be a unix time in seconds") from None
        self.deadline = min(limits) if limits else None
        self.signum: int | None = None
        self.step_s = 0.0
        self.steps_seen = 0
        self.save_s = est_save_s
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user means it, do not wait for the save
        self.signum = signum  # no printing here: a signal can land inside a print and break the stream

    def note_step(self, seconds: float) -> None:
        """Typical step time: an EMA that ignores the first step (torch.compile / warm-up) and does not
        let one slow outlier (a busy machine) push the stop far ahead of the deadline."""
        self.steps_seen += 1
        self.step_s = seconds if self.steps_seen <= 2 else 0.8 * self.step_s + 0.2 * seconds

    def note_save(self, seconds: float) -> None:
        self.save_s = seconds

    def margin(self) -> float:
        return 3 * self.step_s + 1.5 * self.save_s + 1.0

    def should_stop(self) -> bool:
        """Local view (this rank). Use `agree()` to make all ranks decide together."""
        return self.signum is not None or (self.deadline is not None
                                           and self.clock() >= self.deadline - self.margin())

    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "deadline"

    def exit_code(self) -> int:
        """0 after SIGTERM or a deadline (a clean, resumable stop); 130 after Ctrl-C (as the shell expects)."""
        return 130 if self.signum == signal.SIGINT else 0

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class SaveCadence:
    """When to write a periodic checkpoint: every `minutes` of wall time and/or every `steps` steps
    (either may be 0 = off). A crash loses at most this much work."""

    def __init__(self, minutes: float = 0.0, steps: int = 0):
        self.minutes, self.steps = minutes, steps
        self.last = time.time()

    def due(self, step: int) -> bool:
        if self.steps and step % self.steps == 0:
            return True
        return bool(self.minutes) and time.time() - self.last >= 60 * self.minutes

    def saved(self) -> None:
        self.last = time.time()


def agree(*flags: bool, device: Any = "cpu") -> list[bool]:
    """True for a flag if it is true on ANY rank (one tiny all-reduce; no-op on a single process): every rank
    stops / saves at the SAME step (a rank that saves alone would hang in the checkpoint's collectives)."""
    if not dist_active():
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def save_or_stop(stop: bool, due: bool, finished: bool, save_now, step: int, guard: "StopGuard",
                 total_steps: int | None = None) -> bool:
    """The end of every training step, the same in every stage: checkpoint when the cadence is due, and
    when a signal or the deadline says stop, checkpoint and say how to resume. Returns True when the loop
    must end early. (A finished run saves once after its loop; that is the caller's.)"""
    if finished:
        return False
    if stop or due:
        save_now()
    if stop:
        of = f"/{total_steps}" if total_steps else ""
        print0(f"stopped at step {step}{of} ({guard.reason()}); run the same command again to resume")
    return stop


# -----------------------------------------------------------------------------
# Schedules (pure functions of the step: a resumed run follows exactly the same curve)

WARMDOWN_RATIO = 0.65  # linear decay over the last 65% of the run ...
FINAL_LR_FRAC = 0.05   # ... to 5% of the peak LR, not to 0 (the reference's settings since mid-2026)
MOMENTUM_END = 0.90    # Muon momentum eases from 0.97 to this over the warmdown


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Short linear warmup, constant, then linear warmdown to FINAL_LR_FRAC at the last step."""
    warmdown_steps = round(WARMDOWN_RATIO * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= total_steps - warmdown_steps or warmdown_steps == 0:
        return 1.0
    progress = (total_steps - step) / warmdown_steps
    return progress + (1 - progress) * FINAL_LR_FRAC


def lr_multiplier_at(progress: float, step: int, warmup_steps: int = 0) -> float:
    """The same curve as lr_multiplier, driven by the fraction of the run done (0..1) instead of the step:
    a time-bounded run passes the fraction of its time used, so it reaches the end of the warmdown at
    its deadline whatever the throughput did on the way. Warmup counts steps, but is over by 5% of the
    run at the latest (a run that gets far fewer steps than planned must not spend them all warming up)."""
    progress = min(max(progress, 0.0), 1.0)
    warm = 1.0 if step >= warmup_steps else min(1.0, max((step + 1) / warmup_steps, progress / 0.05))
    if progress <= 1 - WARMDOWN_RATIO:
        return warm
    left = (1 - progress) / WARMDOWN_RATIO
    return min(warm, left + (1 - left) * FINAL_LR_FRAC)


class TimeHorizon:
    """The horizon of a time-bounded run: `budget_s` seconds of training in all, `used_before` of them
    spent before a resume, ending no later than `hard_end` (a unix time: the deadline minus room to save).

    progress() is the fraction of the training time used; the schedules are driven by it. done() says
    whether the next step would overrun, judging by the slowest recent step (a machine that just got
    busier must not start a step it cannot finish). So the last step runs with progress close to 1 - at
    the very end of the warmdown - however many steps the run managed on the way.
    Why not time one step and fix the step count (as this once did): on a shared machine the timing
    can be 30x off either way, and a run then ends mid-schedule at its deadline, or finishes its few
    steps early and quits with an untrained model."""

    def __init__(self, budget_s: float, used_before: float = 0.0, hard_end: float | None = None, clock=time.time):
        self.clock = clock   # injectable, as StopGuard's
        self.start = clock()
        self.end = self.start + max(0.0, budget_s - used_before)
        self.used_before = used_before
        self.recent: list[float] = []
        self.seen = 0
        self.limit(hard_end)

    def limit(self, hard_end: float | None) -> None:
        """Move the end earlier (never later): the stop guard's margin grows once it has timed a save."""
        if hard_end is not None:
            self.end = min(self.end, hard_end)
        self.span = max(1e-6, self.used_before + (self.end - self.start))

    def progress(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        return min(1.0, (self.used_before + now - self.start) / self.span)

    def note_step(self, seconds: float) -> None:
        """The first step of a process is not a pace (torch.compile, warm-up: tens of seconds on a resume)."""
        self.seen += 1
        if self.seen > 1:
            self.recent = (self.recent + [seconds])[-3:]

    def done(self) -> bool:
        next_step = max(self.recent) if self.recent else 0.0
        return self.clock() + next_step >= self.end

    def steps_estimate(self, step: int) -> int:
        """Steps the run will have taken at its end if the recent pace holds (for progress display)."""
        if not self.recent:
            return step + 1
        pace = sum(self.recent) / len(self.recent)
        return step + max(0, int((self.end - self.clock()) / max(pace, 1e-9)))


def muon_momentum(step: int, ramp_steps: int = 400, start: float = 0.85, end: float = 0.97,
                  progress: float | None = None) -> float:
    """Muon momentum ramps 0.85 -> 0.97 over the first 400 steps: low momentum while the weights are
    moving fast at the start, high once the direction is stable (the reference recipe). Given the run's
    progress (0..1), it then eases towards MOMENTUM_END over the warmdown, as the reference now does (less
    averaging while the LR falls). A run shorter than the ramp blends the two."""
    frac = min(step / ramp_steps, 1.0)
    mu = (1 - frac) * start + frac * end
    if progress is not None and progress > 1 - WARMDOWN_RATIO:
        down = min(1.0, (progress - (1 - WARMDOWN_RATIO)) / WARMDOWN_RATIO)
        mu = (1 - down) * mu + down * MOMENTUM_END
    return mu


def muon_weight_decay_multiplier(progress: float) -> float:
    """Muon weight decay falls linearly from its full value to 0 over the run (progress 0 -> 1). The
    reference falls along a cosine, which integrates to the same half; its reference point (0.28 at d12) was
    tuned with that decay, and a constant weight decay integrates to twice as much as it was tuned for."""
    return max(0.0, 1.0 - progress)


def apply_schedule(optimizer: Any, lr_mult: float, momentum: float | None = None,
                   muon_wd_mult: float | None = None) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"]) * lr_mult
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if muon_wd_mult is not None:
                group["weight_decay"] = group.get("initial_weight_decay", group["weight_decay"]) * muon_wd_mult


def remember_initial_lr(optimizer: Any) -> None:
    """What apply_schedule scales, for an optimizer other than MuonAdamW (which keeps its groups' initial LR and
    weight decay itself)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])


# -----------------------------------------------------------------------------
# The step: forward/backward over gradient-accumulation micro-batches

def autocast_context(device_type: str):
    """bf16 autocast on CUDA (weights stay fp32 - the 'master' copy), nothing elsewhere: bf16 matmuls
    on a typical AVX2 CPU are ~100x slower than fp32 (measured by the reference)."""
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def freeze_gc() -> None:
    """After the warm-up step: collect once, then move every object alive now (the model, the compiled
    graphs, the loader's tables - millions of them) out of the garbage collector's sight. Python's full
    collections otherwise walk them all, again and again: the reference measured ~500 ms pauses. Objects
    made later are still collected as usual."""
    gc.collect()
    gc.freeze()


def forward_backward(model: Any, batches: Iterator, grad_accum: int, device_type: str):
    """Run `grad_accum` micro-batches, accumulate gradients of the MEAN loss. Returns the mean loss as
    a detached device tensor (no host sync here; the meter decides when to read it)."""
    total = None
    for _ in range(grad_accum):
        x, y = next(batches)
        with autocast_context(device_type):
            loss = model(x, y)
        (loss / grad_accum).backward()
        d = loss.detach()
        total = d if total is None else total + d
    return total / grad_accum


# -----------------------------------------------------------------------------
# Progress

class ProgressMeter:
    """Emits `progress` events: at every `every_steps` steps if set, else about every `every_s`
    seconds, and always on the first and last step. loss = mean over the steps since the last event;
    tokens/s over the same window; MFU = achieved FLOP/s / (peak x world size), in percent;
    elapsed_s = training seconds including those before a resume."""

    def __init__(self, stage: str, total_steps: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float, world_size: int = 1, every_s: float = 2.0, every_steps: int = 0,
                 elapsed_before: float = 0.0):
        self.stage, self.total_steps = stage, total_steps
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak_flops * world_size
        self.every_s, self.every_steps = every_s, every_steps
        self.elapsed_before = elapsed_before
        self.start = self.window_start = time.time()
        self.loss_sum, self.tokens_sum, self.n = None, 0, 0   # since the last event
        self.first = True
        self.last: dict = {}

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start

    def update(self, step: int, loss, tokens: int | None = None, **fields: Any) -> dict | None:
        """Call after finishing step `step` (1-based count of completed steps). `tokens`: tokens this step
        processed when it is not the fixed tokens_per_step (RL's rollouts vary); `loss` may be None for a stage
        without one (RL reports `reward` among `fields`, which go into the event as given)."""
        if loss is not None:
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.tokens_sum += self.tokens_per_step if tokens is None else tokens
        self.n += 1
        now = time.time()
        if self.every_steps:
            due = step % self.every_steps == 0
        else:
            due = now - self.window_start >= self.every_s
        if not (due or self.first or step == self.total_steps):
            return None
        self.first = False
        dt = max(now - self.window_start, 1e-9)
        tps = self.tokens_sum / dt
        loss_value = None if self.loss_sum is None else float(self.loss_sum) / self.n
        if loss_value is not None and not math.isfinite(loss_value):
            raise NanochatError(f"loss became {loss_value} at step {step}: lower the learning rate or check the data")
        self.last = emit("progress", stage=self.stage, step=step, total_steps=self.total_steps,
                         loss=None if loss_value is None else round(loss_value, 6), tokens_per_sec=round(tps, 1),
                         mfu=round(100 * tps * self.flops_per_token / self.peak, 2),
                         elapsed_s=round(self.elapsed(), 2), **fields)
        self.window_start, self.loss_sum, self.tokens_sum, self.n = now, None, 0, 0
        return self.last


# -----------------------------------------------------------------------------
# Resume

def resume(stage_dir: str | os.PathLike, model: Any, optimizer: Any, stage: str, tokenizer_hash: str | None = None,
           *, ckpt: str | os.PathLike | None = None) -> dict | None:
    """Load the newest intact checkpoint of `stage_dir` (rank 0 picks and verifies it, everyone loads
    it), or `ckpt` if the caller has already found one (saves hashing a big checkpoint twice).
    Returns its meta (with loader_states / rng_states for the caller), or None for a fresh start."""
    found = str(ckpt) if ckpt is not None else checkpoint.pick_on_rank0(lambda: checkpoint.find_latest(stage_dir))
    if found is None:
        return None
    while True:
        try:
            meta = checkpoint.load_checkpoint(found, model, optimizer)
            break
        except checkpoint.CorruptCheckpoint as e:   # intact by its hashes, yet unreadable: the one before it
            named = checkpoint.CKPT_RE.match(Path(found).name)
            if named is None:
                raise
            step = int(named.group(1))
            print0(f"warning: {e}; falling back to the previous checkpoint", file=sys.stderr)
            older = checkpoint.pick_on_rank0(lambda: checkpoint.find_latest(stage_dir, older_than=step))
            if older is None:
                raise NanochatError(f"{e}, and {stage_dir} has no intact checkpoint before it: remove "
                                    f"{found} to start the stage over, or use a new --run-dir") from None
            found = str(older)
    if tokenizer_hash and meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer_hash:
        raise NanochatError(f"{found} was trained with a different tokenizer than the one in the run dir: "
                            "use a new --run-dir or restore the original tokenizer")
    print0(f"resumed from step {meta['step']}")
    emit("resumed", stage=stage, step=meta["step"])
    return meta


# -----------------------------------------------------------------------------
# Evaluation: bits per byte

def evaluate_bpb(model: Any, batches: Iterator, steps: int, token_bytes, device_type: str) -> float:
    """Validation loss in bits per byte: sum of per-token losses (nats) over tokens that stand for real
    text, divided by ln 2 x the bytes those tokens stand for. Special tokens (0 bytes) and ignored
    targets (-1) count for neither, which makes the number comparable across vocab sizes."""
    was_training = model.training
    model.eval()
    nats = bytes_ = None
    with torch.no_grad():
        for _ in range(steps):
            x, y = next(batches)
            with autocast_context(device_type):
                loss = model(x, y, loss_reduction="none").float().view(-1)
            y = y.reshape(-1)
            nb = token_bytes.to(y.device)[y.clamp(min=0)] * (y >= 0)
            n = (loss * (nb > 0)).sum()
            b = nb.sum().to(torch.float32)
            nats = n if nats is None else nats + n
            bytes_ = b if bytes_ is None else bytes_ + b
    totals = torch.stack([nats, bytes_]).to(torch.float64)
    if dist_active():
        dist.all_reduce(totals)
    model.train(was_training)
    if totals[1].item() == 0:
        raise NanochatError("validation data has no text tokens: check the data directory")
    return (totals[0] / (math.log(2) * totals[1])).item()
