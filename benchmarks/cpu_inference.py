"""CPU inference benchmark (issue: run SpQR models fast on CPU). Writes JSON with every measurement.

    .venv/bin/python benchmarks/cpu_inference.py --checkpoint out/smollm2-spqr-w3 --out results/cpu_inference.json

1. Matrix-vector, 3-bit beta1=beta2=16, 1% outliers, on 4096x4096, 11008x4096, 4096x11008: a SpQRLinear
   call (and the registered op, `spqr_op_ms`) against torch fp16 and fp32 F.linear (cold caches: weights
   rotate through copies larger than the LLC); achieved GB/s of the packed bytes against the machine's read
   bandwidth. Also 2 and 4 bits.
2. Matrix-matrix with 64 and 512 input rows against fp32 F.linear (on an AMX machine the default AMX kernel,
   and the AVX-512 kernel as `spqr_gemm_ms`).
3. Greedy generation of 128 tokens after a 256-token prompt with the 3-bit SmolLM2 checkpoint: fp32
   model vs kernels vs the dequantize-reference model (prefill and decode tokens/s; do the kernel
   tokens match the reference's?). After a warm-up, the median of three rounds (fp32 and kernels taking
   turns; the slow reference model once). Also the checkpoints made with --quantize-head and with
   --head-wbits 5 or 6 --quantize-embeddings, where they exist.
4. A synthetic ~1.1B llama (random weights): fp32 decode tokens/s vs the same shapes as 3-bit SpQR layers
   (decoder blocks only; also with the lm_head quantized).
5. Resident memory of the loaded checkpoint against its fp16 weights (also of the one made with
   --head-wbits 5 or 6 --quantize-embeddings, where they exist: every weight matrix packed).
6. Batched decoding (generate_batch): 1, 4 and 8 prompts of 64 tokens decoded side by side, 64 new tokens
   each, fp32 model vs the 3-bit checkpoint (total decode tokens/s, median of three rounds taking turns);
   do a batch's greedy tokens equal each prompt's tokens alone?
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from arguments import require_at_least

from spqr.bench import (
    SYNTHETIC_LLAMA,
    bench_linear_shape,
    cpu_model,
    memory_bandwidth_gbs,
    replace_with_random_spqr,
    synthetic_llama,
)
from spqr.data import load_text, tokenize
from spqr.generate import generate, generate_batch, use_reference
from spqr.hf import is_quantized_checkpoint, load_model, load_quantized
from spqr.kernels import cpu

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def log(msg: str) -> None:
    print(msg, flush=True)


def kernel_section() -> dict:
    result: dict = {"matvec": [], "matvec_bits": [], "matmul": []}
    amx = bool(cpu.load() and cpu.load().has_amx)  # matmul: AMX kernel by default, the AVX-512 one timed too
    for out, inp in SHAPES:
        r = bench_linear_shape(out, inp, 1, cold=True)
        r["meets_3x_fp16"], r["meets_5x_fp32"] = r["speedup_vs_float16"] >= 3, r["speedup_vs_float32"] >= 5
        result["matvec"].append(r)
        log(f"matvec {out}x{inp}: spqr {r['spqr_ms']:.3f} ms ({r['spqr_packed_gbs']:.1f} GB/s; "
            f"through the registered op {r['spqr_op_ms']:.3f} ms), "
            f"fp16 {r['float16_ms']:.3f} ms ({r['speedup_vs_float16']:.2f}x), "
            f"fp32 {r['float32_ms']:.3f} ms ({r['speedup_vs_float32']:.2f}x)")
    for wbits in (2, 4):
        r = bench_linear_shape(4096, 4096, 1, wbits=wbits, cold=True, baselines=(torch.float16,))
        result["matvec_bits"].append(r)
        log(f"matvec 4096x4096 {wbits}-bit: spqr {r['spqr_ms']:.3f} ms ({r['speedup_vs_float16']:.2f}x fp16)")
    for out, inp in SHAPES:
        for rows in (64, 512):
            r = bench_linear_shape(out, inp, rows, cold=False, repeats=5, baselines=(torch.float32,),
                                   cpu_paths=("gemm",) if amx else ())
            r["no_slower_than_fp32"] = r["speedup_vs_float32"] >= 1
            result["matmul"].append(r)
            log(f"matmul {out}x{inp} rows={rows}: spqr {r['spqr_ms']:.2f} ms, fp32 {r['float32_ms']:.2f} ms "
                f"({r['speedup_vs_float32']:.2f}x)" + (f", AVX-512 kernel {r['spqr_gemm_ms']:.2f} ms" if amx else ""))
    return result


GENERATION_ROUNDS = 3


def _generations(models: dict, ids: torch.Tensor | list[list[int]], tokens: int,
                 rounds: int = GENERATION_ROUNDS) -> dict[str, dict]:
    """Greedy generation with each model, of one prompt (ids [1, T]) or a batch (a list of prompts, decoded side
    by side): a short warm-up (first-call costs: scratch buffers, caches), then `rounds` full generations taking
    turns model by model, so that a slow minute of this noisy machine hits them alike. Each figure is the median
    over the rounds; every round must give the same tokens."""
    def run(model, n: int):
        if isinstance(ids, list):
            return generate_batch(model, ids, n, stop_at_eos=False)
        return generate(model, ids, n, stop_at_eos=False)

    for model in models.values():
        run(model, 2)
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            runs[name].append(run(model, tokens).to_dict())
    result = {}
    for name, model_runs in runs.items():
        if any(run["tokens"] != model_runs[0]["tokens"] for run in model_runs):
            raise RuntimeError(f"{name}: greedy generation gave different tokens from one round to the next")
        median = dict(model_runs[0])
        for key in ("prefill_seconds", "decode_seconds", "prefill_tokens_per_second", "decode_tokens_per_second"):
            median[key] = statistics.median(run[key] for run in model_runs)
            median[f"{key}_all_rounds"] = [run[key] for run in model_runs]
        result[name] = median
    return result


def _generation(model, ids: torch.Tensor, tokens: int, rounds: int = GENERATION_ROUNDS) -> dict:
    return _generations({"model": model}, ids, tokens, rounds)["model"]


def _matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def smollm2_section(checkpoint: Path, tokens: int, prompt_tokens: int, head_checkpoint: Path | None,
                    embeddings_checkpoints: dict[int, Path]) -> dict:
    baseline, tokenizer = load_model(None)
    ids = tokenize(tokenizer, load_text("wikitext2", "test"))[:prompt_tokens].view(1, -1)
    model = load_quantized(checkpoint)
    timed = _generations({"fp32": baseline, "spqr": model}, ids, tokens)
    fp32, spqr = timed["fp32"], timed["spqr"]
    del baseline
    reference = _generation(use_reference(model), ids, tokens, rounds=1)  # ~2 minutes a round
    bf16 = _generation(load_quantized(checkpoint, dtype=torch.bfloat16), ids, tokens)  # unquantized parts bf16
    same = _matching_prefix(spqr["tokens"], reference["tokens"])
    result = {"checkpoint": str(checkpoint), "prompt": f"first {prompt_tokens} tokens of wikitext2 test",
              "fp32": fp32, "spqr": spqr, "reference": reference, "spqr_unquantized_bf16": bf16,
              "tokens_match_reference": spqr["tokens"] == reference["tokens"], "matching_prefix": same,
              "decode_speedup_vs_fp32": spqr["decode_tokens_per_second"] / fp32["decode_tokens_per_second"],
              "prefill_speedup_vs_fp32": spqr["prefill_tokens_per_second"] / fp32["prefill_tokens_per_second"],
              "text": tokenizer.decode(spqr["tokens"])}
    log(f"SmolLM2: fp32 prefill {fp32['prefill_tokens_per_second']:.1f} tok/s decode "
        f"{fp32['decode_tokens_per_second']:.2f} tok/s; spqr prefill {spqr['prefill_tokens_per_second']:.1f} "
        f"decode {spqr['decode_tokens_per_second']:.2f}; reference decode {reference['decode_tokens_per_second']:.2f}; "
        f"tokens match reference: {result['tokens_match_reference']} ({same}/{len(spqr['tokens'])}); "
        f"spqr with bf16 unquantized parts: prefill {bf16['prefill_tokens_per_second']:.1f} "
        f"decode {bf16['decode_tokens_per_second']:.2f}")
    variants = {"head_quantized": (head_checkpoint, "--quantize-head")}
    variants |= {f"embeddings_quantized_{bits}bit": (path, f"--head-wbits {bits} --quantize-embeddings")
                 for bits, path in embeddings_checkpoints.items()}
    for name, (variant_checkpoint, flags) in variants.items():
        if variant_checkpoint is None or not variant_checkpoint.is_dir():
            continue
        variant_model = load_quantized(variant_checkpoint)
        run = _generation(variant_model, ids, tokens)
        variant_reference = _generation(use_reference(variant_model), ids, tokens, rounds=1)
        result[name] = {
            "checkpoint": str(variant_checkpoint), "made_with": flags, "spqr": run, "reference": variant_reference,
            "tokens_match_reference": run["tokens"] == variant_reference["tokens"],
            "matching_prefix": _matching_prefix(run["tokens"], variant_reference["tokens"]),
            "decode_speedup_vs_fp32": run["decode_tokens_per_second"] / fp32["decode_tokens_per_second"],
            "prefill_speedup_vs_fp32": run["prefill_tokens_per_second"] / fp32["prefill_tokens_per_second"]}
        log(f"SmolLM2 made with {flags}: prefill {run['prefill_tokens_per_second']:.1f} tok/s, "
            f"decode {run['decode_tokens_per_second']:.2f} tok/s; tokens match its reference: "
            f"{result[name]['tokens_match_reference']}")
    return result


def batched_section(checkpoint: Path, batches: tuple[int, ...] = (1, 4, 8), prompt_tokens: int = 64,
                    tokens: int = 64, rounds: int = GENERATION_ROUNDS) -> dict:
    baseline, tokenizer = load_model(None)
    models = {"fp32": baseline, "spqr": load_quantized(checkpoint)}
    ids = tokenize(tokenizer, load_text("wikitext2", "test"))
    prompts = [ids[i * 1000:i * 1000 + prompt_tokens].tolist() for i in range(max(batches))]
    result: dict = {"prompt": f"{prompt_tokens} tokens of wikitext2 test at offsets 0, 1000, ...",
                    "new_tokens_per_prompt": tokens, "batches": []}
    for batch in batches:
        timed = _generations(models, prompts[:batch], tokens, rounds)
        entry: dict = {"batch": batch}
        for name, run in timed.items():
            entry[name] = {"decode_tokens_per_second": run["decode_tokens_per_second"],
                           "all_rounds": run["decode_tokens_per_second_all_rounds"]}
        alone = [generate(models["spqr"], torch.tensor([p]), tokens, stop_at_eos=False).tokens for p in prompts[:batch]]
        entry["spqr_batch_matches_each_prompt_alone"] = timed["spqr"]["tokens"] == alone
        entry["decode_speedup_vs_fp32"] = (entry["spqr"]["decode_tokens_per_second"]
                                           / entry["fp32"]["decode_tokens_per_second"])
        result["batches"].append(entry)
        log(f"batch {batch}: decode fp32 {entry['fp32']['decode_tokens_per_second']:.1f} tok/s, spqr "
            f"{entry['spqr']['decode_tokens_per_second']:.1f} tok/s ({entry['decode_speedup_vs_fp32']:.2f}x); "
            f"batch tokens = each prompt alone: {entry['spqr_batch_matches_each_prompt_alone']}")
    return result


def synthetic_llama_section(tokens: int) -> dict:
    model = synthetic_llama()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    fp32 = _generation(model, ids, tokens)
    log(f"synthetic llama ({params / 1e9:.2f}B params) fp32: decode {fp32['decode_tokens_per_second']:.2f} tok/s")
    replace_with_random_spqr(model)
    spqr = _generation(model, ids, tokens)
    speedup = spqr["decode_tokens_per_second"] / fp32["decode_tokens_per_second"]
    log(f"synthetic llama 3-bit: decode {spqr['decode_tokens_per_second']:.2f} tok/s ({speedup:.2f}x fp32)")
    spqr_bf16 = _generation(model.to(torch.bfloat16), ids, tokens)  # embeddings, norms, lm_head in bf16
    speedup_bf16 = spqr_bf16["decode_tokens_per_second"] / fp32["decode_tokens_per_second"]
    log(f"synthetic llama 3-bit, unquantized parts bf16: decode {spqr_bf16['decode_tokens_per_second']:.2f} "
        f"tok/s ({speedup_bf16:.2f}x fp32)")
    del model
    model = replace_with_random_spqr(synthetic_llama(), include_head=True)  # as from `--quantize-head`
    spqr_head = _generation(model, ids, tokens)
    speedup_head = spqr_head["decode_tokens_per_second"] / fp32["decode_tokens_per_second"]
    log(f"synthetic llama 3-bit with the lm_head quantized too: decode {spqr_head['decode_tokens_per_second']:.2f} "
        f"tok/s ({speedup_head:.2f}x fp32)")
    return {"parameters": params, "config": SYNTHETIC_LLAMA,
            "fp32": fp32, "spqr": spqr, "decode_speedup_vs_fp32": speedup, "meets_2_5x": speedup >= 2.5,
            "spqr_unquantized_bf16": spqr_bf16, "decode_speedup_vs_fp32_unquantized_bf16": speedup_bf16,
            "spqr_head_quantized": spqr_head, "decode_speedup_vs_fp32_head_quantized": speedup_head}


RSS_REPEATS = 3
RSS_SCRIPT = """
import json, sys
import spqr, transformers, torch
from spqr.nn import SpQRLinear
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
from accelerate import init_empty_weights
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
with init_empty_weights():  # import the model's code first: its import is not the model's memory
    transformers.AutoModelForCausalLM.from_config(config)
before = rss()
model = spqr.load_quantized(sys.argv[1], dtype=getattr(torch, sys.argv[2]) if sys.argv[2] != 'stored' else None)
after = rss()
layers = [m for m in model.modules() if isinstance(m, SpQRLinear)]
quantized = sum(m.in_features * m.out_features for m in layers)
print(json.dumps({"rss_before_bytes": before, "rss_after_bytes": after, "loaded_bytes": after - before,
                  "fp16_weight_bytes": 2 * (sum(p.numel() for p in model.parameters()) + quantized),
                  "quantized_layer_bytes": sum(b.numel() * b.element_size() for m in layers for b in m.buffers()),
                  "quantized_layer_fp16_bytes": 2 * quantized}))
"""


def memory_section(checkpoint: Path, embeddings_checkpoints: dict[int, Path]) -> dict:
    result = _memory(checkpoint)
    for bits, path in embeddings_checkpoints.items():
        if path.is_dir():
            log(f"{path} (made with --head-wbits {bits} --quantize-embeddings):")
            result[f"quantized_embeddings_{bits}bit"] = {"checkpoint": str(path), **_memory(path)}
    return result


def _memory(checkpoint: Path) -> dict:
    result = {}
    for dtype in ("stored", "bfloat16"):
        runs = []
        for _ in range(RSS_REPEATS):  # fresh processes: the allocator's state differs a little from one to the next
            out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(checkpoint), dtype], capture_output=True,
                                 text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = sorted(runs, key=lambda run: run["loaded_bytes"])[len(runs) // 2]  # the median load
        r["loaded_bytes_all_runs"] = [run["loaded_bytes"] for run in runs]
        r["ratio_to_fp16"] = r["loaded_bytes"] / r["fp16_weight_bytes"]
        r["quantized_layers_ratio_to_fp16"] = r["quantized_layer_bytes"] / r["quantized_layer_fp16_bytes"]
        r["ratio_to_fp16_worst_run"] = max(r["loaded_bytes_all_runs"]) / r["fp16_weight_bytes"]
        r["meets_one_third"] = r["ratio_to_fp16_worst_run"] <= 1 / 3  # in every run
        log(f"resident memory, unquantized parts {dtype}: {r['loaded_bytes'] / 2**20:.1f} MiB (median of "
            f"{', '.join(f'{b / 2**20:.1f}' for b in r['loaded_bytes_all_runs'])}) = "
            f"{r['ratio_to_fp16']:.3f} of the fp16 model's weights ({r['fp16_weight_bytes'] / 2**20:.1f} MiB); "
            f"quantized layers alone {r['quantized_layers_ratio_to_fp16']:.3f} of their fp16 size")
        result[dtype] = r
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("out/smollm2-spqr-w3"),
                        help="3-bit SmolLM2 checkpoint (bash scripts/quickstart.sh writes out/smollm2-spqr-w3)")
    parser.add_argument("--head-checkpoint", type=Path, default=Path("out/smollm2-spqr-w3-head"),
                        help="the same quantized with --quantize-head (measured too if it exists)")
    parser.add_argument("--embeddings-checkpoints", default="out/smollm2-spqr-w3-embeddings{bits}",
                        help="the same quantized with --head-wbits BITS --quantize-embeddings, BITS = 5 and 6 "
                             "({bits} in the path; measured too where they exist)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens to generate greedily")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (wikitext2 test text)")
    parser.add_argument("--llama-tokens", type=int, default=32, help="decode tokens for the synthetic 1.1B llama")
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "smollm2", "llama", "memory", "batched"],
                        help="sections not to run; their results in an existing --out file are kept")
    parser.add_argument("--out", type=Path, default=Path("results/cpu_inference.json"))
    args = parser.parse_args()
    # (a decode rate needs a second token: the first comes from the prefill)
    require_at_least(parser, ("--tokens", args.tokens, 2), ("--prompt-tokens", args.prompt_tokens, 1),
                     ("--llama-tokens", args.llama_tokens, 2))
    if not {"smollm2", "memory", "batched"} <= set(args.skip) and not is_quantized_checkpoint(args.checkpoint):
        sys.exit(f"checkpoint {args.checkpoint} is not an spqr checkpoint: run `bash scripts/quickstart.sh` first or "
                 "pass --checkpoint")
    embeddings_checkpoints = {bits: Path(args.embeddings_checkpoints.format(bits=bits)) for bits in (5, 6)}
    kernels = cpu.load()
    previous = json.loads(args.out.read_text()) if args.skip and args.out.exists() else {}
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "kernels": kernels and kernels.variant,
               "avx512": bool(kernels and kernels.has_avx512), "amx": bool(kernels and kernels.has_amx),
               "read_bandwidth_gbs": memory_bandwidth_gbs()}
    # a partial run (--skip) keeps the full run's machine record and notes its own beside its sections
    result: dict = {"machine": machine, **previous}
    log(f"{machine['cpu']}, {machine['threads']} threads, read bandwidth {machine['read_bandwidth_gbs']:.1f} GB/s, "
        f"kernels {machine['kernels']}")
    sections = {"kernels": kernel_section,
                "smollm2": lambda: smollm2_section(args.checkpoint, args.tokens, args.prompt_tokens,
                                                   args.head_checkpoint, embeddings_checkpoints),
                "synthetic_llama": lambda: synthetic_llama_section(args.llama_tokens),
                "memory": lambda: memory_section(args.checkpoint, embeddings_checkpoints),
                "batched": lambda: batched_section(args.checkpoint)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = False
    for name, run in sections.items():
        if name.removeprefix("synthetic_") in args.skip:
            continue
        section_start = time.time()
        result[name] = run()
        result.setdefault("section_seconds", {})[name] = time.time() - section_start
        result.setdefault("section_runs", {})[name] = {**machine, "finished": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                          time.gmtime())}
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every section: a crash keeps the rest
        written = True
    log(f"wrote {args.out}" if written else "every section was skipped: nothing written")


if __name__ == "__main__":
    main()
