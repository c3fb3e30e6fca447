"""Packed layouts: exact round trips over a grid, seed compatibility, CSR invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sqz_export.formats import (
    FormatError,
    PackedLinear,
    SparsePart,
    balanced_partition,
    pack_indices,
    packed_words,
    to_kmajor,
    to_rowmajor,
    unpack_indices,
)

SHAPES = [(1, 1), (3, 31), (5, 32), (7, 33), (2, 95), (16, 100), (64, 576), (9, 1537)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip_is_bit_exact(bits: int, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(bits * 1000 + shape[1])
    indices = torch.randint(0, 1 << bits, shape, generator=generator)
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_words(shape[1], bits), shape[0])
    assert torch.equal(unpack_indices(packed, bits, shape[1]).to(torch.int64), indices)
    assert torch.equal(to_kmajor(to_rowmajor(packed)), packed)


def _seed_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """The SqueezeLLM/GPTQ seed packing loop, transcribed as the compatibility oracle."""
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits == 4:
            for j in range(i, i + 8):
                qweight[row] |= intweight[j] << (4 * (j - i))
            i += 8
            row += 1
        else:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", [3, 4])
def test_layout1_matches_the_seed_layout(bits: int) -> None:
    rng = np.random.default_rng(bits)
    intweight = rng.integers(0, 1 << bits, size=(96, 5)).astype(np.uint32)  # [K, N] as the seed holds it
    ours = pack_indices(torch.from_numpy(intweight.T.astype(np.int64)), bits).numpy()
    np.testing.assert_array_equal(ours, _seed_pack(intweight, bits))


def test_pack_rejects_out_of_range_indices() -> None:
    with pytest.raises(FormatError, match="out of range for 3-bit"):
        pack_indices(torch.tensor([[0, 8]]), 3)
    with pytest.raises(FormatError, match="bits=5 is not supported"):
        pack_indices(torch.zeros(1, 4, dtype=torch.int64), 5)


def test_unpack_rejects_wrong_word_count() -> None:
    packed = pack_indices(torch.zeros(2, 64, dtype=torch.int64), 3)
    with pytest.raises(FormatError, match="needs 9"):
        unpack_indices(packed, 3, 65)


def test_balanced_partition_points_at_the_row_of_each_chunk_start() -> None:
    row_ptr = torch.tensor([0, 0, 5, 6, 6, 13], dtype=torch.int32)
    chunk_row = balanced_partition(row_ptr, 4)  # chunks start at non-zeros 0, 4, 8, 12
    assert chunk_row.tolist() == [1, 1, 4, 4]
    assert balanced_partition(torch.zeros(4, dtype=torch.int32), 4).numel() == 0


def test_sparse_part_round_trip_and_validation() -> None:
    dense = torch.zeros(6, 40)
    dense[0, 3] = 1.5
    dense[4, 39] = -2.0
    dense[4, 0] = 0.25
    sparse = SparsePart.from_dense(dense, chunk_nnz=2)
    sparse.validate("layer", 6, 40)
    assert sparse.nnz == 3
    assert torch.equal(sparse.to_dense(40), dense)
    broken = SparsePart(sparse.row_ptr, sparse.col.clone(), sparse.val, sparse.chunk_row, 2)
    broken.col[0] = 40
    with pytest.raises(FormatError, match="column index out of range"):
        broken.validate("layer", 6, 40)


def test_packed_linear_identity_lut_reconstructs_indices_exactly() -> None:
    """The LUT that maps index i to value i makes the dense weight equal to the indices themselves."""
    indices = torch.randint(0, 16, (8, 70))
    lut = torch.arange(16, dtype=torch.float16).repeat(8, 1)
    layer = PackedLinear(4, 70, 8, pack_indices(indices, 4), lut)
    layer.validate("identity")
    assert torch.equal(layer.weight(), indices.to(torch.float32))


def test_packed_linear_validate_names_the_layer_and_expectation() -> None:
    layer = PackedLinear(3, 64, 4, torch.zeros(5, 4, dtype=torch.int32), torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(FormatError, match=r"'q_proj': qweight is torch.int32 \(5, 4\), expected int32 \(6, 4\)"):
        layer.validate("q_proj")
