"""Triton kernels for the packed SpQR layer (CUDA; on CPU they run under TRITON_INTERPRET=1 for tests).

y = x W_permᵀ from the stored tensors (spqr/format/layout.py, format version 3), in two kernels:
  _dense_kernel    a [BLOCK_M x BLOCK_N] tile of y per program, looping over 32-column chunks: the
                   permuted x columns are gathered, the codes of BLOCK_N rows are cut from their
                   bit-plane words, both levels of statistics decoded, W = (code - zero) * scale,
                   and the tile accumulated with tl.dot (BLOCK_M >= 16) or a broadcast sum (matvec).
  _outlier_kernel  per output row, the CSR outliers' delta * x[perm[col]] added to y.
All arithmetic is fp32 (tl.dot with input_precision="ieee").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spqr.format.layout import ROW_TILE, LayerSpec


@triton.jit
def _stat(codes_ptr, second_scale_ptr, second_zero_ptr, fp16_ptr, rows, group, n_groups, out_features,
          BETA2: tl.constexpr, QQ: tl.constexpr):
    """First-level statistic of `rows` ([BLOCK_N]) in `group` (a scalar), as fp32."""
    if QQ == 0:
        return tl.load(fp16_ptr + group * out_features + rows, mask=rows < out_features, other=0.0).to(tl.float32)
    code = tl.zeros_like(rows)
    for b in tl.static_range(QQ):
        word = tl.load(codes_ptr + ((rows // 32) * n_groups + group) * QQ + b, mask=rows < out_features, other=0)
        code |= ((word >> (rows % 32)) & 1) << b
    second = (rows // BETA2) * n_groups + group
    s2 = tl.load(second_scale_ptr + second, mask=rows < out_features, other=0.0).to(tl.float32)
    z2 = tl.load(second_zero_ptr + second, mask=rows < out_features, other=0.0).to(tl.float32)
    return (code.to(tl.float32) - z2) * s2


@triton.jit
def _dense_kernel(x_ptr, y_ptr, qweight_ptr, perm_ptr,
                  sc_ptr, ss_ptr, sz_ptr, zc_ptr, zs_ptr, zz_ptr, scale16_ptr, zero16_ptr,
                  M, K, N, n_groups, stride_xm, stride_ym,
                  WBITS: tl.constexpr, BETA1: tl.constexpr, BETA2: tl.constexpr, QQ: tl.constexpr,
                  HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 32)
    n_chunks = (K + 31) // 32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, n_chunks):
        k = c * 32 + j
        if HAS_PERM:
            src = tl.load(perm_ptr + k, mask=k < K, other=0).to(tl.int32)
        else:
            src = k
        x = tl.load(x_ptr + m[:, None] * stride_xm + src[None, :], mask=(m[:, None] < M) & (k[None, :] < K),
                    other=0.0).to(tl.float32)
        # codes [BLOCK_N, 32] from the 16-row-interleaved bit-planes: word ((t * n_chunks + c) * WBITS + b) * 16 + i
        base = ((n // 16) * n_chunks + c) * WBITS * 16 + n % 16
        code = tl.zeros((BLOCK_N, 32), dtype=tl.int32)
        for b in tl.static_range(WBITS):
            word = tl.load(qweight_ptr + base + b * 16, mask=n < N, other=0)
            code |= ((word[:, None] >> j[None, :]) & 1) << b
        # the chunk's two 16-column halves each lie in one group (BETA1 is a multiple of 16)
        g0 = (c * 32) // BETA1
        g1 = tl.minimum((c * 32 + 16) // BETA1, n_groups - 1)
        s0 = _stat(sc_ptr, ss_ptr, sz_ptr, scale16_ptr, n, g0, n_groups, N, BETA2, QQ)
        z0 = _stat(zc_ptr, zs_ptr, zz_ptr, zero16_ptr, n, g0, n_groups, N, BETA2, QQ)
        s1 = _stat(sc_ptr, ss_ptr, sz_ptr, scale16_ptr, n, g1, n_groups, N, BETA2, QQ)
        z1 = _stat(zc_ptr, zs_ptr, zz_ptr, zero16_ptr, n, g1, n_groups, N, BETA2, QQ)
        low = j[None, :] < 16
        w = (code.to(tl.float32) - tl.where(low, z0[:, None], z1[:, None])) * tl.where(low, s0[:, None], s1[:, None])
        if BLOCK_M >= 16:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _outlier_kernel(x_ptr, y_ptr, row_ptr, col_ptr, val_ptr, perm_ptr, M, stride_xm, stride_ym,
                    HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        col = tl.load(col_ptr + p, mask=p < end, other=0).to(tl.int32)
        if HAS_PERM:
            src = tl.load(perm_ptr + col, mask=p < end, other=0).to(tl.int32)
        else:
            src = col
        val = tl.load(val_ptr + p, mask=p < end, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + m[:, None] * stride_xm + src[None, :], mask=(m[:, None] < M) & (p[None, :] < end),
                    other=0.0).to(tl.float32)
        acc += tl.sum(x * val[None, :], axis=1)
    y = tl.load(y_ptr + m * stride_ym + row, mask=m < M, other=0.0)
    tl.store(y_ptr + m * stride_ym + row, y + acc, mask=m < M)


def triton_linear(spec: LayerSpec, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype (bias not added), computed in fp32 by the Triton kernels."""
    flat = x.reshape(-1, spec.in_features).contiguous()
    rows, n = flat.shape[0], spec.out_features
    y = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    dummy = t["qweight"]  # stands in for the pointers a layer does not have (never dereferenced)
    perm = t.get("perm", dummy)
    if spec.qq_bits is None:
        stats = (dummy,) * 6 + (t["scale"], t["zero"])
    else:
        stats = tuple(t[k] for k in ("scale_codes", "scale_scale", "scale_zero", "zero_codes", "zero_scale",
                                     "zero_zero")) + (dummy, dummy)
    block_m = 16 if rows >= 16 else 1
    block_n = 32
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    _dense_kernel[grid](flat, y, t["qweight"], perm, *stats, rows, spec.in_features, n, spec.n_groups,
                        flat.stride(0), y.stride(0), WBITS=spec.wbits, BETA1=spec.beta1, BETA2=spec.beta2,
                        QQ=spec.qq_bits or 0, HAS_PERM="perm" in t, BLOCK_M=block_m, BLOCK_N=block_n)
    if t["outlier_val"].numel():
        _outlier_kernel[(n, triton.cdiv(rows, 16))](flat, y, t["outlier_row_ptr"], t["outlier_col"],
                                                    t["outlier_val"], perm, rows, flat.stride(0), y.stride(0),
                                                    HAS_PERM="perm" in t, BLOCK_M=16, BLOCK_P=32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


assert ROW_TILE == 16  # the kernels' addressing of qweight
