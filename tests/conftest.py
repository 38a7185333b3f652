"""Shared fixtures: tiny random causal LMs and a tiny byte-level BPE tokenizer, all built in code (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import ARCHS, VOCAB, WIKI_VALID, make_model, random_windows


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    """spqr.cli.main disables autograd globally; keep tests independent of each other."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """A few KB of wikitext-2 validation text (the tokenizer's training text)."""
    return WIKI_VALID.read_text(encoding="utf-8")[:6000]


@pytest.fixture(scope="session")
def tokenizer(corpus_text):
    """A byte-level BPE tokenizer with VOCAB entries, wrapped in transformers' fast tokenizer class."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 4, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus_text], trainer=trainer)
    assert 256 < tok.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Each tiny architecture saved with save_pretrained (model + tokenizer) in its own directory."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for a in ARCHS:
        d = root / a
        make_model(a).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[a] = d
    return dirs


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small user .txt file (calibration / evaluation text), disjoint from the tokenizer's training text."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(WIKI_VALID.read_text(encoding="utf-8")[6000:14000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def quantized_llama(tmp_path_factory, tokenizer):
    """(original model, quantized model, checkpoint directory) of the tiny llama with the SpQR recipe.

    Shared by several tests: do not modify the returned models or directory.
    """
    from spqr.config import QuantConfig
    from spqr.hf import save_quantized
    from spqr.pipeline import quantize

    original = make_model("llama")
    model = make_model("llama")
    config = QuantConfig(wbits=3, outlier_threshold=0.1)
    quantize(model, random_windows(8, 24), config, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "llama-spqr"
    save_quantized(model, out, config.to_dict(), tokenizer=tokenizer)
    return original, model, out
