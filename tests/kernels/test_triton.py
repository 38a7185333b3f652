"""The Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, on CPU) against the exact reference."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from packaging.version import Version

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; TRITON_INTERPRET=0 on a GPU
triton = pytest.importorskip("triton")
if Version(triton.__version__) < Version("3.7"):  # the version torch 2.6 pins is 3.2
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels on CPU (3.2-3.6 fail inside it, "
                "3.7-3.9 pass): the GPU kernels are not tested with it", allow_module_level=True)
gpu = importlib.reload(sys.modules["spqr.kernels.gpu"]) if "spqr.kernels.gpu" in sys.modules else \
    importlib.import_module("spqr.kernels.gpu")

from spqr.format.layout import dequantize_layer  # noqa: E402
from spqr.format.synthetic import random_packed_layer  # noqa: E402


def _check(layer, rows: int, seed: int = 0) -> None:
    weight = dequantize_layer(layer.spec, layer.tensors).double()
    x = torch.randn(rows, layer.spec.in_features, generator=torch.Generator().manual_seed(seed))
    y = gpu.triton_linear(layer.spec, layer.tensors, x).double()
    exact = x.double() @ weight.T
    bound = x.double().abs() @ weight.abs().T
    assert float(((y - exact).abs() / (bound + 1e-30)).max()) < 1e-5


@pytest.mark.parametrize("wbits", range(1, 9))
def test_every_bit_width(wbits):
    layer = random_packed_layer(40, 72, wbits, 16, 16, 3, 0.02, seed=wbits)
    for rows in (1, 17):
        _check(layer, rows)


@pytest.mark.parametrize("out_features,in_features", [(1, 1), (37, 50), (33, 130), (16, 16)])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_ragged_shapes(out_features, in_features, rows):
    _check(random_packed_layer(out_features, in_features, 3, 16, 16, 3, 0.05, seed=out_features), rows)


@pytest.mark.parametrize("beta1,beta2,qq_bits", [(32, 16, 3), (64, 7, 2), (16, 1, 4), (48, 48, 8), (16, 16, None)])
def test_group_sizes_and_statistics(beta1, beta2, qq_bits):
    _check(random_packed_layer(35, 100, 3, beta1, beta2, qq_bits, 0.02, seed=beta1), 2)


@pytest.mark.parametrize("share,perm", [(0.0, True), (1.0, True), (0.3, False)])
def test_outliers_and_permutation(share, perm):
    layer = random_packed_layer(24, 64, 4, 16, 16, 3, share, perm=perm, seed=2)
    for rows in (1, 16):
        _check(layer, rows)


def test_int32_indices():
    layer = random_packed_layer(5, 33000, 2, 16, 16, 3, 0.001, seed=3)
    assert layer.tensors["perm"].dtype == torch.int32
    _check(layer, 1)


def test_output_shape_and_dtype():
    layer = random_packed_layer(24, 32, 3, 16, 16, 3, 0.02, seed=4)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    y = gpu.triton_linear(layer.spec, layer.tensors, x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    assert not random_packed_layer(8, 24, 3, 24, 16, 3, 0.0).spec.kernel_friendly
