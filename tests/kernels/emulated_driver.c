/* The CPU kernels built for another architecture (aarch64), run under an emulator (qemu-user) by
 * tests/kernels/test_cpu.py: the same checks as the native builds, on code no machine here runs natively.
 *
 * Requests on stdin, replies on stdout, until end of input. A request: int64 header
 *   [path (0 gemv, 1 gemm), rows, threads, in, out, wbits, beta1, beta2, qq_bits, outlier_col_int32, perm_int32],
 * then each of qweight, scale_codes, zero_codes, scale_scale, scale_zero, zero_scale, zero_zero, scale_fp16,
 * zero_fp16, row_ptr, outlier_col, outlier_val, perm and x as an int64 byte count (-1: absent) and the bytes.
 * A reply: int64 status (the kernel's return value), then rows x out floats when 0. A request it cannot read or
 * hold ends the process (the caller reports that it stopped).
 * Path 2 (a header alone): spqr_release_workspace, reply 0. */
#include <stdio.h>

#include "../../spqr/kernels/spqr_cpu.h"

#define N_HEADER 11
#define N_ARRAYS 14

static int read_exact(void *dst, size_t bytes) { return fread(dst, 1, bytes, stdin) == bytes; }

int main(void) {
    int64_t h[N_HEADER];
    while (read_exact(h, sizeof h)) {
        if (h[0] == 2) {
            const int64_t done = 0;
            spqr_release_workspace();
            fwrite(&done, sizeof done, 1, stdout);
            fflush(stdout);
            continue;
        }
        void *arrays[N_ARRAYS] = {0};
        for (int i = 0; i < N_ARRAYS; i++) {
            int64_t bytes;
            if (!read_exact(&bytes, sizeof bytes)) return 1;
            if (bytes < 0) continue;
            arrays[i] = malloc(bytes ? (size_t)bytes : 1);
            if (!arrays[i] || !read_exact(arrays[i], (size_t)bytes)) return 1;
        }
        const spqr_layer L = {
            .in_features = h[3], .out_features = h[4], .wbits = h[5], .beta1 = h[6], .beta2 = h[7],
            .qq_bits = h[8], .qweight = arrays[0], .scale_codes = arrays[1], .zero_codes = arrays[2],
            .scale_scale = arrays[3], .scale_zero = arrays[4], .zero_scale = arrays[5], .zero_zero = arrays[6],
            .scale_fp16 = arrays[7], .zero_fp16 = arrays[8], .row_ptr = arrays[9], .outlier_col = arrays[10],
            .outlier_col_int32 = h[9], .outlier_val = arrays[11], .perm = arrays[12], .perm_int32 = h[10]};
        float *y = malloc(sizeof(float) * (size_t)(h[1] * h[4]) + 1);
        const int64_t status = !y ? 1 : h[0] == 0 ? spqr_gemv(&L, h[1], arrays[13], y, (int)h[2])
                                                  : spqr_gemm(&L, h[1], arrays[13], y, (int)h[2]);
        fwrite(&status, sizeof status, 1, stdout);
        if (status == 0) fwrite(y, sizeof(float), (size_t)(h[1] * h[4]), stdout);
        fflush(stdout);
        free(y);
        for (int i = 0; i < N_ARRAYS; i++) free(arrays[i]);
    }
    return 0;
}
