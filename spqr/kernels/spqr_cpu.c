/* CPU kernels for the packed SpQR layer (see spqr/format/layout.py for the layout).
 *
 * y = W_perm x_perm, computed from the stored tensors without materializing W:
 *   spqr_gemv  one input row (token generation), by table lookup: for every 4 columns a table of the
 *              16 possible sums of their x values is built once per call; then for each 16-row tile,
 *              each bit-plane and each 4 columns, one permute picks all 16 rows' partial sums
 *                  sum_j q_j x_j = sum_b 2^b sum_{j: bit b of q_j set} x_j
 *              so no code is ever unpacked and all arithmetic stays fp32. The zero point enters once
 *              per group: - scale * zero * sum(x over the group).
 *   spqr_gemm  M input rows (prefill, batches). X is copied into panels of 32 rows (permutation
 *              applied); tiles of up to 192 rows x 128 columns of W are decoded exactly as the
 *              reference decoder does ((code - zero) * scale + outlier delta, fp32) into a buffer
 *              that stays in cache and multiplied with a 6 x 64 register-blocked FMA micro-kernel.
 *   spqr_gemm_amx  the same on the AMX tile unit (Sapphire Rapids and later): codes as bf16 times x
 *              split into three bf16 parts, exact products summed in fp32 (see its section).
 * All three handle every wbits/qq_bits in 1..8, any beta1 that is a multiple of 16 (the caller checks),
 * any beta2, ragged shapes, fp16 first-level statistics (qq_bits == 0) and int16/int32 outlier columns.
 * Without AVX-512 (or with -DSPQR_PORTABLE) plain C loops compute the same thing.
 */
#define _GNU_SOURCE /* syscall() */
#include <pthread.h>
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
    const int32_t *qweight;               /* [ceil(out/16)][ceil(in/32)][wbits][16] bit-planes, 16 rows interleaved */
    const int32_t *scale_codes, *zero_codes;               /* [ceil(out/32)][n_groups][qq_bits] */
    const uint16_t *scale_scale, *scale_zero, *zero_scale, *zero_zero; /* fp16 [ceil(out/beta2)][n_groups] */
    const uint16_t *scale_fp16, *zero_fp16;                /* fp16 [n_groups][out] when qq_bits == 0 */
    const int32_t *row_ptr;               /* [out + 1] */
    const void *outlier_col;              /* int16 or int32 [nnz] */
    int64_t outlier_col_int32;
    const uint16_t *outlier_val;          /* fp16 [nnz] */
    const void *perm;                     /* int16 or int32 [in], or NULL: x_perm[k] = x[perm[k]] */
    int64_t perm_int32;
} spqr_layer;

#define TILE 16 /* output rows per tile: one AVX-512 vector of statistics */
#define PREFETCH_CHUNKS 16 /* the matrix-vector kernel prefetches weights this many 32-column chunks ahead */

static inline float half_to_float(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static inline int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int64_t perm_index(const spqr_layer *L, int64_t k) {
    if (!L->perm) return k;
    return L->perm_int32 ? ((const int32_t *)L->perm)[k] : ((const int16_t *)L->perm)[k];
}

static inline int64_t outlier_col(const spqr_layer *L, int64_t p) {
    return L->outlier_col_int32 ? ((const int32_t *)L->outlier_col)[p] : ((const int16_t *)L->outlier_col)[p];
}

/* Code `index` of bit-plane words [ceil(n/32)][bits], whose chunks lie `stride` words apart. */
static inline int32_t plane_code_strided(const int32_t *words, int64_t bits, int64_t index, int64_t stride) {
    const int32_t *w = words + (index / 32) * stride;
    int shift = (int)(index & 31);
    int32_t code = 0;
    for (int64_t b = 0; b < bits; b++) code |= (int32_t)((((uint32_t)w[b]) >> shift) & 1u) << b;
    return code;
}

/* Weight code of row r, column c. */
static inline int32_t weight_code(const spqr_layer *L, int64_t r, int64_t c) {
    const int32_t *w = L->qweight + (((r / TILE) * ceil_div(L->in_features, 32) + c / 32) * L->wbits) * TILE + r % TILE;
    int32_t code = 0;
    for (int64_t b = 0; b < L->wbits; b++) code |= (int32_t)((((uint32_t)w[b * TILE]) >> (c & 31)) & 1u) << b;
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
    const int64_t n_groups = ceil_div(L->in_features, L->beta1);
    const int32_t *sc = L->scale_codes + g * qq, *zc = L->zero_codes + g * qq;
    for (int i = 0; i < n; i++) {
        const int64_t r = r0 + i, s2 = (r / L->beta2) * n_groups + g;
        scale[i] = ((float)plane_code_strided(sc, qq, r, n_groups * qq) - half_to_float(L->scale_zero[s2])) *
                   half_to_float(L->scale_scale[s2]);
        zero[i] = ((float)plane_code_strided(zc, qq, r, n_groups * qq) - half_to_float(L->zero_zero[s2])) *
                  half_to_float(L->zero_scale[s2]);
    }
}

/* The matrix-vector and AMX kernels' scratch (copies of x, tables, per-thread buffers) lives in one buffer kept
 * between calls (it grows to the largest call): fresh pages cost as much as a tenth of an AMX prefill matmul,
 * and the table of a wide layer is big enough to be mapped afresh on every call otherwise. A call that finds it
 * in use gets a private buffer. (The AVX-512 matrix kernel measured no faster with it.) */
typedef struct {
    char *ptr;
    int shared;
} workspace;
static char *shared_workspace;
static size_t shared_workspace_bytes;
static pthread_mutex_t shared_workspace_lock = PTHREAD_MUTEX_INITIALIZER;

/* A region's footprint in the workspace: whole cache lines and 5 more, so that consecutive regions don't start
 * at the same offset modulo 4 KiB (where loads and stores 4 KiB apart would slow each other down). */
static inline size_t region(size_t bytes) { return (bytes + 63) / 64 * 64 + 5 * 64; }

static workspace workspace_acquire(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (pthread_mutex_trylock(&shared_workspace_lock) != 0) return (workspace){(char *)aligned_alloc(64, bytes), 0};
    if (shared_workspace_bytes < bytes) {
        free(shared_workspace);
        shared_workspace = (char *)aligned_alloc(64, bytes);
        shared_workspace_bytes = shared_workspace ? bytes : 0;
    }
    if (!shared_workspace) {
        pthread_mutex_unlock(&shared_workspace_lock);
        return (workspace){NULL, 0};
    }
    return (workspace){shared_workspace, 1};
}

static void workspace_release(workspace ws) {
    if (ws.shared) pthread_mutex_unlock(&shared_workspace_lock);
    else free(ws.ptr);
}

/* Frees the kept workspace (e.g. after a long prompt). */
void spqr_release_workspace(void) {
    pthread_mutex_lock(&shared_workspace_lock);
    free(shared_workspace);
    shared_workspace = NULL;
    shared_workspace_bytes = 0;
    pthread_mutex_unlock(&shared_workspace_lock);
}

/* ---------------------------------------------------------------------------------------------- */
/* Matrix-vector                                                                                   */
/* ---------------------------------------------------------------------------------------------- */
/* Below, x is always in the sweep's column order (x_perm); the entry points gather it. */

/* sum over row r's outliers of delta * x[col] */
static float outlier_dot(const spqr_layer *L, int64_t r, const float *x) {
    int32_t p = L->row_ptr[r];
    const int32_t end = L->row_ptr[r + 1];
    float acc = 0.0f;
#if SPQR_AVX512
    __m512 vacc = _mm512_setzero_ps();
    for (; p < end; p += 16) {
        const __mmask16 k = end - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - p)) - 1u);
        const __m512i cols = L->outlier_col_int32
            ? _mm512_maskz_loadu_epi32(k, (const int32_t *)L->outlier_col + p)
            : _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, (const int16_t *)L->outlier_col + p));
        const __m512 vals = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, L->outlier_val + p));
        vacc = _mm512_fmadd_ps(vals, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, cols, x, 4), vacc);
    }
    acc = _mm512_reduce_add_ps(vacc);
#endif
    for (; p < end; p++) acc += half_to_float(L->outlier_val[p]) * x[outlier_col(L, p)];
    return acc;
}

/* Plain path for any tile: decode one row at a time. */
static void gemv_tile_plain(const spqr_layer *L, const float *x, float *y, int64_t r0, int n) {
    const int64_t K = L->in_features, n_groups = ceil_div(K, L->beta1);
    float scale[TILE], zero[TILE], acc[TILE] = {0};
    for (int64_t g = 0; g < n_groups; g++) {
        tile_stats(L, g, r0, n, scale, zero);
        const int64_t c1 = (g + 1) * L->beta1 < K ? (g + 1) * L->beta1 : K;
        for (int i = 0; i < n; i++) {
            float a = 0.0f;
            for (int64_t c = g * L->beta1; c < c1; c++) a += ((float)weight_code(L, r0 + i, c) - zero[i]) * scale[i] * x[c];
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
    const int64_t n_groups = ceil_div(L->in_features, L->beta1);
    c.code_stride = qq * 4;
    const int64_t code_offset = (r0 / 32) * n_groups * qq * 4 + ((r0 & 31) / 8);
    c.scale_codes = (const char *)L->scale_codes + code_offset;
    c.zero_codes = (const char *)L->zero_codes + code_offset;
    const int64_t s2 = (r0 / L->beta2) * n_groups;
    c.scale_scale = L->scale_scale + s2;
    c.scale_zero = L->scale_zero + s2;
    c.zero_scale = L->zero_scale + s2;
    c.zero_zero = L->zero_zero + s2;
    c.second_stride = 1;
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

/* Bilevel statistics of one 16-row tile (mode 1) as coefficients per group g, [2 qq + 2][n_groups]:
 *   scale(g)            = sum over the set bits b of the scale code of coef[b][g]          + coef[qq][g]
 *   zero(g) * xsum(g)   = sum over the set bits b of the zero code of coef[qq + 1 + b][g]  + coef[2 qq + 1][g]
 * with coef[b] = 2^b * second-level scale, coef[qq] = -second-level zero * scale (zero: the same, times the
 * group's sum of x). The matrix-vector kernel then decodes a statistic with qq masked adds. */
static void bilevel_coefficients(const spqr_layer *L, int64_t r0, const float *group_sums, float *coef) {
    const int64_t n_groups = ceil_div(L->in_features, L->beta1), qq = L->qq_bits, s2 = (r0 / L->beta2) * n_groups;
    for (int64_t g = 0; g < n_groups; g += 16) {
        const __mmask16 k = n_groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n_groups - g)) - 1u);
        const __m512 xsum = _mm512_maskz_loadu_ps(k, group_sums + g);
        for (int stat = 0; stat < 2; stat++) {
            const uint16_t *second_scale = stat ? L->zero_scale : L->scale_scale;
            const uint16_t *second_zero = stat ? L->zero_zero : L->scale_zero;
            __m512 unit = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, second_scale + s2 + g));
            const __m512 offset = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, second_zero + s2 + g)), unit);
            float *c = coef + stat * (qq + 1) * n_groups + g;
            if (stat) unit = _mm512_mul_ps(unit, xsum);
            _mm512_mask_storeu_ps(c + qq * n_groups, k, stat ? _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(offset, xsum))
                                                             : _mm512_sub_ps(_mm512_setzero_ps(), offset));
            for (int64_t b = 0; b < qq; b++, unit = _mm512_add_ps(unit, unit)) _mm512_mask_storeu_ps(c + b * n_groups, k, unit);
        }
    }
}

/* Ask early for what a tile reads outside its weight stream (measured: 4-5% faster with cold caches): this tile's
 * outliers, read at its end, and (bilevel statistics with beta2 | 16) the next tile's second level, read at its
 * start. */
static inline void prefetch_tile_extras(const spqr_layer *L, int64_t r0, int64_t n_groups, int bilevel) {
    const int32_t p0 = L->row_ptr[r0], p1 = L->row_ptr[r0 + TILE];
    const int64_t col_bytes = L->outlier_col_int32 ? 4 : 2;
    for (int64_t p = p0; p < p1; p += 32) {
        _mm_prefetch((const char *)L->outlier_col + p * col_bytes, _MM_HINT_T0);
        _mm_prefetch((const char *)(L->outlier_val + p), _MM_HINT_T0);
    }
    if (!bilevel || r0 + 2 * TILE > L->out_features || (r0 + TILE) % L->beta2) return; /* none, or already read */
    const int64_t s2 = ((r0 + TILE) / L->beta2) * n_groups;
    const uint16_t *second[4] = {L->scale_scale + s2, L->scale_zero + s2, L->zero_scale + s2, L->zero_zero + s2};
    for (int a = 0; a < 4; a++)
        for (int64_t g = 0; g < n_groups; g += 32) _mm_prefetch((const char *)(second[a] + g), _MM_HINT_T0);
}

/* sum over the set bits b (mask from the 16-bit half-words at codes + 4 b) of coef[b * stride] + coef[qq * stride] */
static inline __m512 masked_sum16(const char *codes, int64_t qq, const float *coef, int64_t stride) {
    __m512 v = _mm512_set1_ps(coef[qq * stride]);
    for (int64_t b = 0; b < qq; b++) v = _mm512_mask_add_ps(v, load_mask16(codes + 4 * b), v, _mm512_set1_ps(coef[b * stride]));
    return v;
}

/* A full 16-row tile with WB bits per code (a compile-time constant after inlining), by table lookup.
 * lut[q][p] = sum of x[4q + j] over the bits j set in p (see spqr_gemv), so for each bit-plane b the 4-bit
 * slices of the 16 rows' plane words pick, with one permute per 4 columns, the partial dot products
 * s_b = sum_j bit_b(code_j) x_j of all 16 rows at once; sum_j code_j x_j = sum_b 2^b s_b (Horner).
 * coef: scratch of [2 qq + 2][n_groups] floats for bilevel_coefficients. */
static inline __attribute__((always_inline)) void gemv_tile16(const spqr_layer *L, const float *lut, const float *x,
                                                              const float *group_sums, float *coef, float *y,
                                                              int64_t r0, const int WB) {
    const int64_t K = L->in_features, n_chunks = ceil_div(K, 32), beta1 = L->beta1;
    const int64_t n_groups = ceil_div(K, beta1), qq = L->qq_bits;
    const int32_t *tile = L->qweight + (r0 / TILE) * n_chunks * WB * TILE;
    const tile_cursor cursor = tile_cursor_at(L, r0);
    prefetch_tile_extras(L, r0, n_groups, cursor.mode == 1);
    if (cursor.mode == 1) bilevel_coefficients(L, r0, group_sums, coef);
    const __m512 two = _mm512_set1_ps(2.0f);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, zero_term = _mm512_setzero_ps();
    __m512 scale = _mm512_setzero_ps();
    int64_t loaded_group = -1;
    for (int64_t c = 0; c < n_chunks; c++) {
        const int32_t *planes = tile + c * WB * TILE;
        for (int b = 0; b < WB; b++) /* measured: 20% faster when the weights are not in cache */
            _mm_prefetch((const char *)(planes + PREFETCH_CHUNKS * WB * TILE + b * TILE), _MM_HINT_T0);
        for (int h = 0; h < 2 && 32 * c + 16 * h < K; h++) { /* columns 32c + 16h .. +15: one group */
            const int64_t g = (32 * c + 16 * h) / beta1;
            if (g != loaded_group) {
                __m512 zero_xsum; /* zero * (sum of x over the group) */
                if (cursor.mode == 1) {
                    scale = masked_sum16(cursor.scale_codes + g * cursor.code_stride, qq, coef + g, n_groups);
                    zero_xsum = masked_sum16(cursor.zero_codes + g * cursor.code_stride, qq,
                                             coef + (qq + 1) * n_groups + g, n_groups);
                } else {
                    tile_stats16(L, &cursor, g, r0, &scale, &zero_xsum);
                    zero_xsum = _mm512_mul_ps(zero_xsum, _mm512_set1_ps(group_sums[g]));
                }
                zero_term = _mm512_fmadd_ps(scale, zero_xsum, zero_term);
                loaded_group = g;
            }
            const float *table = lut + (c * 8 + h * 4) * 16;
            const __m512 t0 = _mm512_load_ps(table), t1 = _mm512_load_ps(table + 16);
            const __m512 t2 = _mm512_load_ps(table + 32), t3 = _mm512_load_ps(table + 48);
            __m512 dot = _mm512_setzero_ps(); /* sum_j code_j x_j of the 16 rows over these 16 columns */
#pragma GCC unroll 8
            for (int b = WB - 1; b >= 0; b--) {
                __m512i v = _mm512_loadu_si512(planes + b * TILE);
                if (h) v = _mm512_srli_epi32(v, 16);
                /* permutes read the low 4 bits of each lane: no masking needed */
                const __m512 sum = _mm512_add_ps(
                    _mm512_add_ps(_mm512_permutexvar_ps(v, t0), _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t1)),
                    _mm512_add_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), t2),
                                  _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), t3)));
                dot = b == WB - 1 ? sum : _mm512_fmadd_ps(dot, two, sum);
            }
            acc[h] = _mm512_fmadd_ps(dot, scale, acc[h]);
        }
    }
    float result[TILE];
    _mm512_storeu_ps(result, _mm512_sub_ps(_mm512_add_ps(acc[0], acc[1]), zero_term));
    for (int i = 0; i < TILE; i++) y[r0 + i] = result[i] + outlier_dot(L, r0 + i, x);
}

/* lut [8 ceil(K/32)][16]: lut[q][p] = sum over the bits j of p of x[4q + j] (x zero past K). */
static void build_lut(const float *x, int64_t K, float *lut) {
    __m512 bit[4];
    for (int j = 0; j < 4; j++) {
        float v[16];
        for (int p = 0; p < 16; p++) v[p] = (float)((p >> j) & 1);
        bit[j] = _mm512_loadu_ps(v);
    }
    for (int64_t q = 0; q < 8 * ceil_div(K, 32); q++) {
        __m512 t = _mm512_setzero_ps();
        for (int j = 0; j < 4; j++)
            if (4 * q + j < K) t = _mm512_fmadd_ps(_mm512_set1_ps(x[4 * q + j]), bit[j], t);
        _mm512_store_ps(lut + q * 16, t);
    }
}
#endif

/* y [N] = W x for one input row x [K] (original column order). */
int spqr_gemv(const spqr_layer *L, const float *x_in, float *y, int n_threads) {
    const int64_t N = L->out_features, K = L->in_features, n_groups = ceil_div(K, L->beta1);
    const int64_t n_tiles = ceil_div(N, TILE);
    int use_lut = 0; /* the table-lookup path (full 16-row tiles, beta1 a multiple of 16) */
#if SPQR_AVX512
    use_lut = L->beta1 % 16 == 0 && N >= TILE;
#endif
    /* workspace: group sums, x in the sweep's column order, the table, each thread's coefficients */
    const size_t sums_bytes = region(sizeof(float) * (size_t)(n_groups + K));
    const size_t lut_bytes = use_lut ? region(sizeof(float) * 16 * 8 * (size_t)ceil_div(K, 32)) : 0;
    const size_t coef_bytes = use_lut ? region(sizeof(float) * (size_t)((2 * L->qq_bits + 2) * n_groups)) : 0;
    workspace ws = workspace_acquire(sums_bytes + lut_bytes + (size_t)n_threads * coef_bytes);
    if (!ws.ptr) return 1;
    float *group_sums = (float *)ws.ptr, *x = group_sums + n_groups;
    for (int64_t k = 0; k < K; k++) x[k] = x_in[perm_index(L, k)];
    for (int64_t g = 0; g < n_groups; g++) {
        float s = 0.0f;
        const int64_t c1 = (g + 1) * L->beta1 < K ? (g + 1) * L->beta1 : K;
        for (int64_t c = g * L->beta1; c < c1; c++) s += x[c];
        group_sums[g] = s;
    }
    float *lut = use_lut ? (float *)(ws.ptr + sums_bytes) : NULL;
#if SPQR_AVX512
    if (use_lut) build_lut(x, K, lut);
#else
    (void)lut;
#endif
#pragma omp parallel num_threads(n_threads)
    {
        float *coef = use_lut ? (float *)(ws.ptr + sums_bytes + lut_bytes + (size_t)thread_index() * coef_bytes) : NULL;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; t++) {
            const int64_t r0 = t * TILE;
            const int n = (int)(N - r0 < TILE ? N - r0 : TILE);
#if SPQR_AVX512
#define GEMV_CASE(WB) case WB: gemv_tile16(L, lut, x, group_sums, coef, y, r0, WB); continue;
            if (use_lut && n == TILE) {
                switch (L->wbits) { GEMV_CASE(1) GEMV_CASE(2) GEMV_CASE(3) GEMV_CASE(4)
                                    GEMV_CASE(5) GEMV_CASE(6) GEMV_CASE(7) GEMV_CASE(8) default: break; }
            }
#undef GEMV_CASE
#endif
            gemv_tile_plain(L, x, y, r0, n);
        }
        (void)coef;
    }
    workspace_release(ws);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Matrix-matrix                                                                                   */
/* ---------------------------------------------------------------------------------------------- */

#define NB 192 /* most rows of W decoded at once (fewer when that would leave threads idle); 16, 6 and MR divide it */
#define KB 128 /* columns of W decoded at once */
#define MR 12  /* micro-kernel: MR rows of W x 32 rows of X (24 accumulators) */

#if SPQR_AVX512
/* Bit `from` of each lane moved to bit `to` (other bits garbage; the caller masks). */
static inline __m512i move_bit(__m512i v, int from, int to) {
    return from >= to ? _mm512_srli_epi32(v, from - to) : _mm512_slli_epi32(v, to - from);
}

/* Columns c0 .. c1-1 (c0 a multiple of 32) of the full 16-row tile at r0, decoded column by column with
 * the 16 rows in the lanes (the interleaved layout gives each plane of all 16 rows as one vector):
 * column k goes to dst[(k - c0) * nb + 0..15]. */
static inline __attribute__((always_inline)) void decode_tile16(const spqr_layer *L, const tile_cursor *cursor,
                                                                int64_t r0, int64_t c0, int64_t c1, float *dst,
                                                                int nb, const int WB) {
    const int64_t beta1 = L->beta1;
    const int32_t *tile = L->qweight + (r0 / TILE) * ceil_div(L->in_features, 32) * WB * TILE;
    int64_t loaded_group = -1;
    __m512 scale = _mm512_setzero_ps(), zero = _mm512_setzero_ps();
    for (int64_t c = c0 / 32; c * 32 < c1; c++) {
        __m512i planes[8];
        for (int b = 0; b < WB; b++) planes[b] = _mm512_loadu_si512(tile + (c * WB + b) * TILE);
#pragma GCC unroll 32
        for (int j = 0; j < 32; j++) {
            const int64_t col = 32 * c + j;
            if (col >= c1) break;
            if (j % 16 == 0 && col / beta1 != loaded_group) {
                loaded_group = col / beta1;
                tile_stats16(L, cursor, loaded_group, r0, &scale, &zero);
            }
            __m512i q = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int b = 0; b < WB; b++) /* q |= bit j of plane b, at bit b */
                q = _mm512_ternarylogic_epi32(q, move_bit(planes[b], j, b), _mm512_set1_epi32(1 << b), 0xF8);
            _mm512_storeu_ps(dst + (col - c0) * nb, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), zero), scale));
        }
    }
}
#endif

/* Decode W rows r0 .. r0+n-1 (n <= nb), columns c0 .. c1-1 into buf [KB][nb], transposed (row i of column k
 * at buf[k * nb + i]; rows >= n, columns >= c1 zeroed), bit-identical to the reference decoder:
 * (code - zero) * scale, plus the outlier delta.
 * next_outlier[i] is row r0+i's first outlier not yet applied; blocks must come in increasing c0. */
static void decode_block(const spqr_layer *L, int64_t r0, int n, int nb, int64_t c0, int64_t c1, float *buf,
                         int32_t *next_outlier) {
    const int64_t beta1 = L->beta1;
    if (n < nb || c1 - c0 < KB) memset(buf, 0, sizeof(float) * nb * KB);
    for (int t0 = 0; t0 < n; t0 += TILE) {
        const int tn = n - t0 < TILE ? n - t0 : TILE;
#if SPQR_AVX512
        if (tn == TILE) {
            const tile_cursor cursor = tile_cursor_at(L, r0 + t0);
            float *dst = buf + t0;
            switch (L->wbits) {
                case 1: decode_tile16(L, &cursor, r0 + t0, c0, c1, dst, nb, 1); continue;
                case 2: decode_tile16(L, &cursor, r0 + t0, c0, c1, dst, nb, 2); continue;
                case 3: decode_tile16(L, &cursor, r0 + t0, c0, c1, dst, nb, 3); continue;
                case 4: decode_tile16(L, &cursor, r0 + t0, c0, c1, dst, nb, 4); continue;
                case 5: decode_tile16(L, &cursor, r0 + t0, c0, c1, dst, nb, 5); continue;
                case 6: decode_tile16(L, &cursor, r0 + t0, c0, c1, dst, nb, 6); continue;
                case 7: decode_tile16(L, &cursor, r0 + t0, c0, c1, dst, nb, 7); continue;
                case 8: decode_tile16(L, &cursor, r0 + t0, c0, c1, dst, nb, 8); continue;
                default: break;
            }
        }
#endif
        float scale[TILE], zero[TILE];
        for (int64_t g = c0 / beta1; g * beta1 < c1; g++) {
            tile_stats(L, g, r0 + t0, tn, scale, zero);
            const int64_t g0 = g * beta1 > c0 ? g * beta1 : c0;
            const int64_t g1 = (g + 1) * beta1 < c1 ? (g + 1) * beta1 : c1;
            for (int i = 0; i < tn; i++) {
                for (int64_t c = g0; c < g1; c++)
                    buf[(c - c0) * nb + t0 + i] = ((float)weight_code(L, r0 + t0 + i, c) - zero[i]) * scale[i];
            }
        }
    }
    for (int i = 0; i < n; i++) {
        int32_t p = next_outlier[i];
        const int32_t end = L->row_ptr[r0 + i + 1];
        for (; p < end && outlier_col(L, p) < c1; p++)
            buf[(outlier_col(L, p) - c0) * nb + i] += half_to_float(L->outlier_val[p]);
        next_outlier[i] = p;
    }
}

/* acc[i][m] += sum_k buf[k][i] * X[m][c0 + k] for i < nb, k < kn, m < Mp. acc is [nb][Mp]; X comes in panels
 * of 32 rows, xp[p][k][j] = X[32 p + j][k], so the micro-kernel reads contiguous memory. */
static void block_multiply(const float *buf, int nb, const float *xp, float *acc, int64_t K, int64_t Mp,
                           int64_t c0, int64_t kn) {
    int64_t m_start = 0;
#if SPQR_AVX512
    /* 6 rows of W x 64 rows of X (two panels) where there are 64: 10 loads per 24 FMAs instead of 14
     * (measured: 12% faster at 512 rows); the 12 x 32 kernel below takes a last 32 rows */
    for (; m_start + 64 <= Mp; m_start += 64) {
        const float *pa = xp + (m_start / 32) * K * 32 + c0 * 32, *pb = pa + K * 32;
        for (int i0 = 0; i0 < nb; i0 += 6) {
            float *arow = acc + (int64_t)i0 * Mp + m_start;
            const float *w = buf + i0;
            __m512 a[6][4];
            for (int i = 0; i < 6; i++)
                for (int q = 0; q < 4; q++) a[i][q] = _mm512_loadu_ps(arow + i * Mp + 16 * q);
            for (int64_t k = 0; k < kn; k++) {
                const __m512 x0 = _mm512_loadu_ps(pa + k * 32), x1 = _mm512_loadu_ps(pa + k * 32 + 16);
                const __m512 x2 = _mm512_loadu_ps(pb + k * 32), x3 = _mm512_loadu_ps(pb + k * 32 + 16);
#pragma GCC unroll 6
                for (int i = 0; i < 6; i++) {
                    const __m512 wv = _mm512_set1_ps(w[k * nb + i]);
                    a[i][0] = _mm512_fmadd_ps(wv, x0, a[i][0]);
                    a[i][1] = _mm512_fmadd_ps(wv, x1, a[i][1]);
                    a[i][2] = _mm512_fmadd_ps(wv, x2, a[i][2]);
                    a[i][3] = _mm512_fmadd_ps(wv, x3, a[i][3]);
                }
            }
            for (int i = 0; i < 6; i++)
                for (int q = 0; q < 4; q++) _mm512_storeu_ps(arow + i * Mp + 16 * q, a[i][q]);
        }
    }
#endif
    for (int64_t m0 = m_start; m0 < Mp; m0 += 32) {
        const float *panel = xp + (m0 / 32) * K * 32 + c0 * 32;
        for (int i0 = 0; i0 < nb; i0 += MR) {
            float *arow = acc + (int64_t)i0 * Mp + m0;
            const float *w = buf + i0; /* row i0 + i of column k: w[k * nb + i] */
#if SPQR_AVX512
            __m512 a0[MR], a1[MR];
            for (int i = 0; i < MR; i++) {
                a0[i] = _mm512_loadu_ps(arow + i * Mp);
                a1[i] = _mm512_loadu_ps(arow + i * Mp + 16);
            }
            for (int64_t k = 0; k < kn; k++) {
                const __m512 x0 = _mm512_loadu_ps(panel + k * 32), x1 = _mm512_loadu_ps(panel + k * 32 + 16);
#pragma GCC unroll 16
                for (int i = 0; i < MR; i++) {
                    const __m512 wv = _mm512_set1_ps(w[k * nb + i]);
                    a0[i] = _mm512_fmadd_ps(wv, x0, a0[i]);
                    a1[i] = _mm512_fmadd_ps(wv, x1, a1[i]);
                }
            }
            for (int i = 0; i < MR; i++) {
                _mm512_storeu_ps(arow + i * Mp, a0[i]);
                _mm512_storeu_ps(arow + i * Mp + 16, a1[i]);
            }
#else
            for (int i = 0; i < MR; i++)
                for (int64_t k = 0; k < kn; k++) {
                    const float wv = w[k * nb + i];
                    for (int j = 0; j < 32; j++) arow[i * Mp + j] += wv * panel[k * 32 + j];
                }
#endif
        }
    }
}

/* y [M][N] = x [M][K] W^T (x in the original column order). */
int spqr_gemm(const spqr_layer *L, int64_t M, const float *x, float *y, int n_threads) {
    const int64_t N = L->out_features, K = L->in_features, Mp = ceil_div(M, 32) * 32;
    int nb = NB; /* large blocks reuse each panel of X more; smaller ones keep every thread busy */
    while (nb > 48 && ceil_div(N, nb) < 4 * (int64_t)n_threads) nb /= 2; /* 192, 96, 48 */
    const int64_t n_blocks = ceil_div(N, nb);
    float *xp = (float *)aligned_alloc(64, sizeof(float) * (size_t)(Mp * K));
    if (!xp) return 1;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        /* panels of X with the permutation applied, in chunks of 64 columns; rows >= M are zero */
        const int64_t k_chunks = ceil_div(K, 64);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < (Mp / 32) * k_chunks; task++) {
            const int64_t p = task / k_chunks, k0 = (task % k_chunks) * 64, k1 = k0 + 64 < K ? k0 + 64 : K;
            float *panel = xp + p * K * 32;
            const float *rows = x + p * 32 * K; /* this panel's first row of x */
            int32_t column[64];               /* the input column of each of the chunk's columns */
            for (int64_t k = k0; k < k1; k++) column[k - k0] = (int32_t)perm_index(L, k);
#if SPQR_AVX512
            /* per column, the 32 rows' values as two gathers (rows >= M masked to zero) */
            const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            const __m512i row_lo = _mm512_mullo_epi32(lanes, _mm512_set1_epi32((int)K));
            const __m512i row_hi = _mm512_add_epi32(row_lo, _mm512_set1_epi32((int)(16 * K)));
            const int64_t valid = M - p * 32;
            const __mmask16 lo = valid >= 16 ? 0xFFFF : (__mmask16)((1u << valid) - 1u);
            const __mmask16 hi = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : (__mmask16)((1u << (valid - 16)) - 1u);
            for (int64_t k = k0; k < k1; k++) {
                const __m512i c = _mm512_set1_epi32(column[k - k0]);
                _mm512_storeu_ps(panel + k * 32, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lo, _mm512_add_epi32(row_lo, c), rows, 4));
                _mm512_storeu_ps(panel + k * 32 + 16,
                                 _mm512_mask_i32gather_ps(_mm512_setzero_ps(), hi, _mm512_add_epi32(row_hi, c), rows, 4));
            }
#else
            for (int64_t j = 0; j < 32; j++)
                for (int64_t k = k0; k < k1; k++) panel[k * 32 + j] = p * 32 + j < M ? rows[j * K + column[k - k0]] : 0.0f;
#endif
        }
        float *buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)(nb * KB));
        float *acc = (float *)aligned_alloc(64, sizeof(float) * (size_t)(nb * Mp));
        int32_t *next_outlier = (int32_t *)malloc(sizeof(int32_t) * (size_t)nb);
        if (!buf || !acc || !next_outlier) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < n_blocks; blk++) {
            if (!buf || !acc || !next_outlier) continue;
            const int64_t r0 = blk * nb;
            const int n = (int)(N - r0 < nb ? N - r0 : nb);
            memset(acc, 0, sizeof(float) * (size_t)(nb * Mp));
            for (int i = 0; i < n; i++) next_outlier[i] = L->row_ptr[r0 + i];
            for (int64_t c0 = 0; c0 < K; c0 += KB) {
                const int64_t c1 = c0 + KB < K ? c0 + KB : K;
                decode_block(L, r0, n, nb, c0, c1, buf, next_outlier);
                block_multiply(buf, nb, xp, acc, K, Mp, c0, c1 - c0);
            }
            for (int64_t m0 = 0; m0 < M; m0 += 16) /* transpose acc [n][Mp] into y [M][N] in 16 x 16 blocks */
                for (int i0 = 0; i0 < n; i0 += 16)
                    for (int64_t m = m0; m < m0 + 16 && m < M; m++)
                        for (int i = i0; i < i0 + 16 && i < n; i++) y[m * N + r0 + i] = acc[(int64_t)i * Mp + m];
        }
        free(buf);
        free(acc);
        free(next_outlier);
    }
    free(xp);
    return failed;
}

/* ---------------------------------------------------------------------------------------------- */
/* Matrix-matrix on AMX tiles                                                                      */
/* ---------------------------------------------------------------------------------------------- */
/* y = sum_g scale_g * (sum_{k in g} code_k x_k) - sum_g scale_g zero_g * (sum_{k in g} x_k) + outliers.
 * The inner sums run on the AMX tile unit (TDPBF16PS: bf16 products summed in fp32) without losing fp32
 * precision: codes are small integers, exact in bf16, and each x is split into three bf16 parts
 * hi + mid + lo == x (8 + 8 + 8 significant bits), so every product is exact and only the fp32 sums
 * round, as in any fp32 matmul. Per 16 rows of X, 16 rows of W and 16 columns (one block; beta1 is a
 * multiple of 16), two tile products with the same B tile (the block's codes, twice):
 *     C [16 x 16] fp32 += A_hm [16 x 32: hi | mid of the 16 columns] . B [codes; codes]
 *     C              += A_lo [16 x 32: lo | zeros]                  . B
 * Scales and zero terms are applied with AVX-512 once per group, outliers from a transposed copy of X. */
#if SPQR_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_NT 32  /* most 16-row tiles of W per task: they share each load of X's tiles */
#define AMX_KC 256 /* columns per pass: the pass's B tiles (AMX_NT x 16 KiB) stay in L2 */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_config;

/* Ask Linux for the AMX tile state (once per process). 1 when the tile unit may be used. */
int spqr_amx_enable(void) {
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return state;
}

/* tmm0, tmm1: C of two W tiles; tmm2: A_hm; tmm3: A_lo; tmm4, tmm5: B of the two W tiles. All 16 x 64 bytes. */
static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 6; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* bf16 bits (in the low half of each lane) of fp32 values that have at most 8 significant bits */
static inline __m512i bf16_bits_exact(__m512 v) { return _mm512_srli_epi32(_mm512_castps_si512(v), 16); }

/* The B tile of the 16-row tile at r0, columns 16 j .. 16 j + 15: rows p and p + 8, lane i = the codes of W row r0 + i
 * at columns 16 j + 2p (low half) and 16 j + 2p + 1 (high half), as bf16. */
static inline __attribute__((always_inline)) void amx_b_tile(const spqr_layer *L, int64_t r0, int64_t j, uint32_t *dst,
                                                             const int WB) {
    const int32_t *planes = L->qweight + (((r0 / TILE) * ceil_div(L->in_features, 32) + j / 2) * WB) * TILE;
    __m512i v[8];
    for (int b = 0; b < WB; b++) v[b] = _mm512_srli_epi32(_mm512_loadu_si512(planes + b * TILE), 16 * (int)(j & 1));
#pragma GCC unroll 8
    for (int p = 0; p < 8; p++) {
        __m512i q0 = _mm512_setzero_si512(), q1 = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int b = 0; b < WB; b++) {
            q0 = _mm512_ternarylogic_epi32(q0, move_bit(v[b], 2 * p, b), _mm512_set1_epi32(1 << b), 0xF8);
            q1 = _mm512_ternarylogic_epi32(q1, move_bit(v[b], 2 * p + 1, b), _mm512_set1_epi32(1 << b), 0xF8);
        }
        const __m512i lo = bf16_bits_exact(_mm512_cvtepi32_ps(q0)), hi = bf16_bits_exact(_mm512_cvtepi32_ps(q1));
        const __m512i row = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
        _mm512_storeu_si512(dst + 16 * p, row);
        _mm512_storeu_si512(dst + 16 * (p + 8), row);
    }
}

static void amx_b_tile_any(const spqr_layer *L, int64_t r0, int64_t j, uint32_t *dst) {
    switch (L->wbits) {
        case 1: amx_b_tile(L, r0, j, dst, 1); return;
        case 2: amx_b_tile(L, r0, j, dst, 2); return;
        case 3: amx_b_tile(L, r0, j, dst, 3); return;
        case 4: amx_b_tile(L, r0, j, dst, 4); return;
        case 5: amx_b_tile(L, r0, j, dst, 5); return;
        case 6: amx_b_tile(L, r0, j, dst, 6); return;
        case 7: amx_b_tile(L, r0, j, dst, 7); return;
        default: amx_b_tile(L, r0, j, dst, 8); return;
    }
}

#define AMX_PREP_COLUMNS 512 /* X is prepared in pieces of 16 rows x this many columns (at least), in L1/L2 */

/* Rows m0 .. m0+15 of x [M][K] (original column order) -> their A tiles (x_perm zero padded to [Mp][Kp]):
 * a_hm [Mp/16][Kp/16][16][32] (hi | mid), a_lo [Mp/16][Kp/16][16][32] (lo | zeros); xsum [n_groups][Mp], the
 * sums of x_perm over each group; and if xt != NULL, xt [Mp/16][Kp][16] = x_perm transposed in blocks of 16 rows.
 * rows: scratch of 16 * amx_prep_columns(L) floats. */
static int64_t amx_prep_columns(const spqr_layer *L) { return ceil_div(AMX_PREP_COLUMNS, L->beta1) * L->beta1; }

static void amx_prepare_rows(const spqr_layer *L, const float *x, int64_t M, int64_t m0, int64_t Mp, int64_t Kp,
                             uint16_t *a_hm, uint16_t *a_lo, float *xsum, float *xt, float *rows) {
    const int64_t K = L->in_features, beta1 = L->beta1, width = amx_prep_columns(L);
    const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32((int)width));
    for (int64_t k0 = 0; k0 < Kp; k0 += width) { /* columns k0 .. k1 - 1, whole groups */
        const int64_t k1 = k0 + width < Kp ? k0 + width : Kp;
        for (int64_t i = 0; i < 16; i++) {
            const int64_t m = m0 + i;
            float *row = rows + i * width - k0; /* row[k] for k0 <= k < k1 */
            for (int64_t k = k0; k < k1; k++) row[k] = m < M && k < K ? x[m * K + perm_index(L, k)] : 0.0f;
            for (int64_t k = k0; k < k1; k += 16) {
                const __m512 v = _mm512_loadu_ps(row + k);
                const __m256bh hi = _mm512_cvtneps_pbh(v);
                const __m512 rest = _mm512_sub_ps(v, _mm512_cvtpbh_ps(hi)); /* exact */
                const __m256bh mid = _mm512_cvtneps_pbh(rest);
                const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(rest, _mm512_cvtpbh_ps(mid)));
                const int64_t tile = (m / 16) * (Kp / 16) + k / 16;
                uint16_t *hm = a_hm + tile * 512 + i * 32;
                _mm256_storeu_si256((__m256i *)hm, (__m256i)hi);
                _mm256_storeu_si256((__m256i *)(hm + 16), (__m256i)mid);
                _mm256_storeu_si256((__m256i *)(a_lo + tile * 512 + i * 32), (__m256i)lo);
                _mm256_storeu_si256((__m256i *)(a_lo + tile * 512 + i * 32 + 16), _mm256_setzero_si256());
            }
            for (int64_t g = k0 / beta1; g * beta1 < k1; g++) { /* zero past K */
                __m512 sum = _mm512_setzero_ps();
                for (int64_t k = g * beta1; k < (g + 1) * beta1 && k < k1; k += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(row + k));
                xsum[g * Mp + m] = _mm512_reduce_add_ps(sum);
            }
        }
        if (xt) /* one cache line of xt per column: the 16 rows' values, gathered */
            for (int64_t k = k0; k < k1; k++) _mm512_store_ps(xt + m0 * Kp + k * 16, _mm512_i32gather_ps(stride, rows + k - k0, 4));
    }
}

/* Scale and scale * zero of the W tile at r0 (rows >= N zero) in group g, 16 floats each. */
static void amx_tile_stats(const spqr_layer *L, int64_t r0, int64_t g, float *scale, float *scale_zero) {
    if (r0 + TILE <= L->out_features) {
        const tile_cursor cursor = tile_cursor_at(L, r0);
        __m512 s, z;
        tile_stats16(L, &cursor, g, r0, &s, &z);
        _mm512_store_ps(scale, s);
        _mm512_store_ps(scale_zero, _mm512_mul_ps(s, z));
        return;
    }
    float z[TILE] = {0};
    memset(scale, 0, sizeof(float) * TILE);
    tile_stats(L, g, r0, (int)(L->out_features - r0), scale, z);
    for (int i = 0; i < TILE; i++) scale_zero[i] = scale[i] * z[i];
}

/* One call's shapes and shared buffers (filled by spqr_gemm_amx). */
typedef struct {
    const spqr_layer *L;
    int64_t M, Mp, Kp, mblocks;
    int64_t blocks_per_group;         /* 16-column blocks per group */
    int64_t kc, kc_blocks, kc_groups; /* columns, blocks and groups per pass */
    const uint16_t *a_hm, *a_lo;      /* X's A tiles, see amx_prepare_rows */
    const float *xsum, *xt;
} amx_call;

/* One thread's buffers. */
typedef struct {
    float *scratch;            /* amx_prepare_rows' rows; amx_add_outliers' sums */
    uint32_t *btiles;          /* [t][block of the pass] B tiles, 256 words each */
    float *scale, *scale_zero; /* [t][group of the pass][16] */
    float *acc;                /* [mb][AMX_NT][16 rows of X][16 rows of W] */
    float *cbuf;               /* C tiles on their way to acc, see amx_cbuf */
} amx_buffers;

/* Where the C tiles of W tiles t, t + 1 are stored: a group of several 16-column blocks sums over them in
 * cbuf [AMX_NT][256]; otherwise two pairs of buffers take turns. */
static inline float *amx_cbuf(float *cbuf, int64_t t, int64_t blocks_per_group) {
    return cbuf + (blocks_per_group > 1 ? t : ((t / 2) & 1) * 2) * 256;
}

/* acc [16 rows of X][16 rows of W] += c * scale - xsum (x) scale_zero */
static inline void amx_accumulate(float *acc, const float *c, const float *scale, const float *scale_zero,
                                  const float *xsum) {
    const __m512 s = _mm512_load_ps(scale), sz = _mm512_load_ps(scale_zero);
    for (int i = 0; i < 16; i++) {
        const __m512 v = _mm512_fmadd_ps(_mm512_load_ps(c + 16 * i), s, _mm512_load_ps(acc + 16 * i));
        _mm512_store_ps(acc + 16 * i, _mm512_fnmadd_ps(_mm512_set1_ps(xsum[i]), sz, v));
    }
}

/* The B tiles and statistics of W tiles t0 .. t0 + nt - 1 over the pass starting at column c0 (nb blocks). */
static void amx_pass_weights(const amx_call *c, amx_buffers *w, int64_t t0, int64_t nt, int64_t c0, int64_t nb) {
    const spqr_layer *L = c->L;
    for (int64_t t = 0; t < nt; t++) {
        for (int64_t j = 0; j < nb; j++)
            amx_b_tile_any(L, (t0 + t) * TILE, c0 / 16 + j, w->btiles + (t * c->kc_blocks + j) * 256);
        for (int64_t gl = 0; gl < ceil_div(nb * 16, L->beta1); gl++)
            amx_tile_stats(L, (t0 + t) * TILE, c0 / L->beta1 + gl, w->scale + (t * c->kc_groups + gl) * 16,
                           w->scale_zero + (t * c->kc_groups + gl) * 16);
    }
}

/* acc += the pass's products for every 16 rows of X and the nt W tiles of the task (tile registers: see
 * amx_configure). W tiles go in pairs; their C tiles are stored to cbuf and scaled into acc one step later,
 * so that the AVX-512 work overlaps the next tile products. */
static void amx_pass_products(const amx_call *c, const amx_buffers *w, int64_t nt, int64_t c0, int64_t nb) {
    /* locals, not fields: the stores to acc would otherwise make the compiler reload every field */
    const int64_t bpg = c->blocks_per_group, beta1 = c->L->beta1, kc_blocks = c->kc_blocks, kc_groups = c->kc_groups;
    const int64_t Mp = c->Mp, Kp = c->Kp, mblocks = c->mblocks;
    const uint16_t *const a_hm = c->a_hm, *const a_lo = c->a_lo;
    const float *const xsum = c->xsum, *const scale = w->scale, *const scale_zero = w->scale_zero;
    const uint32_t *const btiles = w->btiles;
    float *const acc = w->acc, *const cbuf = w->cbuf;
    for (int64_t mb = 0; mb < mblocks; mb++) {
        const int64_t tile0 = mb * (Kp / 16) + c0 / 16; /* this pass's first A tile */
        for (int64_t gl = 0; gl < ceil_div(nb * 16, beta1); gl++) {
            const float *xg = xsum + (c0 / beta1 + gl) * Mp + mb * 16;
            const int64_t jn = nb - gl * bpg < bpg ? nb - gl * bpg : bpg; /* blocks in this group */
            for (int64_t jb = 0; jb < jn; jb++) {
                const int64_t j = gl * bpg + jb;
                _tile_loadd(2, a_hm + (tile0 + j) * 512, 64);
                _tile_loadd(3, a_lo + (tile0 + j) * 512, 64);
                int64_t pending = -1; /* the pair whose C tiles wait to be scaled */
                for (int64_t t = 0; t <= nt + (nt & 1); t += 2) { /* one step past the last pair */
                    if (t < nt) {
                        const int64_t u = t + 1 < nt ? t + 1 : t; /* past nt: a copy of t */
                        float *ct = amx_cbuf(cbuf, t, bpg), *cu = ct + 256;
                        if (jb == 0) {
                            _tile_zero(0);
                            _tile_zero(1);
                        } else {
                            _tile_loadd(0, ct, 64);
                            _tile_loadd(1, cu, 64);
                        }
                        _tile_loadd(4, btiles + (t * kc_blocks + j) * 256, 64);
                        _tile_loadd(5, btiles + (u * kc_blocks + j) * 256, 64);
                        _tile_dpbf16ps(0, 2, 4);
                        _tile_dpbf16ps(1, 2, 5);
                        _tile_dpbf16ps(0, 3, 4);
                        _tile_dpbf16ps(1, 3, 5);
                        _tile_stored(0, ct, 64);
                        _tile_stored(1, cu, 64);
                    }
                    if (jb < jn - 1) continue; /* the group goes on */
                    if (pending >= 0) {
                        const float *cp = amx_cbuf(cbuf, pending, bpg);
                        for (int64_t v = pending; v < pending + 2 && v < nt; v++, cp += 256)
                            amx_accumulate(acc + (mb * AMX_NT + v) * 256, cp, scale + (v * kc_groups + gl) * 16,
                                           scale_zero + (v * kc_groups + gl) * 16, xg);
                    }
                    pending = t;
                }
            }
        }
    }
}

/* acc[m][i] += sum_p val_p x_perm[m][col_p] over the outliers of the task's W rows, 16 rows of X at a time (their
 * 16 Kp floats of xt stay in L2 while every outlier reads one cache line of them). 1: out of memory. */
static int amx_add_outliers(const amx_call *c, amx_buffers *w, int64_t t0, int64_t nt) {
    const spqr_layer *L = c->L;
    const int64_t N = L->out_features, r_end = (t0 + nt) * TILE < N ? (t0 + nt) * TILE : N;
    const int32_t p_first = L->row_ptr[t0 * TILE], count = L->row_ptr[r_end] - p_first;
    if (count == 0) return 0;
    float *values = (float *)malloc(sizeof(float) * (size_t)count);
    int32_t *offsets = (int32_t *)malloc(sizeof(int32_t) * (size_t)count); /* col * 16: the column's line in xt */
    if (!values || !offsets) {
        free(values);
        free(offsets);
        return 1;
    }
    for (int32_t p = 0; p < count; p++) { /* decoded once, read once per 16 rows of X */
        values[p] = half_to_float(L->outlier_val[p_first + p]);
        offsets[p] = (int32_t)(outlier_col(L, p_first + p) * 16);
    }
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    float *sums = w->scratch; /* [nt * 16 rows of W][16 rows of X] */
    for (int64_t mb = 0; mb < c->mblocks; mb++) {
        const float *xm = c->xt + mb * c->Kp * 16;
        for (int64_t r = t0 * TILE; r < (t0 + nt) * TILE; r++) {
            __m512 o0 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps(); /* two chains of FMAs */
            int32_t p = r < N ? L->row_ptr[r] - p_first : 0;
            const int32_t p1 = r < N ? L->row_ptr[r + 1] - p_first : 0;
            for (; p + 1 < p1; p += 2) {
                o0 = _mm512_fmadd_ps(_mm512_set1_ps(values[p]), _mm512_load_ps(xm + offsets[p]), o0);
                o1 = _mm512_fmadd_ps(_mm512_set1_ps(values[p + 1]), _mm512_load_ps(xm + offsets[p + 1]), o1);
            }
            if (p < p1) o0 = _mm512_fmadd_ps(_mm512_set1_ps(values[p]), _mm512_load_ps(xm + offsets[p]), o0);
            _mm512_storeu_ps(sums + (r - t0 * TILE) * 16, _mm512_add_ps(o0, o1));
        }
        for (int64_t t = 0; t < nt; t++) { /* transposed into acc: row m of X gathers its 16 sums */
            float *at = w->acc + (mb * AMX_NT + t) * 256;
            for (int m = 0; m < 16; m++)
                _mm512_store_ps(at + 16 * m, _mm512_add_ps(_mm512_load_ps(at + 16 * m),
                                                           _mm512_i32gather_ps(column, sums + t * 256 + m, 4)));
        }
    }
    free(values);
    free(offsets);
    return 0;
}

/* y [M][N] = x [M][K] W^T (x in the original column order). 2: AMX unavailable or beta1 not a multiple of 16. */
int spqr_gemm_amx(const spqr_layer *L, int64_t M, const float *x, float *y, int n_threads) {
    if (!spqr_amx_enable() || L->beta1 % 16) return 2;
    const int64_t N = L->out_features, K = L->in_features, beta1 = L->beta1, n_groups = ceil_div(K, beta1);
    const int64_t Mp = ceil_div(M, 16) * 16, Kp = ceil_div(K, 16) * 16, n_tiles = ceil_div(N, TILE);
    const int64_t kc = ceil_div(AMX_KC, beta1) * beta1;
    amx_call c = {L, M, Mp, Kp, Mp / 16, beta1 / 16, kc, kc / 16, kc / beta1, NULL, NULL, NULL, NULL};
    const int has_outliers = L->row_ptr[N] > 0;
    /* tasks of up to AMX_NT tiles, at least two per thread when the layer is small (all threads busy) */
    int64_t task_tiles = ceil_div(n_tiles, 2 * (int64_t)n_threads);
    task_tiles = task_tiles < 2 ? 2 : task_tiles > AMX_NT ? AMX_NT : task_tiles;
    /* One workspace: X's tiles (2 x 4 Mp Kp bytes), its group sums, xt (4 Mp Kp bytes, with outliers), then each
     * thread's buffers (each a `region`). */
    const size_t tiles_bytes = region(sizeof(uint16_t) * (size_t)(2 * Mp * Kp));
    const size_t xsum_bytes = region(sizeof(float) * (size_t)(n_groups * Mp));
    const size_t xt_bytes = has_outliers ? region(sizeof(float) * (size_t)(Kp * Mp)) : 0;
    const int64_t scratch = 16 * amx_prep_columns(L) > 256 * AMX_NT ? 16 * amx_prep_columns(L) : 256 * AMX_NT;
    const size_t part[6] = {region(sizeof(float) * (size_t)scratch), region(1024 * (size_t)(AMX_NT * c.kc_blocks)),
                            region(sizeof(float) * 16 * (size_t)(AMX_NT * c.kc_groups)),
                            region(sizeof(float) * 16 * (size_t)(AMX_NT * c.kc_groups)),
                            region(sizeof(float) * 256 * (size_t)(AMX_NT * c.mblocks)),
                            region(sizeof(float) * 256 * AMX_NT)};
    const size_t shared_bytes = 2 * tiles_bytes + xsum_bytes + xt_bytes;
    const size_t thread_bytes = part[0] + part[1] + part[2] + part[3] + part[4] + part[5];
    workspace ws = workspace_acquire(shared_bytes + (size_t)n_threads * thread_bytes);
    if (!ws.ptr) return 1;
    uint16_t *a_hm = (uint16_t *)ws.ptr, *a_lo = (uint16_t *)(ws.ptr + tiles_bytes);
    float *xsum = (float *)(ws.ptr + 2 * tiles_bytes), *xt = has_outliers ? xsum + xsum_bytes / sizeof(float) : NULL;
    c.a_hm = a_hm, c.a_lo = a_lo, c.xsum = xsum, c.xt = xt;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        char *mine = ws.ptr + shared_bytes + (size_t)thread_index() * thread_bytes;
        amx_buffers w = {(float *)mine, (uint32_t *)(mine + part[0]), (float *)(mine + part[0] + part[1]),
                         (float *)(mine + part[0] + part[1] + part[2]),
                         (float *)(mine + part[0] + part[1] + part[2] + part[3]),
                         (float *)(mine + part[0] + part[1] + part[2] + part[3] + part[4])};
        amx_configure();
#pragma omp for schedule(static)
        for (int64_t mb = 0; mb < c.mblocks; mb++) amx_prepare_rows(L, x, M, mb * 16, Mp, Kp, a_hm, a_lo, xsum, xt, w.scratch);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < ceil_div(n_tiles, task_tiles); task++) {
            const int64_t t0 = task * task_tiles, nt = n_tiles - t0 < task_tiles ? n_tiles - t0 : task_tiles;
            for (int64_t mb = 0; mb < c.mblocks; mb++) memset(w.acc + mb * AMX_NT * 256, 0, sizeof(float) * 256 * (size_t)nt);
            for (int64_t c0 = 0; c0 < Kp; c0 += kc) { /* one pass: columns c0 .. c0 + kc - 1 */
                const int64_t nb = (Kp - c0 < kc ? Kp - c0 : kc) / 16;
                amx_pass_weights(&c, &w, t0, nt, c0, nb);
                amx_pass_products(&c, &w, nt, c0, nb);
            }
            if (has_outliers && amx_add_outliers(&c, &w, t0, nt)) {
#pragma omp atomic write
                failed = 1;
            }
            for (int64_t mb = 0; mb < c.mblocks; mb++) /* the rows of y */
                for (int64_t t = 0; t < nt; t++) {
                    const int64_t r0 = (t0 + t) * TILE, n = N - r0 < TILE ? N - r0 : TILE;
                    const float *at = w.acc + (mb * AMX_NT + t) * 256;
                    for (int64_t m = mb * 16; m < mb * 16 + 16 && m < M; m++)
                        _mm512_mask_storeu_ps(y + m * N + r0, (__mmask16)((1u << n) - 1u), _mm512_load_ps(at + 16 * (m - mb * 16)));
                }
        }
        _tile_release();
    }
    workspace_release(ws);
    return failed;
}
#else
int spqr_amx_enable(void) { return 0; }
int spqr_gemm_amx(const spqr_layer *L, int64_t M, const float *x, float *y, int n_threads) {
    (void)L, (void)M, (void)x, (void)y, (void)n_threads;
    return 2;
}
#endif

int spqr_has_avx512(void) { return SPQR_AVX512; }
