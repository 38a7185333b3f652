/* CPU kernels for the packed SpQR layer (see spqr/format/layout.py for the layout).
 *
 * y = W_perm x_perm, computed from the stored tensors without materializing W:
 *   spqr_gemv  a few input rows (token generation, batched decoding), by table lookup: for every 4
 *              columns a table of the 16 possible sums of their x values is built per row and call; then
 *              for each 16-row tile, each bit-plane and each 4 columns, one permute picks all 16 rows' partial sums
 *                  sum_j q_j x_j = sum_b 2^b sum_{j: bit b of q_j set} x_j
 *              so no code is ever unpacked and all arithmetic stays fp32. The zero point enters once
 *              per group: - scale * zero * sum(x over the group).
 *   spqr_gemm  M input rows (prefill, batches). X is copied into panels of 32 rows (permutation
 *              applied); tiles of up to 192 rows x 128 columns of W are decoded exactly as the
 *              reference decoder does ((code - zero) * scale + outlier delta, fp32) into a buffer
 *              that stays in cache and multiplied with a 6 x 64 register-blocked FMA micro-kernel.
 *   spqr_gemm_amx  (spqr_amx.c) the same on the AMX tile unit (Sapphire Rapids and later): codes as bf16
 *              times x split into three bf16 parts, exact products summed in fp32.
 * All three handle every wbits/qq_bits in 1..8, any beta1 that is a multiple of 16 (the caller checks),
 * any beta2, ragged shapes, fp16 first-level statistics (qq_bits == 0) and int16/int32 outlier columns.
 * Without AVX-512 (or with -DSPQR_PORTABLE) plain C loops compute the same thing.
 */
#include "spqr_cpu.h"

/* the workspace (see spqr_cpu.h) */
static char *shared_workspace;
static size_t shared_workspace_bytes;
static pthread_mutex_t shared_workspace_lock = PTHREAD_MUTEX_INITIALIZER;

workspace workspace_acquire(size_t bytes) {
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

void workspace_release(workspace ws) {
    if (ws.shared) pthread_mutex_unlock(&shared_workspace_lock);
    else free(ws.ptr);
}

/* A fork while another thread holds the workspace leaves the child with the lock taken by a thread it does not
   have: spqr_release_workspace would wait forever. The child starts with a fresh lock and no shared workspace
   (the parent's stays allocated in the child's copy of memory, unused). */
static void workspace_reset_in_child(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    shared_workspace_lock = fresh;
    shared_workspace = NULL;
    shared_workspace_bytes = 0;
}

__attribute__((constructor)) static void workspace_register_fork_handler(void) {
    pthread_atfork(NULL, NULL, workspace_reset_in_child);
}

/* Frees the kept workspace (e.g. after a long prompt). */
void spqr_release_workspace(void) {
    pthread_mutex_lock(&shared_workspace_lock);
    free(shared_workspace);
    shared_workspace = NULL;
    shared_workspace_bytes = 0;
    pthread_mutex_unlock(&shared_workspace_lock);
}

/* The plain vector loops (no AVX-512) may fuse products and sums into FMAs where the hardware has them (measured
 * 20% faster on AVX2); only those loops, as the decoders must round (code - zero) * scale before the outlier delta
 * is added, like the reference decoder. */
#if defined(__GNUC__) && !defined(__clang__)
#define SPQR_FMA_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define SPQR_FMA_CONTRACT
#endif

/* ---------------------------------------------------------------------------------------------- */
/* Matrix-vector                                                                                   */
/* ---------------------------------------------------------------------------------------------- */
/* Below, x is always in the sweep's column order (x_perm); the entry points gather it. */

#if SPQR_AVX512
/* Row r's outlier products delta * x[col], summed lanewise (their lanes' total is the row's outlier term). */
static inline __m512 outlier_products(const spqr_layer *L, int64_t r, const float *x) {
    const int32_t end = L->row_ptr[r + 1];
    __m512 acc = _mm512_setzero_ps();
    for (int32_t p = L->row_ptr[r]; p < end; p += 16) {
        const __mmask16 k = end - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - p)) - 1u);
        const __m512i cols = L->outlier_col_int32
            ? _mm512_maskz_loadu_epi32(k, (const int32_t *)L->outlier_col + p)
            : _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, (const int16_t *)L->outlier_col + p));
        const __m512 vals = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, L->outlier_val + p));
        acc = _mm512_fmadd_ps(vals, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, cols, x, 4), acc);
    }
    return acc;
}

/* Lane i = the sum of the lanes of v[i], by a transposing tree: 45 operations instead of 16 reductions of ~8. */
static inline __m512 sum_lanes16(const __m512 *v) {
    __m512 s1[8], s2[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2i], b = v[2i+1] */
        s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: that lane's sums of v[4i .. 4i+3] */
        const __m512d c = _mm512_castps_pd(s1[2 * i]), d = _mm512_castps_pd(s1[2 * i + 1]);
        s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
    }
    const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
    const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88), _mm512_shuffle_f32x4(s2[2], s2[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));
}

/* Lane i = the outlier term of row r0 + i of a full 16-row tile (~1% faster than 16 outlier_dot calls). */
static inline __m512 tile_outlier_dots(const spqr_layer *L, int64_t r0, const float *x) {
    __m512 products[TILE];
    for (int i = 0; i < TILE; i++) products[i] = outlier_products(L, r0 + i, x);
    return sum_lanes16(products);
}
#endif

/* sum over row r's outliers of delta * x[col] */
static float outlier_dot(const spqr_layer *L, int64_t r, const float *x) {
#if SPQR_AVX512
    return _mm512_reduce_add_ps(outlier_products(L, r, x));
#else
    float acc = 0.0f;
    int32_t p = L->row_ptr[r];
#if SPQR_AVX2 /* 8 at a time by gathers (the scalar loop took ~20% of a 4096^2 product at 1.8% outliers) */
    __m256 sums = _mm256_setzero_ps();
    for (; p + 8 <= L->row_ptr[r + 1]; p += 8) {
        const __m256i cols = L->outlier_col_int32
            ? _mm256_loadu_si256((const __m256i *)((const int32_t *)L->outlier_col + p))
            : _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)((const int16_t *)L->outlier_col + p)));
        const __m256 vals = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(L->outlier_val + p)));
        sums = _mm256_fmadd_ps(vals, _mm256_i32gather_ps(x, cols, 4), sums);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, sums);
    for (int i = 0; i < 8; i++) acc += lanes[i];
#endif
    for (; p < L->row_ptr[r + 1]; p++) acc += half_to_float(L->outlier_val[p]) * x[outlier_col(L, p)];
    return acc;
#endif
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

#if !SPQR_AVX512
/* Without AVX-512: a full 16-row tile column by column, VW rows at a time in one GCC vector of the target's native
 * width (AVX2: 8 floats; SSE, NEON: 4). Vectors wider than the target's (16 floats, as this code first had) made
 * GCC spill them for NEON, most of the loop going to the stack (seen in the aarch64 assembly). The scalar loop above,
 * one bit extraction per weight, measured 30x slower than torch's fp32 product on this Xeon built for AVX2
 * (-mno-avx512f); this loop: see the README. */
#if defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
/* the same for loads and stores at any float's address */
typedef float vf_unaligned __attribute__((vector_size(4 * VW), aligned(4)));
typedef int32_t vi_unaligned __attribute__((vector_size(4 * VW), aligned(4)));

/* The WB-bit codes of column j (0..31) of VW rows' 32-column chunk from their bit-plane vectors, one per lane
 * (j and WB compile-time constants after unrolling and inlining: constant shifts). */
static inline __attribute__((always_inline)) vi column_codes_vw(const vi *planes, int j, const int WB) {
    vi q = (planes[0] >> j) & 1;
    for (int b = 1; b < WB; b++) q |= (j >= b ? planes[b] >> (j - b) : planes[b] << (b - j)) & (1 << b);
    return q;
}

/* Scale and zero of rows r0 + q VW .. r0 + (q + 1) VW - 1 of the full tile at r0 (cursor c = tile_cursor_at(L, r0))
 * in group g, as tile_stats decodes them (bilevel with beta2 a multiple of 16, mode 1: one vector op per bit, the
 * tile sharing one second-level grid). */
static inline void tile_stats_vw(const spqr_layer *L, const tile_cursor *c, int64_t g, int64_t r0, int q, vf *scale,
                                 vf *zero) {
    if (c->mode != 1) {
        float s[VW], z[VW];
        tile_stats(L, g, r0 + q * VW, VW, s, z);
        memcpy(scale, s, sizeof s);
        memcpy(zero, z, sizeof z);
        return;
    }
    vi lane;
    for (int i = 0; i < VW; i++) lane[i] = q * VW + i;
    vi sc = {0}, zc = {0};
    for (int64_t b = 0; b < c->qq; b++) { /* this tile's 16 bits of plane b's word */
        uint16_t sbits, zbits;
        memcpy(&sbits, c->scale_codes + g * c->code_stride + 4 * b, sizeof sbits);
        memcpy(&zbits, c->zero_codes + g * c->code_stride + 4 * b, sizeof zbits);
        sc |= (((int32_t)sbits >> lane) & 1) << b;
        zc |= (((int32_t)zbits >> lane) & 1) << b;
    }
    *scale = (__builtin_convertvector(sc, vf) - half_to_float(c->scale_zero[g])) * half_to_float(c->scale_scale[g]);
    *zero = (__builtin_convertvector(zc, vf) - half_to_float(c->zero_zero[g])) * half_to_float(c->zero_scale[g]);
}

/* y[r0 .. r0+15] for a full tile with WB bits per code (a compile-time constant after inlining), VW rows per pass:
 * sum_g scale_g * (sum_{k in g} code_k x_k) - scale_g zero_g * group_sums[g], plus the outliers. */
static inline __attribute__((always_inline)) SPQR_FMA_CONTRACT void gemv_tile_vw(const spqr_layer *L, const float *x,
                                                               const float *group_sums, float *y, int64_t r0,
                                                               const int WB) {
    const int64_t K = L->in_features, beta1 = L->beta1, n_chunks = ceil_div(K, 32);
    const int32_t *tile = L->qweight + (r0 / TILE) * n_chunks * WB * TILE;
    const tile_cursor cursor = tile_cursor_at(L, r0);
    for (int q = 0; q < TILE / VW; q++) {
        vf acc = {0}, dot = {0}, scale, zero;
        int64_t g = 0, group_end = beta1; /* the first column past group g */
        tile_stats_vw(L, &cursor, 0, r0, q, &scale, &zero);
        for (int64_t c = 0; c < n_chunks; c++) {
            vi planes[8];
            for (int b = 0; b < WB; b++) planes[b] = *(const vi_unaligned *)(tile + (c * WB + b) * TILE + q * VW);
            const int width = K - 32 * c < 32 ? (int)(K - 32 * c) : 32;
#pragma GCC unroll 32
            for (int j = 0; j < 32; j++) {
                if (j >= width) break;
                const int64_t col = 32 * c + j;
                if (col == group_end) { /* group g is complete */
                    acc += scale * dot - scale * zero * group_sums[g];
                    dot = (vf){0};
                    tile_stats_vw(L, &cursor, ++g, r0, q, &scale, &zero);
                    group_end += beta1;
                }
                dot += __builtin_convertvector(column_codes_vw(planes, j, WB), vf) * x[col];
            }
        }
        acc += scale * dot - scale * zero * group_sums[g];
        for (int i = 0; i < VW; i++) y[r0 + q * VW + i] = acc[i] + outlier_dot(L, r0 + q * VW + i, x);
    }
}

/* Columns c0 .. c1-1 (c0 a multiple of 32) of the full tile at r0 decoded like decode_tile16 (the AVX-512 version):
 * column k to dst[(k - c0) * nb + 0..15], (code - zero) * scale, VW rows per pass. */
static inline __attribute__((always_inline)) void decode_tile_vw(const spqr_layer *L, int64_t r0, int64_t c0,
                                                                 int64_t c1, float *dst, int nb, const int WB) {
    const int32_t *tile = L->qweight + (r0 / TILE) * ceil_div(L->in_features, 32) * WB * TILE;
    const tile_cursor cursor = tile_cursor_at(L, r0);
    for (int q = 0; q < TILE / VW; q++) {
        int64_t g = -1;
        vf scale = {0}, zero = {0};
        for (int64_t c = c0 / 32; c * 32 < c1; c++) {
            vi planes[8];
            for (int b = 0; b < WB; b++) planes[b] = *(const vi_unaligned *)(tile + (c * WB + b) * TILE + q * VW);
#pragma GCC unroll 32
            for (int j = 0; j < 32; j++) {
                const int64_t col = 32 * c + j;
                if (col >= c1) break;
                if (j % 16 == 0 && col / L->beta1 != g) tile_stats_vw(L, &cursor, g = col / L->beta1, r0, q, &scale, &zero);
                const vf codes = __builtin_convertvector(column_codes_vw(planes, j, WB), vf);
                *(vf_unaligned *)(dst + (col - c0) * nb + q * VW) = (codes - zero) * scale;
            }
        }
    }
}

static void decode_tile_vw_any(const spqr_layer *L, int64_t r0, int64_t c0, int64_t c1, float *dst, int nb) {
    SPQR_FOR_WBITS(L->wbits, decode_tile_vw(L, r0, c0, c1, dst, nb, WB))
}

#if SPQR_AVX2
/* AVX2 (no AVX-512): the table-lookup product of the AVX-512 path with 8-entry tables, one per 3 columns: each 16-column
 * half of a chunk takes tables of columns 0-2, 3-5, 6-8, 9-11, 12-14 and 15 (so that no lookup crosses a group of
 * beta1, a multiple of 16), lut3 [ceil(K/16)][6][8]: lut3[h][t][p] = sum over the bits j of p of x[16h + 3t + j]
 * (only bit 0 for t = 5). Per bit-plane, 8 rows at a time: one permute per 3 columns, its index the plane word
 * shifted (the permute reads the low 3 bits). */
static void build_lut3(const float *x, int64_t K, float *lut3) {
    for (int64_t h = 0; h < ceil_div(K, 16); h++)
        for (int t = 0; t < 6; t++)
            for (int p = 0; p < 8; p++) {
                float v = 0.0f;
                for (int j = 0; j < (t < 5 ? 3 : 1); j++) {
                    const int64_t k = 16 * h + 3 * t + j;
                    if (((p >> j) & 1) && k < K) v += x[k];
                }
                lut3[(h * 6 + t) * 8 + p] = v;
            }
}

/* sum_j code_j x_j over one 16-column half (bits s .. s + 15 of the plane words) for 8 rows (planes: their words,
 * planes 16 words apart); tables: that half's six of lut3. */
static inline __attribute__((always_inline)) __m256 half_dot8(const int32_t *planes, const __m256 *tables, const int s,
                                                              const int WB) {
    __m256 dot = _mm256_setzero_ps();
    for (int b = WB - 1; b >= 0; b--) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(planes + b * TILE));
        __m256 sum = _mm256_permutevar8x32_ps(tables[0], _mm256_srli_epi32(v, s));
        for (int t = 1; t < 6; t++)
            sum = _mm256_add_ps(sum, _mm256_permutevar8x32_ps(tables[t], _mm256_srli_epi32(v, s + 3 * t)));
        dot = b == WB - 1 ? sum : _mm256_fmadd_ps(dot, _mm256_set1_ps(2.0f), sum);
    }
    return dot;
}

/* bit_lanes[m][i] = bit i of m as 0.0 or 1.0: the 8 lanes of a byte of statistic-code bits, one load */
static float bit_lanes[256][8];
__attribute__((constructor)) static void fill_bit_lanes(void) {
    for (int m = 0; m < 256; m++)
        for (int i = 0; i < 8; i++) bit_lanes[m][i] = (float)((m >> i) & 1);
}

/* Scale and zero of the tile at cursor c (mode 1: bilevel, beta2 a multiple of 16) in group g for rows 8r .. 8r + 7
 * (r = 0, 1): sum_b 2^b bit_b * second_scale - second_zero * second_scale, by FMAs on bit_lanes (the product
 * (code - zero) * scale of tile_stats_vw in other roundings; on 4096^2 the whole product measured 1-8% faster than
 * with it). Each code byte holds 8 rows' bits of one plane. QQ: qq_bits as a constant, or 0 (read from c). */
static inline __attribute__((always_inline)) void tile_stats_avx2(const tile_cursor *c, int64_t g, __m256 *scale,
                                                                  __m256 *zero, const int QQ) {
    const int64_t qq = QQ ? QQ : c->qq;
    const uint8_t *scale_codes = (const uint8_t *)c->scale_codes + g * c->code_stride;
    const uint8_t *zero_codes = (const uint8_t *)c->zero_codes + g * c->code_stride;
    const float ss = half_to_float(c->scale_scale[g]), zs = half_to_float(c->zero_scale[g]);
    const float sz = half_to_float(c->scale_zero[g]), zz = half_to_float(c->zero_zero[g]);
    for (int r = 0; r < 2; r++) {
        __m256 s = _mm256_set1_ps(-sz * ss), z = _mm256_set1_ps(-zz * zs);
#pragma GCC unroll 8
        for (int64_t b = 0; b < qq; b++) {
            s = _mm256_fmadd_ps(_mm256_loadu_ps(bit_lanes[scale_codes[4 * b + r]]), _mm256_set1_ps(ss * (float)(1 << b)), s);
            z = _mm256_fmadd_ps(_mm256_loadu_ps(bit_lanes[zero_codes[4 * b + r]]), _mm256_set1_ps(zs * (float)(1 << b)), z);
        }
        scale[r] = s;
        zero[r] = z;
    }
}

/* gemv_tile_vw by table lookup (beta1 a multiple of 16, full tile), group by group (no divisions per column half:
 * they took ~15% of a 4096^2 product). QQ: qq_bits as a constant, or 0. */
static inline __attribute__((always_inline)) void gemv_tile_avx2(const spqr_layer *L, const float *lut3, const float *x,
                                                                 const float *group_sums, float *y, int64_t r0,
                                                                 const int WB, const int QQ) {
    const int64_t K = L->in_features, halves_per_group = L->beta1 / 16, n_halves = ceil_div(K, 16);
    const int32_t *tile = L->qweight + (r0 / TILE) * ceil_div(K, 32) * WB * TILE;
    const tile_cursor cursor = tile_cursor_at(L, r0);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, scale[2], zero[2];
    __m256 zero_term[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0, h = 0; h < n_halves; g++) {
        if (cursor.mode == 1) tile_stats_avx2(&cursor, g, scale, zero, QQ);
        else {
            float sv[TILE], zv[TILE];
            tile_stats(L, g, r0, TILE, sv, zv);
            memcpy(scale, sv, sizeof sv);
            memcpy(zero, zv, sizeof zv);
        }
        for (int r = 0; r < 2; r++)
            zero_term[r] = _mm256_fmadd_ps(_mm256_mul_ps(scale[r], zero[r]), _mm256_set1_ps(group_sums[g]), zero_term[r]);
        for (const int64_t group_end = h + halves_per_group < n_halves ? h + halves_per_group : n_halves;
             h < group_end; h++) {
            __m256 tables[6];
            for (int t = 0; t < 6; t++) tables[t] = _mm256_loadu_ps(lut3 + (h * 6 + t) * 8);
            const int32_t *planes = tile + (h / 2) * WB * TILE;
            for (int r = 0; r < 2; r++) { /* rows 0-7, 8-15 */
                const __m256 dot = h & 1 ? half_dot8(planes + 8 * r, tables, 16, WB)
                                         : half_dot8(planes + 8 * r, tables, 0, WB);
                acc[r] = _mm256_fmadd_ps(dot, scale[r], acc[r]);
            }
        }
    }
    float out[TILE];
    _mm256_storeu_ps(out, _mm256_sub_ps(acc[0], zero_term[0]));
    _mm256_storeu_ps(out + 8, _mm256_sub_ps(acc[1], zero_term[1]));
    for (int i = 0; i < TILE; i++) y[r0 + i] = out[i] + outlier_dot(L, r0 + i, x);
}

static void gemv_tile_avx2_any(const spqr_layer *L, const float *lut3, const float *x, const float *group_sums, float *y,
                               int64_t r0) {
    if (L->qq_bits == 3) SPQR_FOR_WBITS(L->wbits, gemv_tile_avx2(L, lut3, x, group_sums, y, r0, WB, 3))
    else SPQR_FOR_WBITS(L->wbits, gemv_tile_avx2(L, lut3, x, group_sums, y, r0, WB, 0))
}
#endif

static SPQR_FMA_CONTRACT void gemv_tile_vw_any(const spqr_layer *L, const float *x, const float *group_sums, float *y,
                                               int64_t r0) {
    SPQR_FOR_WBITS(L->wbits, gemv_tile_vw(L, x, group_sums, y, r0, WB))
}
#endif

#if SPQR_AVX512
/* The first-level codes of the statistics (bilevel, mode 1) are decoded in one of two ways: by qq masked adds of
 * precomputed multiples (any AVX-512), or where the CPU has byte permutes (AVX512-VBMI) and GF(2) affine
 * transforms (GFNI) by transposing their bit-planes into one byte per row (decode_group_codes): fewer operations,
 * and only the group's two coefficients per statistic to prepare (matrix-vector product 1-2% faster, cold). */
#if defined(__AVX512VBMI__) && defined(__GFNI__)
#define SPQR_CODE_TRANSPOSE 1
#else
#define SPQR_CODE_TRANSPOSE 0
#endif

/* Bilevel statistics of one 16-row tile (mode 1) as coefficients per group g, [2 qq + 2][n_groups]:
 *   scale(g)            = sum over the set bits b of the scale code of coef[b][g]          + coef[qq][g]
 *   zero(g) * xsum(g)   = sum over the set bits b of the zero code of coef[qq + 1 + b][g]  + coef[2 qq + 1][g]
 * with coef[b] = 2^b * second-level scale, coef[qq] = -second-level zero * scale (zero: the same, times the
 * group's sum of x). The masked-add decoder reads them all; the transposing one only coef[0] and coef[qq]
 * (scale = code * coef[0] + coef[qq]), so `multiples` (qq or 1) says how many of coef[0 .. qq-1] to write. */
static void bilevel_coefficients(const spqr_layer *L, int64_t r0, const float *group_sums, float *coef,
                                 int64_t multiples) {
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
            for (int64_t b = 0; b < multiples; b++, unit = _mm512_add_ps(unit, unit))
                _mm512_mask_storeu_ps(c + b * n_groups, k, unit);
        }
    }
}

/* Ask early for the second-level statistics of the tile at row r (bilevel, with beta2 | 16), read at its start
 * (measured with cold caches, together with the outliers' prefetch: 4-5% faster). */
static inline void prefetch_second_level(const spqr_layer *L, int64_t r, int64_t n_groups) {
    if (r + TILE > L->out_features || r % L->beta2) return; /* none, or read with an earlier tile's */
    const int64_t s2 = (r / L->beta2) * n_groups;
    const uint16_t *second[4] = {L->scale_scale + s2, L->scale_zero + s2, L->zero_scale + s2, L->zero_zero + s2};
    for (int a = 0; a < 4; a++)
        for (int64_t g = 0; g < n_groups; g += 32) _mm_prefetch((const char *)(second[a] + g), _MM_HINT_T0);
}

/* Runs the statements with t = 0 and, if NT > 1, t = 1 (NT a compile-time constant): indices known from the start,
 * so that arrays indexed by t stay in registers (with a loop under `#pragma GCC unroll`, GCC kept them in memory). */
#define FOR_EACH_TILE(NT, t, ...)   \
    do {                            \
        { const int t = 0; __VA_ARGS__ } \
        if ((NT) > 1) { const int t = 1; __VA_ARGS__ } \
    } while (0)

/* sum over the set bits b (mask from the 16-bit half-words at codes + 4 b) of coef[b * stride] + coef[qq * stride]
 * (unrolled where qq is a compile-time constant after inlining: the matrix-vector product measured 7-12% faster) */
static inline __attribute__((always_inline)) __m512 masked_sum16(const char *codes, int64_t qq, const float *coef,
                                                                 int64_t stride) {
    __m512 v = _mm512_set1_ps(coef[qq * stride]);
#pragma GCC unroll 8
    for (int64_t b = 0; b < qq; b++) v = _mm512_mask_add_ps(v, load_mask16(codes + 4 * b), v, _mm512_set1_ps(coef[b * stride]));
    return v;
}

#if SPQR_CODE_TRANSPOSE
/* Constants that turn a group's first-level codes of a tile pair (or one tile) from bit-planes into one byte per
 * row: a two-source byte permute (gather) puts each 8-row slice of each statistic's planes into a qword, plane b in
 * byte 7 - b (keep: the bytes that hold a plane); that qword is an 8x8 bit matrix, which a GF(2) affine transform of
 * the bytes 1 << j (unit_bytes) transposes: result byte j = the code of the slice's row j. Output qword q holds
 * statistic q / 4 (scale, zero), tile (q / 2) % 2, rows 8 (q % 2) ..; spread[2 s + t] moves statistic s of tile t
 * into the low bytes of 16 dword lanes. */
typedef struct {
    __m512i gather, unit_bytes, spread[4];
    __mmask64 keep, load; /* load: the 4 qq bytes of plane words of one group */
} code_transpose;

/* first_byte: where the first tile's rows start in the 32-row plane words (0, or 2 for a lone upper tile) */
static inline code_transpose code_transpose_at(int64_t qq, int first_byte) {
    uint8_t gather[64], unit[64], spread[4][64];
    uint64_t keep = 0;
    for (int q = 0; q < 8; q++)
        for (int j = 0; j < 8; j++) {
            const int stat = q / 4, tile = (q / 2) % 2, half = q % 2, plane = 7 - j;
            gather[8 * q + j] = (uint8_t)(64 * stat + 4 * plane + 2 * tile + half + first_byte);
            if (plane < qq) keep |= 1ull << (8 * q + j);
            unit[8 * q + j] = (uint8_t)(1u << j);
        }
    for (int st = 0; st < 4; st++)
        for (int i = 0; i < 64; i++) spread[st][i] = (uint8_t)(16 * st + i / 4);
    code_transpose ct;
    ct.gather = _mm512_loadu_si512(gather);
    ct.unit_bytes = _mm512_loadu_si512(unit);
    for (int st = 0; st < 4; st++) ct.spread[st] = _mm512_loadu_si512(spread[st]);
    ct.keep = keep;
    ct.load = qq >= 8 ? ~0ull >> 32 : (1ull << (4 * qq)) - 1;
    return ct;
}

/* The NT tiles' scales in group g (scale[t]), and acc[t] -= scale * zero * (sum of x over the group); scale_codes,
 * zero_codes: the pair's plane words of group 0 (groups 4 qq bytes apart); coef: NT x coef_len coefficients. */
static inline __attribute__((always_inline)) void decode_group_codes(const code_transpose *ct, const char *scale_codes,
                                                                     const char *zero_codes, const float *coef,
                                                                     int64_t coef_len, int64_t g, int64_t qq,
                                                                     int64_t n_groups, __m512 *acc, __m512 *scale,
                                                                     const int NT) {
    const __m512i planes = _mm512_maskz_permutex2var_epi8(
        ct->keep, _mm512_maskz_loadu_epi8(ct->load, scale_codes + 4 * qq * g), ct->gather,
        _mm512_maskz_loadu_epi8(ct->load, zero_codes + 4 * qq * g));
    const __m512i codes = _mm512_gf2p8affine_epi64_epi8(ct->unit_bytes, planes, 0);
    const __mmask64 low_bytes = 0x1111111111111111ull;
    FOR_EACH_TILE(NT, t,
        const float *c = coef + t * coef_len + g;
        const __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(low_bytes, ct->spread[t], codes)),
                                         _mm512_set1_ps(c[0]), _mm512_set1_ps(c[qq * n_groups]));
        const __m512 zero_xsum = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(low_bytes, ct->spread[2 + t], codes)),
            _mm512_set1_ps(c[(qq + 1) * n_groups]), _mm512_set1_ps(c[(2 * qq + 1) * n_groups]));
        acc[t] = _mm512_fnmadd_ps(s, zero_xsum, acc[t]);
        scale[t] = s;
    );
}
#endif

/* sum_j code_j x_j of a tile's 16 rows over 16 columns (HIGH: the high halves of the chunk's plane words), by table
 * lookup: table[q][p] = sum of x[4q + j] over the bits j set in p (see spqr_gemv), so for each bit-plane b the 4-bit
 * slices of the 16 rows' plane words pick, with one permute per 4 columns, the partial dot products
 * s_b = sum_j bit_b(code_j) x_j of all 16 rows at once; sum_j code_j x_j = sum_b 2^b s_b (Horner).
 * HIGH and WB are compile-time constants after inlining. */
static inline __attribute__((always_inline)) __m512 half_dot(const int32_t *planes, const float *table, const int HIGH,
                                                             const int WB) {
    const __m512 t0 = _mm512_load_ps(table), t1 = _mm512_load_ps(table + 16);
    const __m512 t2 = _mm512_load_ps(table + 32), t3 = _mm512_load_ps(table + 48);
    const int s = 16 * HIGH;
    __m512 dot = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int b = WB - 1; b >= 0; b--) {
        const __m512i v = _mm512_loadu_si512(planes + b * TILE);
        /* permutes read the low 4 bits of each lane: no masking needed */
        const __m512 sum = _mm512_add_ps(
            _mm512_add_ps(_mm512_permutexvar_ps(s ? _mm512_srli_epi32(v, s) : v, t0),
                          _mm512_permutexvar_ps(_mm512_srli_epi32(v, s + 4), t1)),
            _mm512_add_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, s + 8), t2),
                          _mm512_permutexvar_ps(_mm512_srli_epi32(v, s + 12), t3)));
        dot = b == WB - 1 ? sum : _mm512_fmadd_ps(dot, _mm512_set1_ps(2.0f), sum);
    }
    return dot;
}

/* How gemv_tiles decodes the statistics (a compile-time constant): STATS_TRANSPOSED (decode_group_codes: bilevel
 * mode 1 where SPQR_CODE_TRANSPOSE), a positive qq_bits (masked sums of mode 1, unrolled), or STATS_ANY. */
#define STATS_TRANSPOSED (-1)
#define STATS_ANY 0

/* Group g's scales of the NT tiles from r0 into scale[t], and acc[t] -= scale * zero * (sum of x over the group).
 * coef: NT x coef_len coefficients (bilevel_coefficients); ct, pair_codes: decode_group_codes' constants and the
 * pair's scale and zero plane words of group 0 (used with STATS_TRANSPOSED only). */
static inline __attribute__((always_inline)) void tiles_group_scale(const spqr_layer *L, const tile_cursor *cursor,
                                                                    const void *ct, const char *const *pair_codes,
                                                                    const float *coef, int64_t coef_len,
                                                                    const float *group_sums, int64_t g, int64_t r0,
                                                                    __m512 *acc, __m512 *scale, const int NT,
                                                                    const int STATS) {
    const int64_t n_groups = ceil_div(L->in_features, L->beta1);
#if SPQR_CODE_TRANSPOSE
    if (STATS == STATS_TRANSPOSED) {
        decode_group_codes((const code_transpose *)ct, pair_codes[0], pair_codes[1], coef, coef_len, g, L->qq_bits,
                           n_groups, acc, scale, NT);
        return;
    }
#endif
    (void)ct, (void)pair_codes;
    FOR_EACH_TILE(NT, t,
        const tile_cursor *c = &cursor[t];
        __m512 zero_xsum; /* zero * (sum of x over the group) */
        if (STATS > 0 || c->mode == 1) {
            const int64_t qq = STATS > 0 ? STATS : c->qq;
            const float *tc = coef + t * coef_len + g;
            scale[t] = masked_sum16(c->scale_codes + g * c->code_stride, qq, tc, n_groups);
            zero_xsum = masked_sum16(c->zero_codes + g * c->code_stride, qq, tc + (qq + 1) * n_groups, n_groups);
        } else {
            tile_stats16(L, c, g, r0 + t * TILE, &scale[t], &zero_xsum);
            zero_xsum = _mm512_mul_ps(zero_xsum, _mm512_set1_ps(group_sums[g]));
        }
        acc[t] = _mm512_fnmadd_ps(scale[t], zero_xsum, acc[t]);
    );
}

/* NT (1 or 2) full 16-row tiles from row r0 with WB bits per code (NT, WB, STATS compile-time constants after
 * inlining), by table lookup (half_dot) over the 16-column halves of each 32-column chunk. Two tiles go chunk by
 * chunk side by side: the hardware prefetcher then follows two weight streams, and each table load serves both
 * (measured with the weights not in cache: 4-11% faster than one tile at a time; four tiles: no faster than two).
 * One accumulator per tile takes the products and, group by group, minus scale * zero * (sum of x): with the
 * statistics' mode a constant too, 2-5% faster (cold) than separate sums, which GCC kept in memory.
 * coef: scratch of NT x [2 qq + 2][n_groups] floats for bilevel_coefficients. */
static inline __attribute__((always_inline)) void gemv_tiles(const spqr_layer *L, const float *lut, const float *x,
                                                             const float *group_sums, float *coef, float *y,
                                                             int64_t r0, const int NT, const int WB, const int STATS) {
    const int64_t K = L->in_features, n_chunks = ceil_div(K, 32), halves_per_group = L->beta1 / 16;
    const int64_t n_groups = ceil_div(K, L->beta1), coef_len = (2 * L->qq_bits + 2) * n_groups;
    const int64_t chunk_words = WB * TILE, tile_words = n_chunks * chunk_words;
    const int32_t *tile[2];
    tile_cursor cursor[2];
    __m512 acc[2], scale[2];
    const char *outlier_cols[2], *outlier_vals[2]; /* a tile's outliers, read at its end (outlier_dot) */
    int64_t outlier_col_bytes[2], outlier_val_bytes[2];
    const int64_t col_bytes = L->outlier_col_int32 ? 4 : 2;
    const void *ct = NULL;
    const char *pair_codes[2] = {NULL, NULL};
#if SPQR_CODE_TRANSPOSE
    code_transpose transpose;
    if (STATS == STATS_TRANSPOSED) {
        transpose = code_transpose_at(L->qq_bits, (int)((r0 & 31) / 8));
        ct = &transpose;
        const int64_t words = (r0 / 32) * n_groups * L->qq_bits * 4; /* bytes: the pair's plane words */
        pair_codes[0] = (const char *)L->scale_codes + words;
        pair_codes[1] = (const char *)L->zero_codes + words;
    }
#endif
    FOR_EACH_TILE(NT, t,
        const int64_t rt = r0 + t * TILE, p0 = L->row_ptr[rt], nnz = L->row_ptr[rt + TILE] - p0;
        tile[t] = L->qweight + (rt / TILE) * tile_words;
        cursor[t] = tile_cursor_at(L, rt);
        if (cursor[t].mode == 1) {
            prefetch_second_level(L, rt + NT * TILE, n_groups); /* this slot's next tile */
            bilevel_coefficients(L, rt, group_sums, coef + t * coef_len, STATS == STATS_TRANSPOSED ? 1 : L->qq_bits);
        }
        outlier_cols[t] = (const char *)L->outlier_col + p0 * col_bytes;
        outlier_vals[t] = (const char *)(L->outlier_val + p0);
        outlier_col_bytes[t] = nnz * col_bytes;
        outlier_val_bytes[t] = nnz * 2;
        acc[t] = _mm512_setzero_ps();
    );
    tiles_group_scale(L, cursor, ct, pair_codes, coef, coef_len, group_sums, 0, r0, acc, scale, NT, STATS);
    int64_t g = 0, halves_left = halves_per_group; /* group g has halves_left halves to go */
    for (int64_t c = 0; c < n_chunks; c++) {
        /* Prefetches, measured with the weights not in cache: into L1 (20% faster), further ahead into L2 (2-4% more),
         * the first-level statistics' codes PREFETCH_FAR groups ahead (2% more; both tiles of a pair share them), the
         * tile's outliers a cache line per chunk into L2 (2-4% more than asking for them all at the tile's start) */
        FOR_EACH_TILE(NT, t,
            /* past the tile's end a stream goes on into this slot's next tile (the pair's other tile lies between) */
            const int32_t *near = tile[t] + (c + PREFETCH_NEAR) * chunk_words +
                                  (c + PREFETCH_NEAR >= n_chunks ? (NT - 1) * tile_words : 0);
            const int32_t *far = tile[t] + (c + PREFETCH_FAR) * chunk_words +
                                 (c + PREFETCH_FAR >= n_chunks ? (NT - 1) * tile_words : 0);
            for (int b = 0; b < WB; b++) {
                _mm_prefetch((const char *)(near + b * TILE), _MM_HINT_T0);
                _mm_prefetch((const char *)(far + b * TILE), _MM_HINT_T2);
            }
            if (64 * c <= outlier_col_bytes[t]) _mm_prefetch(outlier_cols[t] + 64 * c, _MM_HINT_T1);
            if (64 * c <= outlier_val_bytes[t]) _mm_prefetch(outlier_vals[t] + 64 * c, _MM_HINT_T1);
        );
        if (STATS != STATS_ANY || cursor[0].mode == 1) {
            _mm_prefetch(cursor[0].scale_codes + (g + PREFETCH_FAR) * cursor[0].code_stride, _MM_HINT_T0);
            _mm_prefetch(cursor[0].zero_codes + (g + PREFETCH_FAR) * cursor[0].code_stride, _MM_HINT_T0);
        }
        const float *table = lut + c * 128;
        FOR_EACH_TILE(NT, t,
            acc[t] = _mm512_fmadd_ps(half_dot(tile[t] + c * WB * TILE, table, 0, WB), scale[t], acc[t]););
        if (32 * c + 16 >= K) break;
        if (--halves_left == 0) {
            halves_left = halves_per_group;
            tiles_group_scale(L, cursor, ct, pair_codes, coef, coef_len, group_sums, ++g, r0, acc, scale, NT, STATS);
        }
        FOR_EACH_TILE(NT, t,
            acc[t] = _mm512_fmadd_ps(half_dot(tile[t] + c * WB * TILE, table + 64, 1, WB), scale[t], acc[t]););
        if (--halves_left == 0 && 32 * c + 32 < K) {
            halves_left = halves_per_group;
            tiles_group_scale(L, cursor, ct, pair_codes, coef, coef_len, group_sums, ++g, r0, acc, scale, NT, STATS);
        }
    }
    for (int t = 0; t < NT; t++)
        _mm512_storeu_ps(y + r0 + t * TILE, _mm512_add_ps(acc[t], tile_outlier_dots(L, r0 + t * TILE, x)));
}

/* gemv_tiles with the layer's wbits and statistics decoder as constants (NT a compile-time constant at each call). */
static inline __attribute__((always_inline)) void gemv_tiles_dispatch(const spqr_layer *L, const float *lut,
                                                                      const float *x, const float *group_sums,
                                                                      float *coef, float *y, int64_t r0, const int NT) {
    const int mode1 = L->qq_bits && L->beta2 % TILE == 0;
    if (mode1 && SPQR_CODE_TRANSPOSE)
        SPQR_FOR_WBITS(L->wbits, gemv_tiles(L, lut, x, group_sums, coef, y, r0, NT, WB, STATS_TRANSPOSED))
    else if (mode1 && L->qq_bits == 3)
        SPQR_FOR_WBITS(L->wbits, gemv_tiles(L, lut, x, group_sums, coef, y, r0, NT, WB, 3))
    else
        SPQR_FOR_WBITS(L->wbits, gemv_tiles(L, lut, x, group_sums, coef, y, r0, NT, WB, STATS_ANY))
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

/* x [K] = x_in in the sweep's column order, and group_sums [n_groups] its sums over each group of beta1 columns.
 * Before the threads start, so vectorized: 16 columns at a time with one gather (the scalar loops took 3-4% of a
 * 4096^2 call, the sums' chain of dependent adds most of it). */
static int permute_input(const spqr_layer *L, const float *x_in, float *x, float *group_sums) {
    const int64_t K = L->in_features, n_groups = ceil_div(K, L->beta1);
    int64_t g0 = 0; /* groups below g0 are summed */
    int bad = 0;    /* an input out of range (SPQR_INPUT_LIMIT) */
#if SPQR_AVX512
    if (L->beta1 % 16 == 0) {
        __mmask16 beyond = 0;
        for (int64_t g = 0; g < n_groups; g++) {
            __m512 sum = _mm512_setzero_ps();
            for (int64_t k = g * L->beta1; k < (g + 1) * L->beta1 && k < K; k += 16) {
                const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
                const __m512 v = load_x_perm16(L, x_in, k, m);
                beyond |= out_of_range16(v);
                _mm512_mask_storeu_ps(x + k, m, v);
                sum = _mm512_add_ps(sum, v);
            }
            group_sums[g] = _mm512_reduce_add_ps(sum);
        }
        g0 = n_groups;
        bad = beyond != 0;
    }
#endif
    for (int64_t k = g0 * L->beta1; k < K; k++) {
        x[k] = x_in[perm_index(L, k)];
        bad |= out_of_range(x[k]);
    }
    for (int64_t g = g0; g < n_groups; g++) {
        float s = 0.0f;
        const int64_t c1 = (g + 1) * L->beta1 < K ? (g + 1) * L->beta1 : K;
        for (int64_t c = g * L->beta1; c < c1; c++) s += x[c];
        group_sums[g] = s;
    }
    return bad;
}

/* y [M][N] = x [M][K] W^T for a few input rows x (original column order): token generation (M = 1) and batched
 * decoding. Each thread takes its tiles two at a time and runs each pair over all M rows, so a pair's weights come
 * from memory once and stay in cache for the other rows (2-16 rows: up to ~15% faster per row than a call per row,
 * most on small layers, as the loop is bound by arithmetic); a row's arithmetic, and so its result, does not depend
 * on M. */
int spqr_gemv(const spqr_layer *L, int64_t M, const float *x_in, float *y, int n_threads) {
    const int64_t N = L->out_features, K = L->in_features, n_groups = ceil_div(K, L->beta1);
    const int64_t n_tiles = ceil_div(N, TILE);
    int use_lut = 0; /* the table-lookup path (full 16-row tiles, beta1 a multiple of 16) */
#if SPQR_AVX512 || SPQR_AVX2
    use_lut = L->beta1 % 16 == 0 && N >= TILE && L->wbits >= 1 && L->wbits <= 8;
#endif
    /* workspace: each row's group sums and x in the sweep's column order, then each thread's tables (one per row) and
     * coefficients (each thread builds its own tables: reading one built by another core measured 4-5% slower on
     * 4096^2, 15-20% on 576^2) */
    const size_t row_bytes = region(sizeof(float) * (size_t)(n_groups + K));
    const size_t lut_floats = SPQR_AVX2 ? 48 * (size_t)ceil_div(K, 16) : 128 * (size_t)ceil_div(K, 32); /* lut3, lut */
    const size_t lut_bytes = use_lut ? region(sizeof(float) * lut_floats) : 0;
    const size_t coef_bytes =
        use_lut && SPQR_AVX512 ? region(2 * sizeof(float) * (size_t)((2 * L->qq_bits + 2) * n_groups)) : 0;
    const size_t thread_bytes = (size_t)M * lut_bytes + coef_bytes;
    workspace ws = workspace_acquire((size_t)M * row_bytes + (size_t)n_threads * thread_bytes);
    if (!ws.ptr) return 1;
    int bad = 0;
    for (int64_t m = 0; m < M; m++) {
        float *row = (float *)(ws.ptr + m * row_bytes); /* group sums, then x */
        bad |= permute_input(L, x_in + m * K, row + n_groups, row);
    }
    if (bad) {
        workspace_release(ws);
        return SPQR_INPUT_OUT_OF_RANGE;
    }
#pragma omp parallel num_threads(n_threads)
    {
        char *own = ws.ptr + (size_t)M * row_bytes + (size_t)thread_index() * thread_bytes;
        float *coef = use_lut ? (float *)(own + M * lut_bytes) : NULL;
#if SPQR_AVX512
        if (use_lut)
            for (int64_t m = 0; m < M; m++)
                build_lut((const float *)(ws.ptr + m * row_bytes) + n_groups, K, (float *)(own + m * lut_bytes));
#elif SPQR_AVX2
        if (use_lut)
            for (int64_t m = 0; m < M; m++)
                build_lut3((const float *)(ws.ptr + m * row_bytes) + n_groups, K, (float *)(own + m * lut_bytes));
#endif
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < ceil_div(n_tiles, 2); pair++) { /* tiles 2 pair and 2 pair + 1 */
            const int64_t p0 = 2 * pair * TILE;
            for (int64_t m = 0; m < M; m++) {
                const float *group_sums = (const float *)(ws.ptr + m * row_bytes), *x = group_sums + n_groups;
                const float *lut = use_lut ? (const float *)(own + m * lut_bytes) : NULL;
                float *ym = y + m * N;
#if SPQR_AVX512
                if (use_lut && N - p0 >= 2 * TILE) {
                    gemv_tiles_dispatch(L, lut, x, group_sums, coef, ym, p0, 2);
                    continue;
                }
#endif
                for (int64_t r0 = p0; r0 < N && r0 < p0 + 2 * TILE; r0 += TILE) {
                    const int n = (int)(N - r0 < TILE ? N - r0 : TILE);
#if SPQR_AVX512
                    if (use_lut && n == TILE) {
                        gemv_tiles_dispatch(L, lut, x, group_sums, coef, ym, r0, 1);
                        continue;
                    }
#endif
#if SPQR_AVX2
                    if (use_lut && n == TILE) {
                        gemv_tile_avx2_any(L, lut, x, group_sums, ym, r0);
                        continue;
                    }
#endif
#if !SPQR_AVX512
                    if (n == TILE) {
                        gemv_tile_vw_any(L, x, group_sums, ym, r0);
                        continue;
                    }
#endif
                    gemv_tile_plain(L, x, ym, r0, n);
                }
                (void)lut;
            }
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
#define MR 12  /* micro-kernel: MR rows of W x 32 rows of X (24 accumulators) */

#if SPQR_AVX512
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
            const __m512i q = column_codes(planes, j, WB);
            _mm512_storeu_ps(dst + (col - c0) * nb, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), zero), scale));
        }
    }
}
#endif

/* see spqr_cpu.h */
void decode_block(const spqr_layer *L, int64_t r0, int n, int nb, int64_t c0, int64_t c1, float *buf,
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
#else
        if (tn == TILE) {
            decode_tile_vw_any(L, r0 + t0, c0, c1, buf + t0, nb);
            continue;
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
static SPQR_FMA_CONTRACT void block_multiply(const float *buf, int nb, const float *xp, float *acc, int64_t K, int64_t Mp,
                           int64_t c0, int64_t kn) {
    int64_t m_start = 0;
#if SPQR_AVX512
    /* 6 rows of W x 64 rows of X (two panels) where there are 64: 10 loads per 24 FMAs instead of 14
     * (measured: 3-7% faster at 512 rows); the 12 x 32 kernel below takes a last 32 rows */
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
            for (int j0 = 0; j0 < 32; j0 += 16) /* 6 rows of W x 16 rows of X (AVX2: 12 accumulators; NEON: 24) */
                for (int i0 = 0; i0 < MR; i0 += 6) {
                    vf a[6][16 / VW];
                    for (int i = 0; i < 6; i++)
                        for (int q = 0; q < 16 / VW; q++)
                            a[i][q] = *(const vf_unaligned *)(arow + (i0 + i) * Mp + j0 + VW * q);
                    for (int64_t k = 0; k < kn; k++) {
                        vf xv[16 / VW];
                        for (int q = 0; q < 16 / VW; q++) xv[q] = *(const vf_unaligned *)(panel + k * 32 + j0 + VW * q);
#pragma GCC unroll 6
                        for (int i = 0; i < 6; i++) {
                            const float wv = w[k * nb + i0 + i];
                            for (int q = 0; q < 16 / VW; q++) a[i][q] += wv * xv[q];
                        }
                    }
                    for (int i = 0; i < 6; i++)
                        for (int q = 0; q < 16 / VW; q++)
                            *(vf_unaligned *)(arow + (i0 + i) * Mp + j0 + VW * q) = a[i][q];
                }
#endif
        }
    }
}

/* y[m][i] = acc[i][m] for i < n, m < M (acc [n][Mp], y rows N apart): per row of y, 16 values at a time by one
 * gather down acc's columns (scalar copies made a 576 x 576 product at 256 rows 4-6% slower). */
static void store_transposed(const float *acc, int n, int64_t Mp, int64_t M, float *y, int64_t N) {
#if SPQR_AVX512
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)Mp));
    for (int i0 = 0; i0 < n; i0 += 16) {
        const __mmask16 valid = n - i0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i0)) - 1u);
        const float *column = acc + (int64_t)i0 * Mp;
        for (int64_t m = 0; m < M; m++)
            _mm512_mask_storeu_ps(y + m * N + i0, valid,
                                  _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, rows, column + m, 4));
    }
#else
    for (int64_t m = 0; m < M; m++)
        for (int i = 0; i < n; i++) y[m * N + i] = acc[(int64_t)i * Mp + m];
#endif
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
            store_transposed(acc, n, Mp, M, y + r0, N);
        }
        free(buf);
        free(acc);
        free(next_outlier);
    }
    free(xp);
    return failed;
}

int spqr_has_avx512(void) { return SPQR_AVX512; }
int spqr_has_avx2(void) { return SPQR_AVX2; }
#ifdef _OPENMP
int spqr_has_openmp(void) { return 1; }
#else
int spqr_has_openmp(void) { return 0; } /* built without it (cpu.py's fallback): one thread */
#endif
