"""Evaluation and calibration text: the shipped datasets, user files, and token windows.

Shipped (see spqr/datasets/*/README.md for provenance and licenses):
- wikitext2: WikiText-2 raw, splits test/valid; rows joined with "\\n\\n" (GPTQ/SpQR protocol).
- ptb:       Penn Treebank LM version, splits test/valid; sentences joined with " ".
- c4:        a 1,025-document sample of the C4 validation split (split "valid"); joined with " ".
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DATASETS: dict[str, dict[str, str]] = {
    "wikitext2": {"test": "wikitext2/wiki.test.raw", "valid": "wikitext2/wiki.valid.raw"},
    "ptb": {"test": "ptb/ptb.test.txt", "valid": "ptb/ptb.valid.txt"},
    "c4": {"valid": "c4/c4_validation_sample.jsonl"},
}


class DataError(ValueError):
    """A dataset name, split or file is unknown, unreadable or too short."""


def default_split(dataset: str, purpose: str) -> str | None:
    """"test" for evaluation and "valid" for calibration, where the shipped dataset has them; None for a file."""
    if dataset not in DATASETS:
        return None
    wanted = "test" if purpose == "eval" else "valid"
    return wanted if wanted in DATASETS[dataset] else "valid"


def label(dataset: str, split: str | None) -> str:
    """"wikitext2/test", or the file name alone (files have no splits), for messages and reports."""
    return dataset if split is None else f"{dataset}/{split}"


# Files of these kinds are not text: read as text they would calibrate or evaluate on their syntax or bytes.
NOT_TEXT_SUFFIXES = {".json", ".parquet", ".arrow", ".csv", ".tsv", ".gz", ".zip", ".bz2", ".xz", ".zst", ".tar",
                     ".pdf", ".npy", ".pt", ".safetensors"}


def load_text(dataset: str, split: str | None = None) -> str:
    """The raw text of a shipped dataset split, or of a user's text file (UTF-8; a .jsonl file: the "text" field
    of every line's object). Files have no splits: split must be None for them."""
    if dataset in DATASETS:
        split = split or default_split(dataset, "eval")
        if split not in DATASETS[dataset]:
            raise DataError(f"dataset {dataset!r} has no split {split!r}; available: {sorted(DATASETS[dataset])}")
        raw = resources.files("spqr.datasets").joinpath(DATASETS[dataset][split]).read_text(encoding="utf-8")
        if dataset == "wikitext2":
            # Hugging Face rows are the file's lines, blank ones ("\n" in the file as " \n") being "".
            rows = ["" if line == " " else line + "\n" for line in raw.splitlines()]
            return "\n\n".join(rows)
        if dataset == "ptb":
            return " ".join(line.strip() for line in raw.splitlines())
        return " ".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
    path = Path(dataset)
    if not path.is_file():
        raise DataError(f"unknown dataset {dataset!r}: not one of {sorted(DATASETS)} and not an existing file")
    if split is not None:
        raise DataError(f"split {split!r} given for the file {path}: only the shipped datasets {sorted(DATASETS)} "
                        "have splits")
    suffix = path.suffix.lower()
    if suffix in NOT_TEXT_SUFFIXES:
        raise DataError(f"{path}: a {suffix} file is not supported; give plain UTF-8 text (e.g. .txt) or a .jsonl "
                        "file with one {\"text\": ...} object per line")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from e
    if suffix == ".jsonl":
        try:
            return "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: every line of a .jsonl file must be an object with a \"text\" field ({e})") from e
    return raw


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [n] (int64) of the whole text, tokenized once, without special tokens added."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids.to(torch.int64)


def is_integer_tensor(ids: object) -> bool:
    """A tensor that can hold token ids: any integer dtype (not bool, float or complex)."""
    return isinstance(ids, torch.Tensor) and not (ids.is_floating_point() or ids.is_complex()
                                                  or ids.dtype == torch.bool)


def describe(value: object) -> str:
    """What an argument that should have been token ids is, for error messages: "shape (2, 3) of torch.float32"
    or "a list"."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} of {value.dtype}"
    return f"a {type(value).__name__}"


def check_token_ids(ids: torch.Tensor, vocab: int | None, what: str) -> None:
    """Refuse ids outside [0, vocab) (vocab None: only negative ones), which would fail deep in a model's embedding,
    and ids on the meta device, which hold no values."""
    if ids.device.type == "meta":
        raise DataError(f"{what}: the token ids are on the meta device, which holds no values")
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise DataError(f"{what}: token ids must be in [0, {vocab}) for this model, got {low}..{high}")


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from the start of ids; the ragged tail is dropped."""
    if seqlen < 2 or (max_windows is not None and max_windows < 1):
        raise DataError(f"evaluation windows need seqlen >= 2 and max_windows >= 1, got {seqlen} and {max_windows}")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows [nsamples, seqlen] at uniformly random offsets, drawn from a seeded generator."""
    if ids.numel() < seqlen + 1:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than seqlen + 1 = {seqlen + 1}")
    if ids.numel() < nsamples * seqlen:
        log.warning("spqr: the calibration text has %d tokens, fewer than nsamples x seqlen = %d: the %d windows "
                    "overlap (drawn from %d possible start offsets)", ids.numel(), nsamples * seqlen, nsamples,
                    ids.numel() - seqlen)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
