/* Multi-adapter Q-BaRA on CPU: one call per adapted layer, for every slice and every token.
 * ONE source, compiled twice by cpu_lib (as cpu_intdot.c is): as is (AVX2/FMA/F16C, 8 fp32
 * lanes, entry point qahira_qbara_layer_avx2) and with -DQAHIRA_W512 plus the AVX-512 flags
 * (16 lanes, qahira_qbara_layer_avx512); Python picks one by CPUID. Same bits: see "Widths".
 *
 * For each listed token i (row rows[i] of x and y, slot s = slots[i]) and each slice c of the
 * layer where s has an adapter (geometry pool p, repeat q, rank r, coef = scaling / p):
 *
 *   xp[j] = sum_{u < p} x[row, j*p + u]                       (in/p values: p * P_p(x), fp32)
 *   h[k]  = coef * A_c[s, k, :in/p] . xp                      (k < r)
 *   y[row, col_c + o*q + u] += sum_k h[k] * Bt_c[s, k, o]      (o < out_c/q, u < q: R_q)
 *
 * Buffers (contiguous, owned by the layer; the LoRA layer keeps them current):
 *   A_c   [slots, R, in]     slot s fills only its [:r, :in/p] corner (the compact A)
 *   Bt_c  [slots, R, out_c]  slot s fills only its [:r, :out_c/q] corner (the compact B, transposed
 *                            so that the expand step streams contiguous rows)
 *   A_c and Bt_c are fp32, or bf16 when w_bf16 = 1 (widened exactly to fp32 as they are read,
 *   so the result is the fp32 kernel's on the bf16 values). Each token reads its own slot's A
 *   and B, so with many distinct adapters in a batch these reads are most of the layer's cost,
 *   and bf16 halves them.
 *   geo_c [slots, 3] int32   pool, repeat, rank; rank 0 = slot s does not touch slice c
 *   coef_c [slots] fp32      scaling / pool
 * x: fp32/bf16/fp16 [T, in], row stride x_stride; y: fp32/bf16/fp16, row stride y_stride, unit
 * column stride; slice c occupies columns [col_c, col_c + out_c).
 *
 * A slot may instead hold a QA-HiRA on slice c (delta = s * R_qo(M P_pi(x)), M [out_c/qo, in/pi]):
 *
 *   y[row, col_c + o*qo + u] += m_coef_c[s] * M[o, :] . xp     (xp pooled by pi as above)
 *
 *   m_c        fp32, m_numel_c values: every QA-HiRA slot's M, row-major, concatenated
 *   m_offset_c [slots] int64   where slot s's M starts in m_c
 *   m_geo_c    [slots, 3] int32  pi, qo, on (1 = slot s is a QA-HiRA on slice c, 0 = not)
 *   m_coef_c   [slots] fp32    s / pi
 * A slot is one or the other on a slice (on = 1 with rank > 0 is refused). The same per-token
 * path: x pooled once per distinct pool, M's rows dotted with it, added (repeated, rounded once).
 *
 * Why one call per layer: the per-slice torch ops (dtype conversion, pooling, two small matmuls,
 * a strided repeat-add) and their Python cost were most of the adapter overhead in decode. Here x
 * is converted and pooled once per token, each token reads only its own slot's compact A and B,
 * the expand step keeps its outputs in registers and adds them into y (repeated, rounded once to
 * y's dtype). Each token's arithmetic is the same whatever else is in the batch, so a request's
 * output does not depend on its neighbours. Tokens are split across OpenMP threads (each writes
 * only its own row of y, so rows must be distinct).
 *
 * Widths. Every output element sees the same fp32 operations in the same order in both builds,
 * so their results are bit-identical (tested): conversions, pooling sums, the expand's FMAs over
 * k and the repeat-adds are per lane, so only the vector width changes. The one reduction, the
 * dot product of the shrink / QA-HiRA rows, keeps the AVX2 order: two 8-lane accumulators over
 * columns 16i..16i+7 and 16i+8..16i+15, which the AVX-512 build holds as the halves of one
 * 16-lane register (a wider or more split accumulation would change the bits); speed comes from
 * dotting 4 rows at once instead. bf16 outputs are rounded with integer ops in both builds (not
 * AVX512-BF16's vcvtneps2bf16, which flushes denormals).
 */
#include <math.h>
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
  const void *a[MAX_SLICES];  /* fp32 or bf16: w_bf16 */
  const void *bt[MAX_SLICES];
  const int32_t *geo[MAX_SLICES];
  const float *coef[MAX_SLICES];
  long y_col[MAX_SLICES];
  int out_size[MAX_SLICES];
  /* QA-HiRA slots (NULL m_geo[c]: none on slice c); see the header. */
  const float *m[MAX_SLICES];
  const int64_t *m_offset[MAX_SLICES];
  const int32_t *m_geo[MAX_SLICES];
  const float *m_coef[MAX_SLICES];
  long m_numel[MAX_SLICES];
  int w_bf16; /* A_c and Bt_c in bf16 (1) or fp32 (0) */
} qbara_layer_t; /* mirrored by qahira_kernels.cpu_qbara.QbaraLayer */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* W fp32 lanes per vector; loadw / storew / addw / vloadu ... are the W-wide operations. The
 * 8-wide load8 / store8 / add8 exist in both builds (AVX-512 uses them for 8-element steps). */
#ifdef QAHIRA_W512
#define ENTRY qahira_qbara_layer_avx512
#define W 16
typedef __m512 vf;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vloadu _mm512_loadu_ps
#define vstoreu _mm512_storeu_ps
#define vfmadd _mm512_fmadd_ps
#define vadd _mm512_add_ps
#else
#define ENTRY qahira_qbara_layer_avx2
#define W 8
typedef __m256 vf;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vloadu _mm256_loadu_ps
#define vstoreu _mm256_storeu_ps
#define vfmadd _mm256_fmadd_ps
#define vadd _mm256_add_ps
#endif

ALWAYS_INLINE __m256 load8(const void *p, int dt, long i) {
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

#ifdef QAHIRA_W512
ALWAYS_INLINE __m512 loadw(const void *p, int dt, long i) {
  if (dt == DT_F32) return _mm512_loadu_ps((const float *)p + i);
  const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
  if (dt == DT_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* store8's rounding, sixteen at a time. Not AVX512-BF16's vcvtneps2bf16: it flushes denormals
 * to zero, which store_elem (and torch) do not. */
static inline void storew(void *p, int dt, long i, __m512 v) {
  if (dt == DT_F32) {
    _mm512_storeu_ps((float *)p + i, v);
    return;
  }
  __m256i out;
  if (dt == DT_F16) {
    out = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    out = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0)));
  }
  _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), out);
}
#else
#define loadw load8
#define storew store8
#endif

static inline void addw(void *y, int dt, long i, vf v) { storew(y, dt, i, vadd(loadw(y, dt, i), v)); }

/* y[i + u] += d for u < q. */
static inline void repeat_add1(void *y, int dt, long i, float d, int q) {
  for (int u = 0; u < q; u++) store_elem(y, dt, i + u, load_elem(y, dt, i + u) + d);
}

/* y[i + o*q + u] += d[o] for o < W, u < q. */
static inline void repeat_addw(void *y, int dt, long i, vf d, int q) {
  if (q == 1) {
    addw(y, dt, i, d);
  } else if (q == 2) { /* each lane twice: lanes 0..W/2-1, then W/2..W-1 */
#ifdef QAHIRA_W512
    addw(y, dt, i, _mm512_permutexvar_ps(_mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0), d));
    addw(y, dt, i + W, _mm512_permutexvar_ps(
        _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8), d));
#else
    const __m256 lo = _mm256_unpacklo_ps(d, d), hi = _mm256_unpackhi_ps(d, d);
    addw(y, dt, i, _mm256_permute2f128_ps(lo, hi, 0x20));
    addw(y, dt, i + W, _mm256_permute2f128_ps(lo, hi, 0x31));
#endif
  } else if (q < 8) { /* the W*q repeated values laid out in order, then added W at a time */
    float t[W], r[W * 7];
    vstoreu(t, d);
    for (int o = 0; o < W; o++)
      for (int u = 0; u < q; u++) r[o * q + u] = t[o];
    for (int j = 0; j < W * q; j += W) addw(y, dt, i + j, vloadu(r + j));
  } else { /* each output's run of q: a broadcast, W (then 8) at a time */
    float t[W];
    vstoreu(t, d);
    for (int o = 0; o < W; o++) {
      const long at = i + (long)o * q;
      int u = 0;
      for (; u + W <= q; u += W) addw(y, dt, at + u, vset1(t[o]));
#ifdef QAHIRA_W512
      for (; u + 8 <= q; u += 8) add8(y, dt, at + u, _mm256_set1_ps(t[o]));
#endif
      repeat_add1(y, dt, at + u, t[o], q - u);
    }
  }
}

/* x row -> fp32 */
static void convert_row(float *dst, const void *x, int dt, long base, int n) {
  int j = 0;
  for (; j + W <= n; j += W) vstoreu(dst + j, loadw(x, dt, base + j));
  for (; j < n; j++) dst[j] = load_elem(x, dt, base + j);
}

/* dst[j] = sum_{u < p} src[j*p + u], summed in order u = 0, 1, ... */
static void pool_row(float *dst, const float *src, int n_out, int p) {
  int j = 0;
  if (p == 2) {
#ifdef QAHIRA_W512
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (; j + 16 <= n_out; j += 16) {
      const __m512 a = _mm512_loadu_ps(src + 2 * j), b = _mm512_loadu_ps(src + 2 * j + 16);
      _mm512_storeu_ps(dst + j, _mm512_add_ps(_mm512_permutex2var_ps(a, even, b),
                                              _mm512_permutex2var_ps(a, odd, b)));
    }
#endif
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

/* Address of element i of p (fp32 or, adt DT_BF16, bf16 elements). */
ALWAYS_INLINE const char *elem_at(const void *p, const int adt, long i) {
  return (const char *)p + i * (adt == DT_F32 ? 4 : 2);
}

/* out[j] = coef * (a_j . b) for the NR rows a_j = a + j*lda (n values each, elements fp32 or
 * bf16 as adt says), NR rows at once so that their FMA chains overlap. Each row's order is fixed ("Widths" in the header): s0 sums
 * columns 16i..16i+7, s1 16i+8..16i+15 (AVX-512: one 16-lane register, halves s0 and s1), then
 * 8 more columns into s0, then s0 + s1 across lanes, then the last n % 8 columns one by one. */
ALWAYS_INLINE void dot_rows(const int NR, const void *a, const int adt, long lda, const float *b,
                            int n, float coef, float *out) {
  __m256 s0[NR], s1[NR];
  int k = 0;
#ifdef QAHIRA_W512
  __m512 s[NR];
  for (int j = 0; j < NR; j++) s[j] = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    const __m512 bk = _mm512_loadu_ps(b + k);
    for (int j = 0; j < NR; j++) {
      /* the next NR rows: each token reads its own slot's A, from DRAM when many adapters are
       * in the batch, in rows too short for the hardware prefetcher to ramp up */
      _mm_prefetch(elem_at(a, adt, (j + NR) * lda + k), _MM_HINT_T0);
      s[j] = _mm512_fmadd_ps(loadw(a, adt, j * lda + k), bk, s[j]);
    }
  }
  for (int j = 0; j < NR; j++) split_halves(s[j], &s0[j], &s1[j]);
#else
  for (int j = 0; j < NR; j++) s0[j] = s1[j] = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    const __m256 b0 = _mm256_loadu_ps(b + k), b1 = _mm256_loadu_ps(b + k + 8);
    for (int j = 0; j < NR; j++) {
      s0[j] = _mm256_fmadd_ps(load8(a, adt, j * lda + k), b0, s0[j]);
      s1[j] = _mm256_fmadd_ps(load8(a, adt, j * lda + k + 8), b1, s1[j]);
    }
  }
#endif
  if (k + 8 <= n) {
    for (int j = 0; j < NR; j++)
      s0[j] = _mm256_fmadd_ps(load8(a, adt, j * lda + k), _mm256_loadu_ps(b + k), s0[j]);
    k += 8;
  }
  for (int j = 0; j < NR; j++) {
    float t = hsum(_mm256_add_ps(s0[j], s1[j]));
    /* fmaf, not t += a * b: the compiler contracted that to an FMA in some inlined copies and
     * not in others, which would let the builds' last bits differ. */
    for (int kk = k; kk < n; kk++) t = fmaf(load_elem(a, adt, j * lda + kk), b[kk], t);
    out[j] = coef * t;
  }
}

/* h[k] = coef * (a_k . v) for k < r, a_k = a + k*lda (elements as adt says). */
ALWAYS_INLINE void dots(const void *a, const int adt, long lda, const float *v, int n, float coef,
                        int r, float *h) {
  int k = 0;
  for (; k + 4 <= r; k += 4) dot_rows(4, elem_at(a, adt, k * lda), adt, lda, v, n, coef, h + k);
  for (; k < r; k++) dot_rows(1, elem_at(a, adt, k * lda), adt, lda, v, n, coef, h + k);
}

/* y[col + o*q + u] += sum_{k<r} h[k] * bt[k*ld + o] for o < out_q (bt fp32 or bf16 as bdt
 * says): 4W outputs per pass held in registers while the r rows of Bt stream by. */
ALWAYS_INLINE void expand_add(void *y, int dt, long col, const void *bt, const int bdt, long ld,
                              const float *h, int r, int out_q, int q) {
  int o = 0;
  for (; o + 4 * W <= out_q; o += 4 * W) {
    vf d0 = vzero(), d1 = d0, d2 = d0, d3 = d0;
    for (int k = 0; k < r; k++) {
      const long b = k * ld + o;
      for (int u = 0; u < 4 * W; u += 16) /* this row's part of the next pass (as in dot_rows) */
        _mm_prefetch(elem_at(bt, bdt, b + 4 * W + u), _MM_HINT_T0);
      const vf hk = vset1(h[k]);
      d0 = vfmadd(hk, loadw(bt, bdt, b), d0);
      d1 = vfmadd(hk, loadw(bt, bdt, b + W), d1);
      d2 = vfmadd(hk, loadw(bt, bdt, b + 2 * W), d2);
      d3 = vfmadd(hk, loadw(bt, bdt, b + 3 * W), d3);
    }
    repeat_addw(y, dt, col + (long)o * q, d0, q);
    repeat_addw(y, dt, col + (long)(o + W) * q, d1, q);
    repeat_addw(y, dt, col + (long)(o + 2 * W) * q, d2, q);
    repeat_addw(y, dt, col + (long)(o + 3 * W) * q, d3, q);
  }
  for (; o + W <= out_q; o += W) {
    vf d0 = vzero();
    for (int k = 0; k < r; k++) d0 = vfmadd(vset1(h[k]), loadw(bt, bdt, k * ld + o), d0);
    repeat_addw(y, dt, col + (long)o * q, d0, q);
  }
  for (; o < out_q; o++) {
    float d = 0.f;
    for (int k = 0; k < r; k++) d = fmaf(h[k], load_elem(bt, bdt, k * ld + o), d);
    repeat_add1(y, dt, col + (long)o * q, d, q);
  }
}

/* One slice of a Q-BaRA / LoRA slot for one token: h = coef * A_s v, then y += R_q(B_s h); A_s and
 * B^T_s start at element a_at / bt_at of a / bt, whose elements are wdt (inlined once per dtype,
 * so the loads have no branch). */
ALWAYS_INLINE void qbara_slice(const int wdt, const void *a, long a_at, const void *bt, long bt_at,
                               long ld_b, const float *v, int in, int in_p, float coef, int r,
                               float *h, void *y, int y_dt, long y_at, int out_q, int q) {
  dots(elem_at(a, wdt, a_at), wdt, in, v, in_p, coef, r, h);
  expand_add(y, y_dt, y_at, elem_at(bt, wdt, bt_at), wdt, ld_b, h, r, out_q, q);
}

/* QA-HiRA: y[col + o*q + u] += coef * M[o, :] . v for o < out_q, u < q (M [out_q, in_p]
 * row-major); W outputs per vector add. */
static void matvec_repeat_add(void *y, int dt, long col, const float *m, const float *v, int in_p,
                              int out_q, int q, float coef) {
  int o = 0;
  for (; o + W <= out_q; o += W) {
    float d[W];
    dots(m + (long)o * in_p, DT_F32, in_p, v, in_p, coef, W, d);
    repeat_addw(y, dt, col + (long)o * q, vloadu(d), q);
  }
  for (; o < out_q; o++) {
    float d;
    dot_rows(1, m + (long)o * in_p, DT_F32, in_p, v, in_p, coef, &d);
    repeat_add1(y, dt, col + (long)o * q, d, q);
  }
}

/* x pooled by p (sums) in xp, reusing it when *pooled already is p; p = 1 is x itself. */
static inline const float *pooled_x(const float *xf, float *xp, int *pooled, int p, int in) {
  if (p == 1) return xf;
  if (*pooled != p) pool_row(xp, xf, in / p, p);
  *pooled = p;
  return xp;
}

/* Returns 0; -1 if a slot's geometry does not fit the layer (rank over R or MAX_RANK, a pool or
 * repeat that does not divide it, a slot index out of range); -2 if out of memory; -3 if a row
 * index is outside [0, n_rows); -4 if a listed slot holds both a Q-BaRA/LoRA and a QA-HiRA on one
 * slice; -5 if a listed QA-HiRA slot's (pi, qo, on) or M extent does not fit the layer or m_flat.
 * Nothing is written unless every check passes. */
int ENTRY(const qbara_layer_t *L, const void *x, int x_dt, long x_stride, long n_rows, int n,
          const int64_t *rows, const int64_t *slots, void *y, int y_dt, long y_stride) {
  if (L->n_slices < 1 || L->n_slices > MAX_SLICES || L->r_max > MAX_RANK) return -1;
  for (int i = 0; i < n; i++) {
    if (rows[i] < 0 || rows[i] >= n_rows) return -3;
    if (slots[i] < 0 || slots[i] >= L->n_slots) return -1;
    for (int c = 0; c < L->n_slices; c++) {
      const int32_t *g = L->geo[c] + 3 * slots[i];
      if (g[2] != 0 && (g[0] < 1 || g[1] < 1 || g[2] < 0 || g[2] > L->r_max ||
                        L->in_features % g[0] || L->out_size[c] % g[1]))
        return -1;
      if (!L->m_geo[c]) continue;
      const int32_t *mg = L->m_geo[c] + 3 * slots[i];
      if (mg[2] == 0) continue;
      if (g[2] != 0) return -4;
      if (mg[2] != 1 || mg[0] < 1 || mg[1] < 1 || L->in_features % mg[0] || L->out_size[c] % mg[1])
        return -5;
      const long off = L->m_offset[c][slots[i]];
      if (off < 0 || off > L->m_numel[c] ||
          (long)(L->in_features / mg[0]) * (L->out_size[c] / mg[1]) > L->m_numel[c] - off)
        return -5;
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
        const long y_at = row * y_stride + L->y_col[c];
        const int32_t *mg = L->m_geo[c] ? L->m_geo[c] + 3 * s : NULL;
        if (mg && mg[2]) { /* QA-HiRA: s/pi * R_qo(M sum-pool_pi(x)) */
          const int pi = mg[0], qo = mg[1];
          matvec_repeat_add(y, y_dt, y_at, L->m[c] + L->m_offset[c][s], pooled_x(xf, xp, &pooled, pi, in),
                            in / pi, L->out_size[c] / qo, qo, L->m_coef[c][s]);
          continue;
        }
        const int32_t *g = L->geo[c] + 3 * s;
        const int p = g[0], q = g[1], r = g[2];
        if (r == 0) continue;
        const int in_p = in / p, out_q = L->out_size[c] / q;
        const float *v = pooled_x(xf, xp, &pooled, p, in);
        const float coef = L->coef[c][s];
        const long a_at = s * (long)L->r_max * in, bt_at = s * (long)L->r_max * L->out_size[c];
#define SLICE(WDT) qbara_slice(WDT, L->a[c], a_at, L->bt[c], bt_at, L->out_size[c], v, in, in_p, \
                               coef, r, h, y, y_dt, y_at, out_q, q)
        if (L->w_bf16)
          SLICE(DT_BF16);
        else
          SLICE(DT_F32);
#undef SLICE
      }
    }
  }
  free(buf);
  return 0;
}
