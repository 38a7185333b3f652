"""On-disk checkpoint I/O: a directory with safetensors weights and a config.json.

Writes go to a hidden temporary directory beside the target, which is renamed into place only
when everything (weights, config, tokenizer) is written and flushed, so an interrupted run
never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from spqr.config import ConfigError

log = logging.getLogger(__name__)

FORMAT_NAME = "spqr_packed"  # `quant_method` in config.json; distinct from transformers' built-in "spqr"
FORMAT_VERSION = 3
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt or of an unsupported version."""


def check_output_dir(out_dir: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse an output path that cannot become a checkpoint directory, or whose replacement would delete the
    inputs or the current directory (ConfigError): a file, a path under a file, the current directory or one
    above it, an input itself or a directory holding an input. What writers of it that were killed left is cleaned
    up first (a checkpoint one had moved aside is put back: see _recover_killed_writers)."""
    out = Path(out_dir)
    resolved = out.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} is a file; give a directory path for the checkpoint")
    parent = next((p for p in resolved.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"output path {out}: {parent} is a file, so the directory cannot be made")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or not out.name:
        raise ConfigError(f"output path {out} is the current directory or one above it; give a new directory")
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise ConfigError(f"output path {out} holds the input {source}; give another directory")
    _recover_killed_writers(out)


_WRITERS_LOCK = threading.Lock()
_WRITERS: dict[str, threading.Lock] = {}  # output path -> the lock its writers in this process take in turn


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out_dir` when the block finishes without error (out_dir checked
    by check_output_dir; writers that read an input check it against that input before their work). Threads of
    one process writing the same out_dir take turns (the temporary directories are named by process)."""
    with _WRITERS_LOCK:
        lock = _WRITERS.setdefault(os.path.realpath(out_dir), threading.Lock())
    with lock:
        yield from _atomic_directory(Path(out_dir), overwrite)


def _atomic_directory(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    check_output_dir(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; choose another path, or overwrite it "
                              "(--overwrite, overwrite=True)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            try:
                with deferred_interrupt():  # Ctrl-C between the two renames left out_dir nowhere
                    os.replace(out_dir, old)
                    os.replace(tmp, out_dir)
            finally:
                if old.exists():  # the previous checkpoint: gone once replaced, else back in place
                    shutil.rmtree(old) if out_dir.exists() else os.replace(old, out_dir)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _recover_killed_writers(out_dir: Path) -> None:
    """Clean up after writers of out_dir that were killed (their pid is gone): delete their temporary directories,
    and finish a replacement one was killed in the middle of (out_dir moved aside to `.old-PID`, the new checkpoint,
    complete by then, still in `.tmp-PID`): the new one goes in place, or the old one back if the new is gone."""
    if not out_dir.parent.is_dir():
        return

    def dead(path: Path) -> bool:
        pid = path.name.rsplit("-", 1)[-1]
        return pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))

    for old in filter(dead, sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"))):
        new = old.with_name(old.name.replace(".old-", ".tmp-"))
        if not out_dir.exists():
            chosen, which = (new, "new") if new.is_dir() else (old, "previous")
            os.replace(chosen, out_dir)
            log.warning("spqr: a writer of %s was killed while replacing it: the %s checkpoint put in place", out_dir,
                        which)
        shutil.rmtree(old, ignore_errors=True)
    for stale in filter(dead, out_dir.parent.glob(f".{out_dir.name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> str:
    """Write tensors (CPU) as a safetensors file, one tensor at a time; returns the file's sha256.

    Unlike `safetensors.torch.save_file`, which first copies every tensor into one bytes buffer,
    this needs no memory beyond the tensors themselves (a model's worth of packed layers is not
    held twice). Written to a temporary name, flushed and renamed into place: readers never see
    a partial file, and tensors memory-mapped from the file being replaced stay valid. Tensors
    are stored sorted by name, the header padded with spaces to 8 bytes as safetensors does; the
    bytes depend only on the input.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    names = sorted(tensors)
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    digest = hashlib.sha256()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in (len(encoded).to_bytes(8, "little"), encoded):
            f.write(chunk)
            digest.update(chunk)
        for name in names:
            t = tensors[name]
            if t.numel():
                data = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                f.write(data)
                digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


MODULES_METADATA = "spqr_modules"  # the weights file's own copy of config.json's modules table


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], modules: dict | None = None) -> dict[str, str]:
    """Write tensors to directory/model.safetensors; returns {file name: sha256}.

    modules: the quantized layers' table of config.json, also kept in the file's metadata, so that an edited
    config.json cannot make the loaders decode the tensors with other settings (check_modules_metadata; the
    sha256 covers the file, not config.json). The format version lives in config.json."""
    metadata = {"format": "pt"}
    if modules is not None:
        metadata[MODULES_METADATA] = json.dumps(modules, sort_keys=True)
    return {WEIGHTS_NAME: save_safetensors(tensors, directory / WEIGHTS_NAME, metadata=metadata)}


def check_modules_metadata(metadata: dict | None, modules: dict, where: str) -> None:
    """Refuse a modules table (config.json's) that differs from the one the weights file was written with (its
    metadata; files that carry none, such as transformers' save_pretrained writes, are not checked): a module or
    a setting of another value, where config.json gives one (one it lacks is refused, or not needed, elsewhere).
    ValueError naming the first module and setting that differ."""
    stored = (metadata or {}).get(MODULES_METADATA)
    if stored is None:
        return
    try:
        stored = json.loads(stored)
    except ValueError as e:
        raise ValueError(f"{where}: the weights file's {MODULES_METADATA} metadata is not JSON: {e}") from e
    if not isinstance(stored, dict) or not isinstance(modules, dict):
        raise ValueError(f"{where}: the weights file's {MODULES_METADATA} metadata is not a table of modules")
    for name in sorted(stored.keys() | modules.keys()):
        a, b = modules.get(name), stored.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in a if a[k] != b.get(k))
            change = ", ".join(f"{k} {a[k]!r} (the weights file: {b.get(k)!r})" for k in keys)
        else:
            change = "" if a == b else "is not in the weights file" if b is None else "is missing from config.json"
        if change:
            raise ValueError(f"{where}: config.json does not describe the weights file's layers (was it edited?): "
                             f"module {name} {change}")


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object of settings (it holds a {type(config).__name__})")
    return config


def read_quantization_config(config: dict, directory: str | os.PathLike) -> dict:
    """The `quantization_config` of one of our checkpoints, after checking method and version."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != FORMAT_NAME:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise CheckpointError(f"{directory} is not a {FORMAT_NAME} checkpoint (quant_method={method!r})")
    version = qc.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{directory} has format version {version!r}; this spqr reads versions up to "
                              f"{FORMAT_VERSION}: upgrade spqr")
    return qc


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C while native code reads tensors, then raise it: a KeyboardInterrupt that lands inside
    safetensors' callbacks into Python comes out as an unrelated ValueError. A no-op off the main thread
    or when SIGINT has a handler of its own."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files: directory/model.safetensors, or the shards its
    model.safetensors.index.json lists (as transformers' save_pretrained writes with max_shard_size)."""
    directory = Path(directory)
    index = directory / f"{WEIGHTS_NAME}.index.json"
    if (directory / WEIGHTS_NAME).is_file() or not index.is_file():
        return [directory / WEIGHTS_NAME]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} cannot be read as a shard index: {e}") from e
    bad = [name for name in names
           if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"{index} names shards that are not safetensors files in its directory: {bad[:3]}")
    return [directory / name for name in names]


def read_weights(directory: str | os.PathLike, checksums: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Load the checkpoint's tensors (weight_files), verifying each file's sha256 when checksums are given."""
    tensors = {}
    for path in weight_files(directory):
        tensors.update(_read_weights_file(path, checksums))
    return tensors


def _read_weights_file(path: Path, checksums: dict[str, str] | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} is incomplete: {path.name} is missing")
    if checksums is not None:
        expected = checksums.get(path.name)
        actual = sha256_file(path)
        if expected != actual:
            raise CheckpointError(f"{path} is corrupt or was modified: sha256 {actual} does not match "
                                  f"the recorded {expected}")
    try:
        with deferred_interrupt():
            return load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise CheckpointError(f"{path} cannot be read as safetensors: {e}") from e
