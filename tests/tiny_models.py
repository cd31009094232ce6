"""Tiny real models for the server and browser tests."""
import time

import torch

from nanochat_core.gpt.model import GPT, config_for_depth


def noisy_tiny_model(tokenizer, noise: float = 0.05) -> GPT:
    """Depth 1 with every weight non-trivial (a fresh init has zero projections, which any format stores
    exactly), from its own seed."""
    cfg = config_for_depth(1, tokenizer.get_vocab_size(), sequence_len=32, head_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT.build(cfg, "cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    return model


def tiny_chat_model(vocab_size: int, sequence_len: int = 256) -> GPT:
    """Depth 1, 16-dim heads, random; lm_head redrawn larger because the real init is near-uniform and
    replies would be monotonous. The server's context is sequence_len (what the model "trained" with)."""
    cfg = config_for_depth(1, vocab_size, sequence_len=sequence_len, aspect_ratio=64, head_dim=16)
    with torch.random.fork_rng(devices=[]):   # the same weights whatever ran before, and no trace on later tests
        torch.manual_seed(0)
        model = GPT.build(cfg, "cpu")
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.3)
    return model.eval()


class PacedModel(torch.nn.Module):
    """A real model slowed to a fixed pace per forward call, for tests that must watch a reply while it
    streams (a tiny model on CPU can finish a whole reply before a browser paints once)."""

    def __init__(self, model, seconds_per_call: float):
        super().__init__()
        self.inner, self.config, self.rotary_len = model, model.config, model.rotary_len
        self.seconds_per_call = seconds_per_call

    def forward(self, idx, kv_cache=None, last_only=False):
        time.sleep(self.seconds_per_call)
        return self.inner(idx, kv_cache=kv_cache, last_only=last_only)


class ScriptedReplyModel(torch.nn.Module):
    """A token source that answers any prompt with one fixed reply (token ids): whatever the prompt's length,
    the first generated position predicts reply[0], the next reply[1], ... Where the engine forces tokens (a
    tool's output) it feeds them in place of the prediction, so a reply that calls the calculator must list
    the forced tokens too. Logits of 100 on the scripted token: greedy or sampled with any top-k, the same
    reply. It speaks the real KV-cache protocol (zero keys and values), so the real Engine drives it."""

    def __init__(self, reply: list[int], vocab_size: int, sequence_len: int = 256):
        super().__init__()
        self.reply = reply
        self.config = config_for_depth(1, vocab_size, sequence_len=sequence_len, aspect_ratio=4, head_dim=4)
        self.dummy = torch.nn.Parameter(torch.zeros(1))   # the engine reads the device from the parameters
        self.prompt_len = 0

    def get_device(self):
        return self.dummy.device

    def forward(self, idx, kv_cache=None, last_only=False):
        B, T = idx.shape
        pos0 = kv_cache.get_pos() if kv_cache is not None else 0
        if kv_cache is not None:
            kv = torch.zeros(B, self.config.n_kv_head, T, self.config.head_dim)
            for layer in range(self.config.n_layer):
                kv_cache.insert_kv(layer, kv, kv)
            kv_cache.advance(T)
        if pos0 == 0:   # a prefill: the prompt ends here and the reply starts at the next position
            self.prompt_len = T
        logits = torch.zeros(B, T, self.config.vocab_size)
        k = pos0 + T - self.prompt_len    # index in the reply of the token after the last position
        logits[:, -1, self.reply[min(k, len(self.reply) - 1)]] = 100.0
        return logits
