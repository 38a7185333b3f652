"""Interrupted quantization runs resume from disk and give byte-identical checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import spqr.pipeline
import spqr.resume
from spqr.config import QuantConfig
from spqr.hf import save_quantized
from spqr.pipeline import quantize
from tests.helpers import make_model, model_config, random_windows

CONFIG = QuantConfig(wbits=3, outlier_threshold=0.1)


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _run(tmp_path: Path, name: str, progress_dir: Path | None, offload: bool = False) -> Path:
    model = make_model("llama")
    quantize(model, random_windows(6, 16), CONFIG, progress_dir=progress_dir, progress=False,
             batch_size=2, offload_activations=offload)
    out = tmp_path / name
    save_quantized(model, out, CONFIG.to_dict())
    return out


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    reference = _run(tmp_path, "reference", None)
    progress_dir = tmp_path / "progress"
    calls = []
    real = spqr.pipeline.quantize_weights

    def interrupt_in_block_1(weights, hessian, config):
        calls.append(len(calls))
        if len(calls) > 4:  # block 0 has 4 shared-input groups (qkv, o, gate/up, down)
            raise KeyboardInterrupt
        return real(weights, hessian, config)

    monkeypatch.setattr(spqr.pipeline, "quantize_weights", interrupt_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "interrupted", progress_dir)
    assert not (tmp_path / "interrupted").exists()
    assert (progress_dir / "block_0000.safetensors").is_file()

    calls.clear()
    monkeypatch.setattr(spqr.pipeline, "quantize_weights", lambda *a: (calls.append(1), real(*a))[1])
    resumed = _run(tmp_path, "resumed", progress_dir)
    assert len(calls) == 4  # only block 1 was quantized again
    assert _sha(resumed) == _sha(reference)


def test_offloaded_activations_give_the_same_checkpoint(tmp_path, monkeypatch):
    reference = _run(tmp_path, "reference", None)
    loads = []
    real_load = spqr.resume.OffloadedHidden.load
    monkeypatch.setattr(spqr.resume.OffloadedHidden, "load", lambda self: loads.append(self.path) or real_load(self))
    # without a progress directory: a temporary one, removed afterwards
    temporary = _run(tmp_path, "offloaded", None, offload=True)
    assert _sha(temporary) == _sha(reference)
    assert loads and not any(p.exists() for p in loads)
    # with one: interrupted in block 1, resumed with the activations read from there
    progress_dir = _interrupted_in_block_1(tmp_path, monkeypatch, offload=True)
    assert sorted(p.name for p in (progress_dir / "activations_0001").iterdir()) == [
        f"batch_0000{i}.safetensors" for i in range(3)]  # 6 windows in batches of 2
    loads.clear()
    resumed = _run(tmp_path, "resumed", progress_dir, offload=True)
    assert _sha(resumed) == _sha(reference)
    assert loads[0].parent.name == "activations_0001"


def test_run_interrupted_in_the_head_step_resumes_to_the_same_checkpoint(tmp_path, monkeypatch):
    def run(name: str, progress_dir: Path | None) -> Path:
        model = make_model("qwen2")  # tied head
        quantize(model, random_windows(6, 16), CONFIG, progress_dir=progress_dir, progress=False,
                 quantize_head=True)
        save_quantized(model, tmp_path / name, CONFIG.to_dict())
        return tmp_path / name

    reference = run("reference", None)
    real = spqr.pipeline.quantize_weights
    calls = []

    def interrupt_at_the_head(weights, hessian, config):
        calls.append(1)
        if len(calls) == 9:  # 2 blocks of 4 shared-input groups, then the head
            raise KeyboardInterrupt
        return real(weights, hessian, config)

    monkeypatch.setattr(spqr.pipeline, "quantize_weights", interrupt_at_the_head)
    progress_dir = tmp_path / "progress"
    with pytest.raises(KeyboardInterrupt):
        run("interrupted", progress_dir)
    calls.clear()
    monkeypatch.setattr(spqr.pipeline, "quantize_weights", lambda *a: (calls.append(1), real(*a))[1])
    assert isinstance(json.loads((progress_dir / "state.json").read_text())["blocks_return_tuples"], bool)
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    block_calls, block_forward = [], Qwen2DecoderLayer.forward
    monkeypatch.setattr(Qwen2DecoderLayer, "forward",
                        lambda *a, **k: (block_calls.append(1), block_forward(*a, **k))[1])
    resumed = run("resumed", progress_dir)
    assert len(calls) == 1 and not block_calls  # only the head; the blocks' return type was recorded
    assert _sha(resumed) == _sha(reference)
    calls.clear()
    again = run("again", progress_dir)
    assert _sha(again) == _sha(reference) and not calls  # everything read back
    assert json.loads((again / "config.json").read_text())["tie_word_embeddings"] is False


def test_progress_of_another_run_is_ignored(tmp_path):
    progress_dir = tmp_path / "progress"
    _run(tmp_path, "first", progress_dir)
    model = make_model("llama")
    other = QuantConfig(wbits=4)
    report = quantize(model, random_windows(6, 16), other, progress_dir=progress_dir, progress=False)
    assert len(report.layers) == 14
    fresh = make_model("llama")
    fresh_report = quantize(fresh, random_windows(6, 16), other, progress=False)
    assert [r.relative_error for r in report.layers] == [r.relative_error for r in fresh_report.layers]


def test_progress_written_in_another_format_version_is_ignored(tmp_path, monkeypatch):
    progress_dir = tmp_path / "progress"
    _run(tmp_path, "first", progress_dir)
    monkeypatch.setattr(spqr.pipeline, "FORMAT_VERSION", spqr.pipeline.FORMAT_VERSION + 1)
    original = spqr.pipeline.ProgressStore.next_block
    starts = []
    monkeypatch.setattr(spqr.pipeline.ProgressStore, "next_block",
                        lambda self: starts.append(original(self)) or starts[-1])
    _run(tmp_path, "second", progress_dir)
    assert starts == [0]


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tokenizer):
    """A tiny llama with 8 blocks, so that a kill often lands in the middle of the block loop."""
    from transformers import AutoModelForCausalLM

    config = model_config("llama")
    config.num_hidden_layers = 8
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("deep") / "llama8"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cli(model_dir: Path, out: Path, text_file: Path, offload: bool = False) -> list[str]:
    return [sys.executable, "-m", "spqr.cli", "quantize", str(model_dir), "-o", str(out), "--nsamples", "256",
            "--seqlen", "64", "--calib", str(text_file)] + (["--offload-activations"] if offload else [])


def _next_block(progress_dir: Path) -> int:
    try:
        return json.loads((progress_dir / "state.json").read_text())["next_block"]
    except (OSError, ValueError):
        return 0


def test_sigkill_at_random_points_then_resume_is_byte_identical(deep_model_dir, text_file, tmp_path):
    """Kill the CLI (SIGKILL) at random moments after it made progress, 4 times; the 5th run finishes.
    Runs alternate between activations in memory and offloaded to disk (both resume from either)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cli(deep_model_dir, reference, text_file), check=True, env=env, capture_output=True)
    out, progress_dir = tmp_path / "out", tmp_path / ".out.partial"
    rng = random.Random(0)
    seen = []
    for _ in range(4):
        before = _next_block(progress_dir)
        proc = subprocess.Popen(_cli(deep_model_dir, out, text_file, offload=len(seen) % 2 == 0), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while _next_block(progress_dir) == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))  # somewhere inside the next block
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.append(_next_block(progress_dir))
        assert not out.exists() or (out / "config.json").is_file()  # never a half-written checkpoint
    assert len(seen) >= 2 and seen == sorted(seen) and 0 < seen[0] and seen[-1] < 8, seen  # progress kept
    if not out.exists():
        subprocess.run(_cli(deep_model_dir, out, text_file), check=True, env=env, capture_output=True)
    assert _sha(out) == _sha(reference)
    assert not progress_dir.exists()


def test_ctrl_c_exits_cleanly_with_resume_instructions(deep_model_dir, text_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, progress_dir = tmp_path / "out", tmp_path / ".out.partial"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        # SIGINT at its default in the child, so that Python installs its Ctrl-C handler even when this test
        # runs as a background job (which inherits SIGINT ignored)
        proc = subprocess.Popen(_cli(deep_model_dir, out, text_file), env=env, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while _next_block(progress_dir) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    message = log.read_text()
    assert proc.returncode == 130, message[-2000:]
    assert "run the same command again to resume" in message and "Traceback" not in message
    assert 0 < _next_block(progress_dir) < 8 and not out.exists()


def _interrupted_in_block_1(tmp_path: Path, monkeypatch, offload: bool = False) -> Path:
    """The progress directory of a run interrupted in block 1 (block 0 and the activations entering 1 on disk)."""
    real = spqr.pipeline.quantize_weights
    calls = []

    def interrupt_in_block_1(weights, hessian, config):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real(weights, hessian, config)

    progress_dir = tmp_path / "progress"
    with monkeypatch.context() as patch:
        patch.setattr(spqr.pipeline, "quantize_weights", interrupt_in_block_1)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "interrupted", progress_dir, offload)
    return progress_dir


@pytest.mark.parametrize("damage,message", [
    ("delete one batch", r"activations_0001 holds 2 of the 3 batches"),
    ("delete the activations", r"activations_0001 holds 0 of the 3 batches"),
    ("truncate a batch", r"activations_0001/batch_00001.safetensors cannot be read"),
    ("flip a byte of the block", r"block_0000.safetensors differs from the file written"),
    ("delete the block", r"block_0000.safetensors is missing"),
])
@pytest.mark.parametrize("offload", [False, True])
def test_a_damaged_progress_directory_is_refused_not_resumed_from(tmp_path, monkeypatch, damage, message, offload):
    """A missing batch of activations made the resumed run calibrate on fewer samples (zip dropped the rest), none
    left blocks 2-3 unquantized, and a flipped byte in a finished block became a checkpoint with a valid sha256:
    all with exit 0. Now each is refused, naming the file."""
    progress_dir = _interrupted_in_block_1(tmp_path, monkeypatch, offload)
    activations, block = progress_dir / "activations_0001", progress_dir / "block_0000.safetensors"
    if damage == "delete one batch":
        (activations / "batch_00002.safetensors").unlink()
    elif damage == "delete the activations":
        for path in activations.iterdir():
            path.unlink()
        activations.rmdir()
    elif damage == "truncate a batch":
        os.truncate(activations / "batch_00001.safetensors", 1000)
    elif damage == "flip a byte of the block":
        data = bytearray(block.read_bytes())
        data[-5] ^= 0x55
        block.write_bytes(bytes(data))
    else:
        block.unlink()
    with pytest.raises(spqr.resume.ProgressError, match=f"{progress_dir} is damaged: {message}"):
        _run(tmp_path, "resumed", progress_dir, offload)


@pytest.mark.parametrize("state", ["[1, 2]", "{bad json", {"next_block": "x"}, {"next_block": 99}])
def test_an_unreadable_progress_state_starts_the_run_over(tmp_path, monkeypatch, caplog, state):
    """A state.json that parses to something else failed with AttributeError, ValueError or FileNotFoundError."""
    reference = _run(tmp_path, "reference", None)
    progress_dir = _interrupted_in_block_1(tmp_path, monkeypatch)
    path = progress_dir / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **state}) if isinstance(state, dict) else state)
    with caplog.at_level("WARNING"):
        assert _sha(_run(tmp_path, "again", progress_dir)) == _sha(reference)
    assert "starting over" in caplog.text


def test_weights_changed_in_memory_are_not_resumed_from(tmp_path, monkeypatch):
    """Models quantized from memory (GGUF, .bin) were fingerprinted by a sum per tensor: swapping two columns of a
    later block's Linear resumed with the old weights' blocks."""
    progress_dir = _interrupted_in_block_1(tmp_path, monkeypatch)

    def run(name: str, progress: Path | None) -> Path:
        model = make_model("llama")
        down = model.model.layers[1].mlp.down_proj.weight.data
        down[:, [0, 1]] = down[:, [1, 0]]
        quantize(model, random_windows(6, 16), CONFIG, progress_dir=progress, progress=False, batch_size=2)
        save_quantized(model, tmp_path / name, CONFIG.to_dict())
        return tmp_path / name

    starts = []
    original = spqr.pipeline.ProgressStore.next_block
    monkeypatch.setattr(spqr.pipeline.ProgressStore, "next_block",
                        lambda self: starts.append(original(self)) or starts[-1])
    assert _sha(run("edited", progress_dir)) == _sha(run("clean", None))
    assert starts == [0]
