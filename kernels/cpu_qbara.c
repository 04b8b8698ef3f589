/* Multi-adapter Q-BaRA on CPU, one token at a time (decode with many adapters).
 *
 * For each listed token i (row rows[i] of x and y, slot s = slots[i], rank r = ranks[i]):
 *
 *   h = coef[i] * A_cat[s*R : s*R + r] @ xp[rows[i]]           (r values; coef = scaling / pool)
 *   d = Bt_cat[s*R : s*R + r]^T @ h                            (out_q values)
 *   y[rows[i], o*q + j] += d[o]   for o < out_q, j < q          (repeat R_q)
 *
 * xp: fp32 [T, in_p], the pooled sums p * P_p(x) (made once per layer input, in torch).
 * A_cat: fp32 [slots * R, in_p] and Bt_cat: fp32 [slots * R, out_q], every slot's compact A and
 * B^T packed as made by qahira_vllm.lora.ops.pack_slots (R = the group's largest rank; rows past a
 * slot's own rank are never read).
 * y: fp32/bf16/fp16 with row stride y_stride elements and unit column stride (it may be a column
 * slice of a merged layer's output).
 *
 * Why: the torch alternatives either copy each token's A and B (gathers) or multiply every token
 * by every slot (one GEMM over all slots); this reads each token's own A and B once, straight
 * from the packed buffers, with fp32 FMAs over contiguous rows. Each token's arithmetic is
 * independent of the rest of the batch. Tokens are split across OpenMP threads (each writes its
 * own row of y).
 */
#include <stdlib.h>

#include "cpu_common.h"

#define MAX_RANK 1024

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

/* Returns 0, -1 if a rank exceeds MAX_RANK, -2 if out of memory. */
int qahira_qbara_tokens(const float *xp, int in_p, const float *a_cat, const float *bt_cat, int R,
                        int out_q, int n, const int64_t *rows, const int64_t *slots,
                        const int64_t *ranks, const float *coef, void *y, int y_dt,
                        long y_stride, int repeat) {
  for (int i = 0; i < n; i++)
    if (ranks[i] > MAX_RANK || ranks[i] > R) return -1;
  int status = 0;
#pragma omp parallel
  {
    float *d = (float *)malloc(sizeof(float) * (size_t)(out_q > 0 ? out_q : 1));
    if (!d) {
#pragma omp atomic write
      status = -2;
    }
#pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
      if (!d) continue;
      const long row = rows[i];
      const int r = (int)ranks[i];
      const float *x = xp + row * (long)in_p;
      const float *a = a_cat + slots[i] * (long)R * in_p;
      const float *bt = bt_cat + slots[i] * (long)R * out_q;
      float h[MAX_RANK];
      for (int k = 0; k < r; k++) h[k] = coef[i] * dot(a + (long)k * in_p, x, in_p);
      /* d = sum_k h[k] * Bt[k, :]: each Bt row streamed once, d stays in L1 */
      memset(d, 0, sizeof(float) * (size_t)out_q);
      for (int k = 0; k < r; k++) {
        const float *bk = bt + (long)k * out_q;
        const __m256 hk = _mm256_set1_ps(h[k]);
        int o = 0;
        for (; o + 8 <= out_q; o += 8)
          _mm256_storeu_ps(d + o, _mm256_fmadd_ps(hk, _mm256_loadu_ps(bk + o), _mm256_loadu_ps(d + o)));
        for (; o < out_q; o++) d[o] += h[k] * bk[o];
      }
      const long base = row * y_stride;
      for (int oo = 0; oo < out_q; oo++)
        for (int j = 0; j < repeat; j++) {
          const long idx = base + (long)oo * repeat + j;
          store_elem(y, y_dt, idx, load_elem(y, y_dt, idx) + d[oo]);
        }
    }
    free(d);
  }
  return status;
}
