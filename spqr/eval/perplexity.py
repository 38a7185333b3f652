"""Perplexity with the GPTQ/SpQR protocol: non-overlapping windows, mean of per-window mean NLL."""

from __future__ import annotations

import logging
import math
import operator
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spqr.config import ConfigError
from spqr.data import DataError, check_token_ids, describe, eval_windows, is_integer_tensor
from spqr.nn import in_eval_mode

log = logging.getLogger(__name__)


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
@in_eval_mode
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """ppl = exp(mean over windows of the window's mean next-token NLL), windows of seqlen tokens.

    ids: the whole tokenized text [n] (int64). Each window is scored on its own (no context
    carried across windows), exactly as in the GPTQ/SpQR evaluation code.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("seqlen", seqlen, 2), ("max_windows", max_windows, 1)):
        if value is None and name == "max_windows":
            continue
        try:  # ints and integer scalars (numpy's), not floats or bools
            valid = not isinstance(value, bool) and operator.index(value) >= low
        except TypeError:
            valid = False
        if not valid:
            raise ConfigError(f"perplexity needs an integer {name} >= {low}, got {value!r}")
    if not is_integer_tensor(ids) or ids.dim() != 1:
        raise DataError(f"perplexity takes the tokenized text as 1-D integer token ids, got {describe(ids)}")
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        raise ConfigError(f"seqlen {seqlen} exceeds the model's context of {context} positions")
    check_token_ids(ids, getattr(config, "vocab_size", None), "the evaluation text")
    windows = eval_windows(ids.long(), seqlen, max_windows)
    start = time.perf_counter()
    nlls = []
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[i: i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits
        for window_logits, window in zip(logits, batch):
            nlls.append(float(F.cross_entropy(window_logits[:-1].float(), window[1:])))
    mean_nll = float(torch.tensor(nlls, dtype=torch.float64).mean())
    ppl = math.exp(mean_nll) if not mean_nll > 709 else math.inf  # exp overflows a float past ~709.78
    if math.isnan(mean_nll):
        log.warning("spqr: the model's loss is NaN on some windows (are its weights finite?): perplexity is NaN")
    return PerplexityResult(ppl, mean_nll, len(windows), seqlen, time.perf_counter() - start)
