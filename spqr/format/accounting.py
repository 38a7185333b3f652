"""Exact bit accounting of a checkpoint, computed from what is stored.

Per quantized layer: every stored tensor except the bias (packed weights, both levels of
statistics, permutation, outlier values + column indices + row pointers), divided by the
layer's weight count. Whole file: its size in bits, which must equal the safetensors header
plus the sum of all tensor bytes (checked), divided by the model's parameter count.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from spqr.format.io import CheckpointError, check_modules_metadata, read_config, read_quantization_config, weight_files
from spqr.format.layout import LayerSpec

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(header length in bytes including its 8-byte size prefix, header dict) of a safetensors file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > path.stat().st_size - 8:  # garbage read as a length: not a safetensors file
            raise CheckpointError(f"{path} is truncated or not a safetensors file (a header of {n} bytes is "
                                  f"announced, the file has {path.stat().st_size})")
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{path} is truncated inside its safetensors header")
    try:
        return 8 + n, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e


def paper_formula_bits(wbits: int, beta1: int, beta2: int, qq_bits: int | None, outlier_share: float,
                       plain_stat_bits: int = 16) -> float:
    """Average bits by the SpQR paper's formula (ignores permutation and CSR row pointers); plain_stat_bits: the
    width of a statistic stored as a plain value (qq_bits None)."""
    if qq_bits is None:
        return wbits + 2 * plain_stat_bits / beta1 + 32 * outlier_share
    return wbits + 2 * qq_bits / beta1 + 2 * 32 / (beta1 * beta2) + 32 * outlier_share


def checkpoint_accounting(directory: str | Path) -> dict:
    """Bits breakdown of a checkpoint directory, per layer and in total; CheckpointError names what is malformed."""
    try:
        return _accounting(Path(directory))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{directory}: config.json or the safetensors header is malformed "
                              f"({type(e).__name__}: {e})") from e


def _stored_layer_spec(name: str, entry: object, header: dict, path: Path) -> LayerSpec:
    """The LayerSpec of one `modules` entry, its tensors checked to be in the file with the shapes it implies."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"config.json entry for module {name} is not an object")
    try:
        spec = LayerSpec.from_config_entry(entry)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json entry for module {name} is invalid: {e}") from e
    for key, (shape, _) in spec.expected_tensors().items():
        info = header.get(f"{name}.{key}")
        if info is None:
            raise CheckpointError(f"{path}: tensor {name}.{key} is missing")
        if (tuple(info["shape"]) != shape) if shape is not None else len(info["shape"]) != 1:
            raise CheckpointError(f"{path}: tensor {name}.{key} has shape {info['shape']}, the layer's spec "
                                  f"implies {list(shape) if shape else 'a 1-D tensor'}")
    return spec


def _accounting(directory: Path) -> dict:
    qc = read_quantization_config(read_config(directory), directory)
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{directory}: quantization_config has no 'modules' table")
    header: dict[str, dict] = {}
    header_bytes = file_bytes = 0
    metadata: dict[Path, dict | None] = {}
    tensor_bytes = {}
    elements = {}
    for path in weight_files(directory):  # one file, or the shards of a save_pretrained
        file_header_bytes, file_header = read_safetensors_header(path)
        metadata[path] = file_header.pop("__metadata__", None)
        file_tensor_bytes = 0
        for key, info in file_header.items():
            n = 1
            for s in info["shape"]:
                n *= s
            elements[key] = n
            tensor_bytes[key] = n * DTYPE_BYTES[info["dtype"]]
            file_tensor_bytes += tensor_bytes[key]
        size = path.stat().st_size
        if file_header_bytes + file_tensor_bytes != size:
            raise CheckpointError(f"{path}: header ({file_header_bytes} B) + tensors ({file_tensor_bytes} B) "
                                  f"!= file size ({size} B)")
        header.update(file_header)
        header_bytes += file_header_bytes
        file_bytes += size
    layers = []
    for name, entry in modules.items():
        spec = _stored_layer_spec(name, entry, header, directory)
        keys = [k for k in tensor_bytes if k.startswith(name + ".") and k != f"{name}.bias"
                and "." not in k[len(name) + 1:]]
        parts = {k[len(name) + 1:]: tensor_bytes[k] * 8 for k in keys}
        weights = spec.in_features * spec.out_features
        outliers = elements[f"{name}.outlier_val"]
        layers.append({
            "name": name, "out_features": spec.out_features, "in_features": spec.in_features,
            "bits": sum(parts.values()), "avg_bits": sum(parts.values()) / weights,
            "outliers": outliers, "outlier_share": outliers / weights,
            "paper_formula_bits": paper_formula_bits(spec.wbits, spec.beta1, spec.beta2, spec.qq_bits,
                                                     outliers / weights, 32 if spec.stats_dtype == "float32" else 16),
            "parts_bits": parts,
        })
    for path, meta in metadata.items():  # after the entries' own checks, which name what is wrong more precisely
        try:
            check_modules_metadata(meta, modules, str(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    quantized_weights = sum(layer["out_features"] * layer["in_features"] for layer in layers)
    quantized_bits = sum(layer["bits"] for layer in layers)
    outliers = sum(layer["outliers"] for layer in layers)
    total_params = sum(n for k, n in elements.items()
                       if not any(k.startswith(layer["name"] + ".") for layer in layers))
    total_params += quantized_weights + sum(elements.get(f"{layer['name']}.bias", 0) for layer in layers)
    parts_total: dict[str, int] = {}
    for layer in layers:
        for part, bits in layer["parts_bits"].items():
            parts_total[part] = parts_total.get(part, 0) + bits
    share = outliers / max(quantized_weights, 1)
    return {
        "quantized_weights": quantized_weights,
        "avg_bits": quantized_bits / max(quantized_weights, 1),
        "avg_bits_by_part": {k: v / max(quantized_weights, 1) for k, v in sorted(parts_total.items())},
        # each layer by its own recipe (a head quantized with --head-wbits has other bits than the blocks)
        "paper_formula_bits": sum(layer["paper_formula_bits"] * layer["out_features"] * layer["in_features"]
                                  for layer in layers) / quantized_weights,
        "outliers": outliers,
        "outlier_share": share,
        "file_bytes": file_bytes,
        "header_bytes": header_bytes,
        "tensor_bytes": sum(tensor_bytes.values()),
        "model_parameters": total_params,
        "file_bits_per_parameter": file_bytes * 8 / max(total_params, 1),
        "layers": layers,
    }
