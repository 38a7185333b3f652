"""spqr.algo.engine.quantize_weights: the SpQR sweep against textbook GPTQ / RTN and its invariants."""

from __future__ import annotations

import math

import pytest
import torch

from spqr.algo.bilevel import dequantize_stat, expand_groups
from spqr.algo.engine import HessianError, inverse_hessian_cholesky, quantize_weights
from spqr.config import QuantConfig, preset
from spqr.format.layout import PackedLinear
from tests.helpers import random_hessian, ref_damped_inverse_cholesky, ref_gptq, ref_rtn

INF = math.inf


def _weights(out: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * (0.5 + torch.rand(out, 1, generator=g))


def _gptq_config(**kw) -> QuantConfig:
    base = dict(wbits=3, qq_bits=None, outlier_threshold=INF, perm="identity", percdamp=0.1, blocksize=128)
    return QuantConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ vs textbook GPTQ

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("wbits", [2, 3, 4])
def test_one_group_matches_textbook_gptq(seed, wbits):
    W = _weights(12, 24, seed)
    H = random_hessian(24, seed=seed)
    qw = quantize_weights([W], H, _gptq_config(wbits=wbits, beta1=32))[0]
    ref = ref_gptq(W, H, wbits, beta1=24, percdamp=0.1)
    assert torch.allclose(qw.weight, ref, atol=1e-4)
    assert qw.perm is None
    assert qw.outlier_count == 0


@pytest.mark.parametrize("beta1,blocksize", [(8, 128), (5, 10), (16, 16), (7, 1)])
def test_several_groups_match_textbook_gptq(beta1, blocksize):
    """Grids fitted per group when the sweep reaches it (after earlier feedback); ragged last group."""
    W = _weights(10, 40, seed=beta1)
    H = random_hessian(40, seed=beta1)
    qw = quantize_weights([W], H, _gptq_config(beta1=beta1, blocksize=blocksize))[0]
    assert torch.allclose(qw.weight, ref_gptq(W, H, 3, beta1=beta1, percdamp=0.1), atol=1e-4)


def test_act_order_matches_textbook_gptq_on_permuted_columns():
    W = _weights(9, 30, seed=11)
    H = random_hessian(30, seed=11, scales=torch.linspace(0.2, 3.0, 30).flip(0)[torch.randperm(30)])
    qw = quantize_weights([W], H, _gptq_config(beta1=8, perm="act_order"))[0]
    perm = sorted(range(30), key=lambda i: -H[i, i].item())
    assert qw.perm.tolist() == perm
    assert torch.allclose(qw.weight, ref_gptq(W, H, 3, beta1=8, percdamp=0.1, perm=torch.tensor(perm)), atol=1e-4)


@pytest.mark.parametrize("qq_bits,outliers,perm",
                         [(None, INF, "identity"), (3, 0.2, "act_order"), (2, 0.05, "identity")])
def test_blocksize_does_not_change_the_result(qq_bits, outliers, perm):
    W = _weights(20, 50, seed=3)
    H = random_hessian(50, seed=3)
    results = [quantize_weights([W], H, QuantConfig(wbits=3, beta1=8, beta2=8, qq_bits=qq_bits, perm=perm,
                                                    outlier_threshold=outliers, blocksize=b))[0]
               for b in (1, 8, 24, 32, 128)]
    for r in results[1:]:
        assert torch.allclose(r.weight, results[0].weight, atol=1e-4)
        assert torch.equal(r.outlier_mask, results[0].outlier_mask)


def test_error_feedback_reduces_the_hessian_weighted_error():
    W = _weights(32, 48, seed=4)
    H = random_hessian(48, seed=4)
    gptq = quantize_weights([W], H, _gptq_config(beta1=16))[0]
    rtn = quantize_weights([W], H, _gptq_config(beta1=16, error_feedback=False))[0]
    assert gptq.relative_error < 0.9 * rtn.relative_error


@pytest.mark.parametrize("config", [_gptq_config(beta1=16),
                                    QuantConfig(wbits=3, beta1=8, outlier_threshold=0.1)])
def test_relative_error_is_the_hessian_weighted_error(config):
    W = _weights(16, 24, seed=5)
    H = random_hessian(24, seed=5)
    qw = quantize_weights([W], H, config)[0]
    E = (W - qw.weight).double()
    expected = torch.trace(E @ H.double() @ E.T) / torch.trace(W.double() @ H.double() @ W.double().T)
    assert qw.relative_error == pytest.approx(expected.item(), rel=1e-4)


# ------------------------------------------------------------------------------------------ RTN

@pytest.mark.parametrize("qq_bits", [None, 3])
@pytest.mark.parametrize("shape,beta1,beta2", [((16, 32), 16, 16), ((37, 50), 16, 16), ((5, 7), 4, 2)])
def test_rtn_equals_plain_round_to_nearest_per_group(qq_bits, shape, beta1, beta2):
    W = _weights(*shape, seed=shape[0])
    config = preset("rtn", wbits=3, beta1=beta1, beta2=beta2, qq_bits=qq_bits)
    assert not config.needs_hessian
    qw = quantize_weights([W], None, config)[0]
    ref = ref_rtn(W, 3, beta1, qq_bits, beta2)
    assert torch.allclose(qw.weight, ref, atol=1e-6)
    assert qw.relative_error == 0.0
    # with a Hessian given, RTN still ignores it
    with_h = quantize_weights([W], random_hessian(shape[1]), config)[0]
    assert torch.equal(with_h.weight, qw.weight)


def test_rtn_all_zero_row_stays_zero():
    """A weight row that is all zero (e.g. a pruned neuron) must decode to zeros, not to ±1/maxq."""
    W = _weights(4, 32, seed=0) * 0.02
    W[0] = 0.0
    for wbits in (2, 3, 4):
        qw = quantize_weights([W], None, preset("rtn", wbits=wbits))[0]
        assert qw.weight[0].abs().max().item() <= 1e-6, f"wbits={wbits}: zero row decodes to {qw.weight[0, 0].item()}"


def test_needs_hessian_and_shape_checks():
    W = _weights(8, 16, 0)
    with pytest.raises(ValueError, match="Hessian"):
        quantize_weights([W], None, QuantConfig())
    with pytest.raises(ValueError, match="input columns"):
        quantize_weights([W, _weights(8, 12, 1)], random_hessian(16), QuantConfig())


# ------------------------------------------------------------------------------------------ outliers

def _sensitivity_setup(seed: int = 6):
    W = _weights(24, 32, seed) * 0.1
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(24, generator=g)[:6]
    cols = torch.randint(0, 32, (6,), generator=g)
    W[rows, cols] = 3.0 * torch.sign(torch.randn(6, generator=g))
    H = random_hessian(32, seed=seed)
    return W, H, rows, cols


@pytest.mark.parametrize("tau", [0.05, 0.2, 1.0])
def test_outlier_criterion_without_feedback(tau):
    """No feedback: every outlier had sensitivity > τ·scale and is restored; no other weight exceeds it."""
    W, H, rows, cols = _sensitivity_setup()
    config = QuantConfig(wbits=3, beta1=8, qq_bits=None, outlier_threshold=tau, perm="identity",
                         error_feedback=False)
    qw = quantize_weights([W], H, config)[0]
    d = ref_damped_inverse_cholesky(H, config.percdamp).diagonal().float()
    scale = (W.var(dim=0) / d.square()).mean()
    threshold = tau * scale
    dense = qw.weight - qw.outlier_delta.float()
    sensitivity = ((W - dense) / d).square()
    mask = qw.outlier_mask
    assert bool((sensitivity[mask] > threshold * (1 - 1e-3)).all())
    final = ((W - qw.weight) / d).square()
    assert bool((final[~mask] <= threshold * (1 + 1e-3)).all())
    # outliers are kept to fp16 precision of their delta
    assert bool(((qw.weight - W).abs()[mask] <= 1e-3 * (W.abs()[mask] + 1)).all())
    assert bool(((qw.outlier_delta != 0) <= mask).all()), "deltas only at outlier positions"
    # the planted outliers are found at the low thresholds
    if tau <= 0.2:
        assert bool(mask[rows, cols].all())


def test_outliers_improve_the_error_and_do_not_stretch_the_grid():
    W, H, rows, cols = _sensitivity_setup(seed=8)
    base = dict(wbits=3, beta1=8, qq_bits=None, perm="identity")
    with_outliers = quantize_weights([W], H, QuantConfig(**base, outlier_threshold=0.5))[0]
    without = quantize_weights([W], H, QuantConfig(**base, outlier_threshold=INF))[0]
    assert without.outlier_count == 0
    assert with_outliers.outlier_count >= 6
    assert with_outliers.relative_error < 0.5 * without.relative_error
    # the grid of a row holding a planted outlier ignores it: its scale is about that of ordinary rows
    r, c = rows[0].item(), cols[0].item()
    group = c // 8
    scale = dequantize_stat(with_outliers.scale, 8)[group]
    assert scale[r].item() < 0.5 * 3.0 / 7


def test_outlier_count_is_monotone_in_the_threshold():
    W, H, _, _ = _sensitivity_setup(seed=9)
    W = W + 0.05 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1)) ** 3
    counts = []
    for tau in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, INF):
        qw = quantize_weights([W], H, QuantConfig(wbits=3, beta1=8, outlier_threshold=tau))[0]
        counts.append(qw.outlier_count)
    assert counts == sorted(counts, reverse=True), counts
    assert counts[0] > counts[-2] and counts[-1] == 0


@pytest.mark.parametrize("qq_bits,outliers", [(None, INF), (3, 0.2)])
def test_more_bits_give_lower_error(qq_bits, outliers):
    W = _weights(32, 48, seed=10)
    H = random_hessian(48, seed=10)
    errors = [quantize_weights([W], H, QuantConfig(wbits=b, qq_bits=qq_bits, outlier_threshold=outliers))[0]
              .relative_error for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] < 1.0


def test_act_order_is_argsort_of_the_hessian_diagonal_descending_stable():
    H = random_hessian(20, seed=12)
    diag = torch.tensor([3.0, 1.0, 5.0, 1.0, 3.0, 0.5, 5.0, 2.0, 2.0, 1.0, 4.0, 0.5, 0.1, 3.0, 1.0, 2.0, 4.0, 0.2,
                         0.3, 5.0])
    H = H / H.diagonal().sqrt()[:, None] / H.diagonal().sqrt()[None, :] * diag.sqrt()[:, None] * diag.sqrt()[None, :]
    assert torch.allclose(H.diagonal(), diag)
    H.diagonal().copy_(diag)
    qw = quantize_weights([_weights(6, 20, 0)], H, QuantConfig(perm="act_order", beta1=4))[0]
    expected = sorted(range(20), key=lambda i: -diag[i].item())  # Python's sort is stable
    assert qw.perm.dtype == torch.int64
    assert qw.perm.tolist() == expected


# ------------------------------------------------------------------------------------------ shapes and sharing

def test_ragged_shapes_and_statistics_layout():
    W = _weights(37, 50, 13)
    qw = quantize_weights([W], random_hessian(50, seed=13), QuantConfig(beta1=16, beta2=16))[0]
    assert qw.codes.shape == (37, 50) and qw.codes.dtype == torch.uint8
    assert int(qw.codes.max()) <= 7
    assert qw.weight.shape == (37, 50) and qw.weight.dtype == torch.float32
    for stat in (qw.scale, qw.zero):
        assert stat.codes.shape == (4, 37)
        assert stat.second_scale.shape == stat.second_zero.shape == (4, 3)
        assert stat.values is None
    assert qw.outlier_mask.shape == qw.outlier_delta.shape == (37, 50)
    assert qw.outlier_delta.dtype == torch.float16
    # the stored form decodes to the engine's weights (in permuted column order)
    scale = expand_groups(dequantize_stat(qw.scale, 16).T, 16, 50)
    zero = expand_groups(dequantize_stat(qw.zero, 16).T, 16, 50)
    dense = (qw.codes.float() - zero) * scale + qw.outlier_delta.float()
    assert torch.equal(dense[:, torch.argsort(qw.perm)], qw.weight)


@pytest.mark.parametrize("config", [QuantConfig(beta1=16, beta2=16),
                                    QuantConfig(wbits=4, beta1=16, beta2=16, qq_bits=None, outlier_threshold=INF),
                                    QuantConfig(wbits=2, beta1=8, beta2=4, perm="identity", outlier_threshold=0.05)])
def test_matrices_sharing_a_hessian_equal_quantizing_them_alone(config):
    A, B, C = _weights(37, 50, 14), _weights(20, 50, 15), _weights(16, 50, 16)
    H = random_hessian(50, seed=14)
    together = quantize_weights([A, B, C], H, config)
    for W, joint in zip((A, B, C), together):
        alone = quantize_weights([W], H, config)[0]
        assert torch.equal(joint.codes, alone.codes)
        assert torch.equal(joint.weight, alone.weight)
        assert torch.equal(joint.outlier_mask, alone.outlier_mask)
        assert torch.equal(joint.outlier_delta, alone.outlier_delta)
        for a, b in ((joint.scale, alone.scale), (joint.zero, alone.zero)):
            for name in ("codes", "second_scale", "second_zero", "values"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None and y is None) or torch.equal(x, y), name
        assert joint.relative_error == pytest.approx(alone.relative_error, rel=1e-6)


@pytest.mark.parametrize("perm", ["identity", "act_order"])
def test_dead_input_columns(perm):
    """Inputs that are always zero: H has zero rows/columns there; their weights do not matter."""
    n = 24
    g = torch.Generator().manual_seed(17)
    X = torch.randn(200, n, generator=g)
    dead = [0, 5, 6, 23]
    X[:, dead] = 0.0
    H = 2 * X.T @ X / 200
    W = _weights(10, n, 17)
    config = _gptq_config(beta1=8, perm=perm)
    qw = quantize_weights([W], H, config)[0]
    assert bool(torch.isfinite(qw.weight).all())
    assert math.isfinite(qw.relative_error) and qw.relative_error < 0.2
    ref = ref_gptq(W, H, 3, beta1=8, percdamp=0.1, perm=qw.perm)
    assert torch.allclose(qw.weight, ref, atol=1e-4)
    # the output on real inputs is what matters; it is close to the original's
    assert ((X @ (qw.weight - W).T).norm() / (X @ W.T).norm()).item() < 0.2
    # also with outliers and bilevel statistics
    spqr = quantize_weights([W], H, QuantConfig(beta1=8, perm=perm))[0]
    assert bool(torch.isfinite(spqr.weight).all())


def test_all_dead_hessian():
    W = _weights(6, 16, 18)
    qw = quantize_weights([W], torch.zeros(16, 16), QuantConfig(beta1=8))[0]
    assert bool(torch.isfinite(qw.weight).all())
    assert qw.relative_error == 0.0 or math.isfinite(qw.relative_error)


@pytest.mark.parametrize("config", [QuantConfig(), preset("gptq", beta1=16), QuantConfig(outlier_threshold=0.05)])
def test_deterministic(config):
    W = _weights(40, 48, 19)
    H = random_hessian(48, seed=19)
    a = quantize_weights([W, W[:7]], H, config)
    b = quantize_weights([W, W[:7]], H, config)
    for x, y in zip(a, b):
        assert torch.equal(x.weight, y.weight) and torch.equal(x.codes, y.codes)
        assert torch.equal(x.outlier_mask, y.outlier_mask) and x.relative_error == y.relative_error


@pytest.mark.parametrize("config", [QuantConfig(), preset("rtn")])
def test_parameters_that_require_grad_are_accepted(config):
    """quantize_weights(list of layer.weight) works like with detached tensors (nn.Parameter requires grad)."""
    layer = torch.nn.Linear(32, 16)
    H = random_hessian(32, seed=22)
    expected = quantize_weights([layer.weight.detach()], H, config)[0]
    got = quantize_weights([layer.weight], H, config)[0]
    assert torch.equal(got.weight, expected.weight)
    assert torch.equal(got.codes, expected.codes)


@pytest.mark.parametrize("perm", ["identity", "act_order"])
def test_inputs_are_not_modified(perm):
    W = _weights(16, 32, 20)
    H = random_hessian(32, seed=20)
    H[3, :] = 0.0
    H[:, 3] = 0.0  # a dead column: the engine patches its own copy of H
    keep_w, keep_h = W.clone(), H.clone()
    quantize_weights([W], H, QuantConfig(perm=perm))
    assert torch.equal(W, keep_w)
    assert torch.equal(H, keep_h)


@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
@pytest.mark.parametrize("qq_bits", [3, None])
@pytest.mark.parametrize("perm", ["identity", "act_order"])
@pytest.mark.parametrize("with_outliers", [False, True])
def test_engine_weight_equals_packed_decoding(wbits, qq_bits, perm, with_outliers):
    outliers = (0.1 if wbits < 8 else 1e-4) if with_outliers else INF
    W = _weights(37, 50, wbits * 7 + (qq_bits or 0))
    W[3, 7], W[20, 41], W[36, 0] = 9.0, -12.0, 15.0
    config = QuantConfig(wbits=wbits, beta1=16, beta2=16, qq_bits=qq_bits, perm=perm, outlier_threshold=outliers)
    qw = quantize_weights([W], random_hessian(50, seed=wbits), config)[0]
    if outliers != INF:
        assert qw.outlier_count > 0
    packed = PackedLinear.from_quantized(qw, wbits, 16, 16, qq_bits)
    assert torch.equal(packed.dequantize(), qw.weight)


# ------------------------------------------------------------------------------------------ H⁻¹ Cholesky

def test_inverse_hessian_cholesky_is_the_upper_factor_of_the_damped_inverse():
    H = random_hessian(12, seed=21)
    U = inverse_hessian_cholesky(H, 0.05)
    assert torch.equal(U, torch.triu(U))
    damped = H.double() + torch.eye(12, dtype=torch.float64) * 0.05 * H.diagonal().double().mean()
    assert torch.allclose((U.double().T @ U.double()), torch.linalg.inv(damped), rtol=1e-3, atol=1e-5)


def test_inverse_hessian_cholesky_retries_with_more_damping_and_then_fails():
    H = -torch.eye(6)  # negative definite: percdamp 1 gives 0, percdamp 10 gives 9·I
    U = inverse_hessian_cholesky(H, 1.0)
    assert torch.allclose(U, torch.eye(6) / 3.0, atol=1e-6)
    with pytest.raises(HessianError):
        inverse_hessian_cholesky(torch.full((4, 4), math.nan), 0.01)
    with pytest.raises(HessianError):
        quantize_weights([torch.randn(4, 4)], torch.full((4, 4), math.nan), QuantConfig())
