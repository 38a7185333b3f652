"""The C kernels (spqr_cpu.c, spqr_amx.c, spqr_cpu.h): built on first use with the system C compiler,
loaded with ctypes.

The library is compiled for the machine it runs on (-march=native, OpenMP) into a cache directory
(SPQR_CACHE_DIR, default ~/.cache/spqr) under a name that hashes the sources, the flags and the CPU,
so a source change or another CPU triggers a rebuild. When no compiler is available or the build
fails, `load()` returns None once with a logged reason, and callers use the reference path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch

from spqr.format.layout import LayerSpec, check_indices

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("spqr_cpu.c", "spqr_amx.c")]
HEADER = Path(__file__).with_name("spqr_cpu.h")
AMX_MAX_ROWS = 512  # rows per call of the AMX kernel
# spqr_gemv and spqr_gemm_amx compute nothing and return this for an input beyond +-2^64, NaN or infinite, where
# their arithmetic (zero points factored out, bf16 parts) would give NaN or overflow while F.linear would not; the
# rows with such an input then take the reference path (CpuKernels._rows_apart)
INPUT_OUT_OF_RANGE = 3
INPUT_LIMIT = 2.0**64  # SPQR_INPUT_LIMIT in spqr_cpu.h
FLAGS = {
    "native": ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-Wno-psabi"],
    # for the tests, what other machines and compilers build: the portable vector code (no AVX-512, AVX2 or ARM)
    # with fp16 converted by bit arithmetic (compilers without _Float16 for the target) ...
    "portable": ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-Wno-psabi", "-DSPQR_PORTABLE",
                 "-DSPQR_HALF_CONVERSION=3"],
    # ... an AVX2 machine's build (AVX2 table lookups, vector loops) with fp16 converted by F16C (GCC 11) ...
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-Wno-psabi",
             "-DSPQR_HALF_CONVERSION=2"],
    # ... and an AVX-512 one without VBMI, GFNI or AMX (Skylake-X, Cascade Lake): masked-add statistics decoder
    "avx512": ["-O3", "-march=skylake-avx512", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-Wno-psabi"],
}


class LayerStruct(ctypes.Structure):
    """Mirror of `spqr_layer` in spqr_cpu.c."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("in_features", "out_features", "wbits", "beta1", "beta2", "qq_bits")] + [
        (name, ctypes.c_void_p) for name in
        ("qweight", "scale_codes", "zero_codes", "scale_scale", "scale_zero", "zero_scale", "zero_zero",
         "scale_fp16", "zero_fp16", "row_ptr", "outlier_col")] + [
        ("outlier_col_int32", ctypes.c_int64), ("outlier_val", ctypes.c_void_p), ("perm", ctypes.c_void_p),
        ("perm_int32", ctypes.c_int64)]


class LayerCache:
    """The C view of one layer, kept by the module it belongs to (SpQRLinear) with the tensor objects it was
    made from, so that a call checks only that the module still holds those very objects (the shared cache of
    CpuKernels reads every tensor's address: ~1.5 us more per call, more with cold caches). New tensors (after
    .to(), load_state_dict(assign=True), place_packed_tensors) make a new view; replacing a buffer's storage in
    place (`tensor.data = ...`, `set_`) is not supported. Copies and pickles start empty: a copied view would
    point at the original's memory."""

    __slots__ = ("spec", "tensors", "layer")

    def __init__(self):
        self.spec, self.tensors, self.layer = None, (), None

    def __reduce__(self):  # copy, deepcopy and pickle alike
        return LayerCache, ()


class CpuKernels:
    """The loaded library; `matmul` computes x W_permᵀ from a layer's packed tensors.

    Three paths: `gemv` (table lookup, for a few rows), `gemm` (AVX-512 FMA on decoded tiles) and
    `amx` (the AMX tile unit, x and the decoded W each split into three exact bf16 parts; Sapphire Rapids and
    later, Linux).
    SPQR_AMX=0 disables the last.
    """

    PATHS = ("auto", "gemv", "gemm", "amx")

    def __init__(self, lib: ctypes.CDLL, variant: str):
        self.lib, self.variant = lib, variant
        self.has_avx512 = bool(lib.spqr_has_avx512())
        self.has_avx2 = bool(lib.spqr_has_avx2())  # AVX2 table lookups (builds without AVX-512)
        self.has_openmp = bool(lib.spqr_has_openmp())  # else one thread (a compiler without OpenMP)
        self.has_amx = os.environ.get("SPQR_AMX", "1") != "0" and bool(lib.spqr_amx_enable())
        signature = [ctypes.POINTER(LayerStruct), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._gemv = lib.spqr_gemv
        self._gemv.argtypes = signature
        self._gemv.restype = ctypes.c_int
        self._gemm = lib.spqr_gemm
        self._gemm.argtypes = signature  # (layer, rows, x, y, threads)
        self._gemm.restype = ctypes.c_int
        self._gemm_amx = lib.spqr_gemm_amx
        self._gemm_amx.argtypes = signature
        self._gemm_amx.restype = ctypes.c_int
        self._layers: dict[tuple, tuple[LayerSpec, LayerStruct, tuple]] = {}

    def matmul(self, spec: LayerSpec, t: dict[str, torch.Tensor], x: torch.Tensor, path: str = "auto",
               gemv_max_rows: int = 8, cache: LayerCache | None = None) -> torch.Tensor:
        """x [..., in] fp32 contiguous (original column order) -> [..., out] fp32 (bias not added).

        cache: the calling module's LayerCache, if it keeps one.

        path "auto": up to gemv_max_rows rows go through the matrix-vector kernel (measured crossover on
        2-core AVX-512 machines: 8-12 rows on the Xeon, 9-14 on the EPYC), more through AMX where available
        (on the Xeon as fast as `gemm` or faster from 9 rows on, on every layer shape measured from 192 x 576 to
        4096 x 11008; 15-40% faster from 48 rows),
        else `gemm`.
        """
        if path != "auto" and path not in self.PATHS:
            raise ValueError(f"unknown kernel path {path!r}; expected one of {self.PATHS}")
        layer = self._layer(spec, t, cache)
        threads = torch.get_num_threads()
        spec.check_input(x)
        if x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous():  # (cpu_linear converts)
            raise ValueError(f"the CPU kernels take a contiguous float32 CPU x, got {x.dtype} on {x.device}"
                             f"{'' if x.is_contiguous() else ', not contiguous'}")
        k, n = spec.in_features, spec.out_features
        rows = x.numel() // k
        y = torch.empty(rows, n) if x.dim() == 2 else torch.empty((*x.shape[:-1], n))
        x_ptr, y_ptr = x.data_ptr(), y.data_ptr()  # row i starts 4·i·(row length) bytes further
        if path == "auto":
            path = "gemv" if rows <= gemv_max_rows else "amx" if self.has_amx else "gemm"
        if path == "gemv":
            status = self._gemv(layer, rows, x_ptr, y_ptr, threads)
            if status == 1:
                raise MemoryError("spqr_gemv could not allocate its workspace")
            return y if status == 0 else self._rows_apart(spec, t, x, path, cache)  # INPUT_OUT_OF_RANGE
        if path == "amx":
            if not self.has_amx:
                raise RuntimeError("the AMX kernel is not available on this machine (or SPQR_AMX=0)")
            status = 0
            for r0 in range(0, rows, AMX_MAX_ROWS):  # bounds its workspace: 6 bytes per row and input feature
                r1 = min(rows, r0 + AMX_MAX_ROWS)
                status = self._gemm_amx(layer, r1 - r0, x_ptr + 4 * r0 * k, y_ptr + 4 * r0 * n, threads)
                if status:
                    break
            if status == 1:
                raise MemoryError("spqr_gemm_amx could not allocate its workspace")
            if status == INPUT_OUT_OF_RANGE:
                return self._rows_apart(spec, t, x, path, cache)
            if status == 0:
                return y  # 2: AMX refused at run time; the AVX-512 kernel computes the same
        if self._gemm(layer, rows, x_ptr, y_ptr, threads):
            raise MemoryError("spqr_gemm could not allocate its workspace")
        return y

    def _rows_apart(self, spec: LayerSpec, t: dict[str, torch.Tensor], x: torch.Tensor, path: str,
                    cache: LayerCache | None) -> torch.Tensor:
        """A call the kernel refused (INPUT_OUT_OF_RANGE): the rows with an input beyond ±INPUT_LIMIT (or NaN)
        through the reference path (F.linear's inf and NaN), the others through `path` on their own, so that a
        row's result does not depend on the other rows of the call."""
        flat = x.reshape(-1, spec.in_features)
        bad = ~(flat.abs() <= INPUT_LIMIT).all(-1)
        y = torch.empty(len(flat), spec.out_features)
        if not bool(bad.all()):
            y[~bad] = self.matmul(spec, t, flat[~bad].contiguous(), path=path, cache=cache)
        y[bad] = _reference_path(spec, t, flat[bad])
        return y.reshape(*x.shape[:-1], spec.out_features)

    def release_workspace(self) -> None:
        """Free the scratch buffer the kernels keep between calls. It grows to the largest call: a few
        tables for token generation, about 6·rows·in_features bytes (and ~1 MB per thread) after an AMX prefill."""
        self.lib.spqr_release_workspace()

    def _layer(self, spec: LayerSpec, t: dict[str, torch.Tensor], cache: LayerCache | None = None) -> LayerStruct:
        """The C view of a layer: the module's own (cache) while it holds the same spec and tensor objects, else
        the one cached here by the tensors' addresses while they hold the same objects (kept as weak references).

        A tensor that is not contiguous keys as -1, so it reaches _layer_struct, which refuses it."""
        if cache is not None:
            same = cache.spec is spec and len(t) == len(cache.tensors)
            if same and all(map(operator.is_, t.values(), cache.tensors)):
                return cache.layer
            cache.spec, cache.tensors, cache.layer = spec, tuple(t.values()), self._layer(spec, t)
            return cache.layer
        key = tuple([v.data_ptr() if v.is_contiguous() else -1 for v in t.values()])
        cached = self._layers.get(key)
        if (cached is not None and (cached[0] is spec or cached[0] == spec)
                and all(ref() is v for ref, v in zip(cached[2], t.values()))):  # not new tensors at old addresses
            return cached[1]
        if len(self._layers) > 100_000:
            self._layers.clear()
        layer = _layer_struct(spec, t)
        self._layers[key] = (spec, layer, tuple(weakref.ref(v) for v in t.values()))
        return layer


def _reference_path(spec: LayerSpec, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """spqr.kernels.reference_linear (imported here: that package imports this module first)."""
    from spqr.kernels import reference_linear

    return reference_linear(spec, t, x)


def _layer_struct(spec: LayerSpec, t: dict[str, torch.Tensor]) -> LayerStruct:
    """The C view of a layer's tensors, made once per set of tensor objects: so they are checked here
    (check_indices), however they reached the module (a buffer assigned, torch.func.functional_call, ...)."""
    if not spec.kernel_friendly:
        raise ValueError(f"the CPU kernels take beta1 a multiple of 16 and fp16 or bilevel statistics, not {spec}")
    check_indices(spec, t, f"SpQR layer {spec.out_features}x{spec.in_features}")

    def ptr(name: str) -> int | None:
        tensor = t.get(name)
        if tensor is None:
            return None
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU tensor for the CPU kernels")
        return tensor.data_ptr()

    return LayerStruct(
        spec.in_features, spec.out_features, spec.wbits, spec.beta1, spec.beta2, spec.qq_bits or 0,
        ptr("qweight"), ptr("scale_codes"), ptr("zero_codes"), ptr("scale_scale"), ptr("scale_zero"),
        ptr("zero_scale"), ptr("zero_zero"), ptr("scale"), ptr("zero"), ptr("outlier_row_ptr"),
        ptr("outlier_col"), int(t["outlier_col"].dtype == torch.int32), ptr("outlier_val"), ptr("perm"),
        int("perm" in t and t["perm"].dtype == torch.int32))


def _cache_dir() -> Path:
    return Path(os.environ.get("SPQR_CACHE_DIR") or Path.home() / ".cache" / "spqr")


def cpuinfo_field(name: str) -> str:
    """A field of the first CPU in Linux /proc/cpuinfo (e.g. "model name", "flags"), or platform.processor()
    where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)),
                        platform.processor())
    except OSError:
        return platform.processor()


def build(variant: str = "native") -> Path:
    """Compile spqr_cpu.c (if not cached) and return the shared library's path; raises RuntimeError.

    A compiler that cannot build with OpenMP (Apple's clang, say) gets a second try without it: single-threaded
    kernels, still far faster than the reference path; one that rejects -march=native too, a third without
    either (the target's baseline vector code)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    try:
        return _build(compiler, FLAGS[variant])
    except RuntimeError as error:
        for dropped in (("-fopenmp",), ("-fopenmp", "-march=native")):
            try:
                target = _build(compiler, [flag for flag in FLAGS[variant] if flag not in dropped])
            except RuntimeError:
                continue
            lines = str(error).splitlines()
            log.warning("spqr: the CPU kernels were built without %s, so they use one thread%s (the first build "
                        "failed: %s)", " and ".join(dropped), "" if len(dropped) == 1 else " and no CPU-specific code",
                        next((line for line in lines if "error" in line), lines[-1])[:300])
            return target
        raise error from None


def _build(compiler: str, flags: list[str]) -> Path:
    texts = [path.read_text() for path in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*texts, compiler, *flags, cpuinfo_field("flags")]).encode()).hexdigest()
    target = _cache_dir() / f"spqr_cpu_{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_lib = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(tmp_lib)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the CPU kernels failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp_lib, target)  # atomic: concurrent builds both produce a complete file
    return target


@functools.cache
def load(variant: str = "native") -> CpuKernels | None:
    """The CPU kernels, or None (with one logged warning) when they cannot be built or loaded.

    SPQR_KERNELS=reference disables them.
    """
    if os.environ.get("SPQR_KERNELS", "").lower() == "reference":
        return None
    try:
        return CpuKernels(ctypes.CDLL(str(build(variant))), variant)
    except (RuntimeError, OSError) as e:
        log.warning("spqr: CPU kernels unavailable, using the slower reference path (dequantize + matmul): %s", e)
        return None


def describe() -> str:
    """One line saying which CPU path is in use (builds the kernels if needed)."""
    kernels = load()
    if kernels is None:
        return "spqr CPU kernels: unavailable, using the reference path (see the warning above)"
    simd = "AVX-512" if kernels.has_avx512 else "AVX2" if kernels.has_avx2 else "portable vector code"
    threads = "" if kernels.has_openmp else ", one thread (built without OpenMP)"
    return f"spqr CPU kernels: {kernels.variant} build, {simd}, AMX {'on' if kernels.has_amx else 'off'}{threads}"
