"""
Pre-training (the "base" stage):  python -m nanochat_core.stages.base_train --run-dir DIR [--depth N] ...
                         several GPUs: torchrun --standalone --nproc_per_node=8 -m nanochat_core.stages.base_train ...

One dial, --depth. Everything else is derived from it (and from the hardware) in `make_plan`, with the
rule and its source written next to each line. The plan is stored in every checkpoint; a restarted run
(same command, same run dir) finds the latest intact checkpoint, takes the plan from it - NOT from the
flags or from a fresh timing - and continues on exactly the same curve. On CPU the continuation is bit
for bit the same as a run that was never interrupted (tested with kill -9).

Time-bounded runs (--minutes): the LR warmdown and the Muon weight-decay decay are driven by the fraction
of the time budget used (training.TimeHorizon), so the run reaches the end of its schedule at its deadline
however its throughput changes, and says so loudly when it got far fewer steps than planned.

Stopping: SIGTERM (spot preemption notice) or a deadline (--deadline / env NANOCHAT_DEADLINE, set by the
budget guard) -> save a checkpoint, exit 0. Ctrl-C -> save, exit 130. Ctrl-C twice -> exit at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

from nanochat_core.gpt import checkpoint
from nanochat_core.training import loop as training
from nanochat_core.node.device import allow_tf32, device_peak_flops
from nanochat_core.common import NanochatError, data_dir, device_memory_gb, emit, print0, run_main, set_seed
from nanochat_core.training.stage_run import StageRun
from nanochat_core.training.loop import preset_device_batch
from nanochat_core.gpt.model_config import GPTConfig, config_for_depth, count_params, flops_per_token
import torch
from nanochat_core.inference.calculator import readable_text
from nanochat_core.data.dataloader import DataLoader
from nanochat_core.data.dataset import ensure_bundled

STAGE = "base"

# -----------------------------------------------------------------------------
# Reference point of the scaling rules (docs/ARCHITECTURE.md, recipe facts): the d12 model at vocab 32768, seq 2048 trains with a
# total batch of 2^19 tokens; the optimal batch grows as (training tokens)^0.383 ("Power Lines"); since
# tokens = ratio x scaling params ~ depth^3, that is ~ depth^1.15 - which lands on 2^19 at d12 and 2^20
# for d18-d26, as in the reference runs.
B_REF = 2 ** 19
REF_DEPTH, REF_VOCAB, REF_SEQ = 12, 32768, 2048
BATCH_EXPONENT = 0.383
DEFAULT_RATIO = 10.0        # tokens : scaling params; the reference uses 8-12 (Chinchilla's 20 is for
                            # compute-optimal loss, not the time-optimal GPT-2-grade run)
WEIGHT_DECAY_REF = 0.28     # Muon weight decay at the reference point
MAX_DECAY_PER_STEP = 0.01   # cap on lr x wd for very short runs (see make_plan)

# A fixed CPU run compiles (--compile auto) when it is at least this long and its steps this heavy.
CPU_COMPILE_MIN_STEPS = 50
CPU_COMPILE_MIN_STEP_FLOPS = 20e9


def compile_pays_on_cpu(plan: dict) -> bool:
    """Whether torch.compile pays for itself in a CPU run of this plan. It costs ~20-40 s once and then runs the
    local d4 model ~4x faster (measured at d4, seq 256: 2,060 vs 470 tok/s, i.e. ~1.0 vs ~4.4 s per 2,048-token
    step), so it is repaid after a dozen such steps; a model whose step is a few GFLOP is bound by Python
    overhead and gains little. So: yes for a --minutes run, and for a fixed run of at least CPU_COMPILE_MIN_STEPS
    steps of at least CPU_COMPILE_MIN_STEP_FLOPS (the local preset: 200 steps of 54 GFLOP); no for tests and smoke
    runs. Decided from the plan alone - never from a timing, nor from where a resume starts: compiled and eager
    differ in the last bits, and the same command must give the same model on a busy machine as on an idle
    one, resumed or not."""
    if plan["horizon"].startswith("--minutes"):
        return True
    step_flops = flops_per_token(GPTConfig.from_dict(plan["config"])) * plan["total_batch_size"]
    return plan["total_steps"] >= CPU_COMPILE_MIN_STEPS and step_flops >= CPU_COMPILE_MIN_STEP_FLOPS


def power_of_two(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


# -----------------------------------------------------------------------------
# The plan: everything derived from the flags, the tokenizer and the hardware, fixed at the first start

def make_plan(args, vocab_size: int, world_size: int, device_type: str) -> dict:
    config = config_for_depth(args.depth, vocab_size, sequence_len=args.seq_len, head_dim=args.head_dim)
    n_scaling = count_params(config)["scaling"]
    ref_scaling = reference_scaling_params()
    T = args.seq_len
    B = args.device_batch_size or preset_device_batch(args.depth, T, device_type, device_memory_gb())
    if args.total_batch_size:
        total = args.total_batch_size
    elif device_type == "cuda":
        total = power_of_two(B_REF * (n_scaling / ref_scaling) ** BATCH_EXPONENT)
    else:
        # A toy CPU run lives on many small steps: even the d4 Power-Lines batch (~2^17 tokens) would give a
        # handful of steps in minutes. So on CPU the batch is what one micro-step of all ranks holds.
        total = B * T * world_size
    total = max(total, T * world_size)
    B = fit_device_batch(total, B, T, world_size, explicit=bool(args.device_batch_size))
    plan = {
        "depth": args.depth, "config": dataclasses.asdict(config), "scaling_params": n_scaling,
        "total_batch_size": total, "seq_len": T, "seed": args.seed,
    }
    if args.steps:
        plan["total_steps"], plan["horizon"] = args.steps, f"--steps {args.steps}"
    elif args.minutes:
        plan["total_steps"], plan["horizon"] = None, f"--minutes {args.minutes}"   # set after timing a step
    else:
        ratio = args.target_param_data_ratio
        plan["total_steps"] = max(1, round(ratio * n_scaling / total))
        plan["horizon"] = f"{ratio} x {n_scaling:,} scaling params"
    # LR ~ sqrt(B / B_ref) (the square-root rule for adaptive optimizers). On CPU the batch is ~256x below
    # B_ref on purpose (see above); scaling the LRs down 16x there made toy runs barely learn, so CPU keeps
    # the reference LRs.
    plan["lr_scale"] = math.sqrt(total / B_REF) if device_type == "cuda" else 1.0
    plan["device_batch_size"] = B
    return plan


def reference_scaling_params() -> int:
    return count_params(config_for_depth(REF_DEPTH, REF_VOCAB, sequence_len=REF_SEQ))["scaling"]


def finish_plan(plan: dict) -> None:
    """Derivations that need the horizon: weight decay and warmup."""
    steps = plan["total_steps"]
    ref_steps = DEFAULT_RATIO * reference_scaling_params() / B_REF
    # Weight decay (Muon; the peak value - it decays linearly to 0 over the run, as in the reference run
    # whose 0.28 it scales): keep the total decay over training (sum of lr x wd over steps) equal to the reference
    # run's - the "AdamW timescale" argument, equivalent to wd ~ sqrt(B/B_ref) x D_ref/D when LR ~ sqrt(B).
    # Very short runs would get a huge per-step decay from that, so lr x wd is capped at 1% per step.
    matrix_lr = 0.02 * plan["lr_scale"]
    wd = WEIGHT_DECAY_REF * (0.02 / matrix_lr) * (ref_steps / steps)
    plan["weight_decay"] = min(wd, MAX_DECAY_PER_STEP / matrix_lr)
    # Warmup: short - 2% of the run, at most 40 steps (the reference warms up for a few dozen steps).
    plan["warmup_steps"] = min(40, max(1, steps // 50))


def fit_device_batch(total: int, B: int, T: int, world: int, explicit: bool) -> int:
    """Largest device batch <= B whose micro-step (B x T x world tokens) divides the total batch."""
    b = B
    while b >= 1 and total % (b * T * world) != 0:
        b -= 1
    if b < 1:
        raise NanochatError(f"total batch {total} tokens is not a multiple of seq_len x world size ({T} x {world}): "
                            "pick --total-batch-size as a multiple of that")
    if explicit and b != B:
        raise NanochatError(f"--device-batch-size {B} does not divide the total batch ({total} tokens = "
                            f"{total // (T * world)} rows over {world} rank(s)); try {b}")
    return b


# -----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.stages.base_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="tokenizer in RUN_DIR/tokenizer, checkpoints to RUN_DIR/base")
    p.add_argument("--depth", type=int, default=None, help="the one model dial (width = 64 x depth; default 20, or the run's)")
    p.add_argument("--data", type=Path, default=None, help="directory of parquet shards (default: the bundled corpus)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (default 2048, or the run's)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head size (tiny models: 32 or 64)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per GPU per micro-step (default: per-GPU preset)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step (default: derived from depth)")
    p.add_argument("--steps", type=int, default=None, help="horizon: a fixed number of steps")
    p.add_argument("--minutes", type=float, default=None, help="horizon: this many minutes; the LR schedule follows the clock and ends at the deadline")
    p.add_argument("--target-param-data-ratio", type=float, default=DEFAULT_RATIO, help="horizon: tokens = ratio x scaling params")
    p.add_argument("--eval-every", type=int, default=None, help="val bits-per-byte every N steps (default: 250 on GPU, only at the end on CPU)")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per evaluation")
    p.add_argument("--save-every-minutes", type=float, default=None, help="checkpoint cadence in minutes (default 20 on GPU, 1 on CPU)")
    p.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--deadline", type=float, default=None, help="stop and save before this many seconds after process start")
    p.add_argument("--log-every", type=int, default=0, help="progress event every N steps (default: about every 2 s)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--muon-wd-schedule", choices=["decay", "constant"], default="decay",
                   help="Muon weight decay: decay linearly to 0 over the run (default), or constant (ablations)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile (auto: on for CUDA; on CPU for a --minutes run or a long enough fixed one)")
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: autodetect)")
    # speed switches (docs/PERFORMANCE.md: `bench train` sweeps them; defaults change only on measurements)
    p.add_argument("--bf16-residual", choices=["on", "off"], default="off",
                   help="keep the residual stream in bf16 under autocast (CUDA)")
    p.add_argument("--compile-muon", choices=["on", "off"], default="off", help="torch.compile Muon's step maths")
    p.add_argument("--gc-freeze", choices=["on", "off"], default="on",
                   help="freeze the garbage collector's view of everything alive after the first step")
    a = p.parse_args(argv)
    for name in ("depth", "seq_len", "head_dim", "device_batch_size", "total_batch_size", "steps"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise NanochatError(f"--{name.replace('_', '-')} must be >= 1 (got {v})")
    if a.minutes is not None and a.minutes <= 0:
        raise NanochatError("--minutes must be > 0")
    return a


def make_optimizer(model, plan: dict, compile_muon: bool = False):
    return model.setup_optimizer(lr_scale=plan["lr_scale"], weight_decay=plan["weight_decay"], compile_muon=compile_muon)


def time_one_step(model, fwd, optimizer, B: int, T: int, grad_accum: int, device, device_type: str) -> float:
    """Seconds per optimizer step on random tokens: 5 warm-up steps, then the median of 5. The first
    steps after torch.compile run slow for a while (measured on CPU at d4: 3.9, 2.2, 0.9, 1.0, 0.5, 3.4 s,
    then a steady 0.54 s), and the median ignores one step that a busy machine stretched.
    Used once, to turn --minutes into a PLANNED number of steps (warmup and weight decay are sized by it;
    the schedule itself follows the clock); the caller re-initialises model and optimizer. Random tokens, not the loader: a fresh loader's first seconds are spent tokenising ahead
    and would make the steady-state step look several times slower than it is on a small CPU."""
    g = torch.Generator().manual_seed(0)
    def batches():
        while True:
            x = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=g).to(device)
            yield x[:, :-1], x[:, 1:]
    it = batches()
    times = []
    for _ in range(10):
        t0 = time.time()
        training.forward_backward(fwd, it, grad_accum, device_type)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    return statistics.median(times[5:])


def compile_probe(fwd, model, B: int, T: int, device) -> None:
    """One forward/backward of the (compiled) model on random tokens: compiles its training graph now. The
    caller clears the gradients; no optimizer step is taken, so the weights are untouched."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=g).to(device)
    fwd(x[:, :-1], x[:, 1:]).backward()


def greedy_sample(model, tokenizer, prompt: str, max_tokens: int, device) -> str:
    """A few greedy tokens without a KV cache: enough to show the model is alive at the end of a stage."""
    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
    n0 = len(ids)
    with torch.no_grad():
        for _ in range(max_tokens):
            ctx = torch.tensor([ids[-model.config.sequence_len:]], device=device)
            ids.append(int(model(ctx)[0, -1].argmax()))
    return prompt + readable_text(tokenizer, ids[n0:])


# -----------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    run = StageRun(STAGE, args.run_dir, device=args.device, deadline=args.deadline,
                   save_every_minutes=args.save_every_minutes, save_every_steps=args.save_every_steps,
                   gpu_save_minutes=20.0)
    rt, guard, tokenizer, stage_dir = run.rt, run.guard, run.tokenizer, run.stage_dir
    if rt.device_type == "cuda":
        allow_tf32()
    data = args.data or data_dir() / "bundled"
    if args.data is None:   # the bundled corpus, unpacked once (rank 0) for every rank
        if rt.master:
            ensure_bundled(data)
        checkpoint.barrier()

    # Resume point first: if there is one, its plan wins over flags and timing (exact continuation).
    found = run.resume_from
    if found:
        plan = checkpoint.read_meta(found)["plan"]
        if (args.depth or plan["depth"]) != plan["depth"] or (args.seq_len or plan["seq_len"]) != plan["seq_len"]:
            raise NanochatError(f"{stage_dir} holds a depth-{plan['depth']} seq-{plan['seq_len']} run: pass the same "
                                "flags to resume, or use a new --run-dir")
        if (args.steps and args.steps != plan["total_steps"]) or (args.minutes and plan["horizon"] != f"--minutes {args.minutes}"):
            print0(f"note: continuing the stored horizon ({plan['total_steps']} steps, {plan['horizon']}); "
                   "a different horizon needs a new --run-dir")
        plan["device_batch_size"] = fit_device_batch(plan["total_batch_size"], args.device_batch_size or
                                                     preset_device_batch(plan["depth"], plan["seq_len"], rt.device_type,
                                                                         device_memory_gb()),
                                                     plan["seq_len"], rt.world_size, bool(args.device_batch_size))
    else:
        args.depth, args.seq_len = args.depth or 20, args.seq_len or 2048
        plan = make_plan(args, tokenizer.get_vocab_size(), rt.world_size, rt.device_type)
    B, T = plan["device_batch_size"], plan["seq_len"]
    grad_accum = plan["total_batch_size"] // (B * T * rt.world_size)
    # torch.compile: always on CUDA; on CPU where it pays for itself in this run (compile_pays_on_cpu).
    pays_on_cpu = compile_pays_on_cpu(plan)
    compile_model = args.compile == "on" or (args.compile == "auto" and (
        rt.device_type == "cuda" or (rt.device_type == "cpu" and pays_on_cpu)))

    if compile_model and rt.device_type == "cpu":
        # The compiled backward of the embeddings accumulates with atomic adds across OpenMP threads, in whatever
        # order the threads get there: two runs of the same command differed in the weights after 6 steps
        # (measured at d4: wte by up to 0.011, Adam amplifying rounding noise in rare tokens' rows). In
        # deterministic mode inductor hands that accumulation to the serial eager kernel instead: the same
        # command gives the same weights, busy machine or not.
        torch.use_deterministic_algorithms(True, warn_only=True)
    set_seed(plan["seed"])
    model = run.build_model(plan["config"])
    fwd = torch.compile(model, dynamic=False) if compile_model else model
    # Until the first save is timed, assume rank 0 writes the fp32 weights plus its share of ~2x that in
    # optimizer state at ~300 MB/s: the deadline guard must stop early enough to save a big model too.
    n = model.num_params()
    guard.note_save(max(1.0, (4 * n + 8 * n / rt.world_size) / 300e6))
    if compile_model and rt.device_type == "cpu" and args.compile == "auto":
        # Compile now, on one forward/backward of random tokens (no optimizer step: the weights stay as they
        # are), so that a machine whose inductor cannot compile (no working C++ toolchain) trains eager instead
        # of failing at its first step: a speed-up must not end the run.
        try:
            compile_probe(fwd, model, B, T, rt.device)
        except Exception as e:
            print0(f"note: torch.compile is not usable here ({type(e).__name__}: {str(e)[:120]}); training eager")
            torch._dynamo.reset()
            fwd, compile_model = model, False
        model.zero_grad(set_to_none=True)
    if plan["total_steps"] is None:  # --minutes: time a step once, fix the horizon, store it in the plan
        opt = make_optimizer(model, {**plan, "weight_decay": 0.0})
        step_s = time_one_step(model, fwd, opt, B, T, grad_accum, rt.device, rt.device_type)
        reserve = 0.1  # of the minutes: room for the final eval, save and sample
        budget = args.minutes * 60 * (1 - reserve) - (time.time() - training.process_start_time())
        # The timed step gives the PLANNED step count (it sets warmup and weight decay, and is what a slow
        # run is compared against); the schedule itself follows the clock (training.TimeHorizon).
        budget = checkpoint.broadcast(budget)   # rank 0's numbers for all
        plan["total_steps"] = checkpoint.broadcast(max(1, int(budget / step_s)))
        plan["time_budget_s"] = round(max(budget, 0.0), 3)
        plan["timed_step_s"] = round(step_s, 4)
        del opt
        set_seed(plan["seed"])
        model.init_weights()  # back to the exact initial weights: the timing steps leave no trace
        model.zero_grad(set_to_none=True)
    if args.minutes:  # a hard cap as well (also for a resumed run): stop and save if the machine got slower
        cap = training.process_start_time() + args.minutes * 60
        guard.deadline = cap if guard.deadline is None else min(guard.deadline, cap)
    if "warmup_steps" not in plan:
        finish_plan(plan)
    optimizer = make_optimizer(model, plan, compile_muon=args.compile_muon == "on")
    run.attach(model, optimizer)
    model.residual_bf16 = args.bf16_residual == "on"
    total_steps = plan["total_steps"]

    loader = DataLoader(tokenizer, B, T, data, split="train", rank=rt.rank, world_size=rt.world_size,
                        device=rt.device, seed=plan["seed"])
    step, elapsed_before = 0, 0.0
    if found:
        meta = run.resume(model, optimizer)
        step, elapsed_before = meta["step"], meta.get("train_seconds", 0.0)
        loader.load_state_dict(meta["loader_states"])
        if meta["world_size"] == rt.world_size:
            checkpoint.restore_rng_state(meta["rng_states"][rt.rank])
    batches = iter(loader)
    start_step = step

    tokens_per_step = plan["total_batch_size"]
    print0(f"base: depth {plan['depth']}, {model.num_params():,} params ({plan['scaling_params']:,} scaling), "
           f"{total_steps} steps x {tokens_per_step:,} tokens ({plan['horizon']}), device batch {B} x {T}, "
           f"grad accum {grad_accum}, world {rt.world_size}, lr scale {plan['lr_scale']:.3g}, "
           f"wd {plan['weight_decay']:.3g}, warmup {plan['warmup_steps']}, {rt.device_type}"
           f"{', compiled' if compile_model else ''}")
    on_gpu = rt.device_type == "cuda"
    eval_every = args.eval_every if args.eval_every is not None else (250 if on_gpu else 0)
    eval_tokens = args.eval_tokens or (10 * 2**20 if on_gpu else 8 * B * T * rt.world_size)
    eval_steps = max(1, eval_tokens // (B * T * rt.world_size))
    token_bytes = tokenizer.token_bytes().to(rt.device)
    meter = training.ProgressMeter(STAGE, total_steps, tokens_per_step, model.estimate_flops(),
                                   device_peak_flops(rt.device), rt.world_size, every_steps=args.log_every,
                                   elapsed_before=elapsed_before)

    def run_eval() -> float:
        val = DataLoader(tokenizer, B, T, data, split="val", rank=rt.rank, world_size=rt.world_size,
                         device=rt.device, seed=0)  # a fresh loader: every eval sees the same tokens
        # CPU evaluates eager: the loss_reduction="none" graph would be a second ~20 s compile for one eval
        bpb = training.evaluate_bpb(fwd if on_gpu else model, iter(val), eval_steps, token_bytes, rt.device_type)
        val.close()
        emit("eval", stage=STAGE, metrics={"val_bpb": round(bpb, 6), "step": step})
        return bpb

    def save_now() -> None:
        run.save(step, {"plan": plan, "train_seconds": round(meter.elapsed(), 2), "last_loss": meter.last.get("loss")},
                 loader.state_dict())

    # A time-bounded run (--minutes) follows the clock: its schedules are driven by the fraction of its
    # time budget used, and it ends - at the end of the warmdown - when the next step would overrun.
    horizon = None
    if plan.get("time_budget_s") is not None:
        hard_end = guard.deadline - guard.margin() if guard.deadline is not None else None
        horizon = training.TimeHorizon(plan["time_budget_s"], elapsed_before, hard_end)

    def progress() -> float:
        return horizon.progress() if horizon else step / total_steps

    model.train()
    done = training.agree(horizon.done() if horizon else step >= total_steps, device=rt.device)[0]
    while not done:
        t0 = time.time()
        frac = progress()
        lr_mult = (training.lr_multiplier_at(frac, step, plan["warmup_steps"]) if horizon
                   else training.lr_multiplier(step, total_steps, plan["warmup_steps"]))
        training.apply_schedule(optimizer, lr_mult, training.muon_momentum(step, progress=frac),
                                training.muon_weight_decay_multiplier(frac) if args.muon_wd_schedule == "decay" else 1.0)
        loss = training.forward_backward(fwd, batches, grad_accum, rt.device_type)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        step += 1
        guard.note_step(time.time() - t0)
        if horizon:
            horizon.note_step(time.time() - t0)
            if guard.deadline is not None:   # end before the guard would have to cut the run short
                horizon.limit(guard.deadline - guard.margin())
            finished = horizon.done()
            meter.total_steps = step if finished else horizon.steps_estimate(step)
        else:
            finished = step >= total_steps
        if step == start_step + 1 and args.gc_freeze == "on":
            training.freeze_gc()   # after the first step: compiled graphs and loader tables now exist
        meter.update(step, loss)
        if eval_every and step % eval_every == 0 and not finished:
            run_eval()
        stop, due, done = training.agree(guard.should_stop(), run.cadence.due(step), finished, device=rt.device)
        if training.save_or_stop(stop, due, done, save_now, step, guard, meter.total_steps):
            run.stopped = True
            break
    if horizon and step < 0.5 * total_steps:
        print0(f"WARNING: this run trained only {step} steps of the {total_steps} planned for its "
               f"{plan['horizon']} (the machine ran slower than when it was timed); the schedule still "
               "finished, but the model is undertrained - give it more time or a less busy machine")

    if not run.stopped:
        bpb = run_eval()
        if step > start_step:  # else: this run did nothing new (it was already complete)
            save_now()
    if rt.master and (not run.stopped or guard.signum is None):  # a deadline stop still shows a sample; a signal does not wait
        emit("sample", stage=STAGE, text=greedy_sample(model, tokenizer, "The", 24, rt.device))
    loader.close()  # cancel queued tokenisation work so the process can exit promptly
    run.finish(step, **({} if run.stopped else {"val_bpb": round(bpb, 6), "planned_steps": total_steps}))


if __name__ == "__main__":
    run_main(main)
