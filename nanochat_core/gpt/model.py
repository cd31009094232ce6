"""
The GPT. One dial - depth - and everything else derived from it (see `config_for_depth`).

What is in here, top to bottom:
- rotary position embeddings (base 100k), QK-norm (parameter-free RMSNorm on queries and keys)
- grouped-query attention with optional sliding windows, in three interchangeable implementations:
  a plain fp32 reference, PyTorch SDPA (CPU and CUDA fallback), FlexAttention (CUDA)
- ReLU^2 MLP (4x), no biases anywhere, RMSNorm without parameters everywhere
- untied embedding / unembedding, RMSNorm right after the embedding, logit softcap 15*tanh(x/15)
- value embeddings on alternating layers, mixed into V through a per-KV-head gate 3*sigmoid(W x[:12])
- smear: each position adds a gated share of the previous token's normed embedding (cheap bigram information)
- per-layer residual scalars: x = resid_lambda * x + x0_lambda * x0 (x0 = normed embedding)
- backout: a learned share of the stream after the middle layer is subtracted before the final norm
- exact parameter counts and FLOPs/token from the config alone live in model_config.py (torch-free:
  the CLI's planner prices runs with them)

Construction: `GPT.build(config, device)` builds under torch.device("meta"), then `.to_empty(device=...)` and
`.init_weights()`. Nothing is allocated twice and the init is written down in one place.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_core.common import NanochatError
# The shape of the model as plain data (torch-free, shared with the CLI's planner), re-exported here.
from nanochat_core.gpt.model_config import (  # noqa: F401
    ATTN_IMPLS, SMEAR_CHANNELS, VOCAB_PAD, GPTConfig, config_for_depth, count_params, flops_per_token,
)
from nanochat_core.gpt.cpu_kernels import attend_decode, decode_blocks, rms_norm as fast_rms_norm
from nanochat_core.gpt.quantize import mlp2, project3, swap_modules
from nanochat_core.gpt.muon import MuonAdamW
# FlexAttention (torch >= 2.5, our floor): the CUDA fast path; everything else falls back to SDPA. (It also
# runs eagerly on CPU - unfused and slow - which the tests use.)
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

SOFTCAP = 15.0         # logits = 15 * tanh(logits / 15)
ROPE_BASE = 100_000    # rotary base (the reference uses 100k rather than the classic 10k)
SMEAR_LR = 0.2         # AdamW LR of the smear gate/lambda and the backout lambda (the reference's)


# -----------------------------------------------------------------------------
# Attention kernels. All take q (B, H, Tq, D), k/v (B, Hkv, Tk, D); query t sits at absolute position
# pos0 + t, key j at position j. Query head h reads KV head h // (H / Hkv).

def norm(x: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda and not torch.compiler.is_compiling() and (y := fast_rms_norm(x)) is not None:
        return y   # a CPU decode step: one C call (cpu_kernels.py says why)
    return F.rms_norm(x, (x.size(-1),))


def attention_mask(Tq: int, Tk: int, pos0: int, window: int | None, device: Any) -> torch.Tensor:
    """Bool (Tq, Tk), True = may attend: causal with the position offset, and within the window."""
    qpos = torch.arange(Tq, device=device)[:, None] + pos0
    kpos = torch.arange(Tk, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos < window)
    return mask


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rep = q.size(1) // k.size(1)
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def attention_reference(q, k, v, pos0: int, window: int | None) -> torch.Tensor:
    """Straightforward and slow: explicit masked softmax in fp32. The yardstick for the fast paths."""
    k, v = _expand_kv(q, k, v)
    mask = attention_mask(q.size(2), k.size(2), pos0, window, q.device)
    att = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (att @ v.float()).to(q.dtype)


def attention_decode(q, k, v, window: int | None) -> torch.Tensor:
    """One new query per row that may see the last `window` cached keys (all of them without a window): no
    mask - a window is a slice. Two small matmuls and a softmax; on a CPU the fused SDPA kernel spends ~1 ms
    per call setting up tiles for a (1 x T) score row (measured: a third of a d20 int8 decode step's non-matmul
    time), and its masked variant would also expand the GQA heads."""
    if window is not None and k.size(2) > window:
        k, v = k[:, :, -window:], v[:, :, -window:]
    B, H, _, D = q.shape
    Hkv = k.size(1)
    qg = q.reshape(B, Hkv, H // Hkv, D)   # query head h reads KV head h // (H / Hkv): consecutive heads share one
    att = (qg @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(D))
    y = att.softmax(dim=-1).to(v.dtype) @ v
    return y.reshape(B, H, 1, D)


def attention_sdpa(q, k, v, pos0: int, window: int | None, mask_cache: dict | None = None) -> torch.Tensor:
    Tq, Tk = q.size(2), k.size(2)
    if Tq == 1 and Tk == pos0 + 1 and q.device.type != "cuda":
        # a decode step off CUDA (where SDPA's flash-decoding kernels are the fast path)
        return attention_decode(q, k, v, window)
    window_covers_all = window is None or window >= Tk
    if window_covers_all and pos0 == 0 and Tq == Tk:
        # plain causal: let SDPA pick its fused kernel (flash on CUDA)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))
    if window_covers_all and Tq == 1 and Tk == pos0 + 1:
        # one new token that may see everything cached (and nothing past it): no mask at all
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.size(1) != k.size(1))
    # general case (windows, or a multi-token chunk on top of a cache): explicit bool mask. Masked SDPA
    # is not eligible for the flash kernel anyway, so expand GQA heads rather than rely on enable_gqa.
    cache = {} if mask_cache is None else mask_cache
    key = (Tq, Tk, pos0, window)
    if key not in cache:
        cache[key] = attention_mask(Tq, Tk, pos0, window, q.device)
    k, v = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=cache[key])


_BLOCK_MASKS: "OrderedDict" = OrderedDict()   # (T, window, device) -> BlockMask, least recently used first
BLOCK_MASK_CACHE_MAX = 16 # a handful of training/eval shapes; evals with many lengths must not grow it forever
_FLEX_COMPILED = None     # torch.compile(flex_attention), made on first use on a device in FLEX_COMPILE_DEVICES
# Compiled flex is specialised to each (B, T) it sees (dynamic=False). Dynamo recompiles for every new shape
# and after 8 silently falls back to EAGER flex, which materialises the whole score matrix - so callers
# without a KV cache that feed a new length on almost every call (CORE, categorical chat eval, RL's policy
# loss, greedy sampling) would first pay 8 compiles and then make every later flex call (the bpb eval at
# 32 x 2048 included) slow and memory-hungry. So outside an enclosing torch.compile, compiled flex serves
# only full-length rows (T == sequence_len) and at most FLEX_SHAPES_MAX shapes (batch size x heads); every
# other call goes to SDPA (fused causal kernel; an explicit mask for windows), as the engine's cached decode
# already does. 3 shapes x up to 2 distinct windows = 6 graphs, under dynamo's default limit of 8.
FLEX_SHAPES_MAX = 3
_FLEX_SHAPES: set = set()
FLEX_COMPILE_DEVICES = ("cuda",)   # CPU runs flex eagerly (no compile: it has no fused CPU kernel worth it)
FLEX_COMPILE_BACKEND = "inductor"  # tests swap in a counting backend to check how often flex compiles


def flex_block_masks(T: int, windows: list[int | None], device: torch.device) -> dict:
    """{window: BlockMask} for one forward. On CUDA called through untraced_block_masks(), i.e. kept out
    of torch.compile on purpose (a graph break at the top of forward costs nothing): building masks and
    filling a global cache are side effects that should not be traced into the model's graph."""
    global _FLEX_COMPILED
    if device.type in FLEX_COMPILE_DEVICES and _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False, backend=FLEX_COMPILE_BACKEND)
    out = {}
    for window in windows:
        key = (T, window, str(device))
        if key in _BLOCK_MASKS:
            _BLOCK_MASKS.move_to_end(key)
        else:
            while len(_BLOCK_MASKS) >= BLOCK_MASK_CACHE_MAX:
                _BLOCK_MASKS.popitem(last=False)
            def mask_mod(b, h, q_idx, kv_idx, window=window):
                m = q_idx >= kv_idx
                if window is not None:
                    m = m & (q_idx - kv_idx < window)
                return m
            _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, T, T, device=device)
        out[window] = _BLOCK_MASKS[key]
    return out


@functools.cache
def untraced_block_masks():
    """flex_block_masks wrapped in torch.compiler.disable, so building masks and filling their cache stay out
    of a compiled model's graph. Made on first use on CUDA: the wrapper imports dynamo (~1.5 s of CPU that an
    import of this module, or a CPU run, should not pay)."""
    return torch.compiler.disable(flex_block_masks)


def attention_flex(q, k, v, block_mask) -> torch.Tensor:
    """FlexAttention: skips fully-masked blocks, so short windows are cheap. Training shapes only (no
    cache, Tq == Tk). On CUDA it runs compiled (eager flex is an unfused reference; inside a compiled
    model the outer compile captures it anyway); on CPU eagerly - correct but slow, used by the tests."""
    gqa = q.size(1) != k.size(1)
    if q.device.type in FLEX_COMPILE_DEVICES:
        fn = _FLEX_COMPILED if _FLEX_COMPILED is not None else flex_attention
        return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():  # eager flex warns that it is unfused: on CPU we know, and accept it
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def flex_shape_admitted(B: int, T: int, sequence_len: int, device: torch.device, heads: tuple = ()) -> bool:
    """May this eager (not inside torch.compile) forward use compiled flex? See FLEX_SHAPES_MAX."""
    if device.type not in FLEX_COMPILE_DEVICES:
        return True   # eager flex: no compile, any shape is fine
    if T != sequence_len:
        return False
    key = (B, T, *heads, str(device))
    if key in _FLEX_SHAPES:
        return True
    if len(_FLEX_SHAPES) >= FLEX_SHAPES_MAX:
        return False
    _FLEX_SHAPES.add(key)
    return True


def resolve_attn_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return impl


# -----------------------------------------------------------------------------
# Modules

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); rotate the pairs (x[i], x[i + D/2]) by position-dependent angles."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, has_ve: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, hd = config.n_embd, config.head_dim
        self.c_q = nn.Linear(d, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(self.n_head * hd, d, bias=False)
        self.ve_gate_channels, self.ve_gate_scale = min(config.ve_gate_channels, d), config.ve_gate_scale
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, window, pos0, kv_cache, impl, masks):
        B, T, _ = x.shape
        q, k, v = project3(self.c_q, self.c_k, self.c_v, x)   # three calls, or one kernel call (int4 decode)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if kv_cache is not None and T == 1 and impl == "sdpa" and (y := attend_decode(
                q, k, v, cos, sin, kv_cache, self.layer_idx, window,
                None if ve is None else (ve, x, self.ve_gate.weight, self.ve_gate_scale))) is not None:
            return self.c_proj(y.view(B, 1, -1))   # a CPU decode step: the lines below in one C call
        if ve is not None:
            # value embedding: a second, token-indexed source of values, mixed in by a gate in (0, scale)
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, Hkv)
            ve = ve.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            v = v + (gate.transpose(1, 2).unsqueeze(-1) * ve).to(v.dtype)
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)   # QK-norm, then rotary
        q, k = q.to(v.dtype), k.to(v.dtype)   # under autocast the norm may run in fp32; kernels want one dtype
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        if impl == "flex":
            y = attention_flex(q, k, v, masks[window])
        elif impl == "reference":
            y = attention_reference(q, k, v, pos0, window)
        else:
            y = attention_sdpa(q, k, v, pos0, window, masks)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        if isinstance(self.c_fc, nn.Linear):
            return self.c_proj(F.relu(self.c_fc(x)).square())
        return mlp2(self.c_fc, self.c_proj, x)   # inference weights (quantize.py): one kernel call may do it all


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, has_ve: bool):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, has_ve)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, pos0, kv_cache, impl, masks):
        x = x + self.attn(norm(x), ve, cos, sin, window, pos0, kv_cache, impl, masks)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.window_sizes = config.window_sizes()
        V, d = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * config.head_dim
        ve_layers = set(config.value_embed_layers())
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, d),
            "h": nn.ModuleList([Block(config, i, i in ve_layers) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(d, V, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in sorted(ve_layers)})
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.empty(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.empty(1))
        # Rotary tables for 10x the training context so the engine can generate past it. Not
        # persistent: they are a pure function of the config and are rebuilt by init_weights().
        self.rotary_len = 10 * config.sequence_len
        self.register_buffer("cos", torch.empty(1, 1, self.rotary_len, config.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(1, 1, self.rotary_len, config.head_dim // 2), persistent=False)
        # Residual stream in bf16 under autocast (the reference keeps bf16 activations): half the activation
        # memory and bandwidth between the blocks. Off by default until a GPU has measured it; base_train
        # --bf16-residual and the benchmark sweep toggle it. No effect without autocast (fp32 on CPU).
        self.residual_bf16 = False

    @classmethod
    def build(cls, config: "GPTConfig | dict", device: Any = "cpu") -> "GPT":
        """A freshly initialised model on `device` (config: a GPTConfig or its dict, as checkpoints store it)."""
        with torch.device("meta"):
            model = cls(GPTConfig.from_dict(config) if isinstance(config, dict) else config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @classmethod
    def from_state(cls, config: "GPTConfig | dict", state: dict, fmt: str = "fp32") -> "GPT":
        """A model for inference whose weights ARE the tensors of `state` (load_state_dict(assign=True)): with
        memory-mapped tensors nothing is copied, and nothing is initialised only to be overwritten. `fmt`
        (fp32 | bf16 | int8, see quantize.py) says which modules the state dict is for. Raises ValueError when
        the state does not fit the config. Rotary tables are computed on the state's device."""
        with torch.device("meta"):
            model = swap_modules(cls(GPTConfig.from_dict(config) if isinstance(config, dict) else config), fmt)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        device = next(iter(state.values())).device
        for name in ("cos", "sin"):
            model.register_buffer(name, torch.empty(getattr(model, name).shape, device=device), persistent=False)
        model._init_rotary()
        return model.eval()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The init, in one place (sizes: d = n_embd, L = n_layer, layer i = 0..L-1):
        - wte ~ N(0, 1): RMSNorm follows, so only direction matters; unit scale keeps AdamW steps relative.
        - lm_head ~ N(0, 0.001): near-zero logits, so the first loss is ~ln(vocab).
        - c_q, c_k, c_v, c_fc and value embeddings ~ U(-s, s), s = sqrt(3/d): std 1/sqrt(d), which keeps
          unit-RMS inputs at unit-RMS outputs.
        - both output projections (attn c_proj, mlp c_proj) = 0: every block starts as the identity.
        - ve_gate ~ U(0, 0.02): gates start a little above the middle of their range.
        - resid_lambdas = 1, x0_lambdas = 0.1. (The reference's newer inits - wte 0.8, c_fc 0.4x, these
          scalars graded over depth - measured worse here: docs/PERFORMANCE.md.)
        - smear: gate ~ U(0, 0.02), lambda 0 (starts off); backout lambda 0.2.
        - rotary cos/sin recomputed (base 100k).
        Checkpoints written before this recipe do not care: their weights replace all of it."""
        d = self.config.n_embd
        s = math.sqrt(3.0 / d)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        if self.config.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()
        if self.config.backout:
            self.backout_lambda.fill_(0.2)
        self._init_rotary()

    def _init_rotary(self) -> None:
        hd = self.config.head_dim
        device = self.cos.device
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        self.cos.copy_(freqs.cos()[None, None])
        self.sin.copy_(freqs.sin()[None, None])

    # -- sizes ----------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """Transformer matrices + lm_head (no embeddings, no scalars); see count_params."""
        return sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()

    def estimate_flops(self) -> float:
        """Training FLOPs per token at sequence_len (see flops_per_token)."""
        return flops_per_token(self.config)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    # -- forward --------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: Any = None,
                loss_reduction: str = "mean", last_only: bool = False) -> torch.Tensor:
        """Loss when targets are given, else float32 logits (B, T, vocab) - or (B, 1, vocab) with
        last_only, which is all sampling needs: a long prompt's prefill then skips T-1 rows of the
        unembedding (at vocab 32K that matmul and its fp32 logits dominate a short model's prefill)."""
        B, T = idx.shape
        pos0 = kv_cache.get_pos() if kv_cache is not None else 0
        if pos0 + T > self.rotary_len:
            raise NanochatError(f"sequence of {pos0 + T} tokens exceeds the model's rotary table ({self.rotary_len})")
        cos, sin = self.cos[:, :, pos0:pos0 + T], self.sin[:, :, pos0:pos0 + T]
        impl = resolve_attn_impl(self.config.attn_impl, idx.device)
        # flex serves training shapes only (no cache) and, on CPU, only without autograd (torch has no CPU
        # flex backward); everything else - decode steps included - goes to SDPA
        if impl == "flex" and (kv_cache is not None or (idx.device.type != "cuda" and torch.is_grad_enabled())):
            impl = "sdpa"
        # outside a compiled model, odd shapes must not trigger a compile each (see FLEX_SHAPES_MAX); inside
        # one (training), the outer compile has fixed the shapes and captures flex itself
        if (impl == "flex" and not torch.compiler.is_compiling()
                and not flex_shape_admitted(B, T, self.config.sequence_len, idx.device,
                                            (self.config.n_head, self.config.n_kv_head, self.config.head_dim))):
            impl = "sdpa"
        # masks shared by all layers of this forward: flex {window: BlockMask}, SDPA explicit bool masks
        masks = {}
        if impl == "flex":
            build = untraced_block_masks() if idx.device.type == "cuda" else flex_block_masks
            masks = build(T, sorted(set(self.window_sizes), key=str), idx.device)

        x = norm(self.transformer.wte(idx))
        if self.residual_bf16 and torch.is_autocast_enabled(idx.device.type):
            x = x.to(torch.bfloat16)
        if self.config.smear:
            x = self._smear(x, kv_cache)
        x0 = x
        x_backout = None
        # a decode step reads the per-layer scalars once as Python floats: 2 ops a layer instead of 7, which
        # counts when each small op costs tens of microseconds (cpu_kernels.py)
        floats = (kv_cache is not None and T == 1 and not torch.is_grad_enabled() and not idx.is_cuda
                  and not torch.compiler.is_compiling())
        lambdas = list(zip(self.resid_lambdas.tolist(), self.x0_lambdas.tolist())) if floats else None
        fused = decode_blocks(self, x, x0, idx, cos, sin, kv_cache, lambdas) if lambdas else None
        if fused is not None:   # an int4 decode step on the CPU: the loop below, one C call per block
            x, x_backout = fused
        for i, block in enumerate(self.transformer.h if fused is None else ()):
            if lambdas:
                x = torch.mul(x, lambdas[i][0]).add_(x0, alpha=lambdas[i][1])
            else:   # fp32 scalars cast to the stream's dtype, or bf16 x fp32 would promote the stream to fp32
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i], pos0, kv_cache, impl, masks)
            if self.config.backout and i == self.config.n_layer // 2:
                x_backout = x
        if x_backout is not None:
            # backout: take a learned share of the mid-depth stream (low-level features) back out before the
            # unembedding reads it
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only and targets is None:
            x = x[:, -1:, :]

        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def _smear(self, x: torch.Tensor, kv_cache: Any) -> torch.Tensor:
        """Each position gets a gated share of the previous token's normed embedding (cheap bigram information;
        the gate reads the current token). With a KV cache, a chunk's first position takes the last embedding
        of the chunk before, which the cache keeps; the very first token has no previous one."""
        before = getattr(kv_cache, "prev_embedding", None)
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]
        prev = x[:, :-1] if before is None else torch.cat([before.to(x.dtype), x[:, :-1]], dim=1)
        start = x.size(1) - prev.size(1)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, start:, :SMEAR_CHANNELS]))
        return torch.cat([x[:, :start], x[:, start:] + gate * prev], dim=1)

    # -- optimizer ------------------------------------------------------------
    def setup_optimizer(self, lr_scale: float = 1.0, weight_decay: float = 0.0, *, matrix_lr: float = 0.02,
                        embedding_lr: float = 0.3, unembedding_lr: float = 0.008, scalar_lr: float = 0.5,
                        compile_muon: bool = False):
        """Muon for every 2-D matrix inside the blocks, AdamW for embeddings, lm_head and scalars.
        The base learning rates are the reference's (docs/ARCHITECTURE.md); every stage scales them all by
        `lr_scale` (base training by its batch size, mid/SFT/RL by a fraction of base's) rather than restating them.
        Groups come in a fixed order (AdamW groups, then one Muon group per matrix shape in order of first
        appearance), and every group carries the parameter names (optimizer-state checkpoints are keyed by
        name, so they survive a change of world size)."""
        matrix_lr, embedding_lr, unembedding_lr, scalar_lr = (lr * lr_scale for lr in
                                                              (matrix_lr, embedding_lr, unembedding_lr, scalar_lr))
        # AdamW LRs were tuned at d_model = 768; the reference scales them by 1/sqrt(d_model/768) because
        # wider embeddings / unembeddings want proportionally smaller steps.
        scale = (self.config.n_embd / 768) ** -0.5
        named = dict(self.named_parameters())
        def names(prefix: str) -> list[str]:
            return [n for n in named if n == prefix or n.startswith(prefix + ".")]
        groups: list[dict] = []
        def adamw(ns: list[str], lr: float, betas=(0.8, 0.95), wd: float = 0.0) -> None:
            if ns:
                groups.append(dict(kind="adamw", names=ns, params=[named[n] for n in ns], lr=lr,
                                   betas=betas, eps=1e-10, weight_decay=wd))
        # Per-group betas and decoupled weight decay as the reference settled them: embeddings keep a long
        # second-moment memory (beta2 0.995: rare tokens get rare, noisy gradients) and a little weight decay;
        # value embeddings learn at half the embedding LR; residual scalars sit on the main path of every layer
        # (0.01 x the scalar LR); x0 scalars get a slower first moment (beta1 0.96); smear/backout scalars
        # have their own fixed LR.
        adamw(names("lm_head"), unembedding_lr * scale, betas=(0.8, 0.96), wd=0.01)
        adamw(names("transformer.wte"), embedding_lr * scale, betas=(0.8, 0.995), wd=0.001)
        adamw(names("value_embeds"), embedding_lr * scale * 0.5, betas=(0.8, 0.995), wd=0.01)
        adamw(names("resid_lambdas"), scalar_lr * 0.01, wd=0.05)
        adamw(names("x0_lambdas"), scalar_lr, betas=(0.96, 0.95))
        adamw(names("smear_gate") + names("smear_lambda") + names("backout_lambda"), SMEAR_LR * lr_scale)
        by_shape: dict[tuple, list[str]] = {}
        for n in names("transformer.h"):
            if named[n].ndim != 2:
                raise NanochatError(f"unexpected non-matrix parameter in the blocks: {n}")
            by_shape.setdefault(tuple(named[n].shape), []).append(n)
        for ns in by_shape.values():
            groups.append(dict(kind="muon", names=ns, params=[named[n] for n in ns], lr=matrix_lr,
                               momentum=0.95, beta2=0.9, weight_decay=weight_decay, ns_steps=5))
        covered = [n for g in groups for n in g["names"]]
        assert sorted(covered) == sorted(named), "every parameter must be in exactly one optimizer group"
        return MuonAdamW(groups, compile_step=compile_muon)
