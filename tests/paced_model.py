"""A real model slowed to a fixed pace per forward call, for tests that must watch a reply while it streams
(a tiny model on CPU can finish a whole reply before a browser paints once, or a client disconnects)."""
import time

import torch


class PacedModel(torch.nn.Module):
    def __init__(self, model, seconds_per_call: float):
        super().__init__()
        self.inner, self.config, self.rotary_len = model, model.config, model.rotary_len
        self.seconds_per_call = seconds_per_call

    def forward(self, idx, kv_cache=None, last_only=False):
        time.sleep(self.seconds_per_call)
        return self.inner(idx, kv_cache=kv_cache, last_only=last_only)
