"""Packed weight layouts of sqz-export: the single Python definition of every on-disk and on-device format.

The C++ mirror lives in ``plugins/common/sqzFormat.h`` (static_asserts on the same constants). Every
pack has an exact inverse; tests check the round trip bit-exactly over a grid of shapes.

Index packing (both layouts share the bit stream; they differ only in how words are ordered)::

    K (in_features) is split into groups of 32 indices. A group of 32 b-bit indices is the
    little-endian bit stream of b int32 words: index j of the group occupies bits [b*j, b*j + b).

    4-bit, one group = 4 words (128 bits), 8 whole indices per word:
        word w : | i(8w+7) | ... | i(8w+1) | i(8w+0) |      (bit 31 ... bit 0)
    3-bit, one group = 3 words (96 bits); indices 10 and 21 straddle word boundaries:
        word 0 : | i10[1:0] | i9 | ... | i0 |               bits 30-31 hold the low 2 bits of i10
        word 1 : | i21[0] | i20 | ... | i11 | i10[2] |      bit 0 = high bit of i10, bit 31 = low bit of i21
        word 2 : | i31 | ... | i22 | i21[2:1] |             bits 0-1 = high 2 bits of i21

    K is padded with index 0 up to a multiple of 32; padded indices never reach the output because
    the kernels and the unpack stop at in_features.

    Layout 1 ("kmajor", the SqueezeLLM/GPTQ seed layout, used in checkpoints):
        qweight int32 [ceil(K/32) * bits, N]; column n holds output row n's words, K-major.
    Layout 2 ("rowmajor", the kernel layout, used in ONNX models and plugins):
        qweight int32 [N, ceil(K/32) * bits] = layout 1 transposed: each output row's words are
        contiguous, so one warp streams a whole row with 128-bit loads.

LUT: fp16 [N, 2**bits], row n is the codebook of output row n (index -> weight value).

Reconstruction: W = LUT[idx] + S, exactly. At positions that the sparse part holds, S stores the
residual W_orig - LUT[idx] (rounded to fp16), so no kernel needs a mask for the dense part.

Sparse part (dense-and-sparse decomposition): CSR over the output rows of W [N, K]:
    row_ptr int32 [N + 1], col int32 [nnz], val fp16 [nnz]; columns sorted within a row.
    Balanced partition for SpMV: the nnz are cut into chunks of ``chunk_nnz`` consecutive non-zeros
    (equal work per worker); chunk_row int32 [ceil(nnz / chunk_nnz)] is the row that holds the first
    non-zero of each chunk, so a worker finds its starting row without a search.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sqz_export.errors import UserError

FORMAT_VERSION = 1
"""Version of the checkpoint format (config.json quantization_config.format_version)."""

LAYOUT_KMAJOR = 1
LAYOUT_ROWMAJOR = 2
SUPPORTED_BITS = (2, 3, 4, 8)
GROUP_SIZE = 32
"""Indices per packing group; a group of b-bit indices fills exactly b int32 words."""
DEFAULT_CHUNK_NNZ = 32
"""Non-zeros per balanced SpMV work item (one warp lane set handles one chunk)."""


class FormatError(UserError, ValueError):
    """A packed tensor or checkpoint does not match the format it claims."""


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits={bits} is not supported; expected one of {SUPPORTED_BITS}")


def packed_words(in_features: int, bits: int) -> int:
    """Number of int32 words that hold one output row's indices."""
    check_bits(bits)
    return math.ceil(in_features / GROUP_SIZE) * bits


PACK_CHUNK_INDICES = 1 << 18
"""Indices packed at once by :func:`pack_indices` (its working state is about 16 * bits bytes each)."""


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs per-row codebook indices into layout 1 (K-major).

    Args:
        indices: integer tensor [N, K] with values in [0, 2**bits).
        bits: bits per index.

    Returns:
        int32 tensor [ceil(K/32) * bits, N].
    """
    check_bits(bits)
    if indices.dim() != 2:
        raise FormatError(f"indices must be 2-D [out_features, in_features], got shape {tuple(indices.shape)}")
    n, k = indices.shape
    idx = indices if not indices.is_floating_point() else indices.to(torch.int64)  # converted chunk by chunk below
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= (1 << bits)):
        raise FormatError(f"indices out of range for {bits}-bit packing: min {int(idx.min())}, max {int(idx.max())}")
    groups = math.ceil(k / GROUP_SIZE)
    out = torch.empty(groups * bits, n, dtype=torch.int32)
    # Rows in chunks: the bit stream below takes 16 * bits bytes per index, 2.2 GB for one 3-bit
    # LLaMA-7B MLP layer at once (0.75 GB measured for an 11.5M-weight layer, with the int64 copies).
    step = max(1, PACK_CHUNK_INDICES // max(1, groups * GROUP_SIZE))
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = (torch.ones(32, dtype=torch.int64) << torch.arange(32, dtype=torch.int64)).view(1, 1, 32, 1)
    for start in range(0, n, step):
        rows = min(n, start + step) - start
        padded = torch.zeros(groups * GROUP_SIZE, rows, dtype=torch.int64)
        padded[:k] = idx[start : start + rows].t()
        # bit stream: bit t of index j of a group sits at stream position j*bits + t.
        stream = (padded.view(groups, GROUP_SIZE, 1, rows) >> shifts.view(1, 1, bits, 1)) & 1  # [G, 32, b, rows]
        stream = stream.reshape(groups, bits, 32, rows)  # word w, bit s  <- stream position 32*w + s
        words = (stream * weights).sum(dim=2)  # [G, b, rows], values < 2**32
        words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # reinterpret as int32
        out[:, start : start + rows] = words.reshape(groups * bits, rows)
    return out


def unpack_indices(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_indices`: layout 1 words -> uint8 indices [N, K]."""
    check_bits(bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise FormatError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    rows, n = qweight.shape
    if rows != packed_words(in_features, bits):
        raise FormatError(
            f"qweight has {rows} word rows; in_features={in_features} at {bits} bits needs "
            f"{packed_words(in_features, bits)}"
        )
    groups = rows // bits
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    bit_pos = torch.arange(32, dtype=torch.int64).view(1, 1, 32, 1)
    stream = (words.view(groups, bits, 1, n) >> bit_pos) & 1  # [G, b, 32, N]
    stream = stream.reshape(groups, GROUP_SIZE, bits, n)
    weights = (torch.ones(bits, dtype=torch.int64) << torch.arange(bits, dtype=torch.int64)).view(1, 1, bits, 1)
    idx = (stream * weights).sum(dim=2).reshape(groups * GROUP_SIZE, n)[:in_features]
    return idx.t().to(torch.uint8).contiguous()


def to_rowmajor(qweight_kmajor: torch.Tensor) -> torch.Tensor:
    """Layout 1 -> layout 2 (exact: a transpose of the word matrix)."""
    return qweight_kmajor.t().contiguous()


def to_kmajor(qweight_rowmajor: torch.Tensor) -> torch.Tensor:
    """Layout 2 -> layout 1 (exact inverse of :func:`to_rowmajor`)."""
    return qweight_rowmajor.t().contiguous()


def balanced_partition(row_ptr: torch.Tensor, chunk_nnz: int) -> torch.Tensor:
    """Row of the first non-zero of each chunk of ``chunk_nnz`` non-zeros (int32 [num_chunks])."""
    if chunk_nnz <= 0:
        raise FormatError(f"chunk_nnz must be positive, got {chunk_nnz}")
    nnz = int(row_ptr[-1])
    starts = torch.arange(0, nnz, chunk_nnz, dtype=torch.int64)
    # row r holds non-zeros [row_ptr[r], row_ptr[r+1]); the row of non-zero s is the last r with row_ptr[r] <= s.
    rows = torch.searchsorted(row_ptr.to(torch.int64), starts, right=True) - 1
    return rows.to(torch.int32)


@dataclasses.dataclass
class SparsePart:
    """Exact (fp16) weights kept outside the codebook: CSR over output rows."""

    row_ptr: torch.Tensor  # int32 [N + 1]
    col: torch.Tensor  # int32 [nnz]
    val: torch.Tensor  # fp16 [nnz]
    chunk_row: torch.Tensor  # int32 [ceil(nnz / chunk_nnz)]
    chunk_nnz: int = DEFAULT_CHUNK_NNZ

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @classmethod
    def from_dense(cls, dense: torch.Tensor, chunk_nnz: int = DEFAULT_CHUNK_NNZ) -> SparsePart:
        """Builds the CSR of the non-zeros of ``dense`` [N, K] (values rounded to fp16)."""
        n = dense.shape[0]
        rows, cols = torch.nonzero(dense, as_tuple=True)  # row-major order: sorted by row, then column
        counts = torch.bincount(rows, minlength=n)
        row_ptr = torch.zeros(n + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(counts, 0)
        return cls(
            row_ptr=row_ptr.to(torch.int32),
            col=cols.to(torch.int32),
            val=dense[rows, cols].to(torch.float16),
            chunk_row=balanced_partition(row_ptr, chunk_nnz),
            chunk_nnz=chunk_nnz,
        )

    def to_dense(self, in_features: int) -> torch.Tensor:
        """fp32 [N, K] with the sparse values in place and zeros elsewhere."""
        n = self.row_ptr.numel() - 1
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(n), counts)
        dense = torch.zeros(n, in_features, dtype=torch.float32)
        dense[rows, self.col.to(torch.int64)] = self.val.to(torch.float32)
        return dense

    def validate(self, name: str, out_features: int, in_features: int) -> None:
        """Checks CSR invariants so a corrupt file fails here, not inside a kernel."""
        where = f"sparse part of {name!r}"
        if self.row_ptr.dtype != torch.int32 or self.col.dtype != torch.int32 or self.chunk_row.dtype != torch.int32:
            raise FormatError(f"{where}: row_ptr, col and chunk_row must be int32")
        if self.val.dtype != torch.float16:
            raise FormatError(f"{where}: val must be fp16, got {self.val.dtype}")
        if self.row_ptr.shape != (out_features + 1,):
            raise FormatError(f"{where}: row_ptr shape {tuple(self.row_ptr.shape)}, expected ({out_features + 1},)")
        if self.col.shape != self.val.shape or self.col.dim() != 1:
            raise FormatError(f"{where}: col {tuple(self.col.shape)} and val {tuple(self.val.shape)} must be equal 1-D")
        if int(self.row_ptr[0]) != 0 or int(self.row_ptr[-1]) != self.nnz:
            raise FormatError(f"{where}: row_ptr must start at 0 and end at nnz={self.nnz}")
        if bool((self.row_ptr[1:] < self.row_ptr[:-1]).any()):
            raise FormatError(f"{where}: row_ptr is not non-decreasing")
        if self.nnz and (int(self.col.min()) < 0 or int(self.col.max()) >= in_features):
            raise FormatError(f"{where}: column index out of range [0, {in_features})")
        if not torch.equal(self.chunk_row, balanced_partition(self.row_ptr, self.chunk_nnz)):
            raise FormatError(f"{where}: chunk_row does not match row_ptr with chunk_nnz={self.chunk_nnz}")


@dataclasses.dataclass
class PackedLinear:
    """One quantized linear layer: y = x @ (LUT[idx] + S)^T (+ bias).

    ``qweight`` is always stored in layout 1 here (the checkpoint layout); kernels get layout 2 from
    :func:`to_rowmajor` at export/load time.
    """

    bits: int
    in_features: int
    out_features: int
    qweight: torch.Tensor  # int32 [ceil(K/32) * bits, N], layout 1
    lut: torch.Tensor  # fp16 [N, 2**bits]
    sparse: SparsePart | None = None
    bias: torch.Tensor | None = None  # fp16 [N]

    def validate(self, name: str) -> None:
        """Checks dtypes and shapes against the declared bits and features; names the layer on error."""
        check_bits(self.bits)
        expected_q = (packed_words(self.in_features, self.bits), self.out_features)
        if self.qweight.dtype != torch.int32 or tuple(self.qweight.shape) != expected_q:
            raise FormatError(
                f"{name!r}: qweight is {self.qweight.dtype} {tuple(self.qweight.shape)}, expected int32 {expected_q} "
                f"for bits={self.bits}, in_features={self.in_features}, out_features={self.out_features}"
            )
        expected_lut = (self.out_features, 1 << self.bits)
        if self.lut.dtype != torch.float16 or tuple(self.lut.shape) != expected_lut:
            raise FormatError(f"{name!r}: lut is {self.lut.dtype} {tuple(self.lut.shape)}, expected float16 {expected_lut}")
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise FormatError(f"{name!r}: bias shape {tuple(self.bias.shape)}, expected ({self.out_features},)")
        if self.sparse is not None:
            self.sparse.validate(name, self.out_features, self.in_features)

    def indices(self) -> torch.Tensor:
        return unpack_indices(self.qweight, self.bits, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The dense (codebook) part only, fp32 [N, K]."""
        idx = self.indices().to(torch.int64)
        return torch.gather(self.lut.to(torch.float32), 1, idx)

    def weight(self) -> torch.Tensor:
        """The full reconstructed weight, fp32 [N, K]: codebook part plus exact sparse values."""
        w = self.dense_weight()
        if self.sparse is not None and self.sparse.nnz:
            w = w + self.sparse.to_dense(self.in_features)
        return w

    def describe(self) -> dict[str, int | bool]:
        """Shape summary recorded in manifests (enough to validate the tensors against)."""
        return {
            "bits": self.bits,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "nnz": self.sparse.nnz if self.sparse is not None else 0,
            "bias": self.bias is not None,
        }

    def nbytes(self) -> int:
        """Bytes of the packed representation (what a deployment has to read per token)."""
        total = self.qweight.numel() * 4 + self.lut.numel() * 2
        if self.sparse is not None:
            total += (self.sparse.row_ptr.numel() + self.sparse.col.numel() + self.sparse.chunk_row.numel()) * 4
            total += self.sparse.val.numel() * 2
        if self.bias is not None:
            total += self.bias.numel() * 2
        return total
