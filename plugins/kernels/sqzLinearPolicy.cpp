/*
 * sqzLinearPolicy.cpp: the host-side rules of the launcher (plain C++, no CUDA compiler needed):
 * which shapes are supported, which kernel runs for which m, and how much workspace it needs.
 * Kept apart from sqzLinear.cu so the host reference and its tests build with any C++ compiler.
 */
#include "sqzFormat.h"
#include "sqzLinear.h"
#include "sqzLinearConfig.h"

namespace sqz
{

char const* sqzLinearKernelName(KernelKind kind) noexcept
{
    switch (kind)
    {
    case KernelKind::kAuto: return "auto";
    case KernelKind::kGemv: return "gemv (fused LUT dequant + CSR row walk, whole K per warp)";
    case KernelKind::kDequantGemm: return "dequant+gemm (W dequantized to workspace, WMMA tiled GEMM, sparse epilogue)";
    }
    return "unknown";
}

char const* sqzLinearValidate(SqzLinearShape const& s) noexcept
{
    if (s.m < 0)
    {
        return "shape.m (rows of x) must be >= 0";
    }
    if (s.m > config::kMAX_M)
    {
        return "shape.m (rows of x) must be <= 4194240 (65535 GEMM row tiles per launch)";
    }
    if (char const* error = format::validateLayerShape(s.inFeatures, s.outFeatures, s.bits, s.nnz))
    {
        return error;
    }
    if (s.nnz > 0 && s.chunkNnz <= 0)
    {
        return "shape.chunkNnz must be > 0 when shape.nnz > 0";
    }
    if (s.dtype != DataType::kHALF && s.dtype != DataType::kBF16)
    {
        return "shape.dtype must be kHALF or kBF16";
    }
    return nullptr;
}

KernelKind sqzLinearChooseKernel(SqzLinearShape const& s) noexcept
{
    // Up to 16 rows the fused GEMV reads the packed weight exactly once and beats dequantizing it
    // (which writes and re-reads 2 bytes per weight); beyond that the tensor-core GEMM wins.
    return s.m <= kGEMV_MAX_M ? KernelKind::kGemv : KernelKind::kDequantGemm;
}

size_t sqzLinearWorkspaceSizeFor(SqzLinearShape const& s, KernelKind kind) noexcept
{
    if (kind == KernelKind::kAuto)
    {
        kind = sqzLinearChooseKernel(s);
    }
    if (kind != KernelKind::kDequantGemm || sqzLinearValidate(s) != nullptr)
    {
        return 0;
    }
    size_t const bytes = static_cast<size_t>(config::paddedRows(s.outFeatures))
        * static_cast<size_t>(config::paddedCols(s.inFeatures)) * 2u; // fp16 or bf16 elements
    return (bytes + 255u) / 256u * 256u;
}

size_t sqzLinearWorkspaceSize(SqzLinearShape const& s) noexcept
{
    return sqzLinearWorkspaceSizeFor(s, KernelKind::kAuto);
}

} // namespace sqz
