"""The GPT: exact sizes, every attention path against the fp32 reference (windows, GQA, KV cache),
and that it learns. Tiny fp32 models on random token ids; no tokenizer needed."""
import math

import pytest
import torch

from nanochat_core.common import NanochatError
from nanochat_core.gpt.model import (GPT, GPTConfig, attention_reference, attention_sdpa, config_for_depth,
                                 count_params, flops_per_token)

IMPLS = ["sdpa", "flex"]


def build(cfg: GPTConfig, seed: int = 0, randomize: bool = True) -> GPT:
    """Meta construction + init, as the trainer does. `randomize` overwrites the zero-initialised output
    projections and gates with noise: with them at zero every attention path gives the same logits,
    which would make the comparisons below vacuous."""
    torch.manual_seed(seed)
    model = GPT.build(cfg, "cpu")
    if randomize:
        with torch.no_grad():
            for p in model.transformer.h.parameters():
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
            model.lm_head.weight.normal_(0.0, 0.05)
            model.x0_lambdas.uniform_(0.0, 0.3)
            model.smear_lambda.fill_(0.5)   # smear starts switched off (lambda 0): switch it on
    return model.eval()


def tiny(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, T=48, vocab=300, pattern="SSSL", impl="auto") -> GPTConfig:
    cfg = GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                    n_embd=n_embd, window_pattern=pattern, attn_impl=impl)
    cfg.validate()
    return cfg


class TinyKVCache:
    """The engine's KV-cache protocol in its simplest form: grow by concatenation."""

    def __init__(self, n_layer: int):
        self.k, self.v, self.pos = [None] * n_layer, [None] * n_layer, 0

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], k], dim=2)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], v], dim=2)
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, n: int) -> None:
        self.pos += n


# -----------------------------------------------------------------------------
# sizes

@pytest.mark.parametrize("cfg", [
    tiny(), tiny(n_layer=1, n_kv_head=4, vocab=257), tiny(n_layer=4, n_head=2, n_kv_head=1, n_embd=16, pattern="L"),
    config_for_depth(2, 512, sequence_len=64, head_dim=32),
])
def test_param_count_formula_equals_numel(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    counts = count_params(cfg)
    assert counts["total"] == model.num_params() == sum(p.numel() for p in model.parameters())
    assert counts["scaling"] == model.num_scaling_params()
    assert counts["wte"] == model.transformer.wte.weight.numel()
    assert counts["value_embeds"] == sum(p.numel() for p in model.value_embeds.parameters())
    # vocab padded to a multiple of 64 in the tables
    assert model.transformer.wte.weight.size(0) % 64 == 0 and model.transformer.wte.weight.size(0) >= cfg.vocab_size


def test_depth_presets_match_reference_sizes():
    d24 = config_for_depth(24, 32768)
    assert (d24.n_embd, d24.n_head, d24.head_dim) == (1536, 12, 128)
    c24, c12 = count_params(d24), count_params(config_for_depth(12, 32768))
    assert abs(c24["total"] / 1.38e9 - 1) < 0.01        # the reference: d24 ~ 1.38B total
    assert abs(c24["scaling"] / 730e6 - 1) < 0.01       # ... ~730M matrices + lm_head
    assert abs(c12["total"] / 286e6 - 1) < 0.01         # d12 ~ 286M
    assert config_for_depth(20, 65536).n_embd == 1280
    # flops: 6 N + attention, with the three short-window layers of each SSSL group charged T/4
    cfg = tiny(n_layer=4, T=64)
    windows = cfg.window_sizes()
    assert windows == [16, 16, 16, None]
    attn = 12 * cfg.n_head * cfg.head_dim * (3 * 16 + 64)
    assert flops_per_token(cfg) == 6 * count_params(cfg)["scaling"] + attn


def test_window_pattern_and_value_embed_layers():
    cfg = tiny(n_layer=6, pattern="SL")
    assert cfg.window_sizes() == [12, None, 12, None, 12, None]
    cfg = tiny(n_layer=5, pattern="S")
    assert cfg.window_sizes()[-1] is None and cfg.window_sizes()[:4] == [12] * 4   # last layer always full
    assert cfg.value_embed_layers() == [0, 2, 4]                                 # alternating, incl. last
    assert tiny(n_layer=4).value_embed_layers() == [1, 3]


@pytest.mark.parametrize("bad", [dict(n_head=3), dict(n_kv_head=3), dict(window_pattern="SX"),
                                 dict(attn_impl="fast"), dict(n_layer=0)])
def test_bad_config_is_a_user_error(bad):
    fields = dict(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64) | bad
    with pytest.raises(NanochatError):
        GPT(GPTConfig(**fields))


# -----------------------------------------------------------------------------
# attention paths

@pytest.mark.parametrize("Tq,Tk,pos0,window,H,Hkv", [
    (16, 16, 0, None, 4, 4), (16, 16, 0, 5, 4, 2), (1, 9, 8, None, 4, 1), (1, 20, 19, 6, 4, 2),
    (5, 12, 7, 4, 4, 2), (5, 12, 7, None, 2, 2), (8, 8, 0, 100, 4, 2),
    (1, 12, 7, None, 4, 2),   # a cache that hands back more slots than filled: causality hides them
])
def test_sdpa_kernel_matches_reference(Tq, Tk, pos0, window, H, Hkv):
    g = torch.Generator().manual_seed(Tq * 100 + Tk)
    q = torch.randn(2, H, Tq, 8, generator=g)
    k, v = torch.randn(2, Hkv, Tk, 8, generator=g), torch.randn(2, Hkv, Tk, 8, generator=g)
    ref = attention_reference(q, k, v, pos0, window)
    torch.testing.assert_close(attention_sdpa(q, k, v, pos0, window, {}), ref, rtol=1e-5, atol=1e-5)
    # the reference itself: query t of the chunk sees exactly keys j with j <= pos0+t and pos0+t-j < window
    t = Tq - 1
    lo = 0 if window is None else max(0, pos0 + t - window + 1)
    kk, vv = k.repeat_interleave(H // Hkv, 1)[:, :, lo:pos0 + t + 1], v.repeat_interleave(H // Hkv, 1)[:, :, lo:pos0 + t + 1]
    att = (q[:, :, t:t + 1] @ kk.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    torch.testing.assert_close(ref[:, :, t:t + 1], att @ vv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kv", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_model_attention_paths_match_reference(impl, kv):
    cfg = tiny(n_head=kv[0], n_kv_head=kv[1])
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.config.attn_impl = "reference"
        ref = model(idx)
        model.config.attn_impl = impl
        out = model(idx)
    assert ref.shape == (2, cfg.sequence_len, cfg.vocab_size) and ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # windows matter here: the same model with all-full attention gives different logits
    model.window_sizes = [None] * cfg.n_layer
    with torch.no_grad():
        assert (model(idx) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
def test_kv_cache_decoding_equals_full_recompute(impl):
    """Prefill 10 tokens, a 5-token chunk, then one token at a time past the short window (12): the
    logits at every position equal one full forward pass."""
    cfg = tiny(n_layer=4, impl=impl)
    model = build(cfg, seed=3)
    idx = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.config.attn_impl = "reference"
        full = model(idx)
        model.config.attn_impl = impl
        cache = TinyKVCache(cfg.n_layer)
        outs = [model(idx[:, :10], kv_cache=cache), model(idx[:, 10:15], kv_cache=cache)]
        outs += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(15, 40)]
    assert cache.get_pos() == 40
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-4)


def test_last_only_logits_equal_the_last_row_of_the_full_logits():
    cfg = tiny()
    model = build(cfg, seed=5)
    idx = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
        cache = TinyKVCache(cfg.n_layer)
        cached = model(idx, kv_cache=cache, last_only=True)
    assert last.shape == (2, 1, cfg.vocab_size) and cache.get_pos() == 20
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, full[:, -1:], rtol=1e-4, atol=1e-4)


def test_auto_impl_is_sdpa_on_cpu_and_grads_flow_through_flex_setting():
    from nanochat_core.gpt.model import resolve_attn_impl
    assert resolve_attn_impl("auto", torch.device("cpu")) == "sdpa"
    # "flex" with autograd on CPU falls back to SDPA (torch has no CPU flex backward): training still works
    cfg = tiny(impl="flex")
    model = build(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len))
    model(idx, idx).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -----------------------------------------------------------------------------
# loss and learning

def test_loss_masks_and_reductions():
    cfg = tiny()
    model = build(cfg, randomize=False)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = idx.clone()
    tgt[:, :8] = -1                                   # SFT-style mask
    with torch.no_grad():
        per_tok = model(idx, tgt, loss_reduction="none")
        mean = model(idx, tgt)
        logits = model(idx)
    assert per_tok.shape == (32,)
    assert torch.all(per_tok.view(2, 16)[:, :8] == 0)
    torch.testing.assert_close(mean, per_tok.sum() / 16)
    assert logits.abs().max() <= 15.0                 # softcap
    # fresh init: lm_head ~ N(0, 1e-3) -> near-uniform prediction, loss ~ ln(vocab)
    assert abs(mean.item() - math.log(cfg.vocab_size)) < 0.05


def test_fifty_steps_of_depth2_lower_the_loss():
    torch.manual_seed(0)
    cfg = config_for_depth(2, 512, sequence_len=64, head_dim=32)
    model = build(cfg, randomize=False).train()
    opt = model.setup_optimizer()
    batch = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(50):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert abs(losses[0] - math.log(512)) < 0.1
    assert losses[-1] < 0.1 * losses[0], losses[::10]     # memorises the fixed batch: ~6.2 -> < 0.62


def test_setup_optimizer_groups():
    cfg = tiny(n_embd=128, n_head=4)
    model = build(cfg, randomize=False)
    opt = model.setup_optimizer(weight_decay=0.1)
    kinds = [(g["kind"], g["names"][0]) for g in opt.param_groups]
    assert kinds[:6] == [("adamw", "lm_head.weight"), ("adamw", "transformer.wte.weight"),
                         ("adamw", "value_embeds.0.weight"), ("adamw", "resid_lambdas"), ("adamw", "x0_lambdas"),
                         ("adamw", "smear_gate.weight")]
    assert opt.param_groups[5]["names"] == ["smear_gate.weight", "smear_lambda", "backout_lambda"]
    assert all(k == "muon" for k, _ in kinds[6:])
    scale = (128 / 768) ** -0.5
    assert opt.param_groups[1]["lr"] == pytest.approx(0.3 * scale)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.008 * scale)
    assert opt.param_groups[2]["lr"] == pytest.approx(0.5 * 0.3 * scale)   # value embeddings: half the LR
    assert [g["betas"] for g in opt.param_groups[:5]] == [(0.8, 0.96), (0.8, 0.995), (0.8, 0.995), (0.8, 0.95),
                                                         (0.96, 0.95)]
    assert [g["weight_decay"] for g in opt.param_groups[:6]] == [0.01, 0.001, 0.01, 0.05, 0.0, 0.0]
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "muon":
            assert g["weight_decay"] == 0.1 and "momentum" in g
            assert len({tuple(p.shape) for p in g["params"]}) == 1
    names = [n for g in opt.param_groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    # deterministic order
    assert names == [n for g in build(cfg, randomize=False).setup_optimizer().param_groups for n in g["names"]]


def test_a_config_from_before_the_recipe_keys_builds_the_model_it_was_trained_as():
    """Checkpoints store the config as a dict. One written before smear/backout/the VE-gate and q.k changes
    lacks those keys: it must come back as the architecture it was trained with (so its weights load and a
    resumed run goes on unchanged), not as today's default."""
    import dataclasses
    new = dataclasses.asdict(tiny())
    old = {k: v for k, v in new.items() if k not in ("ve_gate_channels", "ve_gate_scale", "smear", "backout")}
    legacy = GPT.build(old)
    assert not hasattr(legacy, "smear_gate") and not hasattr(legacy, "backout_lambda")
    assert legacy.transformer.h[0].attn.ve_gate.in_features == 32 and legacy.config.ve_gate_scale == 2.0
    assert legacy.num_params() == count_params(legacy.config)["total"]
    current = GPT.build(new)
    assert current.transformer.h[0].attn.ve_gate.in_features == 12 and hasattr(current, "smear_gate")
    assert current.num_params() == count_params(current.config)["total"]
    with pytest.raises(NanochatError, match="unknown keys"):
        GPT.build({**new, "mystery": 1})
