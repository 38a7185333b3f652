"""Token generation with a KV cache (greedy or sampled, one prompt or a batch), timing prefill and
decode separately.

A small loop of our own rather than `model.generate`, so that the timings are exactly the two
phases (prompt forward; one forward per new token) and tokens can be streamed as they come.
A batch runs its prompts left-padded side by side: each step is one forward of B rows, so every
quantized layer reads its weights once for all of them (the kernels' batched matrix-vector path).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from spqr.config import SamplingConfig
from spqr.data import check_token_ids, describe, is_integer_tensor
from spqr.nn import SpQRLinear, in_eval_mode

log = logging.getLogger(__name__)
GREEDY = SamplingConfig()


class GenerationError(ValueError):
    """The model's output cannot be decoded into tokens (NaN or +inf logits, or -inf for every token), or the model
    cannot go past its context."""


class _Throughput:
    """tokens/s and the JSON form of a generation result, from its prompt lengths and per-prompt new tokens."""

    prefill_seconds: float  # the prompt forward, which also yields each prompt's first new token
    decode_seconds: float  # the remaining forwards, one per step for all prompts

    def _prompt_lengths(self) -> list[int]:
        raise NotImplementedError

    def _new_tokens(self) -> list[list[int]]:
        raise NotImplementedError

    @property
    def prompt_token_count(self) -> int:
        return sum(self._prompt_lengths())

    @property
    def decoded_token_count(self) -> int:
        """New tokens after each prompt's first (those the decode steps produced)."""
        return sum(len(t) - 1 for t in self._new_tokens())

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_token_count / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        decoded = self.decoded_token_count
        return decoded / self.decode_seconds if decoded and self.decode_seconds else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "new_tokens": sum(len(t) for t in self._new_tokens()),
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclass
class GenerationResult(_Throughput):
    prompt_tokens: int
    tokens: list[int]  # the new tokens only
    prefill_seconds: float
    decode_seconds: float

    def _prompt_lengths(self) -> list[int]:
        return [self.prompt_tokens]

    def _new_tokens(self) -> list[list[int]]:
        return [self.tokens]


@dataclass
class BatchGenerationResult(_Throughput):
    prompt_tokens: list[int]  # each prompt's length
    tokens: list[list[int]]  # each prompt's new tokens (up to and including its end-of-sequence token)
    prefill_seconds: float
    decode_seconds: float

    def _prompt_lengths(self) -> list[int]:
        return self.prompt_tokens

    def _new_tokens(self) -> list[list[int]]:
        return self.tokens


def _last_logits_only(model: nn.Module) -> dict[str, int]:
    """The forward argument that computes the logits of the last position only (as `model.generate` does):
    the prompt's other logits are never used, and for a small model with a large vocabulary they are a
    large share of the prompt's work (SmolLM2, 256 tokens: 14.5 of 69 GFLOP)."""
    parameters = inspect.signature(model.forward).parameters
    return next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), {})


def sampling_probabilities(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution a sampled token is drawn from: logits [..., V] -> probabilities [..., V] (fp32) of
    softmax(logits / temperature), zero outside the top_k most likely tokens, then outside the smallest set of the
    remaining most likely tokens whose renormalized probability reaches top_p (transformers' order), renormalized.
    Needs temperature > 0.

    The logits are shifted by their maximum before the division, so a tiny temperature gives 0 and -inf (the
    argmax, ties shared), not inf - inf."""
    logits = logits.float()
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / sampling.temperature, dim=-1)
    if sampling.top_k or sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # stable: ties keep the lower id
        keep = torch.ones_like(sorted_probs, dtype=torch.bool)
        if sampling.top_k:
            keep[..., sampling.top_k:] = False
        if sampling.top_p < 1:  # a token stays while the more likely ones before it sum to less than top_p
            kept = sorted_probs * keep
            kept = kept / kept.sum(-1, keepdim=True)
            keep &= (kept.cumsum(-1) - kept) < sampling.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return probs / probs.sum(-1, keepdim=True)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V] with the entries of seen tokens (seen [B, V] bool) divided by penalty where positive and
    multiplied by it where negative (so that penalty > 1 always makes them less likely)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's next token id [B] (int64) from the last position's logits [B, V]: argmax when greedy, else one
    draw per row (generator); seen [B, V] (bool): the tokens that sampling.repetition_penalty applies to."""
    if torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all(-1).any():
        raise GenerationError("the model produced NaN or +inf logits, or -inf for every token (are its weights and "
                              "inputs finite?)")
    logits = logits.float()  # as transformers' generate: the penalty in bf16 changed tokens
    if seen is not None and sampling.repetition_penalty != 1:
        logits = penalize_repetition(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probabilities(logits, sampling), 1, generator=generator).squeeze(-1)


def _eos_ids(model: nn.Module, stop_at_eos: bool) -> set[int]:
    """End-of-sequence ids of the model's config and of its generation config (where chat models list their
    end-of-turn token), as transformers' generate takes them."""
    ids: set[int] = set()
    if not stop_at_eos:
        return ids
    for source in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids


@in_eval_mode
def _run(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
         eos_ids: set[int], sampling: SamplingConfig | None, on_token: Callable[[int], None] | None,
         ) -> tuple[list[list[int]], float, float]:
    """The generation loop over input_ids [B, T] (left-padded where attention_mask [B, T] says so; None: no
    padding): each row's new tokens, the prefill and the decode seconds. A row stops at its first
    end-of-sequence token (the batch goes on while any row has not); on_token gets row 0's tokens."""
    try:
        count = None if isinstance(max_new_tokens, bool) else operator.index(max_new_tokens)  # numpy, 0-d tensors
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = count
    sampling = GREEDY if sampling is None else sampling
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a spqr.SamplingConfig, got {type(sampling).__name__}")
    check_token_ids(input_ids, getattr(model.config, "vocab_size", None), "input_ids")
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and input_ids.shape[1] + max_new_tokens > context:
        log.warning("spqr: %d prompt tokens + %d new tokens exceed the model's context of %d positions: the tokens "
                    "past it are unlikely to make sense", input_ids.shape[1], max_new_tokens, context)
    generator = None if sampling.greedy else torch.Generator(input_ids.device).manual_seed(sampling.seed)
    padding = {}
    if attention_mask is not None:  # positions count each row's own tokens only
        padding = {"attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)}
    prompt_length = input_ids.shape[1]

    def forward(length: int, **inputs) -> dict:
        """The model's forward over a sequence of `length` tokens so far; past the context, a model with a table of
        positions (opt, gpt_bigcode, gptj, ...) fails deep inside with an IndexError: say what happened."""
        try:
            return model(use_cache=True, **inputs)
        except IndexError as e:
            if isinstance(context, int) and length > context:
                advice = (f"the prompt alone has {prompt_length} tokens" if prompt_length > context else
                          f"with {prompt_length} prompt tokens, ask for at most {context - prompt_length + 1} new "
                          "tokens (the last one is never read back)")
                raise GenerationError(
                    f"{type(model).__name__} failed on token {length} of the sequence, past its context of "
                    f"{context} positions (models with a table of positions cannot go beyond it): {advice} "
                    f"({type(e).__name__}: {e})") from e
            raise

    start = time.perf_counter()
    out = forward(prompt_length, input_ids=input_ids, **padding, **_last_logits_only(model))
    seen = None  # [B, V]: the tokens of each row's prompt (not its padding) and output, for the repetition penalty
    if sampling.repetition_penalty != 1:
        seen = torch.zeros(len(input_ids), out["logits"].shape[-1], dtype=torch.bool, device=input_ids.device)
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(input_ids)
        seen[rows[real], input_ids[real]] = True
    token = next_tokens(out["logits"][:, -1], sampling, generator, seen)
    prefill = time.perf_counter() - start
    tokens = [[t] for t in token.tolist()]
    done = [t in eos_ids for t in token.tolist()]
    if on_token:
        on_token(tokens[0][0])
    # the model's cache, under the name its output gives it (transformers 5.x renamed the KV cache; mamba's state)
    cache_key = next((key for key in ("cache", "past_key_values", "cache_params") if key in out), None)
    if cache_key is None:
        raise GenerationError(f"{type(model).__name__} returned no cache with use_cache=True (its output has "
                              f"{list(out.keys())}): spqr's generation loop needs one")
    start = time.perf_counter()
    for step in range(max_new_tokens - 1):
        if all(done):
            break
        # a state cache (mamba's) needs the position too in transformers 5.0 (later versions infer it)
        position = ({"cache_position": torch.tensor([input_ids.shape[1] + step], device=input_ids.device)}
                    if cache_key == "cache_params" else {})
        if padding:
            mask = padding["attention_mask"]
            padding = {"attention_mask": torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1),
                       "position_ids": padding["position_ids"][:, -1:] + 1}
        if seen is not None:
            seen[torch.arange(len(token), device=token.device), token] = True
        out = forward(prompt_length + step + 1, input_ids=token[:, None], **{cache_key: out[cache_key]}, **padding,
                      **position)
        token = next_tokens(out["logits"][:, -1], sampling, generator, seen)
        for row, t in enumerate(token.tolist()):  # finished rows go on computing; their tokens are dropped
            if not done[row]:
                tokens[row].append(t)
                done[row] = t in eos_ids
                if on_token and row == 0:
                    on_token(t)
    return tokens, prefill, time.perf_counter() - start


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, stop_at_eos: bool = True,
             on_token: Callable[[int], None] | None = None,
             sampling: SamplingConfig | None = GREEDY) -> GenerationResult:
    """Up to max_new_tokens after input_ids [1, T] (integer ids), greedy (sampling None or the default) or sampled
    as `sampling` says (seeded: the same inputs and seed give the same tokens); calls on_token per token."""
    if (not is_integer_tensor(input_ids) or input_ids.ndim != 2
            or input_ids.shape[0] != 1 or input_ids.shape[1] == 0):
        raise ValueError(f"input_ids must be a tensor of integer token ids of shape [1, T] with T >= 1, got "
                         f"{describe(input_ids)}")
    tokens, prefill, decode = _run(model, input_ids.long(), None, max_new_tokens, _eos_ids(model, stop_at_eos),
                                   sampling, on_token)
    return GenerationResult(int(input_ids.shape[1]), tokens[0], prefill, decode)


@torch.inference_mode()
def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int,
                   stop_at_eos: bool = True, sampling: SamplingConfig | None = GREEDY) -> BatchGenerationResult:
    """Up to max_new_tokens after each prompt (1-D token ids, as lists or tensors, any lengths; or a 2-D tensor, one
    prompt per row), all prompts decoded side by side.

    Greedy, each prompt gets the tokens it gets alone (up to the rounding of the padded attention, which
    can flip a near tie). Sampled, the draws come from one seeded generator in row order, so the tokens
    are reproducible for the same batch but depend on its composition."""
    rows = [_prompt_row(p, i) for i, p in enumerate(prompts)]  # a 2-D tensor: one prompt per row
    if not rows:
        raise ValueError("generate_batch needs at least one prompt")
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # left padding: every row ends at its last token
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = r
        attention_mask[i, width - len(r):] = 1
    device = next(itertools.chain(model.parameters(), model.buffers()), input_ids).device  # the model's
    tokens, prefill, decode = _run(model, input_ids.to(device), attention_mask.to(device), max_new_tokens,
                                   _eos_ids(model, stop_at_eos), sampling, None)
    return BatchGenerationResult([len(r) for r in rows], tokens, prefill, decode)


def _prompt_row(prompt: Sequence[int] | torch.Tensor, index: int) -> torch.Tensor:
    """One prompt of generate_batch as int64 ids [T] (CPU); ValueError naming the prompt if it is not 1-D integer
    token ids with at least one token (a string: tokenize it first)."""
    ids = prompt if isinstance(prompt, torch.Tensor) else None
    if ids is None and not isinstance(prompt, str):
        try:
            ids = torch.as_tensor(prompt)
        except (TypeError, ValueError, RuntimeError):  # ragged nesting, objects that are not numbers
            pass
    if not is_integer_tensor(ids) or ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"prompt {index} must be 1-D integer token ids with at least one token (tokenize text "
                         f"first), got {describe(ids if ids is not None else prompt)}")
    return ids.long().cpu()


def use_reference(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every SpQRLinear of the model compute by exact dequantize-then-matmul (or back to the kernels)."""
    for module in model.modules():
        if isinstance(module, SpQRLinear):
            module.use_reference = enabled
    return model
