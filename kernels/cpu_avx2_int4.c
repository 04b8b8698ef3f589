/* cpu_avx2_int4: qahira INT4 linear layers on AVX2 CPUs (x86-64 with AVX2, FMA, F16C).
 *
 *   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = s[n/bo, k/bi] * q[n, k] + o[n/bo, k/bi]
 *
 * Why not fp32 FMAs on dequantized nibbles: on this class of CPU, converting nibbles to floats
 * limits such a kernel to ~4 GB/s, a quarter of one core's stream bandwidth. Integer dot products
 * (vpmaddwd) on the raw nibbles run far faster, so the activations are quantized per 32-column
 * chunk to 16-bit integers v = round(x / xs_c), xs_c = max|x_c| / 32767:
 *
 *   sum_k x_k W[n, k] = sum_b s_b * sum_{c in b} xs_c * <q, v>_c  +  sum_b o_b * xsum_b
 *
 * with xsum_b the fp32 sum of x over block b. The only rounding beyond fp32 accumulation is
 * |x - xs_c v| <= max|x_c| / 65534 per element (2^-16 of the chunk's largest value), far below
 * the rounding of a bf16 activation itself. Products are exact in int32 (each vpmaddwd lane sums
 * two products of at most 15 * 32767).
 *
 * Weight layout (made by qahira_kernels.layouts.pack_cpu_avx2_int4): uint8 [N, K/2]; in each 32-column
 * chunk, byte j = q[j] | q[16 + j] << 4, so one 16-byte load broadcast to both 128-bit lanes and
 * shifted by 0 / 4 gives the chunk's 32 nibbles in column order.
 * Scales fp16 [N/bo, K/bi]; offsets fp16 or fp32 [N/bo, K/bi]; bi a multiple of 32.
 * Rows are split across OpenMP threads (the runtime torch already loaded). Each output row's
 * arithmetic is the same whatever M is, so a request's result never depends on its batch.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu_common.h"

#define CHUNK 32
#define QMAX 32767.f

/* x [M, K] (dtype dt) -> v int16 [M, K]; xs fp32 [M, K/32]; xsum fp32 [M, K/bi]. */
static void quantize_act(const void *x, int dt, int M, int K, int bi, int16_t *v, float *xs,
                         float *xsum) {
  const int nc = K / CHUNK, nb = K / bi;
  float buf[CHUNK];
  for (int m = 0; m < M; m++) {
    for (int b = 0; b < nb; b++) xsum[(long)m * nb + b] = 0.f;
    for (int c = 0; c < nc; c++) {
      const long base = (long)m * K + (long)c * CHUNK;
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < CHUNK; j++) {
        buf[j] = load_elem(x, dt, base + j);
        amax = fmaxf(amax, fabsf(buf[j]));
        sum += buf[j];
      }
      xsum[(long)m * nb + (c * CHUNK) / bi] += sum;
      const float inv = amax > 0.f ? QMAX / amax : 0.f;
      xs[(long)m * nc + c] = amax / QMAX;
      for (int j = 0; j < CHUNK; j++) v[base + j] = (int16_t)lrintf(buf[j] * inv);
    }
  }
}

/* sum_b o_b * xsum_b for one offsets row. */
static inline float offset_term(const void *orow, int o_f32, const float *xsum, int nb) {
  __m256 acc = _mm256_setzero_ps();
  int b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256 o = o_f32 ? _mm256_loadu_ps((const float *)orow + b)
                     : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)orow + b)));
    acc = _mm256_fmadd_ps(o, _mm256_loadu_ps(xsum + b), acc);
  }
  float t = hsum(acc);
  for (; b < nb; b++)
    t += (o_f32 ? ((const float *)orow)[b] : _cvtsh_ss(((const uint16_t *)orow)[b])) * xsum[b];
  return t;
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* acc[m] += scale[m] * <q of chunk c, v[m, chunk c]> for m < MT (scale[m] broadcast). */
ALWAYS_INLINE void chunk_mt(const int MT, const uint8_t *wc, const __m256 *scale,
                            const int16_t *v, int K, int c, __m256 *acc) {
  /* 16 bytes -> 16 int16 lanes; low nibbles are columns 0..15, high nibbles 16..31. */
  const __m256i b16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)wc));
  const __m256i lo = _mm256_and_si256(b16, _mm256_set1_epi16(0x0F));
  const __m256i hi = _mm256_srli_epi16(b16, 4);
  for (int m = 0; m < MT; m++) {
    const int16_t *vc = v + (long)m * K + (long)c * CHUNK;
    __m256i d = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)vc)),
                                 _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(vc + 16))));
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale[m], acc[m]);
  }
}

/* The weight scales of chunks c0..c0+7 as 8 fp32 lanes (a block spans cpb chunks). */
ALWAYS_INLINE __m256 chunk_scales8(const uint16_t *sr, int cpb, int c0) {
  int32_t two;
  switch (cpb) {
    case 1:
      return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + c0)));
    case 2:
      return _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(sr + c0 / 2)))),
          _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    case 4:
      memcpy(&two, sr + c0 / 4, 4);
      return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(two))),
                                      _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    case 8:
      return _mm256_set1_ps(_cvtsh_ss(sr[c0 / 8]));
    default: {
      float t[8];
      for (int i = 0; i < 8; i++) t[i] = _cvtsh_ss(sr[(c0 + i) / cpb]);
      return _mm256_loadu_ps(t);
    }
  }
}

/* One weight row against MT activation rows; MT is a literal at each call site so the
 * accumulators stay in registers. Chunks go 8 at a time: their 8 weight scales times the
 * activation scales are one vector multiply, each chunk then takes its lane with one permute
 * (per-chunk scalar fp16 conversion + multiply + broadcast cost more than the dot product).
 * Even and odd chunks use separate accumulators (FMA latency). */
ALWAYS_INLINE void row_mt(const int MT, const uint8_t *wr, const uint16_t *sr, int K, int bi,
                          const int16_t *v, const float *xs, float *out) {
  const int nc = K / CHUNK, cpb = bi / CHUNK;
  __m256 a0[4], a1[4], comb[4], sc[4];
  for (int m = 0; m < MT; m++) a0[m] = a1[m] = _mm256_setzero_ps();
  int c0 = 0;
  for (; c0 + 8 <= nc; c0 += 8) {
    const __m256 s8 = chunk_scales8(sr, cpb, c0);
    for (int m = 0; m < MT; m++) comb[m] = _mm256_mul_ps(s8, _mm256_loadu_ps(xs + (long)m * nc + c0));
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
      const __m256i lane = _mm256_set1_epi32(i);
      for (int m = 0; m < MT; m++) sc[m] = _mm256_permutevar8x32_ps(comb[m], lane);
      chunk_mt(MT, wr + (long)(c0 + i) * 16, sc, v, K, c0 + i, (i & 1) ? a1 : a0);
    }
  }
  for (int c = c0; c < nc; c++) { /* tail: fewer than 8 chunks */
    const float s = _cvtsh_ss(sr[c / cpb]);
    for (int m = 0; m < MT; m++) sc[m] = _mm256_set1_ps(s * xs[(long)m * nc + c]);
    chunk_mt(MT, wr + (long)c * 16, sc, v, K, c, a0);
  }
  for (int m = 0; m < MT; m++) out[m] = hsum(_mm256_add_ps(a0[m], a1[m]));
}

/* y [M, N] (dtype y_dt) = x @ W^T for the activations made by quantize_act. */
static void int4_gemv(const uint8_t *w, const uint16_t *s, const void *o, int o_f32, int N, int K,
                      int bo, int bi, const int16_t *v, const float *xs, const float *xsum,
                      int M, void *y, int y_dt) {
  const int nb = K / bi, nc = K / CHUNK;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const uint8_t *wr = w + (long)n * (K / 2);
    const uint16_t *sr = s + (long)(n / bo) * nb;
    const char *orow = (const char *)o + (long)(n / bo) * nb * (o_f32 ? 4 : 2);
    float dots[4];
    for (int m0 = 0; m0 < M; m0 += 4) {
      const int mt = M - m0 < 4 ? M - m0 : 4;
      const int16_t *vm = v + (long)m0 * K;
      const float *xsm = xs + (long)m0 * nc;
      switch (mt) {
        case 1: row_mt(1, wr, sr, K, bi, vm, xsm, dots); break;
        case 2: row_mt(2, wr, sr, K, bi, vm, xsm, dots); break;
        case 3: row_mt(3, wr, sr, K, bi, vm, xsm, dots); break;
        default: row_mt(4, wr, sr, K, bi, vm, xsm, dots); break;
      }
      for (int j = 0; j < mt; j++) {
        const int m = m0 + j;
        store_elem(y, y_dt, (long)m * N + n,
                  dots[j] + offset_term(orow, o_f32, xsum + (long)m * nb, nb));
      }
    }
  }
}

/* Per-thread scratch for the quantized activations, grown as needed and kept (one call per
 * layer per step: allocating it each time would cost more than small layers' arithmetic). */
static __thread void *scratch;
static __thread size_t scratch_bytes;

/* y [M, N] = x [M, K] @ W^T, x and y of dtype x_dt. Returns 0, or -1 if out of memory. */
int qahira_cpu_avx2_int4(const void *x, int x_dt, int M, int K, const uint8_t *w, const uint16_t *s,
                         const void *o, int o_f32, int N, int bo, int bi, void *y) {
  const size_t v_bytes = (size_t)M * K * sizeof(int16_t);
  const size_t need = v_bytes + ((size_t)M * (K / CHUNK) + (size_t)M * (K / bi)) * sizeof(float);
  if (need > scratch_bytes) {
    free(scratch);
    scratch = malloc(need);
    scratch_bytes = scratch ? need : 0;
    if (!scratch) return -1;
  }
  int16_t *v = (int16_t *)scratch;
  float *xs = (float *)((char *)scratch + v_bytes);
  float *xsum = xs + (size_t)M * (K / CHUNK);
  quantize_act(x, x_dt, M, K, bi, v, xs, xsum);
  int4_gemv(w, s, o, o_f32, N, K, bo, bi, v, xs, xsum, M, y, x_dt);
  return 0;
}
