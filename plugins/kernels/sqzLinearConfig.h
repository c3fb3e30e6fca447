/*
 * sqzLinearConfig.h: tile sizes shared by the kernels (sqzLinear.cu) and the host-side policy
 * (sqzLinearPolicy.cpp: validation, kernel choice, workspace size), so both agree on the workspace.
 */
#pragma once

#include <cstdint>

namespace sqz
{
namespace config
{

constexpr int kGEMV_WARPS = 4;     //!< warps (= output rows) per GEMV block
constexpr int kMAX_GRID_Y = 65535; //!< CUDA limit on gridDim.y
constexpr int kTILE_M = 64;        //!< GEMM block tile (rows of x)
constexpr int kTILE_N = 64;        //!< GEMM block tile (rows of W = columns of y); workspace rows pad to it
constexpr int kTILE_K = 32;        //!< GEMM k step (one packing group); workspace columns pad to it
constexpr int kSMEM_PAD = 8;       //!< 16-bit elements of row padding in the GEMM tiles (bank spread)
constexpr int kGEMM_THREADS = 128; //!< 4 warps as 2 x 2, each a 32 x 32 sub-tile
constexpr int kDEQUANT_WARPS = 4;  //!< rows per dequantization block
constexpr int32_t kMAX_M = kMAX_GRID_Y * kTILE_M; //!< largest m one launch accepts (GEMM row tiles on gridDim.y)

//! N rounded up to whole GEMM tiles (rows of the dequantized workspace).
constexpr int64_t paddedRows(int64_t outFeatures)
{
    return (outFeatures + kTILE_N - 1) / kTILE_N * kTILE_N;
}

//! K rounded up to whole groups (columns of the dequantized workspace).
constexpr int64_t paddedCols(int64_t inFeatures)
{
    return (inFeatures + kTILE_K - 1) / kTILE_K * kTILE_K;
}

} // namespace config
} // namespace sqz
