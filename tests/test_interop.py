"""Export to / import from the authors' spqr_quant format, checked with a decoder written from its definition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spqr.cli import main
from spqr.config import QuantConfig, preset
from spqr.format.io import CheckpointError, read_weights
from spqr.format.spqr_quant import ConversionError, export_layer, import_layer
from spqr.format.synthetic import random_packed_layer
from spqr.hf import load_quantized, save_quantized
from spqr.interop import export_spqr_quant, import_spqr_quant
from spqr.nn import SpQRLinear
from spqr.pipeline import quantize


def decode_spqr_quant(t: dict[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """W [rows, cols] (original column order) from the four tensors, following the format's definition
    word by word: bits 0-2 scale code, 3-5 zero code, 6+3i code of column i, 54-61 byte k//2 of the tile's
    second-level word (fp16 scale_scale | zero_scale | scale_zero | zero_zero); fp32 arithmetic."""
    f32, f16 = np.float32, lambda bits: np.array([bits], dtype=np.uint16).view(np.float16)[0].astype(np.float32)
    dense = [int(v) & (2**64 - 1) for v in t["dense_weights"].tolist()]
    w = np.zeros((rows, cols), dtype=np.float32)
    tiles_n = cols // 16
    for ti in range(rows // 16):
        for tj in range(tiles_n):
            tile = dense[(ti * tiles_n + tj) * 16:(ti * tiles_n + tj + 1) * 16]
            second = sum(((tile[2 * f] >> 54) & 0xFF) << (8 * f) for f in range(8))
            assert all((tile[2 * f + 1] >> 54) & 0xFF == (tile[2 * f] >> 54) & 0xFF for f in range(8))
            assert all(word >> 62 == 0 for word in tile)
            ss, zs = f16(second & 0xFFFF), f16((second >> 16) & 0xFFFF)
            sz, zz = f16((second >> 32) & 0xFFFF), f16((second >> 48) & 0xFFFF)
            for k, word in enumerate(tile):
                scale = (f32(word & 7) - sz) * ss
                zero = (f32((word >> 3) & 7) - zz) * zs
                for i in range(16):
                    w[ti * 16 + k, tj * 16 + i] = (f32((word >> (6 + 3 * i)) & 7) - zero) * scale
    offsets = t["row_offsets"].tolist()
    for r in range(rows):
        for p in range(offsets[r], offsets[r + 1]):
            cv = int(t["col_vals"][p]) & 0xFFFFFFFF
            w[r, cv & 0xFFFF] += f16(cv >> 16)
    perm = [(int(v) & 0xFFFFFFFF) >> s & 0xFFFF for v in t["in_perm"].tolist() for s in (0, 16)]
    out = np.zeros_like(w)
    out[:, perm] = w
    return torch.from_numpy(out)


@pytest.mark.parametrize("perm,share", [(True, 0.02), (False, 0.0), (True, 1.0)])
def test_layer_export_matches_the_definition_and_imports_back(perm, share):
    layer = random_packed_layer(48, 64, 3, 16, 16, 3, share, perm=perm, seed=1)
    exported = export_layer(layer)
    assert exported["dense_weights"].dtype == torch.int64 and exported["dense_weights"].numel() == 3 * 4 * 16
    assert exported["in_perm"].dtype == torch.int32 and exported["in_perm"].numel() == 32
    assert torch.equal(decode_spqr_quant(exported, 48, 64), layer.dequantize())
    back = import_layer(exported, 48, 64)
    assert torch.equal(back.dequantize(), layer.dequantize())
    assert torch.equal(export_layer(back)["dense_weights"], exported["dense_weights"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(wbits=4), "wbits=4"), (dict(beta1=32), "beta1=32"), (dict(qq_bits=None), "qq_bits=None"),
    (dict(out_features=40), "not a multiple of 16"), (dict(bias=True), "bias")])
def test_unexportable_layers_are_named(kwargs, message):
    args = dict(out_features=48, in_features=64, wbits=3, beta1=16, beta2=16, qq_bits=3) | kwargs
    with pytest.raises(ConversionError, match=message):
        export_layer(random_packed_layer(**args), "model.layers.0.mlp.up_proj")


def test_import_refuses_malformed_tensors():
    exported = export_layer(random_packed_layer(32, 32, 3, 16, 16, 3, 0.02, seed=2))
    with pytest.raises(ConversionError, match="dense_weights"):
        import_layer({**exported, "dense_weights": exported["dense_weights"][:-1]}, 32, 32, "q")
    with pytest.raises(ConversionError, match="in_perm"):
        import_layer({**exported, "in_perm": exported["in_perm"].long()}, 32, 32, "q")


def _quantized_tiny_llama(path, tied: bool, tokenizer=None, **quantize_options):
    """Save, quantized with the SpQR recipe, a tiny llama whose every Linear is a multiple of 16."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config).eval()
    recipe = QuantConfig(outlier_threshold=0.1)
    quantize(model, torch.randint(0, 256, (4, 32)), recipe, progress=False, **quantize_options)
    return save_quantized(model, path, recipe.to_dict(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def exportable_checkpoint(tmp_path_factory, tokenizer):
    return _quantized_tiny_llama(tmp_path_factory.mktemp("interop") / "ours", tied=False, tokenizer=tokenizer)


def test_checkpoint_round_trip(exportable_checkpoint, tmp_path):
    authors = export_spqr_quant(exportable_checkpoint, tmp_path / "authors")
    qc = json.loads((authors / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["beta1"], qc["beta2"]) == ("spqr", 3, 16, 16)
    assert qc["modules_to_not_convert"] == ["lm_head"]
    tensors = read_weights(authors, None)
    ours = load_quantized(exportable_checkpoint)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, SpQRLinear)}
    for name, layer in layers.items():
        parts = {k: tensors[f"{name}.{k}"] for k in ("dense_weights", "row_offsets", "col_vals", "in_perm")}
        assert all(qc["shapes"][f"{name}.{k}.shape"] == v.numel() for k, v in parts.items())
        assert torch.equal(decode_spqr_quant(parts, layer.out_features, layer.in_features), layer.dequantize())
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16  # transformers' SpQR loads fp16 models
    back = load_quantized(import_spqr_quant(authors, tmp_path / "back"))
    assert back.generation_config.eos_token_id == ours.generation_config.eos_token_id  # end-of-turn ids kept
    for name, layer in layers.items():
        assert torch.equal(back.get_submodule(name).dequantize(), layer.dequantize()), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # the unquantized parts went through fp16
        assert torch.allclose(back(ids).logits.float(), ours(ids).logits, atol=1e-2)


def test_cli_export_and_import(exportable_checkpoint, quantized_llama, tmp_path, capsys):
    assert main(["export", str(exportable_checkpoint), "-o", str(tmp_path / "a")]) == 0
    assert main(["import", str(tmp_path / "a"), "-o", str(tmp_path / "b")]) == 0
    assert main(["export", str(quantized_llama[2]), "-o", str(tmp_path / "c")]) == 2  # 24-row k/v projections
    assert "not a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["import", str(exportable_checkpoint), "-o", str(tmp_path / "d")]) == 2  # not spqr_quant
    assert main(["export", str(exportable_checkpoint), "-o", str(tmp_path / "a")]) == 2  # exists


def test_gptq_recipe_is_refused(tmp_path, tokenizer):
    from tests.helpers import make_model, random_windows

    model = make_model("llama")
    quantize(model, random_windows(2, 16), preset("rtn"), progress=False)
    save_quantized(model, tmp_path / "rtn", preset("rtn").to_dict())
    with pytest.raises(ConversionError, match="wbits=4"):
        export_spqr_quant(tmp_path / "rtn", tmp_path / "out")


def test_embeddings_read_from_the_head_are_refused(tmp_path):
    _quantized_tiny_llama(tmp_path / "ours", tied=True, quantize_embeddings=True)
    with pytest.raises(ConversionError, match="model.embed_tokens: embeddings read from the quantized head"):
        export_spqr_quant(tmp_path / "ours", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_paths_that_would_delete_the_input_are_refused(exportable_checkpoint, tmp_path, capsys, monkeypatch):
    """`spqr export CK -o CK --overwrite` replaced the input; `-o` the directory holding it deleted it and its
    neighbours; `-o .` failed with an OSError traceback."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(exportable_checkpoint, work / "ours")
    assert main(["export", str(work / "ours"), "-o", str(work / "theirs")]) == 0
    monkeypatch.chdir(work)
    cases = [
        (["export", "ours", "-o", "ours", "--overwrite"], "holds the input"),
        (["export", "ours", "-o", str(work), "--overwrite"], "is the current directory or one above it"),
        (["export", "ours", "-o", ".", "--overwrite"], "is the current directory or one above it"),
        (["import", "theirs", "-o", "theirs", "--overwrite"], "holds the input"),
        (["import", "theirs", "-o", "..", "--overwrite"], "is the current directory or one above it"),
        (["import", "theirs", "-o", "theirs/config.json/x"], "is a file, so the directory cannot be made"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (argv, err)
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(work / "ours"), "-o", str(work), "--overwrite"]) == 2  # would delete it and theirs
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["ours", "theirs"]
    assert load_quantized(work / "ours") is not None


def _damage(directory, edit) -> None:
    from spqr.format.io import write_weights

    tensors = read_weights(directory, None)
    edit(tensors)
    write_weights(directory, tensors)


@pytest.mark.parametrize("damage,message", [
    (lambda t: t["model.layers.0.mlp.up_proj.col_vals"].__ior__(0xFFFF), "model.layers.0.mlp.up_proj: outlier_col"),
    (lambda t: t["model.layers.0.mlp.up_proj.in_perm"].zero_(), "model.layers.0.mlp.up_proj: perm is not"),
    (lambda t: t.pop("model.norm.weight"), r"tensors missing from the checkpoint: \['model\.norm\.weight'\]"),
    (lambda t: t.update({"model.embed_tokens.weight": torch.zeros(10, 64, dtype=torch.float16)}),
     "do not fit the model described by config.json"),
    (lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}), "are not floating point"),
    (lambda t: t["model.norm.weight"].fill_(float("nan")), r"weights contain NaN or Inf: model\.norm\.weight"),
])
def test_import_names_damaged_checkpoints(exportable_checkpoint, tmp_path, damage, message):
    """Each was a traceback from deep inside (or, NaN weights, a checkpoint that then failed to load)."""
    authors = export_spqr_quant(exportable_checkpoint, tmp_path / "authors")
    _damage(authors, damage)
    with pytest.raises(CheckpointError, match=message):
        import_spqr_quant(authors, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_import_names_a_bad_config_or_tokenizer(exportable_checkpoint, tmp_path):
    authors = export_spqr_quant(exportable_checkpoint, tmp_path / "authors")
    (authors / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="cannot load its tokenizer"):
        import_spqr_quant(authors, tmp_path / "back")
    config = json.loads((authors / "config.json").read_text())
    (authors / "config.json").write_text(json.dumps({**config, "model_type": "bogus"}))
    with pytest.raises(CheckpointError, match="does not describe a model transformers can build"):
        import_spqr_quant(authors, tmp_path / "back")


def test_export_refusals_are_one_line(tmp_path):
    from tests.helpers import make_model, random_windows

    model = make_model("llama")
    quantize(model, random_windows(2, 16), preset("rtn"), progress=False)
    save_quantized(model, tmp_path / "rtn", preset("rtn").to_dict())
    with pytest.raises(ConversionError) as info:
        export_spqr_quant(tmp_path / "rtn", tmp_path / "out")
    assert "\n" not in str(info.value) and str(info.value).startswith("14 layers cannot be exported")
    assert "and 11 more" in str(info.value)


def test_export_refuses_weights_past_the_range_of_float16(exportable_checkpoint, tmp_path):
    """They became inf in the fp16 export (and in load_quantized(dtype=float16)) without a word."""
    import shutil

    from spqr.format.io import write_weights

    shutil.copytree(exportable_checkpoint, tmp_path / "ours")
    tensors = read_weights(tmp_path / "ours", None)
    tensors["model.norm.weight"][0] = 1e6
    checksums = write_weights(tmp_path / "ours", tensors)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    config["quantization_config"]["checksums"] = checksums
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    assert load_quantized(tmp_path / "ours") is not None  # fine in its stored fp32
    with pytest.raises(CheckpointError, match=r"past the range of torch\.float16 .*model\.norm\.weight"):
        export_spqr_quant(tmp_path / "ours", tmp_path / "out")
