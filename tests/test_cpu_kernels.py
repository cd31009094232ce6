"""The C paths of a CPU decode step (cpu_kernels.py) against the torch path each replaces: the fused attention
call (every format) and the whole-block call of an int4 model give the logits GPT.forward's own loop gives, step
by step, with sliding windows smaller than the cache, grouped KV heads, value embeddings, backout, several rows,
and a cache that grows while decoding."""
import pytest
import torch

from nanochat_core.gpt import cpu_kernels
from nanochat_core.gpt.model import GPT, config_for_depth
from nanochat_core.gpt.quantize import quantize_state
from nanochat_core.inference.engine import KVCache


def _model(fmt: str) -> GPT:
    """depth 3, 4 query heads on 2 KV heads, windows of 8 tokens on the short layers ("SSSL"), value embeddings on
    alternate layers, every weight non-trivial; in fp32 or converted to `fmt`."""
    cfg = config_for_depth(3, 256, sequence_len=16, head_dim=32)
    cfg.n_kv_head, cfg.window_pattern = cfg.n_head // 2, "SSSL"
    torch.manual_seed(0)
    model = GPT.build(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert cfg.short_window < 20 and any(w is not None for w in model.window_sizes) and len(model.value_embeds)
    if fmt == "fp32":
        return model.eval()
    state = {k: v for k, v in model.state_dict().items() if k not in ("cos", "sin")}
    return GPT.from_state(cfg, quantize_state(state, fmt), fmt)


def _decode(model: GPT, rows: int) -> torch.Tensor:
    """Logits of a 4-token prefill and 16 decode steps; the cache starts at 4 positions and grows twice."""
    cfg = model.config
    idx = torch.randint(0, 256, (rows, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = KVCache(rows, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 4, limit=64)
        out = [model(idx[:, :4], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(4, 20)]
    return torch.cat(out, dim=1)


def _counting(monkeypatch, name: str) -> list:
    """Replace model.py's `name` by a wrapper that records whether each call took the C path (returned a value)."""
    calls, real = [], getattr(cpu_kernels, name)

    def counted(*a):
        out = real(*a)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(f"nanochat_core.gpt.model.{name}", counted)
    return calls


@pytest.mark.parametrize("rows", [1, 3])
def test_the_fused_attention_step_decodes_what_the_torch_path_decodes(rows, monkeypatch):
    if cpu_kernels.kernel("attn_decode") is None:
        pytest.skip("no C compiler on this machine: the torch path is what runs")
    model = _model("fp32")
    calls = _counting(monkeypatch, "attend_decode")
    fused = _decode(model, rows)
    assert len(calls) == 16 * model.config.n_layer and all(calls)   # every decode step of every layer
    monkeypatch.setattr(cpu_kernels, "_KERNEL", False)             # as without a C compiler: torch's path
    calls.clear()
    reference = _decode(model, rows)
    assert calls and not any(calls)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2])
def test_an_int4_models_blocks_decode_in_one_call_each_as_in_python(rows, monkeypatch):
    """decode_blocks (one C call per block) against GPT.forward's own loop over the same int4 model (the same
    kernels, called op by op)."""
    if cpu_kernels.kernel("block_decode") is None:
        pytest.skip("no C compiler on this machine: the torch path is what runs")
    model = _model("int4")
    calls = _counting(monkeypatch, "decode_blocks")
    fused = _decode(model, rows)
    assert len(calls) == 16 and all(calls)
    monkeypatch.setattr("nanochat_core.gpt.model.decode_blocks", lambda *a: None)
    torch.testing.assert_close(fused, _decode(model, rows), rtol=1e-4, atol=1e-4)
