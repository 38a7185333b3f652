/* CPU kernels for the packed SpQR layer (see spqr/format/layout.py for the layout).
 *
 * y = W_perm x_perm, computed from the stored tensors without materializing W:
 *   spqr_gemv  one input row (token generation). Per 16-row tile and 16-column chunk, the bit-planes
 *              of the codes are used directly as AVX-512 lane masks:
 *                  sum_j q_j x_j = sum_b sum_{j: bit b of q_j set} 2^b x_j
 *              so each plane costs one masked FMA (scale * 2^b x) and no code is ever unpacked.
 *              The zero point enters once per group: - scale * zero * sum(x over the group).
 *   spqr_gemm  M input rows (prefill, batches). Tiles of 64 rows x 128 columns of W are decoded
 *              exactly as the reference decoder does ((code - zero) * scale + outlier delta, fp32)
 *              into a buffer that stays in cache, then multiplied with an 8 x 32 register-blocked
 *              FMA micro-kernel. X comes transposed (Xt [K][Mp]) and Y goes out transposed (Yt [Np][Mp]).
 * Both handle every wbits/qq_bits in 1..8, any beta1 that is a multiple of 16 (the caller checks),
 * any beta2, ragged shapes, fp16 first-level statistics (qq_bits == 0) and int16/int32 outlier columns.
 * Without AVX-512 (or with -DSPQR_PORTABLE) plain C loops compute the same thing.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(SPQR_PORTABLE)
#define SPQR_AVX512 1
#include <immintrin.h>
#else
#define SPQR_AVX512 0
#endif

typedef struct {
    int64_t in_features, out_features;
    int64_t wbits, beta1, beta2, qq_bits; /* qq_bits == 0: first-level statistics stored as fp16 */
    const int32_t *qweight;               /* [out][ceil(in/32)][wbits] bit-planes */
    const int32_t *scale_codes, *zero_codes;               /* [n_groups][ceil(out/32)][qq_bits] */
    const uint16_t *scale_scale, *scale_zero, *zero_scale, *zero_zero; /* fp16 [n_groups][ceil(out/beta2)] */
    const uint16_t *scale_fp16, *zero_fp16;                /* fp16 [n_groups][out] when qq_bits == 0 */
    const int32_t *row_ptr;               /* [out + 1] */
    const void *outlier_col;              /* int16 or int32 [nnz] */
    int64_t outlier_col_int32;
    const uint16_t *outlier_val;          /* fp16 [nnz] */
} spqr_layer;

#define TILE 16 /* output rows per tile: one AVX-512 vector of statistics */

static inline float half_to_float(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static inline int64_t outlier_col(const spqr_layer *L, int64_t p) {
    return L->outlier_col_int32 ? ((const int32_t *)L->outlier_col)[p] : ((const int16_t *)L->outlier_col)[p];
}

/* Code of row r in bit-plane words [ceil(n/32)][bits]. */
static inline int32_t plane_code(const int32_t *words, int64_t bits, int64_t index) {
    const int32_t *w = words + (index / 32) * bits;
    int shift = (int)(index & 31);
    int32_t code = 0;
    for (int64_t b = 0; b < bits; b++) code |= (int32_t)((((uint32_t)w[b]) >> shift) & 1u) << b;
    return code;
}

/* First-level scale and zero of output rows r0 .. r0+n-1 in group g, as the reference decodes them. */
static void tile_stats(const spqr_layer *L, int64_t g, int64_t r0, int n, float *scale, float *zero) {
    const int64_t out = L->out_features, qq = L->qq_bits;
    if (qq == 0) {
        for (int i = 0; i < n; i++) {
            scale[i] = half_to_float(L->scale_fp16[g * out + r0 + i]);
            zero[i] = half_to_float(L->zero_fp16[g * out + r0 + i]);
        }
        return;
    }
    const int64_t words_per_group = ceil_div(out, 32) * qq, n2 = ceil_div(out, L->beta2);
    const int32_t *sc = L->scale_codes + g * words_per_group, *zc = L->zero_codes + g * words_per_group;
    for (int i = 0; i < n; i++) {
        const int64_t r = r0 + i, s2 = g * n2 + r / L->beta2;
        scale[i] = ((float)plane_code(sc, qq, r) - half_to_float(L->scale_zero[s2])) * half_to_float(L->scale_scale[s2]);
        zero[i] = ((float)plane_code(zc, qq, r) - half_to_float(L->zero_zero[s2])) * half_to_float(L->zero_scale[s2]);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Matrix-vector                                                                                   */
/* ---------------------------------------------------------------------------------------------- */

static float outlier_dot(const spqr_layer *L, int64_t r, const float *x) {
    float acc = 0.0f;
    for (int32_t p = L->row_ptr[r]; p < L->row_ptr[r + 1]; p++)
        acc += half_to_float(L->outlier_val[p]) * x[outlier_col(L, p)];
    return acc;
}

/* Plain path for any tile: decode one row at a time. */
static void gemv_tile_plain(const spqr_layer *L, const float *x, float *y, int64_t r0, int n) {
    const int64_t K = L->in_features, n_groups = ceil_div(K, L->beta1), row_words = ceil_div(K, 32) * L->wbits;
    float scale[TILE], zero[TILE], acc[TILE] = {0};
    for (int64_t g = 0; g < n_groups; g++) {
        tile_stats(L, g, r0, n, scale, zero);
        const int64_t c1 = (g + 1) * L->beta1 < K ? (g + 1) * L->beta1 : K;
        for (int i = 0; i < n; i++) {
            const int32_t *row = L->qweight + (r0 + i) * row_words;
            float a = 0.0f;
            for (int64_t c = g * L->beta1; c < c1; c++) a += ((float)plane_code(row, L->wbits, c) - zero[i]) * scale[i] * x[c];
            acc[i] += a;
        }
    }
    for (int i = 0; i < n; i++) y[r0 + i] = acc[i] + outlier_dot(L, r0 + i, x);
}

#if SPQR_AVX512
/* A 16-bit lane mask straight from memory (kmovw k, m16: a load, no trip through a general register). */
static inline __mmask16 load_mask16(const void *p) {
    __mmask16 k;
    __asm__("kmovw %1, %0" : "=k"(k) : "m"(*(const uint16_t *)p));
    return k;
}

/* Where the statistics of one full 16-row tile (r0 a multiple of 16) live; group g is `g * stride` further. */
typedef struct {
    int mode; /* 0: fp16 values, 1: bilevel with one second-level group per tile, 2: bilevel, any beta2 */
    const char *scale_codes, *zero_codes; /* this tile's 16-bit half of the first plane word */
    int64_t code_stride, qq;              /* bytes between groups; planes are 4 bytes apart */
    const uint16_t *scale_scale, *scale_zero, *zero_scale, *zero_zero, *scale_fp16, *zero_fp16;
    int64_t second_stride, fp16_stride;
} tile_cursor;

static tile_cursor tile_cursor_at(const spqr_layer *L, int64_t r0) {
    tile_cursor c;
    memset(&c, 0, sizeof c);
    const int64_t out = L->out_features, qq = L->qq_bits;
    if (qq == 0) {
        c.mode = 0;
        c.scale_fp16 = L->scale_fp16 + r0;
        c.zero_fp16 = L->zero_fp16 + r0;
        c.fp16_stride = out;
        return c;
    }
    c.mode = L->beta2 % TILE == 0 ? 1 : 2;
    c.qq = qq;
    c.code_stride = ceil_div(out, 32) * qq * 4;
    const int64_t code_offset = (r0 / 32) * qq * 4 + ((r0 & 31) / 8);
    c.scale_codes = (const char *)L->scale_codes + code_offset;
    c.zero_codes = (const char *)L->zero_codes + code_offset;
    const int64_t s2 = r0 / L->beta2;
    c.scale_scale = L->scale_scale + s2;
    c.scale_zero = L->scale_zero + s2;
    c.zero_scale = L->zero_scale + s2;
    c.zero_zero = L->zero_zero + s2;
    c.second_stride = ceil_div(out, L->beta2);
    return c;
}

static inline __m512 decode_stat16(const char *codes, int64_t qq, uint16_t second_scale, uint16_t second_zero) {
    __m512i c = _mm512_setzero_si512();
    for (int64_t b = 0; b < qq; b++) c = _mm512_mask_or_epi32(c, load_mask16(codes + 4 * b), c, _mm512_set1_epi32(1 << b));
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(half_to_float(second_zero))),
                         _mm512_set1_ps(half_to_float(second_scale)));
}

/* Scale and zero vectors of the tile at cursor c (from tile_cursor_at(L, r0)) in group g. */
static inline void tile_stats16(const spqr_layer *L, const tile_cursor *c, int64_t g, int64_t r0, __m512 *scale,
                                __m512 *zero) {
    if (c->mode == 0) {
        *scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(c->scale_fp16 + g * c->fp16_stride)));
        *zero = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(c->zero_fp16 + g * c->fp16_stride)));
    } else if (c->mode == 1) {
        const int64_t i2 = g * c->second_stride;
        *scale = decode_stat16(c->scale_codes + g * c->code_stride, c->qq, c->scale_scale[i2], c->scale_zero[i2]);
        *zero = decode_stat16(c->zero_codes + g * c->code_stride, c->qq, c->zero_scale[i2], c->zero_zero[i2]);
    } else {
        float s[TILE], z[TILE];
        tile_stats(L, g, r0, TILE, s, z);
        *scale = _mm512_loadu_ps(s);
        *zero = _mm512_loadu_ps(z);
    }
}

/* A full 16-row tile with WB bits per code (a compile-time constant after inlining). */
static inline __attribute__((always_inline)) void gemv_tile16(const spqr_layer *L, const float *x,
                                                              const float *group_sums, float *y, int64_t r0,
                                                              const int WB) {
    const int64_t K = L->in_features, n_sub = ceil_div(K, 16), row_words = ceil_div(K, 32) * WB;
    const int64_t sub_per_group = L->beta1 / 16;
    __m512 acc[TILE], zero_term = _mm512_setzero_ps();
    for (int i = 0; i < TILE; i++) acc[i] = _mm512_setzero_ps();
    float scale[TILE];
    const char *base = (const char *)(L->qweight + r0 * row_words);
    const tile_cursor cursor = tile_cursor_at(L, r0);
    const int64_t row_bytes = row_words * 4;
    for (int64_t j = 0, g = 0, left_in_group = 0; j < n_sub; j++, left_in_group--) {
        if (left_in_group == 0) {
            left_in_group = sub_per_group;
            g = j / sub_per_group;
            __m512 s, z;
            tile_stats16(L, &cursor, g, r0, &s, &z);
            _mm512_storeu_ps(scale, s);
            zero_term = _mm512_fmadd_ps(_mm512_mul_ps(s, z), _mm512_set1_ps(group_sums[g]), zero_term);
        }
        const __mmask16 valid = (j * 16 + 16 <= K) ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - j * 16)) - 1u);
        __m512 xb[8];
        xb[0] = _mm512_maskz_loadu_ps(valid, x + j * 16);
        for (int b = 1; b < WB; b++) xb[b] = _mm512_add_ps(xb[b - 1], xb[b - 1]);
        /* word (j/2)*WB + b of a row holds plane b of 32 columns; this chunk is its low or high half */
        const char *chunk = base + ((j >> 1) * WB) * 4 + (j & 1) * 2;
#pragma GCC unroll 16
        for (int i = 0; i < TILE; i++) {
            const __m512 s = _mm512_set1_ps(scale[i]);
            const char *w = chunk + i * row_bytes;
#pragma GCC unroll 8
            for (int b = 0; b < WB; b++) {
                const __mmask16 k = load_mask16(w + b * 4);
                acc[i] = _mm512_mask3_fmadd_ps(xb[b], s, acc[i], k);
            }
        }
    }
    float zt[TILE];
    _mm512_storeu_ps(zt, zero_term);
    for (int i = 0; i < TILE; i++)
        y[r0 + i] = _mm512_reduce_add_ps(acc[i]) - zt[i] + outlier_dot(L, r0 + i, x);
}
#endif

int spqr_gemv(const spqr_layer *L, const float *x, float *y, int n_threads) {
    const int64_t N = L->out_features, K = L->in_features, n_groups = ceil_div(K, L->beta1);
    const int64_t n_tiles = ceil_div(N, TILE);
    float *group_sums = (float *)malloc(sizeof(float) * (size_t)n_groups);
    if (!group_sums) return 1;
    for (int64_t g = 0; g < n_groups; g++) {
        float s = 0.0f;
        const int64_t c1 = (g + 1) * L->beta1 < K ? (g + 1) * L->beta1 : K;
        for (int64_t c = g * L->beta1; c < c1; c++) s += x[c];
        group_sums[g] = s;
    }
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t t = 0; t < n_tiles; t++) {
        const int64_t r0 = t * TILE;
        const int n = (int)(N - r0 < TILE ? N - r0 : TILE);
#if SPQR_AVX512
        if (n == TILE && L->beta1 % 16 == 0) {
            switch (L->wbits) {
                case 1: gemv_tile16(L, x, group_sums, y, r0, 1); continue;
                case 2: gemv_tile16(L, x, group_sums, y, r0, 2); continue;
                case 3: gemv_tile16(L, x, group_sums, y, r0, 3); continue;
                case 4: gemv_tile16(L, x, group_sums, y, r0, 4); continue;
                case 5: gemv_tile16(L, x, group_sums, y, r0, 5); continue;
                case 6: gemv_tile16(L, x, group_sums, y, r0, 6); continue;
                case 7: gemv_tile16(L, x, group_sums, y, r0, 7); continue;
                case 8: gemv_tile16(L, x, group_sums, y, r0, 8); continue;
                default: break;
            }
        }
#endif
        gemv_tile_plain(L, x, y, r0, n);
    }
    free(group_sums);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Matrix-matrix                                                                                   */
/* ---------------------------------------------------------------------------------------------- */

#define NB 64  /* rows of W decoded at once */
#define KB 128 /* columns of W decoded at once */

/* Decode W rows r0 .. r0+n-1, columns c0 .. c1-1 into buf [NB][KB] (rows >= n and columns >= c1 zeroed),
 * bit-identical to the reference decoder: (code - zero) * scale, plus the outlier delta. */
static void decode_block(const spqr_layer *L, int64_t r0, int n, int64_t c0, int64_t c1, float *buf) {
    const int64_t K = L->in_features, row_words = ceil_div(K, 32) * L->wbits, beta1 = L->beta1;
    memset(buf, 0, sizeof(float) * NB * KB);
    float scale[TILE], zero[TILE];
    for (int t0 = 0; t0 < n; t0 += TILE) {
        const int tn = n - t0 < TILE ? n - t0 : TILE;
        for (int64_t g = c0 / beta1; g * beta1 < c1; g++) {
#if SPQR_AVX512
            if (tn == TILE) {
                __m512 s, z;
                const tile_cursor cursor = tile_cursor_at(L, r0 + t0);
                tile_stats16(L, &cursor, g, r0 + t0, &s, &z);
                _mm512_storeu_ps(scale, s);
                _mm512_storeu_ps(zero, z);
            } else
#endif
                tile_stats(L, g, r0 + t0, tn, scale, zero);
            const int64_t g0 = g * beta1 > c0 ? g * beta1 : c0;
            const int64_t g1 = (g + 1) * beta1 < c1 ? (g + 1) * beta1 : c1;
            for (int i = 0; i < tn; i++) {
                const int32_t *row = L->qweight + (r0 + t0 + i) * row_words;
                float *dst = buf + (int64_t)(t0 + i) * KB - c0;
#if SPQR_AVX512
                int64_t c = g0;
                const __m512 s = _mm512_set1_ps(scale[i]), z = _mm512_set1_ps(zero[i]);
                for (; c + 16 <= g1 && (c & 15) == 0; c += 16) {
                    const char *w = (const char *)(row + (c >> 5) * L->wbits) + ((c >> 4) & 1) * 2;
                    __m512i q = _mm512_setzero_si512();
                    for (int64_t b = 0; b < L->wbits; b++)
                        q = _mm512_mask_or_epi32(q, load_mask16(w + b * 4), q,
                                                 _mm512_set1_epi32(1 << b));
                    _mm512_storeu_ps(dst + c, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), z), s));
                }
                for (; c < g1; c++) dst[c] = ((float)plane_code(row, L->wbits, c) - zero[i]) * scale[i];
#else
                for (int64_t c = g0; c < g1; c++) dst[c] = ((float)plane_code(row, L->wbits, c) - zero[i]) * scale[i];
#endif
            }
        }
    }
    for (int i = 0; i < n; i++) {
        const int64_t r = r0 + i;
        for (int32_t p = L->row_ptr[r]; p < L->row_ptr[r + 1]; p++) {
            const int64_t c = outlier_col(L, p);
            if (c >= c0 && c < c1) buf[(int64_t)i * KB + (c - c0)] += half_to_float(L->outlier_val[p]);
        }
    }
}

/* Yt[r0 + i][m] += sum_k buf[i][k] * Xt[c0 + k][m] for i < NB, k < kn, m < Mp (Mp a multiple of 16). */
static void block_multiply(const float *buf, const float *xt, float *yt, int64_t Mp, int64_t r0, int64_t c0,
                           int64_t kn) {
#if SPQR_AVX512
    for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
        const int two = m0 + 32 <= Mp;
        for (int i0 = 0; i0 < NB; i0 += 8) {
            __m512 a0[8], a1[8];
            float *yrow = yt + (r0 + i0) * Mp + m0;
            for (int i = 0; i < 8; i++) {
                a0[i] = _mm512_loadu_ps(yrow + i * Mp);
                a1[i] = two ? _mm512_loadu_ps(yrow + i * Mp + 16) : _mm512_setzero_ps();
            }
            const float *w = buf + (int64_t)i0 * KB;
            const float *x = xt + c0 * Mp + m0;
            if (two) {
                for (int64_t k = 0; k < kn; k++) {
                    const __m512 x0 = _mm512_loadu_ps(x + k * Mp), x1 = _mm512_loadu_ps(x + k * Mp + 16);
                    for (int i = 0; i < 8; i++) {
                        const __m512 wv = _mm512_set1_ps(w[i * KB + k]);
                        a0[i] = _mm512_fmadd_ps(wv, x0, a0[i]);
                        a1[i] = _mm512_fmadd_ps(wv, x1, a1[i]);
                    }
                }
            } else {
                for (int64_t k = 0; k < kn; k++) {
                    const __m512 x0 = _mm512_loadu_ps(x + k * Mp);
                    for (int i = 0; i < 8; i++) a0[i] = _mm512_fmadd_ps(_mm512_set1_ps(w[i * KB + k]), x0, a0[i]);
                }
            }
            for (int i = 0; i < 8; i++) {
                _mm512_storeu_ps(yrow + i * Mp, a0[i]);
                if (two) _mm512_storeu_ps(yrow + i * Mp + 16, a1[i]);
            }
        }
    }
#else
    for (int i = 0; i < NB; i++) {
        float *yrow = yt + (r0 + i) * Mp;
        for (int64_t k = 0; k < kn; k++) {
            const float wv = buf[(int64_t)i * KB + k];
            const float *x = xt + (c0 + k) * Mp;
            for (int64_t m = 0; m < Mp; m++) yrow[m] += wv * x[m];
        }
    }
#endif
}

/* xt: [K][Mp] (X transposed, Mp a multiple of 16); yt: [ceil(N/64)*64][Mp], zero-initialized by the caller. */
int spqr_gemm(const spqr_layer *L, int64_t Mp, const float *xt, float *yt, int n_threads) {
    const int64_t N = L->out_features, K = L->in_features, n_blocks = ceil_div(N, NB);
    if (Mp % 16 != 0) return 2;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *buf = (float *)aligned_alloc(64, sizeof(float) * NB * KB);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_blocks; blk++) {
            if (!buf) continue;
            const int64_t r0 = blk * NB;
            const int n = (int)(N - r0 < NB ? N - r0 : NB);
            for (int64_t c0 = 0; c0 < K; c0 += KB) {
                const int64_t c1 = c0 + KB < K ? c0 + KB : K;
                decode_block(L, r0, n, c0, c1, buf);
                block_multiply(buf, xt, yt, Mp, r0, c0, c1 - c0);
            }
        }
        free(buf);
    }
    return failed;
}

int spqr_has_avx512(void) { return SPQR_AVX512; }
