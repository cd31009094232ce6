"""
Preflight: every device path the training stack uses, exercised in about a minute, before money is spent.

    python -m nanochat_core.bench preflight                 # a GPU machine: d12 and d24, the full matrix
    python -m nanochat_core.bench preflight --depth 4       # CPU: the same checks at toy size (CI runs it)
    python -m nanochat_core.training.preflight --depth 20 --matrix train --planned-tokens-per-sec 40000 --events
                                                             # the node pipeline's "preflight" stage

Checks, one table row each, then ONE verdict line (`PREFLIGHT PASS ...` / `PREFLIGHT FAIL: ...`, exit 1):
- train[compile, attn]: real training steps (forward, backward, MuonAdamW) at the device batch the run
  will use: tokens/s, MFU against the datasheet peak and a measured matmul peak, peak memory, finite loss.
  The full matrix is compile on/off x flex/SDPA; `--matrix train` runs only what base_train will run.
  Fails on a non-finite loss, an exception (compile, OOM), under 5% memory headroom, or - given the
  plan's tokens/s - under half of it.
- bf16 vs fp32: the same steps from the same init under bf16 autocast and in fp32; losses must agree.
- fp8: the transformer's matmuls in FP8 (torchao) if the card and the wheel allow it, else skipped.
- attention: flex/SDPA output against the plain fp32 reference on this device.
- decode: KV-cached greedy decode, tokens/s against the memory-bandwidth bound (weights read per token).
- core batch: a CORE-like forward (ragged rows, padded) - and that it did not compile flex again.
- checkpoint: save, load into a fresh model on the device, identical logits.
On CPU, "compile on" uses the aot_eager backend (dynamo + AOT autograd, no C++ codegen): the check is
that our model traces, which is what breaks; inductor's CPU codegen is not what a GPU run depends on.
Only the training stack is imported (no server, no network). A forced failure for tests and drills:
env NANOCHAT_PREFLIGHT_FAIL=<check prefix> (or --fail) marks that check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import traceback

from nanochat_core.common import NanochatError, device_memory_gb, emit
from nanochat_core.node.device import (apply_fp8, copy_bandwidth, device_peak_flops, measure_matmul_peak, open_device,
                                       peak_memory_gb, sync)
import torch
from nanochat_core.gpt.model import GPT, config_for_depth
from nanochat_core.training import loop as training
from nanochat_core.gpt import model as M, checkpoint
from nanochat_core.inference.engine import KVCache
import torch.nn.functional as F

MIN_HEADROOM = 0.05          # fraction of device memory that must stay free at peak
BF16_LOSS_RTOL = 0.03        # bf16 and fp32 losses after a few steps agree to 3%


class Row(dict):
    """One check: name, ok (True / False / None = skipped), note, plus numbers."""


def _build(depth: int, vocab: int, T: int, head_dim: int, attn: str, device):
    cfg = config_for_depth(depth, vocab, sequence_len=T, head_dim=head_dim)
    cfg.attn_impl = attn
    torch.manual_seed(0)
    return GPT.build(cfg, device)


def _batch(B: int, T: int, vocab: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    return x[:, :-1], x[:, 1:]


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _train_steps(model, fwd, opt, batch, steps: int, device, dtype) -> tuple[list[float], float]:
    """The losses of `steps` training steps on one batch, and the seconds they took to the device's last kernel."""
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        with _autocast(device, dtype):
            loss = fwd(*batch)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync(device.type)
    return [float(v) for v in losses], time.perf_counter() - t0


# -----------------------------------------------------------------------------
# The checks. Each returns a Row; exceptions are caught by the caller and become a failed row.

def check_train(s, compile_on: bool, attn: str) -> Row:
    dev = s.device
    model = _build(s.depth, s.vocab, s.T, s.head_dim, attn, dev)
    opt = model.setup_optimizer()
    backend = "inductor" if dev.type == "cuda" else "aot_eager"
    fwd = torch.compile(model, dynamic=False, backend=backend) if compile_on else model
    batch = _batch(s.B, s.T, s.vocab, dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    name = f"train[compile {'on' if compile_on else 'off'}, {attn}]"
    what_base_train_runs = compile_on == s.compile_default and attn in ("auto", s.attn_default)
    try:
        first, warm_s = _train_steps(model, fwd, opt, batch, s.warmup, dev, dtype)
        losses, dt = _train_steps(model, fwd, opt, batch, s.steps, dev, dtype)
    except torch.cuda.OutOfMemoryError:
        if what_base_train_runs:
            raise
        # eager (or SDPA) needs more memory than the compiled flex step the preset batch was sized for:
        # worth a note, not a failed preflight - base_train does not run this configuration
        del model, opt, fwd
        torch.cuda.empty_cache()
        return Row(name=name, ok=None, note=f"OOM at device batch {s.B} (not the configuration base_train runs)")
    finally:
        if compile_on:
            torch._dynamo.reset()
    tps = s.B * s.T * s.steps / dt
    flops = model.estimate_flops()
    row = Row(name=name, tokens_per_sec=round(tps, 1),
              mfu_datasheet=round(100 * tps * flops / device_peak_flops(dev), 2),
              mfu_measured=round(100 * tps * flops / s.matmul_peak, 2), peak_memory_gb=round(peak_memory_gb(dev.type), 2),
              loss=round(losses[-1], 4), warmup_s=round(warm_s, 2), ok=True, note="")
    if not all(math.isfinite(v) for v in first + losses):
        row.update(ok=False, note=f"loss not finite: {losses}")
    elif dev.type == "cuda" and s.memory_gb and row["peak_memory_gb"] > (1 - MIN_HEADROOM) * s.memory_gb:
        row.update(ok=False, note=f"peak memory {row['peak_memory_gb']} GB leaves < {MIN_HEADROOM:.0%} of "
                                  f"{s.memory_gb:.0f} GB free: lower --device-batch-size")
    elif s.planned_tps and what_base_train_runs and tps < 0.5 * s.planned_tps:
        row.update(ok=False, note=f"{tps:,.0f} tokens/s is under half the plan's {s.planned_tps:,.0f} per device")
    elif s.planned_tps:
        row["note"] = f"plan: {s.planned_tps:,.0f} tok/s per device"
    if dev.type != "cuda" and attn == "flex":
        row["note"] = (row["note"] + "; " if row["note"] else "") + "CPU: flex has no backward here, SDPA ran"
    return row


def check_bf16(s) -> Row:
    dev = s.device
    B = min(s.B, 2)
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = _build(s.depth, s.vocab, s.T, s.head_dim, "sdpa", dev)
        opt = model.setup_optimizer()
        # at 10% LR, as in warmup: at full LR on one repeated batch, step 1 is chaotic (Adam with eps 1e-10
        # turns the rounding noise of the residual scalars' near-zero gradients into full steps), which
        # would compare optimizer dynamics rather than the bf16 numerics this check is about
        training.apply_schedule(opt, 0.1)
        results[name] = _train_steps(model, model, opt, _batch(B, s.T, s.vocab, dev, seed=1), 3, dev, dtype)[0]
    a, b = results["fp32"][-1], results["bf16"][-1]
    rel = abs(a - b) / max(abs(a), 1e-9)
    ok = math.isfinite(b) and rel < BF16_LOSS_RTOL
    return Row(name="bf16 vs fp32 loss", loss=round(b, 4), ok=ok,
               note=f"fp32 {a:.4f}, bf16 {b:.4f} after 3 steps (rel diff {rel:.2%}, limit {BF16_LOSS_RTOL:.0%})")


def check_fp8(s) -> Row:
    dev = s.device
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        return Row(name="fp8", ok=None, note="skipped: needs an FP8 GPU (H100/H200/L40S/4090 or newer)")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return Row(name="fp8", ok=None, note="skipped: torchao is not installed")
    model = _build(s.depth, s.vocab, s.T, s.head_dim, "auto", dev)
    apply_fp8(model)
    opt = model.setup_optimizer()
    fwd = torch.compile(model, dynamic=False)
    batch = _batch(s.B, s.T, s.vocab, dev)
    try:
        _train_steps(model, fwd, opt, batch, s.warmup, dev, torch.bfloat16)
        losses, dt = _train_steps(model, fwd, opt, batch, s.steps, dev, torch.bfloat16)
    finally:
        torch._dynamo.reset()
    tps = s.B * s.T * s.steps / dt
    ok = all(math.isfinite(v) for v in losses)
    return Row(name="fp8", tokens_per_sec=round(tps, 1), loss=round(losses[-1], 4), ok=ok,
               note="torchao float8 (tensorwise) on the blocks' Linear layers")


def check_attention(s) -> Row:
    dev = s.device
    q = torch.randn(2, 4, s.T, 64 if s.head_dim >= 64 else s.head_dim, device=dev)
    k = torch.randn(2, 2, s.T, q.size(-1), device=dev)
    v = torch.randn_like(k)
    worst = {}
    for window in (None, max(1, s.T // 4)):
        ref = M.attention_reference(q, k, v, 0, window)
        worst[f"sdpa w={window}"] = (M.attention_sdpa(q, k, v, 0, window) - ref).abs().max().item()
        with torch.no_grad():
            masks = M.flex_block_masks(s.T, [window], dev)
            worst[f"flex w={window}"] = (M.attention_flex(q, k, v, masks[window]) - ref).abs().max().item()
    return Row(name="attention vs reference", ok=all(v2 < 2e-3 for v2 in worst.values()),
               note=("max |diff| " + ", ".join(f"{k2} {v2:.1e}" for k2, v2 in worst.items())))


def check_decode(s) -> Row:
    dev = s.device
    model = _build(s.depth, s.vocab, s.T, s.head_dim, "sdpa", dev).eval()
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    prompt, new = 16, 32 if dev.type == "cuda" else 16
    ids = torch.randint(0, s.vocab, (1, prompt), device=dev)
    cache = KVCache.for_model(model, 1, prompt + new)
    with torch.no_grad():
        logits = model(ids, kv_cache=cache, last_only=True)
        sync(dev.type)
        t0 = time.perf_counter()
        for _ in range(new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(nxt, kv_cache=cache, last_only=True)
        sync(dev.type)
        dt = time.perf_counter() - t0
    tps = new / dt
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = s.bandwidth / weight_bytes
    ok = bool(torch.isfinite(logits).all())
    return Row(name="decode (batch 1, KV cache)", tokens_per_sec=round(tps, 1), ok=ok,
               note=f"{tps / bound:.0%} of the bandwidth bound {bound:,.0f} tok/s "
                    f"({s.bandwidth / 1e9:,.0f} GB/s measured / {weight_bytes / 1e6:,.0f} MB of weights)")


def check_core_batch(s) -> Row:
    dev = s.device
    model = _build(s.depth, s.vocab, s.T, s.head_dim, "auto", dev).eval()
    shapes_before = len(M._FLEX_SHAPES)
    g = torch.Generator().manual_seed(3)
    t0 = time.perf_counter()
    n_tok = 0
    with torch.no_grad(), _autocast(dev, torch.bfloat16 if dev.type == "cuda" else None):
        for n_choices, width in ((4, s.T // 3), (2, s.T // 2 + 5), (4, s.T // 4 + 1)):   # ragged, like CORE
            ids = torch.randint(0, s.vocab, (n_choices, max(2, width)), generator=g).to(dev)
            logits = model(ids).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
            n_tok += ids.numel()
            if not torch.isfinite(loss):
                return Row(name="core batch", ok=False, note="non-finite loss on a CORE-like batch")
    sync(dev.type)
    dt = time.perf_counter() - t0
    grew = len(M._FLEX_SHAPES) - shapes_before
    ok = grew == 0
    return Row(name="core batch (ragged rows)", tokens_per_sec=round(n_tok / dt, 1), ok=ok,
               note="no flex recompiles" if ok else f"{grew} new compiled flex shape(s) for eval lengths")


def check_checkpoint(s) -> Row:
    dev = s.device
    model = _build(s.depth, s.vocab, s.T, s.head_dim, "sdpa", dev)
    opt = model.setup_optimizer()
    batch = _batch(min(s.B, 2), s.T, s.vocab, dev)
    _train_steps(model, model, opt, batch, 1, dev, None)
    with tempfile.TemporaryDirectory(dir=s.workdir) as tmp:
        t0 = time.perf_counter()
        path = checkpoint.save_checkpoint(tmp, 1, model, opt, {"stage": "preflight"})
        save_s = time.perf_counter() - t0
        fresh = _build(s.depth, s.vocab, s.T, s.head_dim, "sdpa", dev)
        opt2 = fresh.setup_optimizer()
        t0 = time.perf_counter()
        checkpoint.load_checkpoint(path, fresh, opt2)
        load_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    model.eval(), fresh.eval()
    with torch.no_grad():
        same = torch.equal(model(batch[0]), fresh(batch[0]))
    return Row(name="checkpoint round trip", ok=same,
               note=f"save {save_s:.2f} s, load {load_s:.2f} s, {size_mb:,.1f} MB"
                    + ("" if same else "; loaded model's logits differ"))


# -----------------------------------------------------------------------------

def run(s) -> tuple[list[Row], bool]:
    rows: list[Row] = []
    forced = (s.fail or os.environ.get("NANOCHAT_PREFLIGHT_FAIL") or "").strip()

    def attempt(name: str, fn, *a) -> None:
        t0 = time.perf_counter()
        try:
            row = fn(s, *a)
        except Exception as e:   # an exception IS the finding: the row says which path broke and how
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if s.verbose:
                traceback.print_exc()
            row = Row(name=name, ok=False, note=msg)
        if forced and row["name"].startswith(forced):
            row.update(ok=False, note=f"forced failure (NANOCHAT_PREFLIGHT_FAIL={forced})")
        row["name"] = f"d{s.depth} {row['name']}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if s.events:
            emit("preflight_check", **row)
        print(f"  {'ok  ' if row['ok'] else 'skip' if row['ok'] is None else 'FAIL'} {row['name']} "
              f"({row['seconds']} s)", file=sys.stderr, flush=True)

    s.matmul_peak = measure_matmul_peak(s.device, s.device.type)
    s.bandwidth = copy_bandwidth(s.device, 1024 if s.device.type == "cuda" else 64)
    for compile_on, attn in s.matrix:
        attempt(f"train[compile {'on' if compile_on else 'off'}, {attn}]", check_train, compile_on, attn)
    attempt("bf16 vs fp32 loss", check_bf16)
    attempt("fp8", check_fp8)
    attempt("attention vs reference", check_attention)
    attempt("decode (batch 1, KV cache)", check_decode)
    attempt("core batch (ragged rows)", check_core_batch)
    attempt("checkpoint round trip", check_checkpoint)
    return rows, all(r["ok"] is not False for r in rows)


def print_table(rows: list[Row], out=sys.stdout) -> None:
    cols = [("check", "name"), ("result", "ok"), ("tok/s", "tokens_per_sec"), ("MFU% sheet", "mfu_datasheet"),
            ("MFU% meas", "mfu_measured"), ("peak GB", "peak_memory_gb"), ("loss", "loss"), ("s", "seconds"),
            ("note", "note")]
    def cell(r, key):
        if key == "ok":
            return "ok" if r["ok"] else "skip" if r["ok"] is None else "FAIL"
        v = r.get(key, "")
        return f"{v:,}" if isinstance(v, float) and key == "tokens_per_sec" else str(v)
    cells = [[h for h, _ in cols]] + [[cell(r, k) for _, k in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols) - 1)]
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1], file=out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.bench preflight", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", default=None, help="comma list (default: 12,24 on GPU, 4 on CPU)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per device (default: base_train's preset)")
    p.add_argument("--seq-len", type=int, default=None, help="default: 2048 on GPU, 64 on CPU")
    p.add_argument("--head-dim", type=int, default=None, help="default: 128 on GPU, 32 on CPU")
    p.add_argument("--vocab-size", type=int, default=None, help="default: 32768 on GPU, 512 on CPU")
    p.add_argument("--matrix", choices=["full", "train"], default="full",
                   help="full: compile on/off x flex/SDPA; train: only the configuration base_train uses")
    p.add_argument("--steps", type=int, default=None, help="timed steps per train check (default 5 GPU, 2 CPU)")
    p.add_argument("--planned-tokens-per-sec", type=float, default=None,
                   help="the plan's tokens/s per device: the train check fails under half of it")
    p.add_argument("--events", action="store_true", help="emit preflight_check events (the node pipeline)")
    p.add_argument("--fail", default=None, help="force the named check to fail (drills and tests)")
    p.add_argument("--workdir", default=None, help="where the checkpoint check writes (default: a temp dir)")
    p.add_argument("--device", default=None)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed checks")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    device = open_device(a.device)
    dev_type = device.type
    on_gpu = dev_type == "cuda"
    try:
        depths = [int(d) for d in (a.depth or ("12,24" if on_gpu else "4")).split(",") if d.strip()]
    except ValueError:
        raise NanochatError(f"--depth takes a comma list of integers, got {a.depth!r}") from None
    if not depths or min(depths) < 1:
        raise NanochatError("--depth must be >= 1")
    t_start = time.time()
    all_rows, passed = [], True
    for depth in depths:
        s = argparse.Namespace(**vars(a))
        s.device, s.depth = device, depth
        s.T = a.seq_len or (2048 if on_gpu else 64)
        s.head_dim = a.head_dim or (128 if on_gpu else 32)
        s.vocab = a.vocab_size or (32768 if on_gpu else 512)
        s.memory_gb = device_memory_gb(device) if on_gpu else None
        s.B = a.device_batch_size or training.preset_device_batch(depth, s.T, dev_type, s.memory_gb)
        s.steps = a.steps or (5 if on_gpu else 2)
        s.warmup = 3 if on_gpu else 1
        s.planned_tps = a.planned_tokens_per_sec
        s.compile_default, s.attn_default = on_gpu, "flex" if on_gpu else "sdpa"
        s.matrix = ([(c, at) for c in (True, False) for at in ("flex", "sdpa")] if a.matrix == "full"
                    else [(on_gpu, "auto")])
        if s.workdir:
            os.makedirs(s.workdir, exist_ok=True)
        name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
        print(f"preflight: d{depth}, device batch {s.B} x {s.T}, vocab {s.vocab}, {name}, torch {torch.__version__}",
              file=sys.stderr, flush=True)
        rows, ok = run(s)
        all_rows += rows
        passed = passed and ok
    print_table(all_rows)
    secs = time.time() - t_start
    if passed:
        verdict = f"PREFLIGHT PASS: {len(all_rows)} checks, {sum(r['ok'] is None for r in all_rows)} skipped, {secs:.0f} s"
    else:
        verdict = "PREFLIGHT FAIL: " + "; ".join(f"{r['name']}: {r['note']}" for r in all_rows if r["ok"] is False)
    print(verdict, flush=True)
    if a.events:
        if passed:
            emit("preflight", ok=True, seconds=round(secs, 1))
        else:
            emit("error", stage="preflight", message=verdict)
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    from nanochat_core.common import run_main
    run_main(main)
