"""
Reinforcement learning on GSM8K (the "rl" stage):  python -m nanochat_core.stages.chat_rl --run-dir DIR

Simplified GRPO, as the anchor does it: for each prompt sample N answers with the engine (calculator tool
included), reward each by the task's own answer check (1 correct / 0 not), advantage = reward - mean
reward of that prompt's N samples (no std division, no KL penalty, no PPO ratio/clipping: we are always
on-policy, one gradient step per batch of samples). The loss is -sum(advantage x log p(token)) over the
tokens the model SAMPLED (never the prompt, never the forced tool output), divided by the number of such
tokens in the whole step (token-level normalisation: long answers do not get more weight per token).

Starts from the SFT checkpoint (or mid / base). Checkpoints, resume, deadline and progress events are
base training's. --task arithmetic / spellingbee are offline toy tasks (no download) for trying it out.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from nanochat_core.gpt import checkpoint
from nanochat_core.training import loop as training
from nanochat_core.node.device import device_peak_flops
from nanochat_core.common import NanochatError, emit, print0, run_main, set_seed
from nanochat_core.training.stage_run import StageRun
from nanochat_core.tasks.arithmetic import Arithmetic
from nanochat_core.tasks.gsm8k import GSM8K
from nanochat_core.tasks.spelling import SpellingBee
import torch
import torch.nn.functional as F
import torch.distributed as dist
from nanochat_core.inference.engine import Engine, decode_threads
from nanochat_core.evaluation.runners import run_generative


def load_rl_task(name: str, split: str, data_files: str | None = None):
    if name == "gsm8k":
        return GSM8K("main", split, data_files=data_files)
    if name == "arithmetic":
        return Arithmetic(2000 if split == "train" else 200, split)
    if name == "spellingbee":
        return SpellingBee(2000 if split == "train" else 200, split)
    raise NanochatError(f"--task must be gsm8k, arithmetic or spellingbee, not {name!r}")


def sample_rollouts(engine, tokenizer, conversation: dict, num_samples: int, max_new_tokens: int,
                    temperature: float, top_k: int | None, seed: int):
    """(prompt ids, [sampled ids per sample], [mask per sample: 1 sampled, 0 forced]); the stop token is
    kept (the model must learn to stop), tokens after it are not."""
    prompt = tokenizer.render_for_completion(conversation)
    rows = [[] for _ in range(num_samples)]
    masks = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for column, mask_column in engine.generate(prompt, num_samples, max_tokens=max_new_tokens,
                                               temperature=temperature, top_k=top_k, seed=seed):
        for i, (tok, m) in enumerate(zip(column, mask_column)):
            if done[i]:
                continue
            rows[i].append(tok)
            masks[i].append(m)
            done[i] = tok in engine.stop_ids
    return prompt, rows, masks


def policy_loss(model, prompt: list[int], rows: list[list[int]], masks: list[list[int]], advantages, pad_id: int,
                device) -> Any:
    """-sum(advantage x log p) over sampled tokens (a sum: the caller divides by the step's token count)."""
    n, P = len(rows), len(prompt)
    L = P + max(1, max(len(r) for r in rows))
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    targets = torch.full((n, L - 1), -1, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :P + len(r)] = torch.tensor(prompt + r, dtype=torch.long)
        for j, (tok, keep) in enumerate(zip(r, m)):
            if keep:
                targets[i, P + j - 1] = tok
    ids, targets = ids.to(device), targets.to(device)
    with training.autocast_context(device.type):
        logits = model(ids[:, :-1])
    logp = -F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1,
                            reduction="none").view(n, L - 1)
    adv = torch.as_tensor(advantages, dtype=torch.float32, device=logp.device).view(n, 1)
    return -(logp * adv * (targets >= 0)).sum()


def rl_step(model, optimizer, tokenizer, task, conversations: list[dict], num_samples: int = 16,
            max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = 50, seed: int = 0,
            world_size: int = 1) -> dict:
    """One on-policy update from these prompts (this rank's share). Returns {"reward", "tokens", ...}."""
    device = model.get_device()
    engine = Engine(model, tokenizer)
    batches, rewards_all = [], []
    for k, conv in enumerate(conversations):
        with decode_threads(device):
            prompt, rows, masks = sample_rollouts(engine, tokenizer, conv, num_samples, max_new_tokens, temperature,
                                                  top_k, seed * 1_000_003 + k)
        rewards = [task.reward(conv, tokenizer.decode(r)) for r in rows]
        mean = sum(rewards) / len(rewards)
        batches.append((prompt, rows, masks, [r - mean for r in rewards]))
        rewards_all += rewards
    stats = torch.tensor([sum(sum(m) for b in batches for m in b[2]), sum(rewards_all), len(rewards_all)],
                         dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(stats)
    total_tokens = max(1.0, stats[0].item())
    model.train()
    for prompt, rows, masks, adv in batches:
        if not any(adv):
            continue  # every sample got the same reward: nothing to learn from this prompt
        # x world_size: the optimizer averages gradients over ranks; we want the sum over the global batch
        loss = policy_loss(model, prompt, rows, masks, adv, tokenizer.get_bos_token_id(), device)
        (loss * world_size / total_tokens).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return {"reward": stats[1].item() / max(1.0, stats[2].item()), "tokens": int(total_tokens)}


def evaluate_pass1(model, tokenizer, task, n: int, max_new_tokens: int, rank: int, world: int) -> float:
    c, k = run_generative(model, tokenizer, task, list(range(min(n, len(task)))), rank, world, max_new_tokens)
    counts = torch.tensor([c, k], dtype=torch.float64, device=model.get_device())
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    return (counts[0] / counts[1].clamp(min=1)).item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.stages.chat_rl", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--task", default="gsm8k", help="gsm8k | arithmetic | spellingbee (the last two are offline)")
    p.add_argument("--data-files", default=None, help="a local GSM8K train file (parquet/jsonl) instead of the hub")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one pass over the train split)")
    p.add_argument("--minutes", type=float, default=None, help="stop (cleanly, as done) after this many minutes")
    p.add_argument("--prompts-per-step", type=int, default=16, help="prompts per step, over all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--lr-frac", type=float, default=0.05, help="learning rates as a fraction of base training's")
    p.add_argument("--eval-every", type=int, default=60, help="pass@1 on --eval-examples test prompts every N steps")
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--deadline", type=float, default=None, help="stop and save this many seconds after process start")
    p.add_argument("--save-every-minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    for name in ("steps", "prompts_per_step", "num_samples", "max_new_tokens"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise NanochatError(f"--{name.replace('_', '-')} must be >= 1")
    run = StageRun("rl", a.run_dir, device=a.device, deadline=a.deadline, save_every_minutes=a.save_every_minutes)
    rt, tokenizer = run.rt, run.tokenizer
    train_task = load_rl_task(a.task, "train", a.data_files)
    test_task = None
    if a.eval_every:
        try:
            test_task = load_rl_task(a.task, "test")
        except NanochatError as e:
            print0(f"no periodic eval: {e}")
    init = run.init_checkpoint()
    init_meta = checkpoint.read_meta(init)
    set_seed(a.seed)
    model = run.build_model(init_meta["config"])
    lr = (init_meta.get("plan") or {}).get("lr_scale", 1.0) * a.lr_frac
    optimizer = model.setup_optimizer(lr_scale=lr, weight_decay=0.0)
    run.attach(model, optimizer)
    step, elapsed_before = 0, 0.0
    if run.resume_from:
        meta = run.resume(model, optimizer)
        step, elapsed_before, total_steps = meta["step"], meta.get("train_seconds", 0.0), meta["total_steps"]
    else:
        checkpoint.load_checkpoint(init, model, None)  # fresh optimizer: RL's updates look nothing like SFT's
        total_steps = a.steps or max(1, len(train_task) // a.prompts_per_step)
    start_step = step
    order = list(range(len(train_task)))
    random.Random(a.seed).shuffle(order)
    per_rank = max(1, a.prompts_per_step // rt.world_size)
    meter = training.ProgressMeter("rl", total_steps, 0, model.estimate_flops(), device_peak_flops(rt.device),
                                   rt.world_size, every_steps=1, elapsed_before=elapsed_before)
    print0(f"rl: from {init.parent.name}/{init.name}, task {a.task} ({len(train_task):,} prompts), {total_steps} steps x "
           f"{per_rank * rt.world_size} prompts x {a.num_samples} samples, lr x{lr:.3g}")

    def save_now() -> None:
        run.save(step, {"total_steps": total_steps, "task": a.task, "train_seconds": round(meter.elapsed(), 2),
                        "plan": init_meta.get("plan")})

    t_loop = time.time()
    while step < total_steps:
        t0 = time.time()
        training.apply_schedule(optimizer, 1.0 - step / total_steps)
        first = (step * per_rank * rt.world_size + rt.rank * per_rank)
        convs = [train_task[order[(first + j) % len(order)]] for j in range(per_rank)]
        out = rl_step(model, optimizer, tokenizer, train_task, convs, a.num_samples, a.max_new_tokens,
                      a.temperature, a.top_k or None, seed=a.seed + step, world_size=rt.world_size)
        step += 1
        # RL has no loss to report; the mean reward of the step's samples is its progress measure
        meter.update(step, None, tokens=out["tokens"], reward=round(out["reward"], 4))
        emit("eval", stage="rl", metrics={"reward": round(out["reward"], 4), "step": step})
        run.guard.note_step(time.time() - t0)
        if test_task is not None and a.eval_every and step % a.eval_every == 0:
            acc = evaluate_pass1(model, tokenizer, test_task, a.eval_examples, a.max_new_tokens, rt.rank, rt.world_size)
            print0(f"step {step}: pass@1 {acc:.4f}")
        out_of_time = bool(a.minutes) and elapsed_before + time.time() - t_loop >= 60 * a.minutes
        stop, due, out_of_time = training.agree(run.guard.should_stop(), run.cadence.due(step), out_of_time,
                                                device=rt.device)
        if out_of_time:
            break
        if training.save_or_stop(stop, due, step >= total_steps, save_now, step, run.guard, total_steps):
            run.stopped = True
            break
    if not run.stopped and step > start_step:  # (re-reading the resume checkpoint could fail: it may be pruned)
        save_now()
    run.finish(step)


if __name__ == "__main__":
    run_main(main)
