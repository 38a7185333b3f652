"""Test helpers: tiny model builders and plain reference implementations written independently of spqr."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WIKI_VALID = REPO / "spqr" / "datasets" / "wikitext2" / "wiki.valid.raw"
VOCAB = 300
ARCHS = ("llama", "qwen2", "mistral")


# ----------------------------------------------------------------------------------------------- models

def model_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128, initializer_range=0.05,
                  rms_norm_eps=1e-6)
    if arch == "llama":
        # hidden 48 = 3 groups of 16; intermediate 72 is ragged (4.5 groups); k/v have 24 rows (ragged beta2)
        return LlamaConfig(hidden_size=48, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False, **common)
    if arch == "qwen2":
        # q/k/v carry biases; hidden 40 and the 20-row k/v are ragged for groups of 16; tied embeddings
        return Qwen2Config(hidden_size=40, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True, use_sliding_window=False, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=88, num_attention_heads=4, num_key_value_heads=1,
                             sliding_window=None, tie_word_embeddings=False, **common)
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0):
    """A tiny random causal LM in float32, eval mode, with non-trivial norms and biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.eval()
    return model


def training_with_dropout(model, p: float = 0.5):
    """The llama model in training mode with attention dropout p (as from_config leaves a model, plus dropout)."""
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p
    return model.train()


def random_windows(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def decoder_linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]


# ----------------------------------------------------------------------------------------------- grids

def ref_minmax_row(row: list[float], bits: int) -> tuple[float, float]:
    """(scale, zero) of the min-max grid of a list of floats, with the documented degenerate cases."""
    maxq = 2**bits - 1
    lo, hi = min(row), max(row)
    if lo == hi:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if lo == 0.0 and hi == 0.0:
        lo, hi = 0.0, 1.0
    scale = (hi - lo) / maxq
    return scale, -lo / scale


def ref_grid_fp32(x: torch.Tensor, bits: int, fp16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise min-max grid of x [rows, n] in float32, optionally rounded to fp16.

    Degenerate rows as documented: a constant c spans [min(c, 0), max(c, 0)], and [0, 0] spans [0, 1].
    """
    maxq = 2**bits - 1
    lo, hi = x.min(dim=1).values.clone(), x.max(dim=1).values.clone()
    for r in range(lo.numel()):
        if lo[r] == hi[r]:
            lo[r], hi[r] = min(lo[r].item(), 0.0), max(hi[r].item(), 0.0)
        if lo[r] == 0 and hi[r] == 0:
            lo[r], hi[r] = 0.0, 1.0
    scale = (hi - lo) / maxq
    zero = -lo / scale
    if fp16:
        scale, zero = scale.half().float(), zero.half().float()
    return scale, zero


def ref_round_trip(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction) of x on the grid; scale/zero broadcast against x."""
    codes = torch.clamp(torch.round(x / scale + zero), 0, 2**bits - 1)
    return codes, (codes - zero) * scale


def ref_second_level(values: torch.Tensor, qq_bits: int, beta2: int) -> torch.Tensor:
    """Values [rows] after quantizing them with qq_bits codes in groups of beta2 rows (fp16 second level)."""
    out = torch.empty_like(values)
    for r0 in range(0, values.numel(), beta2):
        v = values[r0:r0 + beta2]
        s, z = ref_grid_fp32(v[None], qq_bits, fp16=True)
        out[r0:r0 + beta2] = ref_round_trip(v, s, z, qq_bits)[1]
    return out


def ref_rtn(weight: torch.Tensor, bits: int, beta1: int, qq_bits: int | None, beta2: int,
            fp32_stats: bool = False) -> torch.Tensor:
    """Round-to-nearest per group of beta1 columns, statistics in fp16 (fp32 with fp32_stats) or bilevel-quantized."""
    out = torch.empty_like(weight)
    for c0 in range(0, weight.shape[1], beta1):
        group = weight[:, c0:c0 + beta1]
        scale, zero = ref_grid_fp32(group, bits, fp16=qq_bits is None and not fp32_stats)
        if qq_bits is not None:
            scale, zero = ref_second_level(scale, qq_bits, beta2), ref_second_level(zero, qq_bits, beta2)
        out[:, c0:c0 + beta1] = ref_round_trip(group, scale[:, None], zero[:, None], bits)[1]
    return out


# ----------------------------------------------------------------------------------------------- GPTQ

def ref_damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper U with UᵀU = (H + percdamp·mean(diag H)·I)⁻¹, in float64 (dead columns already fixed)."""
    H = hessian.double()
    H = H + torch.eye(H.shape[0], dtype=H.dtype) * percdamp * H.diagonal().mean()
    return torch.linalg.cholesky(torch.linalg.inv(H), upper=True)


def ref_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, beta1: int, percdamp: float,
             perm: torch.Tensor | None = None) -> torch.Tensor:
    """Textbook GPTQ: column by column with the full update W[:, j+1:] -= err ⊗ U[j, j+1:] (no lazy blocks).

    The min-max grid of each group of beta1 columns is fitted (fp16 statistics) when the sweep reaches
    the group's first column, i.e. after the error feedback of all earlier columns.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = ref_damped_inverse_cholesky(H, percdamp)
    Q = torch.zeros_like(W)
    n = W.shape[1]
    for j in range(n):
        if j % beta1 == 0:
            scale, zero = ref_grid_fp32(W[:, j:j + beta1].float(), bits, fp16=True)
            scale, zero = scale.double(), zero.double()
        q = ref_round_trip(W[:, j], scale, zero, bits)[1]
        Q[:, j] = q
        err = (W[:, j] - q) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.float()


def random_hessian(n: int, tokens: int = 256, seed: int = 0, scales: torch.Tensor | None = None) -> torch.Tensor:
    """H = 2XᵀX/tokens of correlated random activations X [tokens, n]."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    if scales is not None:
        X = X * scales
    return 2 * X.T @ X / tokens


# ----------------------------------------------------------------------------------------------- packing

def ref_pack_row(codes: list[int], bits: int) -> list[list[int]]:
    """Bit-plane words (signed int32) of one row: [n_chunks][bits], bit i of word p = bit p of code i."""
    words = []
    for c0 in range(0, len(codes), 32):
        chunk = codes[c0:c0 + 32]
        planes = []
        for p in range(bits):
            w = 0
            for i, c in enumerate(chunk):
                w |= ((c >> p) & 1) << i
            planes.append(w - 2**32 if w >= 2**31 else w)
        words.append(planes)
    return words


def ref_unpack_row(words: list[list[int]], bits: int, n: int) -> list[int]:
    codes = []
    for planes in words:
        for i in range(32):
            codes.append(sum((((planes[p] & 0xFFFFFFFF) >> i) & 1) << p for p in range(bits)))
    return codes[:n]
