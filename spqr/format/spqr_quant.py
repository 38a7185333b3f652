"""Conversion to and from the authors' inference format (the `spqr_quant` package, which transformers'
built-in `quant_method: "spqr"` / SpQRConfig loads). It holds 3-bit weights and 3-bit statistics in
16 x 16 tiles only, so only layers with wbits = qq_bits = 3, beta1 = beta2 = 16, both dimensions
multiples of 16, at most 65,536 input columns and no bias convert.

Per layer W [m, n] (columns in the sweep's order; x_perm[k] = x[in_perm[k]]):
- dense_weights int64 [ceil(m/16) * ceil(n/16) * 16]: tile (ti, tj) of rows 16ti.., columns 16tj.. is
  16 consecutive words (ti-major, then tj, then row k), each
      bits 0-2: row's scale code | 3-5: zero code | 6+3i .. 8+3i: code of column 16tj + i |
      54-61: byte k // 2 of the tile's second-level word | 62-63: zero
  and the second-level word is fp16 bits: scale_scale | zero_scale << 16 | scale_zero << 32 | zero_zero << 48.
  Decoding: scale = (scale_code - scale_zero) * scale_scale, zero likewise, w = (code - zero) * scale.
- row_offsets int32 [m + 1]: CSR row pointers of the outliers (CSR layout, not PTCSR).
- col_vals int32 [nnz]: fp16 bits of the value << 16 | column (uint16), added to the dense weight.
- in_perm int32 [n / 2]: the permutation as uint16 pairs, in_perm[2i] in the low half.
"""

from __future__ import annotations

import torch

from spqr.format.layout import LayerSpec, PackedLinear, pack_weight_codes, unpack_weight_codes
from spqr.format.packing import pack_bitplanes, unpack_bitplanes

TILE = 16


class ConversionError(ValueError):
    """A layer that the spqr_quant format cannot hold."""


def check_exportable(spec: LayerSpec, name: str = "layer") -> None:
    problems = []
    if (spec.wbits, spec.qq_bits, spec.beta1, spec.beta2) != (3, 3, TILE, TILE):
        problems.append(f"wbits={spec.wbits}, qq_bits={spec.qq_bits}, beta1={spec.beta1}, beta2={spec.beta2} "
                        "(the format holds 3-bit weights and statistics in 16x16 tiles only)")
    if spec.out_features % TILE or spec.in_features % TILE:
        problems.append(f"shape {spec.out_features}x{spec.in_features} is not a multiple of 16 in both dimensions")
    if spec.in_features > 2**16:
        problems.append(f"{spec.in_features} input columns do not fit its 16-bit column indices")
    if spec.has_bias:
        problems.append("it has a bias, which the format does not store")
    if problems:
        raise ConversionError(f"{name} cannot be exported to spqr_quant: " + "; ".join(problems))


def _u16(t: torch.Tensor) -> torch.Tensor:
    """fp16 / int16 tensor -> its 16 bits as int64 in [0, 65536)."""
    return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def export_layer(packed: PackedLinear, name: str = "layer") -> dict[str, torch.Tensor]:
    """Our layer -> the four spqr_quant tensors (see the module docstring)."""
    spec, t = packed.spec, packed.tensors
    check_exportable(spec, name)
    m, n = spec.out_features, spec.in_features
    tm, tn = m // TILE, n // TILE
    codes = unpack_weight_codes(t["qweight"], 3, m, n).to(torch.int64).view(tm, TILE, tn, TILE)  # [ti, k, tj, i]
    words = (codes << (6 + 3 * torch.arange(TILE))).sum(-1).permute(0, 2, 1)  # [ti, tj, k]
    for shift, stat in ((0, "scale"), (3, "zero")):
        stat_codes = unpack_bitplanes(t[f"{stat}_codes"].transpose(0, 1), 3, m).to(torch.int64)  # [tj, rows]
        words |= stat_codes.view(tn, tm, TILE).permute(1, 0, 2) << shift
    second = (_u16(t["scale_scale"]) | _u16(t["zero_scale"]) << 16 | _u16(t["scale_zero"]) << 32
              | _u16(t["zero_zero"]) << 48)  # [ti, tj]
    fragments = (second[..., None] >> (8 * (torch.arange(TILE) // 2))) & 0xFF  # byte k // 2 for row k
    words |= fragments << 54
    perm = t["perm"].to(torch.int64) if spec.has_perm else torch.arange(n)
    return {
        "dense_weights": words.reshape(-1).contiguous(),
        "row_offsets": t["outlier_row_ptr"].clone(),
        "col_vals": ((_u16(t["outlier_val"]) << 16) | (t["outlier_col"].to(torch.int64) & 0xFFFF)).to(torch.int32)
        if t["outlier_val"].numel() else torch.zeros(0, dtype=torch.int32),
        "in_perm": ((perm[1::2] << 16) | perm[0::2]).to(torch.int32),
    }


def import_layer(tensors: dict[str, torch.Tensor], rows: int, cols: int, name: str = "layer") -> PackedLinear:
    """The four spqr_quant tensors of a rows x cols layer -> our packed layer (same dequantized weights)."""
    spec = LayerSpec(cols, rows, 3, TILE, TILE, 3, True, False)
    check_exportable(spec, name)
    tm, tn = rows // TILE, cols // TILE
    expected = {"dense_weights": (tm * tn * TILE, torch.int64), "row_offsets": (rows + 1, torch.int32),
                "in_perm": (cols // 2, torch.int32)}
    for key, (size, dtype) in expected.items():
        tensor = tensors.get(key)
        if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != (size,):
            raise ConversionError(f"{name}.{key}: expected {dtype} of shape ({size},), got "
                                  f"{None if tensor is None else (tensor.dtype, tuple(tensor.shape))}")
    if tensors.get("col_vals") is None or tensors["col_vals"].dtype != torch.int32 or tensors["col_vals"].ndim != 1:
        raise ConversionError(f"{name}.col_vals: expected a 1-D int32 tensor")
    words = tensors["dense_weights"].view(tm, tn, TILE)  # [ti, tj, k]
    codes = (words[..., None] >> (6 + 3 * torch.arange(TILE))) & 7  # [ti, tj, k, i]
    t: dict[str, torch.Tensor] = {"qweight": pack_weight_codes(codes.permute(0, 2, 1, 3).reshape(rows, cols), 3)}
    second = torch.zeros(tm, tn, dtype=torch.int64)
    for k in range(0, TILE, 2):
        second |= ((words[:, :, k] >> 54) & 0xFF) << (8 * (k // 2))
    for shift, stat in ((0, "scale"), (3, "zero")):
        stat_codes = ((words >> shift) & 7).permute(1, 0, 2).reshape(tn, rows)  # [tj, rows]
        t[f"{stat}_codes"] = pack_bitplanes(stat_codes, 3).transpose(0, 1).contiguous()

    def fp16(bits: torch.Tensor) -> torch.Tensor:
        return bits.to(torch.int32).to(torch.int16).view(torch.float16).contiguous()

    t["scale_scale"], t["zero_scale"] = fp16(second & 0xFFFF), fp16((second >> 16) & 0xFFFF)
    t["scale_zero"], t["zero_zero"] = fp16((second >> 32) & 0xFFFF), fp16((second >> 48) & 0xFFFF)
    pairs = tensors["in_perm"].to(torch.int64) & 0xFFFFFFFF
    perm = torch.stack([pairs & 0xFFFF, pairs >> 16], dim=1).reshape(-1)
    t["perm"] = perm.to(spec.index_dtype)
    col_vals = tensors["col_vals"].to(torch.int64) & 0xFFFFFFFF
    t["outlier_row_ptr"] = tensors["row_offsets"].clone()
    t["outlier_col"] = (col_vals & 0xFFFF).to(spec.index_dtype)
    t["outlier_val"] = fp16(col_vals >> 16)
    return PackedLinear(spec, {k: v.contiguous() for k, v in t.items()})
