"""spqr.format.io (atomic writes, checksums, config checks) and spqr.format.accounting (bit accounting)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import pytest
import torch

from spqr.format.accounting import checkpoint_accounting, paper_formula_bits, read_safetensors_header
from spqr.format.io import (
    CheckpointError,
    atomic_directory,
    check_output_dir,
    read_config,
    read_quantization_config,
    read_weights,
    save_safetensors,
    sha256_file,
    write_weights,
)
from spqr.format.layout import PackedLinear
from spqr.nn import SpQRLinear

# ----------------------------------------------------------------------------------------------- io


def test_atomic_directory_success(tmp_path):
    target = tmp_path / "sub" / "out"
    with atomic_directory(target) as tmp:
        assert tmp != target and tmp.parent == target.parent and tmp.name.startswith(".")
        (tmp / "a.txt").write_text("A")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "A"
    assert [p.name for p in target.parent.iterdir()] == ["out"]


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("A")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_existing_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists"):
        with atomic_directory(target):
            pass
    # a failed overwrite keeps the old content
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_replacement_a_killed_writer_left_half_done_is_finished(tmp_path):
    """A writer killed between moving the old checkpoint aside and putting the new one in place left out_dir
    missing, the old one in `.out.old-PID` and the new one (complete by then) in `.out.tmp-PID`; nothing cleaned
    them up or put either back."""
    target = tmp_path / "out"
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    old, new = tmp_path / f".out.old-{dead}", tmp_path / f".out.tmp-{dead}"
    for directory, text in ((old, "old"), (new, "new")):
        directory.mkdir()
        (directory / "a.txt").write_text(text)
    check_output_dir(target)  # (every writer checks its output first)
    assert (target / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    shutil.rmtree(target)
    old.mkdir()  # killed before the new one was complete: the previous one goes back
    (old / "a.txt").write_text("old")
    check_output_dir(target)
    assert (target / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    old.mkdir()  # left by a writer killed after the swap: out_dir is there, the old copy goes
    new.mkdir()
    with atomic_directory(target, overwrite=True) as fresh:
        (fresh / "a.txt").write_text("newest")
    assert (target / "a.txt").read_text() == "newest" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_ctrl_c_during_the_swap_is_held_until_it_is_done(tmp_path, monkeypatch):
    """SIGINT between the two renames left out_dir nowhere (the old checkpoint aside, the new one deleted)."""
    import signal

    target = tmp_path / "out"
    target.mkdir()
    real_replace = os.replace

    def replace(source, destination):  # the signal arrives right after the old checkpoint is moved aside
        real_replace(source, destination)
        if ".old-" in str(destination):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_and_read_weights_with_checksum(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.int32).view(2, 3), "b": torch.randn(4).half(),
               "c": torch.zeros(0, dtype=torch.int16)}
    sums = write_weights(tmp_path, tensors)
    path = tmp_path / "model.safetensors"
    assert sums == {"model.safetensors": hashlib.sha256(path.read_bytes()).hexdigest()} == \
           {"model.safetensors": sha256_file(path)}
    back = read_weights(tmp_path, sums)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with pytest.raises(CheckpointError, match="sha256"):
        read_weights(tmp_path, {"model.safetensors": "0" * 64})
    assert set(read_weights(tmp_path, None)) == set(tensors)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_weights(tmp_path, None)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_weights(tmp_path, None)


def test_write_weights_is_byte_deterministic(tmp_path):
    tensors = {"b": torch.arange(5, dtype=torch.int16), "a": torch.ones(2, 3)}
    digests = {write_weights(_fresh(tmp_path, i), tensors)["model.safetensors"] for i in range(8)}
    assert len(digests) == 1


def _fresh(root, i):
    d = root / f"d{i}"
    d.mkdir()
    return d


def test_save_safetensors_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "i64": torch.arange(5),
        "i32": torch.randint(-9, 9, (4, 3), generator=g, dtype=torch.int32),
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5), "strided": torch.randn(6, 4, generator=g).T,
    }
    path = tmp_path / "x.safetensors"
    digest = save_safetensors(tensors, path, metadata={"k": "v"})
    assert digest == sha256_file(path)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
    again = tmp_path / "y.safetensors"
    assert save_safetensors(dict(reversed(tensors.items())), again, metadata={"k": "v"}) == digest


def test_save_safetensors_refuses_unsupported_dtypes(tmp_path):
    with pytest.raises(TypeError, match="'c'.*complex"):
        save_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")


def test_read_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('[1, 2]')
    with pytest.raises(CheckpointError, match="is not a JSON object of settings"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert read_config(tmp_path) == {"a": 1}


@pytest.mark.parametrize("qc,message", [
    (None, "quant_method"),
    ({"quant_method": "spqr"}, "spqr_packed"),
    ({"quant_method": "spqr_packed"}, "format version"),
    ({"quant_method": "spqr_packed", "format_version": 999}, "999"),
    ({"quant_method": "spqr_packed", "format_version": "1"}, "format version"),
])
def test_read_quantization_config_rejects(qc, message):
    config = {} if qc is None else {"quantization_config": qc}
    with pytest.raises(CheckpointError, match=message):
        read_quantization_config(config, "somewhere")


def test_read_quantization_config_accepts_version_1():
    qc = {"quant_method": "spqr_packed", "format_version": 1, "wbits": 3}
    assert read_quantization_config({"quantization_config": qc}, "x") == qc


def test_read_safetensors_header(tmp_path):
    write_weights(tmp_path, {"x": torch.ones(3, 2)})
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    size, header = read_safetensors_header(path)
    assert size == 8 + n
    assert header["x"]["dtype"] == "F32" and header["x"]["shape"] == [3, 2]
    (tmp_path / "short").write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(tmp_path / "short")
    (tmp_path / "cut").write_bytes(raw[:8 + n // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(tmp_path / "cut")
    (tmp_path / "bad").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_safetensors_header(tmp_path / "bad")


# ----------------------------------------------------------------------------------------------- accounting

DTYPE_BITS = {"F32": 32, "F16": 16, "BF16": 16, "I32": 32, "I16": 16, "I64": 64, "U8": 8, "I8": 8, "BOOL": 8}


def _parse(path):
    """(header length incl. prefix, {name: (dtype, shape, data offsets)}) read by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return 8 + n, header


def test_accounting_matches_the_file_and_the_layers(quantized_llama):
    original, model, ckpt = quantized_llama
    acc = checkpoint_accounting(ckpt)
    path = ckpt / "model.safetensors"
    header_len, header = _parse(path)
    tensor_bytes = 0
    for info in header.values():
        begin, end = info["data_offsets"]
        n = 1
        for s in info["shape"]:
            n *= s
        assert end - begin == n * DTYPE_BITS[info["dtype"]] // 8
        tensor_bytes += end - begin
    assert header_len + tensor_bytes == os.path.getsize(path)
    assert (acc["header_bytes"], acc["tensor_bytes"], acc["file_bytes"]) == \
           (header_len, tensor_bytes, os.path.getsize(path))

    layers = {layer["name"]: layer for layer in acc["layers"]}
    spqr_layers = {n: m for n, m in model.named_modules() if isinstance(m, SpQRLinear)}
    assert set(layers) == set(spqr_layers) and len(layers) == 14
    total_bits = total_weights = total_outliers = 0
    for name, m in spqr_layers.items():
        bits = PackedLinear(m.spec, m.packed_tensors()).stored_bits()
        weights = m.in_features * m.out_features
        assert layers[name]["bits"] == bits
        assert layers[name]["avg_bits"] == pytest.approx(bits / weights)
        assert layers[name]["outliers"] == m.outlier_val.numel()
        assert sum(layers[name]["parts_bits"].values()) == bits
        assert "bias" not in layers[name]["parts_bits"]
        total_bits += bits
        total_weights += weights
        total_outliers += m.outlier_val.numel()
    assert acc["quantized_weights"] == total_weights
    assert acc["avg_bits"] == pytest.approx(total_bits / total_weights)
    assert acc["outliers"] == total_outliers > 0
    assert acc["outlier_share"] == pytest.approx(total_outliers / total_weights)
    assert sum(acc["avg_bits_by_part"].values()) == pytest.approx(acc["avg_bits"])
    assert acc["model_parameters"] == sum(p.numel() for p in original.parameters())
    assert acc["file_bits_per_parameter"] == pytest.approx(os.path.getsize(path) * 8 / acc["model_parameters"])
    assert acc["paper_formula_bits"] == pytest.approx(paper_formula_bits(3, 16, 16, 3, acc["outlier_share"]))
    # padding to 32-code words, the permutation and the CSR row pointers come on top of the formula
    assert acc["avg_bits"] > acc["paper_formula_bits"] - 32 * acc["outlier_share"] > 3


def test_accounting_rejects_inconsistent_files(quantized_llama, tmp_path):
    import shutil

    dst = tmp_path / "c"
    shutil.copytree(quantized_llama[2], dst)
    with open(dst / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="file size"):
        checkpoint_accounting(dst)


def _edit_quantization_config(directory, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config["quantization_config"])
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "truncated or not a safetensors file"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda d: _edit_quantization_config(d, lambda qc: qc.update(modules=[1, 2])), "no 'modules' table"),
    (lambda d: _edit_quantization_config(d, lambda qc: qc.update(modules={})), "no 'modules' table"),
    (lambda d: _edit_quantization_config(d, lambda qc: next(iter(qc["modules"].values())).pop("in_features")),
     "entry for module .* is invalid: .*in_features"),
    (lambda d: _edit_quantization_config(d, lambda qc: next(iter(qc["modules"].values())).update(in_features=0)),
     "entry for module .* is invalid: .*in_features"),
    (lambda d: _edit_quantization_config(d, lambda qc: next(iter(qc["modules"].values())).update(beta1=0)),
     "entry for module .* is invalid: .*beta1"),
    (lambda d: _edit_quantization_config(d, lambda qc: next(iter(qc["modules"].values())).update(in_features=-64)),
     "entry for module .* is invalid: .*in_features"),
    (lambda d: _edit_quantization_config(d, lambda qc: next(iter(qc["modules"].values())).update(in_features=128)),
     r"qweight has shape .* the layer's spec implies"),
    (lambda d: _edit_quantization_config(d, lambda qc: qc["modules"].update({"model.nope": next(
        iter(qc["modules"].values()))})), r"tensor model\.nope\.qweight is missing"),
])
def test_accounting_names_damaged_checkpoints(quantized_llama, tmp_path, damage, message):
    """spqr info met these with a MemoryError (garbage read as a header length), FileNotFoundError, AttributeError,
    KeyError or ZeroDivisionError, or printed wrong numbers (a negative or unknown layer, no layers at all)."""
    import shutil

    dst = tmp_path / "c"
    shutil.copytree(quantized_llama[2], dst)
    damage(dst)
    with pytest.raises(CheckpointError, match=message):
        checkpoint_accounting(dst)


@pytest.mark.parametrize("wbits,beta1,beta2,qq,share", [(3, 16, 16, 3, 0.0), (4, 128, 16, None, 0.0),
                                                        (2, 8, 32, 4, 0.01)])
def test_paper_formula(wbits, beta1, beta2, qq, share):
    if qq is None:
        expected = wbits + 32 / beta1 + 32 * share  # fp16 scale and zero per group
    else:
        expected = wbits + 2 * qq / beta1 + 2 * 32 / (beta1 * beta2) + 32 * share
    assert paper_formula_bits(wbits, beta1, beta2, qq, share) == pytest.approx(expected)


def test_accounting_excludes_biases_but_counts_them_as_parameters(tmp_path):
    from spqr.config import QuantConfig
    from spqr.hf import save_quantized
    from spqr.pipeline import quantize
    from tests.helpers import make_model, random_windows

    original = make_model("qwen2")
    model = make_model("qwen2")
    config = QuantConfig(outlier_threshold=0.1)
    quantize(model, random_windows(4, 16), config, progress=False)
    save_quantized(model, tmp_path / "q", config.to_dict())
    acc = checkpoint_accounting(tmp_path / "q")
    with_bias = 0
    for layer in acc["layers"]:
        m = model.get_submodule(layer["name"])
        assert layer["bits"] == PackedLinear(m.spec, m.packed_tensors()).stored_bits()
        assert "bias" not in layer["parts_bits"]
        with_bias += m.bias is not None
    assert with_bias == 6
    # tied lm_head is stored once and counted once
    assert acc["model_parameters"] == sum(p.numel() for p in original.parameters())


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    import subprocess

    from spqr.format.io import atomic_directory

    dead = subprocess.Popen(["true"])  # a process that has exited: its pid is free
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("done")
    assert not stale.exists()
    assert (tmp_path / "out" / "x").read_text() == "done"


def test_deferred_interrupt_holds_ctrl_c_until_the_block_ends():
    import os
    import signal

    from spqr.format.io import deferred_interrupt

    reached_end = False
    # Python's own Ctrl-C handler, as in a terminal (a job started in the background inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupt():
                os.kill(os.getpid(), signal.SIGINT)  # delivered now, inside the block
                reached_end = True
        assert reached_end and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with deferred_interrupt():  # nothing pending: nothing raised
            pass
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_the_paper_formula_takes_each_layers_own_recipe(tmp_path):
    """A head quantized with --head-wbits 5 was counted at the blocks' 3 bits."""
    import dataclasses

    from spqr.config import QuantConfig
    from spqr.hf import save_quantized
    from spqr.pipeline import quantize
    from tests.helpers import make_model, random_windows

    config = QuantConfig(wbits=3, outlier_threshold=0.1)
    model = make_model("llama")
    quantize(model, random_windows(6, 16), config, quantize_head=dataclasses.replace(config, wbits=5), progress=False)
    save_quantized(model, tmp_path / "q", config.to_dict())
    acc = checkpoint_accounting(tmp_path / "q")
    expected = sum((5 if layer["name"] == "lm_head" else 3) * layer["out_features"] * layer["in_features"]
                   + 32 * layer["outliers"] for layer in acc["layers"]) / acc["quantized_weights"]
    assert acc["paper_formula_bits"] == pytest.approx(expected + 2 * 3 / 16 + 64 / 256)
    assert any(layer["name"] == "lm_head" for layer in acc["layers"])


def test_modules_metadata_and_shard_indexes_that_are_not_what_they_claim(tmp_path):
    from spqr.format.io import check_modules_metadata, weight_files

    table = {"a.b": {"wbits": 3}}
    check_modules_metadata(None, table, "f")  # a file without the table (transformers' save_pretrained): unchecked
    check_modules_metadata({"spqr_modules": json.dumps(table)}, table, "f")
    for stored, message in (("[1, 2]", "not a table of modules"), ("{", "is not JSON"),
                            (json.dumps({"a.b": {"wbits": 4}}), r"module a.b wbits 3 \(the weights file: 4\)"),
                            (json.dumps({}), "module a.b is not in the weights file")):
        with pytest.raises(ValueError, match=message):
            check_modules_metadata({"spqr_modules": stored}, table, "f")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    assert weight_files(tmp_path) == [tmp_path / "a.safetensors"]
    for shard in ("..", "", "../a.safetensors", "a.bin"):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
        with pytest.raises(CheckpointError, match="names shards that are not safetensors files in its directory"):
            weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="cannot be read as a shard index"):
        weight_files(tmp_path)
