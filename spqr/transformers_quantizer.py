"""Plain transformers loading of our checkpoints: after `import spqr`,
`AutoModelForCausalLM.from_pretrained(DIR)` builds the model with SpQRLinear layers.

Registered through transformers' public hooks (`register_quantization_config`, `register_quantizer`)
under our quant_method "spqr_packed". Before the weights load, every quantized Linear named in the
config's `modules` table becomes an SpQRLinear whose packed buffers are placeholders of the exact
stored shapes; transformers then fills them from model.safetensors. After loading, the packed
tensors get back their stored dtypes (transformers may cast floating tensors to the model dtype;
fp16 -> fp32 -> fp16 is lossless), every layer is validated and the other weights are checked to be finite,
as `spqr.load_quantized` does.
`spqr.load_quantized` stays the stricter path: it also verifies the file's sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from spqr.format.accounting import read_safetensors_header
from spqr.format.io import FORMAT_NAME, FORMAT_VERSION, SAFETENSORS_DTYPES, check_modules_metadata
from spqr.format.layout import LayerSpec, validate_layer
from spqr.hf import attach_quantized_embeddings, dequantize_model, module_entry, refuse_non_finite, set_submodule
from spqr.nn import SpQRLinear


@register_quantization_config(FORMAT_NAME)
class SpQRPackedConfig(QuantizationConfigMixin):
    """The `quantization_config` of a checkpoint, every field kept so that save_pretrained round-trips."""

    def __init__(self, modules: dict[str, dict] | None = None, format_version: int | None = None, **kwargs: Any):
        self.quant_method = FORMAT_NAME
        self.modules = modules or {}
        self.format_version = format_version
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        # the checksums describe the file written by spqr.save_quantized, not one save_pretrained writes
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_") and key != "checksums"}


@register_quantizer(FORMAT_NAME)
class SpQRPackedQuantizer(HfQuantizer):
    """Loads pre-quantized spqr_packed checkpoints (it does not quantize)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        version = self.quantization_config.format_version
        if version != FORMAT_VERSION:
            raise ValueError(f"this checkpoint has spqr format version {version!r}; transformers loading needs "
                             f"version {FORMAT_VERSION}: load it with spqr.load_quantized(DIR), which converts "
                             "older versions, and save it again with spqr.save_quantized")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        self._specs: dict[str, LayerSpec] = {}
        if not isinstance(self.quantization_config.modules, dict) or not self.quantization_config.modules:
            raise ValueError("the checkpoint's quantization_config has no 'modules' table")
        for name, entry in self.quantization_config.modules.items():
            try:
                spec, outliers = module_entry(model, name, entry)
            except ValueError as e:
                raise ValueError(f"quantization_config entry for module {name} is invalid: {e}") from e
            if outliers is None:
                raise ValueError(f"module {name}: the config does not record its outlier count; load the "
                                 "checkpoint with spqr.load_quantized(DIR) and save it again with spqr.save_quantized")
            self._specs[name] = spec
            linear = model.get_submodule(name)
            bias_dtype = linear.bias.dtype if linear.bias is not None else torch.float32
            placeholders = {key: torch.empty(shape if shape is not None else (outliers,), dtype=dtype, device="meta")
                            for key, (shape, dtype) in spec.expected_tensors(bias_dtype).items()}
            layer = SpQRLinear(spec, placeholders)
            # Some models' _init_weights read a child Linear's weight through its parent (gpt_bigcode's c_proj,
            # mamba's out_proj): a meta stand-in marked initialized, which init then skips, removed after loading.
            stand_in = torch.empty(spec.out_features, spec.in_features, device="meta")
            stand_in._is_hf_initialized = True
            layer.__dict__["weight"] = stand_in
            set_submodule(model, name, layer)
        embeddings = getattr(self.quantization_config, "quantized_embeddings", {})
        if embeddings:
            attach_quantized_embeddings(model, embeddings, model.get_input_embeddings().weight.dtype)
        if checkpoint_files:
            self._check_stored_tensors(model, checkpoint_files)

    def _check_stored_tensors(self, model: nn.Module, checkpoint_files: list[str]) -> None:
        """Refuse a checkpoint whose files lack a tensor of the model or hold packed tensors the config does not
        describe: transformers would fill a missing one with uninitialized memory or random values, and ignore an
        unexpected one, with only a warning (a garbage model)."""
        header: dict[str, dict] = {}
        metadata: dict[str, dict | None] = {}
        for file in checkpoint_files:
            if not str(file).endswith(".safetensors"):
                raise ValueError(f"{file}: spqr_packed checkpoints are safetensors files")
            file_header = read_safetensors_header(Path(file))[1]
            metadata[file] = file_header.pop("__metadata__", None)
            header.update(file_header)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = [key for key in model.state_dict() if key not in header and key not in tied]
        if missing:
            raise ValueError(f"tensors missing from the checkpoint: {missing[:5]} (a model class with parts the "
                             "saved one lacks? a checkpoint loads into the class it was saved from)")
        for name, spec in self._specs.items():
            expected = spec.expected_tensors()
            stored = {key.removeprefix(name + "."): info for key, info in header.items()
                      if key.startswith(name + ".") and "." not in key.removeprefix(name + ".")}
            unexpected = sorted(stored.keys() - expected.keys())
            if unexpected:
                raise ValueError(f"{name}: the checkpoint holds tensors {unexpected} that its config.json entry does "
                                 "not describe")
            wrong = [key for key, (_, dtype) in expected.items()
                     if key != "bias" and stored[key]["dtype"] != SAFETENSORS_DTYPES[dtype]]
            if wrong:
                raise ValueError(f"{name}: tensors {wrong} are stored as {[stored[k]['dtype'] for k in wrong]}, "
                                 f"expected {[SAFETENSORS_DTYPES[expected[k][1]] for k in wrong]}")
            # transformers refuses other shapes too, but with ignore_mismatched_sizes=True it would leave the
            # placeholders (shaped by the config.json entry) uninitialized: a garbage model passing every other check
            placeholders = model.get_submodule(name).packed_tensors()
            reshaped = [f"{key} {stored[key]['shape']} (config.json makes it {want})" for key in expected
                        if stored[key]["shape"] != (want := list(placeholders[key].shape))]
            if reshaped:
                raise ValueError(f"{name}: stored tensors of other shapes than its config.json entry describes: "
                                 f"{', '.join(reshaped)}")
        for file, meta in metadata.items():  # after the checks above, which name what is wrong more precisely
            check_modules_metadata(meta, self.quantization_config.modules, file)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        for name, spec in self._specs.items():
            layer = model.get_submodule(name)
            layer.__dict__.pop("weight", None)
            expected = spec.expected_tensors()
            for key, tensor in list(layer._buffers.items()):
                if tensor.device.type == "meta":
                    raise ValueError(f"{name}.{key} is missing from the checkpoint")
                if tensor.dtype != expected[key][1]:
                    layer._buffers[key] = tensor.to(expected[key][1])
            validate_layer(spec, layer.packed_tensors(), name)
        refuse_non_finite(model.named_parameters(), "the checkpoint", ValueError)  # as spqr.load_quantized does

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
        return dequantize_model(model, dtype)  # model.dequantize()

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
