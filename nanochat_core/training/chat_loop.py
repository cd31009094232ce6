"""
Fine-tuning on conversations: the loop that the mid-training and SFT stages share (stages/mid_train.py and
stages/chat_sft.py each bring their own mixture and defaults).

The model is loaded from the previous stage (mid if there is one, else base) and trained on whole
conversations with loss only on what the assistant says (its text, its tool calls and its
<|assistant_end|>; never the user's words or the tool's output - targets there are -1).

Batches: conversations are packed best-fit into rows of T+1 tokens - repeatedly place the longest
conversation that still fits, then pad the rest of the row (padding targets -1). Unlike pre-training we
never crop a conversation to fill a row: a half conversation teaches the wrong thing. One that is longer
than a row is truncated at T+1 tokens.

Optimizer: the base run's optimizer state (Muon momentum, Adam moments) is loaded when the checkpoint has
it - a warm start, so the first steps do not jolt the weights - with the learning rates scaled by
--lr-frac and decayed linearly to zero over the run.

Horizon: --epochs over the data, --steps, --minutes: whichever ends first (1 epoch if none is given). The LR
schedule follows progress = max(data consumed, steps done, minutes used), so a time-bounded run still
anneals. Checkpoints, resume, deadline and progress events are base training's (training/loop.py).
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

from nanochat_core.gpt import checkpoint
from nanochat_core.training import loop as training
from nanochat_core.node.device import device_peak_flops
from nanochat_core.common import NanochatError, device_memory_gb, emit, print0, set_seed
from nanochat_core.training.stage_run import StageRun
import torch
from nanochat_core.data import user_data
from nanochat_core.tasks.common import TaskMixture
from nanochat_core.tasks.identity import Conversations
from nanochat_core.inference.calculator import readable_text
from nanochat_core.inference.engine import Engine, decode_threads

# -----------------------------------------------------------------------------
# Data: best-fit packing of rendered conversations

def pack_rows(items: list[tuple[list[int], list[int]]], B: int, T: int, pad_id: int):
    """Best-fit packing of (ids, mask) items into B rows of T+1 tokens. Returns (rows, used_indices):
    rows = list of (ids, mask) padded with pad_id / mask 0. Items are never split."""
    free = list(range(len(items)))
    rows, used = [], []
    for _ in range(B):
        row_ids: list[int] = []
        row_mask: list[int] = []
        while True:
            space = T + 1 - len(row_ids)
            best = None
            for i in free:
                n = len(items[i][0])
                if n <= space and (best is None or n > len(items[best][0])):
                    best = i
            if best is None:
                break
            free.remove(best)
            used.append(best)
            row_ids += items[best][0]
            row_mask += items[best][1]
        pad = T + 1 - len(row_ids)
        rows.append((row_ids + [pad_id] * pad, row_mask + [0] * pad))
    return rows, used


def rows_to_batch(rows, device):
    """inputs = ids[:-1]; targets = ids[1:] where the target token is trained (mask 1), else -1."""
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
    return inputs.to(device), targets.to(device)


class ConversationLoader:
    """Endless (epoch after epoch) packed batches from a Task, for one rank. Resumable from a small state:
    epoch, position in this epoch's order, and the conversations waiting in the buffer (by index)."""

    def __init__(self, dataset, tokenizer, B: int, T: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: Any = "cpu", buffer_size: int = 64):
        if len(dataset) == 0:
            raise NanochatError("the SFT data set is empty")
        self.dataset, self.tokenizer, self.B, self.T = dataset, tokenizer, B, T
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.buffer_size = max(buffer_size, 4 * B)
        self.pad_id = tokenizer.get_bos_token_id()
        self.epoch, self.pos, self.buffer = 0, 0, []   # buffer: dataset indices
        self.consumed = 0                              # conversations used by this rank, all epochs
        self._order = None
        self._rendered: dict[int, tuple[list[int], list[int]]] = {}  # buffer index -> (ids, mask)

    def order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            idx = list(range(self.rank, len(self.dataset), self.world_size)) or list(range(len(self.dataset)))
            random.Random(self.seed * 1000 + self.epoch).shuffle(idx)
            self._order = (self.epoch, idx)
        return self._order[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "buffer": list(self.buffer), "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.buffer, self.consumed = list(state["buffer"]), state["consumed"]

    def next_batch(self):
        while len(self.buffer) < self.buffer_size:
            order = self.order()
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            self.buffer.append(order[self.pos])
            self.pos += 1
        for i in self.buffer:  # render each conversation once, however long it waits in the buffer
            if i not in self._rendered:
                self._rendered[i] = self.tokenizer.render_conversation(self.dataset[i], max_tokens=self.T + 1)
        rows, used = pack_rows([self._rendered[i] for i in self.buffer], self.B, self.T, self.pad_id)
        used_set = set(used)
        for j in used_set:
            self._rendered.pop(self.buffer[j], None)
        self.buffer = [ix for j, ix in enumerate(self.buffer) if j not in used_set]
        self.consumed += len(used)
        return rows_to_batch(rows, self.device)


# -----------------------------------------------------------------------------
# The loop

def add_common_args(p: argparse.ArgumentParser, lr_frac: float, gpu_rows: int, gpu_total_batch: int | None) -> None:
    """gpu_rows: rows of 2048 tokens per GPU per micro-step (capped by base training's memory preset); gpu_total_batch: tokens per step on GPU (None = one
    micro-step of all ranks, no accumulation). CPU: one micro-step of 2048 tokens."""
    p.set_defaults(gpu_rows=gpu_rows, gpu_total_batch=gpu_total_batch)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the data (default: 1 if neither --steps nor --minutes is given, else unbounded)")
    p.add_argument("--steps", type=int, default=None, help="horizon: at most this many optimizer steps")
    p.add_argument("--minutes", type=float, default=None, help="horizon: at most this many minutes of training")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per device per micro-step")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step")
    p.add_argument("--lr-frac", type=float, default=lr_frac, help="learning rates as a fraction of base training's")
    p.add_argument("--no-warm-start", action="store_true", help="do not load the previous stage's optimizer state")
    p.add_argument("--deadline", type=float, default=None, help="stop and save this many seconds after process start")
    p.add_argument("--save-every-minutes", type=float, default=None, help="checkpoint cadence (default 30 GPU / 1 CPU)")
    p.add_argument("--log-every", type=int, default=0, help="progress event every N steps (default: about every 2 s)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: autodetect)")
    # Your own data (user_data.py): the bundle `nanochat train` prepared, and how much of the mixture it is.
    p.add_argument("--user-data", type=Path, default=None, help="a bundle from user_data.build_bundle")
    p.add_argument("--user-data-sha256", default=None, help="refuse a bundle whose manifest is not this one")
    p.add_argument("--chat-share", type=float, default=None,
                   help="share of the conversations that are yours (1.0: only yours, no shipped mix)")
    p.add_argument("--identity-share", type=float, default=None,
                   help="share of the conversations that are identity ones (who-are-you, from --identity)")


def check_args(a) -> None:
    for name in ("steps", "device_batch_size", "total_batch_size"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise NanochatError(f"--{name.replace('_', '-')} must be >= 1 (got {v})")
    if (a.minutes is not None and a.minutes <= 0) or (a.epochs is not None and a.epochs <= 0) or a.lr_frac <= 0:
        raise NanochatError("--minutes, --epochs and --lr-frac must be > 0")


def with_user_data(stage: str, base_mixture, a, local_default_shares: tuple[float, float],
                   cloud_default_shares: tuple[float, float]):
    """The stage's mixture with the user's conversations and identity (from --user-data) mixed in at their
    shares; returns a callable (tokenizer, T) -> Task, or the base mixture itself when there is no bundle.
    Shares default per preset (local: identity dominates, so a toy model learns its name)."""
    if a.user_data is None:
        return base_mixture()
    bundle = user_data.load_bundle(a.user_data).verify(a.user_data_sha256)
    identity = bundle.identity
    a.system_prompt = identity
    local = getattr(a, "source", "hub") == "local"
    chat_default, id_default = local_default_shares if local else cloud_default_shares

    def build(tokenizer, T: int):
        rows, _held = user_data.split_held_out(user_data.conversations(bundle))
        rows = [user_data.with_system(r, identity) for r in user_data.fitting(bundle, rows, tokenizer, T + 1)]
        tasks, shares = [], []
        if rows:
            tasks.append(Conversations(rows, "YourChat"))
            shares.append(a.chat_share if a.chat_share is not None else chat_default)
        if identity:
            tasks.append(Conversations(user_data.identity_conversations(identity), "YourIdentity"))
            shares.append(a.identity_share if a.identity_share is not None else id_default)
        base = base_mixture(identity is not None) if sum(shares) < 1 - 1e-9 else None
        base_epochs, epochs = user_data.share_epochs(len(base) if base is not None else 0,
                                                     [(len(t), s) for t, s in zip(tasks, shares)])
        if base is not None and base_epochs:
            tasks, epochs = [base] + tasks, [base_epochs] + epochs
        mix = TaskMixture(tasks, epochs=epochs, seed=a.seed)
        print0(f"{stage}: your data mixed in: " + ", ".join(f"{t.name} {len(t)} x {e:.2f} epochs"
                                                            for t, e in zip(tasks, epochs))
               + f" = {len(mix):,} conversations")
        return mix
    return build


def chat_reply(model, tokenizer, messages: list[dict], max_tokens: int = 48) -> str:
    """The greedy reply to a conversation (the engine stops at <|assistant_end|>), tool calls as [calc ..]."""
    ids = tokenizer.render_for_completion({"messages": messages})
    with decode_threads(model.get_device()):
        seqs, _ = Engine(model, tokenizer).generate_batch(ids, 1, max_tokens=max_tokens, temperature=0.0, seed=0)
    return readable_text(tokenizer, seqs[0][len(ids):]).strip()


def chat_sample(model, tokenizer, prompt: str, max_tokens: int = 48, system: str | None = None) -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = chat_reply(model, tokenizer, msgs, max_tokens)
    model.train()
    return f"User: {prompt}\nAssistant: {text}"


def train_conversations(stage: str, dataset, a) -> None:
    """Fine-tune the latest checkpoint of the most trained earlier stage on `dataset`; checkpoints to
    run_dir/stage."""
    run = StageRun(stage, a.run_dir, device=a.device, deadline=a.deadline, save_every_minutes=a.save_every_minutes)
    rt, tokenizer = run.rt, run.tokenizer
    init = run.init_checkpoint()
    init_meta = checkpoint.read_meta(init)
    set_seed(a.seed)
    model = run.build_model(init_meta["config"])
    T = model.config.sequence_len
    if callable(dataset) and not hasattr(dataset, "__len__"):   # a mixture that needs the tokenizer and context
        dataset = dataset(tokenizer, T)
    on_gpu = rt.device_type == "cuda"
    if a.device_batch_size:
        B = a.device_batch_size
    elif on_gpu:  # never more rows than pre-training's per-GPU memory preset for this depth allows
        fits = training.preset_device_batch(model.config.n_layer, T, "cuda", device_memory_gb(rt.device))
        B = max(1, min(fits, a.gpu_rows * 2048 // T))
    else:
        B = max(1, 2048 // T)
    per_micro = B * T * rt.world_size
    total_batch = a.total_batch_size or ((a.gpu_total_batch or per_micro) if on_gpu else per_micro)
    grad_accum = max(1, round(total_batch / per_micro))
    lr_scale = (init_meta.get("plan") or {}).get("lr_scale", 1.0) * a.lr_frac
    optimizer = model.setup_optimizer(lr_scale=lr_scale, weight_decay=0.0)
    loader = ConversationLoader(dataset, tokenizer, B, T, rt.rank, rt.world_size, a.seed, rt.device)

    run.attach(model, optimizer)
    step, elapsed_before, warm = 0, 0.0, False
    if run.resume_from:
        meta = run.resume(model, optimizer)
        step, elapsed_before = meta["step"], meta.get("train_seconds", 0.0)
        states = meta["loader_states"]
        loader.load_state_dict(states[rt.rank] if len(states) == rt.world_size else states[0])
        horizon = meta["horizon"]
    else:
        try:
            checkpoint.load_checkpoint(init, model, None if a.no_warm_start else optimizer)
            warm = not a.no_warm_start
        except Exception as e:  # an optimizer state that does not fit: weights alone are fine
            print0(f"warning: could not warm-start the optimizer from {init} ({e}); starting it fresh")
            checkpoint.load_checkpoint(init, model, None)
        epochs = a.epochs if a.epochs is not None else (None if (a.steps or a.minutes) else 1.0)
        horizon = {"epochs": epochs, "steps": a.steps, "minutes": a.minutes, "init": str(init)}
    start_step = step

    epoch_convs = len(loader.order())   # this rank's conversations per epoch

    def progress() -> float:
        p = loader.consumed / (horizon["epochs"] * epoch_convs) if horizon["epochs"] else 0.0
        if horizon["steps"]:
            p = max(p, step / horizon["steps"])
        if horizon["minutes"]:
            p = max(p, (elapsed_before + time.time() - t_loop) / (60 * horizon["minutes"]))
        return min(1.0, p)

    est_steps = horizon["steps"] or 1
    meter = training.ProgressMeter(stage, est_steps, total_batch, model.estimate_flops(), device_peak_flops(rt.device),
                                   rt.world_size, every_steps=a.log_every, elapsed_before=elapsed_before)
    print0(f"{stage}: from {init.parent.name}/{init.name}{' (resumed)' if run.resume_from else ''}, "
           f"{len(dataset):,} conversations, device batch {B} x {T}, grad accum {grad_accum}, lr x{lr_scale:.3g}, "
           f"{'warm' if warm else 'fresh'} optimizer, horizon {horizon['epochs'] or 'any number of'} epoch(s)"
           f"{', ' + str(horizon['steps']) + ' steps' if horizon['steps'] else ''}"
           f"{', ' + str(horizon['minutes']) + ' min' if horizon['minutes'] else ''}")

    def save_now() -> None:
        run.save(step, {"horizon": horizon, "train_seconds": round(meter.elapsed(), 2),
                        "last_loss": meter.last.get("loss"), "plan": init_meta.get("plan"),
                        # what `nanochat chat` / `serve` send as the system prompt by default
                        "system_prompt": getattr(a, "system_prompt", None) or init_meta.get("system_prompt")},
                 loader.state_dict())

    t_loop = time.time()
    model.train()
    done = training.agree(progress() >= 1.0, device=rt.device)[0]
    while not done:
        t0 = time.time()
        training.apply_schedule(optimizer, 1.0 - progress())
        total = None
        for _ in range(grad_accum):
            x, y = loader.next_batch()
            with training.autocast_context(rt.device_type):
                loss = model(x, y, loss_reduction="sum") / (y >= 0).sum().clamp(min=1)
            (loss / grad_accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        step += 1
        p = progress()
        meter.total_steps = max(step, math.ceil(step / max(p, 1e-9))) if not horizon["steps"] else horizon["steps"]
        meter.update(step, total / grad_accum)
        run.guard.note_step(time.time() - t0)
        done, stop, due = training.agree(p >= 1.0, run.guard.should_stop(), run.cadence.due(step), device=rt.device)
        if training.save_or_stop(stop, due, done, save_now, step, run.guard):
            run.stopped = True
            break
    if not run.stopped:
        if step > start_step:  # (re-reading the resume checkpoint could fail: it may have been pruned by now)
            save_now()
        if rt.master:
            emit("sample", stage=stage, text=chat_sample(model, tokenizer, "Who are you?",
                                                        system=getattr(a, "system_prompt", None)))
    run.finish(step)
