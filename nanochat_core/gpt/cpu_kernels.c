/* nanochat's C kernels for CPU decode: int8/int4 matrix-vector products (quantize.py has the formats) and one
   layer's attention step (model.py). cpu_kernels.py compiles and loads them; docs/PERFORMANCE.md has what they
   measure. */
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
typedef struct { const uint8_t* w; const uint16_t* s; float* y; long N; int act; } mat;   /* act 1: relu(y)^2 */
static inline float act_(float v, int act) { return act && v < 0.f ? 0.f : act ? v * v : v; }
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
      for (long r = 0; r < nr; r++) mt->y[m * N + n0 + r] = act_(t[r], mt->act);
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
        mt->y[m * N + n0 + r] = act_(_mm512_reduce_add_ps(acc), mt->act);
      }
    }
  }
  free(xq); free(sxv); free(x8);
}
#endif
static void i4_run(const float* x, long M, long K, int threads, mat* mats, int count) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if ((K / G) % 2 == 0) { i4_vnni(x, M, K, mats, count, threads); return; }
#endif
  i4_float(x, M, K, mats, count, threads);
}
void i4_linear3(const float* x, long M, long K, int threads, const uint8_t* w0, const uint16_t* s0, float* y0,
                long N0, const uint8_t* w1, const uint16_t* s1, float* y1, long N1, const uint8_t* w2,
                const uint16_t* s2, float* y2, long N2) {
  mat mats[3] = {{w0, s0, y0, N0, 0}, {w1, s1, y1, N1, 0}, {w2, s2, y2, N2, 0}};
  i4_run(x, M, K, threads, mats, N2 ? 3 : N1 ? 2 : 1);
}
/* act 1: the MLP's relu(y)^2 on the way out */
void i4_linear(const float* x, const uint8_t* w, const uint16_t* s, float* y, long M, long N, long K, int threads,
               int act) {
  mat one = {w, s, y, N, act};
  i4_run(x, M, K, threads, &one, 1);
}
/* The MLP of a decode step in one call: y = relu(x @ W1.T)^2 @ W2.T, the hidden rows (M x N1) in a scratch buffer */
void i4_mlp(const float* x, long M, long K, int threads, const uint8_t* w1, const uint16_t* s1, long N1,
            const uint8_t* w2, const uint16_t* s2, float* y, long N2) {
  float* h = (float*)malloc(sizeof(float) * M * N1);
  mat up = {w1, s1, h, N1, 1}, down = {w2, s2, y, N2, 0};
  i4_run(x, M, K, threads, &up, 1);
  i4_run(h, M, N1, threads, &down, 1);
  free(h);
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

/* One decode step of one attention layer (model.py's torch path, fused: ~50 small torch ops become one call).
   q (B, H, D), k and v (B, Hkv, D): this token's projections; on a layer with a value embedding, ve (B, Hkv, D)
   is added to v with the gate gscale * sigmoid(gw . x[:C]) per KV head (x: the layer's normed input).
   Per head, q and k are RMS-normed over D and rotated by this position's cos/sin (D/2 each); k and v go into
   the layer's cache kc/vc (B, Hkv, L, D) at `pos`; each query head attends (softmax of q.k / sqrt(D)) over the
   cached positions [pos + 1 - window, pos] (all of [0, pos] when window is 0) of its KV head (h / (H / Hkv))
   and writes y (B, H, D). */
static inline float dotv(const float* a, const float* b, long D) {
  long Dv = D - D % VL; vf acc = vzero();
  for (long i = 0; i < Dv; i += VL) acc = fma_(ldf(a + i), ldf(b + i), acc);
  float t = hsum(acc);
  for (long i = Dv; i < D; i++) t += a[i] * b[i];
  return t;
}
static void norm_rotate(float* x, long D, const float* cs, const float* sn, float eps) {
  float r = 1.f / sqrtf(dotv(x, x, D) / (float)D + eps);
  long d = D / 2;
  for (long i = 0; i < d; i++) {
    float a = x[i] * r, b = x[i + d] * r;
    x[i] = a * cs[i] + b * sn[i];
    x[i + d] = b * cs[i] - a * sn[i];
  }
}
void attn_decode(float* q, float* k, const float* v, const float* cs, const float* sn, float* kc, float* vc,
                 float* y, long B, long H, long Hkv, long D, long L, long pos, long window, float eps,
                 const float* ve, const float* x, long xstride, const float* gw, long C, float gscale) {
  long lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0, n = pos + 1 - lo;
  float scale = 1.f / sqrtf((float)D);
  float* att = (float*)malloc(sizeof(float) * n);
  for (long b = 0; b < B; b++) {
    for (long hk = 0; hk < Hkv; hk++) {
      float* kr = k + (b * Hkv + hk) * D;
      norm_rotate(kr, D, cs, sn, eps);
      memcpy(kc + ((b * Hkv + hk) * L + pos) * D, kr, sizeof(float) * D);
      float* vr = vc + ((b * Hkv + hk) * L + pos) * D;
      memcpy(vr, v + (b * Hkv + hk) * D, sizeof(float) * D);
      if (ve) {   /* the value embedding, mixed in by its gate: gscale * sigmoid(gw[hk] . x[:C]) */
        float z = 0.f;
        for (long c = 0; c < C; c++) z += gw[hk * C + c] * x[b * xstride + c];
        float gate = gscale / (1.f + expf(-z));
        const float* er = ve + (b * Hkv + hk) * D;
        for (long i = 0; i < D; i++) vr[i] += gate * er[i];
      }
    }
    for (long h = 0; h < H; h++) {
      float* qh = q + (b * H + h) * D;
      norm_rotate(qh, D, cs, sn, eps);
      long hk = h / (H / Hkv);
      const float* K = kc + ((b * Hkv + hk) * L + lo) * D;
      const float* V = vc + ((b * Hkv + hk) * L + lo) * D;
      float mx = -INFINITY, sum = 0.f;
      for (long t = 0; t < n; t++) { att[t] = dotv(qh, K + t * D, D) * scale; mx = att[t] > mx ? att[t] : mx; }
      for (long t = 0; t < n; t++) { att[t] = expf(att[t] - mx); sum += att[t]; }
      float* yh = y + (b * H + h) * D;
      for (long i = 0; i < D; i++) yh[i] = 0.f;
      for (long t = 0; t < n; t++) {
        float p = att[t] / sum; const float* vt = V + t * D;
        for (long i = 0; i < D; i++) yh[i] += p * vt[i];
      }
    }
  }
  free(att);
}

/* y = x / sqrt(mean(x^2) + eps) per row of D: model.norm for a decode step's few rows. */
void rms_norm(const float* x, float* y, long rows, long D, float eps) {
  for (long r = 0; r < rows; r++) {
    const float* xr = x + r * D; float* yr = y + r * D;
    float s = 1.f / sqrtf(dotv(xr, xr, D) / (float)D + eps);
    for (long i = 0; i < D; i++) yr[i] = xr[i] * s;
  }
}

/* out[i] = scale[idx[i]] * table[idx[i]] for n int8 rows of D: an int8 lookup table (token and value embeddings)
   for a decode step's few tokens. Returns 0, or 1 when an id is outside the table's V rows (nothing is read). */
int i8_rows(const int8_t* table, const float* scale, const int64_t* idx, float* out, long n, long D, long V) {
  for (long i = 0; i < n; i++) if (idx[i] < 0 || idx[i] >= V) return 1;
  for (long i = 0; i < n; i++) {
    const int8_t* row = table + idx[i] * D; float s = scale[idx[i]]; float* o = out + i * D;
    for (long j = 0; j < D; j++) o[j] = s * (float)row[j];
  }
  return 0;
}

/* One whole block of an int4 model for a decode step (model.py's Block.forward, with the per-layer scalars
   GPT.forward applies before it): x = lr * x + l0 * x0; x += attn(norm(x)); x += mlp(norm(x)), x (B, C) in
   place. w[0..5] / s[0..5] are the int4 weights and scales of c_q, c_k, c_v, attn c_proj, mlp c_fc, mlp c_proj.
   ve (B, Hkv * D) or NULL with its gate gw (Hkv x Cg, fp32), as attn_decode. In Python a block is ~200 calls
   of 10-50 us each once the weights' stream has left them cold: here it is one. */
void block_decode(float* x, const float* x0, float lr, float l0, long B, long C, long H, long Hkv, long D,
                  const uint8_t** w, const uint16_t** s, const float* ve, const float* gw, long Cg, float gscale,
                  const float* cs, const float* sn, float* kc, float* vc, long L, long pos, long window,
                  float eps, int threads) {
  long Nq = H * D, Nkv = Hkv * D;
  float* h = (float*)malloc(sizeof(float) * B * C);
  float* q = (float*)malloc(sizeof(float) * B * Nq);
  float* k = (float*)malloc(sizeof(float) * B * Nkv);
  float* v = (float*)malloc(sizeof(float) * B * Nkv);
  float* y = (float*)malloc(sizeof(float) * B * Nq);
  float* o = (float*)malloc(sizeof(float) * B * C);
  for (long i = 0; i < B * C; i++) x[i] = lr * x[i] + l0 * x0[i];
  rms_norm(x, h, B, C, eps);
  mat qkv[3] = {{w[0], s[0], q, Nq, 0}, {w[1], s[1], k, Nkv, 0}, {w[2], s[2], v, Nkv, 0}};
  i4_run(h, B, C, threads, qkv, 3);
  attn_decode(q, k, v, cs, sn, kc, vc, y, B, H, Hkv, D, L, pos, window, eps, ve, h, C, gw, Cg, gscale);
  mat proj = {w[3], s[3], o, C, 0};
  i4_run(y, B, Nq, threads, &proj, 1);
  for (long i = 0; i < B * C; i++) x[i] += o[i];
  rms_norm(x, h, B, C, eps);
  i4_mlp(h, B, C, threads, w[4], s[4], 4 * C, w[5], s[5], o, C);
  for (long i = 0; i < B * C; i++) x[i] += o[i];
  free(h); free(q); free(k); free(v); free(y); free(o);
}
