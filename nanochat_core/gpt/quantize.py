"""
Smaller weights for inference: `--dtype auto|fp32|bf16|int8` of chat, serve, eval, export and the benchmark.

Batch-1 decode reads every weight matrix once per token, so its speed is (memory bandwidth) / (bytes of the
weights): fp32 -> bf16 halves the bytes, int8 quarters them. What is stored how:
  - fp32: the checkpoint as trained (the yardstick).
  - bf16: every matrix and embedding table in bf16; activations (the residual stream, norms, attention, the
    KV cache) stay fp32. A matmul rounds its input to bf16 and accumulates in fp32 (oneDNN on CPUs with
    AVX512-BF16/AMX, otherwise a slower emulation: that is why `auto` does not pick bf16 on a CPU).
  - int8: WEIGHT-ONLY: each output row of a matrix (and each row of an embedding table) is stored as int8
    with one fp32 scale, w ~= scale[n] * q[n, k], q = round(w / scale), scale = max|w[n]| / 127.
    Activations stay float. Small matrices (the value-embedding gates, the smear gate) and the scalars stay fp32.
How an int8 matmul runs, by the number of rows M it multiplies (measured: docs/PERFORMANCE.md):
  - M <= KERNEL_MAX_ROWS on a CPU (decode): our own small C kernel (below), compiled once per machine with the
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
`auto` = int8 on a CPU (the measured winner for decode, quality within the tolerance of the quality checks);
bf16 on CUDA (what inference always used there); on Apple MPS bf16 as well (not measured: no Mac here).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_core.common import NanochatError, nanochat_home

DTYPES = ("auto", "fp32", "bf16", "int8")
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
        return "int8"
    return "bf16"   # cuda (bf16 tensor cores), mps (bf16 needs macOS 14; pass --dtype fp32 on older systems)


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 / AMX on x86): oneDNN's own check."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# -----------------------------------------------------------------------------
# The decode kernel: y[m, n] = s[n] * sum_k x[m, k] * q[n, k], fp32 x and y, int8 q.

KERNEL_SRC = r"""
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define VL 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf ldf(const float* p) { return _mm512_loadu_ps(p); }
static inline vf ldb(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline vf fma_(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VL 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf ldf(const float* p) { return _mm256_loadu_ps(p); }
static inline vf ldb(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline vf fma_(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(vf v) { float t[8]; _mm256_storeu_ps(t, v); return t[0]+t[1]+t[2]+t[3]+t[4]+t[5]+t[6]+t[7]; }
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#include <string.h>
#define VL 4
typedef float32x4_t vf;
static inline vf vzero(void) { return vdupq_n_f32(0.f); }
static inline vf ldf(const float* p) { return vld1q_f32(p); }
static inline vf ldb(const int8_t* p) { int32_t b; memcpy(&b, p, 4);
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(b)))))); }
static inline vf fma_(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline float hsum(vf v) { return vaddvq_f32(v); }
#else
#define VL 1
typedef float vf;
static inline vf vzero(void) { return 0.f; }
static inline vf ldf(const float* p) { return *p; }
static inline vf ldb(const int8_t* p) { return (float)*p; }
static inline vf fma_(vf a, vf b, vf c) { return a * b + c; }
static inline float hsum(vf v) { return v; }
#endif
#define R 4
void i8_linear(const float* x, const int8_t* w, const float* s, float* y, long M, long N, long K, int threads) {
  long Kv = K - K % VL;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long n0 = 0; n0 < N; n0 += R) {
    long nr = N - n0 < R ? N - n0 : R;
    const int8_t* w0 = w + n0 * K;
    for (long m = 0; m < M; m++) {
      const float* xm = x + m * K;
      float t[R] = {0, 0, 0, 0};
      if (nr == R) {
        vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
        for (long k = 0; k < Kv; k += VL) {
          vf xv = ldf(xm + k);
          if ((k & 63) == 0)   /* each cache line of the rows 2 passes ahead, into L2 (see the module doc) */
            for (int r = 2 * R; r < 3 * R; r++) __builtin_prefetch(w0 + r * K + k, 0, 2);
          a0 = fma_(xv, ldb(w0 + k), a0); a1 = fma_(xv, ldb(w0 + K + k), a1);
          a2 = fma_(xv, ldb(w0 + 2 * K + k), a2); a3 = fma_(xv, ldb(w0 + 3 * K + k), a3);
        }
        t[0] = hsum(a0); t[1] = hsum(a1); t[2] = hsum(a2); t[3] = hsum(a3);
      } else {
        for (long r = 0; r < nr; r++) {
          vf a = vzero();
          for (long k = 0; k < Kv; k += VL) a = fma_(ldf(xm + k), ldb(w0 + r * K + k), a);
          t[r] = hsum(a);
        }
      }
      for (long r = 0; r < nr; r++) {
        for (long k = Kv; k < K; k++) t[r] += xm[k] * (float)w0[r * K + k];
        y[m * N + n0 + r] = t[r] * s[n0 + r];
      }
    }
  }
}
"""

_KERNEL: Any = None      # the ctypes function once built, False when it cannot be (no compiler): fall back
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-mcpu=native"], ["-O3"])


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def int8_kernel(quiet: bool = False):
    """The compiled decode kernel (ctypes function), or None when this machine cannot build it. Built once
    per machine + source (the .so is cached by a hash of both), in a temp file renamed into place."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL or None
    if os.environ.get("NANOCHAT_NO_KERNEL") == "1":   # tests and the benchmark's fallback row
        return None
    _KERNEL = False
    cc = _compiler()
    if cc is None:
        if not quiet:
            print("note: no C compiler found: int8 decode uses torch's slower fallback (install gcc or clang)",
                  file=sys.stderr)
        return None
    tag = hashlib.sha256(f"{KERNEL_SRC}{platform.machine()}{platform.processor()}{sys.platform}".encode()).hexdigest()[:16]
    out_dir = nanochat_home() / "kernels"
    lib = out_dir / f"i8_linear-{tag}.so"
    if not lib.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = Path(tmp) / "i8_linear.c"
            src.write_text(KERNEL_SRC)
            for flags in _FLAG_SETS:
                so = Path(tmp) / "k.so"
                r = subprocess.run([cc, *flags, "-shared", "-fPIC", str(src), "-o", str(so)],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    os.replace(so, lib)
                    break
            else:
                if not quiet:
                    print(f"note: the int8 kernel did not compile ({r.stderr.strip()[:160]}); using torch's "
                          "slower fallback", file=sys.stderr)
                return None
    fn = ctypes.CDLL(str(lib)).i8_linear
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    fn.restype = None
    _KERNEL = fn
    return fn


# -----------------------------------------------------------------------------
# Modules that replace nn.Linear / nn.Embedding at inference. Their weights are Parameters with
# requires_grad=False, so model.parameters(), .to(device) and state_dict() treat them like any weight.

def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, fp32 scale) with w ~= scale[:, None] * q, one scale per row (symmetric, max-abs)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class _QuantWeight(nn.Module):
    """A weight matrix stored bf16, or int8 + one fp32 scale per row (`scale`, None for bf16)."""

    def __init__(self, weight: torch.Tensor, fmt: str, scale: torch.Tensor | None = None):
        super().__init__()
        self.fmt = fmt
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False) if scale is not None else None

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: str):
        if fmt == "bf16":
            return cls(w.to(torch.bfloat16), fmt)
        q, s = quantize_rows(w)
        return cls(q, fmt, s)


class QuantLinear(_QuantWeight):
    """x @ W.T (no bias) with W stored bf16, or int8 + a per-output-row fp32 scale. x and the result keep the
    caller's dtype."""

    def __init__(self, weight: torch.Tensor, fmt: str, scale: torch.Tensor | None = None):
        super().__init__(weight, fmt, scale)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "bf16":
            return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        M = x2.size(0)
        if x.device.type == "cpu" and x.dtype == torch.float32 and M <= KERNEL_MAX_ROWS and not torch.is_grad_enabled():
            fn = int8_kernel()
            if fn is not None:
                x2 = x2.contiguous()
                y = torch.empty(M, self.out_features, dtype=torch.float32)
                fn(x2.data_ptr(), self.weight.data_ptr(), self.scale.data_ptr(), y.data_ptr(),
                   M, self.out_features, self.in_features, torch.get_num_threads())
                return y.view(*shape[:-1], self.out_features)
        # prefill / eval / no kernel: dequantise and use the ordinary matmul (compute-bound here)
        compute = torch.bfloat16 if (x.device.type == "cpu" and cpu_has_bf16()) else x.dtype
        y = F.linear(x2.to(compute), self.weight.to(compute)).to(x.dtype) * self.scale.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}"


class QuantEmbedding(_QuantWeight):
    """A lookup table stored bf16 or int8 + a per-row scale; rows come out in `out_dtype` (fp32)."""

    def __init__(self, weight: torch.Tensor, fmt: str, scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32):
        super().__init__(weight, fmt, scale)
        self.out_dtype = out_dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
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


def quantize_state(state: dict, fmt: str) -> dict:
    """fp32 state dict -> the state dict of the quantised model (for fmt bf16/int8): `X.weight` becomes int8
    or bf16, int8 adds `X.scale`. Tensor by tensor, so only one fp32 matrix is converted at a time."""
    out = {}
    for key, w in state.items():
        base = key[:-len(".weight")] if key.endswith(".weight") else None
        if base is None or w.ndim != 2 or _kind(base, tuple(w.shape)) == "keep":
            out[key] = w.clone()   # small; a view would keep the whole fp32 file mapped (and resident)
        elif fmt == "bf16":
            out[key] = w.to(torch.bfloat16)
        else:
            out[key], out[base + ".scale"] = quantize_rows(w)
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
        new = cls.from_float(mod.weight.detach(), fmt)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes one decode step reads for the weights: every matrix of the blocks and the head (with its int8
    scales), not the lookup tables (one row per token) - the numerator of the bandwidth bound."""
    total = 0
    for name, mod in model.named_modules():
        if _kind(name, ()) != "linear" and not (name.startswith("transformer.h.") and isinstance(mod, nn.Linear)):
            continue
        for p in mod.parameters(recurse=False):
            total += p.numel() * p.element_size()
    return total


def describe(model: nn.Module) -> str:
    """'int8' / 'bf16' / 'fp32': the format of the model's weight matrices."""
    head = model.lm_head
    return getattr(head, "fmt", None) or {torch.bfloat16: "bf16"}.get(head.weight.dtype, "fp32")
