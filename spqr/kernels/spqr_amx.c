/* Matrix-matrix on AMX tiles, spqr_gemm_amx (the layer layout and the other kernels: spqr_cpu.c).
 *
 * W is decoded to fp32 exactly as the reference decodes it ((code - zero) * scale + outlier delta), AMX_KC columns
 * of a task's W tiles at a time, and every weight w and input x is split into three bf16 parts whose sum is exact:
 * w = w_h + w_m + w_l by truncation (|w_m| < 2^-7 |w|, |w_l| < 2^-14 |w|: an AND and a subtraction per part),
 * x = x_h + x_m + x_l by rounding to nearest (|x_m| <= 2^-8 |x|, |x_l| <= 2^-16 |x|). The tile unit (TDPBF16PS:
 * bf16 products summed in fp32) then forms
 *     x w  ~  x_h w_l + x_h w_m + x_h w_h + x_l w_h + x_m w_h + x_m w_m,
 * every product exact; the three left out (x_m w_l, x_l w_m, x_l w_l) come to under 2^-21 |x w|, with random signs
 * (x's parts are rounded), a few times the rounding of one fp32 product and far below that of the sums. The sums
 * stay in tile registers through a pass: nothing per group, outliers folded into W. Against the kernel before this
 * one (the codes themselves as bf16, x in three parts, each group's sums scaled on AVX-512, which took as long as
 * the tile products): 20-40% faster on SmolLM2's layers at 256 rows, 15-20% on 4096-wide ones at 512 rows. */
#include "spqr_cpu.h"

/* GCC and clang name the AMX macros differently */
#if SPQR_AVX512 && (defined(__AMX_TILE__) || defined(__AMXTILE__)) && (defined(__AMX_BF16__) || defined(__AMXBF16__)) \
    && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TASK_TILES 16 /* most 16-row W tiles per task: their B tiles for a pass (384 KiB) stay in L2 */
#define AMX_KC 256        /* columns per pass: multiple of KB (decode_block's) */
#define A_PARTS 1536      /* bf16 per K tile of 16 rows of X: parts h, m, l of 16 x 32 */
#define B_PARTS 768       /* 32-bit words per K tile of a W tile: parts h, m, l of 16 column pairs x 16 rows */

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

/* Eight tiles of 16 x 64 bytes: tmm0-3 C (fp32 16 x 16), tmm4-5 A (bf16 16 x 32), tmm6-7 B (16 pairs x 16). */
static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* x == h + m + l exactly, rounded to nearest (so that, unlike truncation, the parts left out of the products
 * have random signs): bf16 parts of 8 significant bits each (values near the fp32 limits aside). */
static inline __m512 bf16_to_float(__m256bh v) { /* exact (what GCC 12's _mm512_cvtpbh_ps does; GCC 11 has none) */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)v), 16));
}

static inline void split3_rounded(__m512 v, __m256bh *h, __m256bh *m, __m256bh *l) {
    *h = _mm512_cvtneps_pbh(v);
    const __m512 rest = _mm512_sub_ps(v, bf16_to_float(*h)); /* exact */
    *m = _mm512_cvtneps_pbh(rest);
    *l = _mm512_cvtneps_pbh(_mm512_sub_ps(rest, bf16_to_float(*m)));
}

/* Rows m0 .. m0+15 of x [M][K] (original column order) -> their A tiles, a [Mp/16][Kp/32][3][16][32] bf16:
 * x_perm split in three, zero past K and M. Returns 1 if an input is out of range (SPQR_INPUT_LIMIT), else 0. */
static int amx_prepare_rows(const spqr_layer *L, const float *x, int64_t M, int64_t m0, int64_t Kp, uint16_t *a) {
    const int64_t K = L->in_features;
    __mmask16 beyond = 0;
    uint16_t *block = a + (m0 / 16) * (Kp / 32) * A_PARTS;
    for (int64_t i = 0; i < 16; i++) {
        const int64_t m = m0 + i;
        const float *xm = x + (m < M ? m : 0) * K;
        for (int64_t k = 0; k < Kp; k += 16) {
            const __mmask16 valid = m >= M || k >= K ? 0
                                    : K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            __m256bh h, md, l;
            const __m512 v = load_x_perm16(L, xm, k, valid);
            beyond |= out_of_range16(v);
            split3_rounded(v, &h, &md, &l);
            uint16_t *dst = block + (k / 32) * A_PARTS + i * 32 + (k & 16);
            _mm256_storeu_si256((__m256i *)dst, (__m256i)h);
            _mm256_storeu_si256((__m256i *)(dst + 512), (__m256i)md);
            _mm256_storeu_si256((__m256i *)(dst + 1024), (__m256i)l);
        }
    }
    return beyond != 0;
}

/* Exact three-way split of v by truncation, as fp32 values whose low 16 bits are zero (so their high halves are the
 * bf16 parts): v == h + m + l, |m| < 2^-7 |v|, |l| < 2^-14 |v| (values near the fp32 limits aside). */
static inline void split3(__m512 v, __m512i *h, __m512i *m, __m512i *l) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    *h = _mm512_and_si512(_mm512_castps_si512(v), high);
    const __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(*h)); /* exact: at most 16 significant bits */
    *m = _mm512_and_si512(_mm512_castps_si512(rest), high);
    *l = _mm512_castps_si512(_mm512_sub_ps(rest, _mm512_castsi512_ps(*m))); /* exact: at most 8 bits */
}

/* One B tile row: lane i = the bf16 pair (a[i], b[i]) (a, b from split3). */
static inline __m512i bf16_pairs(__m512i a, __m512i b) { return _mm512_or_si512(_mm512_srli_epi32(a, 16), b); }

/* Row p of the three parts (B tiles 256 words apart) at dst from columns 2p, 2p + 1 (16 rows in the lanes). */
static inline void store_pair_rows(__m512 w0, __m512 w1, uint32_t *dst) {
    __m512i h0, m0, l0, h1, m1, l1;
    split3(w0, &h0, &m0, &l0);
    split3(w1, &h1, &m1, &l1);
    _mm512_store_si512(dst, bf16_pairs(h0, h1));
    _mm512_store_si512(dst + 256, bf16_pairs(m0, m1));
    _mm512_store_si512(dst + 512, bf16_pairs(l0, l1));
}

/* The B tiles [AMX_KC/32][3][16][16] (32-bit words: bf16 pairs) of the W tile at r0 over kt_n K tiles from column c0:
 * row p of a part, lane i = that part of W row r0 + i at columns 2p and 2p + 1 of the K tile; zero past K.
 * Decoded as decode_block does: (code - zero) * scale, plus the outlier delta (delta [AMX_KC][16], see
 * amx_outlier_deltas; NULL: none in these columns). Full tiles only. */
static inline __attribute__((always_inline)) void amx_weight_tile(const spqr_layer *L, int64_t r0, int64_t c0,
                                                                  int64_t kt_n, const float *delta, uint32_t *dst,
                                                                  const int WB) {
    const int64_t K = L->in_features, beta1 = L->beta1;
    const int32_t *tile = L->qweight + (r0 / TILE) * ceil_div(K, 32) * WB * TILE;
    const tile_cursor cursor = tile_cursor_at(L, r0);
    __m512 scale = _mm512_setzero_ps(), zero = _mm512_setzero_ps();
    int64_t group = -1; /* whose statistics scale and zero hold */
    for (int64_t kt = 0; kt < kt_n; kt++) {
        const int64_t c = c0 / 32 + kt;
        __m512i planes[8];
        for (int b = 0; b < WB; b++) planes[b] = _mm512_loadu_si512(tile + (c * WB + b) * TILE);
        uint32_t *out = dst + kt * B_PARTS;
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++) {
            const int64_t col = 32 * c + 2 * p;
            if (col >= K) { /* past the last column: zero (K is even or odd; col + 1 checked below) */
                store_pair_rows(_mm512_setzero_ps(), _mm512_setzero_ps(), out + 16 * p);
                continue;
            }
            if (p % 8 == 0 && col / beta1 != group) {
                group = col / beta1;
                tile_stats16(L, &cursor, group, r0, &scale, &zero);
            }
            __m512 w0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(column_codes(planes, 2 * p, WB)), zero), scale);
            __m512 w1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(column_codes(planes, 2 * p + 1, WB)), zero), scale);
            if (delta) {
                const float *d = delta + (col - c0) * TILE;
                w0 = _mm512_add_ps(w0, _mm512_load_ps(d));
                w1 = _mm512_add_ps(w1, _mm512_load_ps(d + TILE));
            }
            store_pair_rows(w0, col + 1 < K ? w1 : _mm512_setzero_ps(), out + 16 * p);
        }
    }
}

static void amx_weight_tile_any(const spqr_layer *L, int64_t r0, int64_t c0, int64_t kt_n, const float *delta,
                                uint32_t *dst) {
    SPQR_FOR_WBITS(L->wbits, amx_weight_tile(L, r0, c0, kt_n, delta, dst, WB))
}

/* delta [AMX_KC][16] (zero on entry) = the outlier deltas of the W tile at r0 in columns c0 .. c0 + AMX_KC - 1; returns
 * whether there were any. next_outlier[i]: row r0 + i's first outlier not yet applied (columns increase). */
static int amx_outlier_deltas(const spqr_layer *L, int64_t r0, int64_t c0, float *delta, int32_t *next_outlier) {
    int any = 0;
    for (int i = 0; i < TILE; i++) {
        int32_t p = next_outlier[i];
        const int32_t end = L->row_ptr[r0 + i + 1];
        for (; p < end && outlier_col(L, p) < c0 + AMX_KC; p++) delta[(outlier_col(L, p) - c0) * TILE + i] = half_to_float(L->outlier_val[p]);
        any |= p > next_outlier[i];
        next_outlier[i] = p;
    }
    return any;
}

/* amx_weight_tile for a W tile of fewer than 16 rows (the last): decoded by decode_block (outliers included) into
 * buf [KB][16], KB columns at a time, then split. */
static void amx_weight_tile_partial(const spqr_layer *L, int64_t r0, int n, int64_t c0, int64_t kt_n, float *buf,
                                    uint32_t *dst, int32_t *next_outlier) {
    for (int64_t kt = 0; kt < kt_n; kt++) {
        const int64_t k0 = c0 + 32 * kt;
        if ((k0 - c0) % KB == 0) decode_block(L, r0, n, TILE, k0, k0 + KB < L->in_features ? k0 + KB : L->in_features, buf, next_outlier);
        for (int p = 0; p < 16; p++) {
            const float *col = buf + ((k0 - c0) % KB + 2 * p) * TILE;
            store_pair_rows(_mm512_load_ps(col), _mm512_load_ps(col + TILE), dst + kt * B_PARTS + 16 * p);
        }
    }
}

/* C tiles of NM (1-2) blocks of 16 rows of X and NW (1-2) W tiles (c[j][t]: acc, 16 x 16 fp32) += their products
 * over kt_n K tiles; a[j], b[t]: the blocks' A tiles and the W tiles' B tiles at the pass's first K tile. */
static inline __attribute__((always_inline)) void amx_block(const uint16_t *const a[2], const uint32_t *const b[2],
                                                            float *const c[2][2], int64_t kt_n, int first,
                                                            const int NM, const int NW) {
/* op(C register, j, t, A register, B register): register numbers are literals, as the instructions need */
#define AMX_ALL_C(op)                             \
    do {                                          \
        op(0, 0, 0, 4, 6);                        \
        if (NW == 2) op(1, 0, 1, 4, 7);           \
        if (NM == 2) op(2, 1, 0, 5, 6);           \
        if (NM == 2 && NW == 2) op(3, 1, 1, 5, 7); \
    } while (0)
#define AMX_ZERO(r, j, t, ra, rb) _tile_zero(r)
#define AMX_LOAD(r, j, t, ra, rb) _tile_loadd(r, c[j][t], 64)
#define AMX_STORE(r, j, t, ra, rb) _tile_stored(r, c[j][t], 64)
#define AMX_DP(r, j, t, ra, rb) _tile_dpbf16ps(r, ra, rb)
#define AMX_A(part)                                                    \
    do {                                                               \
        _tile_loadd(4, a[0] + kt * A_PARTS + (part) * 512, 64);        \
        if (NM == 2) _tile_loadd(5, a[1] + kt * A_PARTS + (part) * 512, 64); \
    } while (0)
#define AMX_B(part)                                                    \
    do {                                                               \
        _tile_loadd(6, b[0] + kt * B_PARTS + (part) * 256, 64);        \
        if (NW == 2) _tile_loadd(7, b[1] + kt * B_PARTS + (part) * 256, 64); \
    } while (0)
    if (first) AMX_ALL_C(AMX_ZERO);
    else AMX_ALL_C(AMX_LOAD);
    for (int64_t kt = 0; kt < kt_n; kt++) { /* parts 0, 1, 2: h, m, l; the smallest products first */
        AMX_A(0);
        AMX_B(2);
        AMX_ALL_C(AMX_DP); /* x_h w_l */
        AMX_B(1);
        AMX_ALL_C(AMX_DP); /* x_h w_m */
        AMX_B(0);
        AMX_ALL_C(AMX_DP); /* x_h w_h */
        AMX_A(2);
        AMX_ALL_C(AMX_DP); /* x_l w_h */
        AMX_A(1);
        AMX_ALL_C(AMX_DP); /* x_m w_h */
        AMX_B(1);
        AMX_ALL_C(AMX_DP); /* x_m w_m */
    }
    AMX_ALL_C(AMX_STORE);
#undef AMX_ALL_C
#undef AMX_ZERO
#undef AMX_LOAD
#undef AMX_STORE
#undef AMX_DP
#undef AMX_A
#undef AMX_B
}

/* y [M][N] = x [M][K] W^T (x in the original column order). 2: AMX unavailable. */
int spqr_gemm_amx(const spqr_layer *L, int64_t M, const float *x, float *y, int n_threads) {
    if (!spqr_amx_enable()) return 2;
    const int64_t N = L->out_features, K = L->in_features;
    const int64_t Mp = ceil_div(M, 16) * 16, Kp = ceil_div(K, 32) * 32, n_tiles = ceil_div(N, TILE), mblocks = Mp / 16;
    /* tasks: ranges of at most AMX_TASK_TILES W tiles, a multiple of the threads where there are enough; a layer of
     * fewer tiles than threads also splits the rows of X */
    int64_t tile_tasks = n_threads * ceil_div(n_tiles, (int64_t)n_threads * AMX_TASK_TILES);
    tile_tasks = tile_tasks < n_tiles ? tile_tasks : n_tiles;
    const int64_t task_tiles = ceil_div(n_tiles, tile_tasks);
    tile_tasks = ceil_div(n_tiles, task_tiles);
    int64_t m_parts = tile_tasks >= n_threads ? 1 : ceil_div(n_threads, tile_tasks);
    m_parts = m_parts < mblocks ? m_parts : mblocks;
    const int64_t part_blocks = ceil_div(mblocks, m_parts);
    /* one workspace: X's A tiles, then each thread's decoded block, B tiles, sums and outlier cursors */
    const size_t a_bytes = region(sizeof(uint16_t) * (size_t)(mblocks * (Kp / 32) * A_PARTS));
    const size_t part[4] = {region(sizeof(float) * AMX_KC * TILE),
                            region(sizeof(uint32_t) * (size_t)(AMX_TASK_TILES * (AMX_KC / 32) * B_PARTS)),
                            region(sizeof(float) * 256 * (size_t)(part_blocks * AMX_TASK_TILES)),
                            region(sizeof(int32_t) * 16 * AMX_TASK_TILES)};
    const size_t thread_bytes = part[0] + part[1] + part[2] + part[3];
    workspace ws = workspace_acquire(a_bytes + (size_t)n_threads * thread_bytes);
    if (!ws.ptr) return 1;
    uint16_t *a = (uint16_t *)ws.ptr;
    int bad = 0; /* an input out of range: nothing is computed */
#pragma omp parallel num_threads(n_threads)
    {
        char *mine = ws.ptr + a_bytes + (size_t)thread_index() * thread_bytes;
        float *buf = (float *)mine, *acc = (float *)(mine + part[0] + part[1]);
        uint32_t *btiles = (uint32_t *)(mine + part[0]);
        int32_t *next_outlier = (int32_t *)(mine + part[0] + part[1] + part[2]);
        amx_configure();
#pragma omp for schedule(static) reduction(| : bad)
        for (int64_t mb = 0; mb < mblocks; mb++) bad |= amx_prepare_rows(L, x, M, mb * 16, Kp, a);
        /* after the loop's barrier every thread sees the same `bad` */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < (bad ? 0 : tile_tasks * m_parts); task++) {
            const int64_t t0 = (task / m_parts) * task_tiles, r0 = t0 * TILE;
            const int nt = (int)(n_tiles - t0 < task_tiles ? n_tiles - t0 : task_tiles), nb = nt * TILE;
            const int n = (int)(N - r0 < nb ? N - r0 : nb);
            const int64_t mb0 = (task % m_parts) * part_blocks;
            const int64_t mb1 = mb0 + part_blocks < mblocks ? mb0 + part_blocks : mblocks;
            for (int i = 0; i < n; i++) next_outlier[i] = L->row_ptr[r0 + i];
            memset(buf, 0, sizeof(float) * AMX_KC * TILE); /* outlier deltas; the last tile's decoding if partial */
            for (int64_t c0 = 0; c0 < Kp; c0 += AMX_KC) { /* one pass: columns c0 .. c0 + AMX_KC - 1 */
                const int64_t kt_n = ((Kp - c0 < AMX_KC ? Kp - c0 : AMX_KC)) / 32;
                for (int t = 0; t < nt; t++) {
                    uint32_t *dst = btiles + t * (AMX_KC / 32) * B_PARTS;
                    const int rows = n - t * TILE < TILE ? n - t * TILE : TILE;
                    if (rows < TILE) {
                        amx_weight_tile_partial(L, r0 + t * TILE, rows, c0, kt_n, buf, dst, next_outlier + t * TILE);
                        memset(buf, 0, sizeof(float) * AMX_KC * TILE);
                    } else {
                        const int any = amx_outlier_deltas(L, r0 + t * TILE, c0, buf, next_outlier + t * TILE);
                        amx_weight_tile_any(L, r0 + t * TILE, c0, kt_n, any ? buf : NULL, dst);
                        if (any) memset(buf, 0, sizeof(float) * AMX_KC * TILE); /* (re-walking the outliers to clear
                                                                                     * their entries: 7% slower) */
                    }
                }
                for (int t = 0; t < nt; t += 2)
                    for (int64_t mb = mb0; mb < mb1; mb += 2) {
                        const int64_t j1 = mb + 1 < mb1 ? 1 : 0;
                        const int u = t + 1 < nt ? 1 : 0;
                        const uint16_t *const ap[2] = {a + (mb * (Kp / 32) + c0 / 32) * A_PARTS,
                                                       a + ((mb + j1) * (Kp / 32) + c0 / 32) * A_PARTS};
                        const uint32_t *const bp[2] = {btiles + t * (AMX_KC / 32) * B_PARTS,
                                                       btiles + (t + u) * (AMX_KC / 32) * B_PARTS};
                        float *const cp[2][2] = {
                            {acc + ((mb - mb0) * AMX_TASK_TILES + t) * 256, acc + ((mb - mb0) * AMX_TASK_TILES + t + u) * 256},
                            {acc + ((mb + j1 - mb0) * AMX_TASK_TILES + t) * 256,
                             acc + ((mb + j1 - mb0) * AMX_TASK_TILES + t + u) * 256}};
                        const int first = c0 == 0;
                        if (j1 && u) amx_block(ap, bp, cp, kt_n, first, 2, 2);
                        else if (j1) amx_block(ap, bp, cp, kt_n, first, 2, 1);
                        else if (u) amx_block(ap, bp, cp, kt_n, first, 1, 2);
                        else amx_block(ap, bp, cp, kt_n, first, 1, 1);
                    }
            }
            for (int64_t mb = mb0; mb < mb1; mb++) /* the rows of y */
                for (int t = 0; t < nt; t++) {
                    const int64_t rt = r0 + t * TILE, w = N - rt < TILE ? N - rt : TILE;
                    const float *at = acc + ((mb - mb0) * AMX_TASK_TILES + t) * 256;
                    for (int64_t m = mb * 16; m < mb * 16 + 16 && m < M; m++)
                        _mm512_mask_storeu_ps(y + m * N + rt, (__mmask16)((1u << w) - 1u), _mm512_load_ps(at + 16 * (m - mb * 16)));
                }
        }
        _tile_release();
    }
    workspace_release(ws);
    return bad ? SPQR_INPUT_OUT_OF_RANGE : 0;
}
#else
int spqr_amx_enable(void) { return 0; }
int spqr_gemm_amx(const spqr_layer *L, int64_t M, const float *x, float *y, int n_threads) {
    (void)L, (void)M, (void)x, (void)y, (void)n_threads;
    return 2;
}
#endif
