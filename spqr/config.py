"""Validated configuration dataclasses.

`QuantConfig` says *how* each weight matrix is compressed (the SpQR recipe, or the GPTQ / RTN
baselines that the same engine becomes with other settings). `CalibrationConfig` says *which*
tokens the Hessians are estimated from. `SamplingConfig` says how generation picks tokens. All
reject bad values at construction time with a message that names the option, so nothing deep
inside the engine ever sees them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

from spqr.data import DATASETS, default_split

PermutationOrder = Literal["identity", "act_order"]
PERMUTATION_ORDERS = ("identity", "act_order")
StatsDtype = Literal["float16", "float32"]
STATS_DTYPES = ("float16", "float32")


class ConfigError(ValueError):
    """An option is out of range or inconsistent with another option."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: object) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """An int or float that is not a bool (a string such as "0.2" from an edited config is refused here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix W [out_features, in_features] is quantized.

    wbits:             bits of each stored weight code (2..8).
    beta1:             input columns per group sharing one scale and zero (the paper's β1).
    beta2:             output rows per second-level group of statistics (the paper's β2).
    qq_bits:           bits of the quantized scales and zeros (bilevel quantization);
                       None keeps statistics as plain values (GPTQ / RTN grids).
    stats_dtype:       "float16" or "float32": the plain values' dtype when qq_bits is None (float32 is
                       what the reference implementation's GPTQ/RTN baselines compute with; the C and
                       Triton kernels take float16 only, so float32 layers run on the reference path).
    outlier_threshold: τ, relative to the layer's typical sensitivity; `inf` disables outliers.
    perm:              input-column order of the sweep: "identity" or "act_order" (diag H, desc).
    percdamp:          dampening added to diag H, as a fraction of mean(diag H).
    blocksize:         columns per lazy GPTQ update block (rounded down to a multiple of beta1).
    error_feedback:    GPTQ error feedback through H⁻¹; False gives round-to-nearest (RTN).
    """

    wbits: int = 3
    beta1: int = 16
    beta2: int = 16
    qq_bits: int | None = 3
    stats_dtype: StatsDtype = "float16"
    outlier_threshold: float = 0.2
    perm: PermutationOrder = "act_order"
    percdamp: float = 1.0
    blocksize: int = 128
    error_feedback: bool = True

    def __post_init__(self) -> None:
        _check(_is_int(self.wbits) and 2 <= self.wbits <= 8,
               f"wbits must be an integer in 2..8, got {self.wbits!r}")
        _check(_is_int(self.beta1) and 1 <= self.beta1 <= 4096,
               f"beta1 (input columns per group) must be an integer in 1..4096, got {self.beta1!r}")
        _check(_is_int(self.beta2) and 1 <= self.beta2 <= 4096,
               f"beta2 (output rows per statistics group) must be an integer in 1..4096, got {self.beta2!r}")
        _check(self.qq_bits is None or (_is_int(self.qq_bits) and 2 <= self.qq_bits <= 8),
               f"qq_bits must be an integer in 2..8 or None (fp16 statistics), got {self.qq_bits!r}")
        _check(self.stats_dtype in STATS_DTYPES, f"stats_dtype must be one of {STATS_DTYPES}, got {self.stats_dtype!r}")
        _check(self.stats_dtype == "float16" or self.qq_bits is None,
               f"stats_dtype={self.stats_dtype!r} needs qq_bits=None (quantized statistics have fp16 grids)")
        _check(_is_real(self.outlier_threshold) and not math.isnan(self.outlier_threshold)
               and self.outlier_threshold > 0,
               f"outlier_threshold must be > 0 (use inf to disable outliers), got {self.outlier_threshold!r}")
        _check(self.perm in PERMUTATION_ORDERS,
               f"perm must be one of {PERMUTATION_ORDERS}, got {self.perm!r}")
        _check(_is_real(self.percdamp) and math.isfinite(self.percdamp) and self.percdamp >= 0,
               f"percdamp must be a finite number >= 0, got {self.percdamp!r}")
        _check(_is_int(self.blocksize) and self.blocksize >= 1,
               f"blocksize must be a positive integer, got {self.blocksize!r}")
        _check(isinstance(self.error_feedback, bool),
               f"error_feedback must be True or False, got {self.error_feedback!r}")

    @property
    def sweep_block(self) -> int:
        """Lazy-update block width actually used: whole groups only."""
        return max(self.beta1, self.blocksize // self.beta1 * self.beta1)

    @property
    def plain_stats_dtype(self) -> torch.dtype:
        return getattr(torch, self.stats_dtype)

    @property
    def has_outliers(self) -> bool:
        return math.isfinite(self.outlier_threshold)

    @property
    def needs_hessian(self) -> bool:
        """RTN with identity order and no outliers needs no calibration data at all."""
        return self.error_feedback or self.has_outliers or self.perm == "act_order"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outlier_threshold"] = None if not self.has_outliers else self.outlier_threshold
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        _check(not unknown, f"unknown quantization options: {sorted(unknown)}")
        d = dict(d)
        if d.get("outlier_threshold", 0.0) is None:
            d["outlier_threshold"] = math.inf
        return cls(**d)


def preset(method: str, **overrides: Any) -> QuantConfig:
    """Named recipes: "spqr" (paper defaults), "gptq" (fp16 stats, groups of 128, no outliers),
    "rtn" (round-to-nearest, fp16 stats, groups of 16, no error feedback)."""
    presets: dict[str, dict[str, Any]] = {
        "spqr": {},
        "gptq": dict(wbits=4, beta1=128, qq_bits=None, outlier_threshold=math.inf, percdamp=0.01),
        "rtn": dict(wbits=4, beta1=16, qq_bits=None, outlier_threshold=math.inf, perm="identity",
                    error_feedback=False),
    }
    _check(method in presets, f"unknown method {method!r}; choose one of {sorted(presets)}")
    return QuantConfig(**{**presets[method], **overrides})


@dataclass(frozen=True)
class CalibrationConfig:
    """Which tokens the Hessians H = 2XXᵀ/n come from.

    dataset: a shipped dataset name ("wikitext2", "ptb", "c4") or a path to a .txt / .jsonl file.
    split:   split of a shipped dataset ("valid" or "test"; None: "valid"); None for a file, which has no splits.
    nsamples windows of seqlen tokens are drawn at seeded random offsets.
    """

    dataset: str = "wikitext2"
    split: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        _check(isinstance(self.dataset, str) and self.dataset != "",
               f"dataset must be a dataset name or a file path, got {self.dataset!r}")
        if self.dataset in DATASETS:
            _check(self.resolved_split in DATASETS[self.dataset], f"dataset {self.dataset!r} has no split "
                   f"{self.split!r}; available: {sorted(DATASETS[self.dataset])}")
        else:
            _check(self.split is None, f"split {self.split!r} given for {self.dataset!r}, which is not a shipped "
                                       f"dataset ({sorted(DATASETS)}): a file has no splits")
        _check(_is_int(self.nsamples) and self.nsamples >= 1,
               f"nsamples must be a positive integer, got {self.nsamples!r}")
        _check(_is_int(self.seqlen) and self.seqlen >= 2,
               f"seqlen must be an integer >= 2, got {self.seqlen!r}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63,
               f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        _check(_is_int(self.batch_size) and self.batch_size >= 1,
               f"batch_size must be a positive integer, got {self.batch_size!r}")

    @property
    def resolved_split(self) -> str | None:
        """The split read: `split`, or "valid" for a shipped dataset when it is None; None for a file."""
        return self.split if self.split is not None else default_split(self.dataset, "calibration")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "split": self.resolved_split}


FP32_TINY, FP32_MAX = 2.0**-126, float.fromhex("0x1.fffffep+127")  # the smallest normal and the largest fp32 numbers


@dataclass(frozen=True)
class SamplingConfig:
    """How generation picks each next token from the model's logits.

    temperature: 0 is greedy decoding (argmax, the default); above 0 tokens are drawn from
                 softmax(logits / temperature) ...
    top_k:       ... restricted to the top_k most likely tokens (0: no limit) ...
    top_p:       ... and then to the smallest set of most likely tokens whose probability reaches top_p
                 (nucleus sampling; 1.0: no limit).
    seed:        seeds the draws: the same model, prompt and seed give the same tokens (on the same device).
    repetition_penalty: tokens already in the prompt or the output have their logits divided by it where
                 positive and multiplied by it where negative (the CTRL paper's rule, as in transformers),
                 before greedy or sampled choice; 1.0: off, above 1: fewer repetitions.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check(_is_real(self.temperature) and math.isfinite(self.temperature)
               and (self.temperature == 0 or FP32_TINY <= self.temperature <= FP32_MAX),
               f"temperature must be 0 (greedy) or a number in [{FP32_TINY:.3g}, {FP32_MAX:.3g}] (what fp32 logits "
               f"can be divided by), got {self.temperature!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63,
               f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        _check(_is_real(self.repetition_penalty)
               and FP32_TINY <= self.repetition_penalty <= FP32_MAX,
               f"repetition_penalty must be a number in [{FP32_TINY:.3g}, {FP32_MAX:.3g}] (1.0: off), "
               f"got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
