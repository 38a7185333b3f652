"""End to end on tiny random models of many transformers architectures: quantize, save, load through both loaders
(equal logits), generate. Each model type has its own module layout (fused qkv, experts, Conv1D-free GPT variants,
state-space mixers); the blocks and their Linears are found from the module structure alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import spqr
from spqr.config import QuantConfig
from spqr.generate import generate
from spqr.nn import SpQRLinear

H, VOCAB = 64, 300
LLAMA_LIKE = dict(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
MOE = dict(LLAMA_LIKE, num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
GPT_LIKE = dict(n_embd=H, n_layer=2, n_head=4, n_positions=128)
CONFIGS = {  # model type -> the config fields that make it tiny
    "gpt_neox": dict(LLAMA_LIKE, num_key_value_heads=4),
    "opt": dict(hidden_size=H, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, max_position_embeddings=128,
                word_embed_proj_dim=H),
    "falcon": dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                   new_decoder_architecture=True),
    "phi": dict(LLAMA_LIKE, num_key_value_heads=4),
    "phi3": dict(LLAMA_LIKE, original_max_position_embeddings=128),
    "gemma": dict(LLAMA_LIKE, head_dim=16),
    "gemma2": dict(LLAMA_LIKE, head_dim=16, sliding_window=8),
    "gemma3_text": dict(LLAMA_LIKE, head_dim=16, sliding_window=8),
    "qwen3": dict(LLAMA_LIKE, head_dim=16),
    "starcoder2": LLAMA_LIKE,
    "olmo": LLAMA_LIKE,
    "olmo2": LLAMA_LIKE,
    "stablelm": LLAMA_LIKE,
    "granite": LLAMA_LIKE,
    "cohere": LLAMA_LIKE,
    "bloom": dict(hidden_size=H, n_layer=2, n_head=4),
    "gptj": dict(GPT_LIKE, rotary_dim=8),
    "codegen": dict(GPT_LIKE, rotary_dim=8, n_ctx=128),
    "gpt_bigcode": GPT_LIKE,
    "mpt": dict(d_model=H, n_heads=4, n_layers=2, max_seq_len=128, expansion_ratio=2),
    "mixtral": dict(MOE, intermediate_size=64),
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(MOE, head_dim=16),
    "olmoe": MOE,
    "granitemoe": MOE,
    "phimoe": dict(MOE, intermediate_size=64),  # routers that subclass nn.Linear, returning tuples: kept dense
    "mamba": dict(hidden_size=H, num_hidden_layers=2),  # dt_proj's weight is read directly: kept dense
}


def _tiny(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **CONFIGS[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases off their initial ones and zeros, so that their round trip shows
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln" in name:
                parameter.mul_(1.0 + 0.2 * torch.rand_like(parameter))
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    return model


@pytest.mark.filterwarnings("ignore")  # transformers' notes on slow reference kernels (mamba) and the like
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_quantize_save_and_load_through_both_loaders(model_type, tmp_path):
    model = _tiny(model_type)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    config = QuantConfig(wbits=3, outlier_threshold=0.1)
    spqr.quantize(model, torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0)), config,
                  progress=False)
    assert sum(isinstance(m, SpQRLinear) for m in model.modules()) >= 4
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all()
    assert float((after - before).norm() / before.norm()) < 0.5  # 3 bits on random weights: ~1-30%
    spqr.save_quantized(model, tmp_path / "q", config.to_dict())
    # transformers' loader: gpt_bigcode's and mamba's weight init read a quantized child's .weight (a stand-in
    # while loading, gone afterwards)
    for loaded in (spqr.load_quantized(tmp_path / "q"), AutoModelForCausalLM.from_pretrained(tmp_path / "q")):
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, after)
        assert not any(hasattr(m, "weight") for m in loaded.modules() if isinstance(m, SpQRLinear))
    assert len(generate(spqr.load_quantized(tmp_path / "q"), ids[:, :8], 4, stop_at_eos=False).tokens) == 4


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_rtn_finds_weights_the_model_reads_directly(model_type, caplog):
    """RTN runs no calibration forward: a probe of 8 tokens through the first block finds the Linears whose weight
    the model reads outside their forward (mamba's dt_proj), which stay dense; every model type takes the probe."""
    model = _tiny(model_type)
    with caplog.at_level("WARNING"):
        spqr.quantize(model, None, spqr.preset("rtn", wbits=4), progress=False)
    assert "could not run 8 tokens" not in caplog.text
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(3, 19).unsqueeze(0)).logits).all()
    # mamba's mixer reads dt_proj's weight directly on CPU in transformers 5.25 (5.0 calls the module; the synthetic
    # case in tests/test_pipeline.py checks the probe on every version)
    if "reads the weights of mixer.dt_proj directly" in caplog.text:
        assert all(type(layer.mixer.dt_proj) is torch.nn.Linear for layer in model.backbone.layers)
    else:
        assert "directly" not in caplog.text
