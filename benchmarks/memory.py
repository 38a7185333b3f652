"""Peak memory of quantizing a model that is much larger than what stays resident.

Builds a synthetic llama (random weights) of about --gb GB in fp32, saves it as safetensors
shards, then runs `spqr quantize` on it in a fresh process and reports that process's peak RSS
next to the size of the model's weights. With lazy block loading only the embeddings, one dense
decoder block, the packed blocks so far and the calibration activations are in memory.

    .venv/bin/python benchmarks/memory.py --out results/memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model(directory: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Save a random llama with the given sizes (and a tiny tokenizer); return its weight bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="500MB")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    text = (Path(__file__).resolve().parent.parent / "spqr/datasets/wikitext2/wiki.valid.raw").read_text()[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=min(vocab, 2000), show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(directory)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/memory.json")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "model", Path(tmp) / "quantized"
        weight_bytes = build_model(source, args.layers, args.hidden, args.intermediate, args.vocab)
        start = time.perf_counter()
        summary_path = Path(tmp) / "summary.json"
        subprocess.run([sys.executable, "-m", "spqr.cli", "quantize", str(source), "-o", str(target),
                        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                        "--json", str(summary_path)], check=True)
        seconds = time.perf_counter() - start
        # The CLI's own VmHWM: getrusage(RUSAGE_CHILDREN) would also count this (large) parent,
        # whose memory the child shares between fork and exec.
        peak_rss = json.loads(summary_path.read_text())["peak_rss_bytes"]
        checkpoint_bytes = (target / "model.safetensors").stat().st_size
    result = {
        "model": vars(args), "weight_bytes": weight_bytes, "peak_rss_bytes": peak_rss,
        "peak_rss_over_weights": peak_rss / weight_bytes, "checkpoint_bytes": checkpoint_bytes,
        "quantize_seconds": seconds,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
