/* Shared by qahira's CPU kernels (cpu_intdot.c, cpu_blockwise.c, cpu_qbara.c): dtype codes, element
 * load/store in fp32/bf16/fp16, horizontal sum. Static inline: each .c gets its own copy. */
#ifndef QAHIRA_CPU_COMMON_H
#define QAHIRA_CPU_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 }; /* must match qahira_kernels.cpu_lib.DTYPE_CODES */

static inline float load_elem(const void *p, int dt, long i) {
  if (dt == DT_F32) return ((const float *)p)[i];
  if (dt == DT_BF16) {
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return _cvtsh_ss(((const uint16_t *)p)[i]);
}

/* Round to nearest even, as torch's own fp32 -> bf16 / fp16 conversions do. */
static inline void store_elem(void *p, int dt, long i, float v) {
  if (dt == DT_F32) {
    ((float *)p)[i] = v;
  } else if (dt == DT_BF16) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      ((uint16_t *)p)[i] = 0x7fc0; /* NaN stays NaN */
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
    }
  } else {
    ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
  }
}

/* Element b of a row of block parameters (scales or offsets), stored fp16 or (f32) fp32. */
static inline float load_param(const void *row, int f32, long b) {
  return f32 ? ((const float *)row)[b] : _cvtsh_ss(((const uint16_t *)row)[b]);
}

#ifdef __AVX512F__
/* The low and high 8 lanes of v: the AVX-512 builds hold the AVX2 builds' two 8-lane
 * accumulators as one register and split it for the same final sums. */
static inline void split_halves(__m512 v, __m256 *lo, __m256 *hi) {
  *lo = _mm512_castps512_ps256(v);
  *hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}
#endif

static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

#endif
