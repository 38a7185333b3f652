/* Matrix-matrix on AMX tiles, spqr_gemm_amx (the layer layout and the other kernels: spqr_cpu.c).
 *
 * y = sum_g scale_g * (sum_{k in g} code_k x_k) - sum_g scale_g zero_g * (sum_{k in g} x_k) + outliers.
 * The inner sums run on the AMX tile unit (TDPBF16PS: bf16 products summed in fp32) without losing fp32
 * precision: codes are small integers, exact in bf16, and each x is split into three bf16 parts
 * hi + mid + lo == x (8 + 8 + 8 significant bits), so every product is exact and only the fp32 sums
 * round, as in any fp32 matmul. Per 16 rows of X, 16 rows of W and 16 columns (one block; beta1 is a
 * multiple of 16), two tile products with the same B tile (the block's codes, twice):
 *     C [16 x 16] fp32 += A_hm [16 x 32: hi | mid of the 16 columns] . B [codes; codes]
 *     C              += A_lo [16 x 32: lo | zeros]                  . B
 * Scales and zero terms are applied with AVX-512 once per group, outliers from a transposed copy of X. With
 * beta1 = 16 (a group per block) each step takes two groups of one W tile, so that this AVX-512 work reads and
 * writes the running sums once per two groups (measured 4-9% faster than a step of one group and two W tiles). */
#include "spqr_cpu.h"

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

/* Eight tiles of 16 x 64 bytes; amx_pass_products and amx_pass_products_two_groups say what each holds. */
static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
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
        const __m512i q0 = column_codes(v, 2 * p, WB), q1 = column_codes(v, 2 * p + 1, WB);
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
            for (int64_t k = k0; k < k1; k += 16) { /* x_perm, 16 columns at a time (zero past K and M) */
                const __mmask16 valid = m >= M || k >= K ? 0
                                        : K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
                const float *xm = x + (m < M ? m : 0) * K;
                __m512 v;
                if (!L->perm) v = _mm512_maskz_loadu_ps(valid, xm + k);
                else { /* one gather (a scalar loop made 256-row products of 576-wide layers 5-7% slower) */
                    const __m512i cols = L->perm_int32
                        ? _mm512_maskz_loadu_epi32(valid, (const int32_t *)L->perm + k)
                        : _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(valid, (const int16_t *)L->perm + k));
                    v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, cols, xm, 4);
                }
                _mm512_storeu_ps(row + k, v);
            }
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
    float *cbuf;               /* C tiles on their way to acc: [AMX_NT][256] (a group's sums over its blocks) */
} amx_buffers;

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

/* acc += the pass's products for every 16 rows of X and the nt W tiles of the task, for groups of several blocks
 * (tmm0, tmm1: C of two W tiles; tmm2: A_hm; tmm3: A_lo; tmm4, tmm5: B of the two W tiles). W tiles go in pairs;
 * their C tiles sum over the group's blocks in cbuf and are scaled into acc one step after its last block, so
 * that the AVX-512 work overlaps the next tile products. */
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
                        float *ct = cbuf + t * 256, *cu = ct + 256;
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
                        const float *cp = cbuf + pending * 256;
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

/* acc [16 rows of X][16 rows of W] += c0 * scale[0..15] - xsum0 (x) scale_zero[0..15], then the same for the
 * next group (c1, scale[16..31], xsum1) when `two`: one load and store of acc for both. */
static inline void amx_accumulate_two(float *acc, const float *c0, const float *c1, const float *scale,
                                      const float *scale_zero, const float *xsum0, const float *xsum1, int two) {
    if (!two) {
        amx_accumulate(acc, c0, scale, scale_zero, xsum0);
        return;
    }
    const __m512 s0 = _mm512_load_ps(scale), z0 = _mm512_load_ps(scale_zero);
    const __m512 s1 = _mm512_load_ps(scale + 16), z1 = _mm512_load_ps(scale_zero + 16);
    for (int i = 0; i < 16; i++) {
        __m512 v = _mm512_fmadd_ps(_mm512_load_ps(c0 + 16 * i), s0, _mm512_load_ps(acc + 16 * i));
        v = _mm512_fnmadd_ps(_mm512_set1_ps(xsum0[i]), z0, v);
        v = _mm512_fmadd_ps(_mm512_load_ps(c1 + 16 * i), s1, v);
        _mm512_store_ps(acc + 16 * i, _mm512_fnmadd_ps(_mm512_set1_ps(xsum1[i]), z1, v));
    }
}

/* amx_pass_products for beta1 == 16, two groups (blocks) at a time and one W tile per step: C tiles of groups j
 * and j + 1 in tmm0, tmm1, their A tiles in tmm2, 3 and tmm4, 5, the W tile's B tiles in tmm6, tmm7; acc takes both
 * groups in one pass over its rows. A step's C tiles are scaled one step later, overlapping the next products. */
static void amx_pass_products_two_groups(const amx_call *c, const amx_buffers *w, int64_t nt, int64_t c0, int64_t nb) {
    const int64_t kc_blocks = c->kc_blocks, kc_groups = c->kc_groups, Mp = c->Mp, Kp = c->Kp, mblocks = c->mblocks;
    const uint16_t *const a_hm = c->a_hm, *const a_lo = c->a_lo;
    const float *const scale = w->scale, *const scale_zero = w->scale_zero;
    const uint32_t *const btiles = w->btiles;
    float *const acc = w->acc, *const cbuf = w->cbuf;
    for (int64_t mb = 0; mb < mblocks; mb++) {
        const int64_t tile0 = mb * (Kp / 16) + c0 / 16; /* this pass's first A tile */
        for (int64_t j = 0; j < nb; j += 2) {
            const int two = j + 1 < nb;
            const float *xsum0 = c->xsum + (c0 / 16 + j) * Mp + mb * 16, *xsum1 = xsum0 + Mp;
            _tile_loadd(2, a_hm + (tile0 + j) * 512, 64);
            _tile_loadd(3, a_lo + (tile0 + j) * 512, 64);
            if (two) {
                _tile_loadd(4, a_hm + (tile0 + j + 1) * 512, 64);
                _tile_loadd(5, a_lo + (tile0 + j + 1) * 512, 64);
            }
            for (int64_t t = 0; t <= nt; t++) { /* one step past the last W tile */
                if (t < nt) {
                    float *ct = cbuf + (t & 1) * 512;
                    _tile_zero(0);
                    _tile_loadd(6, btiles + (t * kc_blocks + j) * 256, 64);
                    if (two) {
                        _tile_zero(1);
                        _tile_loadd(7, btiles + (t * kc_blocks + j + 1) * 256, 64);
                        _tile_dpbf16ps(0, 2, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(0, 3, 6);
                        _tile_dpbf16ps(1, 5, 7);
                        _tile_stored(0, ct, 64);
                        _tile_stored(1, ct + 256, 64);
                    } else {
                        _tile_dpbf16ps(0, 2, 6);
                        _tile_dpbf16ps(0, 3, 6);
                        _tile_stored(0, ct, 64);
                    }
                }
                if (t > 0) {
                    const int64_t v = t - 1;
                    const float *cp = cbuf + (v & 1) * 512;
                    amx_accumulate_two(acc + (mb * AMX_NT + v) * 256, cp, cp + 256, scale + (v * kc_groups + j) * 16,
                                       scale_zero + (v * kc_groups + j) * 16, xsum0, xsum1, two);
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
                if (c.blocks_per_group == 1) amx_pass_products_two_groups(&c, &w, nt, c0, nb);
                else amx_pass_products(&c, &w, nt, c0, nb);
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
