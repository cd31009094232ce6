"""
Evaluate a base model:  python -m nanochat_core.stages.base_eval --run-dir DIR [--data DIR] [--max-per-task N]

- CORE: DCLM's 22 in-context tasks, centred accuracy, the mean (tasks/core.py). Needs the eval bundle
  (downloaded once, ~162 MB); without it CORE is listed as unavailable.
- bpb: bits per byte on the validation shard (the last parquet shard of --data), the vocab-independent loss.
- samples: a few greedy completions, printed and emitted as `sample` events.
Distributed across ranks under torchrun. Writes run_dir/eval/<stage>.json (stage = base by default).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from nanochat_core.gpt import checkpoint
from nanochat_core.training import loop as training
from nanochat_core.common import (TRAINED_STAGES, NanochatError, cleanup_runtime, data_dir, device_memory_gb, emit,
                                  init_runtime, print0, run_main)
from nanochat_core.training.loop import preset_device_batch
from nanochat_core.inference.calculator import readable_text
from nanochat_core.inference.engine import Engine, decode_threads
from nanochat_core.tasks import core
from nanochat_core.data.dataloader import DataLoader
from nanochat_core.data.dataset import ensure_bundled, split_shards
import pyarrow.parquet as pq
from nanochat_core.evaluation.runners import merge_record
from nanochat_core.gpt.quantize import DTYPES
from nanochat_core.common import atomic_write_json

PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
           "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
           "If 5*x + 3 = 13, then x is"]


def bpb_device_batch(depth: int, seq_len: int, device_type: str, memory_gb: float | None) -> int:
    """Rows per device for the bpb eval: base_train's per-GPU preset for this depth and card. A fixed 32 x 2048
    would hold 8.6 GB of fp32 logits alone at vocab 32K - too much on a 24 GB card next to a d20 model.
    (No activations are kept for backward here, so the training preset leaves room to spare.)"""
    return preset_device_batch(depth, seq_len, device_type, memory_gb)


def greedy_complete(model, tokenizer, prompt: str, max_tokens: int = 24) -> str:
    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
    seqs, _ = Engine(model, tokenizer).generate_batch(ids, 1, max_tokens=max_tokens, temperature=0.0, seed=0)
    return prompt + readable_text(tokenizer, seqs[0][len(ids):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.stages.base_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--stage", default="base", choices=TRAINED_STAGES[::-1], help="which checkpoint to evaluate")
    p.add_argument("--data", type=Path, default=None, help="parquet shards; the last is validation (default: bundled)")
    p.add_argument("--max-per-task", type=int, default=0, help="CORE examples per task, 0 = all")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens for bpb (default 10M GPU / 8 batches CPU)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per device for bpb")
    p.add_argument("--skip", default="", help="comma list of parts to skip: core, bpb, samples")
    p.add_argument("--docs", type=Path, default=None,
                   help="also bpb on the held-out slice (the last shard) of your documents (metric docs_bpb)")
    p.add_argument("--if-present", action="store_true", help="no checkpoint of --stage: nothing to do (not an error)")
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="evaluate this checkpoint dir (or stage dir) instead of the stage's latest")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights to evaluate with (quantize.py; default: what training evaluated with: fp32 on a "
                        "CPU, bf16 on a GPU)")
    a = p.parse_args(argv)
    if a.if_present and not (a.run_dir / a.stage).is_dir():
        print(f"base_eval: no {a.stage} checkpoint; skipped")
        return
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - {"core", "bpb", "samples"}:
        raise NanochatError("--skip takes core, bpb and/or samples")
    rt = init_runtime(a.device)
    t0 = time.time()
    model, tokenizer, meta = checkpoint.load_model(a.checkpoint or a.run_dir, rt.device, stage=a.stage, dtype=a.dtype)
    T = model.config.sequence_len
    print0(f"base_eval: {a.stage} checkpoint {meta['path']}, {meta['dtype']} weights (loaded in "
           f"{meta['load_s']:.1f} s, {meta['load_how']})")
    metrics, unavailable, extra = {}, [], {}

    if "core" not in skip:
        # rank 0 downloads; every rank must learn the outcome (a rank left waiting would hang the job)
        found = None
        if rt.master:
            try:
                found = {"dir": str(core.ensure_eval_bundle())}
            except NanochatError as e:
                found = {"error": str(e)}
        found = checkpoint.broadcast(found)
        try:
            if "error" in found:
                raise NanochatError(found["error"])
            bundle = Path(found["dir"])
            if not (bundle / "core.yaml").exists():  # another node: its own NANOCHAT_HOME, its own copy
                bundle = core.ensure_eval_bundle()
            tasks = core.load_core_tasks(bundle, a.max_per_task)
        except NanochatError as e:
            print0(f"CORE: unavailable ({e})")
            unavailable.append("CORE")
            from nanochat_core.evaluation.runners import unavailable_cause
            extra.setdefault("why_unavailable", {})["CORE"] = unavailable_cause(str(e))
        else:
            out = core.evaluate_core(model, tokenizer, rt.device, tasks, rt.rank, rt.world_size, max_seq_len=T,
                                     log=print0)
            metrics["CORE"] = out["CORE"]
            extra["core_tasks"] = {"accuracy": out["accuracy"], "centered": out["centered"]}
            print0(f"CORE: {out['CORE']:.4f}")

    if "bpb" not in skip:
        data = a.data
        if data is None:
            data = data_dir() / "bundled"
            if rt.master:
                ensure_bundled(data)
            checkpoint.barrier()
        on_gpu = rt.device_type == "cuda"
        B = a.device_batch_size or bpb_device_batch(model.config.n_layer, T, rt.device_type,
                                                     device_memory_gb(rt.device) if on_gpu else None)
        tokens = a.eval_tokens or (10 * 2 ** 20 if on_gpu else 8 * B * T * rt.world_size)
        steps = max(1, tokens // (B * T * rt.world_size))
        val = iter(DataLoader(tokenizer, B, T, data, split="val", rank=rt.rank, world_size=rt.world_size,
                              device=rt.device, seed=0))
        metrics["bpb"] = training.evaluate_bpb(model, val, steps, tokenizer.token_bytes().to(rt.device), rt.device_type)
        print0(f"bpb: {metrics['bpb']:.4f} ({steps * B * T * rt.world_size:,} validation tokens)")

    if a.docs is not None:
        B = a.device_batch_size or bpb_device_batch(model.config.n_layer, T, rt.device_type,
                                                     device_memory_gb(rt.device) if rt.device_type == "cuda" else None)
        # the whole held-out slice when it is small (capped like the main bpb), never more than one pass
        held = pq.read_table(split_shards(a.docs, "val")[0], columns=["text"]).column("text").to_pylist()
        held_tokens = sum(len(x) + 1 for x in tokenizer.encode(held))
        cap = a.eval_tokens or (10 * 2 ** 20 if rt.device_type == "cuda" else 8 * B * T * rt.world_size)
        steps = max(1, min(cap, held_tokens) // (B * T * rt.world_size))
        val = iter(DataLoader(tokenizer, B, T, a.docs, split="val", rank=rt.rank, world_size=rt.world_size,
                              device=rt.device, seed=0))
        metrics["docs_bpb"] = training.evaluate_bpb(model, val, steps, tokenizer.token_bytes().to(rt.device),
                                                    rt.device_type)
        print0(f"bpb on your held-out documents ({a.stage}): {metrics['docs_bpb']:.4f}")

    if "samples" not in skip and rt.master:
        with decode_threads(rt.device):
            extra["samples"] = [greedy_complete(model, tokenizer, prompt) for prompt in PROMPTS]
        for s in extra["samples"]:
            emit("sample", stage=a.stage, text=s)

    if rt.master:
        path = a.run_dir / "eval" / f"{a.stage}.json"
        record = {"stage": a.stage, "metrics": metrics, "unavailable": unavailable, "checkpoint": meta["path"],
                  "weights": meta["dtype"], "dtype_asked": a.dtype,
                  "max_per_task": a.max_per_task, "seconds": round(time.time() - t0, 1), **extra}
        atomic_write_json(path, merge_record(path, record))
    emit("eval", stage=a.stage, metrics=metrics)
    cleanup_runtime()


if __name__ == "__main__":
    run_main(main)
