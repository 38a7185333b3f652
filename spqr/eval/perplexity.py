"""Perplexity with the GPTQ/SpQR protocol: non-overlapping windows, mean of per-window mean NLL."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spqr.config import ConfigError
from spqr.data import eval_windows


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """ppl = exp(mean over windows of the window's mean next-token NLL), windows of seqlen tokens.

    ids: the whole tokenized text [n] (int64). Each window is scored on its own (no context
    carried across windows), exactly as in the GPTQ/SpQR evaluation code.
    """
    if batch_size < 1:
        raise ConfigError(f"perplexity needs batch_size >= 1 windows per forward, got {batch_size}")
    windows = eval_windows(ids, seqlen, max_windows)
    start = time.perf_counter()
    nlls = []
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[i: i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits
        for window_logits, window in zip(logits, batch):
            nlls.append(float(F.cross_entropy(window_logits[:-1].float(), window[1:])))
    mean_nll = float(torch.tensor(nlls, dtype=torch.float64).mean())
    return PerplexityResult(math.exp(mean_nll), mean_nll, len(windows), seqlen, time.perf_counter() - start)
