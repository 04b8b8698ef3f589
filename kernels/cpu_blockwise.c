/* qahira block-wise linear for every format case on AVX2 CPUs: INT4 or INT8, any block
 * [bo, bi] that divides the layer, activations fp32 / bf16 / fp16.
 *
 *   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = s[n/bo, k/bi] * q[n, k] + o[n/bo, k/bi]
 *
 * The general path's job is to be exact and not slow. Each weight row is dequantized once per
 * call into a per-thread fp32 buffer, exactly as the format defines it, fp32(s) * q + fp32(o),
 * and dotted with up to four activation rows at a time in fp32. The bits equal torch's
 * reference dequantization: the product s * q rounded to fp32, then the sum (with fp16 scales
 * the product is exact, 11 + 8 significant bits, so one FMA does both). The only difference
 * from a dense fp32
 * GEMM on the dequantized weight is the summation order. Row n's arithmetic is the same
 * whatever M is, so a request's output never depends on its batch.
 *
 * Weights as stored (docs/FORMAT.md): 4-bit int32 [N, K/8] read as bytes (little-endian:
 * byte j holds column 2j in its low nibble, 2j+1 in its high one); 8-bit uint8 [N, K].
 * Scales and offsets fp16 or fp32 [N/bo, K/bi] (fp32 scales: format 2, see affine8).
 *
 * qahira_cpu_blockwise_dequant writes the whole weight (same bits; bf16 / fp16 rounded once from
 * them, to nearest even as torch's conversions), for the trainer. Serving
 * uses qahira_cpu_blockwise at every M: a dense GEMM above some M would be faster for long
 * prefills but sums in another order, so a request's logits would depend on its batch.
 */
#include <stdlib.h>

#include "cpu_common.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Columns k..k+7 of a weight row as fp32 integers. */
ALWAYS_INLINE __m256 load_q8(const uint8_t *qrow, int bits, int k) {
  if (bits == 4) {
    uint32_t word;
    memcpy(&word, qrow + k / 2, 4);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)word),
                                        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  }
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qrow + k))));
}

static inline int load_q(const uint8_t *qrow, int bits, int k) {
  return bits == 4 ? (qrow[k >> 1] >> ((k & 1) * 4)) & 15 : qrow[k];
}

/* s q + o in fp32. fp16 scales: s q is exact (11 + 8 significant bits), so one FMA rounds as
 * the format's product-then-sum. fp32 scales (format 2): the product can round, so it is
 * rounded first, as the format defines it; the empty asm keeps the compiler from contracting
 * the pair back into an FMA. */
ALWAYS_INLINE __m256 affine8(__m256 q, __m256 S, __m256 O, int s_f32) {
  if (!s_f32) return _mm256_fmadd_ps(q, S, O);
  __m256 p = _mm256_mul_ps(q, S);
  __asm__("" : "+x"(p));
  return _mm256_add_ps(p, O);
}

static inline float affine1(float q, float s, float o, int s_f32) {
  float p = q * s;
  if (s_f32) __asm__("" : "+x"(p));
  return p + o;
}

/* Per-column scale and offset of one block row (for bi not a multiple of 8). */
static void expand_block_row(const void *srow, int s_f32, const void *orow, int o_f32, int K,
                             int bi, float *sexp, float *oexp) {
  for (int k = 0; k < K; k++) {
    sexp[k] = load_param(srow, s_f32, k / bi);
    oexp[k] = load_param(orow, o_f32, k / bi);
  }
}

/* v rounded to bf16, to nearest even (store_elem's rule, NaN -> 0x7fc0), 8 lanes. */
ALWAYS_INLINE __m128i bf16_round8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  /* packus works per 128-bit lane: pack, then take qwords 0 and 2 */
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(p);
}

/* 8 fp32 lanes stored at w + k (in elements) as fp32, bf16 or fp16, rounded to nearest even. */
typedef void (*store8_fn)(void *w, int k, __m256 v);

ALWAYS_INLINE void store8_f32(void *w, int k, __m256 v) { _mm256_storeu_ps((float *)w + k, v); }

ALWAYS_INLINE void store8_bf16(void *w, int k, __m256 v) {
  _mm_storeu_si128((__m128i *)((uint16_t *)w + k), bf16_round8(v));
}

ALWAYS_INLINE void store8_f16(void *w, int k, __m256 v) {
  _mm_storeu_si128((__m128i *)((uint16_t *)w + k), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

/* AVX512-BF16's vcvtneps2bf16 rounds to nearest even in one instruction (bf16_round8 takes
 * ten), but it flushes denormal inputs to zero and keeps a NaN's payload, where torch keeps
 * denormals and writes 0x7fc0: a vector holding either (fpclass) takes bf16_round8, so the
 * bits are the same. Built with a target attribute and chosen by CPUID at run time
 * (qahira_cpu_bf16_ok), so one source serves both CPUs. */
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define QAHIRA_BF16_HW 1
#define TARGET_BF16 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bf16")))

TARGET_BF16 ALWAYS_INLINE void store8_bf16_hw(void *w, int k, __m256 v) {
  /* fpclass 0x01 | 0x80 | 0x20: quiet NaN, signalling NaN, denormal */
  const __m128i r = _mm256_fpclass_ps_mask(v, 0xa1) ? bf16_round8(v)
                                                     : (__m128i)_mm256_cvtneps_pbh(v);
  _mm_storeu_si128((__m128i *)((uint16_t *)w + k), r);
}
#endif

/* w[k] = fp32(s) * q + fp32(o) (one rounding), stored by store8 (dt names it, for the last
 * K % 8 columns). sexp/oexp: from expand_block_row, used only when bi % 8 != 0. */
ALWAYS_INLINE void dequant_row_as(const store8_fn store8, const int dt, const uint8_t *qrow,
                                  int bits, const void *srow, int s_f32, const void *orow,
                                  int o_f32, int K, int bi, const float *sexp, const float *oexp,
                                  void *w) {
  const int k8 = K & ~7;
  if (bi % 8 == 0) {
    for (int b = 0; b < K / bi; b++) {
      const float s = load_param(srow, s_f32, b), o = load_param(orow, o_f32, b);
      const __m256 S = _mm256_set1_ps(s), O = _mm256_set1_ps(o);
      for (int k = b * bi; k < (b + 1) * bi; k += 8)
        store8(w, k, affine8(load_q8(qrow, bits, k), S, O, s_f32));
    }
    return;
  }
  for (int k = 0; k < k8; k += 8)
    store8(w, k, affine8(load_q8(qrow, bits, k), _mm256_loadu_ps(sexp + k),
                         _mm256_loadu_ps(oexp + k), s_f32));
  for (int k = k8; k < K; k++)
    store_elem(w, dt, k, affine1((float)load_q(qrow, bits, k), sexp[k], oexp[k], s_f32));
}

#ifdef QAHIRA_BF16_HW
/* Columns k..k+15 of a weight row as fp32 integers, 16 lanes: 4-bit bytes widened to 32-bit
 * lanes holding (low nibble | high nibble << 16), i.e. 16 ordered 16-bit values. */
TARGET_BF16 ALWAYS_INLINE __m512 load_q16(const uint8_t *qrow, int bits, int k) {
  if (bits == 4) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qrow + k / 2)));
    const __m256i pairs = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(15)),
                                          _mm256_slli_epi32(_mm256_srli_epi32(b, 4), 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(pairs));
  }
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qrow + k))));
}

TARGET_BF16 ALWAYS_INLINE void store16_bf16_hw(void *w, int k, __m512 v) {
  if (_mm512_fpclass_ps_mask(v, 0xa1)) { /* NaN or denormal: see store8_bf16_hw */
    store8_bf16(w, k, _mm512_castps512_ps256(v));
    store8_bf16(w, k + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return;
  }
  _mm256_storeu_si256((__m256i *)((uint16_t *)w + k), (__m256i)_mm512_cvtneps_pbh(v));
}

/* dequant_row_as with bf16 rounded by vcvtneps2bf16, 16 columns at a time when bi allows. */
TARGET_BF16 static void dequant_row_bf16_hw(const uint8_t *qrow, int bits, const void *srow,
                                            int s_f32, const void *orow, int o_f32, int K,
                                            int bi, const float *sexp, const float *oexp,
                                            void *w) {
  if (bi % 16 || s_f32) {
    dequant_row_as(store8_bf16_hw, DT_BF16, qrow, bits, srow, s_f32, orow, o_f32, K, bi, sexp,
                   oexp, w);
    return;
  }
  for (int b = 0; b < K / bi; b++) {
    const __m512 S = _mm512_set1_ps(load_param(srow, 0, b));
    const __m512 O = _mm512_set1_ps(load_param(orow, o_f32, b));
    for (int k = b * bi; k < (b + 1) * bi; k += 16) /* fp16 scales: the FMA is exact (affine8) */
      store16_bf16_hw(w, k, _mm512_fmadd_ps(load_q16(qrow, bits, k), S, O));
  }
}
#endif

/* Whether this CPU runs store8_bf16_hw (and this compiler built it). */
int qahira_cpu_bf16_ok(void) {
#ifdef QAHIRA_BF16_HW
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
#else
  return 0;
#endif
}

/* dt: DT_F32 / DT_BF16 / DT_F16; bf16_hw: use store8_bf16_hw for DT_BF16 (caller checked
 * qahira_cpu_bf16_ok). */
static void dequant_row(const uint8_t *qrow, int bits, const void *srow, int s_f32,
                        const void *orow, int o_f32, int K, int bi, const float *sexp,
                        const float *oexp, void *w, int dt, int bf16_hw) {
  switch (dt) {
    case DT_BF16:
#ifdef QAHIRA_BF16_HW
      if (bf16_hw) {
        dequant_row_bf16_hw(qrow, bits, srow, s_f32, orow, o_f32, K, bi, sexp, oexp, w);
        break;
      }
#endif
      dequant_row_as(store8_bf16, DT_BF16, qrow, bits, srow, s_f32, orow, o_f32, K, bi, sexp,
                     oexp, w);
      break;
    case DT_F16:
      dequant_row_as(store8_f16, DT_F16, qrow, bits, srow, s_f32, orow, o_f32, K, bi, sexp, oexp,
                     w);
      break;
    default:
      dequant_row_as(store8_f32, DT_F32, qrow, bits, srow, s_f32, orow, o_f32, K, bi, sexp, oexp,
                     w);
      break;
  }
}

/* out[m] = <w, x[m]> for MT activation rows (MT a literal at each call site). Even and odd
 * 8-column groups use separate accumulators (FMA latency); the order is fixed for every MT. */
ALWAYS_INLINE void dot_rows(const int MT, const float *w, const float *x, int K, float *out) {
  __m256 a0[4], a1[4];
  for (int m = 0; m < MT; m++) a0[m] = a1[m] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int m = 0; m < MT; m++) {
      a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (long)m * K + k), a0[m]);
      a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + (long)m * K + k + 8), a1[m]);
    }
  }
  if (k + 8 <= K) {
    const __m256 w0 = _mm256_loadu_ps(w + k);
    for (int m = 0; m < MT; m++)
      a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (long)m * K + k), a0[m]);
    k += 8;
  }
  for (int m = 0; m < MT; m++) {
    float t = hsum(_mm256_add_ps(a0[m], a1[m]));
    for (int j = k; j < K; j++) t += w[j] * x[(long)m * K + j];
    out[m] = t;
  }
}

/* Per-thread scratch, grown as needed and kept (one call per layer per step). */
static __thread float *scratch;
static __thread size_t scratch_floats;

static float *thread_scratch(size_t floats) {
  if (floats > scratch_floats) {
    free(scratch);
    scratch = (float *)malloc(floats * sizeof(float));
    scratch_floats = scratch ? floats : 0;
  }
  return scratch;
}

static inline const uint8_t *qrow_of(const void *qw, int bits, int n, int K) {
  return (const uint8_t *)qw + (long)n * (bits == 4 ? K / 2 : K);
}

/* Allocate every thread's scratch first, so that running out of memory writes nothing. */
static int reserve_scratch(size_t need) {
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  failed |= thread_scratch(need) == NULL;
  return failed;
}

/* Every weight row, split across threads: dequantized into w_out [N, K] (xf == NULL), or into
 * a per-thread row dotted with xf [M, K] into y. A block row's per-column params (bi % 8 != 0)
 * are re-expanded only when n / bo changes. Returns nonzero if a thread had no scratch (OpenMP
 * does not promise that this team's threads are the ones reserve_scratch ran on). */
static int for_each_row(const void *qw, int bits, const void *s, int s_f32, const void *o,
                        int o_f32,
                         int N, int K, int bo, int bi, void *w_out, int w_dt, int bf16_hw,
                         const float *xf, int M, void *y, int y_dt) {
  const int nb = K / bi;
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    float *buf = thread_scratch(3 * (size_t)K); /* normally reserved already: no allocation */
    float *sexp = buf + K, *oexp = buf + 2 * (long)K;
    int have = -1;
    failed |= buf == NULL;
#pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
      if (!buf) continue;
      const int br = n / bo;
      const char *srow = (const char *)s + (long)br * nb * (s_f32 ? 4 : 2);
      const char *orow = (const char *)o + (long)br * nb * (o_f32 ? 4 : 2);
      if (bi % 8 && br != have) {
        expand_block_row(srow, s_f32, orow, o_f32, K, bi, sexp, oexp);
        have = br;
      }
      if (!xf) {
        const long row = (long)n * K * (w_dt == DT_F32 ? 4 : 2);
        dequant_row(qrow_of(qw, bits, n, K), bits, srow, s_f32, orow, o_f32, K, bi, sexp, oexp,
                    (char *)w_out + row, w_dt, bf16_hw);
        continue;
      }
      float *wrow = buf;
      dequant_row(qrow_of(qw, bits, n, K), bits, srow, s_f32, orow, o_f32, K, bi, sexp, oexp, wrow,
                  DT_F32, 0);
      float dots[4];
      for (int m0 = 0; m0 < M; m0 += 4) {
        const int mt = M - m0 < 4 ? M - m0 : 4;
        const float *xm = xf + (long)m0 * K;
        switch (mt) {
          case 1: dot_rows(1, wrow, xm, K, dots); break;
          case 2: dot_rows(2, wrow, xm, K, dots); break;
          case 3: dot_rows(3, wrow, xm, K, dots); break;
          default: dot_rows(4, wrow, xm, K, dots); break;
        }
        for (int j = 0; j < mt; j++) store_elem(y, y_dt, (long)(m0 + j) * N + n, dots[j]);
      }
    }
  }
  return failed;
}

/* w [N, K] of dtype w_dt = the dequantized weight (fp32 math, then rounded once to w_dt).
 * bf16_hw: round bf16 with AVX512-BF16 (same bits; only where qahira_cpu_bf16_ok()).
 * Returns 0, -2 if out of memory (w then possibly partly written), -3 for bf16_hw on a CPU
 * or build without it. */
int qahira_cpu_blockwise_dequant(const void *qw, int bits, const void *s, int s_f32,
                                 const void *o, int o_f32, int N, int K, int bo, int bi, void *w,
                                 int w_dt, int bf16_hw) {
  if (bf16_hw && !qahira_cpu_bf16_ok()) return -3;
  if (reserve_scratch(3 * (size_t)K)) return -2;
  return for_each_row(qw, bits, s, s_f32, o, o_f32, N, K, bo, bi, w, w_dt, bf16_hw, NULL, 0, NULL,
                      DT_F32) ? -2 : 0;
}

/* y [M, N] = x [M, K] @ W^T, x and y of dtype x_dt. Returns 0, or -2 if out of memory. */
int qahira_cpu_blockwise(const void *x, int x_dt, int M, int K, const void *qw, int bits,
                         const void *s, int s_f32, const void *o, int o_f32, int N, int bo,
                         int bi, void *y) {
  /* fp32 activations are read in place; others are converted once, on the caller's thread. */
  static __thread float *xbuf;
  static __thread size_t xbuf_floats;
  const float *xf = (const float *)x;
  if (x_dt != DT_F32) {
    const size_t xn = (size_t)M * K;
    if (xn > xbuf_floats) {
      free(xbuf);
      xbuf = (float *)malloc(xn * sizeof(float));
      xbuf_floats = xbuf ? xn : 0;
      if (!xbuf) return -2;
    }
    for (size_t i = 0; i < xn; i++) xbuf[i] = load_elem(x, x_dt, (long)i);
    xf = xbuf;
  }
  if (reserve_scratch(3 * (size_t)K)) return -2;
  return for_each_row(qw, bits, s, s_f32, o, o_f32, N, K, bo, bi, NULL, DT_F32, 0, xf, M, y,
                      x_dt) ? -2 : 0;
}
