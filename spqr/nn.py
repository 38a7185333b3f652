"""SpQRLinear: a drop-in replacement for nn.Linear that holds a layer in its packed form."""

from __future__ import annotations

import functools
import mmap
import weakref

import torch
from torch import nn
from torch.autograd import forward_ad

from spqr import kernels
from spqr.data import is_integer_tensor
from spqr.format.layout import LayerSpec, PackedLinear, dequantize_layer, validate_layer

_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# a fast gate (~0.1 us) before the per-device autocast query (~0.5-1 us of a ~16 us layer call), where torch has it
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _transformed(x: torch.Tensor) -> bool:
    """x is wrapped by a torch.func transform (vmap, grad, jvp) or carries a forward-mode tangent: the C kernels
    cannot read a wrapper's data and the op has no forward-mode derivative, while F.linear on the decoded W
    supports both (so these take the reference path)."""
    return _is_functorch_wrapped(x) or (forward_ad._current_level >= 0 and forward_ad.unpack_dual(x).tangent
                                        is not None)


def in_eval_mode(function):
    """Decorator: function(model, ...) runs with the model in eval mode (dropout off), each module's mode restored
    after (modules made meanwhile, such as new SpQRLinears, take the model's). Calibration, evaluation and
    generation then do not depend on the mode the caller left the model in (from_config builds it training)."""
    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        modes = weakref.WeakKeyDictionary((m, m.training) for m in model.modules())  # weak: replaced layers go
        training = model.training
        model.eval()
        try:
            return function(model, *args, **kwargs)
        finally:
            for m in model.modules():
                m.training = modes.get(m, training)
    return wrapper


def _packed_getattr(module: nn.Module, name: str, what: str):
    """nn.Module.__getattr__ (parameters, buffers, submodules), with `module.weight` on a packed layer explained:
    `what` says where W is instead (still an AttributeError, so hasattr(module, "weight") stays False)."""
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        if name != "weight":
            raise
    raise AttributeError(
        f"{type(module).__name__} has no dense `weight`: {what}. Operations that replace or edit a layer's "
        "weight, such as transformers' resize_token_embeddings, need the full-precision model: run them before "
        "quantizing")


class SpQRLinear(nn.Module):
    """Linear layer y = x Wᵀ + b whose W is stored packed (see spqr.format.layout).

    The packed tensors are buffers, so they follow .to(device) and appear in state_dict under
    the layer's name (e.g. `model.layers.0.self_attn.q_proj.qweight`). forward computes from
    them through the registered op torch.ops.spqr.linear (spqr.kernels: C kernels on CPU, Triton
    on CUDA; eager CPU calls go to the same C kernels directly, without the dispatcher's
    overhead); with `use_reference = True` it decodes W exactly and calls F.linear instead.
    """

    use_reference: bool = False

    def __init__(self, spec: LayerSpec, tensors: dict[str, torch.Tensor], name: str | None = None):
        """tensors: the layer's stored tensors (spqr.format.layout), checked here (validate_layer: a bad index
        would make the kernels read out of bounds); ValueError names the problem, and the layer as `name` (its
        module name in a model) where given."""
        super().__init__()
        validate_layer(spec, tensors, name or f"SpQRLinear({spec.out_features}x{spec.in_features})")
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        for name, tensor in tensors.items():
            if name != "bias":
                self.register_buffer(name, tensor)
        bias = tensors.get("bias")
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._kernel_cache = kernels.cpu.LayerCache()  # the C kernels' view of the tensors above

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """load_state_dict copies into the packed buffers in place: check what would result first."""
        own = self.packed_tensors()
        incoming = {key: state_dict[prefix + key] for key in own if prefix + key in state_dict}
        name = prefix.rstrip(".") or "SpQRLinear"
        resized = [f"{key} {tuple(tensor.shape)} (this layer: {tuple(own[key].shape)})" for key, tensor in
                   incoming.items() if isinstance(tensor, torch.Tensor) and tensor.shape != own[key].shape]
        if resized:  # refused before anything is copied: a layer half overwritten would read out of bounds
            error_msgs.append(f"{name}: the state dict's packed tensors have other shapes than this layer's (another "
                              f"outlier count, say): {', '.join(resized)}. Build the model from that checkpoint "
                              "(spqr.load_quantized) instead")
            return
        try:
            if incoming:
                validate_layer(self.spec, {**own, **incoming}, name)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        """The packed tensors follow `fn` except where it would change their dtype: model.to(torch.bfloat16) or
        .half() must leave them alone (they are bit patterns and fp16 statistics) and only move them, while the
        bias is cast; moves, share_memory() and the like apply as to any buffer."""
        packed = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(packed)
        for name, tensor in packed.items():
            probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))  # a cast is not done, then dropped
            self._buffers[name] = fn(tensor) if probe.dtype == tensor.dtype else tensor.to(probe.device)
        self._kernel_cache = kernels.cpu.LayerCache()  # share_memory_() moves a tensor's memory, not the object
        return self

    def __getattr__(self, name: str):
        return _packed_getattr(self, name, "W is stored packed (.dequantize() gives it in fp32)")

    @classmethod
    def from_packed(cls, packed: PackedLinear, name: str | None = None) -> SpQRLinear:
        return cls(packed.spec, packed.tensors, name)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.named_buffers(recurse=False))
        if self.bias is not None:
            tensors["bias"] = self.bias.data
        return tensors

    def dequantize(self) -> torch.Tensor:
        """W as fp32 [out_features, in_features]."""
        return dequantize_layer(self.spec, self.packed_tensors())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_nested:  # as nn.Linear takes them: each component through the layer (its hooks run once)
            return torch.nested.as_nested_tensor([self.forward(c) for c in x.unbind()], layout=x.layout)
        if self.use_reference:
            y = kernels.reference_linear(self.spec, self._buffers, x)
        elif (type(x) is torch.Tensor and x.is_cpu and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not _is_functorch_wrapped(x) and forward_ad._current_level < 0):
            # eager CPU: straight to the C kernels, skipping the dispatcher (~8 us of a ~20 us call); tracing,
            # torch.compile, other devices and inputs that need a gradient go through the registered op, and
            # torch.func transforms and forward-mode tangents through the reference path
            y = kernels.cpu_linear(self.spec, self._buffers, x, cache=self._kernel_cache)
        elif not torch.compiler.is_compiling() and _transformed(x):
            y = kernels.reference_linear(self.spec, self._buffers, x)
        else:
            y = kernels.linear(self.spec, self._buffers, x)
        bias = self._parameters.get("bias")  # (not through __getattr__: this is the hot path)
        y = y if bias is None else y + bias.to(x.dtype)
        if _any_autocast() and torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(
                x.device.type):  # computed in fp32 (or x's dtype), returned
            y = y.to(torch.get_autocast_dtype(x.device.type))           # in the autocast dtype, as by nn.Linear
        return y

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={s.in_features}, out_features={s.out_features}, wbits={s.wbits}, "
                f"beta1={s.beta1}, beta2={s.beta2}, qq_bits={s.qq_bits}, outliers={self.outlier_val.numel()}")


HUGE_PAGE_BYTES = 2 * 2**20


class PackedArena:
    """Copies of tensors placed back to back (64-byte aligned) in one anonymous memory mapping, advised
    (Linux) for transparent huge pages; `place` returns the copy, a tensor over its part of the mapping.

    The matrix-vector kernels stream a layer's weight words, statistics and outliers side by side; on
    4 KiB pages every few KiB of those streams costs a TLB miss. On 2 MiB pages the 3-bit 4096 x 4096
    product with cold caches measured 7-9% faster (the same advice gives torch's dense fp32 product 1%).
    Where the OS does not honour the advice the mapping is ordinary memory.
    """

    def __init__(self, nbytes: int):
        private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
        self._mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, **private)  # the extra room aligns the start
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._mapping.madvise(mmap.MADV_HUGEPAGE)
        self._offset = -torch.frombuffer(self._mapping, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE_BYTES
        self._end = self._offset + nbytes

    @staticmethod
    def footprint(tensor: torch.Tensor) -> int:
        """Bytes that placing `tensor` takes."""
        return -(-tensor.numel() * tensor.element_size() // 64) * 64

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` in the mapping, with a storage of its own (so torch.save, pickle and deepcopy of
        it take its bytes only, not the whole mapping's); it keeps the mapping alive."""
        size = tensor.numel() * tensor.element_size()
        if self._offset + size > self._end:
            raise ValueError(f"the arena has {self._end - self._offset} bytes left, the tensor needs {size}")
        if size == 0:
            return tensor.clone()
        placed = torch.frombuffer(self._mapping, dtype=tensor.dtype, count=tensor.numel(), offset=self._offset)
        placed = placed.view(tensor.shape)
        placed.copy_(tensor)
        self._offset += self.footprint(tensor)
        return placed


def place_packed_tensors(model: nn.Module) -> int:
    """Move the packed tensors of every SpQRLinear in `model` that lives on the CPU into one PackedArena
    (huge pages where the OS allows: faster matrix-vector products); returns the bytes placed."""
    layers = [m for m in model.modules() if isinstance(m, SpQRLinear) and m.qweight.device.type == "cpu"]
    buffers = [(layer._buffers, name) for layer in layers for name in layer._buffers]
    if not buffers:
        return 0
    total = sum(PackedArena.footprint(owner[name]) for owner, name in buffers)
    arena = PackedArena(total)
    for owner, name in buffers:  # each tensor replaced, and so freed, as soon as it is copied
        owner[name] = arena.place(owner[name])
    return total


class SpQREmbedding(nn.Module):
    """Input embeddings tied to a quantized output head: token i's vector is row i of the head's W.

    Holds no tensors of its own: it reads (and decodes) only the rows of the token ids it is given
    from the SpQRLinear `head`, which is not registered as a submodule here, so its tensors are
    stored once, under the head's name. Output in `dtype` (follows model.to(dtype) casts).
    """

    def __init__(self, head: SpQRLinear, head_name: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.__dict__["head"] = head  # a plain reference, not a submodule
        self.head_name = head_name
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype

    def __getattr__(self, name: str):
        return _packed_getattr(self, name, f"its rows are decoded from the quantized head {self.head_name}")

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not is_integer_tensor(input_ids):
            raise TypeError(f"token ids must be an integer tensor, got {input_ids.dtype} (nn.Embedding refuses it too)")
        if "meta" in (input_ids.device.type, self.head.qweight.device.type):  # shapes only, as nn.Embedding
            return torch.empty((*input_ids.shape, self.embedding_dim), dtype=self.dtype, device="meta")
        rows = kernels.embedding(self.head.spec, self.head.packed_tensors(), input_ids)
        return rows.to(device=input_ids.device, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of a quantized head"
