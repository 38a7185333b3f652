"""Bit-plane packing of b-bit codes into int32 words.

Codes are packed along their last dimension in chunks of 32: chunk k of a row becomes `bits`
int32 words, word p holding bit p of each of the 32 codes (code i of the chunk at bit i).
This stores exactly `bits` bits per code for every width 2..8 (plus padding of the last chunk
to 32), and decodes with shifts and masks only, which suits SIMD and GPU kernels alike.
"""

from __future__ import annotations

import torch

CHUNK = 32


def pack_bitplanes(codes: torch.Tensor, bits: int, rows_per_step: int = 1024) -> torch.Tensor:
    """Pack integer codes [..., n] (values in [0, 2^bits)) into int32 [..., ceil(n/32), bits].

    Works through rows_per_step rows of the flattened leading dims at a time: the int64
    intermediates are `bits` x 8 bytes per code, which for a whole large layer would be a lot.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, n = codes.shape
    n_chunks = -(-n // CHUNK)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    flat = codes.reshape(-1, n)
    out = torch.empty(flat.shape[0], n_chunks, bits, dtype=torch.int32, device=codes.device)
    shifts = torch.arange(bits, device=codes.device).view(bits, 1)
    positions = torch.arange(CHUNK, device=codes.device)
    for r0 in range(0, flat.shape[0], rows_per_step):
        part = torch.nn.functional.pad(flat[r0:r0 + rows_per_step].to(torch.int64), (0, n_chunks * CHUNK - n))
        planes = (part.view(-1, n_chunks, 1, CHUNK) >> shifts) & 1  # [rows, n_chunks, bits, 32]
        words = (planes << positions).sum(-1)  # [rows, n_chunks, bits], in [0, 2^32)
        out[r0:r0 + rows_per_step] = torch.where(words >= 2**31, words - 2**32, words)
    return out.view(*lead, n_chunks, bits)


def unpack_bitplanes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bitplanes: int32 [..., n_chunks, bits] -> uint8 codes [..., n]."""
    if packed.shape[-1] != bits:
        raise ValueError(f"packed tensor has {packed.shape[-1]} bit planes, expected {bits}")
    *lead, n_chunks, _ = packed.shape
    if n > n_chunks * CHUNK:
        raise ValueError(f"packed tensor holds at most {n_chunks * CHUNK} codes per row, asked for {n}")
    shifts = torch.arange(CHUNK, dtype=torch.int32, device=packed.device)
    planes = (packed.unsqueeze(-1) >> shifts) & 1  # [..., n_chunks, bits, 32]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).view(bits, 1)
    codes = (planes * weights).sum(-2, dtype=torch.int32)  # [..., n_chunks, 32]
    return codes.reshape(*lead, n_chunks * CHUNK)[..., :n].to(torch.uint8)
