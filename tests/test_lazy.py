"""Quantizing a model one decoder block at a time, straight from (sharded) safetensors files."""

from __future__ import annotations

import hashlib

import torch

from spqr.config import QuantConfig
from spqr.hf import load_model_lazy, save_quantized
from spqr.pipeline import quantize
from tests.helpers import make_model, random_windows

CONFIG = QuantConfig(wbits=3, outlier_threshold=0.1)


def _sha(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_lazy_sharded_quantization_equals_eager(tmp_path, tokenizer, arch):
    source = tmp_path / "source"
    make_model(arch).save_pretrained(source, max_shard_size="40KB")
    tokenizer.save_pretrained(source)
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
    source = tmp_path / "source"
    make_model("llama").save_pretrained(source)
    tokenizer.save_pretrained(source)
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
