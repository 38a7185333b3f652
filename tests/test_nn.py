"""spqr.nn: placing the packed tensors of SpQRLinear layers in one mapping (PackedArena)."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from torch import nn

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
    assert len({t.untyped_storage().data_ptr() for t in buffers}) == 1, "one mapping holds every packed tensor"
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
