"""SpQRLinear through the kernels vs its reference path, generation (greedy, sampled, batched), and the
generate/bench CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spqr import cli
from spqr.cli import main
from spqr.config import QuantConfig, SamplingConfig
from spqr.generate import (
    BatchGenerationResult,
    GenerationError,
    GenerationResult,
    generate,
    generate_batch,
    next_tokens,
    penalize_repetition,
    sampling_probabilities,
    use_reference,
)
from spqr.hf import load_quantized
from spqr.kernels import cpu
from spqr.nn import SpQRLinear
from spqr.pipeline import quantize
from tests.helpers import make_model, random_windows, training_with_dropout


@pytest.mark.parametrize("amx", [True, False])  # >8-row calls on AMX where the CPU has it, else on AVX-512
def test_spqr_linear_kernels_match_reference(quantized_llama, monkeypatch, amx):
    if not amx and cpu.load() is not None:
        monkeypatch.setattr(cpu.load(), "has_amx", False)
    _, _, checkpoint = quantized_llama
    model = load_quantized(checkpoint)
    layers = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    assert layers
    for layer in layers:
        for shape in ((1, 1, layer.in_features), (2, 7, layer.in_features), (3, layer.in_features)):
            x = torch.randn(shape)
            fast = layer(x)
            layer.use_reference = True
            slow = layer(x)
            layer.use_reference = False
            assert fast.shape == slow.shape == (*shape[:-1], layer.out_features)
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    x = torch.randn(4, layers[0].in_features, dtype=torch.bfloat16)
    assert layers[0](x).dtype == torch.bfloat16


def test_generation_matches_the_reference_model(quantized_llama):
    _, _, checkpoint = quantized_llama
    model = load_quantized(checkpoint)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    fast = generate(model, ids, 20, stop_at_eos=False)
    slow = generate(use_reference(model), ids, 20, stop_at_eos=False)
    use_reference(model, False)
    assert isinstance(fast, GenerationResult) and len(fast.tokens) == 20
    assert fast.tokens == slow.tokens
    # the same tokens as a plain full-sequence forward pass, re-run from scratch (no cache)
    with torch.no_grad():
        seq = ids
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert fast.tokens[:5] == seq[0, ids.shape[1]:].tolist()
    d = fast.to_dict()
    assert d["new_tokens"] == 20 and d["prompt_tokens"] == 6 and d["decode_tokens_per_second"] > 0


def test_generate_stops_at_eos_and_streams():
    class Tiny(torch.nn.Module):  # always predicts token 2, which is the end-of-sequence token
        config = type("C", (), {"eos_token_id": 2})()

        def forward(self, input_ids, cache=None, use_cache=True):
            logits = torch.zeros(1, input_ids.shape[1], 4)
            logits[..., 2] = 1.0
            return {"logits": logits, "cache": None}

    seen: list[int] = []
    result = generate(Tiny(), torch.tensor([[1, 1]]), 10, on_token=seen.append)
    assert result.tokens == seen == [2]
    assert len(generate(Tiny(), torch.tensor([[1]]), 4, stop_at_eos=False).tokens) == 4
    assert generate(Tiny(), torch.tensor([[1]], dtype=torch.uint8), 2).tokens == [2]  # any integer dtype
    assert generate(Tiny(), torch.tensor([[1]]), 2, sampling=None).tokens == [2]  # None: greedy
    for bad in (torch.tensor([1, 2]), torch.tensor([[1.0, 2.0]]), torch.tensor([[True]]), torch.tensor([[1j]]),
                [[1, 2]], torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="input_ids must be a tensor of integer token ids of shape"):
            generate(Tiny(), bad, 3)
    for bad in (0, -1, 2.5, "2", None, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            generate(Tiny(), torch.tensor([[1]]), bad)
    with pytest.raises(TypeError, match="sampling must be a spqr.SamplingConfig, got dict"):
        generate(Tiny(), torch.tensor([[1]]), 2, sampling={})


class FixedLogits(torch.nn.Module):
    """A model whose next-token logits are always `logits` [V], whatever the input."""

    config = type("C", (), {"eos_token_id": None})()

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, cache=None, use_cache=True, **padding):
        return {"logits": self.logits.expand(*input_ids.shape, -1), "cache": None}


def test_sampling_probabilities_truncate_and_renormalize():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = probs.log()
    torch.testing.assert_close(sampling_probabilities(logits, SamplingConfig(temperature=1.0)), probs)
    sharp = sampling_probabilities(logits, SamplingConfig(temperature=0.5))  # p^2, renormalized
    torch.testing.assert_close(sharp, probs**2 / (probs**2).sum())
    top2 = sampling_probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([0.0, 0.4, 0.0, 0.3]) / 0.7)
    # nucleus: 0.4 alone is short of 0.5, 0.4 + 0.3 reaches it; with top_p = 0.4 the first token suffices
    nucleus = sampling_probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.5))
    torch.testing.assert_close(nucleus, torch.tensor([0.0, 0.4, 0.0, 0.3]) / 0.7)
    torch.testing.assert_close(sampling_probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.4)),
                               torch.tensor([0.0, 1.0, 0.0, 0.0]))
    both = sampling_probabilities(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.95))
    torch.testing.assert_close(both, torch.tensor([0.0, 0.4, 0.2, 0.3]) / 0.9)
    tie = sampling_probabilities(torch.zeros(4), SamplingConfig(temperature=1.0, top_k=1))
    torch.testing.assert_close(tie, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # ties: the lowest token id
    bf16 = sampling_probabilities(logits.bfloat16(), SamplingConfig(temperature=1.0))
    assert bf16.dtype == torch.float32 and abs(float(bf16.sum()) - 1) < 1e-6
    # top_p applies to the top_k tokens renormalized (transformers' order): 0.4 of 0.7 already reaches 0.5 there,
    # while over the whole distribution 0.4 + 0.3 was needed
    torch.testing.assert_close(sampling_probabilities(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=0.5)),
                               torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_sampled_tokens_follow_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    sampling = SamplingConfig(temperature=1.3, top_k=4)
    expected = sampling_probabilities(logits, sampling)
    generator = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(next_tokens(logits.expand(n, -1), sampling, generator), minlength=5)
    assert counts[3] == 0  # outside the top 4
    sigma = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 5 * sigma + 1e-9).all(), (counts, n * expected)


def test_generate_samples_reproducibly():
    model = FixedLogits(torch.zeros(50))  # uniform: 30 draws from 50 tokens
    greedy = generate(model, torch.tensor([[1]]), 30)
    assert greedy.tokens == [0] * 30
    sampled = generate(model, torch.tensor([[1]]), 30, sampling=SamplingConfig(temperature=1.0, seed=7))
    again = generate(model, torch.tensor([[1]]), 30, sampling=SamplingConfig(temperature=1.0, seed=7))
    other = generate(model, torch.tensor([[1]]), 30, sampling=SamplingConfig(temperature=1.0, seed=8))
    assert sampled.tokens == again.tokens != other.tokens
    assert len(set(sampled.tokens)) > 10
    limited = generate(model, torch.tensor([[1]]), 30, sampling=SamplingConfig(temperature=2.0, top_k=1, seed=7))
    assert limited.tokens == greedy.tokens


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    torch.testing.assert_close(penalize_repetition(logits, torch.tensor([[True, True, False]]), 2.0),
                               torch.tensor([[1.0, -2.0, 0.5]]))
    model = FixedLogits(torch.tensor([3.0, 2.0, 1.0, 0.5]))
    penalty = SamplingConfig(repetition_penalty=10.0)  # greedy: a seen token's logit drops tenfold
    assert generate(model, torch.tensor([[3]]), 4, sampling=penalty).tokens == [0, 1, 2, 0]
    assert generate(model, torch.tensor([[3]]), 4).tokens == [0, 0, 0, 0]
    # per row, and the left padding (token id 0) of the shorter prompt does not count as seen
    batch = generate_batch(model, [[3], [1, 3]], 4, sampling=penalty)
    assert batch.tokens == [[0, 1, 2, 0], [0, 2, 0, 0]]  # a token is penalized once, however often it recurs
    sampled = SamplingConfig(temperature=1.0, top_k=1, repetition_penalty=10.0, seed=2)
    assert generate(model, torch.tensor([[3]]), 4, sampling=sampled).tokens == [0, 1, 2, 0]
    # bf16 logits are penalized in fp32, as transformers does: 3 / 1.3 = 2.3077 rounds to bf16's 2.3125 and tied
    # with the unseen token's 2.3125, so the seen token 0 won the argmax
    logits = torch.tensor([[3.0, 2.3125]], dtype=torch.bfloat16)
    assert next_tokens(logits, SamplingConfig(repetition_penalty=1.3), None, torch.tensor([[True, False]])) == 1


@pytest.mark.parametrize("bad", [{3: math.nan}, {3: math.inf}, dict.fromkeys(range(8), -math.inf)])
def test_generate_refuses_logits_no_token_can_be_drawn_from(bad):
    """NaN or +inf logits, or -inf for every token: argmax or multinomial would return garbage or fail deep inside."""
    logits = torch.zeros(8)
    for token, value in bad.items():
        logits[token] = value
    for sampling in (SamplingConfig(), SamplingConfig(temperature=1.0)):
        with pytest.raises(GenerationError, match="NaN or \\+inf logits, or -inf for every token"):
            generate(FixedLogits(logits), torch.tensor([[1]]), 3, sampling=sampling)


def test_the_smallest_temperature_samples_the_argmax():
    """Logits divided by a tiny temperature overflowed (inf - inf = NaN in the softmax): they are shifted first."""
    logits = torch.tensor([1.0, 3.0, -math.inf, 2.0, 3.0 - 2**-20])
    probs = sampling_probabilities(logits, SamplingConfig(temperature=2.0**-126))
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    tied = sampling_probabilities(torch.tensor([3.0, 1.0, 3.0]), SamplingConfig(temperature=2.0**-126))
    assert tied.tolist() == [0.5, 0.0, 0.5]
    assert generate(FixedLogits(logits), torch.tensor([[1]]), 3, sampling=SamplingConfig(temperature=1e-30)).tokens \
        == [1, 1, 1]


def test_sampling_probabilities_per_row():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    probs = sampling_probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))
    for row in range(2):
        torch.testing.assert_close(probs[row], sampling_probabilities(logits[row], SamplingConfig(temperature=1.0,
                                                                                                  top_k=2)))
    assert probs[0, 0] == 0 and probs[1, 2] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_batch_generation_matches_one_prompt_at_a_time(arch):
    model = make_model(arch).eval()
    prompts = [[5, 17, 42, 7, 99], [3], [8, 1, 60, 2, 2, 9, 14, 33, 21], [77, 78]]
    result = generate_batch(model, prompts, 12, stop_at_eos=False)
    assert isinstance(result, BatchGenerationResult) and result.prompt_tokens == [5, 1, 9, 2]
    for prompt, tokens in zip(prompts, result.tokens):
        assert tokens == generate(model, torch.tensor([prompt]), 12, stop_at_eos=False).tokens
    d = result.to_dict()
    assert d["new_tokens"] == 48 and d["decode_tokens_per_second"] > 0
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\)"):
        generate_batch(model, [[1, 2], [vocab]], 3)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(model, torch.tensor([[-1, 5]]), 3)


def test_batch_generation_with_the_kernels(quantized_llama):
    _, _, checkpoint = quantized_llama
    model = load_quantized(checkpoint)
    prompts = [[5, 17, 42, 7, 99, 3], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]
    fast = generate_batch(model, prompts, 10, stop_at_eos=False)
    for prompt, tokens in zip(prompts, fast.tokens):
        assert tokens == generate(model, torch.tensor([prompt]), 10, stop_at_eos=False).tokens
    slow = generate_batch(use_reference(model), prompts, 10, stop_at_eos=False)
    use_reference(model, False)
    assert slow.tokens == fast.tokens


def test_batch_rows_stop_at_their_own_eos():
    class Counter(torch.nn.Module):  # predicts (last token + 1) mod 8; 6 is the end-of-sequence token
        config = type("C", (), {"eos_token_id": [6]})()

        def forward(self, input_ids, cache=None, use_cache=True, attention_mask=None, position_ids=None):
            assert attention_mask is not None and position_ids is not None
            return {"logits": torch.nn.functional.one_hot((input_ids + 1) % 8, 8).float(), "cache": None}

    result = generate_batch(Counter(), [[1, 2], [4], [7, 7, 5]], 5)
    assert result.tokens == [[3, 4, 5, 6], [5, 6], [6]]
    assert generate_batch(Counter(), [[1, 2], [4]], 5, stop_at_eos=False).tokens == [[3, 4, 5, 6, 7], [5, 6, 7, 0, 1]]
    assert generate_batch(Counter(), torch.tensor([[1, 2], [3, 4]]), 2).tokens == [[3, 4], [5, 6]]  # one per row
    from_iterator = generate_batch(Counter(), iter([[1, 2], [4]]), 2).tokens
    assert generate_batch(Counter(), ([1, 2], [4]), 2).tokens == from_iterator == [[3, 4], [5, 6]]
    for bad, index, got in (([[1], []], 1, r"shape \(0,\)"), ([[1.7, 2.2]], 0, "torch.float32"),
                            ([torch.tensor([[1, 2], [3, 4]])], 0, r"shape \(2, 2\)"), (["hello"], 0, "a str"),
                            ([[1], [[2], [3, 4]]], 1, "a list"), ([torch.tensor([True])], 0, "torch.bool")):
        with pytest.raises(ValueError, match=rf"prompt {index} must be 1-D integer token ids .*got .*{got}"):
            generate_batch(Counter(), bad, 3)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_batch(Counter(), [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(Counter(), [[1]], 0)


def test_batch_sampling_is_reproducible():
    model = FixedLogits(torch.zeros(50))
    sampling = SamplingConfig(temperature=1.0, seed=3)
    first = generate_batch(model, [[1], [2, 3]], 20, sampling=sampling)
    assert first.tokens == generate_batch(model, [[1], [2, 3]], 20, sampling=sampling).tokens
    assert first.tokens[0] != first.tokens[1]


def test_prefill_asks_for_the_last_logits_only():
    calls: list[tuple[int, int]] = []

    class Keeps(torch.nn.Module):  # takes logits_to_keep as transformers' causal LMs do
        config = type("C", (), {"eos_token_id": None})()

        def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
            calls.append((input_ids.shape[1], logits_to_keep))
            return {"logits": torch.zeros(1, logits_to_keep or input_ids.shape[1], 4), "cache": None}

    generate(Keeps(), torch.tensor([[1, 1, 1]]), 2)
    assert calls == [(3, 1), (1, 0)]


def test_cli_generate(quantized_llama, tmp_path, capsys, monkeypatch):
    _, _, checkpoint = quantized_llama
    out = tmp_path / "gen.json"
    assert main(["generate", str(checkpoint), "--prompt", "The", "--max-new-tokens", "6", "--ignore-eos",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err
    result = json.loads(out.read_text())
    assert result["new_tokens"] == 6 and captured.out.strip() == result["text"].strip()
    ref = tmp_path / "ref.json"
    assert main(["generate", str(checkpoint), "--prompt", "The", "--max-new-tokens", "6", "--ignore-eos",
                 "--reference", "--json", str(ref)]) == 0
    assert json.loads(ref.read_text())["tokens"] == result["tokens"]
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    batch = tmp_path / "batch.json"
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "--prompt", "The", "--prompt", "A longer prompt", "--max-new-tokens",
                 "6", "--ignore-eos", "--json", str(batch)]) == 0
    captured = capsys.readouterr()
    batched = json.loads(batch.read_text())
    assert batched["tokens"][0] == result["tokens"] and len(batched["tokens"][1]) == 6
    assert batched["text"][0] == result["text"] and "batch of 2" in captured.err
    assert captured.out == "".join(f"[{i}] {text}\n" for i, text in enumerate(batched["text"]))
    sampled = []
    for run in range(2):
        path = tmp_path / f"sampled{run}.json"
        assert main(["generate", str(checkpoint), "--prompt", "The", "--max-new-tokens", "8", "--ignore-eos",
                     "--temperature", "1.5", "--top-k", "20", "--top-p", "0.95", "--seed", "5",
                     "--repetition-penalty", "1.3", "--json", str(path)]) == 0
        sampled.append(json.loads(path.read_text()))
    assert sampled[0]["tokens"] == sampled[1]["tokens"] and len(sampled[0]["tokens"]) == 8
    assert sampled[0]["sampling"] == {"temperature": 1.5, "top_k": 20, "top_p": 0.95, "seed": 5,
                                      "repetition_penalty": 1.3}
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    with monkeypatch.context() as patch:  # prompts are checked before the weights load
        patch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the prompt check"))
        assert main(["generate", str(checkpoint), "--prompt", "The", "--chat"]) == 2  # the test tokenizer has none
        assert "no chat template" in capsys.readouterr().err
        assert main(["generate", str(checkpoint), "--prompt", "The", "--prompt", ""]) == 2
        assert "has no tokens" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt", "The", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


def test_cli_bench(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shapes", "48x64,20x33", "--rows", "1,5", "--repeats", "2", "--hot",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["out_features"], r["rows"]) for r in result["linear"]] == [(48, 1), (48, 5), (20, 1), (20, 5)]
    assert all(r["spqr_ms"] > 0 and r["float32_ms"] > 0 for r in result["linear"])
    assert "float16_ms" in result["linear"][0] and "float16_ms" not in result["linear"][1]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--shapes", "12by4"])
    assert exit_info.value.code == 2
    assert main(["bench", "--wbits", "9", "--shapes", "16x16"]) == 2
    for bad in (["--rows", "1,0"], ["--repeats", "0"], ["--tokens", "0"], ["--batch", "0"]):
        capsys.readouterr()
        assert main(["bench", "--shapes", "16x16", *bad]) == 2
        assert f"{bad[0]} must be >= 1" in capsys.readouterr().err
    # a shape that cannot fit in memory is refused before the bandwidth test and the earlier shapes run (it was an
    # allocator traceback after them)
    assert main(["bench", "--shapes", "16x16,100000000x100000000"]) == 2
    assert "--shapes 100000000x100000000 with 512 rows needs about" in capsys.readouterr().err
    assert main(["bench", "--shapes", "16x16", "--rows", "100000000000"]) == 2
    assert "GiB of memory is available" in capsys.readouterr().err


def test_cli_bench_generation(quantized_llama, tmp_path, capsys):
    _, _, checkpoint = quantized_llama
    for batch in (1, 3):
        out = tmp_path / f"bench{batch}.json"
        assert main(["bench", "--shapes", "16x32", "--rows", "1", "--repeats", "1", "--model", str(checkpoint),
                     "--tokens", "5", "--batch", str(batch), "--json", str(out)]) == 0
        generation = json.loads(out.read_text())["generation"]
        assert generation["batch"] == batch and generation["new_tokens"] == 5 * batch
        assert generation["decode_tokens_per_second"] > 0
    assert generation["tokens"][0] == generation["tokens"][2]  # the same prompt three times
    assert "batch of 3" in capsys.readouterr().out
    # one token: no decode step, so no decode speed: null, not NaN (which is not JSON)
    assert main(["bench", "--shapes", "16x32", "--rows", "1", "--repeats", "1", "--model", str(checkpoint),
                 "--tokens", "1", "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["generation"]["decode_tokens_per_second"] is None
    assert "decode: no decode step" in capsys.readouterr().out  # it printed "decode nan tokens/s"
    assert main(["generate", str(checkpoint), "--prompt", "The", "--max-new-tokens", "1"]) == 0
    assert "0 tokens in 0.000 s (no decode step)" in capsys.readouterr().err


def test_cli_refuses_bad_bench_model_and_json_paths_before_any_work(quantized_llama, tmp_path, capsys, monkeypatch):
    """They were found out only after the kernel timings (minutes at the default shapes) or after generating."""
    import spqr.bench

    def no_timing(*args, **kwargs):
        raise AssertionError("the kernels were timed before the options were checked")

    monkeypatch.setattr(spqr.bench, "bench_linear_shape", no_timing)
    _, _, checkpoint = quantized_llama
    for argv, message in (
            (["bench", "--model", str(tmp_path / "nothing")], "does not exist"),
            (["bench", "--model", str(checkpoint), "--prompt", ""], "has no tokens"),
            (["bench", "--json", str(tmp_path)], "is a directory"),
            (["generate", str(checkpoint), "--prompt", "Hi", "--json", str(tmp_path)], "is a directory"),
            (["generate", str(checkpoint), "--prompt", "Hi", "--json", str(checkpoint / "config.json" / "x.json")],
             "cannot create its directory")):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_load_with_bfloat16_unquantized_parts(quantized_llama):
    _, _, checkpoint = quantized_llama
    fp32 = load_quantized(checkpoint)
    bf16 = load_quantized(checkpoint, dtype=torch.bfloat16)
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    q = [m for m in bf16.modules() if isinstance(m, SpQRLinear)]
    assert q and all(m.qweight.dtype == torch.int32 for m in q)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        a, b = fp32(ids).logits, bf16(ids).logits
    assert b.dtype == torch.bfloat16
    assert float((a - b.float()).norm() / a.norm()) < 0.05  # bf16 rounding of activations, not a different model


def test_dtype_casts_leave_packed_tensors_alone(quantized_llama):
    _, _, checkpoint = quantized_llama
    model = load_quantized(checkpoint)
    layer = next(m for m in model.modules() if isinstance(m, SpQRLinear))
    before = {k: v.clone() for k, v in layer.packed_tensors().items() if k != "bias"}
    x = torch.randn(3, layer.in_features)
    y32 = layer(x)
    model.to(torch.bfloat16)
    after = layer.packed_tensors()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    torch.testing.assert_close(layer(x.bfloat16()).float(), y32, rtol=0.02, atol=0.02)
    model.half().float().to("cpu")
    assert all(torch.equal(before[k], layer.packed_tensors()[k]) for k in before)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_generating_past_the_context_warns(caplog):
    model = FixedLogits(torch.tensor([0.0, 1.0]))
    model.config = type("C", (), {"eos_token_id": None, "max_position_embeddings": 8})()
    with caplog.at_level("WARNING", logger="spqr.generate"):
        generate(model, torch.tensor([[0, 1, 0]]), 5)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="spqr.generate"):
        generate_batch(model, [[0, 1, 0], [1]], 6)
    assert "3 prompt tokens + 6 new tokens exceed the model's context of 8 positions" in caplog.text


def test_generating_past_a_table_of_positions_is_a_clear_error():
    """opt, gpt_bigcode, gptj, ... look their positions up in a table: past the context an IndexError from deep
    inside ended the generation (and `spqr generate` with a traceback)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16))
    prompt = torch.tensor([[2, 5, 7, 9, 11, 13, 3, 4, 8, 6]])
    assert len(generate(model, prompt, 7, stop_at_eos=False).tokens) == 7  # the 7th is never read back
    with pytest.raises(GenerationError, match="OPTForCausalLM failed on token 17 of the sequence, past its context "
                                              "of 16 positions .* ask for at most 7 new tokens"):
        generate(model, prompt, 8, stop_at_eos=False)
    with pytest.raises(GenerationError, match="on token 20 .* the prompt alone has 20 tokens"):
        generate(model, torch.arange(20).remainder(50)[None], 1)


def test_max_new_tokens_takes_any_integer():
    import numpy as np

    model = FixedLogits(torch.tensor([0.0, 1.0]))
    for count in (np.int64(3), torch.tensor(3)):
        assert len(generate(model, torch.tensor([[0]]), count).tokens) == 3
    for bad in (True, 2.0, np.float64(3), torch.tensor(3.0), 0):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            generate(model, torch.tensor([[0]]), bad)


def test_cli_streams_characters_split_across_tokens(quantized_llama, tokenizer, monkeypatch, capsys):
    """Byte-level tokens of a multi-byte character decode to U+FFFD until the last one: the stream printed
    '��� caf�' for '日本語 café', and never the characters themselves."""
    import spqr.cli
    from spqr.generate import GenerationResult

    text = "日本語 café"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text)  # some characters take several tokens

    def fake_generate(model, prompt, max_new_tokens, stop_at_eos, on_token, sampling):
        for token in ids:
            on_token(token)
        return GenerationResult(prompt.shape[1], ids, 0.1, 0.1)

    monkeypatch.setattr(spqr.cli, "generate", fake_generate)
    assert main(["generate", str(quantized_llama[2]), "--prompt", "The"]) == 0
    assert capsys.readouterr().out == text + "\n"

    cut = ids[:-1]  # the generation ends in the middle of 'é': what was held back is printed at the end
    ids[:] = cut
    assert main(["generate", str(quantized_llama[2]), "--prompt", "The"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(cut) + "\n"


def test_cli_generate_ends_the_streamed_line_before_an_error(quantized_llama, monkeypatch, capsys):
    import spqr.cli

    def failing_generate(model, prompt, max_new_tokens, stop_at_eos, on_token, sampling):
        on_token(5)
        raise GenerationError("the model produced NaN")

    monkeypatch.setattr(spqr.cli, "generate", failing_generate)
    assert main(["generate", str(quantized_llama[2]), "--prompt", "The"]) == 2
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and len(captured.out) > 1
    assert captured.err.strip().endswith("spqr generate: error: the model produced NaN")


def test_cli_generate_into_a_closed_pipe_stops_quietly(quantized_llama):
    """`spqr generate ... | head -c 50`: the stream's print raised BrokenPipeError, a traceback."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "spqr.cli", "generate", str(quantized_llama[2]), "--prompt",
                                "The", "--max-new-tokens", "20", "--ignore-eos"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader goes away before anything is written
    assert process.wait(timeout=300) == 141
    assert "Traceback" not in process.stderr.read()


def test_generation_stops_at_the_generation_configs_end_of_turn_token(tmp_path, tokenizer):
    """Chat models list their end-of-turn token in generation_config.json only (Llama-3's <|eot_id|>): it was
    ignored, and quantized checkpoints did not keep that file."""
    from spqr.hf import load_model_lazy, save_quantized

    model = make_model("llama")
    ids = random_windows(1, 5, seed=3)
    free = generate(model, ids, 6, stop_at_eos=False).tokens
    end_of_turn = free[2]
    assert end_of_turn not in free[:2]
    model.generation_config.eos_token_id = [0, end_of_turn]
    assert generate(model, ids, 6).tokens == free[:3]
    model.save_pretrained(tmp_path / "fp")
    tokenizer.save_pretrained(tmp_path / "fp")

    lazy, _, _ = load_model_lazy(tmp_path / "fp")  # the blocks stay on the meta device; only the config matters
    assert lazy.generation_config.eos_token_id == [0, end_of_turn]
    quantize(model, random_windows(4, 16), QuantConfig(wbits=4), progress=False)
    save_quantized(model, tmp_path / "q", QuantConfig(wbits=4).to_dict())
    assert json.loads((tmp_path / "q" / "generation_config.json").read_text())["eos_token_id"] == [0, end_of_turn]
    assert load_quantized(tmp_path / "q").generation_config.eos_token_id == [0, end_of_turn]


def test_cli_chat_template_failures_are_named(quantized_llama, tokenizer, tmp_path, capsys):
    import shutil

    for template, expected in [("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
                               ("{{ raise_exception('needs a system message') }}", "needs a system message"),
                               ("{% if false %}x{% endif %}", "made no tokens")]:
        checkpoint = tmp_path / "ckpt"
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.copytree(quantized_llama[2], checkpoint)
        (checkpoint / "chat_template.jinja").write_text(template)
        assert main(["generate", str(checkpoint), "--prompt", "Hello", "--chat"]) == 2, template
        err = capsys.readouterr().err
        assert "spqr generate: error: --chat" in err and expected in err and "Traceback" not in err, err


def test_a_model_left_in_training_mode_generates_without_dropout():
    """Greedy generation on a model in training mode gave other tokens on every call (dropout on)."""
    model = make_model("llama")
    ids = random_windows(1, 6, seed=2)
    expected = generate(model, ids, 8, stop_at_eos=False).tokens
    training_with_dropout(model)
    assert generate(model, ids, 8, stop_at_eos=False).tokens == expected
    assert generate_batch(model, [ids[0], ids[0, :3]], 8, stop_at_eos=False).tokens[0] == expected
    assert model.training


def test_bench_calls_a_layer_that_stays_in_cache_warm():
    """The cold pool is at most 1024 copies: a 16x32 layer's fit in the last-level cache, yet cold_cache said true."""
    from spqr.bench import bench_linear_shape

    result = bench_linear_shape(16, 32, 1, repeats=1, rounds=1, warmup=0, baselines=(torch.float32,))
    assert result["weight_copies"] == 1024 and result["cold_cache"] is False
