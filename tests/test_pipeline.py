"""spqr.pipeline.quantize on tiny llama / qwen2 / mistral models built in code."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from spqr.algo.engine import quantize_weights
from spqr.config import CalibrationConfig, ConfigError, QuantConfig, preset
from spqr.data import DataError, calibration_windows, load_text, tokenize
from spqr.format.layout import PackedLinear
from spqr.hf import ModelLoadError, find_decoder_blocks
from spqr.nn import SpQRLinear
from spqr.pipeline import QuantizationError, calibration_data, quantize
from tests.helpers import (
    VOCAB,
    decoder_linear_names,
    make_model,
    random_windows,
    ref_rtn,
    relative_error,
    training_with_dropout,
)

SPQR4 = QuantConfig(wbits=4, outlier_threshold=0.1)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _dense_copy(arch, quantized):
    """The original model with every SpQRLinear's decoded weight put into a plain nn.Linear."""
    dense = make_model(arch)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, SpQRLinear):
                dense.get_submodule(name).weight.copy_(m.dequantize())
    return dense


def test_quantize_replaces_every_block_linear_and_nothing_else(arch):
    original = make_model(arch)
    model = make_model(arch)
    names = decoder_linear_names(original)
    assert len(names) == 14
    report = quantize(model, random_windows(8, 16), SPQR4, progress=False)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, SpQRLinear), name
        ref = original.get_submodule(name)
        assert (layer.out_features, layer.in_features) == (ref.out_features, ref.in_features)
        if ref.bias is not None:
            assert torch.equal(layer.bias, ref.bias)
        else:
            assert layer.bias is None
    assert [r.name for r in report.layers] and sorted(r.name for r in report.layers) == sorted(names)
    # everything outside the decoder-block Linears is untouched
    q_params = dict(model.named_parameters())
    for name, p in original.named_parameters():
        if any(name.startswith(n + ".") for n in names):
            continue
        assert torch.equal(q_params[name], p), name
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, SpQRLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    # the report agrees with the stored layers
    for r in report.layers:
        layer = model.get_submodule(r.name)
        bits = PackedLinear(layer.spec, layer.packed_tensors()).stored_bits()
        assert r.avg_bits == pytest.approx(bits / (r.out_features * r.in_features))
        assert r.outliers == layer.outlier_val.numel()
        assert 0 <= r.relative_error < 0.1
    total_bits = sum(PackedLinear(model.get_submodule(r.name).spec, model.get_submodule(r.name).packed_tensors())
                     .stored_bits() for r in report.layers)
    assert report.avg_bits == pytest.approx(total_bits / report.quantized_weights)
    assert report.quantized_weights == sum(original.get_submodule(n).weight.numel() for n in names)
    assert report.seconds_total >= report.seconds_engine > 0


def test_quantized_logits_close_to_original_and_equal_to_dense_decoding(arch):
    original = make_model(arch)
    ids = random_windows(2, 20, seed=99)
    ref = _logits(original, ids)
    errors = {}
    for label, config in (("spqr4", SPQR4), ("gptq8", preset("gptq", wbits=8, beta1=16))):
        model = make_model(arch)
        quantize(model, random_windows(8, 16), config, progress=False)
        out = _logits(model, ids)
        assert torch.allclose(out, _logits(_dense_copy(arch, model), ids), atol=1e-5)
        errors[label] = relative_error(out, ref)
    assert errors["spqr4"] < 0.15, errors
    assert errors["gptq8"] < 0.02, errors
    assert errors["gptq8"] < errors["spqr4"]


def test_shared_inputs_share_one_hessian_and_one_permutation():
    model = make_model("llama")
    quantize(model, random_windows(8, 16), QuantConfig(), progress=False)
    for i in range(2):
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        assert torch.equal(attn.q_proj.perm, attn.k_proj.perm) and torch.equal(attn.q_proj.perm, attn.v_proj.perm)
        assert torch.equal(mlp.gate_proj.perm, mlp.up_proj.perm)
        assert not torch.equal(attn.q_proj.perm, attn.o_proj.perm)


def _block_input_hessian(model, block_index: int, linear: str, windows: torch.Tensor) -> torch.Tensor:
    """H = 2XᵀX/n of the input of one Linear, from a plain forward pass of the whole model."""
    xs = []
    handle = model.model.layers[block_index].get_submodule(linear).register_forward_hook(
        lambda m, args, out: xs.append(args[0].detach()))
    with torch.no_grad():
        model(windows, use_cache=False)
    handle.remove()
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).float()
    return flat.T @ flat * (2.0 / flat.shape[0])


def test_blocks_are_quantized_sequentially_on_quantized_inputs():
    """Block 0 sees the original activations; block 1 sees those that passed the *quantized* block 0."""
    windows = random_windows(6, 16, seed=3)
    config = QuantConfig(wbits=3)
    model = make_model("llama")
    quantize(model, windows, config, progress=False)
    reference = make_model("llama")
    for i in range(2):
        H = _block_input_hessian(reference, i, "self_attn.q_proj", windows)
        block = reference.model.layers[i].self_attn
        results = quantize_weights([block.q_proj.weight.detach(), block.k_proj.weight.detach(),
                                    block.v_proj.weight.detach()], H, config)
        for name, qw in zip(("q_proj", "k_proj", "v_proj"), results):
            got = model.model.layers[i].self_attn.get_submodule(name)
            assert torch.allclose(got.dequantize(), qw.weight, atol=1e-4), (i, name)
        # feed the next block what the quantized model feeds it
        with torch.no_grad():
            for name, m in model.model.layers[i].named_modules():
                if isinstance(m, SpQRLinear):
                    reference.model.layers[i].get_submodule(name).weight.copy_(m.dequantize())


def test_skip_keeps_linears_in_full_precision():
    original = make_model("llama")
    model = make_model("llama")
    report = quantize(model, random_windows(4, 16), QuantConfig(), skip=("mlp.down_proj",), progress=False)
    for i in range(2):
        down = model.model.layers[i].mlp.down_proj
        assert type(down) is nn.Linear
        assert torch.equal(down.weight, original.model.layers[i].mlp.down_proj.weight)
        assert isinstance(model.model.layers[i].mlp.up_proj, SpQRLinear)
    assert len(report.layers) == 12
    # a full name skips only that layer
    model = make_model("llama")
    quantize(model, None, preset("rtn"), skip=("model.layers.1.self_attn.o_proj",), progress=False)
    assert type(model.model.layers[1].self_attn.o_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.o_proj, SpQRLinear)
    # a name that matches nothing (a typo, a partial word) is refused before anything is quantized
    for typo in ("mlp.down_prj", "down", "model.layers.9.mlp.down_proj"):
        model = make_model("llama")
        with pytest.raises(ConfigError, match="match no Linear"):
            quantize(model, None, preset("rtn"), skip=("mlp.up_proj", typo), progress=False)
        assert not any(isinstance(m, SpQRLinear) for m in model.modules())


def test_bad_calibration_is_refused_before_quantizing():
    vocab = make_model("llama").config.vocab_size
    for calibration, message in ((torch.randn(4, 16), "token ids"), (torch.randint(0, 100, (16,)), "token ids"),
                                 (torch.zeros(0, 16, dtype=torch.long), "token ids"),
                                 (torch.full((2, 16), vocab), rf"\[0, {vocab}\)"),
                                 (torch.full((2, 16), -1), "must be in")):
        model = make_model("llama")
        with pytest.raises(DataError, match=message):
            quantize(model, calibration, QuantConfig(), progress=False)
        assert not any(isinstance(m, SpQRLinear) for m in model.modules())


def test_rtn_needs_no_calibration_and_is_plain_rounding(arch):
    original = make_model(arch)
    model = make_model(arch)
    config = preset("rtn", wbits=3)
    report = quantize(model, None, config, progress=False)
    for name in decoder_linear_names(original):
        w = original.get_submodule(name).weight
        assert torch.allclose(model.get_submodule(name).dequantize(), ref_rtn(w, 3, 16, None, 16), atol=1e-6)
    assert report.seconds_forward == 0.0
    assert len(report.layers) == 14


def test_rtn_with_fp32_statistics(tmp_path):
    """stats_dtype="float32": the reference implementation's RTN arithmetic, stored and counted at 32 bits."""
    from spqr.format.accounting import checkpoint_accounting
    from spqr.hf import load_quantized, save_quantized

    original = make_model("llama")
    model = make_model("llama")
    config = preset("rtn", stats_dtype="float32")
    quantize(model, None, config, progress=False)
    for name in decoder_linear_names(original):
        layer = model.get_submodule(name)
        assert layer.spec.stats_dtype == "float32" and layer.scale.dtype == torch.float32
        w = original.get_submodule(name).weight
        assert torch.allclose(layer.dequantize(), ref_rtn(w, 4, 16, None, 16, fp32_stats=True), atol=1e-6)
        assert not torch.allclose(layer.dequantize(), ref_rtn(w, 4, 16, None, 16), atol=1e-7)
    save_quantized(model, tmp_path / "q", config.to_dict())
    loaded = load_quantized(tmp_path / "q")
    ids = random_windows(2, 20, seed=5)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    accounting = checkpoint_accounting(tmp_path / "q")
    assert accounting["paper_formula_bits"] == 4 + 2 * 32 / 16
    for layer in accounting["layers"]:  # one fp32 scale and zero per row and group of 16 columns
        fp32_stat_bits = 32 * -(-layer["in_features"] // 16) * layer["out_features"]
        assert layer["parts_bits"]["scale"] == layer["parts_bits"]["zero"] == fp32_stat_bits


def test_bias_kept_for_qwen2():
    original = make_model("qwen2")
    model = make_model("qwen2")
    quantize(model, random_windows(4, 16), QuantConfig(), progress=False)
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            layer = model.model.layers[i].self_attn.get_submodule(proj)
            assert layer.spec.has_bias
            assert torch.equal(layer.bias, original.model.layers[i].self_attn.get_submodule(proj).bias)
        assert model.model.layers[i].self_attn.o_proj.bias is None


def test_find_decoder_blocks():
    model = make_model("mistral")
    name, blocks = find_decoder_blocks(model)
    assert name == "model.layers"
    assert blocks is model.model.layers

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.short = nn.ModuleList([nn.Sequential(nn.Linear(2, 2))])
            self.long = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(3)])
            self.no_linear = nn.ModuleList([nn.ReLU() for _ in range(5)])

    assert find_decoder_blocks(Wrapper())[0] == "long"
    with pytest.raises(ModelLoadError, match="unsupported"):
        find_decoder_blocks(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(ModelLoadError):
        quantize(nn.Sequential(nn.Linear(4, 4)), None, preset("rtn"), progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel: .*transformers' Conv1D layers, which spqr does not"):
        find_decoder_blocks(gpt2)


def test_error_cases():
    with pytest.raises(ValueError, match="calibration"):
        quantize(make_model("llama"), None, QuantConfig(), progress=False)
    with pytest.raises(DataError, match="128"):
        quantize(make_model("llama"), random_windows(2, 129), QuantConfig(), progress=False)
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(QuantizationError, match="up_proj"):
        quantize(model, random_windows(2, 16), QuantConfig(), progress=False)


def test_batch_size_does_not_change_the_calibration_much():
    windows = random_windows(6, 16, seed=5)
    models = []
    for batch_size in (1, 4, 16):  # 4: a ragged last batch of 2 windows
        model = make_model("llama")
        quantize(model, windows, QuantConfig(), batch_size=batch_size, progress=False)
        models.append(model)
    ids = random_windows(1, 16, seed=6)
    for other in models[1:]:
        assert relative_error(_logits(other, ids), _logits(models[0], ids)) < 0.02


def test_calibration_data(tokenizer, text_file):
    cal = CalibrationConfig(dataset=str(text_file), nsamples=5, seqlen=24, seed=7)
    windows = calibration_data(tokenizer, cal)
    ids = tokenize(tokenizer, load_text(str(text_file)))
    assert windows.shape == (5, 24) and windows.dtype == torch.int64
    assert torch.equal(windows, calibration_windows(ids, 5, 24, 7))
    with pytest.raises(DataError, match="tokens"):
        calibration_data(tokenizer, CalibrationConfig(dataset=str(text_file), nsamples=1, seqlen=ids.numel()))


def test_report_to_dict():
    model = make_model("mistral")
    report = quantize(model, random_windows(4, 16), QuantConfig(outlier_threshold=0.05), progress=False)
    d = report.to_dict()
    assert d["avg_bits"] == report.avg_bits and d["quantized_weights"] == report.quantized_weights
    assert len(d["layers"]) == 14
    share = sum(layer["outliers"] for layer in d["layers"]) / report.quantized_weights
    assert d["outlier_share"] == pytest.approx(share)
    assert share > 0
    assert set(d["seconds"]) == {"forward", "hessian", "engine", "total"}


def test_bfloat16_calibration_forwards():
    """forward_dtype=bf16 only changes the calibration activations: the model stays fp32, results stay close."""
    windows = random_windows(6, 16, seed=8)
    fp32, bf16 = make_model("qwen2"), make_model("qwen2")
    quantize(fp32, windows, QuantConfig(), progress=False)
    quantize(bf16, windows, QuantConfig(), forward_dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}
    layer = bf16.model.layers[1].self_attn.q_proj
    assert layer.bias.dtype == torch.float32
    ids = random_windows(1, 16, seed=9)
    reference = _logits(make_model("qwen2"), ids)
    err_fp32 = relative_error(_logits(fp32, ids), reference)
    err_bf16 = relative_error(_logits(bf16, ids), reference)
    assert err_bf16 < 1.5 * err_fp32 + 0.01
    # the quantized weights differ from the fp32-calibrated ones by no more than quantization itself does
    original = make_model("qwen2").model.layers[0].mlp.up_proj.weight.detach()
    a, b = fp32.model.layers[0].mlp.up_proj.dequantize(), bf16.model.layers[0].mlp.up_proj.dequantize()
    assert relative_error(b, a) < 2 * relative_error(a, original)


def test_block_with_every_linear_skipped():
    model = make_model("llama")
    all_names = decoder_linear_names(model)
    names = [n for n in all_names if n.startswith("model.layers.1.")]
    report = quantize(model, random_windows(4, 16), QuantConfig(), skip=tuple(names), progress=False)
    assert sorted(r.name for r in report.layers) == sorted(n for n in all_names if n.startswith("model.layers.0."))
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied output heads
def test_quantize_head_uses_the_final_hidden_states(arch, monkeypatch):
    model = make_model(arch)
    tied = model.config.tie_word_embeddings
    embeddings = model.get_input_embeddings().weight.detach().clone()
    head_weight = model.get_output_embeddings().weight.detach().clone()
    windows = random_windows(6, 16)
    report = quantize(model, windows, SPQR4, quantize_head=True, progress=False)
    assert isinstance(model.lm_head, SpQRLinear) and report.layers[-1].name == "lm_head"
    assert torch.equal(model.get_input_embeddings().weight, embeddings)  # a tied head is untied, not moved
    assert model.config.tie_word_embeddings is False
    assert tied == (arch == "qwen2")

    # Reference: the head's input from a plain forward of the quantized model (exact decoding), and
    # the engine run on its H: the same weights as the pipeline's pass-through replay produced.
    monkeypatch.setattr(SpQRLinear, "use_reference", True)
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten(0, 1)))
    _logits(model, windows)
    handle.remove()
    x = seen[0].float()
    expected = quantize_weights([head_weight], x.T @ x * (2.0 / x.shape[0]), SPQR4)[0]
    assert torch.equal(model.lm_head.dequantize(), expected.weight)


def test_quantize_head_with_its_own_recipe():
    model = make_model("llama")
    quantize(model, random_windows(6, 16), QuantConfig(wbits=3), quantize_head=QuantConfig(wbits=5), progress=False)
    assert model.lm_head.spec.wbits == 5 and model.model.layers[0].mlp.up_proj.spec.wbits == 3
    with pytest.raises(ConfigError, match="head's recipe needs calibration"):
        quantize(make_model("llama"), None, preset("rtn"), quantize_head=QuantConfig(), progress=False)


def test_quantize_head_checkpoint_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    from spqr.hf import load_quantized, save_quantized

    model = make_model("qwen2")
    quantize(model, random_windows(6, 16), SPQR4, quantize_head=True, progress=False)
    ids = random_windows(2, 20, seed=5)
    save_quantized(model, tmp_path / "q", SPQR4.to_dict())
    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded.lm_head, SpQRLinear)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(via_transformers.lm_head, SpQRLinear)
    assert torch.equal(_logits(via_transformers, ids), _logits(model, ids))


def test_a_packed_layers_missing_weight_is_explained():
    """`.weight` of a quantized head or embedding (transformers' resize_token_embeddings reads it) says why there is
    none and what to do, and hasattr stays False for code that checks."""
    from spqr.nn import SpQREmbedding

    model = make_model("qwen2")
    quantize(model, None, preset("rtn"), quantize_head=True, quantize_embeddings=True, progress=False)
    assert isinstance(model.get_input_embeddings(), SpQREmbedding)
    assert not hasattr(model.lm_head, "weight") and not hasattr(model.get_input_embeddings(), "weight")
    with pytest.raises(AttributeError, match="SpQREmbedding has no dense `weight`.*head lm_head.*before quantizing"):
        model.resize_token_embeddings(model.config.vocab_size + 8)
    with pytest.raises(AttributeError, match=r"SpQRLinear has no dense `weight`: W is stored packed \(.dequantize"):
        _ = model.lm_head.weight
    with pytest.raises(AttributeError, match="'SpQRLinear' object has no attribute 'wieght'"):  # others as before
        _ = model.lm_head.wieght


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, still used
def test_quantized_embeddings_trace_export_and_compile():
    """The lookup's sizes depend on the ids (distinct ids, the rows' outliers): torch.jit.trace fixed them in the
    graph (rows without their outliers for other ids: 13% off, or a failure for another number of distinct ids), and
    torch.export / torch.compile(fullgraph=True) failed on them. One opaque op (spqr::embedding) records it."""
    model = make_model("qwen2")
    quantize(model, random_windows(6, 16), SPQR4, quantize_embeddings=True, progress=False)
    embeddings = model.get_input_embeddings()
    outliers = model.lm_head.outlier_row_ptr.diff()
    plain, with_outliers = (outliers == 0).nonzero().flatten()[:4], (outliers > 0).nonzero().flatten()[:4]
    assert len(plain) == len(with_outliers) == 4
    ids, others = plain.view(1, 4), [with_outliers.view(1, 4), torch.tensor([[7, 7, 9, 7]])]
    traced = torch.jit.trace(embeddings, ids)
    assert "spqr::embedding" in str(traced.graph)
    exported = torch.export.export(embeddings, (ids,)).module()
    compiled = torch.compile(embeddings, fullgraph=True, backend="eager")
    for graph in (traced, exported, compiled):
        for other in others:
            assert torch.equal(graph(other), embeddings(other))
    with pytest.raises((IndexError, RuntimeError), match="token ids must be in"):
        traced(torch.tensor([[0, 1, 2, 300]]))


def test_dequantize_model_keeps_the_outputs_and_the_tie(tmp_path):
    from transformers import AutoModelForCausalLM

    from spqr.hf import dequantize_model
    from spqr.nn import SpQREmbedding

    model = make_model("qwen2")
    quantize(model, random_windows(6, 16), SPQR4, quantize_embeddings=True, progress=False)
    ids = random_windows(2, 12, seed=3)
    expected = _logits(model, ids)
    dense = dequantize_model(model)
    assert not any(isinstance(m, (SpQRLinear, SpQREmbedding)) for m in dense.modules())
    assert dense.get_input_embeddings().weight is dense.lm_head.weight
    torch.testing.assert_close(_logits(dense, ids), expected, rtol=1e-5, atol=1e-5)
    dense.save_pretrained(tmp_path / "dense")  # no longer refused: a dense model, tied again on load
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), ids), expected,
                               rtol=1e-5, atol=1e-5)


def test_quantize_embeddings_reads_the_tied_head(tmp_path):
    from transformers import AutoModelForCausalLM

    from spqr.config import ConfigError
    from spqr.generate import generate
    from spqr.hf import load_quantized, save_quantized
    from spqr.nn import SpQREmbedding

    with pytest.raises(ConfigError, match="tied"):
        quantize(make_model("llama"), random_windows(6, 16), SPQR4, quantize_embeddings=True, progress=False)

    model = make_model("qwen2")
    quantize(model, random_windows(6, 16), SPQR4, quantize_embeddings=True, progress=False)
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, SpQREmbedding) and isinstance(model.lm_head, SpQRLinear)
    ids = random_windows(2, 20, seed=5)
    decoded = model.lm_head.dequantize()
    assert torch.equal(embeddings(ids), decoded[ids])
    for bad in (ids.float(), ids.bool()):  # 1.7 was read as token 1
        with pytest.raises(TypeError, match="token ids must be an integer tensor"):
            embeddings(bad)
    with pytest.raises(IndexError, match="token ids must be in"):
        embeddings(torch.tensor([[-1, 2]]))
    on_meta = copy.deepcopy(model).to("meta").get_input_embeddings()  # shapes only, as nn.Embedding (.item() failed)
    assert on_meta(ids.to("meta")).shape == (2, 20, model.config.hidden_size)
    # the same as the original architecture with the decoded head as its (tied) embedding matrix
    dense = _dense_copy("qwen2", model)
    dense.get_input_embeddings().weight.data.copy_(decoded)
    assert dense.lm_head.weight is dense.get_input_embeddings().weight
    assert torch.allclose(_logits(model, ids), _logits(dense, ids), atol=1e-5)

    save_quantized(model, tmp_path / "q", SPQR4.to_dict())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert not any("embed_tokens" in k for k in f.keys())  # stored once, as the head
    for loaded in (load_quantized(tmp_path / "q"), AutoModelForCausalLM.from_pretrained(tmp_path / "q")):
        assert isinstance(loaded.get_input_embeddings(), SpQREmbedding)
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    result = generate(load_quantized(tmp_path / "q", dtype=torch.bfloat16), ids[:1, :8], 4, stop_at_eos=False)
    assert len(result.tokens) == 4

    import json

    from spqr.format.io import CheckpointError
    config_path = tmp_path / "q" / "config.json"
    original = config_path.read_text()
    for table, message in (({"model.embed_tokens": "model.layers.0.mlp.down_proj"}, "is 300x40"),
                           ({"model.nope": "lm_head"}, "nope"), (["lm_head"], "table of module names")):
        config = json.loads(original)
        config["quantization_config"]["quantized_embeddings"] = table
        config_path.write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            load_quantized(tmp_path / "q", verify_checksum=False)


def test_quantize_names_bad_arguments_before_any_work():
    """A dict config, a list calibration, batch_size 0 and an already quantized model failed deep inside (or with a
    misleading 'no stack of decoder blocks'); a string skip was split into characters."""
    windows = random_windows(2, 16)
    with pytest.raises(TypeError, match="config must be a spqr.QuantConfig"):
        quantize(make_model("llama"), windows, {"wbits": 3}, progress=False)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        quantize(make_model("llama"), windows, QuantConfig(), batch_size=0, progress=False)
    with pytest.raises(DataError, match="calibration must be a tensor of token ids"):
        quantize(make_model("llama"), windows.tolist(), QuantConfig(), progress=False)
    model = make_model("llama")
    report = quantize(model, windows, QuantConfig(), skip="q_proj", progress=False)  # one name, not its letters
    assert not any(r.name.endswith("q_proj") for r in report.layers) and len(report.layers) == 12
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(model, windows, QuantConfig(), progress=False)
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(ConfigError, match="skip names every Linear"):
        quantize(make_model("llama"), windows, QuantConfig(), progress=False, skip=every)
    # None quantized the head (`is not False`), a dict was taken for True; a dtype's name failed in .to()
    for head in (None, 0, {"wbits": 4}):
        with pytest.raises(TypeError, match="quantize_head must be True, False or a spqr.QuantConfig"):
            quantize(make_model("llama"), windows, QuantConfig(), quantize_head=head, progress=False)
    with pytest.raises(TypeError, match="quantize_embeddings must be True or False"):
        quantize(make_model("qwen2"), windows, QuantConfig(), quantize_embeddings=None, progress=False)
    for dtype in ("bfloat16", torch.int32):
        with pytest.raises(TypeError, match="forward_dtype must be a floating-point torch.dtype"):
            quantize(make_model("llama"), windows, QuantConfig(), forward_dtype=dtype, progress=False)
    with pytest.raises(DataError, match="meta device"):
        quantize(make_model("llama"), windows.to("meta"), QuantConfig(), progress=False)
    # skipping every block Linear is fine when the embeddings (and so the tied head) are quantized
    model = make_model("qwen2")
    report = quantize(model, windows, QuantConfig(), skip=every, quantize_embeddings=True, progress=False)
    assert [r.name for r in report.layers] == ["lm_head"]


def test_calibration_ids_of_any_integer_dtype_are_taken():
    """uint8 ids failed in the embedding (it takes int64 or int32 only)."""
    windows = random_windows(2, 16) % 200
    reports = [quantize(make_model("llama"), windows.to(dtype), QuantConfig(), progress=False).to_dict()["layers"]
               for dtype in (torch.int64, torch.uint8, torch.int16)]
    assert reports[0] == reports[1] == reports[2]


def test_a_blocksize_past_the_width_allocates_for_the_width():
    """errors_t was [blocksize, rows]: blocksize 10**9 asked for 448 GB on a 48-wide layer."""
    model = make_model("llama")
    report = quantize(model, random_windows(2, 16), QuantConfig(blocksize=10**9), progress=False)
    assert len(report.layers) == 14


def test_weights_outside_linear_layers_are_named(caplog):
    """A mixture-of-experts model keeps its experts as 3-D parameters, not nn.Linear: they stay in full precision,
    which was silent."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    experts = [n for n, p in model.named_parameters() if p.dim() >= 2 and "experts" in n]
    with caplog.at_level("WARNING", logger="spqr.pipeline"):
        quantize(model, random_windows(2, 16), QuantConfig(), progress=False)
    if any(p.dim() == 3 for n, p in model.named_parameters() if n in experts):  # transformers >= 5: fused experts
        assert "weights of the decoder blocks are not in nn.Linear layers and stay unquantized" in caplog.text
        assert experts[0] in caplog.text
    else:  # experts as Linear layers: quantized, nothing to say
        assert "not in nn.Linear" not in caplog.text
    with caplog.at_level("WARNING", logger="spqr.pipeline"):
        caplog.clear()
        quantize(make_model("llama"), random_windows(2, 16), QuantConfig(), progress=False)
    assert "not in nn.Linear" not in caplog.text


class _Router(nn.Linear):
    """Like phimoe's / llama4's routers: an nn.Linear subclass whose forward returns something else (a tuple)."""

    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.softmax(-1)


class _SameAsLinear(nn.Linear):
    """Like falcon's FalconLinear: a forward of its own that computes x·Wᵀ + b all the same."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


@pytest.mark.parametrize("method", ["spqr", "rtn"])
def test_linear_subclasses_with_another_forward_and_weights_read_directly_stay_dense_with_a_warning(caplog, method):
    """A router subclassing nn.Linear became an SpQRLinear (one tensor instead of a tuple): the model broke at its
    first forward. A Linear whose weight the model reads directly (mamba's dt_proj) stayed dense without a word
    with calibration (it never runs as a module), and became an SpQRLinear with RTN (the model then failed)."""
    import types

    model = make_model("llama")
    ids = random_windows(2, 12, seed=4)
    for block in model.model.layers:
        mlp = block.mlp
        router = _Router(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
        router.weight = mlp.up_proj.weight
        mlp.up_proj = router
        same = _SameAsLinear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
        same.weight = mlp.down_proj.weight
        mlp.down_proj = same

        def forward(self, x):  # the router's first output as the up projection; gate_proj's weight read directly
            gate = nn.functional.linear(x, self.gate_proj.weight)
            return self.down_proj(self.act_fn(gate) * self.up_proj(x)[0])

        mlp.forward = types.MethodType(forward, mlp)
    before = _logits(model, ids)
    calibration, config = (random_windows(6, 16), SPQR4) if method == "spqr" else (None, preset("rtn", wbits=4))
    with caplog.at_level("WARNING"):
        quantize(model, calibration, config, progress=False)
    mlps = [block.mlp for block in model.model.layers]
    assert all(type(m.up_proj) is _Router and type(m.gate_proj) is nn.Linear for m in mlps)
    assert all(isinstance(m.down_proj, SpQRLinear) for m in mlps)  # the same computation: quantized
    assert "mlp.up_proj (_Router) subclasses nn.Linear with a forward that does not compute" in caplog.text
    warning = ("model.layers.0.mlp.gate_proj never ran as a module in the calibration forward" if method == "spqr"
               else "the model reads the weights of mlp.gate_proj directly")
    assert warning in caplog.text
    assert caplog.text.count("_Router) subclasses") == 1 and caplog.text.count(warning) == 1
    after = _logits(model, ids)  # the model still runs, and close to before
    assert relative_error(after, before) < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_subclass_computing_the_same_is_recognised_in_every_dtype(dtype):
    """bf16 rounding differs between x @ Wᵀ + b and F.linear by an ulp: a fixed 1e-3 tolerance called falcon's
    FalconLinear different in bf16, keeping all its layers dense."""
    from spqr.pipeline import _computes_as_linear

    for in_features in (64, 1024):
        assert _computes_as_linear(_SameAsLinear(in_features, 96, bias=True).to(dtype))
        assert not _computes_as_linear(_Router(in_features, 96).to(dtype))
    scaled = _SameAsLinear(64, 96)
    scaled.forward = lambda x: 1.5 * nn.functional.linear(x, scaled.weight, scaled.bias)
    assert not _computes_as_linear(scaled.to(dtype))


def test_a_model_left_in_training_mode_is_calibrated_without_dropout():
    """from_config builds a model in training mode: with dropout on, the Hessians came from dropped-out activations
    (two runs of the same call differed). quantize runs in eval mode and gives the model back in its mode."""
    models = []
    for training in (True, False):
        model = training_with_dropout(make_model("llama")).train(training)
        quantize(model, random_windows(4, 16), SPQR4, progress=False)
        assert all(m.training == training for m in model.modules())  # the new SpQRLinears too
        models.append(model.eval())
    ids = random_windows(1, 12, seed=3)
    assert torch.equal(_logits(models[0], ids), _logits(models[1], ids))


@pytest.mark.parametrize("scale", [1e6, 1e-7])
def test_weights_outside_what_fp16_holds_are_refused_naming_the_layer(scale):
    """Weights past fp16's range failed after the sweep without the layer's name ("outlier_val contains NaN or
    Inf"): spqr stores outliers in fp16. Weights of 1e-7 came out zeroed (or 1e4 times too large at 1e-9) without a
    word: their fp16 scales vanish. Weights of 2e5 are fine without outliers (their scales fit in fp16), and plain
    fp32 statistics hold tiny ones."""
    name = "model.layers.0.mlp.down_proj"
    for method in ("spqr", "gptq", "rtn"):
        model = make_model("llama")
        weight = model.get_submodule(name).weight.data.mul_(scale).clone()
        calibration = random_windows(2, 16)
        if scale < 1 or method == "spqr":
            with pytest.raises(QuantizationError, match=f"weights of {name} (reach|are at most)"):
                quantize(model, calibration, preset(method), progress=False)
        else:  # as good as at scale 1
            quantize(model, calibration, preset(method), progress=False)
            assert relative_error(model.get_submodule(name).dequantize(), weight) < 0.2
    model = make_model("llama")
    weight = model.get_submodule(name).weight.data.mul_(scale).clone()
    quantize(model, None, preset("rtn", stats_dtype="float32"), progress=False)
    assert relative_error(model.get_submodule(name).dequantize(), weight) < 0.1


def test_rtn_finds_a_weight_read_directly_in_a_later_block_only():
    """Hybrid stacks (mamba-style mixers in some blocks only): the probe watched the first block alone."""
    import types

    model = make_model("llama")
    mlp = model.model.layers[1].mlp

    def forward(self, x):  # block 1 reads its gate_proj's weight directly
        return self.down_proj(self.act_fn(nn.functional.linear(x, self.gate_proj.weight)) * self.up_proj(x))

    mlp.forward = types.MethodType(forward, mlp)
    quantize(model, None, preset("rtn", wbits=4), progress=False)
    assert type(model.model.layers[1].mlp.gate_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.gate_proj, SpQRLinear)
    assert torch.isfinite(_logits(model, random_windows(1, 8))).all()
