"""Speed measurements of the kernels against torch's dense F.linear, and of generation.

Everything is a ratio measured in the same run (these machines are noisy). Matrix-vector
timings are taken "cold" by default: each call uses the next of several copies of the weights,
enough copies that they do not fit in the last-level cache, as in a real model where every layer's
weights are read once per token. Used by `spqr bench` and benchmarks/cpu_inference.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from spqr import kernels
from spqr.format.layout import PackedLinear
from spqr.format.synthetic import random_packed_layer
from spqr.nn import SpQRLinear, place_packed_tensors


def median_seconds(fn: Callable[[int], object], repeats: int, warmup: int = 3, device: str = "cpu") -> float:
    """Median wall time of fn(i) over `repeats` calls (i counts calls, to pick a weight copy)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        fn(warmup + i)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs); 64 MiB when unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=64 * 2**20)


def _proc_bytes(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a Linux /proc file, in bytes; None elsewhere."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> int | None:
    """Memory the OS can give this process now (Linux MemAvailable); None where unknown."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def peak_rss_bytes() -> int | None:
    """High-water mark of this process's resident memory (Linux VmHWM); None where unknown."""
    return _proc_bytes("/proc/self/status", "VmHWM")


def bench_memory_bytes(out_features: int, in_features: int, rows: int, cold: bool = True) -> int:
    """A generous estimate of the peak memory of bench_linear_shape: ~2x the fp32 matrix while building and
    timing it (measured at 8192 x 8192; 3x here), the cold pools of copies (packed, fp16, fp32), inputs and
    outputs."""
    pool = 2 * last_level_cache_bytes() if cold else 0
    return 3 * 4 * out_features * in_features + 3 * pool + 4 * 4 * rows * (in_features + out_features)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or platform.processor() elsewhere."""
    return kernels.cpu.cpuinfo_field("model name")


def memory_bandwidth_gbs(size_bytes: int = 2**30, device: str = "cpu") -> float:
    """Read bandwidth in GB/s: torch.sum over a buffer far larger than the caches."""
    buffer = torch.ones(size_bytes // 4, device=device)
    return size_bytes / median_seconds(lambda _: buffer.sum(), 5, device=device) / 1e9


def packed_bytes(packed: PackedLinear) -> int:
    return sum(t.numel() * t.element_size() for t in packed.tensors.values())


def _copies(make: Callable[[], object], nbytes: int, cold: bool, pool_bytes: int) -> list:
    count = max(1, min(1024, -(-pool_bytes // max(nbytes, 1)))) if cold else 1
    return [make() for _ in range(count)]


def bench_linear_shape(out_features: int, in_features: int, rows: int, wbits: int = 3, beta1: int = 16,
                       beta2: int = 16, outlier_share: float = 0.01, cold: bool = True, repeats: int = 20,
                       baselines: tuple[torch.dtype, ...] = (torch.float16, torch.float32), rounds: int = 4,
                       device: str = "cpu", cpu_paths: tuple[str, ...] = (), warmup: int = 10) -> dict:
    """Time y = x Wᵀ (x [rows, in]) through SpQRLinear and through F.linear in each baseline dtype.

    `spqr_ms` is the SpQRLinear module's call (in eager CPU mode it skips the dispatcher), `spqr_op_ms` the
    registered op torch.ops.spqr.linear (what traced and compiled models call; ~10 us more per call on CPU).
    cpu_paths: also time these paths of the CPU kernels (e.g. "gemm": the AVX-512 kernel where AMX is the default).

    The candidates take turns for `rounds` rounds of `warmup` untimed and `repeats` timed calls, so that a
    slow phase of a noisy machine hits them alike, each round starting one candidate further on (so that
    none always runs right after the same other); each time is the median of its rounds' medians. (On the
    2-core development machine a candidate's first ~8 calls after another's run up to 25% slower, hence
    10 untimed calls; and a matrix-vector candidate running right after torch's fp32 one ran ~4% slower
    throughout, hence the rotation.) On a GPU (device="cuda") the
    cold pool is sized from its L2 cache.
    """
    on_gpu = torch.device(device).type == "cuda"
    cache = (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20) if on_gpu
             else last_level_cache_bytes())
    pool = 2 * cache if cold else 0
    layer = random_packed_layer(out_features, in_features, wbits, beta1, beta2, 3, outlier_share, seed=0)
    x = torch.randn(rows, in_features, device=device)
    layers = _copies(lambda: {k: v.to(device, copy=True) for k, v in layer.tensors.items()}, packed_bytes(layer),
                     cold, pool)
    modules = [SpQRLinear(layer.spec, tensors) for tensors in layers]
    for module in modules:  # as a loaded model's (load_quantized): on huge pages where the OS allows
        place_packed_tensors(module)
    layers = [module.packed_tensors() for module in modules]
    candidates: dict[str, Callable[[int], object]] = {
        "spqr": lambda i: modules[i % len(modules)](x),  # what a model runs
        "spqr_op": lambda i: kernels.linear(layer.spec, layers[i % len(layers)], x)}
    cpu_kernels = kernels.cpu.load() if cpu_paths else None
    for path in cpu_paths if cpu_kernels else ():
        candidates[f"spqr_{path}"] = lambda i, p=path: cpu_kernels.matmul(layer.spec, layers[i % len(layers)], x,
                                                                          path=p)
    baseline_names = [str(dtype).removeprefix("torch.") for dtype in baselines]
    for dtype, name in zip(baselines, baseline_names):
        nbytes = out_features * in_features * torch.finfo(dtype).bits // 8
        weights = _copies(lambda dt=dtype: torch.randn(out_features, in_features, device=device).to(dt), nbytes,
                          cold, pool)
        xd = x.to(dtype)
        candidates[name] = lambda i, w=weights, xd=xd: F.linear(xd, w[i % len(w)])
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(median_seconds(candidates[name], repeats, warmup=warmup, device=device))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    result = {"out_features": out_features, "in_features": in_features, "rows": rows, "wbits": wbits,
              "beta1": beta1, "beta2": beta2, "outlier_share": outlier_share,
              # cold only where the copies (at most 1024) outgrow the cache; small layers stay in it
              "cold_cache": cold and len(layers) * packed_bytes(layer) >= pool,
              "weight_copies": len(layers), "packed_bytes": packed_bytes(layer), "rounds": rounds,
              "spqr_ms": 1e3 * seconds["spqr"], "spqr_packed_gbs": packed_bytes(layer) / seconds["spqr"] / 1e9}
    for name, value in seconds.items():
        if name != "spqr":
            result[f"{name}_ms"] = 1e3 * value
        if name in baseline_names:
            result[f"speedup_vs_{name}"] = value / seconds["spqr"]
    return result


SYNTHETIC_LLAMA = "llama hidden 2048, mlp 5632, 22 layers, 32/4 heads, vocab 32000"


def synthetic_llama(dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """A ~1.1B-parameter llama (SYNTHETIC_LLAMA) with random weights, seeded, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()


def replace_with_random_spqr(model: torch.nn.Module, wbits: int = 3, outlier_share: float = 0.01,
                             include_head: bool = False) -> torch.nn.Module:
    """Every Linear of the decoder blocks (and the output head if include_head) becomes a random packed
    SpQR layer of the same shape (in place): the speed of a quantized model without running a quantization."""
    from spqr.hf import block_linears, find_decoder_blocks, module_name, set_submodule
    from spqr.nn import SpQRLinear

    def random_like(linear: torch.nn.Linear, seed: int) -> SpQRLinear:
        packed = random_packed_layer(linear.out_features, linear.in_features, wbits, 16, 16, 3, outlier_share,
                                     seed=seed)
        return SpQRLinear.from_packed(packed).to(linear.weight.device)

    _, blocks = find_decoder_blocks(model)
    for index, block in enumerate(blocks):
        for name, linear in block_linears(block).items():
            set_submodule(block, name, random_like(linear, index))
    if include_head:
        head = model.get_output_embeddings()
        set_submodule(model, module_name(model, head), random_like(head, len(blocks)))
    place_packed_tensors(model)
    return model
