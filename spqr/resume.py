"""On-disk progress of a quantization run, so an interrupted run resumes where it stopped.

A progress directory holds, after each finished decoder block:
- `block_NNNN.safetensors`: the packed tensors of the block's quantized Linears (names relative
  to the model) with the block's LayerReports in the metadata (with `quantize_head`, the output
  head is one more step, numbered after the last block);
- `activations_NNNN/batch_XXXXX.safetensors`: the calibration hidden states entering block NNNN
  (the next), one file per batch. With activation offloading they are written there as the
  block's forward pass produces them and read back one batch at a time, so the calibration
  activations never need to fit in memory;
- `state.json`: the next block to quantize, a fingerprint of the run's inputs, the sha256 of every
  finished block's file, the number of activation batches, and whether the model's blocks return
  tuples (older transformers) or tensors, once a block has been run.
Every file is flushed to disk before state.json, written last (to a temporary name, then
renamed), points at it, so whatever instant the process dies at, the directory describes a
consistent state. A resumed run recomputes nothing that is on disk and produces the same bytes
as an uninterrupted one (the saved activations are exact). A block file that is missing or
altered, or activations missing or truncated, are refused (ProgressError) rather than resumed
from; a state.json that cannot be read (or belongs to other inputs) starts the run over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from spqr.format.io import deferred_interrupt, save_safetensors, sha256_file
from spqr.format.layout import LayerSpec, PackedLinear

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
LAYOUT = 4  # of the progress directory; state.json of another layout is ignored (the run starts over)


class ProgressError(RuntimeError):
    """The progress directory of a run is damaged: a finished block's file or the saved activations are missing,
    truncated or altered."""


@dataclass(frozen=True)
class OffloadedHidden:
    """One batch of calibration hidden states kept in a file; `load()` reads it (memory-mapped)."""

    path: Path

    def load(self) -> torch.Tensor:
        with deferred_interrupt():
            return load_file(str(self.path))["hidden"]


def hidden_tensor(hidden: torch.Tensor | OffloadedHidden) -> torch.Tensor:
    """The tensor of one batch of hidden states, wherever it is kept."""
    return hidden.load() if isinstance(hidden, OffloadedHidden) else hidden


def run_fingerprint(*parts: object, tensors: tuple[torch.Tensor, ...] = ()) -> str:
    """sha256 over JSON-able parts and raw tensor bytes: identifies a run's inputs."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:  # hashed in place (the buffer, not a copy of it)
        digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class ProgressStore:
    """Reads and writes the progress directory of one run (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def _state(self) -> dict:
        """state.json if it belongs to this run and layout and reads as one, else {} (the run starts over)."""
        try:
            state = json.loads((self.directory / STATE_NAME).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("spqr: %s cannot be read (%s): starting over", self.directory / STATE_NAME, e)
            return {}
        if not isinstance(state, dict):
            log.warning("spqr: %s holds no progress state: starting over", self.directory / STATE_NAME)
            return {}
        if state.get("fingerprint") != self.fingerprint or state.get("layout") != LAYOUT:
            return {}  # another run's (other inputs, or an older layout)
        next_block, hashes = state.get("next_block"), state.get("block_sha256")
        batches = state.get("activation_batches")
        if not (isinstance(next_block, int) and isinstance(hashes, list) and len(hashes) == next_block >= 1
                and all(isinstance(h, str) for h in hashes) and (batches is None or isinstance(batches, int))):
            log.warning("spqr: %s does not describe a state of this run: starting over", self.directory / STATE_NAME)
            return {}
        return state

    def _damaged(self, what: str) -> ProgressError:
        return ProgressError(f"the progress directory {self.directory} is damaged: {what}; delete it to start over")

    def next_block(self) -> int:
        """Index of the first block not yet finished (0 if nothing usable is on disk)."""
        return self._state().get("next_block", 0)

    def blocks_return_tuples(self) -> bool | None:
        """Whether the blocks returned tuples when the last finished block ran (None: not recorded)."""
        return self._state().get("blocks_return_tuples")

    def _activations_dir(self, block: int) -> Path:
        return self.directory / f"activations_{block:04d}"

    def write_activation(self, block: int, batch: int, hidden: torch.Tensor) -> OffloadedHidden:
        """Write one batch of the hidden states entering `block` (flushed); returns its handle."""
        directory = self._activations_dir(block)
        if batch == 0:  # left over from an attempt at this block that was interrupted
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"batch_{batch:05d}.safetensors"
        save_safetensors({"hidden": hidden}, path)
        return OffloadedHidden(path)

    def save_block(self, index: int, packed: dict[str, PackedLinear], reports: list,
                   activations: list[torch.Tensor | OffloadedHidden] | None,
                   blocks_return_tuples: bool | None = None) -> dict[str, PackedLinear]:
        """Record block `index` as finished: its packed layers (by full name), reports and the next
        block's inputs (None when no further block needs them; batches already written with
        `write_activation` are not written again), and whether the block returned a tuple (None: it
        was not run). Returns the packed layers as read back from the file, memory-mapped: using these
        instead of `packed`, finished blocks do not accumulate in memory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{key}": t for name, layer in packed.items() for key, t in layer.tensors.items()}
        metadata = {"reports": json.dumps([asdict(r) for r in reports]),
                    "specs": json.dumps({name: layer.spec.to_dict() for name, layer in packed.items()})}
        path = self.directory / f"block_{index:04d}.safetensors"
        save_safetensors(tensors, path, metadata)
        hashes = self._state().get("block_sha256", [])[:index] + [sha256_file(path)]
        if len(hashes) != index + 1:
            raise self._damaged(f"state.json lost the record of blocks before {index}")
        if activations is not None:
            for batch, hidden in enumerate(activations):
                if not isinstance(hidden, OffloadedHidden):
                    self.write_activation(index + 1, batch, hidden)
        tmp = self.directory / (STATE_NAME + ".tmp")
        tmp.write_text(json.dumps({"next_block": index + 1, "fingerprint": self.fingerprint, "layout": LAYOUT,
                                   "block_sha256": hashes,
                                   "activation_batches": None if activations is None else len(activations),
                                   "blocks_return_tuples": blocks_return_tuples}))
        os.replace(tmp, self.directory / STATE_NAME)
        shutil.rmtree(self._activations_dir(index), ignore_errors=True)  # the previous block's inputs
        return self._read_block(path)[0]  # (just hashed: not checked again)

    def load_block(self, index: int) -> tuple[dict[str, PackedLinear], list[dict]]:
        """Packed layers by full name, and the LayerReport fields, of a finished block (its file checked against
        the sha256 recorded when it was written)."""
        path = self.directory / f"block_{index:04d}.safetensors"
        hashes = self._state().get("block_sha256", [])
        if not path.is_file():
            raise self._damaged(f"{path.name} is missing")
        if index >= len(hashes) or sha256_file(path) != hashes[index]:
            raise self._damaged(f"{path.name} differs from the file written (its sha256)")
        return self._read_block(path)

    @staticmethod
    def _read_block(path: Path) -> tuple[dict[str, PackedLinear], list[dict]]:
        """A block file's packed layers and reports, as written (unchecked)."""
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

    def load_activations(self, block: int, offload: bool = False) -> list[torch.Tensor | OffloadedHidden]:
        """The calibration hidden states entering `block`, one per batch: tensors, or with `offload`
        handles that read them when needed. Every batch written must be there, whole (its header and size)."""
        directory = self._activations_dir(block)
        expected = self._state().get("activation_batches")
        paths = sorted(directory.glob("batch_*.safetensors"))
        if expected is None or [p.name for p in paths] != [f"batch_{i:05d}.safetensors" for i in range(expected)]:
            raise self._damaged(f"{directory.name} holds {len(paths)} of the {expected} batches of activations "
                                "written")
        for path in paths:
            try:
                with deferred_interrupt(), safe_open(str(path), "pt") as f:
                    f.keys()
            except (SafetensorError, OSError) as e:
                raise self._damaged(f"{directory.name}/{path.name} cannot be read ({e})") from e
        return [OffloadedHidden(p) if offload else OffloadedHidden(p).load() for p in paths]

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
