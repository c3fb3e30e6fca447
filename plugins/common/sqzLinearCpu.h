/*
 * sqzLinearCpu.h: the SqzLinear CPU kernel (plain C++: no CUDA, torch or onnxruntime types), shared by
 * the torch op (sqz_export/kernels/cpu_binding.cpp) and the onnxruntime custom-op library
 * (plugins/ort/).
 *
 *   y[m, n] = sum_k x[m, k] * LUT[n, idx[n, k]] + sum_{j in CSR row n} val[j] * x[m, col[j]]
 *
 * x [M, K] and y [M, N] are row-major fp32 (the adapters convert fp16/bf16 activations: for decode
 * x is a few KB, the weights are the bytes that matter); the weight is the layout-2 packed format of
 * sqz_export/formats.py (sqzFormat.h): qweight int32 [N, ceil(K/32) * bits], LUT fp16 [N, 2^bits],
 * optional CSR residual (row_ptr [N+1], col [nnz], val fp16 [nnz]). Semantics as sqzLinearRef.cpp
 * (fp32 accumulation); the SIMD paths sum k in 8 or 16 lanes, so they agree with it up to fp32
 * reassociation.
 *
 * The same header declares the dense fp16 GEMV of the onnxruntime library's DenseLinear
 * (sqzHalfLinearCpuRows): y = x W^T for a plain fp16 W [N, K], such as a tied lm_head, read as fp16
 * instead of the fp32 copy onnxruntime would fold it into.
 *
 * Threading is the caller's: sqzLinearCpuRows computes a range of output rows and may run on
 * disjoint ranges from any number of threads; sqzLinearCpuSplit cuts N into ranges of equal work
 * (packed words + non-zeros), so a heavy sparse row does not leave one thread doing most of it.
 */
#pragma once

#include <cstdint>

namespace sqz
{
namespace cpu
{

//! Instruction set a kernel runs with. Chosen at run time (sqzCpuBestIsa) from the CPU's features.
enum class Isa : int32_t
{
    kScalar = 0, //!< portable C++ (any CPU, every bit width)
    kAvx2 = 1,   //!< AVX2 + FMA + F16C: 8 weights per step, LUT in a register (_mm256_permutevar8x32_ps)
    kAvx512 = 2, //!< AVX-512F + F16C: 16 weights per step, LUT in a register (_mm512_permutexvar_ps)
};

struct CpuShape
{
    int32_t m;           //!< rows of x and y; 0 is allowed
    int32_t inFeatures;  //!< K >= 1
    int32_t outFeatures; //!< N >= 1
    int32_t bits;        //!< 2, 3, 4 or 8
    int32_t nnz;         //!< non-zeros of the CSR residual, 0 if none
};

struct CpuArgs
{
    float const* x;          //!< [m, inFeatures] row-major fp32
    int32_t const* qweight;  //!< layout 2: [outFeatures, ceil(inFeatures/32) * bits]
    uint16_t const* lut;     //!< fp16 bit patterns [outFeatures, 1 << bits]
    int32_t const* rowPtr;   //!< [outFeatures + 1], or nullptr when nnz == 0
    int32_t const* col;      //!< [nnz]
    uint16_t const* val;     //!< fp16 bit patterns [nnz]
    float* y;                //!< [m, outFeatures] row-major fp32
};

//! y = x W^T with a dense fp16 weight (not packed): the arguments of sqzHalfLinearCpuRows.
struct HalfLinearArgs
{
    int32_t m;           //!< rows of x and y; 0 is allowed
    int32_t inFeatures;  //!< K >= 1
    int32_t outFeatures; //!< N >= 1
    float const* x;      //!< [m, inFeatures] row-major fp32
    uint16_t const* w;   //!< fp16 bit patterns [outFeatures, inFeatures] row-major
    float* y;            //!< [m, outFeatures] row-major fp32
};

//! Whether this CPU can run `isa` (kScalar always).
bool sqzCpuSupports(Isa isa) noexcept;

//! The widest ISA this CPU supports.
Isa sqzCpuBestIsa() noexcept;

//! The ISA a call with `bits` actually runs when `requested` is asked for: the SIMD paths decode
//! 3- and 4-bit rows (the product's widths); 2- and 8-bit rows run the scalar path.
Isa sqzCpuEffectiveIsa(Isa requested, int32_t bits) noexcept;

//! "scalar", "avx2" or "avx512".
char const* sqzCpuIsaName(Isa isa) noexcept;

//! nullptr if the kernel supports `shape`, else a static message naming the bad field.
char const* sqzCpuValidate(CpuShape const& shape) noexcept;

//! Output rows [rowBegin, rowEnd) of y for all m rows of x, with `isa` (must be supported; see
//! sqzCpuEffectiveIsa for the bit widths that run scalar). Inputs must have been validated.
void sqzLinearCpuRows(CpuShape const& shape, CpuArgs const& args, Isa isa, int64_t rowBegin, int64_t rowEnd) noexcept;

//! Rows [rowBegin, rowEnd) of the dense weight W = LUT[idx] + S as fp32 [rowEnd - rowBegin, inFeatures]
//! row-major at `w` (the CSR values added in fp32 to their LUT entries, as sqz_export's torch reference
//! builds W), for a GEMM to multiply: the large-M path of the callers. Same ISA rules and threading as
//! sqzLinearCpuRows; x and y are not read.
void sqzDequantCpuRows(CpuShape const& shape, CpuArgs const& args, Isa isa, int64_t rowBegin, int64_t rowEnd, float* w) noexcept;

//! Output rows [rowBegin, rowEnd) of y = x W^T for all m rows of x, fp32 accumulation, with `isa` (must be
//! supported; every ISA takes every K). Same threading rules as sqzLinearCpuRows; rows cost the same, so
//! equal ranges are equal work.
void sqzHalfLinearCpuRows(HalfLinearArgs const& args, Isa isa, int64_t rowBegin, int64_t rowEnd) noexcept;

//! Weights per dequantized tile of the callers' large-M path (sqzDequantCpuRows into a GEMM): 4 MiB of
//! fp32, in the last-level cache (16 MiB measured no faster).
constexpr int64_t kDEQUANT_TILE_WEIGHTS = int64_t{1} << 20;

//! Rows of a dequantized tile at least: torch's GEMM on 95-row tiles (K = 11008) ran 4096 x 11008 at
//! M = 128 in 160 ms, on 256-row tiles in 114 ms (FP32 matmul 94-109 ms in those runs).
constexpr int64_t kDEQUANT_TILE_MIN_ROWS = 256;

//! Output rows per dequantized (or converted) tile of the large-M path of a K x N weight (all N when it
//! fits one tile).
inline int64_t sqzDequantTileRows(int64_t inFeatures, int64_t outFeatures) noexcept
{
    int64_t const byWeights = kDEQUANT_TILE_WEIGHTS / inFeatures;
    int64_t const rows = byWeights > kDEQUANT_TILE_MIN_ROWS ? byWeights : kDEQUANT_TILE_MIN_ROWS;
    return rows < outFeatures ? rows : outFeatures;
}

//! dst[i] = src[i] for fp16 bit patterns src, with F16C where the CPU has it (the portable bit
//! arithmetic otherwise): the adapters' conversion of fp16 activations for the kernel. Exact.
void sqzCpuHalfToFloat(uint16_t const* src, float* dst, int64_t count) noexcept;

//! dst[i] = src[i] rounded to the nearest fp16 (ties to even, overflow to inf), with F16C where the CPU
//! has it; the same bits as sqz::format::floatToHalfBits except for the payload bits of NaNs.
void sqzCpuFloatToHalf(float const* src, uint16_t* dst, int64_t count) noexcept;

//! Cuts [0, N) into `parts` ranges of equal work: bounds[0] = 0 <= bounds[1] <= ... <= bounds[parts] = N.
//! Work of row n = its packed words + its non-zeros (rowPtr, when nnz > 0), so the cumulative work up
//! to row n is n * words + rowPtr[n] and each bound is a binary search.
void sqzLinearCpuSplit(CpuShape const& shape, int32_t const* rowPtr, int32_t parts, int64_t* bounds) noexcept;

} // namespace cpu
} // namespace sqz
