"""spqr.format.packing: bit-plane packing, against a bit-by-bit Python reference."""

from __future__ import annotations

import pytest
import torch

from spqr.format.packing import pack_bitplanes, unpack_bitplanes
from tests.helpers import ref_pack_row, ref_unpack_row

LENGTHS = [1, 31, 32, 33, 100]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_and_reference_layout(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.uint8)
    codes[0, :] = 2**bits - 1  # all bits set: exercises the sign bit of the int32 words
    packed = pack_bitplanes(codes, bits)
    n_chunks = -(-n // 32)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, n_chunks, bits)
    # exactly ceil(n/32)·bits int32 words = ceil(n/32)·bits·4 bytes per row
    assert packed[0].numel() * packed.element_size() == n_chunks * bits * 4
    for r in range(3):
        assert packed[r].tolist() == ref_pack_row(codes[r].tolist(), bits)
    out = unpack_bitplanes(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)
    for r in range(3):
        assert out[r].tolist() == ref_unpack_row(packed[r].tolist(), bits, n)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_leading_dims_and_input_dtypes(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (2, 3, 4, 45), generator=g)
    for c in (codes, codes.to(torch.uint8), codes.to(torch.int32), codes.float()):
        packed = pack_bitplanes(c, bits)
        assert packed.shape == (2, 3, 4, 2, bits)
        assert torch.equal(unpack_bitplanes(packed, bits, 45), codes.to(torch.uint8))
    # leading dims are independent rows
    flat = pack_bitplanes(codes.reshape(-1, 45), bits)
    assert torch.equal(flat.reshape(2, 3, 4, 2, bits), pack_bitplanes(codes, bits))


def test_padding_codes_are_zero_bits():
    packed = pack_bitplanes(torch.full((1, 33), 3), 2)
    # the second chunk holds one code (bit 0 set in both planes), the 31 padding codes are zero
    assert packed[0, 1].tolist() == [1, 1]
    assert packed[0, 0].tolist() == [-1, -1]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_out_of_range_codes_raise(bits):
    with pytest.raises(ValueError):
        pack_bitplanes(torch.tensor([[0, 2**bits]]), bits)
    with pytest.raises(ValueError):
        pack_bitplanes(torch.tensor([[-1, 0]]), bits)


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bit_widths_raise(bits):
    with pytest.raises(ValueError):
        pack_bitplanes(torch.zeros(1, 4, dtype=torch.int64), bits)


def test_unpack_checks_planes_and_length():
    packed = pack_bitplanes(torch.zeros(2, 40, dtype=torch.int64), 3)
    with pytest.raises(ValueError):
        unpack_bitplanes(packed, 4, 40)
    with pytest.raises(ValueError):
        unpack_bitplanes(packed, 3, 65)
    assert unpack_bitplanes(packed, 3, 64).shape == (2, 64)
