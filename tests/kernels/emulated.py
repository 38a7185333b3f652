"""The C kernels cross-compiled for aarch64 (as a machine without x86 SIMD builds them: the portable vector code,
NEON) and run under qemu-user, behind CpuKernels' own `matmul`: the kernel tests run on them unchanged.

Only the foreign call is replaced: each call sends the layer's arrays (sizes from the layout in spqr_cpu.h) and x
to tests/kernels/emulated_driver.c running in the emulator, and copies its y back.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import struct
import subprocess
import threading
from pathlib import Path

from spqr.kernels import cpu

CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
DRIVER = Path(__file__).with_name("emulated_driver.c")
FLAGS = ["-O3", "-fopenmp", "-std=c11", "-Wall", "-Wextra", "-Werror", "-Wno-psabi"]
MISSING = (f"no {CROSS_CC} or {QEMU} here (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user; "
           "scripts/test.sh installs them where it can)")


def available() -> bool:
    return shutil.which(CROSS_CC) is not None and shutil.which(QEMU) is not None


def build(cache_dir: Path) -> Path:
    """The driver and the kernels compiled for aarch64 (cached by the sources' hash); raises RuntimeError."""
    sources = [DRIVER, *cpu.SOURCES]
    key = hashlib.sha256("\0".join([p.read_text() for p in (*sources, cpu.HEADER)] + FLAGS).encode()).hexdigest()
    target = cache_dir / f"spqr_emulated_aarch64_{key[:16]}"
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        result = subprocess.run([CROSS_CC, *FLAGS, *map(str, sources), "-o", str(tmp)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise RuntimeError(f"cross-compiling the kernels for aarch64 failed:\n{result.stderr[-3000:]}")
        tmp.replace(target)
    return target


def _array_sizes(layer: cpu.LayerStruct) -> list[tuple[int | None, int]]:
    """(address, bytes) of qweight .. perm, from the shapes spqr_cpu.h documents for spqr_layer."""
    k, n, qq = layer.in_features, layer.out_features, layer.qq_bits
    groups = -(-k // layer.beta1)
    nnz = ctypes.c_int32.from_address(layer.row_ptr + 4 * n).value
    index_bytes = {"outlier_col": 4 if layer.outlier_col_int32 else 2, "perm": 4 if layer.perm_int32 else 2}
    sizes = {"qweight": 4 * -(-n // 16) * -(-k // 32) * layer.wbits * 16,
             "scale_codes": 4 * -(-n // 32) * groups * qq, "zero_codes": 4 * -(-n // 32) * groups * qq,
             **{name: 2 * -(-n // layer.beta2) * groups * (qq > 0)
                for name in ("scale_scale", "scale_zero", "zero_scale", "zero_zero")},
             "scale_fp16": 2 * groups * n * (qq == 0), "zero_fp16": 2 * groups * n * (qq == 0),
             "row_ptr": 4 * (n + 1), "outlier_col": index_bytes["outlier_col"] * nnz, "outlier_val": 2 * nnz,
             "perm": index_bytes["perm"] * k}
    return [(getattr(layer, name), size) for name, size in sizes.items()]


class EmulatedKernels(cpu.CpuKernels):
    """CpuKernels whose gemv and gemm run in an aarch64 process under qemu (no AMX, no x86 SIMD)."""

    def __init__(self, binary: Path, threads: int = 2):
        self.lib, self.variant = None, "aarch64 (qemu)"
        self.has_avx512 = self.has_avx2 = self.has_amx = False
        self._layers = {}
        self._threads = threads  # OpenMP threads in the emulated process: the kernels' parallel split is tested
        self._lock = threading.Lock()  # one request at a time on the pipe
        self._process = subprocess.Popen([QEMU, "-L", SYSROOT, str(binary)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
        self._gemv = lambda layer, rows, x, y, threads: self._call(0, layer, rows, x, y)
        self._gemm = lambda layer, rows, x, y, threads: self._call(1, layer, rows, x, y)

    def _call(self, path: int, layer: cpu.LayerStruct, rows: int, x_ptr: int, y_ptr: int) -> int:
        header = [path, rows, self._threads, layer.in_features, layer.out_features, layer.wbits, layer.beta1,
                  layer.beta2, layer.qq_bits, layer.outlier_col_int32, layer.perm_int32]
        parts = [struct.pack("<11q", *header)]
        for address, size in [*_array_sizes(layer), (x_ptr, 4 * rows * layer.in_features)]:
            if not address:
                parts.append(struct.pack("<q", -1))
            else:
                parts += [struct.pack("<q", size), ctypes.string_at(address, size)]
        with self._lock:
            self._process.stdin.write(b"".join(parts))
            self._process.stdin.flush()
            (status,) = struct.unpack("<q", self._read(8))
            if status == 0:
                ctypes.memmove(y_ptr, self._read(4 * rows * layer.out_features), 4 * rows * layer.out_features)
        return status

    def _read(self, size: int) -> bytes:
        data = self._process.stdout.read(size)
        if len(data) != size:
            raise RuntimeError(f"the emulated kernels stopped (exit status {self._process.poll()})")
        return data

    def release_workspace(self) -> None:
        with self._lock:
            self._process.stdin.write(struct.pack("<11q", 2, *[0] * 10))
            self._process.stdin.flush()
            self._read(8)

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)
