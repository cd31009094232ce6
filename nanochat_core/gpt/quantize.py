"""
Smaller weights for inference: `--dtype auto|fp32|bf16|int8|int4` of chat, serve, eval, export and the benchmark.

Batch-1 decode reads every weight matrix once per token, so its speed is (memory bandwidth) / (bytes of the
weights): fp32 -> bf16 halves the bytes, int8 quarters them, int4 takes them to 1/7. What is stored how:
  - fp32: the checkpoint as trained (the yardstick).
  - bf16: every matrix and embedding table in bf16; activations (the residual stream, norms, attention, the
    KV cache) stay fp32. A matmul rounds its input to bf16 and accumulates in fp32 (oneDNN on CPUs with
    AVX512-BF16/AMX, otherwise a slower emulation: that is why `auto` does not pick bf16 on a CPU).
  - int8: WEIGHT-ONLY: each output row of a matrix (and each row of an embedding table) is stored as int8
    with one fp32 scale, w ~= scale[n] * q[n, k], q = round(w / scale), scale = max|w[n]| / 127.
    Activations stay float. Small matrices (the value-embedding gates, the smear gate) and the scalars stay fp32.
  - int4: every matrix of the blocks and the head in groups of 32 weights along the input, each group with one
    bf16 scale: w ~= scale * (q - 8), q in 0..15, two to a byte (quantize_groups: of a few scales the one with
    the least squared error, as llama.cpp's quantizers search). Lookup tables stay int8 (they are read one row
    per token, so 4 bits would save memory but no time). Decode on a CPU with AVX512-VNNI rounds the
    activations to int8 per group too (in the kernel; the stored model does not change).
How an int8 matmul runs, by the number of rows M it multiplies (measured: docs/PERFORMANCE.md):
  - M <= KERNEL_MAX_ROWS on a CPU (decode): our own small C kernel (cpu_kernels.c), compiled once per machine with the
    system C compiler and cached under nanochat_home()/kernels. It converts 16 int8 weights at a time to fp32 in
    registers and multiply-adds them with the fp32 activations, 4 output rows per pass so each activation load
    serves 4 rows: it reads 1 byte per weight and nothing else. It prefetches the rows two passes ahead into
    L2: without that a single thread kept too few loads in flight and read 7.7 GB/s where MKL's fp32 matrix-
    vector product reads 12.5; with it, 15-19 GB/s (per CPU-second, on this machine under load). torch 2.13's CPU candidates were slower here:
    aten._weight_int8pack_mm is ~15x slower than an fp32 matmul with fp32 activations and only ~2x faster than
    fp32 with bf16 ones; torch._int_mm needs int8 activations; an inductor-compiled dequant + reduction runs a
    single accumulator chain per row (~3x fp32 at best) and costs ~10 s of compile per shape.
  - larger M (prefill, eval), or no C compiler: dequantise the matrix to bf16 (CPUs with native bf16) or to the
    activations' dtype, and call the ordinary matmul; the per-row scale multiplies the output. Prefill is
    compute-bound, where the bf16 matmul is ~2x the fp32 one.
int4 runs the same way (kernels i4_linear/i4_linear3 for decode, i4_dequant + the ordinary matmul above that).
`auto` = int4 on a CPU where the kernels build (the measured winner for decode, bpb within 1% of fp32's), int8
where they do not (int4's torch fallback unpacks every weight on every token); bf16 on CUDA (what inference always used there); on Apple MPS bf16 as well (not measured: no Mac here).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_core.common import NanochatError
from nanochat_core.gpt.cpu_kernels import kernel

DTYPES = ("auto", "fp32", "bf16", "int8", "int4")
KERNEL_MAX_ROWS = 16   # above this the dequantise + matmul path wins (measured at M = 8 and 32)
FORMAT_VERSION = 1     # bump when the stored layout of a quantised copy changes: older caches are rebuilt


def resolve_dtype(dtype: str | None, device: Any) -> str:
    """The concrete format for `--dtype` on `device`: fp32 | bf16 | int8."""
    dtype = dtype or "auto"
    if dtype not in DTYPES:
        raise NanochatError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if dtype != "auto":
        return dtype
    kind = torch.device(device).type
    if kind == "cpu":
        # int4 through our kernels decodes fastest here at a bpb within ~0.5% of fp32's (docs/PERFORMANCE.md);
        # without a C compiler int4's fallback unpacks every weight on every token, and int8's costs less
        return "int4" if kernel("i4_linear", quiet=True) is not None else "int8"
    return "bf16"   # cuda (bf16 tensor cores), mps (bf16 needs macOS 14; pass --dtype fp32 on older systems)


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 / AMX on x86): oneDNN's own check."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# -----------------------------------------------------------------------------
# Modules that replace nn.Linear / nn.Embedding at inference. Their weights are Parameters with
# requires_grad=False, so model.parameters(), .to(device) and state_dict() treat them like any weight.

def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, fp32 scale) with w ~= scale[:, None] * q, one scale per row (symmetric, max-abs)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


GROUP = 32   # int4: weights per scale, along the input dimension (as in llama.cpp's Q4_0)
SCALE_TRIES = (1.0, 0.95, 0.9, 0.85)


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 (packed uint8 [N, K/2], bf16 scale [N, K/32]) with w ~= scale * (q - 8), q in 0..15: per group of 32
    weights the one of largest magnitude maps exactly to -8 (its sign decides which end gets the extra level).
    The scale is rounded to bf16 before q is computed, so q is exact for the scale the kernel reads."""
    N, K = w.shape
    g = w.float().reshape(N, K // GROUP, GROUP)
    big = g.gather(2, g.abs().argmax(dim=2, keepdim=True))
    best_d, best_err = None, None
    for f in SCALE_TRIES:
        d = (big * (f / -8.0)).to(torch.bfloat16).float()
        d = torch.where(d == 0, torch.ones_like(d), d)   # an all-zero group: q = 8, any scale gives 0
        err = ((torch.round(g / d).clamp_(-8, 7) * d - g) ** 2).sum(2, keepdim=True)
        if best_d is None:
            best_d, best_err = d, err
        else:
            better = err < best_err
            best_d, best_err = torch.where(better, d, best_d), torch.where(better, err, best_err)
    d = best_d
    q = (torch.round(g / d) + 8).clamp_(0, 15).to(torch.uint8)
    packed = q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4)
    return packed.reshape(N, K // 2), d.squeeze(2).to(torch.bfloat16)


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] matrix an int4 weight stands for (the C kernel's i4_dequant does the same, faster)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    if dtype in (torch.float32, torch.bfloat16) and packed.device.type == "cpu" and (fn := kernel("i4_dequant")):
        out = torch.empty(N, K, dtype=dtype)
        fn(packed.data_ptr(), scale.data_ptr(), out.data_ptr(), N, K, torch.get_num_threads(), dtype == torch.bfloat16)
        return out
    p = packed.reshape(N, K // GROUP, GROUP // 2)
    q = torch.cat([p & 15, p >> 4], dim=2).to(dtype) - 8
    return (q * scale.to(dtype)[..., None]).reshape(N, K)


def _decode_rows(x: torch.Tensor, k: int) -> bool:
    """Is `x` a few fp32 rows on the CPU outside autograd: what the C kernels take."""
    return x.dtype == torch.float32 and x.numel() <= KERNEL_MAX_ROWS * k and not x.is_cuda and x.device.type == "cpu" \
        and not torch.is_grad_enabled()


def project3(a: nn.Module, b: nn.Module, c: nn.Module, x: torch.Tensor):
    """(a(x), b(x), c(x)) for three projections of the same input (attention's q, k, v). When all three are int4
    and x is a decode step on the CPU, one kernel call computes them (the activations are prepared once, and
    the threads split the three matrices' rows between them): it saves two calls and two thread wake-ups per
    layer, ~2 ms of a d20 step (docs/PERFORMANCE.md)."""
    if getattr(a, "fmt", None) == "int4" == getattr(b, "fmt", None) == getattr(c, "fmt", None) \
            and _decode_rows(x, a.in_features) and (fn := kernel("i4_linear3")) is not None:
        x2 = x.reshape(-1, a.in_features).contiguous()
        M = x2.size(0)
        ys = [torch.empty(M, m.out_features) for m in (a, b, c)]
        fn(x2.data_ptr(), M, a.in_features, torch.get_num_threads(),
           *[v for m, y in zip((a, b, c), ys) for v in (m.weight.data_ptr(), m.scale.data_ptr(), y.data_ptr(),
                                                        m.out_features)])
        return tuple(y.view(*x.shape[:-1], y.size(1)) for y in ys)
    return a(x), b(x), c(x)


def mlp2(up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down(relu(up(x))^2), the MLP, for inference weights; for two int4 matrices and a decode step on the CPU
    one kernel call does both (one call and one hidden tensor less per layer)."""
    if getattr(up, "fmt", None) == "int4" == getattr(down, "fmt", None) and _decode_rows(x, up.in_features) \
            and (fn := kernel("i4_mlp")) is not None:
        x2 = x.reshape(-1, up.in_features).contiguous()
        y = torch.empty(x2.size(0), down.out_features)
        fn(x2.data_ptr(), x2.size(0), up.in_features, torch.get_num_threads(), up.weight.data_ptr(),
           up.scale.data_ptr(), up.out_features, down.weight.data_ptr(), down.scale.data_ptr(), y.data_ptr(),
           down.out_features)
        return y.view(*x.shape[:-1], down.out_features)
    return down(up(x, relu2=True))


class _QuantWeight(nn.Module):
    """A weight matrix stored bf16, int8 + one fp32 scale per row, or int4 + one bf16 scale per group of 32
    (`scale`, None for bf16)."""

    def __init__(self, weight: torch.Tensor, fmt: str, scale: torch.Tensor | None = None):
        super().__init__()
        self.fmt = fmt
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False) if scale is not None else None

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: str):
        if fmt == "bf16":
            return cls(w.to(torch.bfloat16), fmt)
        q, s = quantize_groups(w) if fmt == "int4" else quantize_rows(w)
        return cls(q, fmt, s)


class QuantLinear(_QuantWeight):
    """x @ W.T (no bias) with W stored bf16, int8 + a per-output-row fp32 scale, or int4 + a bf16 scale per
    group of 32 inputs. x and the result keep the caller's dtype."""

    def __init__(self, weight: torch.Tensor, fmt: str, scale: torch.Tensor | None = None):
        super().__init__(weight, fmt, scale)
        self.out_features = weight.shape[0]
        self.in_features = weight.shape[1] * (2 if fmt == "int4" else 1)
        self._fn = "i4_linear" if fmt == "int4" else "i8_linear"

    def forward(self, x: torch.Tensor, relu2: bool = False) -> torch.Tensor:
        """x @ W.T, or with relu2 relu(x @ W.T)^2 (the MLP's activation, which the int4 kernel applies as it
        writes the output: two torch ops less per layer in a decode step)."""
        if self.fmt != "bf16" and _decode_rows(x, self.in_features) and (fn := kernel(self._fn)) is not None:
            x2 = x.reshape(-1, self.in_features).contiguous()
            y = torch.empty(x2.size(0), self.out_features)
            args = (x2.data_ptr(), self._parameters["weight"].data_ptr(), self._parameters["scale"].data_ptr(),
                    y.data_ptr(), x2.size(0), self.out_features, self.in_features, torch.get_num_threads())
            if self.fmt == "int4":
                fn(*args, relu2)
                return y.view(*x.shape[:-1], self.out_features)
            fn(*args)
            y = y.view(*x.shape[:-1], self.out_features)
        elif self.fmt == "bf16":
            y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        else:   # prefill / eval / no kernel: dequantise and use the ordinary matmul (compute-bound here)
            x2 = x.reshape(-1, self.in_features)
            compute = torch.bfloat16 if (x.device.type == "cpu" and cpu_has_bf16()) else x.dtype
            if self.fmt == "int4":
                y = F.linear(x2.to(compute), dequantize_groups(self.weight, self.scale, compute)).to(x.dtype)
            else:
                y = F.linear(x2.to(compute), self.weight.to(compute)).to(x.dtype) * self.scale.to(x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        return F.relu(y).square() if relu2 else y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}"


class QuantEmbedding(_QuantWeight):
    """A lookup table stored bf16 or int8 + a per-row scale; rows come out in `out_dtype` (fp32)."""

    def __init__(self, weight: torch.Tensor, fmt: str, scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32):
        super().__init__(weight, fmt, scale)
        self.out_dtype = out_dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if (self.fmt == "int8" and self.out_dtype == torch.float32 and idx.numel() <= KERNEL_MAX_ROWS
                and idx.device.type == "cpu" and idx.dtype == torch.int64 and not torch.is_grad_enabled()
                and (fn := kernel("i8_rows")) is not None):   # a decode step: one C call, not five torch ops
            idx = idx.contiguous()
            rows = torch.empty(*idx.shape, self.weight.size(1))
            if fn(self.weight.data_ptr(), self.scale.data_ptr(), idx.data_ptr(), rows.data_ptr(), idx.numel(),
                  self.weight.size(1), self.weight.size(0)):
                raise IndexError(f"index out of range: a token id is not below the table's {self.weight.size(0)} rows")
            return rows
        rows = F.embedding(idx, self.weight).to(self.out_dtype)
        if self.scale is not None:
            rows = rows * F.embedding(idx, self.scale[:, None]).to(self.out_dtype)
        return rows


# -----------------------------------------------------------------------------
# Which weights get which treatment. Names are state-dict keys of GPT.

def _kind(name: str, shape: tuple) -> str:
    """'linear' | 'embedding' | 'keep' for a GPT weight (without its '.weight' suffix)."""
    if name.startswith("transformer.h.") and name.rsplit(".", 1)[-1] in ("c_q", "c_k", "c_v", "c_proj", "c_fc"):
        return "linear"
    if name == "lm_head":
        return "linear"
    if name == "transformer.wte" or name.startswith("value_embeds."):
        return "embedding"
    return "keep"   # ve_gate, smear_gate (a few hundred weights each), scalars


def _format_of(name: str, kind: str, in_features: int, fmt: str) -> str:
    """The format one matrix is stored in within a model of format `fmt`. An int4 model keeps int8 where 4 bits
    would not pay: lookup tables (one row read per token), and a matrix whose input is no whole number of groups
    (not one of GPT's: its widths are multiples of 64)."""
    if fmt != "int4":
        return fmt
    if kind == "linear" and in_features % GROUP == 0:
        return "int4"
    return "int8"


def quantize_state(state: dict, fmt: str) -> dict:
    """fp32 state dict -> the state dict of the quantised model (for fmt bf16/int8/int4): `X.weight` becomes
    bf16, int8 or packed int4, the last two add `X.scale`. Tensor by tensor, so only one fp32 matrix is
    converted at a time."""
    out = {}
    for key, w in state.items():
        base = key[:-len(".weight")] if key.endswith(".weight") else None
        kind = _kind(base, tuple(w.shape)) if base is not None and w.ndim == 2 else "keep"
        one = _format_of(base, kind, w.shape[-1], fmt) if kind != "keep" else None
        if one is None:
            out[key] = w.clone()   # small; a view would keep the whole fp32 file mapped (and resident)
        elif one == "bf16":
            out[key] = w.to(torch.bfloat16)
        else:
            out[key], out[base + ".scale"] = (quantize_groups if one == "int4" else quantize_rows)(w)
    return out


def swap_modules(model: nn.Module, fmt: str) -> nn.Module:
    """Replace the model's Linear/Embedding modules of the kinds above by Quant* modules of `fmt`, with
    placeholder weights of the right dtype and shape on the same device as the model (meta for a model
    about to receive load_state_dict(assign=True), else converted from the module's own weights)."""
    if fmt == "fp32":
        return model
    for name, mod in list(model.named_modules()):
        kind = _kind(name, ())
        if kind == "keep" or not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        cls = QuantLinear if kind == "linear" else QuantEmbedding
        new = cls.from_float(mod.weight.detach(), _format_of(name, kind, mod.weight.shape[1], fmt))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes one decode step reads for the weights: every matrix of the blocks and the head (with their int8/int4
    scales), not the lookup tables (one row per token) - the numerator of the bandwidth bound."""
    total = 0
    for name, mod in model.named_modules():
        if _kind(name, ()) != "linear" and not (name.startswith("transformer.h.") and isinstance(mod, nn.Linear)):
            continue
        for p in mod.parameters(recurse=False):
            total += p.numel() * p.element_size()
    return total


def describe(model: nn.Module) -> str:
    """'int4' / 'int8' / 'bf16' / 'fp32': the format of the model's block matrices."""
    mlp = model.transformer.h[0].mlp.c_fc
    return getattr(mlp, "fmt", None) or {torch.bfloat16: "bf16"}.get(mlp.weight.dtype, "fp32")
