"""Tiny real models for the server and browser tests."""
import time

import torch

from nanochat_core.model import GPT, config_for_depth


def tiny_chat_model(vocab_size: int, sequence_len: int = 256) -> GPT:
    """Depth 1, 16-dim heads, random; lm_head redrawn larger because the real init is near-uniform and
    replies would be monotonous. The server's context is sequence_len (what the model "trained" with)."""
    cfg = config_for_depth(1, vocab_size, sequence_len=sequence_len, aspect_ratio=64, head_dim=16)
    model = GPT.build(cfg, "cpu")
    torch.manual_seed(0)
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
