"""On-disk progress of a quantization run, so an interrupted run resumes where it stopped.

A progress directory holds, after each finished decoder block:
- `block_NNNN.safetensors`: the packed tensors of the block's quantized Linears (names relative
  to the model) with the block's LayerReports in the metadata;
- `activations_NNNN.safetensors`: the calibration hidden states entering block NNNN (the next);
- `state.json`: the next block to quantize and a fingerprint of the run's inputs.
Each file is written to a temporary name and renamed into place, and state.json is written
last, so whatever instant the process dies at, the directory describes a consistent state.
A resumed run recomputes nothing that is on disk and produces the same bytes as an
uninterrupted one (the saved activations are exact).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spqr.format.io import deferred_interrupt
from spqr.format.layout import LayerSpec, PackedLinear

STATE_NAME = "state.json"


def _activations_name(block: int) -> str:
    return f"activations_{block:04d}.safetensors"


def run_fingerprint(*parts: object, tensors: tuple[torch.Tensor, ...] = ()) -> str:
    """sha256 over JSON-able parts and raw tensor bytes: identifies a run's inputs."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ProgressStore:
    """Reads and writes the progress directory of one run (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def next_block(self) -> int:
        """Index of the first block not yet finished (0 if nothing usable is on disk)."""
        path = self.directory / STATE_NAME
        if not path.is_file():
            return 0
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return 0
        if state.get("fingerprint") != self.fingerprint:
            return 0
        return int(state["next_block"])

    def save_block(self, index: int, packed: dict[str, PackedLinear], reports: list,
                   activations: list[torch.Tensor] | None) -> None:
        """Record block `index` as finished: its packed layers (by full name), reports and the next
        block's inputs (None when no further block needs them)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{key}": t for name, layer in packed.items() for key, t in layer.tensors.items()}
        metadata = {"reports": json.dumps([asdict(r) for r in reports]),
                    "specs": json.dumps({name: layer.spec.to_dict() for name, layer in packed.items()})}
        _atomic_save(tensors, self.directory / f"block_{index:04d}.safetensors", metadata)
        if activations is not None:
            _atomic_save({f"batch_{i:05d}": a for i, a in enumerate(activations)},
                         self.directory / _activations_name(index + 1))
        tmp = self.directory / (STATE_NAME + ".tmp")
        tmp.write_text(json.dumps({"next_block": index + 1, "fingerprint": self.fingerprint}))
        os.replace(tmp, self.directory / STATE_NAME)
        (self.directory / _activations_name(index)).unlink(missing_ok=True)  # the previous block's inputs

    def load_block(self, index: int) -> tuple[dict[str, PackedLinear], list[dict]]:
        """Packed layers by full name, and the LayerReport fields, of a finished block."""
        path = self.directory / f"block_{index:04d}.safetensors"
        with deferred_interrupt():
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
        specs = json.loads(metadata["specs"])
        layers = {name: PackedLinear(LayerSpec(**spec), {}) for name, spec in specs.items()}
        for key, t in tensors.items():
            name, _, part = key.rpartition(".")
            layers[name].tensors[part] = t
        return layers, json.loads(metadata["reports"])

    def load_activations(self, block: int) -> list[torch.Tensor]:
        """The calibration hidden states entering `block`, one tensor per batch."""
        with deferred_interrupt():
            tensors = load_file(str(self.directory / _activations_name(block)))
        return [tensors[k] for k in sorted(tensors)]

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
