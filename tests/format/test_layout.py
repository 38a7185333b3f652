"""spqr.format.layout: the stored tensors of a layer, their specs, CSR outliers and bit accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spqr.algo.engine import quantize_weights
from spqr.config import QuantConfig
from spqr.format.layout import LayerSpec, PackedLinear, dequantize_layer, dequantize_rows, validate_layer
from spqr.format.synthetic import random_packed_layer
from spqr.nn import SpQRLinear
from tests.helpers import random_hessian, ref_unpack_row

INF = math.inf

CASES = [
    # (out, in, wbits, beta1, beta2, qq_bits, perm, tau)
    (37, 50, 3, 16, 16, 3, "act_order", 0.05),
    (24, 48, 4, 16, 16, None, "identity", INF),
    (33, 70, 2, 8, 4, 2, "identity", 0.2),
    (16, 32, 8, 32, 16, None, "act_order", 0.001),
    (5, 7, 2, 4, 2, 3, "act_order", 0.01),
]


def _packed(case, bias: bool = False, seed: int = 0):
    out, inp, wbits, beta1, beta2, qq_bits, perm, tau = case
    g = torch.Generator().manual_seed(seed + out)
    W = torch.randn(out, inp, generator=g)
    W[0, 0] = 20.0
    config = QuantConfig(wbits=wbits, beta1=beta1, beta2=beta2, qq_bits=qq_bits, perm=perm, outlier_threshold=tau)
    qw = quantize_weights([W], random_hessian(inp, seed=seed), config)[0]
    b = torch.randn(out, generator=g) if bias else None
    return qw, PackedLinear.from_quantized(qw, wbits, beta1, beta2, qq_bits, bias=b), b


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_expected_tensors_match_the_stored_tensors(case, bias):
    qw, packed, _ = _packed(case, bias)
    expected = packed.spec.expected_tensors(bias_dtype=torch.float32)
    assert set(expected) == set(packed.tensors)
    for name, (shape, dtype) in expected.items():
        t = packed.tensors[name]
        assert t.dtype == dtype, name
        if shape is not None:
            assert tuple(t.shape) == shape, name
        assert t.is_contiguous()
    out, inp, wbits, beta1, beta2, qq_bits, perm, _ = case
    spec = packed.spec
    assert (spec.out_features, spec.in_features, spec.wbits, spec.beta1, spec.beta2, spec.qq_bits) == \
           (out, inp, wbits, beta1, beta2, qq_bits)
    assert spec.has_perm == (perm == "act_order") and spec.has_bias == bias
    assert spec.n_groups == -(-inp // beta1)
    assert LayerSpec(**spec.to_dict()) == spec


@pytest.mark.parametrize("case", CASES)
def test_csr_outliers(case):
    qw, packed, _ = _packed(case)
    t = packed.tensors
    ptr = t["outlier_row_ptr"].tolist()
    cols = t["outlier_col"].long().tolist()
    vals = t["outlier_val"]
    assert ptr[0] == 0 and ptr[-1] == len(cols) == vals.numel() == qw.outlier_count == packed.outlier_count
    assert all(a <= b for a, b in zip(ptr, ptr[1:]))
    mask = torch.zeros_like(qw.outlier_mask)
    for r in range(len(ptr) - 1):
        row_cols = cols[ptr[r]:ptr[r + 1]]
        assert all(a < b for a, b in zip(row_cols, row_cols[1:])), "columns ascend within a row"
        for k, c in zip(range(ptr[r], ptr[r + 1]), row_cols):
            mask[r, c] = True
            assert vals[k] == qw.outlier_delta[r, c]
    assert torch.equal(mask, qw.outlier_mask)
    if case[-1] != INF:
        assert qw.outlier_count > 0


def _reference_bits(spec: LayerSpec, nnz: int) -> int:
    words = lambda n: -(-n // 32)  # noqa: E731
    bits = -(-spec.out_features // 16) * 16 * words(spec.in_features) * spec.wbits * 32  # rows padded to 16
    if spec.qq_bits is None:
        bits += 2 * spec.n_groups * spec.out_features * 16
    else:
        bits += 2 * (spec.n_groups * words(spec.out_features) * spec.qq_bits * 32
                     + 2 * spec.n_groups * -(-spec.out_features // spec.beta2) * 16)
    index_bits = 16 if spec.in_features <= 2**15 else 32
    if spec.has_perm:
        bits += spec.in_features * index_bits
    bits += (spec.out_features + 1) * 32 + nnz * (index_bits + 16)
    return bits


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_stored_bits(case, bias):
    _, packed, _ = _packed(case, bias)
    by_tensors = sum(t.numel() * t.element_size() * 8 for k, t in packed.tensors.items() if k != "bias")
    assert packed.stored_bits() == by_tensors
    assert packed.stored_bits() == _reference_bits(packed.spec, packed.outlier_count)


def test_index_dtype_switches_to_int32_beyond_int16():
    small = LayerSpec(2**15, 8, 3, 16, 16, 3, True, False)
    large = LayerSpec(2**15 + 1, 8, 3, 16, 16, 3, True, False)
    assert small.index_dtype == torch.int16 and large.index_dtype == torch.int32
    assert large.expected_tensors()["perm"] == ((2**15 + 1,), torch.int32)
    assert large.expected_tensors()["outlier_col"] == (None, torch.int32)
    # int16 really holds every index of the small spec
    assert torch.tensor([2**15 - 1]).to(small.index_dtype).item() == 2**15 - 1


def _plain_decode(spec: LayerSpec, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Element-by-element decoder written from the layout table in the module docstring."""
    out, inp = spec.out_features, spec.in_features

    def stat(name):
        if spec.qq_bits is None:
            return t[name].float()
        maxq = 2**spec.qq_bits - 1
        # [ceil(out/32), n_groups, qq_bits]: for group g, the words of consecutive 32-row chunks
        words = t[f"{name}_codes"]
        codes = torch.tensor([ref_unpack_row(words[:, g].tolist(), spec.qq_bits, out)
                              for g in range(spec.n_groups)]).float()
        s2 = t[f"{name}_scale"].float()  # [ceil(out/beta2), n_groups]
        z2 = t[f"{name}_zero"].float()
        rows = torch.arange(out) // spec.beta2
        assert int(codes.max()) <= maxq
        return (codes - z2[rows].T) * s2[rows].T

    scale, zero = stat("scale"), stat("zero")
    W = torch.zeros(out, inp)
    for r in range(out):
        codes = ref_unpack_row(t["qweight"][r // 16, :, :, r % 16].tolist(), spec.wbits, inp)  # [chunks, wbits]
        for c in range(inp):
            g = c // spec.beta1
            W[r, c] = (codes[c] - zero[g, r]) * scale[g, r]
    ptr = t["outlier_row_ptr"].tolist()
    for r in range(out):
        for k in range(ptr[r], ptr[r + 1]):
            W[r, int(t["outlier_col"][k])] += float(t["outlier_val"][k])
    if spec.has_perm:
        unpermuted = torch.zeros_like(W)
        unpermuted[:, t["perm"].long()] = W  # W_perm[:, k] = W[:, perm[k]]
        W = unpermuted
    return W


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:])
def test_dequantize_matches_a_plain_decoder(case):
    qw, packed, _ = _packed(case)
    ref = _plain_decode(packed.spec, packed.tensors)
    assert torch.allclose(packed.dequantize(), ref, atol=1e-6)
    assert torch.equal(dequantize_layer(packed.spec, packed.tensors), qw.weight)


@pytest.mark.parametrize("case", CASES)
def test_dequantize_rows_equals_the_rows_of_the_whole_matrix(case):
    _, packed, _ = _packed(case)
    full = dequantize_layer(packed.spec, packed.tensors)
    out = packed.spec.out_features
    for rows in (torch.arange(out), torch.tensor([out - 1, 0, out - 1, out // 2]), torch.tensor([], dtype=torch.long)):
        assert torch.equal(dequantize_rows(packed.spec, packed.tensors, rows), full[rows])


@pytest.mark.parametrize("share", [0.0, 0.02, 1.0])  # no outliers, some, every weight an outlier
@pytest.mark.parametrize("qq_bits", [3, None])
def test_dequantize_rows_on_random_large_layers(share, qq_bits):
    packed = random_packed_layer(100, 96, wbits=3, qq_bits=qq_bits, outlier_share=share, seed=3)
    full = packed.dequantize()
    rows = torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(dequantize_rows(packed.spec, packed.tensors, rows), full[rows])


@pytest.mark.parametrize("case", CASES[:2])
def test_spqr_linear_forward_and_buffers(case):
    qw, packed, bias = _packed(case, bias=True)
    layer = SpQRLinear.from_packed(packed)
    assert layer.in_features == case[1] and layer.out_features == case[0]
    state = layer.state_dict()
    assert set(state) == set(packed.tensors)
    for k, v in packed.tensors.items():
        assert torch.equal(state[k], v)
    assert torch.equal(layer.dequantize(), qw.weight)
    x = torch.randn(3, 5, case[1])
    assert torch.allclose(layer(x), F.linear(x, qw.weight, bias), atol=1e-5)
    assert not layer.bias.requires_grad
    assert f"wbits={case[2]}" in repr(layer)
    # half-precision inputs are handled in their own dtype
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_bias_is_a_copy_not_a_view():
    qw, packed, bias = _packed(CASES[1], bias=True)
    assert torch.equal(packed.tensors["bias"], bias)
    bias.add_(1.0)
    assert not torch.equal(packed.tensors["bias"], bias)


# ------------------------------------------------------------------------------------------ validate_layer

def _corruptions():
    """(description, function mutating a copy of the tensors, expected message fragment)."""
    def ptr_start(t):
        t["outlier_row_ptr"][0] = 1

    def ptr_decreasing(t):
        p = t["outlier_row_ptr"]
        first, second = int(p[1]), int(p[2])
        p[1], p[2] = second + 1, first

    def ptr_end(t):
        t["outlier_row_ptr"][-1] += 1

    def col_range(t):
        t["outlier_col"][0] = 10_000

    def col_negative(t):
        t["outlier_col"][0] = -1

    def col_order(t):
        row_ptr = t["outlier_row_ptr"]
        r = int(torch.nonzero(row_ptr.diff() >= 2)[0])
        a = int(row_ptr[r])
        t["outlier_col"][a], t["outlier_col"][a + 1] = t["outlier_col"][a + 1].clone(), t["outlier_col"][a].clone()

    def perm_duplicate(t):
        t["perm"][0] = t["perm"][1]

    def nan_value(t):
        t["outlier_val"][0] = float("nan")

    def inf_stat(t):
        t["scale_scale"][0, 0] = float("inf")

    def count_mismatch(t):
        t["outlier_col"] = t["outlier_col"][:-1]

    def nan_bias(t):
        t["bias"][3] = float("nan")

    return [("ptr_start", ptr_start, "row pointer"), ("ptr_decreasing", ptr_decreasing, "row pointer"),
            ("ptr_end", ptr_end, "row pointer"), ("col_range", col_range, "outside"),
            ("col_negative", col_negative, "outside"), ("col_order", col_order, "ascending"),
            ("perm_duplicate", perm_duplicate, "permutation"), ("nan_value", nan_value, "NaN"),
            ("inf_stat", inf_stat, "NaN or Inf"), ("count_mismatch", count_mismatch, "outlier columns"),
            ("nan_bias", nan_bias, "bias contains NaN")]


def test_validate_layer_accepts_engine_output():
    for case in CASES:
        _, packed, _ = _packed(case, bias=True)
        validate_layer(packed.spec, packed.tensors, "layer")


@pytest.mark.parametrize("description,corrupt,message", _corruptions(), ids=[c[0] for c in _corruptions()])
def test_validate_layer_rejects_corruption(description, corrupt, message):
    _, packed, _ = _packed(CASES[0], bias=True)
    assert packed.outlier_count > 3
    tensors = {k: v.clone() for k, v in packed.tensors.items()}
    corrupt(tensors)
    with pytest.raises(ValueError, match=message):
        validate_layer(packed.spec, tensors, "model.layers.0.q_proj")
