"""spqr.nn: SpQRLinear's inputs and gradients, and placing the packed tensors of its layers in one mapping
(PackedArena)."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spqr import kernels
from spqr.format.synthetic import random_packed_layer
from spqr.nn import PackedArena, SpQRLinear, place_packed_tensors


def _model() -> nn.Module:
    layers = [random_packed_layer(out, inp, wbits, 16, 16, 3, share, seed=seed)
              for seed, (out, inp, wbits, share) in enumerate([(48, 64, 3, 0.02), (33, 48, 4, 0.0), (64, 33, 2, 0.1)])]
    model = nn.Sequential(*(SpQRLinear.from_packed(layer) for layer in layers))
    model[1].bias = nn.Parameter(torch.randn(33), requires_grad=False)
    return model


def test_placed_tensors_are_equal_aligned_views_of_one_mapping():
    model = _model()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    x = torch.randn(3, 64)
    expected = model(x)
    bias = model[1].bias
    placed = place_packed_tensors(model)
    buffers = [t for layer in model for t in layer._buffers.values()]
    assert placed >= sum(t.numel() * t.element_size() for t in buffers)
    pointers = sorted(t.data_ptr() for t in buffers if t.numel())
    assert pointers[-1] - pointers[0] < placed, "one mapping holds every packed tensor"
    assert all(t.data_ptr() % 64 == 0 for t in buffers if t.numel())
    assert model[1].bias is bias, "parameters stay where they are"
    assert {name: t for name, t in model.state_dict().items()}.keys() == before.keys()
    for name, t in model.state_dict().items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    assert torch.equal(model(x), expected)
    model[0].qweight.zero_()  # each view is its own memory: writing one leaves the others alone
    assert torch.equal(model[1].qweight, before["1.qweight"])


def test_nothing_to_place():
    assert place_packed_tensors(nn.Linear(4, 4)) == 0
    assert place_packed_tensors(_model().to("meta")) == 0, "only tensors on the CPU are placed"


def test_arena_refuses_more_than_it_holds():
    arena = PackedArena(128)
    first = arena.place(torch.arange(10, dtype=torch.int16))  # 20 bytes take a 64-byte slot
    second = arena.place(torch.ones(16))
    assert first.tolist() == list(range(10)) and second.tolist() == [1.0] * 16
    assert second.data_ptr() - first.data_ptr() == 64
    with pytest.raises(ValueError, match="the arena has 0 bytes left, the tensor needs 4"):
        arena.place(torch.ones(1))


def test_kernel_view_follows_the_modules_tensors():
    model = _model()
    x = torch.randn(3, 64)
    expected = model(x)  # each layer now keeps its kernel view (LayerCache)
    copied = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    for layer in model:
        layer.qweight.zero_()  # in place: a copy that computed from the original's memory would see it
    assert torch.equal(copied(x), expected), "a copy must not compute from the original's memory"
    assert torch.equal(restored(x), expected)
    layer = copied[0]
    before = layer(x)
    layer.qweight = torch.zeros_like(layer.qweight)  # a new tensor object: the layer makes a new view
    after = layer(x)
    layer.use_reference = True
    torch.testing.assert_close(after, layer(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


def test_placed_tensors_outlive_the_arena_object():
    arena = PackedArena(2**22)
    placed = arena.place(torch.arange(2**20, dtype=torch.int32))
    del arena
    gc.collect()
    churn = [PackedArena(2**22) for _ in range(4)]  # new mappings must not reuse the placed tensor's memory
    assert torch.equal(placed, torch.arange(2**20, dtype=torch.int32)) and len(churn) == 4


def _paths(layer: SpQRLinear) -> dict:
    """The three ways a SpQRLinear computes: its forward (C kernels), the registered op, the reference path."""

    def reference(x):
        layer.use_reference = True
        try:
            return layer(x)
        finally:
            layer.use_reference = False

    return {"module": layer, "op": lambda x: kernels.linear(layer.spec, layer._buffers, x) + layer.bias,
            "reference": reference}


@pytest.mark.parametrize("perm,qq_bits", [(True, 3), (False, None)])
def test_gradients_flow_to_the_input_as_through_the_decoded_weight(perm, qq_bits):
    """So a quantized model can be fine-tuned through (adapters on top, as QLoRA does) or differentiated for
    attribution: d(x Wᵀ + b)/dx = grad·W with W decoded exactly; the packed weights get no gradient."""
    layer = SpQRLinear.from_packed(random_packed_layer(64, 48, perm=perm, qq_bits=qq_bits, bias=True, seed=3))
    weight = layer.dequantize()
    x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    expected_x = x.clone().requires_grad_()
    (F.linear(expected_x, weight, layer.bias) * upstream).sum().backward()
    for name, path in _paths(layer).items():
        x_grad = x.clone().requires_grad_()
        y = path(x_grad)
        assert y.grad_fn is not None, name
        (y * upstream).sum().backward()
        torch.testing.assert_close(x_grad.grad, expected_x.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert all(not t.requires_grad and t.grad is None for t in layer.packed_tensors().values())
    with torch.no_grad():  # no graph when none is asked for: the C kernels directly
        assert layer(x.clone().requires_grad_()).grad_fn is None


@pytest.mark.parametrize("bad,error,message", [
    (torch.ones(3, 48, dtype=torch.long), TypeError, "floating-point input, got torch.int64"),
    (torch.ones(3, 48, dtype=torch.bool), TypeError, "floating-point input, got torch.bool"),
    (torch.randn(3, 48).to_sparse(), TypeError, r"dense floating-point input, got torch.float32 \(torch.sparse_coo\)"),
    (torch.randn(3, 47), ValueError, r"shape \(3, 47\); the layer expects \[\.\.\., 48\]"),
    (torch.randn(3, 47).double(), ValueError, "the layer expects"),
    (torch.tensor(1.0), ValueError, r"shape \(\); the layer expects"),
])
def test_inputs_the_layer_cannot_take_are_refused_on_every_path(bad, error, message):
    """An integer input was silently computed and truncated back to integers; a scalar failed with an IndexError."""
    layer = SpQRLinear.from_packed(random_packed_layer(64, 48, bias=True, seed=4))
    for path in _paths(layer).values():
        with pytest.raises(error, match=message):
            path(bad)


@pytest.mark.parametrize("corrupt,message", [
    (lambda t: t["outlier_row_ptr"].__setitem__(-1, 2**30), "outlier_row_ptr is not a valid CSR"),
    (lambda t: t["outlier_col"].__setitem__(0, 30000), "outlier_col has indices outside"),
    (lambda t: t["perm"].__setitem__(0, -30000), "perm has indices outside"),
    (lambda t: t["perm"].__setitem__(0, t["perm"][1]), "perm is not a permutation"),
    (lambda t: t.__setitem__("qweight", t["qweight"][:1]),
     r"qweight has dtype torch.int32 and shape \(1, |qweight \(1, 2, 3, 16\) \(this layer: \(4, "),
    (lambda t: t.__setitem__("scale_scale", t["scale_scale"].float()), "scale_scale has dtype torch.float32"),
    (lambda t: t.pop("zero_codes"), "zero_codes is missing"),
])
def test_bad_packed_tensors_are_refused_before_a_kernel_reads_them(corrupt, message):
    """The kernels trust the indices: an out-of-range row pointer crashed the process (segfault), an out-of-range
    column or permutation index read other memory. Refused when the layer is built and when a state dict is
    loaded into it (load_state_dict copies in place)."""
    layer = SpQRLinear.from_packed(random_packed_layer(64, 64, outlier_share=0.05, seed=5))
    tensors = {key: tensor.clone() for key, tensor in layer.packed_tensors().items()}
    corrupt(tensors)
    with pytest.raises(ValueError, match=message):
        SpQRLinear(layer.spec, tensors)
    before = {key: tensor.clone() for key, tensor in layer.state_dict().items()}
    if len(tensors) == len(before):  # (a key missing from a state dict just leaves that tensor as it is)
        with pytest.raises(RuntimeError, match=message):
            layer.load_state_dict(tensors, strict=False)
    assert all(torch.equal(before[key], tensor) for key, tensor in layer.state_dict().items())  # untouched
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T)


def test_placed_layers_save_pickle_and_copy_their_own_bytes(tmp_path):
    """Each placed tensor has a storage of its own: torch.save of a state dict failed ("multiple tensors ... view the
    same data as different types") and pickling one layer wrote every tensor's whole mapping (645 MB for a
    SmolLM2 layer of 124 KB)."""
    model = _model()
    x = torch.randn(3, 64)
    expected = model(x)
    place_packed_tensors(model)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    packed_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert (tmp_path / "state.pt").stat().st_size < packed_bytes + 20_000
    layer_bytes = sum(t.numel() * t.element_size() for t in model[0].state_dict().values())
    assert len(pickle.dumps(model[0])) < layer_bytes + 20_000
    restored = _model()
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert torch.equal(restored(x), expected)
    assert torch.equal(copy.deepcopy(model)(x), expected)


def _layer_and_dense() -> tuple[SpQRLinear, nn.Linear]:
    layer = SpQRLinear.from_packed(random_packed_layer(48, 64, perm=True, bias=True, outlier_share=0.02, seed=6))
    dense = nn.Linear(64, 48)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantize())
        dense.bias.copy_(layer.bias)
    return layer, dense


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, still used
@pytest.mark.parametrize("rows", [1, 20])
def test_jit_trace_records_the_op(rows):
    """The trace took the C kernels' fast path, whose call it cannot see: the traced graph returned empty memory
    (errors up to 1e23)."""
    layer, dense = _layer_and_dense()
    x = torch.randn(rows, 64)
    traced = torch.jit.trace(layer, x)
    assert "spqr::linear" in str(traced.graph)
    other = torch.randn(rows, 64)
    torch.testing.assert_close(traced(other), dense(other), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func's jvp scripts a helper with torch.jit
def test_forward_mode_and_torch_func_transforms_work_as_for_nn_linear():
    """Forward-mode AD dropped the tangent silently; vmap / jvp / grad failed inside the kernels' call."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call, grad, jvp, vmap

    layer, dense = _layer_and_dense()
    x, v = torch.randn(3, 64), torch.randn(3, 64)
    with fwad.dual_level():
        out = layer(fwad.make_dual(x, v))
        torch.testing.assert_close(fwad.unpack_dual(out).tangent, v @ dense.weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vmap(layer)(x), dense(x), rtol=1e-5, atol=1e-5)
    _, tangent = jvp(layer, (x,), (v,))
    torch.testing.assert_close(tangent, v @ dense.weight.T, rtol=1e-5, atol=1e-5)
    g = grad(lambda inp: layer(inp).square().sum())(x)
    torch.testing.assert_close(g, grad(lambda inp: functional_call(dense, dict(dense.named_parameters()), inp)
                                       .square().sum())(x), rtol=1e-4, atol=1e-4)


def test_autocast_gives_the_dtype_nn_linear_gives():
    layer, dense = _layer_and_dense()
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), dense(x)
        on_meta = copy.deepcopy(layer).to("meta")  # meta has no autocast: torch.is_autocast_enabled("meta") raises
        assert on_meta(torch.empty(2, 64, device="meta")).shape == (2, 48)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_a_state_dict_with_another_outlier_count_is_refused_before_anything_is_copied():
    """The copy into the packed buffers failed only at outlier_col, after qweight, the statistics and the row
    pointers had been overwritten: a caller that caught the error kept a layer reading past its outlier arrays
    (NaN, or a segfault on a large layer)."""
    layer = SpQRLinear.from_packed(random_packed_layer(64, 64, outlier_share=0.01, seed=1))
    other = SpQRLinear.from_packed(random_packed_layer(64, 64, outlier_share=0.1, seed=2))
    x = torch.randn(3, 64)
    before = {name: tensor.clone() for name, tensor in layer.packed_tensors().items()}
    expected = layer(x)
    for assign in (False, True):
        with pytest.raises(RuntimeError, match=r"other shapes than this layer's.*outlier_col \(\d+,\) \(this layer"):
            layer.load_state_dict(other.state_dict(), assign=assign)
        assert all(torch.equal(before[name], tensor) for name, tensor in layer.packed_tensors().items())
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("replace", ["qweight", "outlier_row_ptr", "unsorted_outlier_col", "functional_call"])
def test_packed_tensors_that_reach_the_kernels_another_way_are_checked(replace):
    """A buffer assigned, or swapped in by torch.func.functional_call, was read unchecked: a qweight of one tile for
    four gave finite garbage, another layer's row pointers NaN (reads past the outlier arrays)."""
    from torch.func import functional_call

    layer = SpQRLinear.from_packed(random_packed_layer(64, 64, outlier_share=0.01, seed=1))
    other = SpQRLinear.from_packed(random_packed_layer(64, 64, outlier_share=0.1, seed=2))
    x = torch.randn(3, 64)
    torch.testing.assert_close(functional_call(layer, dict(other.named_buffers()), (x,)), other(x))  # consistent
    message = {"qweight": "qweight has dtype torch.int32 and shape",
               "unsorted_outlier_col": "outlier_col is not strictly ascending within a row"}
    with pytest.raises(ValueError, match=message.get(replace, "outlier_row_ptr is not a valid CSR row pointer array")):
        if replace == "qweight":
            layer.qweight = layer.qweight[:1]
            layer(x)
        elif replace == "unsorted_outlier_col":  # the matrix-matrix kernels wrote before their buffers
            row = int((layer.outlier_row_ptr.diff() >= 2).nonzero()[0])
            start = int(layer.outlier_row_ptr[row])
            layer.outlier_col = layer.outlier_col.clone()
            layer.outlier_col[start:start + 2] = layer.outlier_col[start:start + 2].flip(0)
            layer(torch.randn(20, 64))
        elif replace == "outlier_row_ptr":
            layer.outlier_row_ptr = other.outlier_row_ptr
            layer(x)
        else:
            functional_call(layer, {"outlier_row_ptr": other.outlier_row_ptr}, (x,))


def test_the_ops_kernel_view_is_not_taken_for_new_tensors_at_the_same_addresses():
    """Calls through the registered op find their C view by the tensors' addresses; new tensor objects there (views,
    or memory reused after a free) may hold what was never checked."""
    layer = SpQRLinear.from_packed(random_packed_layer(64, 64, outlier_share=0.01, seed=1))
    x = torch.randn(3, 64)
    tensors = dict(layer._buffers)
    kernels.linear(layer.spec, tensors, x)  # its view is now cached by the addresses
    same_addresses = {name: tensor.view(tensor.shape) for name, tensor in tensors.items()}
    same_addresses["outlier_row_ptr"][5:] = 10**6  # in place: what the new objects hold was never checked
    with pytest.raises(ValueError, match="outlier_row_ptr is not a valid CSR row pointer array"):
        kernels.linear(layer.spec, same_addresses, x)


def test_float64_inputs_are_computed_in_float64():
    """float64 went through the fp32 kernels (1.4e-7 off; gradcheck failed where it passes for nn.Linear)."""
    layer, dense = _layer_and_dense()
    layer, dense = layer.double(), dense.double()
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_tensors_are_taken_as_nn_linear_takes_them(layout):
    layer, dense = _layer_and_dense()
    nested = torch.nested.nested_tensor([torch.randn(2, 64), torch.randn(5, 64)], layout=layout)
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    out = layer(nested)
    assert len(calls) == 1  # hooks run once per call, as for nn.Linear
    assert out.is_nested and out.layout == layout
    for got, expected in zip(out.unbind(), dense(nested).unbind()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_share_memory_and_casts_of_the_packed_tensors():
    """share_memory() left the packed tensors private (they followed moves only); casts still leave their dtypes."""
    layer, _ = _layer_and_dense()
    x = torch.randn(3, 64)
    expected = layer(x)  # the kernels' view of the tensors is made: share_memory_() then moves their memory
    dtypes = {name: tensor.dtype for name, tensor in layer.named_buffers()}
    layer.share_memory()
    assert all(tensor.is_shared() for tensor in layer.buffers()) and layer.bias.is_shared()
    for _ in range(3):
        torch.randn(2**20)  # reuse of the freed memory
        assert torch.equal(layer(x), expected)
    for cast in (torch.float64, torch.bfloat16):
        layer.to(cast)
        assert {name: tensor.dtype for name, tensor in layer.named_buffers()} == dtypes and layer.bias.dtype == cast
