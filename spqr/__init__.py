"""spqr: SpQR compression of Hugging Face causal LMs (sparse outliers + bilevel 3-4 bit groups).

The main entry points, re-exported here:
    QuantConfig, CalibrationConfig, preset     recipes (spqr.config)
    load_model, save_quantized, load_quantized  models and checkpoints (spqr.hf)
    calibration_data, quantize                  the block-by-block driver (spqr.pipeline)
    perplexity                                  evaluation (spqr.eval.perplexity)
    SamplingConfig                              how generation picks tokens (spqr.config; generation itself:
                                                spqr.generate.generate / generate_batch)

Importing spqr also registers the checkpoint format with transformers, so that
AutoModelForCausalLM.from_pretrained(DIR) loads our checkpoints (spqr.transformers_quantizer).
"""

from spqr import transformers_quantizer  # noqa: F401  (registers "spqr_packed" with transformers)
from spqr.config import CalibrationConfig, QuantConfig, SamplingConfig, preset
from spqr.eval.perplexity import perplexity
from spqr.hf import load_model, load_quantized, save_quantized
from spqr.pipeline import calibration_data, quantize

__all__ = [
    "CalibrationConfig", "QuantConfig", "preset", "load_model", "load_quantized", "save_quantized",
    "calibration_data", "quantize", "perplexity", "SamplingConfig",
]
__version__ = "0.1.0"
