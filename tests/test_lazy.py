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


def _edit(directory, change) -> None:
    """Rewrite directory/model.safetensors with change(tensors) applied."""
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "is not a readable safetensors file"),
    (lambda d: _edit(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
     r"do not fit its config.json: model.layers.1.mlp.up_proj.weight is missing"),
    (lambda d: _edit(d, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)})),
     r"model.layers.1.mlp.up_proj.weight is \[3, 3\] in model.safetensors, the config makes it \[72, 48\]"),
    (lambda d: _edit(d, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(72, 48).int()})),
     r"model.layers.1.mlp.up_proj.weight is stored as I32 in model.safetensors, not floating point"),
])
def test_damaged_weights_are_named_before_any_block_is_quantized(tmp_path, tokenizer, damage, message):
    """They were raw safetensors or torch errors (a missing tensor: 'Tensor.item() cannot be called on meta tensors'),
    and a later block's were found only after every earlier block was quantized, in torch's several-line
    load_state_dict text."""
    source = _source(tmp_path, tokenizer)
    damage(source)
    with pytest.raises(ModelLoadError, match=message):
        load_model_lazy(source)


def test_tensors_the_config_has_no_place_for_are_named(tmp_path, tokenizer, caplog):
    """A config.json with fewer layers than the weights dropped the rest without a word."""
    source = _source(tmp_path, tokenizer)
    _edit(source, lambda t: t.update({"model.layers.9.mlp.extra_proj.weight": torch.zeros(2, 2)}))
    with caplog.at_level("WARNING"):
        load_model_lazy(source)
    assert "holds 1 tensors the model its config.json describes does not use (left out): " \
           "model.layers.9.mlp.extra_proj.weight" in caplog.text


def test_a_head_stored_apart_from_tied_embeddings_is_used_as_transformers_does(tmp_path, tokenizer, caplog):
    """config.json said tie_word_embeddings while the weights held their own lm_head: the lazy loader tied the head
    to the embeddings (a different model from the one transformers loads, greedy agreement 0)."""
    import json

    from transformers import AutoModelForCausalLM

    source = _source(tmp_path, tokenizer)  # the untied llama
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with caplog.at_level("WARNING"):
        model, _, weights = load_model_lazy(source)
    assert "ties lm_head.weight to the input embeddings, but the weights hold other values" in caplog.text
    reference = AutoModelForCausalLM.from_pretrained(source)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
