"""Why our RTN w4 (groups of 16) perplexity differs from the reference's: statistics precision.

The reference implementation simulates RTN: it fits each group's min-max (scale, zero) in fp32
and never stores them. A checkpoint has to store them; ours keeps them in fp16, as the issue's
RTN/GPTQ baselines ask. This script measures, on SmolLM2-135M-Instruct (fp32) with the issue's
evaluation (first 64 windows x 512 tokens of WikiText-2 test):
- "fp32-stats": the same grid with fp32 statistics (the reference's arithmetic);
- "fp16-stats": the statistics rounded to fp16 first (what `spqr quantize --method rtn` stores);
- "fp16-stats-only-<kind>": fp16 statistics in one kind of Linear only, fp32 elsewhere,
which shows how sensitive this model's perplexity is to statistic perturbations of ~1e-3 relative
(the total weight error is the same to 0.2% in all rows: "weight_sq_error").

    .venv/bin/python benchmarks/rtn_statistics.py --out results/rtn_statistics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from arguments import require_at_least

from spqr.algo.quantizer import dequantize, fit_minmax, quantize
from spqr.data import load_text, tokenize
from spqr.eval.perplexity import perplexity
from spqr.hf import block_linears, find_decoder_blocks, load_model

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_weight(weight: torch.Tensor, bits: int, group: int, fp16_stats: bool) -> torch.Tensor:
    """Round-to-nearest W [out, in] with min-max statistics per row and group of `group` columns."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features * in_features // group, group)
    scale, zero = fit_minmax(groups, bits)
    if fp16_stats:
        scale, zero = scale.half().float(), zero.half().float()
    codes = quantize(groups, scale[:, None], zero[:, None], 2**bits - 1)
    return dequantize(codes, scale[:, None], zero[:, None]).reshape(out_features, in_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/rtn_statistics.json")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    require_at_least(parser, ("--eval-windows", args.eval_windows, 1), ("--seqlen", args.seqlen, 2))
    torch.set_grad_enabled(False)

    model, tokenizer = load_model()
    ids = tokenize(tokenizer, load_text("wikitext2", "test"))
    _, blocks = find_decoder_blocks(model)
    linears = {f"{i}.{name}": m for i, block in enumerate(blocks) for name, m in block_linears(block).items()}
    original = {name: m.weight.detach().clone() for name, m in linears.items()}
    variants = {"fp32-stats": lambda name: False, "fp16-stats": lambda name: True}
    variants |= {f"fp16-stats-only-{kind}": (lambda name, kind=kind: name.endswith(kind)) for kind in KINDS}

    rows = {}
    for variant, fp16_here in variants.items():
        sq_error = 0.0
        for name, linear in linears.items():
            approx = rtn_weight(original[name], 4, 16, fp16_here(name))
            sq_error += float((approx - original[name]).pow(2).sum())
            linear.weight.data.copy_(approx)
        result = perplexity(model, ids, args.seqlen, max_windows=args.eval_windows, progress=False)
        rows[variant] = {"ppl": result.ppl, "weight_sq_error": sq_error}
        print(f"{variant:28s} ppl {result.ppl:.4f}  weight sq error {sq_error:.1f}", flush=True)
    result = {"reference_rtn_w4_g16_ppl": 33.34, "setting": vars(args), "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
