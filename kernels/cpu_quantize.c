/* qahira quantization on AVX2 CPUs: the MSE clip search of qahira_vllm.quant_math.quantize
 * (the one definition; docs/FORMAT.md), fused per block, bit for bit the same result.
 *
 * For each block (bo x bi values, in the block's row-major order, as quant_math._to_blocks):
 *   lo, hi = min, max;  mid = (lo + hi) / 2;  half = (hi - lo) / 2           (fp32)
 *   per ratio r (fp32): [r_lo, r_hi] = [lo, hi] if r == 1 else [mid - r*half, mid + r*half]
 *     s = fp16(clamp((r_hi - r_lo) / qmax, or 1 if not > 0, 2^-24, 65504))   (round to even)
 *     z = offset dtype(r_lo)
 *     q = clamp(round_half_even((x - z) / s), 0, qmax);  d = (q*s + z) - x    (true division)
 *     err = sum of d*d in the fixed order of quant_math.block_sq_err: 16 partial sums, lane j
 *           adding the values j, j+16, j+32, ... in turn (the block padded with zeros to a
 *           multiple of 16), then halved pairwise 16 -> 8 -> 4 -> 2 -> 1 (first half + second)
 *   the first ratio with the smallest err wins (strict <), and q is rounded against its s, z.
 * Every step is one IEEE fp32 operation, as torch does it; this file is compiled without
 * contraction (a*b + c is never fused into one rounding), so each product rounds as torch's.
 *
 * Work per block stays in a per-thread buffer (in cache): one load of the block, one pass per
 * ratio, one pass for q. OpenMP over rows of blocks: with 4-bit output two columns share a
 * byte, and a row of blocks owns whole rows of the output, so no two threads write one byte.
 *
 * Outputs: q as stored (4-bit: K/2 bytes per row, column 2j in byte j's low nibble, 2j+1 in its
 * high one, i.e. the little-endian int32 words of format.pack_int4; the caller zeroes it;
 * 8-bit: K bytes per row), scales fp16 and offsets fp16/fp32 [N/bo, K/bi], per block the best
 * err and sum(x*x) (fp32, for the caller's error statistics).
 * Returns 0; -2 when out of memory; 2 when the weight is not storable (a non-finite value, a
 * min-max scale above 65504, or a block minimum that overflows the offset dtype): the caller
 * then runs quant_math.check_quantizable, which names the tensor and the block.
 */
#pragma GCC optimize("fp-contract=off")

#include <math.h>
#include <stdlib.h>

#include "cpu_common.h"

#define LANES 16 /* partial sums of the error; quant_math.SQ_ERR_LANES */

static inline float hmin8(__m256 v) {
  float t[8], m;
  _mm256_storeu_ps(t, v);
  m = t[0];
  for (int j = 1; j < 8; j++) m = t[j] < m ? t[j] : m;
  return m;
}

static inline float hmax8(__m256 v) {
  float t[8], m;
  _mm256_storeu_ps(t, v);
  m = t[0];
  for (int j = 1; j < 8; j++) m = t[j] > m ? t[j] : m;
  return m;
}

/* dst[0..count) = fp32 of src[off..off+count) (dtype code dt). */
static void load_row(const void *src, int dt, long off, int count, float *dst) {
  int c = 0;
  if (dt == DT_F32) {
    memcpy(dst, (const float *)src + off, (size_t)count * sizeof(float));
    return;
  }
  const uint16_t *h = (const uint16_t *)src + off;
  for (; c + 8 <= count; c += 8) {
    const __m128i x = _mm_loadu_si128((const __m128i *)(h + c));
    const __m256 f = dt == DT_BF16
                         ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16))
                         : _mm256_cvtph_ps(x);
    _mm256_storeu_ps(dst + c, f);
  }
  for (; c < count; c++) dst[c] = load_elem(src, dt, off + c);
}

static inline float f16_round(float v) { return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)); }

/* Grid index of 8 values: clamp(round((x - z) / s), 0, qmax), as quant_math._round_to_grid. */
static inline __m256 grid8(__m256 x, __m256 z, __m256 s, __m256 qmax) {
  __m256 t = _mm256_div_ps(_mm256_sub_ps(x, z), s);
  t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_max_ps(t, _mm256_setzero_ps()), qmax);
}

static inline __m256 sq_diff8(__m256 x, __m256 z, __m256 s, __m256 qmax) {
  const __m256 d = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(grid8(x, z, s, qmax), s), z), x);
  return _mm256_mul_ps(d, d);
}

/* The block's squared error for grid (s, z); v holds n16 values (zeros past n), mask0/1 the
 * valid lanes of the last 16. */
static float block_err(const float *v, int n16, float s, float z, float qmax, __m256 mask0,
                       __m256 mask1) {
  const __m256 S = _mm256_set1_ps(s), Z = _mm256_set1_ps(z), Q = _mm256_set1_ps(qmax);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int i = 0;
  for (; i < n16 - LANES; i += LANES) {
    a0 = _mm256_add_ps(a0, sq_diff8(_mm256_loadu_ps(v + i), Z, S, Q));
    a1 = _mm256_add_ps(a1, sq_diff8(_mm256_loadu_ps(v + i + 8), Z, S, Q));
  }
  a0 = _mm256_add_ps(a0, _mm256_and_ps(sq_diff8(_mm256_loadu_ps(v + i), Z, S, Q), mask0));
  a1 = _mm256_add_ps(a1, _mm256_and_ps(sq_diff8(_mm256_loadu_ps(v + i + 8), Z, S, Q), mask1));
  /* 16 -> 8 (lane j + lane j+8), then hsum: 8 -> 4 -> 2 -> 1, each first half + second half */
  return hsum(_mm256_add_ps(a0, a1));
}

int qahira_cpu_quantize(const void *w, int w_dtype, int N, int K, int bo, int bi, int bits,
                        const float *ratios, int n_ratios, int offsets_f32, int n_threads,
                        uint8_t *q, uint16_t *scales, void *offsets, float *err, float *ref) {
  const int n = bo * bi, n16 = (n + LANES - 1) / LANES * LANES;
  const int nbr = N / bo, nbc = K / bi;
  const float qmax = (float)((1 << bits) - 1);
  const long qrow = bits == 4 ? K / 2 : K;
  int status = 0;
  if (n_threads < 1) n_threads = 1;
#pragma omp parallel num_threads(n_threads) reduction(| : status)
  {
    float *v = aligned_alloc(64, (size_t)n16 * 2 * sizeof(float));
    if (v == NULL) status |= 1;
    float *qv = v + n16;
    __m256 mask0, mask1;
    {
      int32_t m[LANES];
      for (int j = 0; j < LANES; j++) m[j] = (n16 - LANES + j) < n ? -1 : 0;
      mask0 = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)m));
      mask1 = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(m + 8)));
    }
#pragma omp for schedule(dynamic, 1)
    for (int br = 0; br < nbr; br++) {
      if (v == NULL || status) continue;
      for (int bc = 0; bc < nbc; bc++) {
        const long b = (long)br * nbc + bc;
        for (int r = 0; r < bo; r++)
          load_row(w, w_dtype, (long)(br * bo + r) * K + (long)bc * bi, bi, v + r * bi);
        for (int i = n; i < n16; i++) v[i] = v[0]; /* min/max see only the block's values */
        /* min, max, sum(x*x) (statistics only: any order) and finiteness, 8 lanes at a time */
        __m256 vlo = _mm256_loadu_ps(v), vhi = vlo, vss = _mm256_setzero_ps();
        __m256 vbad = _mm256_setzero_ps();
        const __m256 fmax = _mm256_set1_ps(3.402823466e38f), sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < n16; i += 8) {
          const __m256 x = _mm256_loadu_ps(v + i);
          vlo = _mm256_min_ps(vlo, x);
          vhi = _mm256_max_ps(vhi, x);
          /* NaN or +-inf: not (|x| <= FLT_MAX) */
          vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(_mm256_andnot_ps(sign, x), fmax, _CMP_NLE_UQ));
          if (i + 8 <= n) vss = _mm256_add_ps(vss, _mm256_mul_ps(x, x));
        }
        float ss = hsum(vss);
        for (int i = n & ~7; i < n; i++) ss += v[i] * v[i];
        float lo = hmin8(vlo), hi = hmax8(vhi);
        const int finite = _mm256_movemask_ps(vbad) == 0;
        for (int i = n; i < n16; i++) v[i] = 0.0f;
        const float mm_scale = (hi - lo) / qmax;
        if (!finite || !(mm_scale <= 65504.0f) ||
            (!offsets_f32 && isinf(_cvtsh_ss(_cvtss_sh(lo, _MM_FROUND_TO_NEAREST_INT))))) {
          status |= 2;
          break;
        }
        const float mid = (lo + hi) / 2.0f, half = (hi - lo) / 2.0f;
        float best = INFINITY, best_s = 1.0f, best_z = 0.0f;
        for (int k = 0; k < n_ratios; k++) {
          const float rt = ratios[k];
          float rlo = lo, rhi = hi;
          if (rt != 1.0f) {
            const float rh = rt * half;
            rlo = mid - rh;
            rhi = mid + rh;
          }
          float s = (rhi - rlo) / qmax;
          s = s > 0.0f ? s : 1.0f;
          s = s < 5.9604644775390625e-08f ? 5.9604644775390625e-08f : s;
          s = s > 65504.0f ? 65504.0f : s;
          s = f16_round(s);
          const float z = offsets_f32 ? rlo : f16_round(rlo);
          const float e = block_err(v, n16, s, z, qmax, mask0, mask1);
          if (k == 0 || e < best) {
            best = e;
            best_s = s;
            best_z = z;
          }
        }
        scales[b] = _cvtss_sh(best_s, _MM_FROUND_TO_NEAREST_INT);
        if (offsets_f32)
          ((float *)offsets)[b] = best_z;
        else
          ((uint16_t *)offsets)[b] = _cvtss_sh(best_z, _MM_FROUND_TO_NEAREST_INT);
        err[b] = best;
        ref[b] = ss;
        const __m256 S = _mm256_set1_ps(best_s), Z = _mm256_set1_ps(best_z),
                     Q = _mm256_set1_ps(qmax);
        for (int i = 0; i < n16; i += 8)
          _mm256_storeu_ps(qv + i, grid8(_mm256_loadu_ps(v + i), Z, S, Q));
        for (int r = 0; r < bo; r++) {
          uint8_t *row = q + (long)(br * bo + r) * qrow;
          const float *qr = qv + r * bi;
          if (bits == 8 || bi % 2 == 0) { /* whole bytes: no read-modify-write */
            if (bits == 8)
              for (int c = 0; c < bi; c++) row[bc * bi + c] = (uint8_t)(int)qr[c];
            else
              for (int c = 0; c < bi; c += 2)
                row[(bc * bi + c) >> 1] = (uint8_t)((int)qr[c] | ((int)qr[c + 1] << 4));
            continue;
          }
          for (int c = 0; c < bi; c++) {
            const int k = bc * bi + c, val = (int)qv[r * bi + c];
            if (bits == 4)
              row[k >> 1] |= (uint8_t)(val << ((k & 1) * 4));
            else
              row[k] = (uint8_t)val;
          }
        }
      }
    }
    free(v);
  }
  return status & 1 ? -2 : status;
}

/* 1 if none of the n values of x (dtype code dt) is NaN or +-inf, else 0: the exponent bits
 * are not all ones. A pass at memory speed for the tensors the quantizer keeps in float
 * (torch.isfinite on bf16 runs ~20x slower here). */
int qahira_cpu_all_finite(const void *x, int dt, long n, int n_threads) {
  int bad = 0;
  if (n_threads < 1) n_threads = 1;
  if (dt == DT_F32) {
    const uint32_t *u = (const uint32_t *)x;
#pragma omp parallel for num_threads(n_threads) reduction(| : bad) schedule(static)
    for (long i = 0; i < n; i++) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t *u = (const uint16_t *)x;
    const uint16_t e = dt == DT_BF16 ? 0x7f80u : 0x7c00u;
#pragma omp parallel for num_threads(n_threads) reduction(| : bad) schedule(static)
    for (long i = 0; i < n; i++) bad |= (u[i] & e) == e;
  }
  return !bad;
}
