"""Whole checkpoints to and from the authors' `spqr_quant` format (transformers' built-in quant_method "spqr").

`export_spqr_quant` writes a directory that transformers' SpQRConfig / spqr_quant loader reads
(fp16 model, per-layer dense_weights / row_offsets / col_vals / in_perm, `shapes` in the config);
`import_spqr_quant` turns such a directory into one of our checkpoints. The per-layer layouts are in
spqr.format.spqr_quant. Both directions keep the dequantized weights bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from spqr.format.io import (
    CheckpointError,
    atomic_directory,
    check_output_dir,
    read_config,
    read_weights,
    write_weights,
)
from spqr.format.layout import PackedLinear
from spqr.format.spqr_quant import ConversionError, check_exportable, export_layer, import_layer
from spqr.hf import (
    assign_dense_tensors,
    builds_models,
    empty_model,
    first_few,
    load_quantized,
    load_tokenizer,
    read_generation_config,
    save_quantized,
    set_submodule,
    unique_state_dict,
)
from spqr.nn import SpQREmbedding, SpQRLinear

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export_spqr_quant(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Our checkpoint -> a spqr_quant (transformers quant_method "spqr") directory; ConversionError if a layer
    does not fit that format (every such layer is named)."""
    checkpoint = Path(checkpoint)
    check_output_dir(out_dir, (checkpoint,))  # before the work, and so that overwriting cannot delete the input
    model = load_quantized(checkpoint, dtype=torch.float16)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SpQRLinear)}
    problems = []
    for name, layer in layers.items():
        try:
            check_exportable(layer.spec, name)
        except ConversionError as e:
            problems.append(str(e))
    problems += [f"{name}: embeddings read from the quantized head have no spqr_quant equivalent (quantize "
                 "without --quantize-embeddings)" for name, m in model.named_modules() if isinstance(m, SpQREmbedding)]
    if problems:
        raise ConversionError(f"{len(problems)} layers cannot be exported to spqr_quant: {first_few(problems, '; ')}")
    tensors = {name: t for name, t in unique_state_dict(model).items()
               if name.rpartition(".")[0] not in layers}
    shapes = {}
    for name, layer in layers.items():
        for key, tensor in export_layer(PackedLinear(layer.spec, layer.packed_tensors()), name).items():
            tensors[f"{name}.{key}"] = tensor
            shapes[f"{name}.{key}.shape"] = tensor.numel()
    config = model.config.to_dict()
    config.pop("torch_dtype", None)
    config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "spqr", "bits": 3, "beta1": 16, "beta2": 16, "shapes": shapes,
        "modules_to_not_convert": sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear)),
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_weights(tmp, tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _copy_tokenizer(checkpoint, tmp)
    return Path(out_dir)


@builds_models
def import_spqr_quant(source: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """A spqr_quant (transformers quant_method "spqr") directory -> one of our checkpoints."""
    from transformers import AutoConfig

    source = Path(source)
    check_output_dir(out_dir, (source,))  # before the work, and so that overwriting cannot delete the input
    raw = read_config(source)
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "spqr":
        raise CheckpointError(f"{source} is not a spqr_quant checkpoint (quantization_config.quant_method is not "
                              "'spqr')")
    if (qc.get("bits"), qc.get("beta1"), qc.get("beta2")) != (3, 16, 16):
        raise CheckpointError(f"{source}: only bits=3, beta1=beta2=16 exist in spqr_quant, got "
                              f"{qc.get('bits')}, {qc.get('beta1')}, {qc.get('beta2')}")
    tensors = read_weights(source, None)
    try:
        config = AutoConfig.from_pretrained(source)
        del config.quantization_config
        model = empty_model(config, torch.float16)
    except Exception as e:  # transformers raises many types for a bad model config
        raise CheckpointError(f"{source}: config.json does not describe a model transformers can build: "
                              f"{type(e).__name__}: {e}") from e
    names = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".dense_weights")})
    if not names:
        raise CheckpointError(f"{source}: no quantized layers (no *.dense_weights tensors)")
    for name in names:
        try:
            linear = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{source}: {name} is not a module of the model config.json describes") from e
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{source}: {name} is not a Linear layer")
        parts = {key: tensors.pop(f"{name}.{key}", None) for key in ("dense_weights", "row_offsets", "col_vals",
                                                                       "in_perm")}
        packed = import_layer(parts, linear.out_features, linear.in_features, name)
        try:
            set_submodule(model, name, SpQRLinear.from_packed(packed, name))  # checks indices and values
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from e
    assign_dense_tensors(model, tensors, source, torch.float16)
    read_generation_config(model, source, CheckpointError)  # end-of-turn tokens, copied by export
    recipe = {"wbits": 3, "beta1": 16, "beta2": 16, "qq_bits": 3, "imported_from": "spqr_quant"}
    tokenizer = load_tokenizer(source) if (source / "tokenizer_config.json").is_file() else None
    return save_quantized(model.eval(), out_dir, recipe, tokenizer=tokenizer, overwrite=overwrite)
