"""The C kernels (AVX-512, AVX2 and portable builds) against the exact reference decoder."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess

import pytest
import torch

from spqr import kernels
from spqr.format.layout import LayerSpec, PackedLinear, dequantize_layer, pack_weight_codes
from spqr.format.packing import pack_bitplanes
from spqr.format.synthetic import random_packed_layer
from spqr.kernels import cpu

from . import emulated

VARIANTS = ("native", "portable", "avx2", "avx512", "aarch64")


@pytest.fixture(scope="module", params=VARIANTS)
def kern(request) -> cpu.CpuKernels:
    """The build for this machine, the portable, AVX2 and Skylake AVX-512 ones, and the aarch64 one under qemu
    (tests/kernels/emulated.py)."""
    if request.param == "aarch64":
        if not emulated.available():
            pytest.skip(emulated.MISSING)
        k = emulated.EmulatedKernels(emulated.build(cpu._cache_dir()))
        yield k
        k.close()
        return
    needs = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}}
    missing = needs.get(request.param, set()) - set(cpu.cpuinfo_field("flags").split())
    if missing:
        pytest.skip(f"this CPU has no {', '.join(sorted(missing))}: the {request.param} build cannot run here")
    k = cpu.load(request.param)
    if k is None:
        pytest.fail(f"the {request.param} CPU kernels did not build on this machine (see the logged reason)")
    yield k


def _check(layer: PackedLinear, kern: cpu.CpuKernels, rows: int, seed: int = 0, scale: float = 1.0) -> None:
    """Every path's output vs float64 x @ Wᵀ of the reference decoder (see _assert_exact_within_fp32)."""
    x = scale * torch.randn(rows, layer.spec.in_features, generator=torch.Generator().manual_seed(seed))
    outputs = {"dispatch": kernels.cpu_linear(layer.spec, layer.tensors, x, kern)}  # as the op runs it
    for path in ("gemv", "gemm") + (("amx",) if kern.has_amx else ()):
        outputs[path] = kern.matmul(layer.spec, layer.tensors, x, path=path)
    for path, y in outputs.items():
        _assert_exact_within_fp32(layer, x, y, path)


def _assert_exact_within_fp32(layer: PackedLinear, x: torch.Tensor, y: torch.Tensor, path: str) -> None:
    """y within fp32 rounding of the sum of |terms| of float64 x @ Wᵀ (W from the reference decoder)."""
    weight = dequantize_layer(layer.spec, layer.tensors).double()
    exact = x.double() @ weight.T
    bound = x.double().abs() @ weight.abs().T
    tolerance = 4 * layer.spec.in_features * torch.finfo(torch.float32).eps * bound + 1e-30
    error = (y.double() - exact).abs()
    worst = float((error / tolerance).max())
    assert worst <= 1.0, f"{path}: error {worst:.2f}x the fp32 tolerance"
    # and far below it in practice: the kernels sum in fp32 like a dense matmul does
    assert float((error / (bound + 1e-30)).max()) < 1e-5, path


SHAPES = [(64, 64), (37, 50), (16, 16), (1, 1), (100, 200), (33, 130), (48, 96), (257, 31)]


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 40])
def test_random_shapes(kern, out_features, in_features, rows):
    layer = random_packed_layer(out_features, in_features, 3, 16, 16, 3, 0.02, seed=out_features + in_features)
    _check(layer, kern, rows)


@pytest.mark.parametrize("wbits", range(1, 9))
@pytest.mark.parametrize("rows", [1, 33])
def test_every_bit_width(kern, wbits, rows):
    _check(random_packed_layer(48, 80, wbits, 16, 16, 3, 0.01, seed=wbits), kern, rows)


@pytest.mark.parametrize("beta1,beta2,qq_bits", [(32, 16, 3), (64, 8, 2), (128, 7, 3), (16, 1, 4), (48, 48, 8),
                                                (16, 32, 1), (16, 16, 2), (32, 64, 5), (16, 16, 7),
                                                (16, 16, None), (64, 16, None)])
@pytest.mark.parametrize("rows", [1, 20])
def test_group_sizes_and_statistics(kern, beta1, beta2, qq_bits, rows):
    """600 input features: the AMX kernel's 256-column passes cut through groups of 48 and 128. Statistics of
    every width with beta2 a multiple of 16 go through the matrix-vector kernel's bit-plane transpose (AVX512-VBMI
    and GFNI) in the native build on such CPUs, through its masked adds in the avx512 build."""
    _check(random_packed_layer(70, 600, 3, beta1, beta2, qq_bits, 0.01, seed=beta1 + beta2), kern, rows)


@pytest.mark.parametrize("share", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("perm", [True, False])
def test_outliers_and_permutation(kern, share, perm):
    layer = random_packed_layer(40, 96, 3, 16, 16, 3, share, perm=perm, seed=3)
    if share == 0.0:
        assert layer.outlier_count == 0
    for rows in (1, 7):
        _check(layer, kern, rows)


def test_all_outlier_rows_and_empty_rows(kern):
    layer = random_packed_layer(32, 64, 4, 16, 16, 3, 0.0, seed=1)
    t = dict(layer.tensors)
    rows = torch.tensor([0] * 64 + [5] * 64 + [31] * 64)  # rows 0, 5 and 31 are outliers in every column
    t["outlier_row_ptr"] = torch.cat([torch.zeros(1, dtype=torch.int64),
                                      torch.bincount(rows, minlength=32).cumsum(0)]).to(torch.int32)
    t["outlier_col"] = torch.arange(64).repeat(3).to(torch.int16)
    t["outlier_val"] = torch.randn(192).half()
    for n in (1, 2, 20):
        _check(PackedLinear(layer.spec, t), kern, n)


def test_int32_indices_for_wide_layers(kern):
    layer = random_packed_layer(17, 33000, 2, 16, 16, 3, 0.001, seed=2)
    assert layer.tensors["outlier_col"].dtype == torch.int32 and layer.tensors["perm"].dtype == torch.int32
    _check(layer, kern, 1)
    _check(layer, kern, 3)


@pytest.mark.parametrize("magnitude", [1e-4, 1e4])
def test_extreme_statistics_and_inputs(kern, magnitude):
    """Huge/tiny second-level grids (zeros far outside the code range) and inputs of extreme scale."""
    spec = LayerSpec(64, 48, 3, 16, 16, 3, False, False)
    g = torch.Generator().manual_seed(0)
    t = {"qweight": pack_weight_codes(torch.randint(0, 8, (48, 64), generator=g), 3),
         "outlier_row_ptr": torch.zeros(49, dtype=torch.int32), "outlier_col": torch.zeros(0, dtype=torch.int16),
         "outlier_val": torch.zeros(0, dtype=torch.float16)}
    for stat in ("scale", "zero"):  # 4 groups x 48 rows; second level per 16 rows
        t[f"{stat}_codes"] = pack_bitplanes(torch.randint(0, 8, (4, 48), generator=g), 3).transpose(0, 1).contiguous()
        t[f"{stat}_scale"] = torch.full((3, 4), magnitude).half()
        t[f"{stat}_zero"] = torch.full((3, 4), -100.0 if magnitude > 1 else 3.0).half()
    layer = PackedLinear(spec, t)
    for rows in (1, 40):
        _check(layer, kern, rows, scale=1 / magnitude)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), 1e38, -3e20])
def test_inputs_beyond_the_kernels_range_give_what_f_linear_gives(kern, value, monkeypatch):
    """Infinite, NaN and huge inputs: the matrix-vector and AMX kernels (zero points factored out, bf16 parts) would
    give NaN rows or overflow, so they hand such calls to the reference path; every path gives F.linear's inf, NaN
    and finite values. Just within the limit (2^64) the kernels still compute, within fp32 rounding."""
    layer = random_packed_layer(48, 96, 3, 16, 16, 3, 0.02, seed=5)
    weight = dequantize_layer(layer.spec, layer.tensors)
    for rows in (1, 3, 40):
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        x[0, 7] = value
        x[-1, 50] = value
        expected = torch.nn.functional.linear(x, weight)
        outputs = {"dispatch": kernels.cpu_linear(layer.spec, layer.tensors, x, kern)}
        for path in ("gemv", "gemm") + (("amx",) if kern.has_amx else ()):
            outputs[path] = kern.matmul(layer.spec, layer.tensors, x, path=path)
        for path, y in outputs.items():
            assert torch.equal(y.isnan(), expected.isnan()), (path, rows)
            assert torch.equal(y.isinf() & (y > 0), expected.isinf() & (expected > 0)), (path, rows)
            assert torch.equal(y.isinf() & (y < 0), expected.isinf() & (expected < 0)), (path, rows)
            finite = expected.isfinite()
            torch.testing.assert_close(y[finite], expected[finite], rtol=1e-5, atol=1e-4)
        if isinstance(kern, cpu.CpuKernels) and rows > 2:  # the other rows as the kernel computes them alone
            for path in ("gemv",) + (("amx",) if kern.has_amx else ()):
                alone = kern.matmul(layer.spec, layer.tensors, x[1:-1].contiguous(), path=path)
                assert torch.equal(outputs[path][1:-1], alone), path
    fallbacks = []  # within the limit the kernels compute, not the reference path
    monkeypatch.setattr(kernels, "reference_linear", lambda *args: fallbacks.append(1) or pytest.fail("fallback"))
    for rows in (1, 40):
        _check(layer, kern, rows, scale=2.0**60)
    assert not fallbacks


def test_fp32_statistics_take_the_reference_path(kern):
    """Plain fp32 statistics (the reference implementation's baselines): the op decodes them exactly; the C
    kernels, which read fp16, refuse them rather than misread them."""
    layer = random_packed_layer(40, 64, 4, 16, 16, None, 0.0, seed=7)
    spec = dataclasses.replace(layer.spec, stats_dtype="float32")
    t = {**layer.tensors, "scale": layer.tensors["scale"].float() * 1.0001, "zero": layer.tensors["zero"].float()}
    x = torch.randn(3, 64)
    assert torch.equal(kernels.linear(spec, t, x), kernels.reference_linear(spec, t, x))
    assert torch.equal(kernels.cpu_linear(spec, t, x, kern), kernels.reference_linear(spec, t, x))
    with pytest.raises(ValueError, match="fp16 or bilevel statistics"):
        kern.matmul(spec, t, x)


def test_input_shapes(kern):
    """Any leading shape (as nn.Linear takes), and a clear error for the wrong number of input features."""
    layer = random_packed_layer(48, 64, 3, 16, 16, 3, 0.02, seed=6)
    x = torch.randn(2, 3, 64)
    for path in ("gemv", "gemm"):
        flat = kern.matmul(layer.spec, layer.tensors, x.reshape(6, 64), path=path)
        assert torch.equal(kern.matmul(layer.spec, layer.tensors, x, path=path), flat.reshape(2, 3, 48)), path
        assert torch.equal(kern.matmul(layer.spec, layer.tensors, x[0, 0], path=path), flat[0]), path
    assert kern.matmul(layer.spec, layer.tensors, torch.zeros(0, 64)).shape == (0, 48)
    for bad in (torch.randn(4, 63), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"input has shape .*; the layer expects \[\.\.\., 64\]"):
            kern.matmul(layer.spec, layer.tensors, bad)
    if isinstance(kern, cpu.CpuKernels):  # read as fp32 at x's address: garbage, or past its end (cpu_linear converts)
        for bad, what in ((torch.randn(64, 2).T, "not contiguous"), (torch.randn(2, 64).half(), "torch.float16")):
            with pytest.raises(ValueError, match=f"the CPU kernels take a contiguous float32 CPU x, got .*{what}"):
                kern.matmul(layer.spec, layer.tensors, bad)


@pytest.mark.parametrize("out_features,beta2,qq_bits", [(80, 16, 3), (37, 16, 3), (64, 7, 3), (48, 16, None)])
def test_matrix_vector_rows_do_not_depend_on_the_batch(kern, out_features, beta2, qq_bits):
    """The matrix-vector kernel takes several rows in one call (each tile pair runs over all of them): every row's
    result must be bit-identical to that row alone, so batched and single-sequence decoding agree."""
    layer = random_packed_layer(out_features, 96, 3, 16, beta2, qq_bits, 0.03, seed=out_features)
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(1))
    alone = torch.stack([kern.matmul(layer.spec, layer.tensors, x[i], path="gemv") for i in range(9)])
    for rows in range(2, 10):
        assert torch.equal(kern.matmul(layer.spec, layer.tensors, x[:rows], path="gemv"), alone[:rows]), rows
    _assert_exact_within_fp32(layer, x, alone, "gemv")


@pytest.mark.parametrize("perm", [True, False])
def test_matrix_kernel_decodes_bit_exactly(kern, perm):
    """x = identity makes y = W exactly (one product per output; on AMX the three bf16 parts of w summed), so the
    decode must equal the reference bit for bit."""
    layer = random_packed_layer(70, 150, 3, 16, 16, 3, 0.05, perm=perm, seed=4)
    for path in ("gemm",) + (("amx",) if kern.has_amx else ()):
        y = kern.matmul(layer.spec, layer.tensors, torch.eye(150), path=path)
        assert torch.equal(y.T, dequantize_layer(layer.spec, layer.tensors)), path


def test_every_fp16_value_converts_exactly(kern):
    """Every finite fp16 bit pattern (normal, subnormal, both zeros) as an outlier value, x = identity: the matrix
    kernels' W equals the reference bit for bit, whichever fp16 conversion the build has (_Float16 natively and on
    aarch64, F16C in the avx2 build, bit arithmetic in the portable one)."""
    layer = random_packed_layer(64, 1024, 3, 16, 16, 3, 0.0, perm=False, seed=15)
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16).clone()
    values[~torch.isfinite(values)] = 0.0
    t = {**layer.tensors, "outlier_row_ptr": torch.arange(0, 65537, 1024, dtype=torch.int32),
         "outlier_col": torch.arange(1024, dtype=torch.int16).repeat(64), "outlier_val": values}
    layer = PackedLinear(layer.spec, t)
    for path in ("gemm",) + (("amx",) if kern.has_amx else ()):
        y = kern.matmul(layer.spec, t, torch.eye(1024), path=path)
        assert torch.equal(y.T, dequantize_layer(layer.spec, t)), path


@pytest.mark.parametrize("compiler", ["gcc-11", "clang-14"])
def test_every_build_compiles_warning_free_with_older_compilers(compiler, tmp_path):
    """GCC 11 (Ubuntu 22.04, RHEL 9) and clang 14 have no _Float16 on x86 without AVX512-FP16, GCC 11 no
    _mm512_cvtpbh_ps, clang other AMX macro names: a build that fails leaves users on the slow reference path."""
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed (scripts/test.sh installs it where apt-get can)")
    for variant, flags in cpu.FLAGS.items():
        result = subprocess.run([compiler, *flags, "-Wall", "-Wextra", "-Werror", *map(str, cpu.SOURCES), "-o",
                                 str(tmp_path / f"{variant}.so")], capture_output=True, text=True)
        assert result.returncode == 0, f"{compiler}, {variant} build:\n{result.stderr[-3000:]}"


def test_beta1_not_a_multiple_of_16_uses_the_reference_path():
    layer = random_packed_layer(20, 40, 3, 24, 16, 3, 0.02, seed=5)
    assert not layer.spec.kernel_friendly
    x = torch.randn(3, 40)
    assert torch.equal(kernels.cpu_linear(layer.spec, layer.tensors, x),
                       kernels.reference_linear(layer.spec, layer.tensors, x))


def test_registered_op_matches_reference_and_has_a_fake_kernel():
    layer = random_packed_layer(40, 64, 3, 16, 16, 3, 0.02, seed=6)
    x = torch.randn(2, 5, 64)
    y = kernels.linear(layer.spec, layer.tensors, x)
    assert y.shape == (2, 5, 40)
    torch.testing.assert_close(y, kernels.reference_linear(layer.spec, layer.tensors, x), rtol=1e-5, atol=1e-6)
    t = layer.tensors
    args = (x, t["qweight"], [t[n] for n in kernels.stat_names(layer.spec)], t["perm"], t["outlier_row_ptr"],
            t["outlier_col"], t["outlier_val"], [64, 40, 3, 16, 16, 3])
    torch.library.opcheck(torch.ops.spqr.linear.default, args, test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.spqr.linear(torch.empty(7, 64), *args[1:])
    assert fake.shape == (7, 40)


def test_reference_only_mode_and_build_failure(monkeypatch, caplog, tmp_path):
    cpu.load.cache_clear()
    try:
        monkeypatch.setenv("SPQR_KERNELS", "reference")
        assert cpu.load() is None
        cpu.load.cache_clear()
        monkeypatch.delenv("SPQR_KERNELS")
        monkeypatch.setenv("CC", "/nonexistent/cc")
        monkeypatch.setenv("SPQR_CACHE_DIR", str(tmp_path))  # nothing cached there: a build is needed
        with caplog.at_level(logging.WARNING):
            assert cpu.load() is None
        assert "reference path" in caplog.text
        layer = random_packed_layer(20, 32, 3, 16, 16, 3, 0.02, seed=7)
        x = torch.randn(2, 32)  # still correct, through the reference path
        assert torch.equal(kernels.cpu_linear(layer.spec, layer.tensors, x),
                           kernels.reference_linear(layer.spec, layer.tensors, x))
    finally:
        cpu.load.cache_clear()


@pytest.mark.parametrize("rejected", [["-fopenmp"], ["-fopenmp", "-march=native"]])
def test_a_compiler_without_openmp_gets_single_threaded_kernels(monkeypatch, caplog, tmp_path, rejected):
    """As with Apple's clang, which rejects -fopenmp (and maybe -march=native): the builds without them still give
    kernels."""
    compiler = tmp_path / "cc-without"
    tests = "".join(f'[ "$a" = {flag} ] && {{ echo "error: unsupported option \'{flag}\'" >&2; exit 1; }}; '
                    for flag in rejected)
    compiler.write_text(f'#!/bin/sh\nfor a in "$@"; do {tests}done\nexec cc "$@"\n')
    compiler.chmod(0o755)
    cpu.load.cache_clear()
    try:
        monkeypatch.setenv("CC", str(compiler))
        monkeypatch.setenv("SPQR_CACHE_DIR", str(tmp_path / "cache"))
        with caplog.at_level(logging.WARNING):
            kern = cpu.load()
        assert kern is not None and not kern.has_openmp
        assert f"built without {' and '.join(rejected)}" in caplog.text
        assert "(the first build failed: error: unsupported option" in caplog.text
        assert "one thread" in cpu.describe()
        if "-march=native" in rejected:  # the target's baseline: on x86-64, SSE2
            assert not kern.has_avx512 and not kern.has_avx2
        _check(random_packed_layer(100, 96, 3, 16, 16, 3, 0.02, seed=16), kern, 1)
        _check(random_packed_layer(100, 96, 3, 16, 16, 3, 0.02, seed=16), kern, 40)
    finally:
        cpu.load.cache_clear()


def test_amx_path_or_its_refusal():
    """AMX (where the CPU has it): batches over AMX_MAX_ROWS in pieces, its kept workspace reused across shapes.
    Elsewhere asking for it is a clear error."""
    kern = cpu.load("native")
    assert kern is not None
    layer = random_packed_layer(100, 70, 3, 16, 16, 3, 0.03, seed=11)
    if not kern.has_amx:
        with pytest.raises(RuntimeError, match="AMX kernel is not available"):
            kern.matmul(layer.spec, layer.tensors, torch.randn(20, 70), path="amx")
        pytest.skip("this CPU has no AMX tile unit: its refusal is tested, its numbers are not")
    big = random_packed_layer(48, 300, 4, 32, 16, 3, 0.02, seed=12)  # groups of two 16-column blocks
    for lay, rows in ((layer, cpu.AMX_MAX_ROWS + 37), (big, 40), (layer, 3)):
        x = torch.randn(rows, lay.spec.in_features)
        _assert_exact_within_fp32(lay, x, kern.matmul(lay.spec, lay.tensors, x, path="amx"), "amx")


def test_concurrent_calls_give_the_same_results(kern):
    """Calls from several threads at once: some find the kept workspace busy and use a buffer of their own."""
    from concurrent.futures import ThreadPoolExecutor

    layer = random_packed_layer(100, 70, 3, 16, 16, 3, 0.03, seed=14)
    for path in ("gemv", "gemm") + (("amx",) if kern.has_amx else ()):
        xs = [torch.randn(20, 70) for _ in range(16)]
        with ThreadPoolExecutor(4) as pool:
            ys = list(pool.map(lambda x, p=path: kern.matmul(layer.spec, layer.tensors, x, path=p), xs))
        for x, y in zip(xs, ys):
            assert torch.equal(y, kern.matmul(layer.spec, layer.tensors, x, path=path)), path


def test_released_workspace_is_made_again(kern):
    layer = random_packed_layer(64, 200, 3, 16, 16, 3, 0.02, seed=13)
    x = torch.randn(20, 200)
    for path in ("gemv", "gemm") + (("amx",) if kern.has_amx else ()):
        before = kern.matmul(layer.spec, layer.tensors, x, path=path)
        kern.release_workspace()
        assert torch.equal(kern.matmul(layer.spec, layer.tensors, x, path=path), before), path


def test_amx_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("SPQR_AMX", "0")
    kern = cpu.load("native")
    assert kern is not None
    assert not cpu.CpuKernels(kern.lib, "native").has_amx
    with pytest.raises(ValueError, match="unknown kernel path"):
        kern.matmul(LayerSpec(16, 16, 3, 16, 16, 3, False, False), {}, torch.randn(1, 16), path="fast")


def test_non_contiguous_buffers_are_refused(kern):
    layer = random_packed_layer(16, 64, 3, 16, 16, 3, 0.0, seed=8)
    t = dict(layer.tensors)
    t["qweight"] = torch.cat([t["qweight"], t["qweight"]], dim=1)[:, ::2]
    with pytest.raises(ValueError, match="qweight must be a contiguous CPU tensor"):
        kern.matmul(layer.spec, t, torch.randn(1, 64))


def test_the_op_compiles_into_a_torch_compile_graph():
    from spqr.nn import SpQRLinear

    layer = SpQRLinear.from_packed(random_packed_layer(40, 64, 3, 16, 16, 3, 0.02, bias=True, seed=9))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), layer(x))
    # the backward too (W decoded by the registered op spqr::dequantize, opaque to the tracer: no graph break)
    x_grad, expected = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(x_grad).square().sum().backward()
    torch.nn.functional.linear(expected, layer.dequantize(), layer.bias).square().sum().backward()
    torch.testing.assert_close(x_grad.grad, expected.grad, rtol=1e-5, atol=1e-5)


def test_eager_module_calls_equal_the_op_and_fake_inputs_go_through_the_op():
    """SpQRLinear skips the dispatcher for eager CPU tensors: same numbers as the registered op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from spqr.nn import SpQRLinear

    layer = SpQRLinear.from_packed(random_packed_layer(40, 64, 3, 16, 16, 3, 0.02, bias=True, seed=10))
    for x in (torch.randn(2, 3, 64), torch.randn(1, 64), torch.randn(64, 3).T, torch.randn(4, 64).bfloat16()):
        expected = kernels.linear(layer.spec, layer._buffers, x) + layer.bias.to(x.dtype)
        assert layer(x).dtype == x.dtype and torch.equal(layer(x), expected)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert layer(torch.empty(5, 64)).shape == (5, 40)


def test_a_fork_while_another_thread_holds_the_workspace_leaves_the_child_a_usable_one():
    """The child inherited the workspace lock taken by a thread it does not have: release_workspace hung (3 forks in
    20 of a loop of calls). A fork handler gives the child a fresh lock."""
    import os
    import threading
    import time

    native = cpu.load()
    if native is None:
        pytest.fail("the native CPU kernels did not build on this machine")
    layer = random_packed_layer(4096, 4096, seed=0)
    x = torch.randn(1, 4096)
    stop = threading.Event()

    def busy() -> None:  # the workspace is held for most of each ~0.5 ms call
        while not stop.is_set():
            native.matmul(layer.spec, layer.tensors, x)

    worker = threading.Thread(target=busy)
    worker.start()
    hung = 0
    try:
        for _ in range(12):
            time.sleep(0.003)
            pid = os.fork()
            if pid == 0:
                native.release_workspace()
                os._exit(0)
            deadline = time.monotonic() + 10
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.01)
    finally:
        stop.set()
        worker.join()
    assert hung == 0, f"{hung} of 12 forked children hung in release_workspace"
