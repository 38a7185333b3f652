"""spqr.cli end to end, in-process: quantize -> eval -> info on a tiny model directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from spqr.cli import main
from spqr.data import load_text, tokenize
from spqr.format.accounting import checkpoint_accounting
from spqr.hf import load_quantized
from spqr.nn import SpQRLinear


def _ref_ppl(model, ids, seqlen, windows):
    nlls = []
    with torch.no_grad():
        for i in range(windows):
            w = ids[i * seqlen:(i + 1) * seqlen]
            logp = torch.log_softmax(model(w[None], use_cache=False).logits[0].double(), -1)
            nlls.append(-logp[torch.arange(seqlen - 1), w[1:]].mean().item())
    return math.exp(sum(nlls) / len(nlls))


@pytest.fixture(scope="module")
def spqr_run(model_dirs, text_file, tmp_path_factory):
    """`spqr quantize` of the tiny llama with the default (spqr) method."""
    root = tmp_path_factory.mktemp("cli")
    out, j = root / "out", root / "q.json"
    grad = torch.is_grad_enabled()  # main() turns autograd off globally
    try:
        rc = main(["quantize", str(model_dirs["llama"]), "-o", str(out), "--nsamples", "4", "--seqlen", "32",
                   "--calib", str(text_file), "--json", str(j)])
    finally:
        torch.set_grad_enabled(grad)
    return rc, out, j, root


def test_quantize_eval_info(spqr_run, text_file, capsys):
    rc, out, j, root = spqr_run
    assert rc == 0
    summary = json.loads(j.read_text())
    acc = checkpoint_accounting(out)
    assert summary["accounting"]["avg_bits"] == pytest.approx(acc["avg_bits"])
    assert summary["avg_bits"] == pytest.approx(acc["avg_bits"])
    assert summary["method"] == "spqr"
    assert summary["config"]["wbits"] == 3 and summary["config"]["qq_bits"] == 3
    assert summary["calibration"]["nsamples"] == 4 and summary["calibration"]["seqlen"] == 32
    assert summary["calibration"]["dataset"] == str(text_file)
    assert len(summary["layers"]) == 14
    assert json.loads((out / "quantization_report.json").read_text())["avg_bits"] == summary["avg_bits"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "spqr" and qc["calibration"]["seed"] == 0

    j2 = root / "e.json"
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", str(text_file), "--seqlen", "32", "--max-windows", "2",
                 "--json", str(j2)]) == 0
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(j2.read_text())
    assert result["windows"] == 2 and result["seqlen"] == 32 and result["dataset"] == str(text_file)
    from transformers import AutoTokenizer

    model = load_quantized(out)
    ids = tokenize(AutoTokenizer.from_pretrained(out), load_text(str(text_file)))
    assert result["ppl"] == pytest.approx(_ref_ppl(model, ids, 32, 2), rel=1e-5)
    assert 1.0 < result["ppl"] < 10 * 300

    j3 = root / "i.json"
    assert main(["info", str(out), "--json", str(j3)]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "average bits" in printed
    info = json.loads(j3.read_text())
    assert info["avg_bits"] == pytest.approx(acc["avg_bits"])
    assert len(info["layers"]) == 14


def test_eval_of_the_original_model(model_dirs, text_file, tmp_path):
    j = tmp_path / "e.json"
    assert main(["eval", str(model_dirs["mistral"]), "--dataset", str(text_file), "--seqlen", "16",
                 "--max-windows", "3", "--batch-size", "2", "--json", str(j)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs["mistral"])
    ids = tokenize(AutoTokenizer.from_pretrained(model_dirs["mistral"]), load_text(str(text_file)))
    assert json.loads(j.read_text())["ppl"] == pytest.approx(_ref_ppl(model, ids, 16, 3), rel=1e-5)


def test_texts_are_checked_before_the_model_is_loaded_and_files_have_no_split(model_dirs, text_file, tmp_path,
                                                                            capsys, monkeypatch):
    """A bad --calib or --dataset file was found only after loading (and, for --eval, quantizing) the model; --split
    on a file was ignored and the file reported as FILE/valid."""
    import spqr.cli

    j = tmp_path / "e.json"
    assert main(["eval", str(model_dirs["llama"]), "--dataset", str(text_file), "--seqlen", "16", "--max-windows",
                 "1", "--json", str(j)]) == 0
    assert f"({text_file}, 1 windows" in capsys.readouterr().out and json.loads(j.read_text())["split"] is None

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the text was checked")

    monkeypatch.setattr(spqr.cli, "load_model", never)
    monkeypatch.setattr(spqr.cli, "load_model_lazy", never)
    (tmp_path / "data.json").write_text('[{"text": "x"}]')
    model = str(model_dirs["llama"])
    cases = [
        (["eval", model, "--dataset", str(text_file), "--split", "test"], "split 'test' given for the file"),
        (["eval", model, "--dataset", str(tmp_path / "missing.txt")], "not an existing file"),
        (["quantize", model, "-o", str(tmp_path / "o1"), "--calib", str(tmp_path / "data.json")], "not supported"),
        (["quantize", model, "-o", str(tmp_path / "o2"), "--calib", str(text_file), "--calib-split", "valid"],
         "a file has no splits"),
        (["quantize", model, "-o", str(tmp_path / "o3"), "--calib", "ptb", "--calib-split", "train"],
         "has no split 'train'"),
        (["quantize", model, "-o", str(tmp_path / "o4"), "--calib", str(text_file), "--eval", "--dataset",
          str(tmp_path / "data.json")], "not supported"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)


def test_a_nan_perplexity_is_an_error_with_the_json_written(text_file, tmp_path, tokenizer, capsys):
    """Finite weights whose activations overflow (a final norm of 3e38): 'perplexity nan' exited 0."""
    from tests.helpers import make_model

    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(3e38)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    j = tmp_path / "e.json"
    assert main(["eval", str(tmp_path / "m"), "--dataset", str(text_file), "--seqlen", "16", "--max-windows", "2",
                 "--json", str(j)]) == 2
    captured = capsys.readouterr()
    assert "perplexity nan" in captured.out and "error: the model's loss is NaN" in captured.err
    assert json.loads(j.read_text())["ppl"] is None


@pytest.mark.parametrize("method,extra", [("gptq", ["--beta1", "16"]), ("rtn", ["--wbits", "3"]),
                                          ("rtn", ["--wbits", "3", "--stats-dtype", "float32"])])
def test_baseline_methods(model_dirs, text_file, tmp_path, method, extra):
    out, j = tmp_path / "out", tmp_path / "q.json"
    rc = main(["quantize", str(model_dirs["qwen2"]), "-o", str(out), "--method", method, "--nsamples", "4",
               "--seqlen", "32", "--calib", str(text_file), "--json", str(j), *extra])
    assert rc == 0
    summary = json.loads(j.read_text())
    assert summary["method"] == method
    assert summary["config"]["qq_bits"] is None and summary["config"]["outlier_threshold"] is None
    assert summary["outlier_share"] == 0.0
    assert summary["config"]["stats_dtype"] == ("float32" if "--stats-dtype" in extra else "float16")
    if method == "rtn":
        assert summary["calibration"] is None and summary["config"]["wbits"] == 3
    else:
        assert summary["config"]["beta1"] == 16 and summary["config"]["wbits"] == 4
    assert main(["eval", str(out), "--dataset", str(text_file), "--seqlen", "32", "--max-windows", "1"]) == 0


def test_options_skip_head_offload_and_eval(model_dirs, text_file, tmp_path):
    out, j = tmp_path / "out", tmp_path / "q.json"
    rc = main(["quantize", str(model_dirs["mistral"]), "-o", str(out), "--nsamples", "3", "--seqlen", "16",
               "--calib", str(text_file), "--wbits", "4", "--beta1", "8", "--beta2", "8", "--qq-bits", "2",
               "--outlier-threshold", "0.05", "--perm", "identity", "--percdamp", "0.5", "--blocksize", "16",
               "--skip", "mlp.down_proj", "--forward-dtype", "bfloat16", "--eval", "--dataset", str(text_file),
               "--eval-seqlen", "16", "--head-wbits", "3", "--offload-activations",
               "--max-windows", "2", "--json", str(j)])
    assert rc == 0
    summary = json.loads(j.read_text())
    assert summary["config"] == {"wbits": 4, "beta1": 8, "beta2": 8, "qq_bits": 2, "outlier_threshold": 0.05,
                                 "perm": "identity", "percdamp": 0.5, "blocksize": 16, "error_feedback": True,
                                 "stats_dtype": "float16"}
    assert summary["eval"]["windows"] == 2 and summary["eval"]["ppl"] > 1
    assert summary["forward_dtype"] == "bfloat16"
    assert len(summary["layers"]) == 13 and summary["layers"][-1]["name"] == "lm_head"
    model = load_quantized(out)
    assert isinstance(model.lm_head, SpQRLinear) and model.lm_head.spec.wbits == 3
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, SpQRLinear)
    assert model.model.layers[0].mlp.up_proj.spec.qq_bits == 2
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in qc["modules_not_converted"]


def test_overwrite(spqr_run, model_dirs, text_file, capsys):
    _, out, _, root = spqr_run
    target = root / "again"
    args = ["quantize", str(model_dirs["llama"]), "-o", str(target), "--method", "rtn"]
    assert main(args) == 0
    before = (target / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (target / "model.safetensors").read_bytes() == before
    assert main([*args, "--wbits", "2", "--overwrite"]) == 0
    assert json.loads((target / "config.json").read_text())["quantization_config"]["wbits"] == 2
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_a_rerun_without_overwrite_keeps_an_interrupted_runs_progress(spqr_run, model_dirs, capsys):
    """It deleted the progress of an interrupted --overwrite run whenever the old checkpoint was there."""
    _, out, _, root = spqr_run
    progress = root / f".{out.name}.partial"
    progress.mkdir()
    (progress / "state.json").write_text("{}")
    assert main(["quantize", str(model_dirs["llama"]), "-o", str(out), "--method", "rtn"]) == 2
    assert f"progress is kept in {progress}: --overwrite resumes from it" in capsys.readouterr().err
    assert (progress / "state.json").is_file()
    shutil.rmtree(progress)


@pytest.mark.parametrize("when,what", [("quantizing", "Ctrl-C"), ("quantizing", "disk full"), ("saving", "Ctrl-C"),
                                       ("saving", "disk full"), ("after saving", "Ctrl-C")])
def test_interruptions_and_write_failures_say_what_was_kept(model_dirs, tmp_path, monkeypatch, capsys, when, what):
    """A full disk ended in an 8-frame OSError traceback; Ctrl-C while saving, or after (during --eval), said
    "nothing was written" while the blocks, or the whole checkpoint, were kept."""
    import spqr.cli
    import spqr.hf

    out = tmp_path / "out"
    raised = KeyboardInterrupt() if what == "Ctrl-C" else OSError(27, "File too large")
    target = {"quantizing": (spqr.cli, "quantize"), "saving": (spqr.hf, "write_weights"),
              "after saving": (spqr.cli, "checkpoint_accounting")}[when]

    def fail(*args, **kwargs):
        if when == "quantizing":  # as after some blocks
            (tmp_path / ".out.partial").mkdir()
            (tmp_path / ".out.partial" / "state.json").write_text("{}")
        raise raised

    monkeypatch.setattr(*target, fail)
    rc = main(["quantize", str(model_dirs["llama"]), "-o", str(out), "--method", "rtn"])
    err = capsys.readouterr().err
    messages = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "blocks:" not in line]
    assert "Traceback" not in err and len(messages) == 1, err  # (beside the progress bar)
    if when == "after saving":
        assert (out / "config.json").is_file()
        expected = (130, f"interrupted after {out} was saved (it is complete)")
    else:
        assert not out.exists()
        kept = "finished blocks are kept in" if when == "quantizing" else f"{out} was not written" if \
            what == "Ctrl-C" else f"saving {out} failed: [Errno 27] File too large"
        expected = (130 if what == "Ctrl-C" else 2, kept)
    assert rc == expected[0] and expected[1] in err, err


def test_ctrl_c_while_an_overwrite_swaps_the_directories_says_the_checkpoint_was_saved(model_dirs, tmp_path,
                                                                                      monkeypatch, capsys):
    """The signal is held until the new checkpoint is in place; the message said it was not written."""
    import os
    import signal

    out = tmp_path / "out"
    args = ["quantize", str(model_dirs["llama"]), "-o", str(out), "--method", "rtn", "--overwrite"]
    assert main(args) == 0
    real_replace = os.replace

    def replace(source, destination):
        real_replace(source, destination)
        if ".old-" in str(destination):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    assert main([*args, "--wbits", "2"]) == 130
    assert f"interrupted after {out} was saved (it is complete" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["wbits"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "out"]


@pytest.mark.parametrize("case", ["missing_model", "wbits", "qq_bits", "stats_dtype", "short_calib", "eval_missing",
                                  "info_not_checkpoint", "bad_dataset", "eval_seqlen", "eval_windows",
                                  "eval_batch", "quantize_eval_seqlen"])
def test_user_errors_exit_2(case, model_dirs, text_file, tmp_path, capsys):
    model = str(model_dirs["llama"])
    out = str(tmp_path / "out")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    argv, expected = {
        "missing_model": (["quantize", str(tmp_path / "nope"), "-o", out, "--method", "rtn"], "does not exist"),
        "wbits": (["quantize", model, "-o", out, "--wbits", "9"], "wbits"),
        "qq_bits": (["quantize", model, "-o", out, "--qq-bits", "1"], "qq_bits"),
        "stats_dtype": (["quantize", model, "-o", out, "--stats-dtype", "float32"], "stats_dtype"),
        "short_calib": (["quantize", model, "-o", out, "--calib", str(short), "--seqlen", "32", "--nsamples", "2"],
                        "tokens"),
        "eval_missing": (["eval", str(tmp_path / "nope"), "--dataset", str(text_file)], "does not exist"),
        "info_not_checkpoint": (["info", model], "spqr_packed"),
        "bad_dataset": (["eval", model, "--dataset", "no-such-set"], "unknown dataset"),
        "eval_seqlen": (["eval", model, "--dataset", str(text_file), "--seqlen", "1"], "--seqlen must be >= 2"),
        "eval_windows": (["eval", model, "--dataset", str(text_file), "--max-windows", "0"],
                         "--max-windows must be >= 1"),
        "eval_batch": (["eval", model, "--dataset", str(text_file), "--batch-size", "0"], "--batch-size must be >= 1"),
        "quantize_eval_seqlen": (["quantize", model, "-o", out, "--method", "rtn", "--eval", "--eval-seqlen", "0"],
                                 "--eval-seqlen must be >= 2"),
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"spqr {argv[0]}: error:" in err and expected in err, err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["short.txt"]


def test_malformed_qq_bits_is_a_usage_error(model_dirs, tmp_path, capsys):
    """`--qq-bits three` is a user mistake: exit code 2 with a message, not a Python traceback."""
    try:
        rc = main(["quantize", str(model_dirs["llama"]), "-o", str(tmp_path / "out"), "--qq-bits", "three"])
    except SystemExit as e:  # an argparse usage error is fine too
        rc = e.code
    assert rc == 2
    assert "qq" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["quantize", "x", "-o", "y", "--method", "awq"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_more_bad_inputs_exit_2(model_dirs, text_file, tmp_path, capsys, tokenizer):
    from tests.helpers import make_model

    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"\0" * 100)
    nan_dir = tmp_path / "nan-model"
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = math.nan
    model.save_pretrained(nan_dir)
    tokenizer.save_pretrained(nan_dir)
    cases = [
        (["quantize", str(not_a_model), "-o", str(tmp_path / "o1")], "not a .gguf"),
        (["quantize", str(tmp_path), "-o", str(tmp_path / "o2")], "config.json"),
        (["quantize", str(model_dirs["llama"]), "-o", str(tmp_path / "o3"), "--seqlen", "1000",
          "--calib", str(text_file)], "exceeds the model's maximum"),
        (["quantize", str(nan_dir), "-o", str(tmp_path / "o4"), "--nsamples", "2", "--seqlen", "16",
          "--calib", str(text_file)], "NaN"),
        (["quantize", str(model_dirs["llama"]), "-o", str(tmp_path / "o5"), "--outlier-threshold", "-1"],
         "outlier_threshold"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and expected in err, (argv, err)
        assert not Path(argv[argv.index("-o") + 1]).exists()


def test_output_paths_and_skips_that_cannot_work_are_refused_before_quantizing(model_dirs, text_file, tmp_path,
                                                                               capsys, monkeypatch):
    """Each was found out only after the whole model was quantized (or as a traceback), leaving .OUT.partial."""
    import spqr.pipeline

    def never(*args, **kwargs):
        raise AssertionError("quantized before the options were checked")

    monkeypatch.setattr(spqr.pipeline, "quantize_weights", never)
    monkeypatch.chdir(tmp_path)
    model = str(model_dirs["llama"])
    (tmp_path / "afile").write_text("")
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cases = [
        (["-o", "afile", "--overwrite"], "is a file; give a directory path"),
        (["-o", "afile/sub"], "afile is a file, so the directory cannot be made"),
        (["-o", ".", "--overwrite"], "is the current directory or one above it"),
        (["-o", model, "--overwrite"], "holds the input"),
        (["-o", "out", "--skip", *every_linear], "skip names every Linear of the decoder blocks"),
    ]
    for extra, expected in cases:
        argv = ["quantize", model, "--calib", str(text_file), "--nsamples", "2", "--seqlen", "16", *extra]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no .partial directories either
    assert (model_dirs["llama"] / "config.json").is_file()
