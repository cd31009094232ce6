"""
The model's shape as plain data: `GPTConfig`, the one dial `config_for_depth`, and exact parameter
counts and FLOPs per token computed from the config alone. No torch here on purpose: the CLI's planner
prices runs with these same functions (so a plan and the trained model can never disagree), and
`nanochat --help` must not pay for importing torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from nanochat_core.common import NanochatError

# Recipe ablation switches (temporary: the GPU-readiness issue's ablation table is measured with them, one
# row per switch, e.g. NANOCHAT_ABLATE=smear,backout). The winners become the code; the switches go.
ABLATE = frozenset(filter(None, os.environ.get("NANOCHAT_ABLATE", "").split(",")))

ATTN_IMPLS = ("auto", "reference", "sdpa", "flex")
VOCAB_PAD = 64         # pad the embedding tables to a multiple of 64 for friendlier matmul shapes
VE_GATE_CHANNELS = 12 if "vegate" in ABLATE else 32  # the value-embedding gate looks at the first channels of the block input


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6          # query heads
    n_kv_head: int = 6       # key/value heads (GQA when < n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # per layer, tiled: S = short window, L = full context; last layer always L
    attn_impl: str = "auto"       # "auto" | "reference" | "sdpa" | "flex" (auto: flex on CUDA, else sdpa)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD

    @property
    def short_window(self) -> int:
        # "S" layers see the last T/4 tokens (query included): 512 at T=2048. A quarter of the context
        # keeps 3 of 4 layers cheap while still spanning a paragraph; the full layers carry long range.
        return max(1, self.sequence_len // 4)

    def window_sizes(self) -> list[int | None]:
        """Attention window per layer: an int W (query at i sees keys i-W < j <= i) or None (full causal)."""
        sizes = []
        for i in range(self.n_layer):
            c = self.window_pattern[i % len(self.window_pattern)]
            sizes.append(self.short_window if c == "S" and i != self.n_layer - 1 else None)
        return sizes

    def value_embed_layers(self) -> list[int]:
        """Alternating layers carry a value embedding, always including the last one."""
        return [i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2]

    def validate(self) -> None:
        if min(self.sequence_len, self.vocab_size, self.n_layer, self.n_head, self.n_kv_head, self.n_embd) < 1:
            raise NanochatError(f"model config has a non-positive size: {self}")
        if self.n_embd % self.n_head:
            raise NanochatError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise NanochatError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise NanochatError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise NanochatError(f"window_pattern must be a non-empty string of S and L, got {self.window_pattern!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise NanochatError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")


def config_for_depth(depth: int, vocab_size: int, sequence_len: int = 2048, aspect_ratio: int = 64,
                     head_dim: int = 128, n_kv_head: int | None = None, window_pattern: str = "SSSL") -> GPTConfig:
    """The one dial. width = aspect_ratio * depth rounded UP to a multiple of head_dim (d20 -> 1280,
    d24 -> 1536), heads = width / head_dim, KV heads = heads unless given. Tiny test models pass a
    small head_dim (e.g. depth 2, head_dim 32 -> width 128, 4 heads)."""
    if depth < 1 or head_dim < 2 or aspect_ratio < 1:
        raise NanochatError(f"depth, aspect_ratio must be >= 1 and head_dim >= 2 (got {depth}, {aspect_ratio}, {head_dim})")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                    n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern)
    cfg.validate()
    return cfg


def count_params(config: GPTConfig) -> dict[str, int]:
    """Parameter counts by kind, from the config alone (equal to the built model's numel - tested).
    "scaling" = transformer matrices + lm_head: the count the scaling laws (tokens = ratio * N) use."""
    d, V, L = config.n_embd, config.padded_vocab_size, config.n_layer
    kv_dim = config.n_kv_head * config.head_dim
    q_dim = config.n_head * config.head_dim
    n_ve = len(config.value_embed_layers())
    per_layer = d * q_dim + 2 * d * kv_dim + q_dim * d + 2 * d * 4 * d   # q,k,v,proj + MLP fc,proj
    matrices = L * per_layer + n_ve * min(VE_GATE_CHANNELS, d) * config.n_kv_head
    counts = {
        "wte": V * d,
        "value_embeds": n_ve * V * kv_dim,
        "lm_head": V * d,
        "transformer_matrices": matrices,
        "scalars": 2 * L + (25 if "smear" in ABLATE else 0) + (1 if "backout" in ABLATE else 0),
    }
    counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
    counts["total"] = sum(v for k, v in counts.items() if k != "scaling")
    return counts


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 * (scaling params) for the matmuls (2 forward,
    4 backward per weight; embedding lookups cost nothing), plus attention: per layer QK^T and AV are
    2 * 2 * H * D * w FLOPs forward for a query seeing w keys, times 3 for the backward -> 12 * H * D * w.
    Like the reference we charge w = min(window, T) (no discount for the causal triangle)."""
    attn = 0
    for w in config.window_sizes():
        eff = config.sequence_len if w is None else min(w, config.sequence_len)
        attn += 12 * config.n_head * config.head_dim * eff
    return 6 * count_params(config)["scaling"] + attn
