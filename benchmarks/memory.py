"""Peak memory of quantizing a model twice as large as the memory it is allowed to use.

Builds a synthetic llama (random weights) of about 2.5 GB in fp32, saves it as safetensors
shards, then runs `spqr quantize` on it in a fresh process confined to a memory cgroup whose
limit is --limit-fraction (default 1/2) of the model's weight bytes (no swap: if the process
needed more than the limit it would be killed). Reports whether it finished, its peak RSS
(VmHWM, which also counts memory-mapped file pages) and the cgroup's peak usage, next to the
weight bytes. Where no cgroup can be created (not root, read-only cgroupfs) it runs unconfined
and says so ("limit_enforced": false).

With lazy block loading only the embeddings, one dense decoder block, the calibration
activations (on disk with --offload-activations) and the Python/torch runtime are resident;
finished blocks are memory-mapped from the progress directory.

    sudo .venv/bin/python benchmarks/memory.py --out results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from arguments import require_at_least


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


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup paths by controller ("" for the v2 hierarchy), from /proc/self/cgroup."""
    paths = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    except (OSError, ValueError):
        pass
    return paths


class MemoryCgroup:
    """A memory cgroup (v2 or v1) with a hard limit and no swap, or None from `create` if impossible."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @classmethod
    def create(cls, limit_bytes: int) -> MemoryCgroup | None:
        """A new cgroup under the caller's own (so that the caller's limits still hold), else under the hierarchy's
        root; one whose limit cannot be set (memory controller not enabled there) is removed and not used."""
        name = f"spqr-memory-bench-{os.getpid()}"
        v2_root, v1_root = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        own = _own_cgroups()
        if (v2_root / "cgroup.controllers").is_file():
            places = [(v2_root / own.get("", "").lstrip("/"), 2), (v2_root, 2)]
        else:
            places = [(v1_root / own.get("memory", "").lstrip("/"), 1), (v1_root, 1)]
        for parent, version in dict.fromkeys(places):
            limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
            path = parent / name
            try:
                path.mkdir()
            except OSError:
                continue
            try:
                (path / limit_file).write_text(str(limit_bytes))
                if version == 2 and (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
                return cls(path, version)
            except OSError:
                path.rmdir()
        return None

    def add_self(self) -> None:
        """Move the calling process into the cgroup (used between fork and exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def read(self, v1: str, v2: str) -> int | None:
        path = self.path / (v2 if self.version == 2 else v1)
        if not path.is_file():
            return None
        text = path.read_text()
        return int(text.split("max ")[1].split()[0]) if self.version == 2 and "events" in v2 else int(text)

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/memory.json")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--limit-fraction", type=float, default=0.5, help="memory limit / weight bytes")
    parser.add_argument("--no-offload", action="store_true", help="keep calibration activations in memory")
    args = parser.parse_args()
    require_at_least(parser, ("--layers", args.layers, 1), ("--hidden", args.hidden, 64),
                     ("--intermediate", args.intermediate, 16), ("--vocab", args.vocab, 16),
                     ("--nsamples", args.nsamples, 1), ("--seqlen", args.seqlen, 2))
    if not 0 < args.limit_fraction <= 4:
        parser.error(f"--limit-fraction must be in (0, 4], got {args.limit_fraction}")

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "model", Path(tmp) / "quantized"
        weight_bytes = build_model(source, args.layers, args.hidden, args.intermediate, args.vocab)
        limit = int(weight_bytes * args.limit_fraction)
        cgroup = MemoryCgroup.create(limit)
        summary_path = Path(tmp) / "summary.json"
        command = [sys.executable, "-m", "spqr.cli", "quantize", str(source), "-o", str(target),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--json", str(summary_path)]
        if not args.no_offload:
            command.append("--offload-activations")
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, preexec_fn=cgroup.add_self if cgroup else None)
            seconds = time.perf_counter() - start
            cgroup_peak = cgroup.read("memory.max_usage_in_bytes", "memory.peak") if cgroup else None
            hit_limit = cgroup.read("memory.failcnt", "memory.events") if cgroup else None
        finally:
            if cgroup:
                cgroup.remove()
        finished = proc.returncode == 0
        # The CLI's own VmHWM: getrusage(RUSAGE_CHILDREN) would also count this (large) parent,
        # whose memory the child shares between fork and exec.
        peak_rss = json.loads(summary_path.read_text())["peak_rss_bytes"] if finished else None
        checkpoint_bytes = (target / "model.safetensors").stat().st_size if finished else None
    result = {
        "model": vars(args), "weight_bytes": weight_bytes,
        "limit_bytes": limit, "limit_enforced": cgroup is not None,
        "cgroup": f"v{cgroup.version}" if cgroup else None,
        "finished": finished, "returncode": proc.returncode,
        "peak_rss_bytes": peak_rss, "peak_rss_over_weights": peak_rss / weight_bytes if peak_rss else None,
        "cgroup_peak_bytes": cgroup_peak, "times_limit_reached": hit_limit,
        "checkpoint_bytes": checkpoint_bytes, "quantize_seconds": seconds,
    }
    print(json.dumps(result, indent=2))
    if proc.returncode == 2:  # the CLI refused its arguments (its message is above): not a measurement
        raise SystemExit("spqr quantize refused the benchmark's settings; nothing written")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not finished:
        raise SystemExit(f"quantization did not finish under the limit (exit code {proc.returncode})")


if __name__ == "__main__":
    main()
