/* cpu_dequant_gemm: qahira INT4 and INT8 linear layers on x86-64 CPUs for batches (M >= ~4):
 * each thread dequantizes a panel of the weight to bf16 in a cache-resident buffer, exactly as
 * the format defines it, and multiplies it by all M bf16 activation rows with fp32 accumulation.
 *
 *   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = bf16(s[n, k/bi] * q[n, k] + o[n, k/bi])
 *
 * W is the layer's dense bf16 weight (the format's rule: product rounded to fp32, then the sum,
 * then bf16 to nearest even; docs/FORMAT.md), so y is what bf16 F.linear on the dequantized
 * weight gives, up to fp32 summation order. The weight is dequantized once per call and used M
 * times, so the cost per output falls as M grows, where cpu_intdot.c's per-row integer work
 * does not.
 *
 * ONE source, compiled four times by cpu_lib (entry point per build):
 *   qahira_cpu_dequant_gemm_avx2         as is: 8 fp32 lanes, products by FMA
 *   qahira_cpu_dequant_gemm_avx512       -DQAHIRA_W512 + AVX-512 F/BW/VL/DQ: 16 lanes, FMA
 *   qahira_cpu_dequant_gemm_avx512_bf16  also -DQAHIRA_BF16DOT -mavx512bf16: vdpbf16ps
 *   qahira_cpu_dequant_gemm_amx          also -DQAHIRA_AMX -mamx-tile -mamx-bf16: tdpbf16ps
 * The dot step is the same in the first three: for each pair of columns (k even, k + 1),
 *   acc += x[k+1] * W[n, k+1];  acc += x[k] * W[n, k]
 * each product of two bf16 numbers exact in fp32, each add rounded (the order vdpbf16ps uses,
 * Intel SDM). vdpbf16ps also flushes subnormal inputs and sums to zero, so the builds may differ
 * by such amounts (below 2^-126); otherwise they agree (tested). The AMX build multiplies the
 * same bf16 weights, as tdpbf16ps's A operand (row-major, INT4 dequantized by table lookup),
 * and sums each 32-column step in an order of its own (within the same fp32 summation bound,
 * tested).
 *
 * Layouts of the vector builds (qahira_kernels.layouts.pack_cpu_dequant_gemm), N % 16 == 0,
 * bi even (the AMX build's: see its section below):
 *   w       INT4: uint8 [N/16, K/2, 16]: byte = q[n, k] | q[n, k+1] << 4 for rows n of a group
 *                 of 16 and the column pair (k, k+1);  INT8: uint8 [N/16, K/2, 16, 2]
 *   s, o    [N/16, K/bi, 16] fp16 or fp32 (s_f32, o_f32): per output row (2-D blocks expanded)
 * Scales and offsets must be finite (as the format requires).
 *
 * Loop order: OpenMP threads take panels of 64 output rows; for each chunk of KC columns the
 * panel is dequantized to bf16 pairs in the VNNI order [KC/2, 64] (32 KiB, L1/L2 resident),
 * then every activation row is multiplied by it in register tiles of MT rows x 64 (or 16) rows,
 * accumulating into an fp32 [M, 64] buffer. Each output's summation order is the same at every
 * M (row n, columns in order), so batching does not change a request's result. Calls with more
 * rows than BLOCK_ROWS() (their working set in half of L2) run as equal row blocks.
 */
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_common.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define GROUP 16 /* output rows per packed group */
#define PANEL 64 /* output rows per thread task (= layouts.CPU_DEQUANT_GEMM_PANEL) */
#define KC 128   /* columns dequantized at a time (even): a 32 KiB panel buffer */

#if defined(QAHIRA_AMX)
#define ENTRY qahira_cpu_dequant_gemm_amx
#elif defined(QAHIRA_BF16DOT)
#define ENTRY qahira_cpu_dequant_gemm_avx512_bf16
#elif defined(QAHIRA_W512)
#define ENTRY qahira_cpu_dequant_gemm_avx512
#else
#define ENTRY qahira_cpu_dequant_gemm_avx2
#endif
#define CONCAT_(a, b) a##b
#define CONCAT(a, b) CONCAT_(a, b)
#define BLOCK_ROWS CONCAT(ENTRY, _block_rows) /* vector builds: rows per pass, see ENTRY */

#ifdef QAHIRA_W512
#define VL 16
typedef __m512 vf;
typedef __m512i vi;
#define NV 4 /* vectors per register tile: 64 rows */
#ifdef QAHIRA_BF16DOT
#define MT_MAX 6 /* 24 accumulators + 4 weight pairs + a broadcast */
#else
#define MT_MAX 5 /* 20 accumulators + 8 weight vectors; broadcasts are memory operands */
#endif
#define vi_set1(a) _mm512_set1_epi32(a)
#define vi_and _mm512_and_si512
#define vi_or _mm512_or_si512
#define vi_add _mm512_add_epi32
#define vi_srli _mm512_srli_epi32
#define vi_slli _mm512_slli_epi32
#define vi_load(p) _mm512_loadu_si512((const void *)(p))
#define vi_store(p, v) _mm512_storeu_si512((void *)(p), v)
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_zero _mm512_setzero_ps
#define vf_set1 _mm512_set1_ps
#define vf_fma _mm512_fmadd_ps
#define vf_mul _mm512_mul_ps
#define vf_add _mm512_add_ps
#define as_vf _mm512_castsi512_ps
#define as_vi _mm512_castps_si512
#define i32_to_f _mm512_cvtepi32_ps
/* 16 uint8 -> 16 int32; 32 uint8 -> 16 int32 holding byte pairs as two uint16 */
#define load_u8x(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define load_u8pairs(p) _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define load_f16x(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#else
#define VL 8
typedef __m256 vf;
typedef __m256i vi;
#define NV 2 /* 16 rows */
#define MT_MAX 5 /* 10 accumulators + 4 weight vectors + a broadcast */
#define vi_set1(a) _mm256_set1_epi32(a)
#define vi_and _mm256_and_si256
#define vi_or _mm256_or_si256
#define vi_add _mm256_add_epi32
#define vi_srli _mm256_srli_epi32
#define vi_slli _mm256_slli_epi32
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi_store(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_zero _mm256_setzero_ps
#define vf_set1 _mm256_set1_ps
#define vf_fma _mm256_fmadd_ps
#define vf_mul _mm256_mul_ps
#define vf_add _mm256_add_ps
#define as_vf _mm256_castsi256_ps
#define as_vi _mm256_castps_si256
#define i32_to_f _mm256_cvtepi32_ps
#define load_u8x(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define load_u8pairs(p) _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define load_f16x(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#endif

/* The panel buffer and the activations, per build. vdpbf16ps reads bf16 pairs: one uint32 per
 * (row, column pair) and xp[p, m] = (x[m, 2p], x[m, 2p+1]). The FMA builds keep the same bf16
 * values widened to fp32 (exact), so no instruction is spent splitting pairs in the inner loop:
 * per column pair, the even column's 64 rows, then the odd column's; xp[p, m] = (fp32 x[m, 2p],
 * fp32 x[m, 2p+1]). */
#ifdef QAHIRA_BF16DOT
typedef uint32_t wword;
#define WPP 1 /* words per (row, column pair) */
#else
typedef float wword;
#define WPP 2
#endif

static inline vf load_param_vec(const void *p, int f32) {
  return f32 ? vf_load((const float *)p) : load_f16x(p);
}

/* The format's rule: product rounded, then the sum. With fp16 scales the product s * q is exact
 * in fp32 (11 + 8 significant bits), so one FMA rounds the same; with fp32 scales the product
 * rounds, and the empty asm keeps the compiler from contracting mul + add into an FMA. */
ALWAYS_INLINE vf dequant_rule(vf q, vf s, vf o, int s_f32) {
  if (!s_f32) return vf_fma(q, s, o);
  vf p = vf_mul(q, s);
  __asm__("" : "+v"(p));
  return vf_add(p, o);
}

/* fp32 bits -> bf16 bits (nearest even) in the low 16 bits of each lane (finite inputs). */
ALWAYS_INLINE vi bf16_bits(vf v) {
  const vi u = as_vi(v);
  return vi_srli(vi_add(u, vi_add(vi_and(vi_srli(u, 16), vi_set1(1)), vi_set1(0x7fff))), 16);
}

/* VL rows of one column pair (lo = column k, hi = k + 1, fp32) stored as the buffer holds
 * them: bf16 pairs (lo | hi << 16), or each rounded to bf16 and widened back to fp32.
 * `no_subnormal`: the values cannot be subnormal (fp16 scales and offsets: every value is a
 * multiple of 2^-24, so 0 or >= 2^-24 in magnitude), so AVX512-BF16's vcvtne2ps2bf16, which
 * flushes subnormal inputs, rounds them as the integer rule does (nearest even) in one
 * instruction; the pairs are then interleaved by one vpermw. */
ALWAYS_INLINE void store_pair(wword *dst, vf lo, vf hi, int no_subnormal) {
#ifdef QAHIRA_BF16DOT
  if (no_subnormal) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
    vi_store(dst, _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
    return;
  }
  vi_store(dst, vi_or(bf16_bits(lo), vi_slli(bf16_bits(hi), 16)));
#else
  (void)no_subnormal;
  vf_store(dst, as_vf(vi_slli(bf16_bits(lo), 16)));
  vf_store(dst + PANEL, as_vf(vi_slli(bf16_bits(hi), 16)));
#endif
}

#ifndef QAHIRA_AMX
/* Dequantize rows [g*16, g*16 + 16) of the panel, columns [k0, k1), into wbuf (PANEL * WPP
 * words per column pair). Inlined per (bits, s_f32, o_f32) so the inner loop has no branch. */
ALWAYS_INLINE void dequant_group_as(const int bits, const int s_f32, const int o_f32,
                                    const uint8_t *wg, const void *sg, const void *og, int bi,
                                    int k0, int k1, wword *wbuf, int g) {
  const long pe = bits == 4 ? GROUP : 2 * GROUP; /* bytes per column pair */
  for (int k = k0; k < k1;) {
    const int b = k / bi, kend = (b + 1) * bi < k1 ? (b + 1) * bi : k1;
    for (int h = 0; h < GROUP; h += VL) {
      const long po = (long)b * GROUP + h;
      const vf s = load_param_vec(s_f32 ? (const void *)((const float *)sg + po)
                                        : (const void *)((const uint16_t *)sg + po), s_f32);
      const vf o = load_param_vec(o_f32 ? (const void *)((const float *)og + po)
                                        : (const void *)((const uint16_t *)og + po), o_f32);
      const uint8_t *src = wg + (long)(k >> 1) * pe + (bits == 4 ? h : 2 * h);
      wword *dst = wbuf + (long)((k - k0) >> 1) * PANEL * WPP + g * GROUP + h;
      for (int n = (kend - k) >> 1; n > 0; n--, src += pe, dst += PANEL * WPP) {
        vi qlo, qhi;
        if (bits == 4) {
          const vi v = load_u8x(src);
          qlo = vi_and(v, vi_set1(0x0f));
          qhi = vi_srli(v, 4);
        } else {
          const vi v = load_u8pairs(src);
          qlo = vi_and(v, vi_set1(0xffff));
          qhi = vi_srli(v, 16);
        }
        store_pair(dst, dequant_rule(i32_to_f(qlo), s, o, s_f32),
                   dequant_rule(i32_to_f(qhi), s, o, s_f32), !s_f32 && !o_f32);
      }
    }
    k = kend;
  }
}

static void dequant_group(const uint8_t *wg, int bits, const void *sg, int s_f32, const void *og,
                          int o_f32, int bi, int k0, int k1, wword *wbuf, int g) {
#define DQ(B, SF, OF) dequant_group_as(B, SF, OF, wg, sg, og, bi, k0, k1, wbuf, g)
  if (bits == 4) {
    if (s_f32) o_f32 ? DQ(4, 1, 1) : DQ(4, 1, 0);
    else o_f32 ? DQ(4, 0, 1) : DQ(4, 0, 0);
  } else {
    if (s_f32) o_f32 ? DQ(8, 1, 1) : DQ(8, 1, 0);
    else o_f32 ? DQ(8, 0, 1) : DQ(8, 0, 0);
  }
#undef DQ
}
#endif

#ifndef QAHIRA_AMX
/* acc[m][v] (fp32, rows m < MT, lanes of vector v) += x[m, k0:k1] . wbuf columns; xp: the
 * activations pair-major (see wword), from column pair k0/2, ldx pairs per column pair. */
ALWAYS_INLINE void tile(const int MT, const wword *xp, long ldx, int npairs, const wword *wb,
                        float *ytile, long ldy) {
  vf acc[MT_MAX][NV];
  for (int m = 0; m < MT; m++)
    for (int v = 0; v < NV; v++) acc[m][v] = vf_load(ytile + m * ldy + v * VL);
  for (int p = 0; p < npairs; p++) {
    const wword *wp = wb + (long)p * PANEL * WPP, *xr = xp + (long)p * ldx * WPP;
#ifdef QAHIRA_BF16DOT
    __m512i w[NV];
    for (int v = 0; v < NV; v++) w[v] = vi_load(wp + v * VL);
    for (int m = 0; m < MT; m++) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xr[m]);
      for (int v = 0; v < NV; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], xb, (__m512bh)w[v]);
    }
#else
    vf we[NV], wo[NV];
    for (int v = 0; v < NV; v++) {
      we[v] = vf_load(wp + v * VL);
      wo[v] = vf_load(wp + PANEL + v * VL);
    }
    for (int m = 0; m < MT; m++) {
      const vf bo = vf_set1(xr[2 * m + 1]), be = vf_set1(xr[2 * m]);
      for (int v = 0; v < NV; v++) {
        acc[m][v] = vf_fma(bo, wo[v], acc[m][v]); /* odd column first, as vdpbf16ps */
        acc[m][v] = vf_fma(be, we[v], acc[m][v]);
      }
    }
#endif
  }
  for (int m = 0; m < MT; m++)
    for (int v = 0; v < NV; v++) vf_store(ytile + m * ldy + v * VL, acc[m][v]);
}

#endif

/* This CPU's L2 cache per core in bytes (glibc's sysconf), 1 MiB where it is not known; asked
 * once per process (sysconf runs CPUID, which a VM may trap). */
static size_t l2_bytes(void) {
  static size_t known;
  if (!known) {
    size_t v = (size_t)1 << 20;
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long c = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (c > 0) v = (size_t)c;
#endif
    known = v; /* every caller computes the same value: a race is harmless */
  }
  return known;
}

/* n fp32 values -> y (fp32, or bf16 to nearest even; the FMA's default NaN stays NaN). */
static void store_row(const float *src, int n, void *y, int y_dt, long at) {
  int j = 0;
  if (y_dt == DT_F32) {
    memcpy((float *)y + at, src, (size_t)n * 4);
    return;
  }
  if (y_dt == DT_BF16)
    for (; j + VL <= n; j += VL) {
      const vi b = bf16_bits(vf_load(src + j));
#ifdef QAHIRA_W512
      _mm256_storeu_si256((__m256i *)((uint16_t *)y + at + j), _mm512_cvtepi32_epi16(b));
#else
      _mm_storeu_si128((__m128i *)((uint16_t *)y + at + j),
                       _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08)));
#endif
    }
  for (; j < n; j++) store_elem(y, y_dt, at + j, src[j]);
}

#ifndef QAHIRA_AMX
static void tile_rows(int mt, const wword *x, long ldx, int npairs, const wword *wb,
                      float *ytile, long ldy) {
  _Static_assert(MT_MAX == 5 || MT_MAX == 6, "tile_rows has a case for each MT up to MT_MAX");
  switch (mt) { /* constant MT per case: the accumulators stay in registers */
#if MT_MAX >= 6
  case 6: tile(6, x, ldx, npairs, wb, ytile, ldy); break;
#endif
  case 5: tile(5, x, ldx, npairs, wb, ytile, ldy); break;
  case 4: tile(4, x, ldx, npairs, wb, ytile, ldy); break;
  case 3: tile(3, x, ldx, npairs, wb, ytile, ldy); break;
  case 2: tile(2, x, ldx, npairs, wb, ytile, ldy); break;
  default: tile(1, x, ldx, npairs, wb, ytile, ldy); break;
  }
}
#endif

#ifndef QAHIRA_AMX
/* The most activation rows one pass over the weight takes (ENTRY splits larger calls into
 * equal blocks): a chunk's column pairs of xp and the [rows, 64] fp32 accumulators in half of
 * this CPU's L2, at least one register tile. */
int BLOCK_ROWS(void) {
  const long row_bytes = (long)KC / 2 * WPP * 4 + PANEL * 4, fit = (long)(l2_bytes() / 2) / row_bytes;
  return (int)(fit > MT_MAX ? fit : MT_MAX);
}

/* x bf16 [M, K]; w, s, o as in the header; y [M, N] fp32 (y_dt DT_F32) or bf16 (DT_BF16).
 * Returns 0, -1 for a shape it does not serve, -2 when out of memory. */
int ENTRY(const uint16_t *x, int M, int K, const uint8_t *w, int bits, const void *s, int s_f32,
          const void *o, int o_f32, int N, int bi, int bo, void *y, int y_dt) {
  (void)bo; /* this layout repeats 2-D blocks' parameters per row */
  if (N % GROUP || K % 2 || bi % 2 || K % bi || (bits != 4 && bits != 8)) return -1;
  if (M <= 0 || N <= 0) return 0;
  /* Rows in equal blocks whose per-row working set (a chunk's column pairs of xp, and the
   * [M, 64] fp32 accumulators) fits in half of L2: beyond that every register tile re-reads
   * both from L3 (16384 x 2048 INT4 at M = 1024, one thread, AMD EPYC with AVX2 and 512 KiB
   * of L2 per core: 1.30-1.37 s in one pass, 0.86-0.90 s in four blocks of 256). The weight is
   * dequantized once per block; each row's arithmetic is unchanged, so the bits are too. */
  const long max_rows = BLOCK_ROWS();
  if (M > max_rows) {
    const long nblocks = (M + max_rows - 1) / max_rows, rows = (M + nblocks - 1) / nblocks;
    const int y_size = y_dt == DT_F32 ? 4 : 2;
    for (long m0 = 0; m0 < M; m0 += rows) {
      const int mb = M - m0 < rows ? (int)(M - m0) : (int)rows;
      const int rc = ENTRY(x + m0 * K, mb, K, w, bits, s, s_f32, o, o_f32, N, bi, bo,
                           (char *)y + m0 * N * y_size, y_dt);
      if (rc) return rc;
    }
    return 0;
  }
  const int MY = M;
  const int npanels = (N + PANEL - 1) / PANEL, nb = K / bi;
  const long gbytes = (long)K / 2 * (bits == 4 ? GROUP : 2 * GROUP); /* one group's weight */
  const long gparams = (long)nb * GROUP;
  /* the activations pair-major, xp[p, m] = (x[m, 2p], x[m, 2p+1]): a register tile's MT
   * broadcasts then come from one cache line, not MT rows a whole row apart */
  wword *xp = malloc((size_t)K / 2 * M * WPP * 4);
  if (!xp) return -2;
  for (int m = 0; m < M; m++) {
    const uint32_t *xr = (const uint32_t *)(x + (long)m * K);
    for (int p = 0; p < K / 2; p++) {
#ifdef QAHIRA_BF16DOT
      xp[(long)p * M + m] = xr[p];
#else
      const uint32_t e = xr[p] << 16, o = xr[p] & 0xffff0000u;
      memcpy(xp + ((long)p * M + m) * 2, &e, 4);
      memcpy(xp + ((long)p * M + m) * 2 + 1, &o, 4);
#endif
    }
  }
  int failed = 0;
#pragma omp parallel
  {
    wword *wbuf = aligned_alloc(64, (size_t)KC / 2 * PANEL * WPP * 4);
    float *ybuf = aligned_alloc(64, (size_t)MY * PANEL * 4);
    if (!wbuf || !ybuf) {
#pragma omp atomic write
      failed = 1;
    } else {
      memset(wbuf, 0, (size_t)KC / 2 * PANEL * WPP * 4); /* lanes a narrow last panel never writes */
    }
#pragma omp for schedule(static)
    for (int pi = 0; pi < npanels; pi++) {
      if (!wbuf || !ybuf) continue;
      const int n0 = pi * PANEL, np = N - n0 < PANEL ? N - n0 : PANEL, ng = np / GROUP;
      memset(ybuf, 0, (size_t)MY * PANEL * 4);
      for (int k0 = 0; k0 < K; k0 += KC) {
        const int k1 = k0 + KC < K ? k0 + KC : K, npairs = (k1 - k0) / 2;
        for (int g = 0; g < ng; g++) {
          const long gi = n0 / GROUP + g;
          dequant_group(w + gi * gbytes, bits,
                        s_f32 ? (const void *)((const float *)s + gi * gparams)
                              : (const void *)((const uint16_t *)s + gi * gparams), s_f32,
                        o_f32 ? (const void *)((const float *)o + gi * gparams)
                              : (const void *)((const uint16_t *)o + gi * gparams), o_f32,
                        bi, k0, k1, wbuf, g);
        }
        /* register tiles of NV * VL rows; a panel narrower than that (np = 16, 32, 48 on
         * AVX-512) reads the columns its groups did not write, and its extra lanes are
         * never stored to y */
        for (int c = 0; c < np; c += NV * VL)
          for (int m0 = 0; m0 < M; m0 += MT_MAX) {
            const int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
            tile_rows(mt, xp + ((long)(k0 / 2) * M + m0) * WPP, M, npairs, wbuf + c,
                      ybuf + (long)m0 * PANEL + c, PANEL);
          }
      }
      for (int m = 0; m < M; m++) store_row(ybuf + (long)m * PANEL, np, y, y_dt, (long)m * N + n0);
    }
    free(wbuf);
    free(ybuf);
  }
  free(xp);
  return failed ? -2 : 0;
}
#endif /* !QAHIRA_AMX */

#ifdef QAHIRA_AMX
/* ---- The AMX build: the weight is tdpbf16ps's A operand, row-major, so INT4 dequantizes by
 * table lookup: a block's 16 possible weights bf16(s * j + o), j = 0..15, are computed once
 * and vpermw maps 32 nibbles to them in one instruction (the values are the same bits as the
 * other builds'). Layouts (layouts.pack_cpu_dequant_gemm_rows): the rows of each panel of 64
 * (PANEL) stored chunk after chunk of KCA columns, so each (panel, chunk) is one contiguous
 * block the dequantization streams through (64 rows a whole row apart defeat the hardware
 * prefetcher): INT4 row r of a chunk holds, per 64 columns, byte i = q[64c + i] |
 * q[64c + 32 + i] << 4; INT8 the bytes in order; s, o [N/bo, K/bi] as stored but in fp32
 * (exact; the table is built with one broadcast load each). K % 64 == 0 and
 * bi % 32 == 0 (INT4), K % 32 == 0 and bi % 16 == 0 (INT8). Per panel of 64 rows and chunk of KCA columns: rows dequantized to
 * bf16 [64, KCA] (128 KiB, in L2), then C[n, m] += W[n, :] x[m, :] in 16 x 16 fp32 tiles (A: 16 rows
 * of W x 32 columns; B: x transposed in column pairs, 16 pairs x 16 rows m; M padded to 16
 * with zero rows). The panel's C, [64, M], is written to y transposed.
 *
 * Loop order. Panels outside, chunks inside: a panel's C stays in an L1 buffer across its
 * chunks, and all of x (xp, K/2 x M words) is read once per panel, so it must stay in L2.
 * When xp is larger than half of L2 (sysconf; 1 MiB assumed when unknown), chunks go outside
 * and panels inside: each chunk's slice of xp stays in L2 while every panel passes over it,
 * and C lives in one [N, M] buffer instead (for the 1B shape's 2048 x 8192 layer at M = 128,
 * xp is 2 MiB: 7.4 ms against 9.5 ms panel-first, one thread, this project's Xeon). */
#define KCA 1024 /* = layouts.CPU_DEQUANT_GEMM_AMX_CHUNK */
/* Bytes of the weight stream prefetched ahead of the dequantization (the stores of the bf16
 * rows fill the store buffer, so the loads alone run too little ahead; a (panel, chunk) is
 * contiguous and, panels outside, so is the next chunk): INT4 13-15% faster at M <= 64 on the
 * 1B shapes, INT8 20%, one thread, this project's Xeon; no change at M = 128. */
#define AMX_PREFETCH 2048

struct tile_config {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

/* The tile configuration is per-thread state that other libraries in the process use too
 * (oneDNN, serving vLLM's bf16 layers): `saved` receives the caller's, amx_restore puts it
 * back. All eight tiles: 16 rows of 64 bytes. */
static void amx_configure(struct tile_config *saved) {
  struct tile_config c;
  memset(saved, 0, sizeof *saved);
  _tile_storeconfig(saved);
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

static void amx_restore(const struct tile_config *saved) {
  if (saved->palette)
    _tile_loadconfig(saved);
  else
    _tile_release();
}

/* The 16 INT4 weights of one (row, block) as bf16 in the low 16 words: s * j rounded to
 * fp32, plus o rounded (the format's rule; with fp16 scales the product is exact either way),
 * then to bf16 by the integer rule (once per block: its cost does not show). */
ALWAYS_INLINE __m512i int4_table(const float *s, const float *o) {
  const __m512 j = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_castsi256_si512(_mm512_cvtepi32_epi16(
      bf16_bits(dequant_rule(j, _mm512_set1_ps(*s), _mm512_set1_ps(*o), 1))));
}

/* 32 fp32 values (lo = the first 16) to bf16 at dst, nearest even as bf16_bits: by one
 * vcvtne2ps2bf16 unless a lane is denormal. That instruction reads a denormal as zero, where
 * the format's rule rounds the largest ones (fp32 bits 0x007F8000 and up) to 2^-126, a normal
 * bf16 that tdpbf16ps uses (it reads only denormal bf16 inputs as zero). */
ALWAYS_INLINE void store_bf16x32(uint16_t *dst, __m512 lo, __m512 hi) {
  if (__builtin_expect((_mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20)) == 0,
                       1)) {
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    return;
  }
  _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(bf16_bits(lo)));
  _mm256_storeu_si256((__m256i *)(dst + 16), _mm512_cvtepi32_epi16(bf16_bits(hi)));
}

/* One chunk of one panel to dequantize: rows [n0, n0 + np) of the weight, columns [k0, k1),
 * as bf16 into buf [PANEL][KCA]; s, o fp32 [N/bo, K/bi] (the stored values, widened); `done`
 * rows are finished. (Dequantizing the next chunk between the tile steps of this one, double
 * buffered, measured no faster on this project's Xeon: the tile unit does not overlap.) */
struct chunk_job {
  const uint8_t *w;
  const float *s, *o;
  long K;
  int bits, bo, bi, n0, np, k0, k1, done;
  uint16_t *buf;
};

/* Rows [j->done, r1) of the job. */
static void dequant_rows(struct chunk_job *j, int r1) {
  const int bits = j->bits, bi = j->bi, k0 = j->k0, k1 = j->k1;
  const float *s = j->s, *o = j->o;
  const long nb = j->K / bi, row_bytes = (long)(k1 - k0) * bits / 8;
  const uint8_t *chunk = j->w + (long)j->n0 * j->K * bits / 8 + (long)k0 * bits / 8 * j->np;
  if (r1 > j->np) r1 = j->np;
  for (int r = j->done; r < r1; r++) {
    const int n0 = j->n0, bo = j->bo;
    uint16_t *wbuf = j->buf;
    const long prow = (long)(n0 + r) / bo * nb;
    uint16_t *dst = wbuf + (long)r * KCA - k0;
    const uint8_t *src = chunk + r * row_bytes - (long)k0 * bits / 8; /* indexed by column */
    long b = prow + k0 / bi;
    int bend = (k0 / bi + 1) * bi; /* first column of the next block */
    if (bits == 4) {
      __m512i t = int4_table(s + b, o + b);
      for (int k = k0; k < k1; k += 64) {
        _mm_prefetch((const char *)(src + k / 2) + AMX_PREFETCH, _MM_HINT_T0);
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(src + k / 2)));
        for (int h = 0; h < 2; h++) {
          if (k + h * 32 >= bend) { /* blocks are whole multiples of 32 columns */
            b++;
            bend += bi;
            t = int4_table(s + b, o + b);
          }
          const __m512i idx = h ? _mm512_srli_epi16(v, 4) : _mm512_and_si512(v, _mm512_set1_epi16(0x0f));
          _mm512_storeu_si512(dst + k + h * 32, _mm512_permutexvar_epi16(idx, t));
        }
      }
    } else {
      /* 32 columns per step (K % 32 == 0), two blocks when bi == 16 */
      __m512 sv = _mm512_set1_ps(s[b]), ov = _mm512_set1_ps(o[b]);
      for (int k = k0; k < k1; k += 32) {
        _mm_prefetch((const char *)(src + k) + AMX_PREFETCH, _MM_HINT_T0);
        __m512 v[2];
        for (int h = 0; h < 2; h++) {
          if (k + 16 * h >= bend) {
            b++;
            bend += bi;
            sv = _mm512_set1_ps(s[b]);
            ov = _mm512_set1_ps(o[b]);
          }
          v[h] = dequant_rule(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                  _mm_loadu_si128((const __m128i *)(src + k + 16 * h)))),
                              sv, ov, 1);
        }
        store_bf16x32(dst + k, v[0], v[1]);
      }
    }
  }
  if (r1 > j->done) j->done = r1;
}

/* ct[r, m] (fp32 [PANEL, ldm]) += wbuf rows r < np x the activations' column pairs
 * xp [nsteps * 16, ldm] (uint32: two bf16), 32 rows r and 32 (or a last 16) m per tile block;
 * `first`: ct = instead of += (ct is not read). */
static void amx_chunk(const uint16_t *wbuf, int np, const uint32_t *xp, long ldm, int nsteps,
                      float *ct, int first) {
  const long cs = ldm * 4, ws = KCA * 2, xs = ldm * 4;
  for (int c = 0; c < np; c += 32)
    for (long m0 = 0; m0 < ldm; m0 += 32) {
      float *y = ct + (long)c * ldm + m0;
      const uint16_t *a = wbuf + (long)c * KCA;
      if (m0 + 32 <= ldm) {
        if (first) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, y, cs);
          _tile_loadd(1, y + 16, cs);
          _tile_loadd(2, y + 16 * ldm, cs);
          _tile_loadd(3, y + 16 * ldm + 16, cs);
        }
        for (int st = 0; st < nsteps; st++) {
          _tile_loadd(4, a + st * 32, ws);
          _tile_loadd(5, a + 16 * KCA + st * 32, ws);
          _tile_loadd(6, xp + (long)st * 16 * ldm + m0, xs);
          _tile_loadd(7, xp + (long)st * 16 * ldm + m0 + 16, xs);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, y, cs);
        _tile_stored(1, y + 16, cs);
        _tile_stored(2, y + 16 * ldm, cs);
        _tile_stored(3, y + 16 * ldm + 16, cs);
      } else { /* the last 16 rows m */
        if (first) {
          _tile_zero(0);
          _tile_zero(2);
        } else {
          _tile_loadd(0, y, cs);
          _tile_loadd(2, y + 16 * ldm, cs);
        }
        for (int st = 0; st < nsteps; st++) {
          _tile_loadd(4, a + st * 32, ws);
          _tile_loadd(5, a + 16 * KCA + st * 32, ws);
          _tile_loadd(6, xp + (long)st * 16 * ldm + m0, xs);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
        }
        _tile_stored(0, y, cs);
        _tile_stored(2, y + 16 * ldm, cs);
      }
    }
}

/* 1 if a call with these K and M runs chunks outside (see "Loop order" above), else 0. */
int qahira_cpu_dequant_gemm_amx_chunks_outside(int K, int M) {
  const long ldm = (M + 15) / 16 * 16;
  return (size_t)K / 2 * ldm * 4 > l2_bytes() / 2;
}

int ENTRY(const uint16_t *x, int M, int K, const uint8_t *w, int bits, const void *s_, int s_f32,
          const void *o_, int o_f32, int N, int bi, int bo, void *y, int y_dt) {
  const float *s = s_, *o = o_; /* this build's scales and offsets are fp32 */
  if (!s_f32 || !o_f32 || (bits != 4 && bits != 8) || N % GROUP || bo <= 0 || N % bo || K % bi ||
      K % (bits == 4 ? 64 : 32) || bi % (bits == 4 ? 32 : 16))
    return -1;
  if (M <= 0 || N <= 0) return 0;
  const long ldm = (M + 15) / 16 * 16;
  /* the activations in column pairs, transposed: xp[p, m] = (x[m, 2p], x[m, 2p+1]), zero
   * rows m >= M (tdpbf16ps's B operand) */
  uint32_t *xp = calloc((size_t)K / 2 * ldm, 4);
  if (!xp) return -2;
  for (int m = 0; m < M; m++) {
    const uint32_t *xr = (const uint32_t *)(x + (long)m * K);
    for (int p = 0; p < K / 2; p++) xp[(long)p * ldm + m] = xr[p];
  }
  const int npanels = (N + PANEL - 1) / PANEL;
  const int chunks_outside = qahira_cpu_dequant_gemm_amx_chunks_outside(K, M);
  /* C: one [PANEL, ldm] buffer per thread, or (chunks outside) [npanels * PANEL, ldm] shared,
   * each panel's rows written by the thread that owns the panel */
  float *c_all = chunks_outside ? aligned_alloc(64, (size_t)npanels * PANEL * ldm * 4) : NULL;
  if (chunks_outside && !c_all) {
    free(xp);
    return -2;
  }
  int failed = 0;
#pragma omp parallel
  {
    uint16_t *wbuf = aligned_alloc(64, (size_t)PANEL * KCA * 2);
    float *ct = chunks_outside ? NULL : aligned_alloc(64, (size_t)PANEL * ldm * 4);
    const int ok = wbuf && (chunks_outside || ct);
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    } else {
      memset(wbuf, 0, (size_t)PANEL * KCA * 2); /* rows a narrow last panel never writes */
    }
    struct tile_config saved;
    amx_configure(&saved);
    if (chunks_outside) {
      for (int k0 = 0; k0 < K; k0 += KCA) {
        const int k1 = k0 + KCA < K ? k0 + KCA : K;
#pragma omp for schedule(static)
        for (int pi = 0; pi < npanels; pi++) {
          if (!ok) continue;
          const int n0 = pi * PANEL, np = N - n0 < PANEL ? N - n0 : PANEL;
          struct chunk_job job = {w, s, o, K, bits, bo, bi, n0, np, k0, k1, 0, wbuf};
          dequant_rows(&job, np);
          amx_chunk(wbuf, np, xp + (long)(k0 / 2) * ldm, ldm, (k1 - k0) / 32,
                    c_all + (long)n0 * ldm, k0 == 0);
        }
      }
    }
#pragma omp for schedule(static)
    for (int pi = 0; pi < npanels; pi++) {
      if (!ok) continue;
      const int n0 = pi * PANEL, np = N - n0 < PANEL ? N - n0 : PANEL;
      float *c = chunks_outside ? c_all + (long)n0 * ldm : ct;
      if (!chunks_outside)
        for (int k0 = 0; k0 < K; k0 += KCA) {
          const int k1 = k0 + KCA < K ? k0 + KCA : K;
          struct chunk_job job = {w, s, o, K, bits, bo, bi, n0, np, k0, k1, 0, wbuf};
          dequant_rows(&job, np);
          amx_chunk(wbuf, np, xp + (long)(k0 / 2) * ldm, ldm, (k1 - k0) / 32, c, k0 == 0);
        }
      /* y[m, n0 + r] = c[r, m]: 16 rows r at a time, gathered down a column of c */
      float col[PANEL];
      const __m512i down = _mm512_mullo_epi32(
          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          _mm512_set1_epi32((int)ldm));
      for (int m = 0; m < M; m++) {
        for (int r = 0; r < np; r += 16)
          _mm512_storeu_ps(col + r, _mm512_i32gather_ps(down, c + (long)r * ldm + m, 4));
        store_row(col, np, y, y_dt, (long)m * N + n0);
      }
    }
    amx_restore(&saved);
    free(wbuf);
    free(ct);
  }
  free(c_all);
  free(xp);
  return failed ? -2 : 0;
}
#endif /* QAHIRA_AMX */


#if !defined(QAHIRA_W512)
/* Whether this CPU and OS run the AMX build: CPUID reports AMX-TILE and AMX-BF16 (leaf 7, EDX
 * bits 24 and 22) and Linux grants this process the tile data state (arch_prctl
 * ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; idempotent, and what oneDNN asks for too).
 * Compiled in the AVX2 object so it runs on any x86-64. */
int qahira_cpu_amx_ok(void) {
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!((d >> 24) & 1) || !((d >> 22) & 1)) return 0;
#ifdef SYS_arch_prctl
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
  return 0;
#endif
}
#endif
