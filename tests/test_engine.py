"""The inference engine: KV-cache decoding equals full recomputation, seeded sampling is reproducible,
sampling filters do what they say, and the calculator tool's output is forced into the stream."""
import math
import threading

import pytest
import torch

from nanochat_core.common import NanochatError
from nanochat_core.inference.engine import Engine, KVCache, sample_next_token
from nanochat_core.gpt.model import GPT, config_for_depth


def tiny_model(vocab_size: int, depth: int = 2, seed: int = 0, sequence_len: int = 64, window_pattern: str = "SL",
               n_kv_head: int | None = None) -> GPT:
    """A random fp32 model whose outputs depend strongly on the context. The real init zeroes the output
    projections and shrinks lm_head (a fresh model is near-uniform: argmax ties everywhere), so we redraw
    every matrix at a scale where logits are peaky and each layer matters."""
    cfg = config_for_depth(depth, vocab_size, sequence_len=sequence_len, aspect_ratio=32, head_dim=16,
                           n_kv_head=n_kv_head, window_pattern=window_pattern)
    model = GPT.build(cfg, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                std = 1.0 if ("wte" in name or "value_embeds" in name) else 1.0 / math.sqrt(p.size(1))
                if name == "lm_head.weight":
                    std = 4.0 / math.sqrt(p.size(1))
                p.copy_(torch.randn(p.shape, generator=g) * std)
        model.smear_lambda.fill_(0.7)   # smear starts switched off (lambda 0): the cache must carry it when on
    return model.eval()


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    return Engine(tiny_model(tiny_tokenizer.get_vocab_size()), tiny_tokenizer)


def prompt_ids(tok, text="Hello there, how are you today? Tell me about the sea and the ships."):
    return tok.render_for_completion({"messages": [{"role": "user", "content": text}]})


def test_kv_cache_greedy_equals_full_recompute(engine, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer)
    assert len(ids) > engine.model.config.short_window   # the sliding-window layer really slides
    # never stop early: we want a long comparison, not one that ends at a random <|assistant_end|>
    engine.stop_ids, saved = set(), engine.stop_ids
    try:
        cached = [c[0] for c, _ in engine.generate(ids, max_tokens=40, temperature=0.0)]
        full = [c[0] for c, _ in engine.generate(ids, max_tokens=40, temperature=0.0, use_kv_cache=False)]
        # several samples share one prefill: the batch-1 cache (keys, values, the smear's last embedding) is
        # copied to every row
        pair = [c for c, _ in engine.generate(ids, num_samples=2, max_tokens=40, temperature=0.0)]
    finally:
        engine.stop_ids = saved
    assert len(cached) == 40
    assert cached == full
    assert [c[0] for c in pair] == full and [c[1] for c in pair] == full
    assert engine.model.config.attn_impl == "auto"   # the engine never touches the model's settings
    assert len(set(cached)) > 3          # a real sequence, not one token repeated


def test_kv_cache_logits_match_recompute_with_gqa():
    model = tiny_model(300, depth=2, n_kv_head=2, window_pattern="SSL", seed=3)
    assert model.config.n_kv_head < model.config.n_head
    seq = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(seq)
        cache = KVCache.for_model(model, 1, 8)          # too small on purpose: it has to grow
        parts = [model(seq[:, :24], kv_cache=cache)]
        for t in range(24, 40):
            parts.append(model(seq[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == 40
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_kv_cache_refuses_past_the_context():
    cache = KVCache(1, 1, 2, 4, max_len=4, limit=6)
    k = torch.zeros(1, 2, 5, 4)
    cache.insert_kv(0, k, k)
    cache.advance(5)
    with pytest.raises(NanochatError, match="context"):
        cache.insert_kv(0, k[:, :, :2], k[:, :, :2])


def test_seeded_sampling_is_reproducible(engine, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer)
    kw = dict(num_samples=3, max_tokens=24, temperature=1.0, top_k=50)
    a, _ = engine.generate_batch(ids, seed=123, **kw)
    b, _ = engine.generate_batch(ids, seed=123, **kw)
    c, _ = engine.generate_batch(ids, seed=124, **kw)
    assert a == b
    assert a != c
    assert all(seq[:len(ids)] == ids for seq in a)
    assert len({tuple(s) for s in a}) > 1       # the N samples differ from each other


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).expand(2000, -1)
    assert sample_next_token(logits, g, temperature=0.0).eq(0).all()
    top2 = sample_next_token(logits, g, temperature=1.0, top_k=2)
    assert set(top2.tolist()) == {0, 1}
    # p(0) = 0.71, p(0)+p(1) = 0.97: top_p 0.5 keeps only token 0, top_p 0.9 keeps 0 and 1
    assert sample_next_token(logits, g, temperature=1.0, top_p=0.5).eq(0).all()
    assert set(sample_next_token(logits, g, temperature=1.0, top_p=0.9).tolist()) == {0, 1}
    everything = sample_next_token(logits, g, temperature=2.0)
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}


def test_tiny_temperature_and_top_p_sample_the_best_token_not_nan():
    """Issue 21: temperature 1e-300 (rounds to 0 in float32: logits / it were inf and NaN) and top_p 1e-300
    (0 in float32: every candidate was dropped) passed validation and made multinomial fail."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.0, -2.0, 1.0]])
    for kw in [dict(temperature=1e-300), dict(temperature=1e-300, top_k=0), dict(temperature=1e-300, top_k=3),
               dict(temperature=5e-324, top_p=0.5), dict(temperature=1.0, top_p=1e-300),
               dict(temperature=1e-300, top_k=2, top_p=1e-300)]:
        picks = torch.stack([sample_next_token(logits, g, **kw) for _ in range(50)])
        assert picks[:, 0].eq(0).all(), kw
        assert set(picks[:, 1].tolist()) <= {1, 2}, kw   # a tie: either of the two best, nothing else


class ScriptedModel(torch.nn.Module):
    """A deterministic stand-in token source for the tool test: at absolute position p it puts all its
    probability on script[p + 1], EXCEPT where the engine is supposed to force the tool's output - there
    it predicts <|assistant_end|>, so a sampling (instead of forcing) engine would visibly stop. It speaks
    the real KV-cache protocol and records every token the engine feeds it."""

    def __init__(self, script: list[int], forced_positions: set[int], stop: int, vocab_size: int):
        super().__init__()
        self.script, self.forced_positions, self.stop = script, forced_positions, stop
        self.config = config_for_depth(1, vocab_size, sequence_len=256, aspect_ratio=4, head_dim=4)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.fed: dict[int, int] = {}

    def forward(self, idx, kv_cache=None, last_only=False):  # full logits are fine: callers read [:, -1]
        B, T = idx.shape
        pos0 = kv_cache.get_pos() if kv_cache is not None else 0
        if kv_cache is not None:
            kv = torch.zeros(B, self.config.n_kv_head, T, self.config.head_dim)
            for layer in range(self.config.n_layer):
                kv_cache.insert_kv(layer, kv, kv)
            kv_cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for t in range(T):
            p = pos0 + t
            self.fed[p] = int(idx[0, t])
            nxt = self.stop if (p + 1 in self.forced_positions or p + 1 >= len(self.script)) else self.script[p + 1]
            logits[:, t, nxt] = 100.0
        return logits


def test_tool_output_is_forced_into_the_stream(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "what is 12 times 7?"}]})
    call = [sp("<|python_start|>"), *tok.encode("12*(3+4)"), sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>")]
    reply = tok.encode("Let me compute. ") + call + forced + tok.encode(" So 84.") + [sp("<|assistant_end|>")]
    script = prompt + reply
    start = len(prompt) + len(tok.encode("Let me compute. ")) + len(call)
    forced_positions = set(range(start, start + len(forced)))
    model = ScriptedModel(script, forced_positions, sp("<|assistant_end|>"), tok.get_vocab_size())
    engine = Engine(model, tok)

    steps = list(engine.generate(prompt, num_samples=2, max_tokens=100, temperature=0.0))
    for row in range(2):
        toks = [c[row] for c, _ in steps]
        masks = [m[row] for _, m in steps]
        assert toks == reply
        # mask 0 exactly on the forced tool output
        assert [i + len(prompt) for i, m in enumerate(masks) if m == 0] == sorted(forced_positions)
    # the forced tokens were fed back to the model (they are part of the context, not just printed)
    assert [model.fed[p] for p in sorted(forced_positions)] == forced

    # the streaming text API shows the same thing as segments
    pieces = list(engine.stream_reply(prompt, max_tokens=100, temperature=0.0))
    by_kind = {}
    for p in pieces:
        by_kind[p.kind] = by_kind.get(p.kind, "") + p.text
    assert by_kind["python"] == "12*(3+4)"
    assert by_kind["python_output"] == "84"
    assert by_kind["text"] == "Let me compute.  So 84."
    assert pieces[-1].kind == "finish" and pieces[-1].text == "stop" and pieces[-1].num_tokens == len(reply)
    # the terminal chat shows it as [calc EXPR = RESULT]
    import io
    from nanochat_core.inference.chat import _Painter
    out = io.StringIO()
    painter = _Painter(out)
    for p in pieces[:-1]:
        painter.write(p.kind, p.text)
    painter.finish()
    assert out.getvalue() == "Let me compute. [calc 12*(3+4) = 84] So 84.\n"
    # ... and so does the server's API text (what the web page renders as boxes): no special token in it
    from nanochat_core.inference.calculator import ToolText
    from nanochat_core.inference.serve import content_to_parts
    view = ToolText()
    api_text = "".join(view.feed(p.kind, p.text) for p in pieces if p.kind != "finish") + view.close()
    assert api_text == "Let me compute. [calc 12*(3+4) = 84] So 84."
    # sent back as history, it renders to exactly the tokens the model produced
    history = {"messages": [{"role": "user", "content": "what is 12 times 7?"},
                            {"role": "assistant", "content": content_to_parts(api_text)}]}
    assert tok.render_conversation(history)[0] == script


def test_refused_tool_call_streams_an_error_not_a_crash(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id(), sp("<|assistant_start|>")]
    call = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>")]
    script = prompt + call + [sp("<|assistant_end|>")] * 40
    model = ScriptedModel(script, set(), sp("<|assistant_end|>"), tok.get_vocab_size())
    model.forced_positions = set(range(len(prompt) + len(call), len(script)))
    out = {}
    for p in Engine(model, tok).stream_reply(prompt, max_tokens=60, temperature=0.0):
        out[p.kind] = out.get(p.kind, "") + p.text
    assert out["python_output"].startswith("error:") and "not allowed" in out["python_output"]


def test_stream_reply_text_matches_tokens_and_cancel(engine, tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer)
    seqs, _ = engine.generate_batch(ids, max_tokens=30, temperature=0.0)
    pieces = list(engine.stream_reply(ids, max_tokens=30, temperature=0.0))
    text = "".join(p.text for p in pieces if p.kind != "finish")
    # reference: decode each run of ordinary tokens between special tokens (bytes never join across them)
    specials = {tiny_tokenizer.encode_special(s) for s in tiny_tokenizer.get_special_tokens()}
    runs, run = [], []
    for t in seqs[0][len(ids):] + [tiny_tokenizer.get_bos_token_id()]:
        if t in specials:    # python/output markers end a run; other specials are dropped, also ending it
            runs.append(tiny_tokenizer.decode(run))
            run = []
        else:
            run.append(t)
    assert text == "".join(runs)
    assert len(text) > 10
    cancel = threading.Event()
    cancel.set()
    pieces = list(engine.stream_reply(ids, max_tokens=30, temperature=0.0, cancel=cancel))
    assert pieces[-1].text == "cancelled" and pieces[-1].num_tokens == 1


def test_bad_prompts_are_clear_errors(engine):
    with pytest.raises(NanochatError, match="empty"):
        list(engine.generate([], max_tokens=2))
    with pytest.raises(NanochatError, match="token ids"):
        list(engine.generate([10**9], max_tokens=2))
    with pytest.raises(NanochatError, match="context"):
        list(engine.generate([1] * engine.context_len, max_tokens=2))


def test_bench_infer_runs_and_reports_the_bound(tmp_path, monkeypatch):
    """The benchmark is not a test, but it must keep working: a tiny run end to end, numbers sane."""
    import json
    import sys
    from nanochat_core import bench
    out = tmp_path / "infer.json"
    monkeypatch.setattr(sys, "argv", ["bench", "infer", "--device", "cpu", "--depth", "1", "--vocab-size", "512",
                                      "--prompt-len", "16", "--decode-tokens", "6", "--batches", "1,2",
                                      "--copy-mb", "8", "--json", str(out)])
    bench.main()
    r = json.loads(out.read_text())
    assert r["prefill_tok_s"] > 0 and r["copy_bandwidth_gbs"] > 0.1
    assert [(run["kv_cache"], run["batch"]) for run in r["runs"]] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    assert all(run["tok_s"] > 0 and 0 < run["fraction_of_bound"] for run in r["runs"])


def test_the_engine_leaves_the_model_as_it_found_it(tiny_tokenizer):
    """Sampling from a model in the middle of training (SFT's sample, RL's rollouts) must not change its mode
    or its attention setting: the engine neither flips attn_impl nor calls eval()."""
    model = tiny_model(tiny_tokenizer.get_vocab_size())
    model.train()
    model.config.attn_impl = "flex"
    seen = []
    original = type(model).forward
    def spy(self, *a, **k):
        seen.append((self.config.attn_impl, self.training))
        return original(self, *a, **k)
    type(model).forward = spy
    try:
        Engine(model, tiny_tokenizer).generate_batch(prompt_ids(tiny_tokenizer), 1, max_tokens=3, temperature=0.0, seed=0)
    finally:
        type(model).forward = original
    assert seen and set(seen) == {("flex", True)}
    assert model.training and model.config.attn_impl == "flex"
