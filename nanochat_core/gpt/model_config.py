"""
The model's shape as plain data: `GPTConfig`, the one dial `config_for_depth`, and exact parameter
counts and FLOPs per token computed from the config alone. No torch here on purpose: the CLI's planner
prices runs with these same functions (so a plan and the trained model can never disagree), and
`nanochat --help` must not pay for importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from nanochat_core.common import NanochatError

ATTN_IMPLS = ("auto", "reference", "sdpa", "flex")
VOCAB_PAD = 64         # pad the embedding tables to a multiple of 64 for friendlier matmul shapes
SMEAR_CHANNELS = 24    # the smear gate looks at the first 24 channels of the normed embedding


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
    # The 2026 recipe pieces (docs/PERFORMANCE.md has the ablation that kept them). Checkpoints written before
    # them lack these keys and load with LEGACY_RECIPE's values (from_dict), so an old run resumes unchanged.
    ve_gate_channels: int = 12    # the value-embedding gate reads this many channels of the block input
    ve_gate_scale: float = 3.0    # gate = scale * sigmoid(.), in (0, scale)
    smear: bool = True            # mix the previous token's embedding into each position (gated)
    backout: bool = True          # subtract a learned share of the mid-depth residual before the final norm

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """A config as a checkpoint stores it; keys it lacks are from before the recipe changes above."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NanochatError(f"model config has unknown keys {unknown}: written by a newer nanochat?")
        return cls(**{**LEGACY_RECIPE, **d})

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


# What a checkpoint without the recipe keys was trained with (see GPTConfig.from_dict).
LEGACY_RECIPE = dict(ve_gate_channels=32, ve_gate_scale=2.0, smear=False, backout=False)


MAX_DEPTH = 64   # what `nanochat train --depth` accepts (the planner searches far below it)


def check_depth(depth: int) -> None:
    """The one check of `--depth` (the local flow's and the planner's)."""
    if not 1 <= depth <= MAX_DEPTH:
        raise NanochatError(f"--depth must be between 1 and {MAX_DEPTH}, got {depth}")


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
    matrices = L * per_layer + n_ve * min(config.ve_gate_channels, d) * config.n_kv_head
    counts = {
        "wte": V * d,
        "value_embeds": n_ve * V * kv_dim,
        "lm_head": V * d,
        "transformer_matrices": matrices,
        # resid/x0 lambdas per layer; the smear gate (SMEAR_CHANNELS -> 1) and its lambda; backout's lambda
        "scalars": 2 * L + (SMEAR_CHANNELS + 1 if config.smear else 0) + (1 if config.backout else 0),
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
