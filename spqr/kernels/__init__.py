"""y = x Wᵀ for a packed SpQR layer, as one registered torch op with interchangeable backends.

`torch.ops.spqr.linear` (see `linear`) takes the layer's stored tensors and dispatches by device:
CPU tensors go to the C kernels of `cpu.py`, CUDA tensors to the Triton kernels of `gpu.py`
(either falls back to the reference path when unavailable or when the layer's beta1 is not a
multiple of 16), other devices to the reference path. The reference path,
`reference_linear`, decodes W exactly (spqr.format.layout.dequantize_layer) and calls F.linear;
every fast path is tested against it. A fake (meta) implementation lets the op trace under
torch.compile / FakeTensor without running it.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from spqr.format.layout import LayerSpec, dequantize_layer, dequantize_rows
from spqr.kernels import cpu

log = logging.getLogger(__name__)

BILEVEL_STATS = ("scale_codes", "scale_scale", "scale_zero", "zero_codes", "zero_scale", "zero_zero")
FP16_STATS = ("scale", "zero")


def stat_names(spec: LayerSpec) -> tuple[str, ...]:
    return FP16_STATS if spec.qq_bits is None else BILEVEL_STATS


def reference_linear(spec: LayerSpec, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype via the exact decoded W (bias not added)."""
    spec.check_input(x)
    return F.linear(x, dequantize_layer(spec, t).to(device=x.device, dtype=x.dtype))


def cpu_linear(spec: LayerSpec, t: dict[str, torch.Tensor], x: torch.Tensor,
               kernels: cpu.CpuKernels | None = None, cache: cpu.LayerCache | None = None) -> torch.Tensor:
    """x [..., in] (CPU) -> [..., out] in x's dtype through the C kernels, computing in fp32 (cache: the calling
    module's cpu.LayerCache); float64 through the reference path (exact in float64, but W decoded per call)."""
    kernels = kernels or cpu.load()
    if kernels is None or not spec.kernel_friendly or x.dtype == torch.float64:  # float64 stays float64
        return reference_linear(spec, t, x)
    if x.dtype == torch.float32 and x.is_contiguous():
        x32 = x  # checked by kernels.matmul
    else:
        spec.check_input(x)  # before an integer x is converted
        x32 = x.to(torch.float32).contiguous()
    y = kernels.matmul(spec, t, x32, cache=cache)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@functools.lru_cache(maxsize=4096)
def _spec(in_features: int, out_features: int, wbits: int, beta1: int, beta2: int, qq_bits: int,
          has_perm: bool, stats_dtype: str) -> LayerSpec:
    return LayerSpec(in_features, out_features, wbits, beta1, beta2, qq_bits or None, has_perm, False, stats_dtype)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("spqr: triton is not installed, so quantized layers on CUDA use the slower reference path "
                    "(pip install triton)")
        return False
    return True


def cuda_linear(spec: LayerSpec, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [..., in] (CUDA) -> [..., out] through the Triton kernels (spqr.kernels.gpu), else the reference path."""
    if not _triton_available() or not spec.kernel_friendly:
        return reference_linear(spec, t, x)  # checks x
    from spqr.kernels import gpu

    spec.check_input(x)
    return gpu.triton_linear(spec, t, x)


def _unpack_args(qweight: torch.Tensor, stats: list[torch.Tensor], perm: torch.Tensor | None,
                 row_ptr: torch.Tensor, outlier_col: torch.Tensor, outlier_val: torch.Tensor,
                 shape: list[int]) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """The ops' arguments back to (spec, the layer's named tensors)."""
    spec = _spec(*shape, perm is not None, "float32" if stats[0].dtype == torch.float32 else "float16")
    t = dict(zip(stat_names(spec), stats), qweight=qweight, outlier_row_ptr=row_ptr, outlier_col=outlier_col,
             outlier_val=outlier_val)
    if perm is not None:
        t["perm"] = perm
    return spec, t


_LIBRARY = torch.library.Library("spqr", "DEF")  # a plain Library op: ~3 us of dispatch, custom_op costs ~13 us
_LIBRARY.define("linear(Tensor x, Tensor qweight, Tensor[] stats, Tensor? perm, Tensor row_ptr, Tensor outlier_col, "
                "Tensor outlier_val, int[] shape) -> Tensor")


def _linear_cpu(x, qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape):
    return cpu_linear(*_unpack_args(qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape), x)


def _linear_reference(x, qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape):
    return reference_linear(*_unpack_args(qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape), x)


def _linear_cuda(x, qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape):
    spec, t = _unpack_args(qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape)
    return cuda_linear(spec, t, x)


_LIBRARY.define("dequantize(Tensor qweight, Tensor[] stats, Tensor? perm, Tensor row_ptr, Tensor outlier_col, "
                "Tensor outlier_val, int[] shape) -> Tensor")


def _dequantize(qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape):
    return dequantize_layer(*_unpack_args(qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape))


_LIBRARY.define("embedding(Tensor ids, Tensor qweight, Tensor[] stats, Tensor? perm, Tensor row_ptr, "
                "Tensor outlier_col, Tensor outlier_val, int[] shape) -> Tensor")


def embedding_rows(spec: LayerSpec, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (an integer tensor of any shape) of the layer's W: fp32 [*ids.shape, in_features] on the
    layer's device, each distinct row decoded once (dequantize_rows); IndexError for ids outside [0, out)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    if len(unique) and (int(unique[0]) < 0 or int(unique[-1]) >= spec.out_features):
        raise IndexError(f"token ids must be in [0, {spec.out_features}), got {int(unique[0])}..{int(unique[-1])}")
    device = t["qweight"].device
    return dequantize_rows(spec, t, unique.to(device))[inverse.to(device)]


def _embedding(ids, qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape):
    return embedding_rows(*_unpack_args(qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape), ids)


_LIBRARY.impl("dequantize", _dequantize, "CompositeExplicitAutograd")
_LIBRARY.impl("embedding", _embedding, "CompositeExplicitAutograd")
_LIBRARY.impl("linear", _linear_cpu, "CPU")
_LIBRARY.impl("linear", _linear_cuda, "CUDA")
_LIBRARY.impl("linear", _linear_reference, "CompositeExplicitAutograd")  # any other device


@torch.library.register_fake("spqr::linear")
def _(x, qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape):
    return x.new_empty((*x.shape[:-1], shape[1]))


@torch.library.register_fake("spqr::dequantize")
def _(qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape):
    return qweight.new_empty((shape[1], shape[0]), dtype=torch.float32)


@torch.library.register_fake("spqr::embedding")
def _(ids, qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape):
    return qweight.new_empty((*ids.shape, shape[0]), dtype=torch.float32)


def _setup_backward(ctx, inputs, output) -> None:
    _, qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape = inputs
    ctx.n_stats, ctx.has_perm, ctx.shape = len(stats), perm is not None, shape
    ctx.save_for_backward(qweight, *stats, *([perm] if perm is not None else []), row_ptr, outlier_col, outlier_val)


def _backward(ctx, grad: torch.Tensor) -> tuple:
    """d(x Wᵀ)/dx = grad W, with W decoded exactly (one layer at a time, as the reference path does). The packed
    weights are constants: no gradient flows to them."""
    qweight, *rest = ctx.saved_tensors
    stats, rest = rest[:ctx.n_stats], rest[ctx.n_stats:]
    perm = rest.pop(0) if ctx.has_perm else None
    weight = torch.ops.spqr.dequantize(qweight, stats, perm, *rest, ctx.shape)  # an op: opaque to torch.compile
    grad_x = grad @ weight.to(device=grad.device, dtype=grad.dtype)
    return grad_x, None, [None] * ctx.n_stats, None, None, None, None, None


torch.library.register_autograd("spqr::linear", _backward, setup_context=_setup_backward)


def _op_args(spec: LayerSpec, t: dict[str, torch.Tensor]) -> tuple:
    """A layer as the ops take it: qweight, stats, perm, row_ptr, outlier_col, outlier_val, shape = [in_features,
    out_features, wbits, beta1, beta2, qq_bits (0: plain statistics, fp16 or fp32 as the tensors say)]."""
    shape = [spec.in_features, spec.out_features, spec.wbits, spec.beta1, spec.beta2, spec.qq_bits or 0]
    return (t["qweight"], [t[name] for name in stat_names(spec)], t.get("perm"), t["outlier_row_ptr"],
            t["outlier_col"], t["outlier_val"], shape)


def linear(spec: LayerSpec, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> x W_layerᵀ [..., out] through torch.ops.spqr.linear (bias not added)."""
    return torch.ops.spqr.linear(x, *_op_args(spec, t))


def embedding(spec: LayerSpec, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """embedding_rows through torch.ops.spqr.embedding: one opaque op, so that torch.jit.trace, torch.export and
    torch.compile record the lookup instead of fixing its data-dependent sizes (the number of distinct ids, the
    rows' outlier counts) into the graph."""
    return torch.ops.spqr.embedding(ids, *_op_args(spec, t))
