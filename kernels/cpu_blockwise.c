/* qahira block-wise linear for every format case on AVX2 CPUs: INT4 or INT8, any block
 * [bo, bi] that divides the layer, activations fp32 / bf16 / fp16.
 *
 *   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = s[n/bo, k/bi] * q[n, k] + o[n/bo, k/bi]
 *
 * The general path's job is to be exact and not slow. Each weight row is dequantized once per
 * call into a per-thread fp32 buffer, exactly as the format defines it, fp32(s) * q + fp32(o),
 * and dotted with up to four activation rows at a time in fp32. The bits equal torch's
 * reference dequantization: s (fp16, 11-bit significand) times q (at most 8 bits) is exact in
 * fp32, so only the add rounds, fused or not. The only difference from a dense fp32
 * GEMM on the dequantized weight is the summation order. Row n's arithmetic is the same
 * whatever M is, so a request's output never depends on its batch.
 *
 * Weights as stored (docs/FORMAT.md): 4-bit int32 [N, K/8] read as bytes (little-endian:
 * byte j holds column 2j in its low nibble, 2j+1 in its high one); 8-bit uint8 [N, K].
 * Scales fp16 [N/bo, K/bi]; offsets fp16 or fp32 [N/bo, K/bi].
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

static inline float load_o(const void *orow, int o_f32, int b) {
  return o_f32 ? ((const float *)orow)[b] : _cvtsh_ss(((const uint16_t *)orow)[b]);
}

/* Per-column scale and offset of one block row (for bi not a multiple of 8). */
static void expand_block_row(const uint16_t *srow, const void *orow, int o_f32, int K, int bi,
                             float *sexp, float *oexp) {
  for (int k = 0; k < K; k++) {
    sexp[k] = _cvtsh_ss(srow[k / bi]);
    oexp[k] = load_o(orow, o_f32, k / bi);
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

ALWAYS_INLINE void store8(void *w, int dt, int k, __m256 v) {
  if (dt == DT_F32)
    _mm256_storeu_ps((float *)w + k, v);
  else
    _mm_storeu_si128((__m128i *)((uint16_t *)w + k),
                     dt == DT_BF16 ? bf16_round8(v) : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

/* w[k] = fp32(s) * q + fp32(o) (one rounding), stored as dt: fp32, or bf16 / fp16 rounded
 * once more (nearest even). sexp/oexp: from expand_block_row, used only when bi % 8 != 0. */
ALWAYS_INLINE void dequant_row_as(const int dt, const uint8_t *qrow, int bits,
                                  const uint16_t *srow, const void *orow, int o_f32, int K,
                                  int bi, const float *sexp, const float *oexp, void *w) {
  const int k8 = K & ~7;
  if (bi % 8 == 0) {
    for (int b = 0; b < K / bi; b++) {
      const float s = _cvtsh_ss(srow[b]), o = load_o(orow, o_f32, b);
      const __m256 S = _mm256_set1_ps(s), O = _mm256_set1_ps(o);
      for (int k = b * bi; k < (b + 1) * bi; k += 8)
        store8(w, dt, k, _mm256_fmadd_ps(load_q8(qrow, bits, k), S, O));
    }
    return;
  }
  for (int k = 0; k < k8; k += 8)
    store8(w, dt, k, _mm256_fmadd_ps(load_q8(qrow, bits, k), _mm256_loadu_ps(sexp + k),
                                     _mm256_loadu_ps(oexp + k)));
  for (int k = k8; k < K; k++) store_elem(w, dt, k, sexp[k] * (float)load_q(qrow, bits, k) + oexp[k]);
}

static void dequant_row(const uint8_t *qrow, int bits, const uint16_t *srow, const void *orow,
                        int o_f32, int K, int bi, const float *sexp, const float *oexp, void *w,
                        int dt) {
  switch (dt) {
    case DT_BF16: dequant_row_as(DT_BF16, qrow, bits, srow, orow, o_f32, K, bi, sexp, oexp, w); break;
    case DT_F16: dequant_row_as(DT_F16, qrow, bits, srow, orow, o_f32, K, bi, sexp, oexp, w); break;
    default: dequant_row_as(DT_F32, qrow, bits, srow, orow, o_f32, K, bi, sexp, oexp, w); break;
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
static int for_each_row(const void *qw, int bits, const uint16_t *s, const void *o, int o_f32,
                         int N, int K, int bo, int bi, void *w_out, int w_dt, const float *xf,
                         int M, void *y, int y_dt) {
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
      const uint16_t *srow = s + (long)br * nb;
      const char *orow = (const char *)o + (long)br * nb * (o_f32 ? 4 : 2);
      if (bi % 8 && br != have) {
        expand_block_row(srow, orow, o_f32, K, bi, sexp, oexp);
        have = br;
      }
      if (!xf) {
        const long row = (long)n * K * (w_dt == DT_F32 ? 4 : 2);
        dequant_row(qrow_of(qw, bits, n, K), bits, srow, orow, o_f32, K, bi, sexp, oexp,
                    (char *)w_out + row, w_dt);
        continue;
      }
      float *wrow = buf;
      dequant_row(qrow_of(qw, bits, n, K), bits, srow, orow, o_f32, K, bi, sexp, oexp, wrow,
                  DT_F32);
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
 * Returns 0, or -2 if out of memory (w then possibly partly written). */
int qahira_cpu_blockwise_dequant(const void *qw, int bits, const uint16_t *s, const void *o,
                                 int o_f32, int N, int K, int bo, int bi, void *w, int w_dt) {
  if (reserve_scratch(3 * (size_t)K)) return -2;
  return for_each_row(qw, bits, s, o, o_f32, N, K, bo, bi, w, w_dt, NULL, 0, NULL, DT_F32) ? -2
                                                                                         : 0;
}

/* y [M, N] = x [M, K] @ W^T, x and y of dtype x_dt. Returns 0, or -2 if out of memory. */
int qahira_cpu_blockwise(const void *x, int x_dt, int M, int K, const void *qw, int bits,
                         const uint16_t *s, const void *o, int o_f32, int N, int bo, int bi,
                            void *y) {
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
  return for_each_row(qw, bits, s, o, o_f32, N, K, bo, bi, NULL, DT_F32, xf, M, y, x_dt) ? -2 : 0;
}
