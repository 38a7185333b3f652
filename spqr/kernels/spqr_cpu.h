/* Shared by the CPU kernels (spqr_cpu.c: matrix-vector and AVX-512 matrix-matrix; spqr_amx.c: matrix-matrix on
 * AMX tiles): the layer as cpu.py passes it, exact decoding helpers, the kept workspace. */
#ifndef SPQR_CPU_H
#define SPQR_CPU_H
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
/* without AVX-512, the matrix-vector product still uses AVX2 table lookups where the build targets AVX2, FMA and F16C
 * (its outlier loop converts fp16 eight at a time) */
#if !SPQR_AVX512 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(SPQR_PORTABLE)
#define SPQR_AVX2 1
#include <immintrin.h>
#else
#define SPQR_AVX2 0
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

/* The entry points (cpu.py; tests/kernels/emulated_driver.c): y [M][out] = x [M][in] W^T, x in the original column
 * order. 0 when done, 1 when out of memory; spqr_gemm_amx 2 when the tile unit is refused; spqr_gemv and
 * spqr_gemm_amx SPQR_INPUT_OUT_OF_RANGE when an input is not within +-SPQR_INPUT_LIMIT (nothing computed). */
int spqr_gemv(const spqr_layer *L, int64_t M, const float *x_in, float *y, int n_threads);
int spqr_gemm(const spqr_layer *L, int64_t M, const float *x, float *y, int n_threads);
int spqr_gemm_amx(const spqr_layer *L, int64_t M, const float *x, float *y, int n_threads);
void spqr_release_workspace(void); /* frees the scratch buffer kept between calls */

/* The inputs the matrix-vector and AMX kernels take: the first factors the zero points out (scale * zero * sum of x
 * over a group), the second splits x into bf16 parts, and both would give inf - inf = NaN for an infinite input,
 * or overflow for a huge one, where F.linear gives inf or a finite value. A call with any |x| beyond 2^64 (or NaN)
 * computes nothing and returns SPQR_INPUT_OUT_OF_RANGE; cpu.py then takes the reference path for the rows with
 * such an input, and calls the kernel again for the others. Within the limit the
 * intermediates stay below fp32's 2^128 for any layer with scale * zero < 2^32 and K < 2^31 (2^64 * 2^32 * 2^31). */
#define SPQR_INPUT_LIMIT 18446744073709551616.0f
#define SPQR_INPUT_OUT_OF_RANGE 3
static inline int out_of_range(float v) { return !(v <= SPQR_INPUT_LIMIT && v >= -SPQR_INPUT_LIMIT); }

#define TILE 16 /* output rows per tile: one AVX-512 vector of statistics */
/* the matrix-vector kernel prefetches weights this many 32-column chunks ahead, into L1 and into L2 */
#define PREFETCH_NEAR 4
#define PREFETCH_FAR 16

/* fp16 bits -> float, exactly, by SPQR_HALF_CONVERSION: 1 the compiler's _Float16, 2 F16C, 3 bit arithmetic; by
 * default the first the compiler and target have (GCC before 12 and clang before 15 have no _Float16 on x86 without
 * AVX512-FP16: Ubuntu 22.04's and RHEL 9's compilers). The tests build each. */
#ifndef SPQR_HALF_CONVERSION
#if defined(__FLT16_MANT_DIG__)
#define SPQR_HALF_CONVERSION 1
#elif defined(__F16C__)
#define SPQR_HALF_CONVERSION 2
#else
#define SPQR_HALF_CONVERSION 3
#endif
#endif
#if SPQR_HALF_CONVERSION == 2
#include <immintrin.h>
#endif
static inline float half_to_float(uint16_t h) {
#if SPQR_HALF_CONVERSION == 1
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
#elif SPQR_HALF_CONVERSION == 2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 31u, mantissa = h & 1023u;
    uint32_t bits;
    if (exponent == 31) bits = sign | 0x7f800000u | mantissa << 13;           /* infinity, NaN */
    else if (exponent) bits = sign | (exponent + 112) << 23 | mantissa << 13; /* normal: rebias 15 -> 127 */
    else {                                                                    /* zero, subnormal: mantissa 2^-24 */
        const float magnitude = (float)mantissa * 0x1p-24f;
        memcpy(&bits, &magnitude, sizeof bits);
        bits |= sign;
    }
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
#endif
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
static inline void tile_stats(const spqr_layer *L, int64_t g, int64_t r0, int n, float *scale, float *zero) {
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

/* A region's footprint in the workspace: whole cache lines and 5 more, so that consecutive regions don't start
 * at the same offset modulo 4 KiB (where loads and stores 4 KiB apart would slow each other down). */
static inline size_t region(size_t bytes) { return (bytes + 63) / 64 * 64 + 5 * 64; }

/* The workspace (at least `bytes`), or a private buffer when it is in use; ptr is NULL when out of memory. */
__attribute__((visibility("hidden"))) workspace workspace_acquire(size_t bytes);
__attribute__((visibility("hidden"))) void workspace_release(workspace ws);

/* Runs CALL (a statement naming WB) with WB = the bit width wbits (1..8) as a constant: one instance of an
 * always_inline kernel per width, so that its loops over bit-planes unroll. */
#define SPQR_FOR_WBITS(wbits, CALL)                 \
    switch (wbits) {                                \
        case 1: { const int WB = 1; CALL; } break;  \
        case 2: { const int WB = 2; CALL; } break;  \
        case 3: { const int WB = 3; CALL; } break;  \
        case 4: { const int WB = 4; CALL; } break;  \
        case 5: { const int WB = 5; CALL; } break;  \
        case 6: { const int WB = 6; CALL; } break;  \
        case 7: { const int WB = 7; CALL; } break;  \
        default: { const int WB = 8; CALL; } break; \
    }

#define KB 128 /* columns of W decoded at once by decode_block */

/* Decode W rows r0 .. r0+n-1 (n <= nb), columns c0 .. c1-1 (c1 - c0 <= KB) into buf [KB][nb], transposed (row i
 * of column k at buf[k * nb + i]; rows >= n, columns >= c1 zeroed), bit-identical to the reference decoder:
 * (code - zero) * scale, plus the outlier delta. next_outlier[i] is row r0+i's first outlier not yet applied
 * (start: row_ptr[r0 + i]); blocks of a row range must come in increasing c0. (spqr_cpu.c) */
__attribute__((visibility("hidden"))) void decode_block(const spqr_layer *L, int64_t r0, int n, int nb, int64_t c0,
                                                        int64_t c1, float *buf, int32_t *next_outlier);

/* Where the statistics of one full 16-row tile (r0 a multiple of 16) live; group g is `g * stride` further. */
typedef struct {
    int mode; /* 0: fp16 values, 1: bilevel with one second-level group per tile, 2: bilevel, any beta2 */
    const char *scale_codes, *zero_codes; /* this tile's 16-bit half of the first plane word */
    int64_t code_stride, qq;              /* bytes between groups; planes are 4 bytes apart */
    const uint16_t *scale_scale, *scale_zero, *zero_scale, *zero_zero, *scale_fp16, *zero_fp16;
    int64_t second_stride, fp16_stride;
} tile_cursor;

static inline tile_cursor tile_cursor_at(const spqr_layer *L, int64_t r0) {
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

#if SPQR_AVX512
/* A 16-bit lane mask straight from memory (kmovw k, m16: a load, no trip through a general register). */
static inline __mmask16 load_mask16(const void *p) {
    __mmask16 k;
    __asm__("kmovw %1, %0" : "=k"(k) : "m"(*(const uint16_t *)p));
    return k;
}

/* The lanes of v out of range: beyond +-SPQR_INPUT_LIMIT, or NaN (out_of_range, 16 at a time). */
static inline __mmask16 out_of_range16(__m512 v) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(SPQR_INPUT_LIMIT), _CMP_NLE_UQ);
}

/* x_perm[k .. k+15] (lanes outside `valid` zero): x [in] in the original column order, gathered through perm. */
static inline __m512 load_x_perm16(const spqr_layer *L, const float *x, int64_t k, __mmask16 valid) {
    if (!L->perm) return _mm512_maskz_loadu_ps(valid, x + k);
    const __m512i cols = L->perm_int32
        ? _mm512_maskz_loadu_epi32(valid, (const int32_t *)L->perm + k)
        : _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(valid, (const int16_t *)L->perm + k));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, cols, x, 4);
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

/* Bit `from` of each lane moved to bit `to` (other bits garbage; the caller masks). */
static inline __m512i move_bit(__m512i v, int from, int to) {
    return from >= to ? _mm512_srli_epi32(v, from - to) : _mm512_slli_epi32(v, to - from);
}

/* The WB-bit codes of column `bit` (0..31) of a 16-row tile's 32-column chunk, one per lane (row), from the
 * chunk's bit-plane vectors planes[0..WB-1] (WB a compile-time constant after inlining). */
static inline __attribute__((always_inline)) __m512i column_codes(const __m512i *planes, int bit, const int WB) {
    __m512i q = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int b = 0; b < WB; b++) /* q |= bit `bit` of plane b, at bit b */
        q = _mm512_ternarylogic_epi32(q, move_bit(planes[b], bit, b), _mm512_set1_epi32(1 << b), 0xF8);
    return q;
}
#endif
#endif
