"""GPU inference benchmark (issue: Triton kernels). Needs a CUDA GPU; writes JSON with every measurement.

    .venv/bin/pip install triton && .venv/bin/python benchmarks/gpu_inference.py --out results/gpu_inference.json

1. 3-bit matrix-vector (beta1 = beta2 = 16, 1% outliers) on 4096x4096, 11008x4096 and 8192x28672 against
   torch fp16 F.linear, cold (weight copies larger than the L2 cache), with the packed bytes' bandwidth
   against the device's measured read bandwidth (the bound: bytes / bandwidth).
2. Matrix-matrix with 16, 64 and 128 rows against fp16.
3. Greedy decoding of a synthetic ~1.1B llama: fp16 model vs 3-bit SpQR layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from spqr.bench import bench_linear_shape, memory_bandwidth_gbs, replace_with_random_spqr, synthetic_llama
from spqr.generate import generate

SHAPES = [(4096, 4096), (11008, 4096), (8192, 28672)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_inference.json"))
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU")
    bandwidth = memory_bandwidth_gbs(device="cuda")
    result: dict = {"gpu": torch.cuda.get_device_name(), "read_bandwidth_gbs": bandwidth, "matvec": [], "matmul": []}
    print(f"{result['gpu']}: read bandwidth {bandwidth:.0f} GB/s", flush=True)
    start = time.time()
    for out, inp in SHAPES:
        r = bench_linear_shape(out, inp, 1, cold=True, device="cuda", repeats=50, baselines=(torch.float16,))
        r["bandwidth_bound_ms"] = 1e3 * r["packed_bytes"] / (bandwidth * 1e9)
        r["within_2x_of_bound"] = r["spqr_ms"] <= 2 * r["bandwidth_bound_ms"]
        r["meets_2x_fp16"] = r["speedup_vs_float16"] >= 2
        result["matvec"].append(r)
        print(f"matvec {out}x{inp}: spqr {r['spqr_ms']:.4f} ms (bound {r['bandwidth_bound_ms']:.4f}), "
              f"fp16 {r['float16_ms']:.4f} ms ({r['speedup_vs_float16']:.2f}x)", flush=True)
        for rows in (16, 64, 128):
            m = bench_linear_shape(out, inp, rows, cold=False, device="cuda", repeats=20, baselines=(torch.float16,))
            m["no_slower_than_fp16"] = m["speedup_vs_float16"] >= 1
            result["matmul"].append(m)
            print(f"matmul {out}x{inp} rows={rows}: spqr {m['spqr_ms']:.4f} ms, fp16 {m['float16_ms']:.4f} ms "
                  f"({m['speedup_vs_float16']:.2f}x)", flush=True)
    model = synthetic_llama(torch.float16, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")
    fp16 = generate(model, ids, args.tokens, stop_at_eos=False).to_dict()
    replace_with_random_spqr(model)
    spqr = generate(model, ids, args.tokens, stop_at_eos=False).to_dict()
    result["generation"] = {"fp16": fp16, "spqr": spqr,
                            "decode_speedup": spqr["decode_tokens_per_second"] / fp16["decode_tokens_per_second"]}
    print(f"generation: fp16 {fp16['decode_tokens_per_second']:.1f} tok/s, spqr "
          f"{spqr['decode_tokens_per_second']:.1f} tok/s", flush=True)
    result["seconds"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
