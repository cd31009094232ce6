"""
Inference benchmark:  python -m nanochat_core.bench infer [--depth N] [--batches 1,8] [--checkpoint DIR]
                                                          [--dtype fp32,auto]

Numbers, not a test. For a random model of the given depth (or a real checkpoint) it measures
  - prefill tokens/s (batch 1, one forward over the prompt),
  - decode tokens/s through the real Engine (sampling, tool state, host sync per token included) at batch 1
    and larger batches, with the KV cache and without it (full recomputation each step: the yardstick),
  - the memory-bandwidth bound of a decode step: every step reads all weights once plus each row's KV cache,
    so tokens/s <= B * bandwidth / (weight bytes + B * KV bytes), with `bandwidth` the device's MEASURED
    copy bandwidth (read + write bytes of a large tensor copy / time). Batch-1 decode is the case where this
    bound is the whole story: the achieved fraction says how much time goes to overhead (kernel launches,
    Python) instead of moving bytes. Larger batches amortise the weight reads until compute takes over.
The same numbers are printed on CPU (where the bound uses the CPU's measured memory copy bandwidth).
--dtype takes a comma list of weight formats (fp32 | bf16 | int8 | int4 | auto, see quantize.py), measured one
after the other in the same run; each gets its own table, and its bound counts the bytes THAT format reads per
step (int8: one byte per weight plus a 4-byte scale per output row; int4: half a byte per weight plus a 2-byte
scale per 32).
"""
from __future__ import annotations

import argparse
import time

import torch

from nanochat_core.common import NanochatError, atomic_write_json, autodetect_device_type, run_main, data_dir
from nanochat_core.node.device import copy_bandwidth, sync
from nanochat_core.gpt.model import GPT, config_for_depth
from nanochat_core.gpt.quantize import quantize_state, resolve_dtype, weight_bytes_read
import copy
from nanochat_core.inference.engine import KVCache, Engine
from nanochat_core.gpt.checkpoint import load_model
from nanochat_core.data.dataloader import DataLoader
from nanochat_core.data.dataset import ensure_bundled
from nanochat_core.training.loop import evaluate_bpb
from nanochat_core.data.tokenizer import SPECIAL_TOKENS


def random_model(depth: int, vocab_size: int, sequence_len: int, device: torch.device):
    cfg = config_for_depth(depth, vocab_size, sequence_len=sequence_len)
    return GPT.build(cfg, device).eval()


def in_format(model, fmt: str, device: torch.device):
    """The fp32 `model` in weight format `fmt`, as load_model would give it (the fp32 tensors are shared, not
    copied; the converted ones are new)."""
    from nanochat_core.gpt.model import GPT
    if device.type == "cuda" and fmt == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)   # what load_model does for inference on a GPU
    if fmt == "fp32":
        return model
    state = {k: v for k, v in model.state_dict().items() if k not in ("cos", "sin")}
    return GPT.from_state(model.config, quantize_state(state, fmt), fmt).to(device)


class _Tokens:
    """The few tokenizer methods the Engine needs, for a random model with no trained tokenizer: ids
    vocab-9..vocab-1 play the special tokens (as in the real tokenizer's layout). decode is only called for
    tool calls, which the benchmark never triggers (stop/tool handling stays in the loop regardless)."""

    def __init__(self, vocab_size: int):
        self.vocab = vocab_size
        self.special = {s: vocab_size - len(SPECIAL_TOKENS) + i for i, s in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, name: str) -> int:
        return self.special[name]

    def get_special_tokens(self) -> list[str]:
        return list(self.special)

    def get_vocab_size(self) -> int:
        return self.vocab

    def encode(self, text: str) -> list[int]:
        return [ord(c) % (self.vocab - 16) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + i % 90) for i in ids)


def time_decode(engine, prompt: list[int], batch: int, steps: int, use_kv_cache: bool) -> tuple[float, float]:
    """(decode tokens/s over all rows, seconds to the first token). Stop tokens are ignored so every run
    decodes exactly `steps` tokens per row; sampling uses the chat defaults (temperature 0.6, top-k 50)."""
    engine.stop_ids = set()
    t0 = time.perf_counter()
    t_first, n = 0.0, 0
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=steps, temperature=0.6, top_k=50, seed=0,
                             use_kv_cache=use_kv_cache):
        n += 1
        if n == 1:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return (n - 1) * batch / max(t_end - t_first, 1e-9), t_first - t0


def time_prefill(model, prompt_len: int, vocab: int, device: torch.device, reps: int = 3) -> float:
    ids = torch.randint(0, vocab - 16, (1, prompt_len), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    best = float("inf")
    with torch.inference_mode(), ctx:
        for i in range(reps + 1):
            cache = KVCache.for_model(model, 1, prompt_len)
            sync(device.type)
            t0 = time.perf_counter()
            model(ids, kv_cache=cache)
            sync(device.type)
            if i > 0:   # the first run is warm-up
                best = min(best, time.perf_counter() - t0)
    return prompt_len / best


QUALITY_PROMPTS = [
    "The capital of France is", "Once upon a time, there was a", "The best way to learn programming is",
    "Water boils at a temperature of", "In the year 1900, the population of", "The sun is a star that",
    "My favourite food is", "Scientists have discovered that", "The history of the Roman Empire",
    "To make a cup of tea, you",
]


def identical_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Leading tokens a and b share, up to `limit`; replies that are identical but stopped early count in full."""
    if a[:limit] == b[:limit]:
        return limit
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def quality(checkpoint: str, fmts: list[tuple[str, str]], device: torch.device, greedy_tokens: int = 32,
            eval_tokens: int = 2 ** 16) -> dict:
    """Per format: validation bpb (the bundled corpus' val split, the same tokens for every format) and, against
    the FIRST format, how many leading tokens of the greedy continuation of each fixed prompt are identical."""
    data = data_dir() / "bundled"
    ensure_bundled(data)
    out, ref = {}, None
    for label, fmt in fmts:
        model, tok, _ = load_model(checkpoint, device, dtype=fmt)
        B, T = 4, min(256, model.config.sequence_len)
        val = iter(DataLoader(tok, B, T, data, split="val", device=device, seed=0))
        bpb = evaluate_bpb(model, val, max(1, eval_tokens // (B * T)), tok.token_bytes().to(device), device.type)
        engine = Engine(model, tok)
        conts = []
        for text in QUALITY_PROMPTS:
            ids = tok.encode(text, prepend=tok.get_bos_token_id())
            seqs, _ = engine.generate_batch(ids, 1, max_tokens=greedy_tokens, temperature=0.0, seed=0)
            conts.append(seqs[0][len(ids):])
        row = {"dtype": fmt, "bpb": bpb}
        if ref is None:
            ref = (bpb, conts)
        else:
            same = [identical_prefix(x, y, greedy_tokens) for x, y in zip(ref[1], conts)]
            row.update(bpb_vs_first=bpb / ref[0] - 1, identical_prefix=same,
                       prompts_identical_32=sum(n >= greedy_tokens for n in same))
        out[label] = row
        extra = "" if "identical_prefix" not in row else (
            f"  ({row['bpb_vs_first']:+.2%} vs {fmts[0][0]}); greedy continuations identical for the first "
            f"{greedy_tokens} tokens: {row['prompts_identical_32']}/{len(QUALITY_PROMPTS)} prompts "
            f"(identical prefix per prompt: {same})")
        print(f"quality     {label:<12} bpb {bpb:.4f}{extra}")
        del engine, model
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.bench infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda | cpu (default: auto)")
    p.add_argument("--checkpoint", default=None, help="benchmark a real checkpoint instead of a random model")
    p.add_argument("--depth", type=int, default=None, help="random model depth (default: 20 on GPU, 4 on CPU)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--prompt-len", type=int, default=None, help="default: 512 on GPU, 128 on CPU")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per row (default: 256 on GPU, 48 on CPU)")
    p.add_argument("--no-cache-tokens", type=int, default=None, help="tokens for the no-cache runs (default: 1/4 of decode)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,4,16,64 GPU; 1,8 CPU)")
    p.add_argument("--copy-mb", type=int, default=None, help="size of the bandwidth-test copy (default 1024 GPU, 256 CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (on a busy machine 1 is steadier)")
    p.add_argument("--dtype", default="auto", help="weight formats to measure, comma-separated: fp32, bf16, int8, int4, "
                   "auto (default: auto; fp32,auto compares them side by side)")
    p.add_argument("--quality", action="store_true", help="with --checkpoint: validation bpb per format and "
                   "whether greedy continuations of 10 fixed prompts match the first format's (no speed runs)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    device = torch.device(a.device or autodetect_device_type())
    gpu = device.type == "cuda"
    depth = a.depth or (20 if gpu else 4)
    prompt_len = a.prompt_len or (512 if gpu else 128)
    steps = a.decode_tokens or (256 if gpu else 48)
    nc_steps = a.no_cache_tokens or max(2, steps // 4)
    try:
        batches = [int(b) for b in (a.batches or ("1,4,16,64" if gpu else "1,8")).split(",")]
    except ValueError:
        raise NanochatError("--batches takes comma-separated integers, e.g. 1,8") from None
    if min([depth, prompt_len, steps, *batches]) < 1:
        raise NanochatError("depth, prompt length, decode tokens and batch sizes must all be >= 1")

    fmts = []
    for d in (a.dtype or "auto").split(","):
        fmt = resolve_dtype(d.strip(), device)
        fmts.append((f"{d.strip()} ({fmt})" if d.strip() == "auto" else fmt, fmt))
    if a.quality:
        if not a.checkpoint:
            raise NanochatError("--quality needs a trained model: pass --checkpoint RUN_DIR")
        results = {"quality": quality(a.checkpoint, fmts, device)}
        if a.json:
            atomic_write_json(a.json, results)
        return
    base = None
    if not a.checkpoint:
        base = random_model(depth, a.vocab_size, max(2048, prompt_len + steps), device)
    bw = copy_bandwidth(device, a.copy_mb or (1024 if gpu else 256))
    name = torch.cuda.get_device_name(device) if gpu else f"cpu, {torch.get_num_threads()} torch thread(s)"
    print(f"device      {name}")
    print(f"bandwidth   {bw / 1e9:.1f} GB/s measured copy (read + write)")
    results = {"device": name, "copy_bandwidth_gbs": bw / 1e9, "prompt_len": prompt_len, "decode_tokens": steps,
               "runs": []}
    for label, fmt in fmts:
        if a.checkpoint:
            model, tokenizer, meta = load_model(a.checkpoint, device, dtype=fmt)
            what = f"checkpoint {meta.get('path')}"
            print(f"load        {meta['load_s']:.1f} s ({meta['load_how']})")
        else:
            model, tokenizer = in_format(base, fmt, device), _Tokens(base.config.vocab_size)
            what = f"random d{depth}"
        engine = Engine(model, tokenizer)
        cfg, vocab = model.config, tokenizer.get_vocab_size()
        if prompt_len + steps >= engine.context_len:
            raise NanochatError(f"prompt + decode tokens must stay below the model's context ({engine.context_len})")
        weight_bytes = weight_bytes_read(model)                        # matrices + lm_head: read every step
        kv_bytes = 2 if gpu else 4                                     # the cache holds activations: bf16 / fp32
        kv_per_token = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * kv_bytes
        with torch.device("meta"):   # weights counted as the config has them, not as stored (int4 packs two a byte)
            shape = GPT(cfg)
        print(f"\n== {label}")
        print(f"model       {what}: {shape.num_params() / 1e6:.1f}M params ({shape.num_scaling_params() / 1e6:.1f}M "
              f"matrix weights, {weight_bytes / 1e6:.0f} MB read per step), {cfg.n_layer} layers, width {cfg.n_embd}, "
              f"weights {fmt}")
        results.setdefault("model", what)
        results.setdefault("params", shape.num_params())
        results.setdefault("weight_bytes", weight_bytes)           # of the first format (the old single field)
        prompt = [int(t) for t in torch.randint(0, vocab - 16, (prompt_len,), generator=torch.Generator().manual_seed(0))]
        time_decode(engine, prompt[:16], 1, 4, True)                   # warm-up: allocator, kernels, threads
        prefill = time_prefill(model, prompt_len, vocab, device)
        results.setdefault("prefill_tok_s", prefill)
        results.setdefault("formats", {})[label] = {"dtype": fmt, "weight_bytes": weight_bytes, "prefill_tok_s": prefill}
        print(f"prefill     {prefill:,.0f} tok/s  (batch 1, {prompt_len}-token prompt)")
        print(f"{'decode':<12}{'batch':>5}{'tok/s':>12}{'ms/step':>10}{'bound tok/s':>13}{'of bound':>10}{'1st token':>11}")
        for use_cache in (True, False):
            for b in batches:
                n = steps if use_cache else nc_steps
                tps, ttft = time_decode(engine, prompt, b, n, use_cache)
                ctx = prompt_len + n / 2                                   # mean context length over the run
                step_bytes = weight_bytes + b * kv_per_token * ctx
                bound = b * bw / step_bytes
                frac = tps / bound
                kind = "KV cache" if use_cache else "no cache"
                print(f"{kind:<12}{b:>5}{tps:>12,.1f}{1000 * b / tps:>10.2f}{bound:>13,.0f}{frac:>9.0%}{1000 * ttft:>9.0f}ms")
                results["runs"].append({"dtype": fmt, "format": label, "kv_cache": use_cache, "batch": b, "tokens": n,
                                        "tok_s": tps, "bound_tok_s": bound, "fraction_of_bound": frac,
                                        "first_token_s": ttft, "weight_bytes": weight_bytes})
        one = {(r["kv_cache"], r["batch"]): r["tok_s"] for r in results["runs"] if r["format"] == label}
        if (True, 1) in one and (False, 1) in one:
            print(f"KV cache speed-up at batch 1: {one[(True, 1)] / one[(False, 1)]:.1f}x "
                  f"(no-cache runs decode {nc_steps} tokens after a {prompt_len}-token prompt)")
        del engine, model
    if len(fmts) > 1:
        first = fmts[0][0]
        ref = {(r["kv_cache"], r["batch"]): r for r in results["runs"] if r["format"] == first}
        print()
        for label, _ in fmts[1:]:
            for r in results["runs"]:
                if r["format"] == label and r["kv_cache"] and (True, r["batch"]) in ref:
                    base_r = ref[(True, r["batch"])]
                    print(f"{label} vs {first}, batch {r['batch']} with KV cache: decode {r['tok_s'] / base_r['tok_s']:.2f}x, "
                          f"first token {r['first_token_s']:.2f} s vs {base_r['first_token_s']:.2f} s")
    if a.json:
        atomic_write_json(a.json, results)


if __name__ == "__main__":
    run_main(main)
