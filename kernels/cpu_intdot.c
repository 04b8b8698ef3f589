/* cpu_int4: qahira INT4 and INT8 linear layers on x86-64 CPUs, integer dot products.
 * ONE source, compiled twice by cpu_lib: as is (AVX2/FMA/F16C, 256-bit vectors, entry point
 * qahira_cpu_intdot_avx2) and with -DQAHIRA_W512 plus AVX-512 F/BW/VL/DQ + VNNI flags (512-bit
 * vectors, vpdpwssd, entry point qahira_cpu_intdot_avx512). Python picks one at run time by
 * CPUID (qahira_cpu_avx512_ok). Both give bit-identical outputs: see "Widths" below.
 *
 *   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = s[n/bo, k/bi] * q[n, k] + o[n/bo, k/bi]
 *
 * Why not fp32 FMAs on dequantized weights: converting nibbles/bytes to floats limits such a
 * kernel to ~4 GB/s, a quarter of one core's stream bandwidth. Integer dot products
 * (vpmaddwd / vpdpwssd) on the raw weights run far faster, so the activations are quantized per
 * 32-column chunk to 16-bit integers v = round(x / xs_c), xs_c = max|x_c| / 32767:
 *
 *   sum_k x_k W[n, k] = sum_b s_b * sum_{c in b} xs_c * <q, v>_c  +  sum_b o_b * xsum_b
 *
 * with xsum_b the fp32 sum of x over block b. The only rounding beyond fp32 accumulation is
 * |x - xs_c v| <= max|x_c| / 65534 per element (2^-16 of the chunk's largest value), far below
 * the rounding of a bf16 activation itself. Products are exact in int32 (each 32-bit lane sums
 * four products of at most 255 * 32767).
 *
 * Column order. Within a 32-column chunk, "lo" is columns 0..15 and "hi" columns 16..31; the
 * int32 lane i of a chunk's dot sums columns 2i, 2i+1, 16+2i, 16+2i+1. The quantized
 * activations (scratch) and the INT8 weight store chunk pairs (c even, c+1) as
 *   [c lo, c+1 lo, c hi, c+1 hi]   (16 elements each; a last unpaired chunk as [lo, hi]),
 * so a 512-bit vector holds the lo (or hi) halves of two chunks and a 256-bit one those of one.
 * INT4 weight (layouts.pack_cpu_int4), uint8 [N, K/2]: per chunk, byte j = q[j] | q[16+j]<<4,
 * so 16 bytes (or 32 for a pair) zero-extended to int16 and masked / shifted by 4 give lo / hi.
 * INT8 weight (layouts.pack_cpu_int8), uint8 [N, K] in the pair order above.
 * Scales and offsets fp16 or fp32 [N/bo, K/bi]; bi a multiple of 32.
 *
 * Widths. The fp32 accumulation is per lane: the AVX2 build keeps 8-lane accumulators a0 (even
 * chunks of each group of 8) and a1 (odd chunks), the AVX-512 build one 16-lane accumulator
 * whose low half is a0 and high half a1, fed a chunk pair per step; a tail of fewer than 8
 * chunks goes to a0 in both. Integer sums are exact and each lane sees the same fp32 operations
 * in the same order, so the two builds agree bit for bit (tested).
 *
 * Rows are split across OpenMP threads (the runtime torch already loaded). Each output row's
 * arithmetic is the same whatever M is, so a request's result never depends on its batch.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu_common.h"

#define CHUNK 32
#define QMAX 32767.f
/* Bytes of the weight stream prefetched ahead (rows are contiguous, so this reaches into the
 * next rows): without it one core's loads keep too few misses in flight and the kernel read a
 * 1B-shaped layer at ~8 GB/s from DRAM; with it, 16384 x 2048 at M = 1 went from 2.1-2.5 ms to
 * 1.3-1.5 ms (INT4) and 3.4 to 2.2-2.8 ms (INT8), one thread, this project's Xeon, weights not
 * in cache (1024 to 16384 bytes measured; 4096 and up alike). */
#define PREFETCH 4096
#define ALWAYS_INLINE static inline __attribute__((always_inline))

#ifdef QAHIRA_W512
#define ENTRY qahira_cpu_intdot_avx512
#define MT_MAX 8 /* 32 vector registers: 8 activation rows per weight row */
#else
#define ENTRY qahira_cpu_intdot_avx2
#define MT_MAX 4
#endif

/* Offset of chunk c's lo / hi 16 elements within a row (pair order above; nc chunks a row). */
static inline long lo_off(int c) { return (long)(c & ~1) * CHUNK + (c & 1) * 16; }
static inline long hi_off(int c, int nc) { return lo_off(c) + ((c | 1) < nc ? 32 : 16); }

/* x [M, K] (dtype dt) -> v int16 [M, K] (pair order); xs fp32 [M, K/32]; xsum fp32 [M, K/bi]. */
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
      int16_t *lo = v + (long)m * K + lo_off(c), *hi = v + (long)m * K + hi_off(c, nc);
      for (int j = 0; j < 16; j++) lo[j] = (int16_t)lrintf(buf[j] * inv);
      for (int j = 0; j < 16; j++) hi[j] = (int16_t)lrintf(buf[16 + j] * inv);
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
    t += load_param(orow, o_f32, b) * xsum[b];
  return t;
}

/* acc[m] += scale[m] * <q of chunk c, v[m, chunk c]> for m < MT, 256-bit (one chunk); lo_o /
 * hi_o: lo_off(c) / hi_off(c, nc), passed in so that unrolled callers fold them to constants. */
ALWAYS_INLINE void chunk_mt(const int MT, const int bits, const uint8_t *wr, const __m256 *scale,
                            const int16_t *v, int K, int c, long lo_o, long hi_o, __m256 *acc) {
  __m256i lo, hi;
  _mm_prefetch((const char *)wr + (long)c * (bits == 4 ? 16 : CHUNK) + PREFETCH, _MM_HINT_T0);
  if (bits == 4) {
    const __m256i b16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wr + (long)c * 16)));
    lo = _mm256_and_si256(b16, _mm256_set1_epi16(0x0F));
    hi = _mm256_srli_epi16(b16, 4);
  } else {
    lo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wr + lo_o)));
    hi = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wr + hi_o)));
  }
  for (int m = 0; m < MT; m++) {
    const int16_t *vm = v + (long)m * K;
    const __m256i vlo = _mm256_loadu_si256((const __m256i *)(vm + lo_o));
    const __m256i vhi = _mm256_loadu_si256((const __m256i *)(vm + hi_o));
#ifdef QAHIRA_W512
    const __m256i d = _mm256_dpwssd_epi32(_mm256_madd_epi16(lo, vlo), hi, vhi);
#else
    const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(lo, vlo), _mm256_madd_epi16(hi, vhi));
#endif
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale[m], acc[m]);
  }
}

#ifdef QAHIRA_W512
/* acc[m] += scale[m] * dots of chunks c (low 8 lanes) and c+1 (high 8), c even, paired. */
ALWAYS_INLINE void pair_mt(const int MT, const int bits, const uint8_t *wr, const __m512 *scale,
                           const int16_t *v, int K, int c, __m512 *acc) {
  __m512i lo, hi;
  _mm_prefetch((const char *)wr + (long)c * (bits == 4 ? 16 : CHUNK) + PREFETCH, _MM_HINT_T0);
  if (bits == 4) {
    const __m512i b16 =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr + (long)c * 16)));
    lo = _mm512_and_si512(b16, _mm512_set1_epi16(0x0F));
    hi = _mm512_srli_epi16(b16, 4);
  } else {
    lo = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr + (long)c * CHUNK)));
    hi = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr + (long)c * CHUNK + 32)));
  }
  for (int m = 0; m < MT; m++) {
    const int16_t *vp = v + (long)m * K + (long)c * CHUNK;
    __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(vp));
    d = _mm512_dpwssd_epi32(d, hi, _mm512_loadu_si512(vp + 32));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale[m], acc[m]);
  }
}
#endif

/* The fp32 weight scales of chunks c0..c0+7 as 8 lanes (a block spans cpb chunks). */
ALWAYS_INLINE __m256 chunk_scales8_f32(const float *sr, int cpb, int c0) {
  switch (cpb) {
    case 1:
      return _mm256_loadu_ps(sr + c0);
    case 2:
      return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sr + c0 / 2)),
                                      _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    case 4:
      return _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double *)(sr + c0 / 4)))),
          _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    case 8:
      return _mm256_set1_ps(sr[c0 / 8]);
    default: {
      float t[8];
      for (int i = 0; i < 8; i++) t[i] = sr[(c0 + i) / cpb];
      return _mm256_loadu_ps(t);
    }
  }
}

/* The weight scales of chunks c0..c0+7 as 8 fp32 lanes (a block spans cpb chunks). */
ALWAYS_INLINE __m256 chunk_scales8(const void *s_row, int s_f32, int cpb, int c0) {
  if (s_f32) return chunk_scales8_f32((const float *)s_row, cpb, c0);
  const uint16_t *sr = (const uint16_t *)s_row;
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
 * Even and odd chunks use separate accumulators (FMA latency; the two halves in AVX-512). */
ALWAYS_INLINE void row_mt(const int MT, const int bits, const uint8_t *wr, const void *sr,
                          int s_f32, int K, int bi, const int16_t *v, const float *xs,
                          float *out) {
  const int nc = K / CHUNK, cpb = bi / CHUNK;
  __m256 a0[MT_MAX], a1[MT_MAX], comb[MT_MAX], sc[MT_MAX];
  int c0 = 0;
#ifdef QAHIRA_W512
  __m512 acc[MT_MAX], sc2[MT_MAX];
  for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
  for (; c0 + 8 <= nc; c0 += 8) {
    const __m256 s8 = chunk_scales8(sr, s_f32, cpb, c0);
    for (int m = 0; m < MT; m++) comb[m] = _mm256_mul_ps(s8, _mm256_loadu_ps(xs + (long)m * nc + c0));
#pragma GCC unroll 4
    for (int p = 0; p < 8; p += 2) {
      const __m512i lanes = _mm512_set_epi32(p + 1, p + 1, p + 1, p + 1, p + 1, p + 1, p + 1, p + 1,
                                             p, p, p, p, p, p, p, p);
      for (int m = 0; m < MT; m++)
        sc2[m] = _mm512_permutexvar_ps(lanes, _mm512_castps256_ps512(comb[m]));
      pair_mt(MT, bits, wr, sc2, v, K, c0 + p, acc);
    }
  }
  for (int m = 0; m < MT; m++) split_halves(acc[m], &a0[m], &a1[m]);
#else
  for (int m = 0; m < MT; m++) a0[m] = a1[m] = _mm256_setzero_ps();
  for (; c0 + 8 <= nc; c0 += 8) {
    const __m256 s8 = chunk_scales8(sr, s_f32, cpb, c0);
    for (int m = 0; m < MT; m++) comb[m] = _mm256_mul_ps(s8, _mm256_loadu_ps(xs + (long)m * nc + c0));
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
      const __m256i lane = _mm256_set1_epi32(i);
      for (int m = 0; m < MT; m++) sc[m] = _mm256_permutevar8x32_ps(comb[m], lane);
      const long lo_o = (long)c0 * CHUNK + (i & ~1) * CHUNK + (i & 1) * 16; /* paired chunks */
      chunk_mt(MT, bits, wr, sc, v, K, c0 + i, lo_o, lo_o + 32, (i & 1) ? a1 : a0);
    }
  }
#endif
  for (int c = c0; c < nc; c++) { /* tail: fewer than 8 chunks, all into a0 */
    const float s = load_param(sr, s_f32, c / cpb);
    for (int m = 0; m < MT; m++) sc[m] = _mm256_set1_ps(s * xs[(long)m * nc + c]);
    chunk_mt(MT, bits, wr, sc, v, K, c, lo_off(c), hi_off(c, nc), a0);
  }
  for (int m = 0; m < MT; m++) out[m] = hsum(_mm256_add_ps(a0[m], a1[m]));
}

/* MT = 1..MT_MAX rows of activations against weight row wr; `bits` a literal (4 or 8). */
ALWAYS_INLINE void row_any(const int bits, int mt, const uint8_t *wr, const void *sr, int s_f32,
                           int K, int bi, const int16_t *v, const float *xs, float *dots) {
  switch (mt) {
    case 1: row_mt(1, bits, wr, sr, s_f32, K, bi, v, xs, dots); break;
    case 2: row_mt(2, bits, wr, sr, s_f32, K, bi, v, xs, dots); break;
    case 3: row_mt(3, bits, wr, sr, s_f32, K, bi, v, xs, dots); break;
#ifdef QAHIRA_W512
    case 4: row_mt(4, bits, wr, sr, s_f32, K, bi, v, xs, dots); break;
    case 5: row_mt(5, bits, wr, sr, s_f32, K, bi, v, xs, dots); break;
    case 6: row_mt(6, bits, wr, sr, s_f32, K, bi, v, xs, dots); break;
    case 7: row_mt(7, bits, wr, sr, s_f32, K, bi, v, xs, dots); break;
#endif
    default: row_mt(MT_MAX, bits, wr, sr, s_f32, K, bi, v, xs, dots); break;
  }
}

/* Weight rows per cache block: with several activation tiles, each tile (<= 32 KB of int16 at
 * K = 2048) stays in L1 while a block of weight rows (~64 KB) is reused from L2, instead of every
 * weight row streaming all M activation rows from L2 (which made M = 32 cost 1.5x 4 x M = 8). */
#define NBLOCK 64

/* y [M, N] (dtype y_dt) = x @ W^T for the activations made by quantize_act. The loop order
 * changes no arithmetic: each (row n, activation row m) output is computed the same way. */
static void int_gemv(const uint8_t *w, int bits, const void *s, int s_f32, const void *o,
                     int o_f32, int N, int K, int bo, int bi, const int16_t *v, const float *xs,
                     const float *xsum, int M, void *y, int y_dt) {
  const int nb = K / bi, nc = K / CHUNK;
  const long wrow = bits == 4 ? K / 2 : K;
  const int nblocks = (N + NBLOCK - 1) / NBLOCK;
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < nblocks; blk++) {
    const int n1 = (blk + 1) * NBLOCK < N ? (blk + 1) * NBLOCK : N;
    for (int m0 = 0; m0 < M; m0 += MT_MAX) {
      const int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
      const int16_t *vm = v + (long)m0 * K;
      const float *xsm = xs + (long)m0 * nc;
      for (int n = blk * NBLOCK; n < n1; n++) {
        const uint8_t *wr = w + (long)n * wrow;
        const char *sr = (const char *)s + (long)(n / bo) * nb * (s_f32 ? 4 : 2);
        const char *orow = (const char *)o + (long)(n / bo) * nb * (o_f32 ? 4 : 2);
        float dots[MT_MAX];
        if (bits == 4)
          row_any(4, mt, wr, sr, s_f32, K, bi, vm, xsm, dots);
        else
          row_any(8, mt, wr, sr, s_f32, K, bi, vm, xsm, dots);
        for (int j = 0; j < mt; j++) {
          const int m = m0 + j;
          store_elem(y, y_dt, (long)m * N + n,
                     dots[j] + offset_term(orow, o_f32, xsum + (long)m * nb, nb));
        }
      }
    }
  }
}

/* Per-thread scratch for the quantized activations, grown as needed and kept (one call per
 * layer per step: allocating it each time would cost more than small layers' arithmetic). */
static __thread void *scratch;
static __thread size_t scratch_bytes;

/* y [M, N] = x [M, K] @ W^T, x and y of dtype x_dt; bits 4 or 8. Returns 0, or -1 if out of
 * memory. */
int ENTRY(const void *x, int x_dt, int M, int K, const uint8_t *w, int bits, const void *s,
          int s_f32, const void *o, int o_f32, int N, int bo, int bi, void *y) {
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
  int_gemv(w, bits, s, s_f32, o, o_f32, N, K, bo, bi, v, xs, xsum, M, y, x_dt);
  return 0;
}

#ifndef QAHIRA_W512
/* 1 if this CPU and OS run the AVX-512 build (F, BW, VL, DQ, VNNI; libgcc checks the OS saves
 * the zmm state), else 0. Compiled in the AVX2 object so it runs on any x86-64. */
int qahira_cpu_avx512_ok(void) {
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 8)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return 0; /* a compiler this old cannot name VNNI here (nor build the AVX-512 object) */
#endif
}
#endif
