"""spqr.eval.perplexity against a plain one-window-at-a-time loop."""

from __future__ import annotations

import math

import pytest
import torch

from spqr.config import ConfigError
from spqr.data import DataError
from spqr.eval.perplexity import perplexity
from tests.helpers import VOCAB, make_model, training_with_dropout


def _reference(model, ids, seqlen, max_windows=None):
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    nlls = []
    with torch.no_grad():
        for i in range(n):
            window = ids[i * seqlen:(i + 1) * seqlen]
            logits = model(window[None], use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            nll = -sum(logp[t, window[t + 1]].item() for t in range(seqlen - 1)) / (seqlen - 1)
            nlls.append(nll)
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


@pytest.mark.parametrize("batch_size,max_windows", [(1, None), (3, None), (8, 4), (2, 100)])
def test_perplexity_matches_plain_loop(batch_size, max_windows):
    model = make_model("llama")
    ids = torch.randint(0, VOCAB, (7 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, 16, max_windows=max_windows, batch_size=batch_size, progress=False)
    ppl, windows = _reference(model, ids, 16, max_windows)
    assert result.windows == windows == (min(7, max_windows) if max_windows else 7)
    assert result.seqlen == 16
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.mean_nll == pytest.approx(math.log(ppl), rel=1e-5)
    assert set(result.to_dict()) == {"ppl", "mean_nll", "windows", "seqlen", "seconds"}


def test_perplexity_of_a_perfect_predictor_is_one():
    class Copy(torch.nn.Module):
        """Predicts token t+1 = token t + 1 with certainty."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, use_cache=False):
            logits = torch.full((*ids.shape, 50), -1e4)
            logits.scatter_(2, ((ids + 1) % 50)[..., None], 0.0)
            return type("Out", (), {"logits": logits})()

    result = perplexity(Copy(), torch.arange(40) % 50, 10, progress=False)
    assert result.ppl == pytest.approx(1.0)


def test_too_short_text_raises():
    with pytest.raises(DataError):
        perplexity(make_model("llama"), torch.arange(10), 16, progress=False)


@pytest.mark.parametrize("batch_size", [0, -2, None, 2.5, True])
def test_batch_size_below_one_or_not_an_integer_is_refused(batch_size):
    """None and 2.5 failed in a comparison or a slice, True ran as 1."""
    with pytest.raises(ConfigError, match="batch_size >= 1"):
        perplexity(make_model("llama"), torch.arange(64) % VOCAB, 16, batch_size=batch_size, progress=False)


@pytest.mark.parametrize("seqlen,max_windows", [(16.0, None), (1, None), (16, 0), (16, 1.5)])
def test_seqlen_and_max_windows_must_be_integers_in_range(seqlen, max_windows):
    with pytest.raises(ConfigError, match="seqlen >= 2|max_windows >= 1"):
        perplexity(make_model("llama"), torch.arange(64) % VOCAB, seqlen, max_windows, progress=False)


def test_integer_scalars_of_numpy_are_integers():
    import numpy as np

    model, ids = make_model("llama"), torch.arange(64) % VOCAB
    expected = perplexity(model, ids, 16, 2, batch_size=2, progress=False).ppl
    assert perplexity(model, ids, np.int64(16), np.int32(2), batch_size=np.int64(2), progress=False).ppl == expected


def test_bad_evaluation_text_and_windows_are_refused():
    """Ids outside the vocabulary failed in torch.embedding, 2-D ids in a reshape; windows longer than the model's
    context were scored without a word."""
    model = make_model("llama")
    with pytest.raises(DataError, match=rf"token ids must be in \[0, {VOCAB}\)"):
        perplexity(model, torch.arange(64) + VOCAB - 10, 16, progress=False)
    for ids in (torch.zeros(4, 16, dtype=torch.long), torch.zeros(64), list(range(64))):
        with pytest.raises(DataError, match="1-D integer token ids"):
            perplexity(model, ids, 16, progress=False)
    context = model.config.max_position_embeddings
    with pytest.raises(ConfigError, match=f"seqlen {context + 1} exceeds the model's context of {context}"):
        perplexity(model, torch.arange(2 * context + 2) % VOCAB, context + 1, progress=False)


def test_an_overflowing_loss_gives_an_infinite_perplexity():
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e30)
    result = perplexity(model, torch.arange(64) % VOCAB, 16, progress=False)
    assert result.ppl == math.inf and result.mean_nll > 709


def test_a_model_left_in_training_mode_is_evaluated_without_dropout():
    """Two calls on a model in training mode gave 320.4 and 315.5 (dropout on); now both equal eval mode's, and
    the model stays in the mode it was in."""
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    model = make_model("llama")
    expected = perplexity(model, ids, 32, progress=False).ppl
    training_with_dropout(model)
    assert [perplexity(model, ids, 32, progress=False).ppl for _ in range(2)] == [expected, expected]
    assert model.training
