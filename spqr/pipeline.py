"""Block-by-block quantization of a transformers causal LM.

For each decoder block in order: run the calibration activations (which already passed through
the quantized earlier blocks) through it with hooks that accumulate H = 2XXᵀ/n per distinct
Linear input, quantize the Linears that share an input in one sweep, then run the block again
with its quantized weights to produce the next block's inputs.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from spqr.algo.engine import HessianError, quantize_weights
from spqr.config import CalibrationConfig, ConfigError, QuantConfig
from spqr.data import (
    DataError,
    calibration_windows,
    check_token_ids,
    describe,
    is_integer_tensor,
    load_text,
    tokenize,
)
from spqr.format.io import FORMAT_VERSION
from spqr.format.layout import PackedLinear
from spqr.hf import (
    ModelLoadError,
    ShardedWeights,
    attach_quantized_embeddings,
    block_linears,
    builds_models,
    find_decoder_blocks,
    materialize,
    module_name,
    refuse_save_pretrained,
    release_freed_memory,
    set_submodule,
)
from spqr.nn import SpQRLinear, in_eval_mode
from spqr.resume import OffloadedHidden, ProgressStore, hidden_tensor, run_fingerprint

log = logging.getLogger(__name__)


class QuantizationError(RuntimeError):
    """Quantization cannot proceed: non-finite weights or activations, or a singular Hessian."""


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    relative_error: float
    outliers: int
    avg_bits: float

    @property
    def outlier_share(self) -> float:
        return self.outliers / (self.out_features * self.in_features)


@dataclass
class QuantizationReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds_forward: float = 0.0
    seconds_hessian: float = 0.0
    seconds_engine: float = 0.0
    seconds_total: float = 0.0

    @property
    def quantized_weights(self) -> int:
        return sum(r.out_features * r.in_features for r in self.layers)

    @property
    def avg_bits(self) -> float:
        return sum(r.avg_bits * r.out_features * r.in_features for r in self.layers) / max(self.quantized_weights, 1)

    @property
    def outlier_share(self) -> float:
        return sum(r.outliers for r in self.layers) / max(self.quantized_weights, 1)

    def to_dict(self) -> dict:
        return {
            "avg_bits": self.avg_bits,
            "outlier_share": self.outlier_share,
            "quantized_weights": self.quantized_weights,
            "seconds": {"forward": self.seconds_forward, "hessian": self.seconds_hessian,
                        "engine": self.seconds_engine, "total": self.seconds_total},
            "layers": [asdict(r) | {"outlier_share": r.outlier_share} for r in self.layers],
        }


def calibration_data(tokenizer, calibration: CalibrationConfig) -> torch.Tensor:
    """Calibration token windows [nsamples, seqlen] (int64) as the config describes."""
    ids = tokenize(tokenizer, load_text(calibration.dataset, calibration.resolved_split))
    if ids.numel() < calibration.seqlen + 1:
        raise DataError(f"calibration text {calibration.dataset!r} has only {ids.numel()} tokens; "
                        f"seqlen {calibration.seqlen} needs at least {calibration.seqlen + 1}")
    return calibration_windows(ids, calibration.nsamples, calibration.seqlen, calibration.seed)


class _StopForward(Exception):
    pass


def _cast_floats(value, dtype: torch.dtype | None):
    """value with its floating-point tensors (also inside tuples/lists) cast to dtype."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


# How the hidden states of one batch are kept: given (batch index, tensor), returns the tensor
# itself, or a handle to a copy on disk (activation offloading).
Keep = Callable[[int, torch.Tensor], "torch.Tensor | OffloadedHidden | None"]


def _in_memory(batch: int, hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@torch.inference_mode()
def _capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor],
                          keep: Keep = _in_memory, dtype: torch.dtype | None = None):
    """Run the model up to its first block; return per batch (hidden_states as `keep` keeps them,
    kwargs of the block call), floating-point tensors cast to dtype if given."""
    captured: list[tuple] = []

    def hook(module, args, kwargs):
        kwargs = {k: _cast_floats(v, dtype) for k, v in kwargs.items()}
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((keep(len(captured), _cast_floats(hidden, dtype)), kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: list[tuple], keep: Keep = _in_memory) -> tuple[list, bool]:
    """The block's outputs for every batch of inputs, each kept by `keep`, and whether the block
    returns a tuple (older transformers) rather than a tensor."""
    outputs, as_tuple = [], False
    for index, (hidden, kwargs) in enumerate(inputs):
        out = block(hidden_tensor(hidden), **kwargs)
        as_tuple = isinstance(out, tuple)
        outputs.append(keep(index, out[0] if as_tuple else out))
    return outputs, as_tuple


class _HessianCollector:
    """Pre-forward hooks accumulating XᵀX once per distinct input tensor (Linears fed the same tensor
    share it). Once every Linear of the block has seen its input, the block's forward is cut short
    (raising _StopForward): the rest of it would only compute outputs that are not needed.
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sums: dict[str, torch.Tensor] = {}  # group leader name -> Σ XᵀX (fp32)
        self.tokens: dict[str, int] = {}
        self.group_of: dict[str, str] = {}  # linear name -> group leader name
        self.seconds = 0.0
        self._expected = len(linears)
        self._seen: set[str] = set()
        self._batch_inputs: list[tuple[torch.Tensor, str]] = []
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            self._seen.add(name)
            for seen, leader in self._batch_inputs:
                if seen is x:
                    self.group_of.setdefault(name, leader)
                    break
            else:
                self._accumulate(name, x)
            if len(self._seen) == self._expected:
                raise _StopForward
        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        leader = self.group_of.setdefault(name, name)
        self._batch_inputs.append((x, leader))
        start = time.perf_counter()
        flat = x.reshape(-1, x.shape[-1]).float()
        if not bool(torch.isfinite(flat).all()):
            raise QuantizationError(f"calibration activations entering {name} contain NaN or Inf")
        if leader in self.sums:
            self.sums[leader].addmm_(flat.T, flat)
        else:
            self.sums[leader] = flat.T @ flat
        self.tokens[leader] = self.tokens.get(leader, 0) + flat.shape[0]
        self.seconds += time.perf_counter() - start

    def run(self, block: nn.Module, inputs: list[tuple]) -> None:
        """Feed every calibration batch through the block, accumulating the Hessians."""
        for hidden, kwargs in inputs:
            self.feed(block, hidden_tensor(hidden), **kwargs)

    def feed(self, module: nn.Module, *args, **kwargs) -> None:
        """Run one forward pass (of one batch) that reaches the hooked Linears."""
        try:
            module(*args, **kwargs)
        except _StopForward:
            pass
        self._seen.clear()
        self._batch_inputs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, leader in self.group_of.items():
            out.setdefault(leader, []).append(name)
        return out

    def hessian(self, leader: str) -> torch.Tensor:
        return self.sums[leader] * (2.0 / self.tokens[leader])


class _Passthrough(nn.Module):
    """Stands in for a decoder block: returns its input hidden states, or `replay` when set. Other attributes are
    the block's (the model's forward may read some: qwen2's `attention_type` in transformers 5.0)."""

    def __init__(self, block: nn.Module, as_tuple: bool):
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: the stand-in holds no weights
        self.as_tuple = as_tuple
        self.replay: torch.Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_block" not in self.__dict__:  # (while copied or unpickled)
                raise
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        hidden = self.replay if self.replay is not None else (args[0] if args else kwargs["hidden_states"])
        return (hidden,) if self.as_tuple else hidden


def _head_hessian(model: nn.Module, blocks: nn.ModuleList, head_name: str, head: nn.Linear,
                  batches: list[torch.Tensor], last_outputs: list, as_tuple: bool) -> tuple[torch.Tensor, float]:
    """H of the output head's input (the final hidden states after the model's last norm), from the
    last block's stored outputs: the blocks are swapped for pass-throughs, the last one replaying those
    outputs, so the model's own tail computes the head's input without running any block again.
    Returns (H, seconds spent accumulating it)."""
    collector = _HessianCollector({head_name: head})
    originals = list(blocks)
    stand_ins = [_Passthrough(block, as_tuple) for block in originals]
    try:
        for i, stand_in in enumerate(stand_ins):
            blocks[i] = stand_in
        with torch.inference_mode():
            for batch, hidden in zip(batches, last_outputs):
                stand_ins[-1].replay = hidden_tensor(hidden)
                collector.feed(model, batch, use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        collector.remove()
    return collector.hessian(head_name), collector.seconds


def _quantize_group(linears: dict[str, nn.Linear], hessian: torch.Tensor | None, config: QuantConfig,
                    prefix: str, report: QuantizationReport,
                    forward_copies: dict[str, nn.Linear] | None) -> dict[str, PackedLinear]:
    """Quantize Linears that share one input (and Hessian) in one engine sweep.

    Their weights are replaced by the dequantized values (also in forward_copies, the reduced-
    precision copies used for calibration forwards, if any) so the next forward pass sees them.
    """
    try:
        results = quantize_weights([m.weight.detach() for m in linears.values()], hessian, config)
    except HessianError as e:
        raise QuantizationError(f"{prefix + next(iter(linears))}: {e}") from e
    packed_layers = {}
    for (name, linear), qw in zip(linears.items(), results):
        packed = PackedLinear.from_quantized(qw, config.wbits, config.beta1, config.beta2, config.qq_bits,
                                             linear.bias)
        packed_layers[name] = packed
        linear.weight.data.copy_(qw.weight.to(linear.weight.dtype))
        if forward_copies is not None:
            copy_weight = forward_copies[name].weight
            copy_weight.data.copy_(qw.weight.to(copy_weight.dtype))
        report.layers.append(LayerReport(prefix + name, qw.codes.shape[0], qw.codes.shape[1], qw.relative_error,
                                         qw.outlier_count, packed.stored_bits() / qw.codes.numel()))
    return packed_layers


FP16_MAX = 65504.0
SMALLEST_FP16_STATISTICS = 2.0**-17  # max |w| below which fp16 scales lose precision (3 bits, N(0, s): +16% error
# at s = 1e-6 where max |w| ~ 4e-6, the layer zeroed at 1e-9); fp16 is subnormal below 2^-14


def _check_weight(name: str, weight: torch.Tensor, config: QuantConfig) -> None:
    """Refuse a weight matrix the format cannot hold: NaN or Inf; with outliers (stored in fp16), values past fp16's
    range (they failed after the sweep, without the layer's name); with fp16 statistics, scales past fp16's range,
    or weights so small that their scales vanish in it (the layer came out zeroed, or 1e4 times too large)."""
    weight = weight.detach()
    if not bool(torch.isfinite(weight).all()):
        raise QuantizationError(f"weights of {name} contain NaN or Inf")
    peak = float(weight.abs().max()) if weight.numel() else 0.0
    fp16_statistics = config.stats_dtype == "float16"  # (bilevel statistics are fp16 too: QuantConfig checks it)
    largest_scale = 2 * peak / (2**config.wbits - 1)  # a group spanning -peak .. peak
    if config.has_outliers and peak > FP16_MAX:
        raise QuantizationError(f"weights of {name} reach {peak:.4g}, past fp16's range ({FP16_MAX:g}), in which "
                                "outliers are stored: skip this layer")
    if fp16_statistics and largest_scale > FP16_MAX:
        raise QuantizationError(f"weights of {name} reach {peak:.4g}: their scales pass fp16's range ({FP16_MAX:g}); "
                                "skip this layer, or use plain fp32 statistics (qq_bits=None, stats_dtype='float32')")
    if fp16_statistics and 0 < peak < SMALLEST_FP16_STATISTICS:
        raise QuantizationError(f"weights of {name} are at most {peak:.3g}: their scales would vanish in fp16 "
                                "statistics (subnormal below 6.1e-5); skip this layer, or use plain fp32 statistics "
                                "(qq_bits=None, stats_dtype='float32')")


def _check_calibration(calibration: torch.Tensor, vocab: int | None) -> None:
    """Refuse calibration that is not token ids [nsamples, seqlen] of this model (it would fail deep in a forward)."""
    if not is_integer_tensor(calibration) or calibration.ndim != 2 or calibration.numel() == 0:
        raise DataError(f"calibration must be a tensor of token ids [nsamples, seqlen] (int64, e.g. from "
                        f"calibration_data), got {describe(calibration)}")
    check_token_ids(calibration, vocab, "calibration")


def _warn_about_weights_outside_linears(blocks_name: str, blocks: nn.ModuleList) -> None:
    """Only nn.Linear layers are quantized: say so when the blocks hold other weight matrices (e.g. mixture-of-experts
    weights stored as 3-D parameters), which would otherwise stay in full precision without a word."""
    names, count = [], 0
    for index, block in enumerate(blocks):
        linears = set(block_linears(block))
        for name, parameter in block.named_parameters():
            if parameter.dim() >= 2 and name.rpartition(".")[0] not in linears:
                names.append(f"{blocks_name}.{index}.{name}")
                count += parameter.numel()
    if names:
        log.warning("spqr: %d weights of the decoder blocks are not in nn.Linear layers and stay unquantized (%s%s): "
                    "spqr quantizes Linear layers only", count, ", ".join(names[:3]), ", ..." if len(names) > 3 else "")


def _computes_as_linear(linear: nn.Linear) -> bool:
    """Whether a block's nn.Linear can become an SpQRLinear: nn.Linear itself, or a subclass whose own forward
    still returns x·Wᵀ + b (falcon's FalconLinear), checked on a random input within the weight dtype's rounding.
    Subclasses that compute something else (phimoe's and llama4's routers return tuples; grouped projections)
    must keep their weights."""
    if type(linear).forward is nn.Linear.forward:
        return True
    x = torch.randn(2, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight)
    try:
        with torch.no_grad():
            y = linear(x)
            expected = F.linear(x, linear.weight, linear.bias)
    except Exception:  # a forward that needs other arguments or shapes
        return False
    if not isinstance(y, torch.Tensor) or y.shape != expected.shape:
        return False
    tolerance = 16 * torch.finfo(expected.dtype).eps * float(expected.abs().max()) + 1e-30
    return float((y - expected).abs().max()) <= tolerance


class _DirectWeightReads(TorchFunctionMode):
    """While active, collects the names of the Linears whose weight a torch function receives outside the
    Linear's own forward: the model reads those weights directly (mamba's mixer computes `dt_proj.weight @ x`),
    which an SpQRLinear, holding packed tensors only, cannot serve."""

    def __init__(self, linears: dict[str, nn.Linear]):
        super().__init__()
        self.names: set[str] = set()
        self._owner = {id(m.weight): name for name, m in linears.items()}
        self._running: set[str] = set()  # Linears inside their own forward
        self._handles = [hook for name, m in linears.items() for hook in (
            m.register_forward_pre_hook(lambda *_, name=name: self._running.add(name)),
            m.register_forward_hook(lambda *_, name=name: self._running.discard(name)))]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for value in tree_leaves((args, kwargs)):
            name = self._owner.get(id(value))
            if name is not None and name not in self._running:
                self.names.add(name)
        return func(*args, **(kwargs or {}))

    def remove(self) -> None:
        for hook in self._handles:
            hook.remove()


def _linears_read_directly(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, skip: tuple[str, ...],
                           lazy: bool) -> set[str]:
    """Full names of the blocks' Linears (not skipped) whose weight the model reads outside their forward, found by
    running 8 tokens through the model with every block's Linears watched; for a model whose later blocks are not
    loaded yet (lazy), through the first block only, its findings taken to hold for every block. RTN runs no
    calibration forward, so this probe stands in for the Hessian hooks that notice such Linears never run."""
    watched = blocks[:1] if lazy else blocks
    linears = {f"{blocks_name}.{i}.{name}": m for i, block in enumerate(watched)
               for name, m in block_linears(block).items() if not _skipped(f"{blocks_name}.{i}.{name}", skip)}
    probe = torch.arange(8).remainder(getattr(model.config, "vocab_size", None) or 8).unsqueeze(0)
    watch = _DirectWeightReads(linears)
    try:
        with torch.inference_mode():
            if lazy:
                (hidden, kwargs), = _capture_block_inputs(model, blocks[0], [probe])
                with watch:
                    blocks[0](hidden, **kwargs)
            else:
                with watch:
                    model(probe, use_cache=False)
    finally:
        watch.remove()
    if not lazy:
        return watch.names
    first = f"{blocks_name}.0."
    return {f"{blocks_name}.{i}.{name.removeprefix(first)}" for name in watch.names for i in range(len(blocks))
            if not _skipped(f"{blocks_name}.{i}.{name.removeprefix(first)}", skip)}


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Whether the Linear `name` (full module name) is one of `skip`: a full name or a dotted suffix."""
    return any(name == s or name.endswith("." + s) for s in skip)


@builds_models  # it makes modules: not while another thread builds one on meta (spqr.hf.builds_models)
@in_eval_mode
def quantize(model: nn.Module, calibration: torch.Tensor | None, config: QuantConfig,
             skip: tuple[str, ...] = (), batch_size: int = 16, forward_dtype: torch.dtype | None = None,
             progress_dir: str | Path | None = None, block_weights: ShardedWeights | None = None,
             offload_activations: bool = False, quantize_head: bool | QuantConfig = False,
             quantize_embeddings: bool = False, progress: bool = True) -> QuantizationReport:
    """Quantize the Linears inside the model's decoder blocks, in place (they become SpQRLinear).

    Kept in full precision, with a warning: nn.Linear subclasses whose forward is not x·Wᵀ + b (routers), and
    Linears whose weight the model reads directly (mamba's dt_proj): with calibration, those that never run as
    modules (which also keeps unused experts dense); with RTN, those whose weight a probe of 8 tokens through the
    model sees read outside the Linear's forward (through the first block only when blocks load lazily).

    calibration: token windows [nsamples, seqlen] (int64), e.g. from `calibration_data`; may be
    None only when the config needs no Hessian (plain RTN). skip: Linear names (full, or a
    suffix like "mlp.down_proj") kept in full precision. forward_dtype: run the calibration
    forward passes in this dtype (e.g. torch.bfloat16, several times faster on CPUs with AMX);
    the weights are still quantized from their original values and Hessians accumulate in fp32.
    progress_dir: keep each finished block (and the activations entering the next) there, and
    resume from what is there when the same run is started again (see spqr.resume). Finished
    blocks' packed tensors are then used memory-mapped from there, not held in memory.
    block_weights: for a model from `load_model_lazy` (blocks on the meta device), the checkpoint
    each block is loaded from just before it is quantized, so only one dense block is in memory.
    offload_activations: keep the calibration activations in files (in progress_dir, or a
    temporary directory) and read one batch at a time, instead of holding them all in memory.
    The result does not depend on progress_dir or offload_activations (byte-identical).
    quantize_head: also quantize the output head (lm_head), with the same recipe (True) or the one
    given (a QuantConfig, e.g. more bits), its Hessian taken from the final hidden states. A head
    tied to the input embeddings is untied: the embeddings stay in full precision
    (config.tie_word_embeddings becomes False), unless quantize_embeddings: then (tied heads only;
    implies quantize_head) the input embeddings become an SpQREmbedding that reads its rows from
    the quantized head, so the model holds that matrix once, packed.
    The model runs in eval mode (dropout off) throughout; each module's mode is restored after.
    Returns per-layer errors, bits and timings.
    """
    total_start = time.perf_counter()
    report = QuantizationReport()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a spqr.QuantConfig (e.g. spqr.preset('spqr')), got {type(config).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(quantize_head, (bool, QuantConfig)):  # `is not False` below: None would quantize the head
        raise TypeError(f"quantize_head must be True, False or a spqr.QuantConfig (the head's recipe), got "
                        f"{quantize_head!r}")
    if not isinstance(quantize_embeddings, bool):
        raise TypeError(f"quantize_embeddings must be True or False, got {quantize_embeddings!r}")
    if forward_dtype is not None and not (isinstance(forward_dtype, torch.dtype) and forward_dtype.is_floating_point):
        raise TypeError(f"forward_dtype must be a floating-point torch.dtype (e.g. torch.bfloat16) or None, got "
                        f"{forward_dtype!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if any(isinstance(m, SpQRLinear) for m in model.modules()):
        raise QuantizationError("the model is already quantized (it has SpQRLinear layers); quantize the original")
    blocks_name, blocks = find_decoder_blocks(model)
    linear_names = [f"{blocks_name}.{i}.{name}" for i, block in enumerate(blocks) for name in block_linears(block)]
    unmatched = [s for s in skip if not any(_skipped(name, (s,)) for name in linear_names)]
    if unmatched:  # a typo would otherwise quietly quantize the layer it meant to keep
        suffix = next(iter(block_linears(blocks[0])))
        raise ConfigError(f"skip names that match no Linear of the decoder blocks: {unmatched} (give a full name "
                          f"such as {linear_names[0]!r} or a suffix such as {suffix!r})")
    if all(_skipped(name, skip) for name in linear_names) and quantize_head is False and not quantize_embeddings:
        raise ConfigError("skip names every Linear of the decoder blocks: nothing would be quantized")
    _warn_about_weights_outside_linears(blocks_name, blocks)
    if config.needs_hessian and calibration is None:
        raise ValueError("this configuration needs calibration data")
    if calibration is not None:
        _check_calibration(calibration, getattr(model.config, "vocab_size", None))
        calibration = calibration.long()  # embeddings take int64 (or int32) ids only; uint8 and int16 are fine here
    max_len = getattr(model.config, "max_position_embeddings", None)
    if calibration is not None and max_len is not None and calibration.shape[1] > max_len:
        raise DataError(f"calibration seqlen {calibration.shape[1]} exceeds the model's maximum of {max_len} tokens")
    offload_activations = offload_activations and config.needs_hessian
    if quantize_embeddings:
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise ConfigError("quantize_embeddings needs input embeddings tied to the output head "
                              "(tie_word_embeddings); this model's are separate: use quantize_head alone")
        if quantize_head is False:
            quantize_head = True
    head_config = quantize_head if isinstance(quantize_head, QuantConfig) else config
    if quantize_head is not False and head_config.needs_hessian and not config.needs_hessian:
        raise ConfigError("the head's recipe needs calibration activations but the blocks' recipe does not")
    if offload_activations and progress_dir is None:  # offloaded activations need a directory: a temporary one
        with tempfile.TemporaryDirectory(prefix="spqr-activations-") as scratch:
            return quantize(model, calibration, config, skip=skip, batch_size=batch_size, forward_dtype=forward_dtype,
                            progress_dir=scratch, block_weights=block_weights, offload_activations=True,
                            quantize_head=quantize_head, quantize_embeddings=quantize_embeddings, progress=progress)

    release_freed_memory()  # e.g. what tokenizing the calibration text used
    dense_dtype = model.get_input_embeddings().weight.dtype
    embeddings_name = module_name(model, model.get_input_embeddings())

    def load_block(index: int) -> None:
        if block_weights is not None:
            prefix = f"{blocks_name}.{index}."
            materialize(blocks[index], prefix, block_weights, dense_dtype)
            missing = [prefix + n for n, t in blocks[index].state_dict(keep_vars=True).items()
                       if t.device.type == "meta"]
            if missing:
                raise ModelLoadError(f"tensors missing from the model's weights: {missing[:5]}")

    load_block(0)
    read_directly: set[str] = set()  # RTN: Linears (full names) whose weight the model reads directly
    if not config.needs_hessian:
        try:
            read_directly = _linears_read_directly(model, blocks_name, blocks, skip, block_weights is not None)
        except Exception as e:  # a model whose forward needs more than token ids
            log.warning("spqr: could not run 8 tokens through the model (%s: %s), so Linears whose weight it reads "
                        "directly are not found: if the quantized model fails, --skip them", type(e).__name__, e)
        if read_directly:
            within = sorted({name.removeprefix(blocks_name + ".").split(".", 1)[1] for name in read_directly})
            log.warning("spqr: the model reads the weights of %s directly (not through the Linear's forward): kept in "
                        "full precision (%d layers)", ", ".join(within), len(read_directly))
    store, first_block = None, 0
    if progress_dir is not None:
        # the weights: resumed blocks must come from the same ones. Where blocks are read from files, their size and
        # time (and the first Linear's bytes); in memory, every tensor's bytes (a sum per tensor missed swapped
        # columns: 0.3 s per GB)
        if block_weights is not None:
            weights_id, weights = block_weights.fingerprint(), [next(iter(block_linears(blocks[0]).values())).weight]
        else:
            in_memory = {name: t for name, t in model.state_dict().items()
                         if t.device.type != "meta" and t.is_floating_point()}
            weights_id, weights = list(in_memory), list(in_memory.values())
        tensors = (*weights, *(() if calibration is None else (calibration,)))
        # the packed format version too: a block saved in another layout must not be read as this one
        fingerprint = run_fingerprint(FORMAT_VERSION, config.to_dict(), skip, str(forward_dtype), batch_size,
                                      quantize_head is not False and head_config.to_dict(),
                                      model.config.to_dict(), weights_id, tensors=tensors)
        store = ProgressStore(progress_dir, fingerprint)
        first_block = store.next_block()

    def keep(block: int) -> Keep:
        """How the hidden states entering `block` are kept: on disk when offloading, else in memory."""
        if offload_activations:
            return lambda batch, hidden: store.write_activation(block, batch, hidden)
        return _in_memory

    head_name, head = _output_head(model) if quantize_head is not False else (None, None)
    n_steps = len(blocks) + (head is not None)  # the head is quantized as one more step, after the blocks

    inputs: list[tuple] = []
    batches: list[torch.Tensor] = []
    if config.needs_hessian:
        start = time.perf_counter()
        batches = list(calibration.split(batch_size))
        # when resuming, only the block call's other arguments are needed: the hidden states are on disk
        inputs = _capture_block_inputs(model, blocks[0], batches,
                                       (lambda batch, hidden: None) if first_block else keep(0), forward_dtype)
        report.seconds_forward += time.perf_counter() - start

    if first_block:
        log.info("resuming from step %d (finished blocks read from %s)", first_block, progress_dir)
        for index in range(first_block):
            layers, reports = store.load_block(index)
            for name, packed in layers.items():
                set_submodule(model, name, SpQRLinear.from_packed(packed, name))
            if index < len(blocks):
                load_block(index)  # the block's other tensors (norms), if it was left on meta
            report.layers.extend(LayerReport(**r) for r in reports)
        if config.needs_hessian and first_block < n_steps:
            inputs = [(hidden, kwargs) for hidden, (_, kwargs)
                      in zip(store.load_activations(first_block, offload_activations), inputs)]

    as_tuple = False  # whether the blocks return tuples (older transformers) or tensors
    warned_classes: set[str] = set()  # nn.Linear subclasses kept dense, already named in a warning
    warned_uncalled: set[str] = set()  # Linears (names within a block) never called, already named
    bar = tqdm(list(enumerate(blocks))[first_block:], desc="quantizing blocks", disable=not progress,
               initial=first_block, total=len(blocks))
    for index, block in bar:
        load_block(index)
        prefix = f"{blocks_name}.{index}."
        linears = {name: m for name, m in block_linears(block).items()
                   if not _skipped(prefix + name, skip) and prefix + name not in read_directly}
        for name in [name for name, m in linears.items() if not _computes_as_linear(m)]:
            kind = type(linears.pop(name)).__name__
            if kind not in warned_classes:
                warned_classes.add(kind)
                log.warning("spqr: %s (%s) subclasses nn.Linear with a forward that does not compute x·Wᵀ + b: kept "
                            "in full precision (and every other %s)", prefix + name, kind, kind)
        for name, linear in linears.items():  # those to be quantized
            _check_weight(prefix + name, linear.weight, config)

        forward_block = block
        if config.needs_hessian and forward_dtype is not None:
            forward_block = copy.deepcopy(block).to(forward_dtype)
        forward_linears = {name: forward_block.get_submodule(name) for name in linears}

        if config.needs_hessian:
            collector = _HessianCollector(forward_linears)
            start = time.perf_counter()
            with torch.inference_mode():
                collector.run(forward_block, inputs)
            collector.remove()
            report.seconds_forward += time.perf_counter() - start - collector.seconds
            report.seconds_hessian += collector.seconds
            groups = collector.groups()
            uncalled = [name for name in linears if name not in collector.group_of]
            if set(uncalled) - warned_uncalled:  # e.g. mamba's dt_proj, whose weight its mixer reads directly
                log.warning("spqr: %s never ran as a module in the calibration forward (the model reads its weight "
                            "directly, or no calibration token reached it, e.g. an unused expert): kept in full "
                            "precision (in every block where this happens; said once)",
                            ", ".join(prefix + name for name in uncalled))
                warned_uncalled.update(uncalled)
        else:
            groups = {name: [name] for name in linears}

        start = time.perf_counter()
        first_report = len(report.layers)
        packed_layers: dict[str, PackedLinear] = {}
        for leader, names in groups.items():
            hessian = collector.hessian(leader) if config.needs_hessian else None
            packed_layers.update(_quantize_group(
                {n: linears[n] for n in names}, hessian, config, prefix, report,
                forward_linears if forward_block is not block else None))
        report.seconds_engine += time.perf_counter() - start

        needed = config.needs_hessian and index + 1 < n_steps
        if needed:
            start = time.perf_counter()
            with torch.inference_mode():
                outputs, as_tuple = _run_block(forward_block, inputs, keep(index + 1))
            inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs)]
            report.seconds_forward += time.perf_counter() - start

        block_reports = report.layers[first_report:]
        if store is not None:
            saved = store.save_block(index, {prefix + name: p for name, p in packed_layers.items()}, block_reports,
                                     [hidden for hidden, _ in inputs] if needed else None, as_tuple if needed else None)
            packed_layers = {name.removeprefix(prefix): p for name, p in saved.items()}  # memory-mapped
        for name, packed in packed_layers.items():
            set_submodule(block, name, SpQRLinear.from_packed(packed, prefix + name))
        weights = sum(r.out_features * r.in_features for r in block_reports)
        err = sum(r.relative_error for r in block_reports) / max(len(block_reports), 1)
        outliers = sum(r.outliers for r in block_reports) / max(weights, 1)
        release_freed_memory()  # about a block's weights per block otherwise
        if config.needs_hessian:
            bar.set_postfix(rel_err=f"{err:.4f}", outliers=f"{100 * outliers:.2f}%")
            log.info("block %d: mean relative error %.5f, outliers %.3f%%", index, err, 100 * outliers)
        else:  # no Hessian to weigh the error by: the report's 0.0 is not a measurement
            log.info("block %d: quantized (no calibration: output error not measured)", index)

    if head is not None:
        if first_block < n_steps:
            if first_block and first_block == len(blocks) and inputs:  # resumed right before the head
                recorded = store.blocks_return_tuples()
                if recorded is None:
                    raise QuantizationError(f"the progress directory {progress_dir} does not record what the blocks "
                                            "return; delete it to start over")
                as_tuple = recorded
            _quantize_head(model, blocks, head_name, head, batches, [hidden for hidden, _ in inputs], as_tuple,
                           head_config, report, store, len(blocks))
        # the quantized head is its own module now (also when it was read back from the progress directory)
        model.config.tie_word_embeddings = False
        model.config.get_text_config().tie_word_embeddings = False  # the same object for text-only models
    if quantize_embeddings:
        attach_quantized_embeddings(model, {embeddings_name: head_name}, dense_dtype)
    refuse_save_pretrained(model)
    report.seconds_total = time.perf_counter() - total_start
    return report


def _output_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the model's output head, which must be a Linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"quantize_head: the model's output head is a {type(head).__name__}, not a Linear")
    return module_name(model, head), head


def _quantize_head(model: nn.Module, blocks: nn.ModuleList, head_name: str, head: nn.Linear,
                   batches: list[torch.Tensor], last_outputs: list, as_tuple: bool, config: QuantConfig,
                   report: QuantizationReport, store: ProgressStore | None, step: int) -> None:
    """Quantize the output head (after the blocks) and put it in place of the head module."""
    _check_weight(head_name, head.weight, config)
    hessian = None
    if config.needs_hessian:
        start = time.perf_counter()
        hessian, seconds = _head_hessian(model, blocks, head_name, head, batches, last_outputs, as_tuple)
        report.seconds_hessian += seconds
        report.seconds_forward += time.perf_counter() - start - seconds
    if head.weight is model.get_input_embeddings().weight:
        # quantize from a copy: the embeddings keep the original weights
        tied = head
        head = nn.Linear(tied.in_features, tied.out_features, bias=False)
        head.weight = nn.Parameter(tied.weight.detach().clone(), requires_grad=False)
        head.bias = tied.bias
    start = time.perf_counter()
    first_report = len(report.layers)
    packed = _quantize_group({head_name: head}, hessian, config, "", report, None)
    report.seconds_engine += time.perf_counter() - start
    if store is not None:
        packed = store.save_block(step, packed, report.layers[first_report:], None)  # memory-mapped
    set_submodule(model, head_name, SpQRLinear.from_packed(packed[head_name], head_name))
    r = report.layers[-1]
    log.info("%s: relative error %.5f, outliers %.3f%%", head_name, r.relative_error, 100 * r.outlier_share)
