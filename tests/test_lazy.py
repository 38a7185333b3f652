"""Quantizing a model one decoder block at a time, straight from (sharded) safetensors files."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from spqr.config import QuantConfig
from spqr.hf import ModelLoadError, load_model_lazy, save_quantized
from spqr.pipeline import quantize
from tests.helpers import make_model, random_windows

CONFIG = QuantConfig(wbits=3, outlier_threshold=0.1)


def _sha(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _source(tmp_path, tokenizer, model=None, **save_options):
    """A HF model directory (the tiny llama unless `model`) with the test tokenizer, as load_model_lazy reads it."""
    source = tmp_path / "source"
    (model or make_model("llama")).save_pretrained(source, **save_options)
    tokenizer.save_pretrained(source)
    return source


def test_lazy_sharded_quantization_equals_eager(tmp_path, tokenizer, arch):
    source = _source(tmp_path, tokenizer, make_model(arch), max_shard_size="40KB")
    assert (source / "model.safetensors.index.json").is_file()

    eager = make_model(arch)
    quantize(eager, random_windows(6, 16), CONFIG, progress=False)
    save_quantized(eager, tmp_path / "eager", CONFIG.to_dict())

    model, _, weights = load_model_lazy(source)
    blocks = model.model.layers
    assert all(p.device.type == "meta" for p in blocks.parameters())
    assert model.model.embed_tokens.weight.device.type == "cpu"
    dense_blocks_seen = []

    def count_dense_blocks(module, args):
        dense_blocks_seen.append(sum(any(p.device.type == "cpu" and p.dim() == 2 for p in b.parameters())
                                     for b in blocks))

    handle = blocks[-1].register_forward_pre_hook(count_dense_blocks)
    quantize(model, random_windows(6, 16), CONFIG, block_weights=weights, progress=False)
    handle.remove()
    assert dense_blocks_seen and max(dense_blocks_seen) == 1  # earlier blocks are packed by then
    save_quantized(model, tmp_path / "lazy", CONFIG.to_dict())
    assert _sha(tmp_path / "lazy") == _sha(tmp_path / "eager")


def test_lazy_single_file_and_resume(tmp_path, tokenizer):
    source = _source(tmp_path, tokenizer)
    progress = tmp_path / "progress"
    model, _, weights = load_model_lazy(source)
    quantize(model, random_windows(6, 16), CONFIG, block_weights=weights, progress_dir=progress, progress=False)
    save_quantized(model, tmp_path / "first", CONFIG.to_dict())
    # all blocks already finished: a second lazy run only reads them back
    model, _, weights = load_model_lazy(source)
    report = quantize(model, random_windows(6, 16), CONFIG, block_weights=weights, progress_dir=progress,
                      progress=False)
    assert len(report.layers) == 14
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not any(b.device.type == "meta" for b in model.buffers())
    save_quantized(model, tmp_path / "second", CONFIG.to_dict())
    assert _sha(tmp_path / "second") == _sha(tmp_path / "first")
    assert torch.equal(model.model.layers[1].input_layernorm.weight,
                       make_model("llama").model.layers[1].input_layernorm.weight)


def test_progress_from_other_weights_is_not_resumed(tmp_path, tokenizer):
    """Blocks quantized from weights that changed since (a weight of block 1, not the first Linear the fingerprint
    read before) were reused silently; the weights files' size and time now belong to the run's fingerprint."""
    source = _source(tmp_path, tokenizer)
    progress = tmp_path / "progress"
    model, _, weights = load_model_lazy(source)
    quantize(model, random_windows(6, 16), CONFIG, block_weights=weights, progress_dir=progress, progress=False)
    edited = make_model("llama")
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.mul_(2)
    edited.save_pretrained(source)
    model, _, weights = load_model_lazy(source)
    report = quantize(model, random_windows(6, 16), CONFIG, block_weights=weights, progress_dir=progress,
                      progress=False)
    fresh, _, weights = load_model_lazy(source)
    expected = quantize(fresh, random_windows(6, 16), CONFIG, block_weights=weights, progress=False)
    assert [r.relative_error for r in report.layers] == [r.relative_error for r in expected.layers]


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "is not a readable safetensors file"),
    (lambda d: save_file({k: v for k, v in load_file(d / "model.safetensors").items()
                          if k != "model.layers.1.mlp.up_proj.weight"}, d / "model.safetensors"),
     r"tensors missing from the model's weights: \['model.layers.1.mlp.up_proj.weight'\]"),
    (lambda d: save_file({**load_file(d / "model.safetensors"),
                          "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, d / "model.safetensors"),
     "the model's weights do not fit its config.json"),
])
def test_damaged_weights_are_named_during_lazy_quantization(tmp_path, tokenizer, damage, message):
    """They were raw safetensors or torch errors (a missing tensor: 'Tensor.item() cannot be called on meta tensors',
    after block 0 was quantized)."""
    source = _source(tmp_path, tokenizer)
    damage(source)
    with pytest.raises(ModelLoadError, match=message):
        model, _, weights = load_model_lazy(source)
        quantize(model, random_windows(6, 16), CONFIG, block_weights=weights, progress=False)
