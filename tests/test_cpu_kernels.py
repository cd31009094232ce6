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


@pytest.mark.parametrize("rows", [1, 2])
def test_an_int4_models_blocks_decode_in_one_call_each_as_in_python(rows, monkeypatch):
    """cpu_kernels.decode_blocks (one C call per block) against GPT.forward's own loop over the same int4 model
    (the same kernels, called op by op): the same logits at every step, backout and value embeddings included."""
    from nanochat_core.gpt.quantize import quantize_state
    if cpu_kernels.kernel("block_decode") is None:
        pytest.skip("no C compiler on this machine: the torch path is what runs")
    cfg = config_for_depth(3, 256, sequence_len=16, head_dim=32)
    cfg.n_kv_head, cfg.window_pattern = cfg.n_head // 2, "SSSL"
    torch.manual_seed(0)
    model = GPT.build(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v for k, v in model.state_dict().items() if k not in ("cos", "sin")}
    q4 = GPT.from_state(cfg, quantize_state(state, "int4"), "int4")
    assert cfg.backout and cfg.n_layer // 2 < cfg.n_layer - 1 and len(q4.value_embeds) > 0
    idx = torch.randint(0, 256, (rows, 20), generator=torch.Generator().manual_seed(1))
    calls = []
    real = cpu_kernels.decode_blocks

    def counted(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            cache = KVCache(rows, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 4, limit=64)
            out = [q4(idx[:, :4], kv_cache=cache)] + [q4(idx[:, t:t + 1], kv_cache=cache) for t in range(4, 20)]
        return torch.cat(out, dim=1)

    monkeypatch.setattr("nanochat_core.gpt.model.decode_blocks", counted)
    fused = decode()
    assert len(calls) == 16 and all(calls)
    monkeypatch.setattr("nanochat_core.gpt.model.decode_blocks", lambda *a: None)
    torch.testing.assert_close(fused, decode(), rtol=1e-4, atol=1e-4)
