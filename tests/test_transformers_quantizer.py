"""`import spqr` makes plain transformers load (and save) our checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import spqr
from spqr.format.io import CheckpointError, read_weights, write_weights
from spqr.hf import module_name
from spqr.nn import SpQRLinear

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_from_pretrained_matches_our_loader(quantized_llama):
    _, _, checkpoint = quantized_llama
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    layers = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    assert len(layers) == len(json.loads((checkpoint / "config.json").read_text())["quantization_config"]["modules"])
    assert torch.equal(_logits(model), _logits(spqr.load_quantized(checkpoint)))
    assert model.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, IDS.shape[1] + 4)


def test_save_pretrained_round_trips(quantized_llama, tmp_path):
    _, _, checkpoint = quantized_llama
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert torch.equal(_logits(again), _logits(model))
    assert torch.equal(_logits(spqr.load_quantized(tmp_path / "resaved")), _logits(model))


def test_from_pretrained_in_bfloat16_keeps_the_packed_dtypes(quantized_llama):
    _, _, checkpoint = quantized_llama
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, SpQRLinear))
    reference = spqr.load_quantized(checkpoint)
    ref_layer = reference.get_submodule(module_name(model, layer))
    loaded = layer.packed_tensors()
    for key, tensor in ref_layer.packed_tensors().items():
        if key != "bias":
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
    assert torch.isfinite(_logits(model)).all()


def _copy(checkpoint, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(checkpoint, dst)
    return dst


def _edit(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_older_format_is_refused_with_a_pointer_to_our_loader(quantized_llama, tmp_path):
    path = _copy(quantized_llama[2], tmp_path)
    _edit(path, lambda qc: qc.update(format_version=2))
    with pytest.raises(ValueError, match="spqr.load_quantized"):
        AutoModelForCausalLM.from_pretrained(path)


def test_missing_outlier_counts_are_refused(quantized_llama, tmp_path):
    path = _copy(quantized_llama[2], tmp_path)
    _edit(path, lambda qc: [spec.pop("outliers") for spec in qc["modules"].values()])
    with pytest.raises(ValueError, match="outlier count"):
        AutoModelForCausalLM.from_pretrained(path)
    assert spqr.load_quantized(path) is not None  # our loader does not need them


def test_inconsistent_tensors_are_refused(quantized_llama, tmp_path):
    path = _copy(quantized_llama[2], tmp_path)
    tensors = read_weights(path, None)
    name = "model.layers.0.mlp.up_proj.outlier_row_ptr"
    tensors[name] = tensors[name].flip(0).contiguous()  # no longer a CSR row pointer array
    write_weights(path, tensors)
    with pytest.raises(ValueError, match="up_proj: outlier_row_ptr"):
        AutoModelForCausalLM.from_pretrained(path)


def test_non_finite_weights_are_refused_as_by_our_loader(quantized_llama, tmp_path):
    path = _copy(quantized_llama[2], tmp_path)
    tensors = read_weights(path, None)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"][0] = float("nan")
    write_weights(path, tensors)
    with pytest.raises(ValueError, match=r"weights contain NaN or Inf: model\.norm\.weight"):
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        spqr.load_quantized(path, verify_checksum=False)


def _drop_tensor(name):
    def edit(path):
        tensors = read_weights(path, None)
        del tensors[name]
        write_weights(path, tensors)
    return edit


def _retype_tensor(name, dtype):
    def edit(path):
        tensors = read_weights(path, None)
        tensors[name] = tensors[name].to(dtype)
        write_weights(path, tensors)
    return edit


UP = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("damage,message", [
    (_drop_tensor(f"{UP}.qweight"), rf"tensors missing from the checkpoint: \['{UP}\.qweight'\]"),
    (_drop_tensor("model.norm.weight"), r"tensors missing from the checkpoint: \['model\.norm\.weight'\]"),
    (lambda path: _edit(path, lambda qc: qc["modules"].pop(UP)), rf"\['{UP}\.weight'\]"),
    (lambda path: _edit(path, lambda qc: qc["modules"][UP].update(has_perm=False)), r"holds tensors \['perm'\]"),
    (lambda path: _edit(path, lambda qc: qc.update(modules=[1, 2])), "no 'modules' table"),
    (_retype_tensor(f"{UP}.qweight", torch.int64), r"tensors \['qweight'\] are stored as \['I64'\]"),
])
def test_damaged_checkpoints_are_refused_not_loaded_as_garbage(quantized_llama, tmp_path, damage, message):
    """transformers filled missing tensors with uninitialized memory or random values and ignored unexpected ones,
    with a warning only: logits off by 0.65-0.87, or random dense layers."""
    path = _copy(quantized_llama[2], tmp_path)
    damage(path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(path)



@pytest.mark.parametrize("setting", ["beta1", "beta2"])
def test_an_edited_setting_that_keeps_every_shape_is_refused(quantized_llama, tmp_path, setting):
    """beta 16 -> 17 keeps the tiny model's tensor shapes (rounded-up group counts): both loaders decoded other
    weights (logits off by 0.3-0.5). The weights file keeps its own copy of the modules table."""
    from spqr.format.accounting import checkpoint_accounting

    path = _copy(quantized_llama[2], tmp_path)
    _edit(path, lambda qc: [entry.update({setting: 17}) for entry in qc["modules"].values()])
    message = rf"config.json does not describe the weights file's layers \(was it edited\?\): module .* {setting} 17"
    for load in (spqr.load_quantized, AutoModelForCausalLM.from_pretrained, checkpoint_accounting):
        with pytest.raises((ValueError, CheckpointError), match=message):
            load(path)


def test_ignore_mismatched_sizes_does_not_load_placeholders(quantized_llama, tmp_path):
    """With the flag transformers skips a tensor of another shape, leaving the packed placeholders uninitialized:
    a garbage model (logits off by ~2.5, differently on every load) that passed every other check."""
    path = _copy(quantized_llama[2], tmp_path)
    _edit(path, lambda qc: qc["modules"][UP].update(wbits=4))
    with pytest.raises(ValueError, match=rf"{UP}: stored tensors of other shapes than its config.json entry "
                                         r"describes: qweight \[.*, 3, 16\] \(config.json makes it \[.*, 4, 16\]\)"):
        AutoModelForCausalLM.from_pretrained(path, ignore_mismatched_sizes=True)


def test_sharded_save_pretrained_loads_everywhere(quantized_llama, tmp_path):
    from spqr.format.accounting import checkpoint_accounting

    model = AutoModelForCausalLM.from_pretrained(quantized_llama[2])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert torch.equal(_logits(spqr.load_quantized(tmp_path / "sharded")), _logits(model))
    single = checkpoint_accounting(quantized_llama[2])
    sharded = checkpoint_accounting(tmp_path / "sharded")
    assert sharded["avg_bits"] == single["avg_bits"] and sharded["outliers"] == single["outliers"]


def test_offloading_to_disk_loads_the_same_model(quantized_llama, tmp_path):
    """The NaN check read offloaded (meta) parameters: 'Tensor.item() cannot be called on meta tensors'."""
    model = AutoModelForCausalLM.from_pretrained(quantized_llama[2], device_map={
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "disk"}, offload_folder=tmp_path / "offload")
    assert torch.equal(_logits(model), _logits(AutoModelForCausalLM.from_pretrained(quantized_llama[2])))


def test_other_model_classes_and_layer_overrides_are_named(quantized_llama):
    from transformers import AutoModel

    for load in (lambda path: AutoModel.from_pretrained(path),
                 lambda path: AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=1)):
        with pytest.raises(ValueError, match="has no module model.layers.* a checkpoint loads into the class it was "
                                             "saved from, with its own config"):
            load(quantized_llama[2])


def test_dequantize_gives_a_dense_model_with_the_same_outputs(quantized_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(quantized_llama[2])
    expected = _logits(model)
    dense = model.dequantize()
    assert not any(isinstance(m, SpQRLinear) for m in dense.modules())
    torch.testing.assert_close(_logits(dense), expected, rtol=1e-5, atol=1e-5)
    dense.save_pretrained(tmp_path / "dense")  # a plain dense checkpoint
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), expected,
                               rtol=1e-5, atol=1e-5)
