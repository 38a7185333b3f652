"""Random packed layers of any shape, for kernel tests and benchmarks (no quantization run needed)."""

from __future__ import annotations

import torch

from spqr.format.layout import LayerSpec, PackedLinear
from spqr.format.packing import pack_bitplanes


def random_packed_layer(out_features: int, in_features: int, wbits: int = 3, beta1: int = 16, beta2: int = 16,
                        qq_bits: int | None = 3, outlier_share: float = 0.01, perm: bool = True,
                        bias: bool = False, seed: int = 0) -> PackedLinear:
    """A valid layer with uniformly random codes, plausible statistics and random outlier positions.

    Weights decode to roughly N(0, 0.02²)-sized values, like a trained LLM's linear layers.
    """
    g = torch.Generator().manual_seed(seed)
    spec = LayerSpec(in_features, out_features, wbits, beta1, beta2, qq_bits, perm, bias)
    n_groups = spec.n_groups
    # uniformly random bit-planes are uniformly random codes (and much faster to make than packing them)
    shape = spec.expected_tensors()["qweight"][0]
    qweight = torch.randint(-2**31, 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32)
    if out_features % 16:
        qweight[-1, ..., out_features % 16:] = 0  # the padding rows of the last tile
    t: dict[str, torch.Tensor] = {"qweight": qweight}
    if qq_bits is None:
        t["scale"] = (0.1 / 2**wbits * (0.5 + torch.rand(n_groups, out_features, generator=g))).half()
        t["zero"] = ((2**wbits - 1) * torch.rand(n_groups, out_features, generator=g)).half()
    else:
        second = (-(-out_features // beta2), n_groups)
        for stat, (lo, hi) in (("scale", (0.05 / 2**wbits, 0.15 / 2**wbits)), ("zero", (0.0, 2**wbits - 1.0))):
            codes = torch.randint(0, 2**qq_bits, (n_groups, out_features), generator=g)
            t[f"{stat}_codes"] = pack_bitplanes(codes, qq_bits).transpose(0, 1).contiguous()
            t[f"{stat}_scale"] = torch.full(second, (hi - lo) / (2**qq_bits - 1)).half()
            t[f"{stat}_zero"] = torch.full(second, -lo / ((hi - lo) / (2**qq_bits - 1))).half()
    if perm:
        t["perm"] = torch.randperm(in_features, generator=g).to(spec.index_dtype)
    mask = torch.rand(out_features, in_features, generator=g) < outlier_share
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=out_features)
    t["outlier_row_ptr"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    t["outlier_col"] = cols.to(spec.index_dtype)
    t["outlier_val"] = (0.1 * torch.randn(rows.numel(), generator=g)).half()
    if bias:
        t["bias"] = 0.01 * torch.randn(out_features, generator=g)
    return PackedLinear(spec, t)
