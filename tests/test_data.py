"""spqr.data: shipped datasets, user files and token windows."""

from __future__ import annotations

import json

import pytest
import torch

from spqr.data import (
    DATASETS,
    DataError,
    calibration_windows,
    default_split,
    eval_windows,
    label,
    load_text,
    tokenize,
)
from tests.helpers import REPO

DATA = REPO / "spqr" / "datasets"


def test_wikitext2_rows_are_file_lines_joined_with_blank_lines():
    text = load_text("wikitext2", "test")
    lines = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # the file ends with a newline
    lines = lines[:-1]
    # Hugging Face rows: each line with its newline; blank lines (" " in the raw file) are empty rows
    rows = ["" if line.strip() == "" else line + "\n" for line in lines]
    assert text == "\n\n".join(rows)
    assert len(rows) == len(lines) == 4358
    assert " = Robert Boulter = \n" in text
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    # blank lines become empty rows: no space-only row (" \n") survives between the separators
    assert "\n \n" not in text
    assert text.count("\n\n\n\n\n") > 100  # heading, empty row, paragraph


def test_wikitext2_valid_is_the_default_calibration_split():
    assert default_split("wikitext2", "eval") == "test"
    assert default_split("wikitext2", "calibration") == "valid"
    assert default_split("c4", "eval") == "valid"
    valid = load_text("wikitext2", "valid")
    assert valid.count("\n\n") >= 3760 - 1
    assert load_text("wikitext2") == load_text("wikitext2", "test")


def test_ptb_and_c4():
    ptb = load_text("ptb", "valid")
    lines = (DATA / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8").splitlines()
    assert ptb == " ".join(line.strip() for line in lines)
    assert "\n" not in ptb
    c4 = load_text("c4", "valid")
    docs = [json.loads(line)["text"] for line in
            (DATA / "c4" / "c4_validation_sample.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert c4 == " ".join(docs)
    assert len(docs) == 1025


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset"):
        load_text("no-such-dataset")
    with pytest.raises(DataError, match="split"):
        load_text("c4", "test")
    assert set(DATASETS) == {"wikitext2", "ptb", "c4"}


def test_user_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello\nworld  ünïcode\n", encoding="utf-8")
    assert load_text(str(txt)) == "hello\nworld  ünïcode\n"
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two", "meta": 1}\n', encoding="utf-8")
    assert load_text(str(jl)) == "one\n\ntwo"
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="text"):
        load_text(str(bad))
    garbled = tmp_path / "d.jsonl"
    garbled.write_text("not json\n", encoding="utf-8")
    with pytest.raises(DataError):
        load_text(str(garbled))
    binary = tmp_path / "e.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError):
        load_text(str(binary))
    with pytest.raises(DataError):
        load_text(str(tmp_path))  # a directory is not a file


def test_eval_windows():
    ids = torch.arange(103)
    w = eval_windows(ids, 10)
    assert w.shape == (10, 10)
    assert torch.equal(w, torch.arange(100).view(10, 10))
    assert torch.equal(eval_windows(ids, 10, max_windows=3), torch.arange(30).view(3, 10))
    assert eval_windows(ids, 10, max_windows=50).shape == (10, 10)
    assert eval_windows(ids, 103).shape == (1, 103)
    with pytest.raises(DataError):
        eval_windows(ids, 104)
    for seqlen, max_windows in ((1, None), (0, None), (10, 0)):
        with pytest.raises(DataError, match="seqlen >= 2 and max_windows >= 1"):
            eval_windows(ids, seqlen, max_windows)


def test_calibration_windows():
    ids = torch.arange(1000) * 3
    a = calibration_windows(ids, 16, 20, seed=0)
    assert a.shape == (16, 20) and a.dtype == ids.dtype
    for row in a:  # contiguous slices of ids that never use the last token
        start = int(row[0]) // 3
        assert torch.equal(row, ids[start:start + 20])
        assert start + 20 <= 999
    assert torch.equal(a, calibration_windows(ids, 16, 20, seed=0))
    assert not torch.equal(a, calibration_windows(ids, 16, 20, seed=1))
    # just long enough: seqlen + 1 tokens
    assert torch.equal(calibration_windows(torch.arange(21), 3, 20, 5), torch.arange(20).expand(3, 20))
    with pytest.raises(DataError):
        calibration_windows(torch.arange(20), 3, 20, 0)


def test_calibration_windows_do_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    calibration_windows(torch.arange(500), 8, 10, seed=4)
    assert torch.equal(torch.rand(3), expected)


def test_tokenize(tokenizer):
    ids = tokenize(tokenizer, "Robert Boulter is an English film actor")
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert ids.tolist() == tokenizer("Robert Boulter is an English film actor", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "Robert Boulter is an English film actor"


def test_files_have_no_splits_and_structured_files_are_refused(tmp_path):
    """--split on a file was ignored (and the file labelled "/valid"); a .json array or an upper-case .JSONL was
    read as plain text, i.e. the model calibrated or evaluated on JSON syntax."""
    txt = tmp_path / "a.txt"
    txt.write_text("some text")
    assert default_split(str(txt), "eval") is None and default_split(str(txt), "calibration") is None
    assert label(str(txt), None) == str(txt) and label("wikitext2", "test") == "wikitext2/test"
    with pytest.raises(DataError, match="split 'test' given for the file .*only the shipped datasets"):
        load_text(str(txt), "test")
    upper = tmp_path / "b.JSONL"
    upper.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_text(str(upper)) == "one\n\ntwo"
    for name in ("c.json", "d.parquet", "e.CSV", "f.txt.gz"):
        (tmp_path / name).write_text('[{"text": "x"}]')
        with pytest.raises(DataError, match="file is not supported; give plain UTF-8 text"):
            load_text(str(tmp_path / name))


def test_calibration_text_shorter_than_the_windows_warns(caplog):
    ids = torch.arange(40)
    with caplog.at_level("WARNING"):
        calibration_windows(ids, nsamples=4, seqlen=8, seed=0)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        windows = calibration_windows(ids, nsamples=100, seqlen=8, seed=0)
    assert windows.shape == (100, 8)
    assert "40 tokens, fewer than nsamples x seqlen = 800: the 100 windows overlap" in caplog.text
