/* Multi-adapter Q-BaRA on CPU: one call per adapted layer, for every slice and every token.
 *
 * For each listed token i (row rows[i] of x and y, slot s = slots[i]) and each slice c of the
 * layer where s has an adapter (geometry pool p, repeat q, rank r, coef = scaling / p):
 *
 *   xp[j] = sum_{u < p} x[row, j*p + u]                       (in/p values: p * P_p(x), fp32)
 *   h[k]  = coef * A_c[s, k, :in/p] . xp                      (k < r)
 *   y[row, col_c + o*q + u] += sum_k h[k] * Bt_c[s, k, o]      (o < out_c/q, u < q: R_q)
 *
 * Buffers (fp32, contiguous, owned by the layer; the LoRA layer keeps them current):
 *   A_c   [slots, R, in]     slot s fills only its [:r, :in/p] corner (the compact A)
 *   Bt_c  [slots, R, out_c]  slot s fills only its [:r, :out_c/q] corner (the compact B, transposed
 *                            so that the expand step streams contiguous rows)
 *   geo_c [slots, 3] int32   pool, repeat, rank; rank 0 = slot s does not touch slice c
 *   coef_c [slots] fp32      scaling / pool
 * x: fp32/bf16/fp16 [T, in], row stride x_stride; y: fp32/bf16/fp16, row stride y_stride, unit
 * column stride; slice c occupies columns [col_c, col_c + out_c).
 *
 * Why one call per layer: the per-slice torch ops (dtype conversion, pooling, two small matmuls,
 * a strided repeat-add) and their Python cost were most of the adapter overhead in decode. Here x
 * is converted and pooled once per token, each token reads only its own slot's compact A and B,
 * the expand step keeps its outputs in registers and adds them into y (repeated, rounded once to
 * y's dtype). Each token's arithmetic is the same whatever else is in the batch, so a request's
 * output does not depend on its neighbours. Tokens are split across OpenMP threads (each writes
 * only its own row of y, so rows must be distinct).
 */
#include <omp.h>
#include <stdlib.h>

#include "cpu_common.h"

#define MAX_SLICES 3
#define MAX_RANK 1024

typedef struct {
  int n_slices;
  int in_features;
  int r_max;
  int n_slots;
  const float *a[MAX_SLICES];
  const float *bt[MAX_SLICES];
  const int32_t *geo[MAX_SLICES];
  const float *coef[MAX_SLICES];
  long y_col[MAX_SLICES];
  int out_size[MAX_SLICES];
} qbara_layer_t; /* mirrored by qahira_kernels.cpu_qbara.QbaraLayer */

static inline __m256 load8(const void *p, int dt, long i) {
  if (dt == DT_F32) return _mm256_loadu_ps((const float *)p + i);
  __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
  if (dt == DT_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Round to nearest even, NaN kept NaN: the same result as store_elem, eight at a time. */
static inline void store8(void *p, int dt, long i, __m256 v) {
  if (dt == DT_F32) {
    _mm256_storeu_ps((float *)p + i, v);
  } else if (dt == DT_F16) {
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_castsi256_si128(packed));
  }
}

static inline void add8(void *y, int dt, long i, __m256 v) { store8(y, dt, i, _mm256_add_ps(load8(y, dt, i), v)); }

/* y[i + o*q + u] += d[o] for o < 8, u < q. */
static inline void repeat_add8(void *y, int dt, long i, __m256 d, int q) {
  if (q == 1) {
    add8(y, dt, i, d);
  } else if (q == 2) {
    const __m256 lo = _mm256_unpacklo_ps(d, d), hi = _mm256_unpackhi_ps(d, d);
    add8(y, dt, i, _mm256_permute2f128_ps(lo, hi, 0x20));
    add8(y, dt, i + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  } else {
    float t[8];
    _mm256_storeu_ps(t, d);
    for (int o = 0; o < 8; o++)
      for (int u = 0; u < q; u++) store_elem(y, dt, i + o * q + u, load_elem(y, dt, i + o * q + u) + t[o]);
  }
}

/* x row -> fp32 */
static void convert_row(float *dst, const void *x, int dt, long base, int n) {
  int j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, load8(x, dt, base + j));
  for (; j < n; j++) dst[j] = load_elem(x, dt, base + j);
}

/* dst[j] = sum_{u < p} src[j*p + u], summed in order u = 0, 1, ... */
static void pool_row(float *dst, const float *src, int n_out, int p) {
  int j = 0;
  if (p == 2) {
    for (; j + 8 <= n_out; j += 8) {
      const __m256 s = _mm256_hadd_ps(_mm256_loadu_ps(src + 2 * j), _mm256_loadu_ps(src + 2 * j + 8));
      _mm256_storeu_ps(dst + j, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xd8)));
    }
  }
  for (; j < n_out; j++) {
    float s = src[j * p];
    for (int u = 1; u < p; u++) s += src[j * p + u];
    dst[j] = s;
  }
}

static inline float dot(const float *a, const float *b, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int k = 0;
  for (; k + 16 <= n; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
  float t = hsum(_mm256_add_ps(s0, s1));
  for (; k < n; k++) t += a[k] * b[k];
  return t;
}

/* y[col + o*q + u] += sum_{k<r} h[k] * bt[k*ld + o] for o < out_q: 32 outputs per pass held in
 * registers while the r rows of Bt stream by. */
static void expand_add(void *y, int dt, long col, const float *bt, long ld, const float *h, int r,
                       int out_q, int q) {
  int o = 0;
  for (; o + 32 <= out_q; o += 32) {
    __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
    for (int k = 0; k < r; k++) {
      const float *b = bt + k * ld + o;
      const __m256 hk = _mm256_set1_ps(h[k]);
      d0 = _mm256_fmadd_ps(hk, _mm256_loadu_ps(b), d0);
      d1 = _mm256_fmadd_ps(hk, _mm256_loadu_ps(b + 8), d1);
      d2 = _mm256_fmadd_ps(hk, _mm256_loadu_ps(b + 16), d2);
      d3 = _mm256_fmadd_ps(hk, _mm256_loadu_ps(b + 24), d3);
    }
    repeat_add8(y, dt, col + (long)o * q, d0, q);
    repeat_add8(y, dt, col + (long)(o + 8) * q, d1, q);
    repeat_add8(y, dt, col + (long)(o + 16) * q, d2, q);
    repeat_add8(y, dt, col + (long)(o + 24) * q, d3, q);
  }
  for (; o + 8 <= out_q; o += 8) {
    __m256 d0 = _mm256_setzero_ps();
    for (int k = 0; k < r; k++) d0 = _mm256_fmadd_ps(_mm256_set1_ps(h[k]), _mm256_loadu_ps(bt + k * ld + o), d0);
    repeat_add8(y, dt, col + (long)o * q, d0, q);
  }
  for (; o < out_q; o++) {
    float d = 0.f;
    for (int k = 0; k < r; k++) d = fmaf(h[k], bt[k * ld + o], d);
    for (int u = 0; u < q; u++) {
      const long idx = col + (long)o * q + u;
      store_elem(y, dt, idx, load_elem(y, dt, idx) + d);
    }
  }
}

/* Returns 0; -1 if a slot's geometry does not fit the layer (rank over R or MAX_RANK, a pool or
 * repeat that does not divide it, a slot index out of range); -2 if out of memory; -3 if a row
 * index is outside [0, n_rows). Nothing is written unless every check passes. */
int qahira_qbara_layer(const qbara_layer_t *L, const void *x, int x_dt, long x_stride, long n_rows,
                       int n, const int64_t *rows, const int64_t *slots, void *y, int y_dt,
                       long y_stride) {
  if (L->n_slices < 1 || L->n_slices > MAX_SLICES || L->r_max > MAX_RANK) return -1;
  for (int i = 0; i < n; i++) {
    if (rows[i] < 0 || rows[i] >= n_rows) return -3;
    if (slots[i] < 0 || slots[i] >= L->n_slots) return -1;
    for (int c = 0; c < L->n_slices; c++) {
      const int32_t *g = L->geo[c] + 3 * slots[i];
      if (g[2] == 0) continue;
      if (g[0] < 1 || g[1] < 1 || g[2] < 0 || g[2] > L->r_max || L->in_features % g[0] ||
          L->out_size[c] % g[1])
        return -1;
    }
  }
  const int in = L->in_features;
  /* Per-thread rows of x in fp32 and pooled, allocated up front so that running out of memory
   * leaves y untouched. */
  const int nt = n > 1 ? omp_get_max_threads() : 1;
  float *buf = (float *)malloc(sizeof(float) * 2 * (size_t)(in > 0 ? in : 1) * (size_t)nt);
  if (!buf) return -2;
#pragma omp parallel num_threads(nt) if (n > 1)
  {
    float *xf = buf + 2 * (size_t)(in > 0 ? in : 1) * (size_t)omp_get_thread_num();
    float *xp = xf + in;
    float h[MAX_RANK];
#pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
      const long row = rows[i];
      const long s = slots[i];
      convert_row(xf, x, x_dt, row * x_stride, in);
      int pooled = 0; /* the pool xp currently holds */
      for (int c = 0; c < L->n_slices; c++) {
        const int32_t *g = L->geo[c] + 3 * s;
        const int p = g[0], q = g[1], r = g[2];
        if (r == 0) continue;
        const int in_p = in / p, out_q = L->out_size[c] / q;
        const float *v = xf;
        if (p > 1) {
          if (pooled != p) pool_row(xp, xf, in_p, p);
          pooled = p;
          v = xp;
        }
        const float coef = L->coef[c][s];
        const float *a = L->a[c] + s * (long)L->r_max * in;
        for (int k = 0; k < r; k++) h[k] = coef * dot(a + (long)k * in, v, in_p);
        expand_add(y, y_dt, row * y_stride + L->y_col[c], L->bt[c] + s * (long)L->r_max * L->out_size[c],
                   L->out_size[c], h, r, out_q, q);
      }
    }
  }
  free(buf);
  return 0;
}
