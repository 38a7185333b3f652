"""The packed layout of one SpQR linear layer: which tensors are stored, and how they decode.

For W [out, in] with input columns permuted by `perm` (y = W x = W_perm x[perm]):

| tensor            | dtype        | shape                              | content                                  |
|-------------------|--------------|------------------------------------|------------------------------------------|
| qweight           | int32        | [ceil(out/16), ceil(in/32),        | bit-planes of the weight codes of W_perm,|
|                   |              |  wbits, 16]                        | 16 rows interleaved (see below)          |
| scale_codes       | int32        | [ceil(out/32), n_groups, qq_bits]  | bit-planes of first-level scale codes    |
| scale_scale/_zero | fp16         | [ceil(out/beta2), n_groups]        | second-level grid of the scales          |
| zero_codes        | int32        | [ceil(out/32), n_groups, qq_bits]  | bit-planes of first-level zero codes     |
| zero_scale/_zero  | fp16         | [ceil(out/beta2), n_groups]        | second-level grid of the zeros           |
| scale, zero       | fp16 (fp32)  | [n_groups, out]                    | instead of the above when qq_bits is None|
| perm              | int16/int32  | [in]                               | sweep order (absent for identity)        |
| outlier_row_ptr   | int32        | [out + 1]                          | CSR row pointers                         |
| outlier_col       | int16/int32  | [nnz]                              | column in W_perm, ascending in each row  |
| outlier_val       | fp16         | [nnz]                              | outlier minus its dense reconstruction   |
| bias              | model dtype  | [out]                              | only for layers with a bias              |

n_groups = ceil(in / beta1); a ragged last group (or row group) simply has fewer members. Plain statistics
(qq_bits None) are fp32 instead of fp16 when spec.stats_dtype is "float32".
Decoding: W_perm[r, c] = (code - zero[g, r]) * scale[g, r] + outlier delta, g = c // beta1.
qweight[t, c, b, i] is bit-plane b of the codes of columns 32c .. 32c+31 of row 16t + i (bit j for column
32c + j; rows past `out` are zero padding): a kernel working on a tile of 16 rows reads each plane of all
16 rows as one 64-byte vector, and the bilevel statistics, stored row-block-major, contiguously too.
Older layouts are converted on load (`upgrade_tensor`): version 1 stored qweight as [out, ceil(in/32),
wbits] and the statistics group-major ([n_groups, ...]); version 2 only differed in qweight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from spqr.algo.bilevel import expand_groups
from spqr.algo.engine import QuantizedWeight
from spqr.algo.quantizer import dequantize
from spqr.format.packing import pack_bitplanes, unpack_bitplanes

INT16_MAX_INDEX = 2**15  # int16 holds column indices and permutations of up to 32768 columns
ROW_TILE = 16  # rows interleaved in qweight
TensorSpec = tuple[tuple[int, ...] | None, torch.dtype]  # (shape, or None where it varies; dtype)


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed, besides the tensors, to decode one layer (stored in config.json)."""

    in_features: int
    out_features: int
    wbits: int
    beta1: int
    beta2: int
    qq_bits: int | None
    has_perm: bool
    has_bias: bool
    stats_dtype: str = "float16"  # plain statistics (qq_bits None): "float16" or "float32"

    def __post_init__(self) -> None:
        def is_int(v: object, lo: int, hi: int) -> bool:
            return type(v) is int and lo <= v <= hi

        problems = [name for name, ok in (
            ("in_features", is_int(self.in_features, 1, 2**31)), ("out_features", is_int(self.out_features, 1, 2**31)),
            ("wbits", is_int(self.wbits, 1, 8)), ("beta1", is_int(self.beta1, 1, 2**31)),
            ("beta2", is_int(self.beta2, 1, 2**31)),
            ("qq_bits", self.qq_bits is None or is_int(self.qq_bits, 1, 8)),
            ("has_perm", type(self.has_perm) is bool), ("has_bias", type(self.has_bias) is bool),
            ("stats_dtype", self.stats_dtype == "float16" or (self.stats_dtype == "float32" and self.qq_bits is None)),
        ) if not ok]
        if problems:
            raise ValueError(f"invalid layer spec fields {problems}: {self}")

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse an input x [..., in_features] that the layer cannot take (integer dtype, wrong last dimension)
        with a message naming the problem, before any kernel sees it."""
        if not x.is_floating_point() or x.layout != torch.strided:
            raise TypeError(f"a quantized layer takes dense floating-point input, got {x.dtype} ({x.layout})")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {tuple(x.shape)}; the layer expects [..., {self.in_features}]")

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.beta1)

    @property
    def kernel_friendly(self) -> bool:
        """Groups hold whole 16-column halves of a 32-column chunk and statistics are fp16 or bilevel: what the
        CPU and Triton kernels take."""
        return self.beta1 % 16 == 0 and self.stats_dtype == "float16"

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.int16 if self.in_features <= INT16_MAX_INDEX else torch.int32

    @classmethod
    def from_config_entry(cls, entry: dict) -> LayerSpec:
        """The spec of one entry of a checkpoint's `modules` table (its `outliers` count aside); ValueError or
        TypeError when a field is missing, unknown or invalid."""
        return cls(**{k: v for k, v in entry.items() if k != "outliers"})

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.stats_dtype == "float16":  # the default: configs read the same as before the field existed
            del d["stats_dtype"]
        return d

    def expected_tensors(self, bias_dtype: torch.dtype = torch.float32) -> dict[str, TensorSpec]:
        """name -> (shape, dtype) of every stored tensor; shape None where it depends on the outlier count."""
        out, n_groups = self.out_features, self.n_groups
        expected: dict[str, TensorSpec] = {
            "qweight": ((-(-out // ROW_TILE), -(-self.in_features // 32), self.wbits, ROW_TILE), torch.int32),
            "outlier_row_ptr": ((out + 1,), torch.int32),
            "outlier_col": (None, self.index_dtype),
            "outlier_val": (None, torch.float16),
        }
        if self.qq_bits is None:
            expected["scale"] = ((n_groups, out), getattr(torch, self.stats_dtype))
            expected["zero"] = ((n_groups, out), getattr(torch, self.stats_dtype))
        else:
            second = (-(-out // self.beta2), n_groups)
            for stat in ("scale", "zero"):
                expected[f"{stat}_codes"] = ((-(-out // 32), n_groups, self.qq_bits), torch.int32)
                expected[f"{stat}_scale"] = (second, torch.float16)
                expected[f"{stat}_zero"] = (second, torch.float16)
        if self.has_perm:
            expected["perm"] = ((self.in_features,), self.index_dtype)
        if self.has_bias:
            expected["bias"] = ((out,), bias_dtype)
        return expected


@dataclass
class PackedLinear:
    """A layer in its stored form: spec + named tensors (see the module docstring)."""

    spec: LayerSpec
    tensors: dict[str, torch.Tensor]

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, wbits: int, beta1: int, beta2: int, qq_bits: int | None,
                       bias: torch.Tensor | None = None) -> PackedLinear:
        out, in_features = qw.codes.shape
        stats_dtype = "float16" if qq_bits is not None else str(qw.scale.values.dtype).removeprefix("torch.")
        spec = LayerSpec(in_features, out, wbits, beta1, beta2, qq_bits, qw.perm is not None, bias is not None,
                         stats_dtype)
        t: dict[str, torch.Tensor] = {"qweight": pack_weight_codes(qw.codes, wbits)}
        for name, stat in (("scale", qw.scale), ("zero", qw.zero)):
            if qq_bits is None:
                t[name] = stat.values
            else:
                t[f"{name}_codes"] = pack_bitplanes(stat.codes, qq_bits).transpose(0, 1)
                t[f"{name}_scale"] = stat.second_scale.T
                t[f"{name}_zero"] = stat.second_zero.T
        if qw.perm is not None:
            t["perm"] = qw.perm.to(spec.index_dtype)
        rows, cols = qw.outlier_mask.nonzero(as_tuple=True)  # row-major: columns ascend within a row
        counts = torch.bincount(rows, minlength=out)
        t["outlier_row_ptr"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        t["outlier_col"] = cols.to(spec.index_dtype)
        t["outlier_val"] = qw.outlier_delta[rows, cols]
        if bias is not None:
            t["bias"] = bias.detach().clone()
        return cls(spec, {k: v.contiguous() for k, v in t.items()})

    @property
    def outlier_count(self) -> int:
        return int(self.tensors["outlier_val"].numel())

    def stored_bits(self) -> int:
        """Bits of everything stored for the weight (bias excluded: it is not a quantized weight)."""
        return sum(t.numel() * t.element_size() * 8 for k, t in self.tensors.items() if k != "bias")

    def dequantize(self) -> torch.Tensor:
        return dequantize_layer(self.spec, self.tensors)


def pack_weight_codes(codes: torch.Tensor, wbits: int) -> torch.Tensor:
    """Weight codes [out, in] -> qweight int32 [ceil(out/16), ceil(in/32), wbits, 16] (see the module docstring)."""
    return _interleave_rows(pack_bitplanes(codes, wbits))


def unpack_weight_codes(qweight: torch.Tensor, wbits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_weight_codes: uint8 codes [out, in]."""
    tiles, chunks, bits, rows = qweight.shape
    planes = qweight.permute(0, 3, 1, 2).reshape(tiles * rows, chunks, bits)[:out_features]
    return unpack_bitplanes(planes, wbits, in_features)


def _interleave_rows(planes: torch.Tensor) -> torch.Tensor:
    """Row-major bit-planes [out, chunks, bits] -> [ceil(out/16), chunks, bits, 16], zero rows appended."""
    out, chunks, bits = planes.shape
    padded = torch.nn.functional.pad(planes, (0, 0, 0, 0, 0, -out % ROW_TILE))
    return padded.view(-1, ROW_TILE, chunks, bits).permute(0, 2, 3, 1).contiguous()


def upgrade_tensor(version: int, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of a format `version` checkpoint in the current layout (see the module docstring).

    Tensors whose shape does not fit the old layout are returned unchanged (the caller's shape check refuses them).
    """
    if version <= 2 and key == "qweight" and tensor.ndim == 3:
        return _interleave_rows(tensor)
    if version == 1 and key.endswith("_codes") and tensor.ndim == 3:
        return tensor.transpose(0, 1).contiguous()
    if version == 1 and key in ("scale_scale", "scale_zero", "zero_scale", "zero_zero") and tensor.ndim == 2:
        return tensor.T.contiguous()
    return tensor


def dequantize_layer(spec: LayerSpec, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain reference decoder: fp32 W [out, in] in the original column order."""
    return dequantize_rows(spec, t, torch.arange(spec.out_features, device=t["qweight"].device))


def dequantize_rows(spec: LayerSpec, t: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (int64 [n]) of W, fp32 [n, in] in the original column order, decoding only those
    rows (an embedding lookup into a quantized matrix reads a few rows of a large one; all rows are
    dequantize_layer). W_perm[r, c] = (code - zero) * scale + outlier delta, with the statistics
    decoded from their bit-planes and second-level grids exactly as the engine stored them."""
    rows = rows.long()
    device = rows.device
    tile_rows = t["qweight"][rows // ROW_TILE, :, :, rows % ROW_TILE]  # [n, chunks, wbits]
    codes = unpack_bitplanes(tile_rows, spec.wbits, spec.in_features).float()

    def stat(name: str) -> torch.Tensor:  # [n, n_groups] fp32
        if spec.qq_bits is None:
            return t[name][:, rows].T.float()
        words = t[f"{name}_codes"][rows // 32]  # [n, n_groups, qq_bits], bit r % 32 of each plane
        planes = (words >> (rows % 32).to(torch.int32).view(-1, 1, 1)) & 1
        stat_codes = (planes << torch.arange(spec.qq_bits, dtype=torch.int32, device=device)).sum(-1)
        return dequantize(stat_codes.float(), t[f"{name}_scale"][rows // spec.beta2].float(),
                          t[f"{name}_zero"][rows // spec.beta2].float())

    scale = expand_groups(stat("scale"), spec.beta1, spec.in_features)
    zero = expand_groups(stat("zero"), spec.beta1, spec.in_features)
    weight = dequantize(codes, scale, zero)
    row_ptr = t["outlier_row_ptr"].long()
    starts, counts = row_ptr[rows], row_ptr[rows + 1] - row_ptr[rows]
    if int(counts.sum()):
        local = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
        offsets = (torch.arange(int(counts.sum()), device=device)
                   - torch.repeat_interleave(counts.cumsum(0) - counts, counts))
        index = torch.repeat_interleave(starts, counts) + offsets
        weight.index_put_((local, t["outlier_col"][index].long()), t["outlier_val"][index].float(), accumulate=True)
    if spec.has_perm:
        weight = weight[:, torch.argsort(t["perm"].long())]
    return weight


def _check_shapes(spec: LayerSpec, t: dict[str, torch.Tensor], name: str, with_bias: bool) -> None:
    """Every tensor the spec expects (the bias only if with_bias) is present with its dtype and shape."""
    for key, (shape, dtype) in spec.expected_tensors().items():
        if key == "bias" and not with_bias:
            continue
        tensor = t.get(key)
        if tensor is None:
            raise ValueError(f"{name}: tensor {key} is missing")
        if key == "bias":
            dtype = tensor.dtype if tensor.is_floating_point() else dtype
        if tensor.dtype != dtype or (tuple(tensor.shape) != shape if shape else tensor.dim() != 1):
            raise ValueError(f"{name}: tensor {key} has dtype {tensor.dtype} and shape {tuple(tensor.shape)}, "
                             f"expected {dtype} and {shape or '1-D'}")


def check_indices(spec: LayerSpec, t: dict[str, torch.Tensor], name: str, bias: bool = False) -> None:
    """What keeps a kernel reading a layer's tensors within bounds; raise ValueError naming the problem. Cheap
    (O(out + in + outliers), no sorting), so the CPU kernels check every new set of tensors before they first
    read it (spqr.kernels.cpu), whichever way it reached the module.

    Every packed tensor of the spec is present with its dtype and shape; CSR row pointers start at 0, never
    decrease and end at nnz; column and permutation indices are in range, columns strictly ascending within each
    row. The bias (which a kernel does not read) only with `bias`: floating point, any precision.
    """
    _check_shapes(spec, t, name, bias)
    if any(tensor.device.type == "meta" for tensor in t.values()):
        return  # placeholders (a model built before its weights are loaded): no values to check yet
    nnz = t["outlier_val"].numel()
    if t["outlier_col"].numel() != nnz:
        raise ValueError(f"{name}: {t['outlier_col'].numel()} outlier columns but {nnz} outlier values")
    row_ptr = t["outlier_row_ptr"].long()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr.diff() < 0).any()):
        raise ValueError(f"{name}: outlier_row_ptr is not a valid CSR row pointer array for {nnz} outliers")
    for key, size in (("outlier_col", spec.in_features), ("perm", spec.in_features)):
        if key in t and t[key].numel() and (int(t[key].min()) < 0 or int(t[key].max()) >= size):
            raise ValueError(f"{name}: {key} has indices outside [0, {size})")
    if nnz > 1:  # the matrix-matrix kernels place each outlier by its offset from the previous one in its row
        cols = t["outlier_col"].long()
        row_start = torch.zeros(nnz + 1, dtype=torch.bool, device=row_ptr.device)
        row_start[row_ptr] = True
        if bool(((cols[1:] <= cols[:-1]) & ~row_start[1:-1]).any()):
            raise ValueError(f"{name}: outlier_col is not strictly ascending within a row")


def validate_layer(spec: LayerSpec, t: dict[str, torch.Tensor], name: str) -> None:
    """Check a layer's tensors; raise ValueError naming the problem. The kernels trust what passes.

    check_indices (the bias too), and: the permutation is a true permutation; stored fp16 statistics, outlier
    values and the bias are finite.
    """
    check_indices(spec, t, name, bias=True)
    if any(tensor.device.type == "meta" for tensor in t.values()):
        return
    if spec.has_perm:
        perm = t["perm"].long()
        if not torch.equal(torch.sort(perm).values, torch.arange(spec.in_features)):
            raise ValueError(f"{name}: perm is not a permutation of 0..{spec.in_features - 1}")
    for key in ("outlier_val", "scale", "zero", "scale_scale", "scale_zero", "zero_scale", "zero_zero", "bias"):
        if key in t and not bool(torch.isfinite(t[key]).all()):
            raise ValueError(f"{name}: {key} contains NaN or Inf")
