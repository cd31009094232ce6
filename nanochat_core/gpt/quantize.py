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
import functools
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
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline void ldn(const uint8_t* p, vf* lo, vf* hi) { __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  *lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))); *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VL 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf ldf(const float* p) { return _mm256_loadu_ps(p); }
static inline vf ldb(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline vf fma_(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(vf v) { float t[8]; _mm256_storeu_ps(t, v); return t[0]+t[1]+t[2]+t[3]+t[4]+t[5]+t[6]+t[7]; }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline void ldn(const uint8_t* p, vf* lo, vf* hi) { __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  *lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))); *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)); }
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
static inline vf vset1(float a) { return vdupq_n_f32(a); }
static inline void ldn(const uint8_t* p, vf* lo, vf* hi) { uint32_t b; memcpy(&b, p, 4);
  uint32x4_t v = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(b)))));
  *lo = vcvtq_f32_u32(vandq_u32(v, vdupq_n_u32(15))); *hi = vcvtq_f32_u32(vshrq_n_u32(v, 4)); }
#else
#define VL 1
typedef float vf;
static inline vf vzero(void) { return 0.f; }
static inline vf ldf(const float* p) { return *p; }
static inline vf ldb(const int8_t* p) { return (float)*p; }
static inline vf fma_(vf a, vf b, vf c) { return a * b + c; }
static inline float hsum(vf v) { return v; }
static inline vf vset1(float a) { return a; }
static inline void ldn(const uint8_t* p, vf* lo, vf* hi) { *lo = (float)(*p & 15); *hi = (float)(*p >> 4); }
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

/* int4 (quantize_groups): in row n, group g of G = 32 weights is 16 bytes; byte j holds weight 32g+j in its low
   nibble and weight 32g+16+j in its high one, each as q + 8 (0..15); s[n, g] is the group's bf16 scale.
   y[m, n] = sum_g s[n,g] * sum_j x[m, 32g+j] * nibble_j - 8 * sum_g s[n,g] * xsum[m, g]: the -8 is taken out
   of the inner loop through the group sums of x, computed once per call. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#define G 32
static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
typedef struct { const uint8_t* w; const uint16_t* s; float* y; long N; } mat;   /* one weight, one output */
/* One call serves up to 3 matrices that read the same x (attention's q, k, v): the activations are prepared
   once, and one parallel loop shares all their blocks of R rows among the threads. */
#define MATS(count) long nb[3], total = 0; \
  for (int i = 0; i < count; i++) { nb[i] = (mats[i].N + R - 1) / R; total += nb[i]; }
#define PICK(b) int i = 0; long n0 = b; while (n0 >= nb[i]) { n0 -= nb[i]; i++; } n0 *= R; \
  const mat* mt = mats + i; long N = mt->N, nr = N - n0 < R ? N - n0 : R;
static inline __attribute__((always_inline)) void i4_rows(const float* xm, const float* xsm, const uint8_t* w,
    const uint16_t* s, float* t, long NG, long K, const int nr) {
  vf a[R]; float c[R];
  for (int r = 0; r < nr; r++) { a[r] = vzero(); c[r] = 0.f; }
  for (long g = 0; g < NG; g++) {
    const float* xg = xm + g * G;
    if (nr == R && (g & 3) == 0)   /* the next rows' cache lines, 2 passes ahead (as i8_linear) */
      for (int r = 2 * R; r < 3 * R; r++) __builtin_prefetch(w + r * (K / 2) + g * 16, 0, 2);
    for (int r = 0; r < nr; r++) {
      const uint8_t* wg = w + r * (K / 2) + g * 16;
      vf p = vzero();
      for (int j = 0; j < 16; j += VL) { vf lo, hi; ldn(wg + j, &lo, &hi);
        p = fma_(lo, ldf(xg + j), p); p = fma_(hi, ldf(xg + 16 + j), p); }
      float sc = bf2f(s[r * NG + g]);
      a[r] = fma_(p, vset1(sc), a[r]);
      c[r] += sc * xsm[g];
    }
  }
  for (int r = 0; r < nr; r++) t[r] = hsum(a[r]) - 8.f * c[r];
}
static void i4_float(const float* x, long M, long K, const mat* mats, int count, int threads) {
  long NG = K / G;
  float* xs = (float*)malloc(sizeof(float) * (M * NG + 1));
  for (long i = 0; i < M * NG; i++) { float t = 0.f; for (int j = 0; j < G; j++) t += x[i * G + j]; xs[i] = t; }
  MATS(count)
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long b = 0; b < total; b++) {
    PICK(b)
    const uint8_t* w = mt->w + n0 * (K / 2); const uint16_t* s = mt->s + n0 * NG;
    for (long m = 0; m < M; m++) {
      float t[R];
      if (nr == R) i4_rows(x + m * K, xs + m * NG, w, s, t, NG, K, R);
      else i4_rows(x + m * K, xs + m * NG, w, s, t, NG, K, (int)nr);
      for (long r = 0; r < nr; r++) mt->y[m * N + n0 + r] = t[r];
    }
  }
  free(xs);
}
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* With AVX512-VNNI the activations are rounded to int8 too (one scale per group of 32, as llama.cpp's Q8_0),
   and each instruction multiply-adds 64 nibble x int8 pairs (vpdpbusd) where the float path converts and
   multiplies 16: measured 2x faster, the activations' rounding adds ~0.2% error next to int4's ~9%.
   Two groups g, g+1 (32 bytes) are one 512-bit step: [g lo | g+1 lo | g hi | g+1 hi] nibbles against the
   activations in that order (xq, arranged once per call); lanes 0-3 and 8-11 sum group g, 4-7 and 12-15 g+1.
   The nibbles' +8 comes out exactly in integers: each lane's sum starts at -8 x (its 4 activations' sum). */
static void i4_vnni(const float* x, long M, long K, const mat* mats, int count, int threads) {
  long NG = K / G, NP = NG / 2;
  int8_t* xq = (int8_t*)aligned_alloc(64, M * K + 64);
  float* sxv = (float*)aligned_alloc(64, sizeof(float) * (M * NP * 16 + 16));   /* per pair: 16 lane scales */
  int32_t* x8 = (int32_t*)aligned_alloc(64, sizeof(int32_t) * (M * NP * 16 + 16));   /* -8 x lane sums */
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (long m = 0; m < M; m++) {
    for (long g = 0; g < NG; g++) {
      const float* xg = x + m * K + g * G;
      __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absmask), _mm512_and_ps(b, absmask)));
      float sx = amax / 127.f;
      __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      int8_t* o = xq + m * K + (g / 2) * 64 + (g % 2) * 16;
      _mm_storeu_si128((__m128i*)o, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv))));
      _mm_storeu_si128((__m128i*)(o + 32), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv))));
      float* sv = sxv + (m * NP + g / 2) * 16 + (g % 2) * 4;
      for (int l = 0; l < 4; l++) { sv[l] = sx; sv[l + 8] = sx; }
    }
    for (long p = 0; p < NP; p++)   /* -8 x each lane's 4 activations (a dot product with 8s) */
      _mm512_store_si512(x8 + (m * NP + p) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(
          _mm512_setzero_si512(), _mm512_set1_epi8(8), _mm512_load_si512(xq + m * K + p * 64))));
  }
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
  const __mmask16 first = 0x0F0F;   /* lanes of group g */
  MATS(count)
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long b = 0; b < total; b++) {
    PICK(b)
    for (long m = 0; m < M; m++) {
      const __m512i* xm = (const __m512i*)(xq + m * K);
      const float* sm = sxv + m * NP * 16;
      const __m512i* x8m = (const __m512i*)(x8 + m * NP * 16);
      for (long r = 0; r < nr; r++) {
        const uint8_t* wr = mt->w + (n0 + r) * (K / 2);
        const uint16_t* sr = mt->s + (n0 + r) * NG;
        __m512 acc = _mm512_setzero_ps();
        for (long p = 0; p < NP; p++) {
          if ((p & 1) == 0) __builtin_prefetch(wr + 2 * R * (K / 2) + p * 32, 0, 2);
          __m256i v = _mm256_loadu_si256((const __m256i*)(wr + p * 32));
          __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low4)),
                                          _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), 1);
          __m512i d = _mm512_dpbusd_epi32(_mm512_load_si512(x8m + p), wv, _mm512_load_si512(xm + p));
          uint32_t two; memcpy(&two, sr + 2 * p, 4);
          __m512i b = _mm512_set1_epi32((int)two);
          __m512 sw = _mm512_castsi512_ps(_mm512_mask_slli_epi32(_mm512_and_si512(b, hi16), first, b, 16));
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, _mm512_load_ps(sm + p * 16)), acc);
        }
        mt->y[m * N + n0 + r] = _mm512_reduce_add_ps(acc);
      }
    }
  }
  free(xq); free(sxv); free(x8);
}
#endif
void i4_linear3(const float* x, long M, long K, int threads, const uint8_t* w0, const uint16_t* s0, float* y0,
                long N0, const uint8_t* w1, const uint16_t* s1, float* y1, long N1, const uint8_t* w2,
                const uint16_t* s2, float* y2, long N2) {
  mat mats[3] = {{w0, s0, y0, N0}, {w1, s1, y1, N1}, {w2, s2, y2, N2}};
  int count = N2 ? 3 : N1 ? 2 : 1;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if ((K / G) % 2 == 0) { i4_vnni(x, M, K, mats, count, threads); return; }
#endif
  i4_float(x, M, K, mats, count, threads);
}
void i4_linear(const float* x, const uint8_t* w, const uint16_t* s, float* y, long M, long N, long K, int threads) {
  i4_linear3(x, M, K, threads, w, s, y, N, 0, 0, 0, 0, 0, 0, 0, 0);
}
void i4_dequant(const uint8_t* w, const uint16_t* s, void* out, long N, long K, int threads, int bf16) {
  /* the [N, K] matrix, fp32 or (bf16 != 0) bf16 rounded to nearest even: for prefill's ordinary matmul */
  long NG = K / G;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long n = 0; n < N; n++)
    for (long g = 0; g < NG; g++) {
      const uint8_t* wg = w + n * (K / 2) + g * 16; float sc = bf2f(s[n * NG + g]);
      float o[G];
      for (int j = 0; j < 16; j++) { o[j] = sc * (float)((wg[j] & 15) - 8); o[16 + j] = sc * (float)((wg[j] >> 4) - 8); }
      if (!bf16) { memcpy((float*)out + n * K + g * G, o, sizeof o); continue; }
      uint16_t* ob = (uint16_t*)out + n * K + g * G;
      for (int j = 0; j < G; j++) { uint32_t u; memcpy(&u, o + j, 4); ob[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }
    }
}
"""

_KERNEL: Any = None      # the ctypes library once built, False when it cannot be (no compiler): fall back
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-mcpu=native"], ["-O3"])
_SIGNATURES = {"i8_linear": [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int],
               "i4_linear": [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int],
               "i4_linear3": [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
               + ([ctypes.c_void_p] * 3 + [ctypes.c_long]) * 3,
               "i4_dequant": [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_int] * 2}


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def kernel(name: str, quiet: bool = False):
    """The compiled function `name` (i8_linear | i4_linear | i4_dequant, ctypes), or None when this machine
    cannot build the kernels. Built once per machine + source (the .so is cached by a hash of both), in a temp
    file renamed into place."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build(quiet) or False
    return getattr(_KERNEL, name) if _KERNEL else None


def _build(quiet: bool):
    if os.environ.get("NANOCHAT_NO_KERNEL") == "1":   # tests and the benchmark's fallback row
        return None
    cc = _compiler()
    if cc is None:
        if not quiet:
            print("note: no C compiler found: int8/int4 decode uses torch's slower fallback (install gcc or clang)",
                  file=sys.stderr)
        return None
    tag = hashlib.sha256(f"{KERNEL_SRC}{platform.machine()}{platform.processor()}{sys.platform}".encode()).hexdigest()[:16]
    out_dir = nanochat_home() / "kernels"
    lib = out_dir / f"quant-{tag}.so"
    if not lib.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = Path(tmp) / "quant.c"
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
                    print(f"note: the int8/int4 kernels did not compile ({r.stderr.strip()[:160]}); using torch's "
                          "slower fallback", file=sys.stderr)
                return None
    dll = ctypes.CDLL(str(lib))
    for name, args in _SIGNATURES.items():
        getattr(dll, name).argtypes = args
        getattr(dll, name).restype = None
    return dll


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "bf16":
            return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        if _decode_rows(x, self.in_features):
            fn = kernel(self._fn)
            if fn is not None:
                x2 = x.reshape(-1, self.in_features).contiguous()
                y = torch.empty(x2.size(0), self.out_features)
                fn(x2.data_ptr(), self._parameters["weight"].data_ptr(), self._parameters["scale"].data_ptr(),
                   y.data_ptr(), x2.size(0), self.out_features, self.in_features, torch.get_num_threads())
                return y.view(*x.shape[:-1], self.out_features)
        # prefill / eval / no kernel: dequantise and use the ordinary matmul (compute-bound here)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        compute = torch.bfloat16 if (x.device.type == "cpu" and cpu_has_bf16()) else x.dtype
        if self.fmt == "int4":
            w = dequantize_groups(self.weight, self.scale, compute)
            return F.linear(x2.to(compute), w).to(x.dtype).view(*shape[:-1], self.out_features)
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


def _format_of(name: str, kind: str, in_features: int, fmt: str) -> str:
    """The format one matrix is stored in within a model of format `fmt`. An int4 model keeps int8 where 4 bits
    would not pay: lookup tables (one row read per token) and, measured, the head (docs/PERFORMANCE.md)."""
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
