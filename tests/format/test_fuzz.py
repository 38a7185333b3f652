"""Fuzzed checkpoints: byte flips, truncations, swapped tensors and edited configs are refused
with a CheckpointError (never another exception, never a silently loaded model)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from spqr.format.io import CheckpointError
from spqr.hf import load_quantized

# derandomize: CI sees the same examples every run (explore more with --hypothesis-seed=random).
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True),
                        st.text(max_size=5), st.lists(st.integers(0, 3), max_size=2))
# Model-config edits: integers kept small, since building a model skeleton with e.g. 70,000 layers
# takes minutes (it is refused all the same).
SMALL_JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
                              st.text(max_size=5), st.lists(st.integers(0, 3), max_size=2))


def _copy(checkpoint: Path) -> Path:
    tmp = Path(tempfile.mkdtemp()) / "ckpt"
    shutil.copytree(checkpoint, tmp)
    return tmp


def _refused(path: Path) -> None:
    try:
        with pytest.raises(CheckpointError):
            load_quantized(path)
    finally:
        shutil.rmtree(path.parent)


@FUZZ
@given(data=st.data())
def test_byte_flips_are_refused(quantized_llama, data):
    path = _copy(quantized_llama[2])
    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    positions = data.draw(st.sets(st.integers(0, len(raw) - 1), min_size=1, max_size=3))
    for position in positions:  # distinct positions: every flip changes the file
        raw[position] ^= data.draw(st.integers(1, 255))
    weights.write_bytes(bytes(raw))
    _refused(path)


@FUZZ
@given(fraction=st.floats(0.0, 0.9999))
def test_truncations_are_refused(quantized_llama, fraction):
    path = _copy(quantized_llama[2])
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: int(len(raw) * fraction)])
    _refused(path)


def test_swapped_tensors_are_refused(quantized_llama):
    path = _copy(quantized_llama[2])
    tensors = load_file(str(path / "model.safetensors"))
    a, b = "model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.o_proj.qweight"
    assert tensors[a].shape == tensors[b].shape
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _refused(path)


def _module_fields(checkpoint: Path) -> list[tuple[str, str]]:
    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    return [(name, field) for name, spec in qc["modules"].items() for field in spec]


@FUZZ
@given(data=st.data())
def test_edited_module_specs_are_refused(quantized_llama, data):
    path = _copy(quantized_llama[2])
    config = json.loads((path / "config.json").read_text())
    name, field = data.draw(st.sampled_from(_module_fields(path)))
    spec = config["quantization_config"]["modules"][name]
    value = data.draw(JSON_VALUES.filter(lambda v: v != spec[field] or type(v) is not type(spec[field])))
    spec[field] = value
    (path / "config.json").write_text(json.dumps(config))
    _refused(path)


@FUZZ
@given(key=st.sampled_from(["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "model_type",
                            "num_attention_heads", "quant_method", "format_version", "modules"]),
       value=SMALL_JSON_VALUES)
def test_edited_model_configs_are_refused(quantized_llama, key, value):
    path = _copy(quantized_llama[2])
    config = json.loads((path / "config.json").read_text())
    target = config["quantization_config"] if key in ("quant_method", "format_version", "modules") else config
    if target[key] == value or (key == "num_attention_heads" and value in (2, 4)):
        shutil.rmtree(path.parent)  # not an edit (or one that describes the same tensors)
        return
    target[key] = value
    (path / "config.json").write_text(json.dumps(config))
    _refused(path)
