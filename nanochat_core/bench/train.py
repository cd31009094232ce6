"""
Training throughput benchmark:  python -m nanochat_core.bench train --depth 24 [flags]

Times the real training step (forward, backward, MuonAdamW step - the same pieces base_train uses) on
synthetic tokens and prints ONE JSON line per configuration:
    tokens/s, MFU against the device's datasheet peak AND against a measured matmul peak, peak memory,
    device batch, seconds per step.
Any flag may be a comma list (--depth 12,20,24,26 --compile on,off --attn flex,sdpa): every combination
is run, one JSON line each on stdout, then a summary table on stderr (stdout stays machine-readable).
Numbers, not a test: docs/PERFORMANCE.md records which command produced which row.

Synthetic tokens are fine here: the step's cost does not depend on the token values, and the real loader
runs in background threads that overlap the step.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from nanochat_core.training import loop as training
from nanochat_core.common import NanochatError, device_memory_gb
from nanochat_core.node.device import device_peak_flops, apply_fp8, measure_matmul_peak, open_device, peak_memory_gb, sync
import torch
from nanochat_core.training.loop import preset_device_batch
from nanochat_core.gpt.model import GPT, config_for_depth


def _list(kind):
    def parse(s: str):
        try:
            return [kind(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}, got {s!r}") from None
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.bench train", description=__doc__.split("\n\n")[1])
    p.add_argument("--depth", type=_list(int), default=[12], help="model depth(s), e.g. 12,20,24,26")
    p.add_argument("--device-batch-size", type=_list(int), default=None, help="rows per micro-step (default: base_train's preset)")
    p.add_argument("--seq-len", type=_list(int), default=None, help="default: 2048 on GPU, 256 on CPU")
    p.add_argument("--head-dim", type=int, default=None, help="default: 128 on GPU, 64 on CPU")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--compile", type=_list(str), default=["auto"], help="on | off | auto (auto: on for CUDA)")
    p.add_argument("--attn", type=_list(str), default=["auto"], help="auto | flex | sdpa | reference")
    p.add_argument("--fp8", type=_list(str), default=["off"], help="on | off: FP8 matmuls with tensorwise scaling (torchao, H100+)")
    p.add_argument("--bf16-residual", type=_list(str), default=["off"], help="on | off: residual stream in bf16 under autocast")
    p.add_argument("--compile-muon", type=_list(str), default=["off"], help="on | off: torch.compile Muon's step maths")
    p.add_argument("--gc-freeze", type=_list(str), default=["on"], help="on | off: gc.freeze() after the warm-up steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default: 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on GPU, 1 on CPU)")
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def bench_one(depth: int, B: int | None, T: int, head_dim: int, vocab: int, compile_mode: str, attn: str,
              fp8: str, steps: int, warmup: int, device, device_type: str, matmul_peak: float,
              bf16_residual: str = "off", compile_muon: str = "off", gc_freeze: str = "on") -> dict:

    B = B or preset_device_batch(depth, T, device_type, device_memory_gb(device))
    compiled = compile_mode == "on" or (compile_mode == "auto" and device_type == "cuda")
    row = {"device": torch.cuda.get_device_name(device) if device_type == "cuda" else device_type,
           "depth": depth, "device_batch_size": B, "seq_len": T, "head_dim": head_dim, "vocab_size": vocab,
           "compile": compiled, "attn": attn, "fp8": fp8 == "on", "bf16_residual": bf16_residual == "on",
           "compile_muon": compile_muon == "on", "gc_freeze": gc_freeze == "on",
           "dtype": "bf16 autocast" if device_type == "cuda" else "fp32"}
    config = config_for_depth(depth, vocab, sequence_len=T, head_dim=head_dim)
    config.attn_impl = attn
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if fp8 == "on":
        apply_fp8(model)
    model.residual_bf16 = bf16_residual == "on"
    opt = model.setup_optimizer(compile_muon=compile_muon == "on")
    fwd = torch.compile(model, dynamic=False) if compiled else model
    row["params"] = model.num_params()
    flops_per_token = model.estimate_flops()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    batches = itertools.repeat((x[:, :-1], x[:, 1:]))
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(warmup + steps):
            if i == warmup:
                if gc_freeze == "on":
                    training.freeze_gc()
                sync(device_type)
                t0 = time.perf_counter()
            training.forward_backward(fwd, batches, 1, device_type)
            opt.step()
            model.zero_grad(set_to_none=True)
        sync(device_type)
        dt = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        row.update(oom=True, peak_memory_gb=round(peak_memory_gb(device_type), 2))
        return row
    finally:
        import gc
        gc.unfreeze()
        del opt, fwd, model
        if device_type == "cuda":
            torch.cuda.empty_cache()
        if compiled:
            torch._dynamo.reset()
    tps = B * T * steps / dt
    row.update(
        tokens_per_sec=round(tps, 1), step_s=round(dt / steps, 4),
        mfu_datasheet=round(100 * tps * flops_per_token / device_peak_flops(device), 2),
        mfu_measured=round(100 * tps * flops_per_token / matmul_peak, 2),
        matmul_peak_tflops=round(matmul_peak / 1e12, 4),
        peak_memory_gb=round(peak_memory_gb(device_type), 2),
        flops_per_token=flops_per_token,
    )
    return row


def print_table(rows: list[dict]) -> None:
    cols = ["depth", "device_batch_size", "seq_len", "compile", "attn", "fp8", "bf16_residual", "compile_muon",
            "gc_freeze", "tokens_per_sec", "mfu_datasheet", "mfu_measured", "peak_memory_gb"]
    head = ["depth", "batch", "seq", "compile", "attn", "fp8", "bf16 res", "cmp muon", "gc frz", "tok/s",
            "MFU% sheet", "MFU% meas", "peak GB"]
    cells = [head] + [[("OOM" if r.get("oom") and c == "tokens_per_sec" else str(r.get(c, "-"))) for c in cols]
                      for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = open_device(args.device)
    device_type = device.type
    on_gpu = device_type == "cuda"
    for v in args.compile:
        if v not in ("on", "off", "auto"):
            raise NanochatError(f"--compile takes on, off or auto (got {v!r})")
    for flag in ("fp8", "bf16_residual", "compile_muon", "gc_freeze"):
        for v in getattr(args, flag):
            if v not in ("on", "off"):
                raise NanochatError(f"--{flag.replace('_', '-')} takes on or off (got {v!r})")
    seq_lens = args.seq_len or [2048 if on_gpu else 256]
    head_dim = args.head_dim or (128 if on_gpu else 64)
    steps = args.steps or (10 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    matmul_peak = measure_matmul_peak(device, device_type)
    rows = []
    for depth, B, T, comp, attn, fp8, bres, cmuon, gcf in itertools.product(
            args.depth, args.device_batch_size or [None], seq_lens, args.compile, args.attn, args.fp8,
            args.bf16_residual, args.compile_muon, args.gc_freeze):
        row = bench_one(depth, B, T, head_dim, args.vocab_size, comp, attn, fp8, steps, warmup, device,
                        device_type, matmul_peak, bres, cmuon, gcf)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if len(rows) > 1:
        print_table(rows)


if __name__ == "__main__":
    from nanochat_core.common import run_main
    run_main(main)
