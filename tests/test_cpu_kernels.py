"""The fused CPU decode step of attention (cpu_kernels.attend_decode) against the torch path it replaces: the
same logits, step by step, for sliding windows smaller than the cache, grouped KV heads, value embeddings,
several rows, and a cache that grows while decoding."""
import pytest
import torch

from nanochat_core.gpt import cpu_kernels
from nanochat_core.gpt.model import GPT, config_for_depth
from nanochat_core.inference.engine import KVCache


@pytest.mark.parametrize("rows", [1, 3])
def test_the_fused_attention_step_decodes_what_the_torch_path_decodes(rows, monkeypatch):
    if cpu_kernels.kernel("attn_decode") is None:
        pytest.skip("no C compiler on this machine: the torch path is what runs")
    # depth 3, 4 query heads on 2 KV heads, windows of 8 tokens on the short layers ("SSSL"), value embeddings on
    # alternate layers; the cache starts at 4 positions and grows twice while decoding 20 tokens
    cfg = config_for_depth(3, 256, sequence_len=16, head_dim=32)
    cfg.n_kv_head, cfg.window_pattern = cfg.n_head // 2, "SSSL"
    torch.manual_seed(0)
    model = GPT.build(cfg, "cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert model.config.short_window < 20 and any(w is not None for w in model.window_sizes)
    idx = torch.randint(0, 256, (rows, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    real = cpu_kernels.attend_decode

    def counted(*a):
        y = real(*a)
        calls.append(y is not None)
        return y

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            cache = KVCache(rows, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 4, limit=64)
            out = [model(idx[:, :4], kv_cache=cache)]
            out += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(4, 24)]
        return torch.cat(out, dim=1)

    monkeypatch.setattr("nanochat_core.gpt.model.attend_decode", counted)
    fused = decode()
    assert calls and all(calls) and len(calls) == 20 * cfg.n_layer   # every decode step of every layer
    monkeypatch.setattr(cpu_kernels, "_KERNEL", False)                # as without a C compiler: torch's path
    calls.clear()
    reference = decode()
    assert calls and not any(calls)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
