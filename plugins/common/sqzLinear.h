/*
 * sqzLinear.h: the launcher API of the SqzLinear CUDA kernels (plain C++ + CUDA runtime types).
 *
 *   y[m, n] = sum_k x[m, k] * (LUT[n, idx[n, k]] + S[n, k])          m < M, n < N, k < K
 *
 * x [M, K] and y [M, N] are row-major fp16 or bf16 (same dtype); the weight is the layout-2 packed
 * format of sqz_export/formats.py (mirrored in sqzFormat.h): qweight int32 [N, ceil(K/32) * bits],
 * LUT fp16 [N, 2^bits], optional CSR sparse part S (row_ptr [N+1], col [nnz], val fp16 [nnz],
 * chunk_row [ceil(nnz/chunkNnz)]). All accumulation is fp32; y is rounded once at the end.
 *
 * Used by the TensorRT plugin (plugins/sqzLinearPlugin/) and the torch binding (sqz_export/kernels/).
 * No torch or TensorRT types appear here, so both can include it.
 *
 * Guarantees:
 *  - Deterministic: every y element is written by exactly one thread with a fixed summation order
 *    (no atomics, no y.zero_()); the same inputs give bit-identical outputs run to run.
 *  - Every element of y is written (tests poison y with NaN before launching).
 *  - Stream-aware: all work goes to `stream`; nothing synchronizes the device; no allocation
 *    (the large-M path uses the caller's workspace), so launches can be captured in CUDA graphs.
 */
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace sqz
{

//! Activation / output dtype (x and y share it). The LUT and the sparse values are always fp16.
enum class DataType : int32_t
{
    kHALF = 0,
    kBF16 = 1,
};

//! Problem shape. nnz == 0 means no sparse part (rowPtr/col/val/chunkRow may then be nullptr).
struct SqzLinearShape
{
    int32_t m;           //!< rows of x and y (tokens); 0 is allowed (nothing to do)
    int32_t inFeatures;  //!< K, any value >= 1 (need not be a multiple of 32)
    int32_t outFeatures; //!< N, any value >= 1
    int32_t bits;        //!< bits per index: 2, 3, 4 or 8 (formats.SUPPORTED_BITS)
    int32_t nnz;         //!< non-zeros of the sparse part, 0 if none
    int32_t chunkNnz;    //!< non-zeros per balanced chunk (formats.DEFAULT_CHUNK_NNZ); > 0 when nnz > 0
    DataType dtype;      //!< dtype of x and y
};

//! Device pointers of one call. Every pointer must be at least 4-byte aligned (cudaMalloc gives 256);
//! the kernels use 128-bit loads when a row happens to be 16-byte aligned and 32-bit loads otherwise.
struct SqzLinearArgs
{
    void const* x;             //!< [m, inFeatures] row-major, dtype
    int32_t const* qweight;    //!< layout 2: [outFeatures, ceil(inFeatures/32) * bits]
    void const* lut;           //!< __half [outFeatures, 1 << bits]
    int32_t const* rowPtr;     //!< [outFeatures + 1], or nullptr when nnz == 0
    int32_t const* col;        //!< [nnz]
    void const* val;           //!< __half [nnz]
    int32_t const* chunkRow;   //!< [ceil(nnz / chunkNnz)]; not read by the kernels (sqzLinear.cu says why), may be nullptr
    void* y;                   //!< [m, outFeatures] row-major, dtype
    void* workspace;           //!< device scratch, >= sqzLinearWorkspaceSizeFor(shape, kind) bytes, 256-byte aligned
    size_t workspaceBytes;     //!< size of `workspace`
};

//! Which kernel family runs.
enum class KernelKind : int32_t
{
    kAuto = 0,        //!< sqzLinearChooseKernel(shape) decides
    kGemv = 1,        //!< fused LUT-dequant GEMV + CSR row walk, whole K per warp; any m (best for m <= 16)
    kDequantGemm = 2, //!< dequantize W into the workspace, tensor-core tiled GEMM with the sparse add in the epilogue
};

//! Largest m for which sqzLinearChooseKernel picks kGemv (decode and small batches).
constexpr int32_t kGEMV_MAX_M = 16;

//! Human-readable name of a kernel kind (static string), for logs.
char const* sqzLinearKernelName(KernelKind kind) noexcept;

//! nullptr if the launcher supports `shape`, else a static message naming the bad field.
char const* sqzLinearValidate(SqzLinearShape const& shape) noexcept;

//! The explicit kernel rule: m <= kGEMV_MAX_M -> kGemv, larger m -> kDequantGemm. Never returns kAuto.
KernelKind sqzLinearChooseKernel(SqzLinearShape const& shape) noexcept;

//! Workspace bytes `kind` needs for `shape` (kAuto: the chosen kernel). kGemv needs 0; kDequantGemm
//! needs the dequantized weight, padded to 64-row x 32-column tiles. Non-decreasing in shape.m, so a
//! size computed at the largest m of a profile covers every smaller m.
size_t sqzLinearWorkspaceSizeFor(SqzLinearShape const& shape, KernelKind kind) noexcept;

//! Workspace bytes for the kernel sqzLinearChooseKernel(shape) picks.
size_t sqzLinearWorkspaceSize(SqzLinearShape const& shape) noexcept;

//! Enqueues y = x W^T on `stream`. Returns cudaErrorInvalidValue for an invalid shape, a null
//! pointer or a too-small workspace (nothing is launched then), else the launch status.
cudaError_t sqzLinearLaunch(
    SqzLinearShape const& shape, SqzLinearArgs const& args, KernelKind kind, cudaStream_t stream) noexcept;

//! Host reference twin of sqzLinearLaunch with the same semantics (fp32 accumulation over k in
//! order, then the sparse non-zeros in CSR order, one rounding to dtype). All pointers in `args` are
//! host pointers; fp16/bf16 values are raw 16-bit patterns. Returns nullptr or a validation message.
char const* sqzLinearRef(SqzLinearShape const& shape, SqzLinearArgs const& args) noexcept;

} // namespace sqz
