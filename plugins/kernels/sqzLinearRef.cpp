/*
 * sqzLinearRef.cpp: host reference twin of the SqzLinear kernels (sqzLinear.cu), same semantics:
 *
 *   y[m, n] = round_dtype( sum_{k < K} float(x[m, k]) * float(LUT[n, idx[n, k]])
 *                        + sum_{j in row n of the CSR, in order} float(val[j]) * float(x[m, col[j]]) )
 *
 * accumulated in fp32, k in increasing order, then the non-zeros; one rounding at the end. The
 * kernels split the k sum over 32 lanes (GEMV) or tensor-core tiles (GEMM), so they agree with this
 * reference up to fp32 reassociation, which the tests bound with the (sqz_linear, dtype) tolerances.
 * The index decode is sqz::format::rowIndex, the same bit stream the kernels' groupIndex reads.
 */
#include "sqzFormat.h"
#include "sqzLinear.h"

#include <cstdint>
#include <vector>

namespace sqz
{

char const* sqzLinearRef(SqzLinearShape const& s, SqzLinearArgs const& a) noexcept
{
    if (char const* error = sqzLinearValidate(s))
    {
        return error;
    }
    if (s.m == 0)
    {
        return nullptr;
    }
    if (a.x == nullptr || a.qweight == nullptr || a.lut == nullptr || a.y == nullptr)
    {
        return "args.x, args.qweight, args.lut and args.y must not be null";
    }
    if (s.nnz > 0 && (a.rowPtr == nullptr || a.col == nullptr || a.val == nullptr))
    {
        return "args.rowPtr, args.col and args.val must not be null when shape.nnz > 0";
    }
    bool const bf16 = s.dtype == DataType::kBF16;
    auto const toFloat = [bf16](uint16_t v) { return bf16 ? format::bf16BitsToFloat(v) : format::halfBitsToFloat(v); };
    auto const* x = static_cast<uint16_t const*>(a.x);
    auto const* lut = static_cast<uint16_t const*>(a.lut);
    auto const* val = static_cast<uint16_t const*>(a.val);
    auto const* words = reinterpret_cast<uint32_t const*>(a.qweight);
    auto* y = static_cast<uint16_t*>(a.y);
    int64_t const K = s.inFeatures;
    int64_t const N = s.outFeatures;
    int64_t const wordsPerRow = format::packedWords(K, s.bits);
    int64_t const entries = format::lutEntries(s.bits);

    std::vector<float> w(static_cast<size_t>(K)); // row n of LUT[idx]
    for (int64_t n = 0; n < N; ++n)
    {
        uint32_t const* row = words + n * wordsPerRow;
        for (int64_t k = 0; k < K; ++k)
        {
            w[static_cast<size_t>(k)] = format::halfBitsToFloat(lut[n * entries + format::rowIndex(row, s.bits, k)]);
        }
        int32_t const nzBegin = s.nnz > 0 ? a.rowPtr[n] : 0;
        int32_t const nzEnd = s.nnz > 0 ? a.rowPtr[n + 1] : 0;
        for (int64_t m = 0; m < s.m; ++m)
        {
            uint16_t const* xr = x + m * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k)
            {
                acc += toFloat(xr[k]) * w[static_cast<size_t>(k)];
            }
            for (int32_t j = nzBegin; j < nzEnd; ++j)
            {
                acc += format::halfBitsToFloat(val[j]) * toFloat(xr[a.col[j]]);
            }
            y[m * N + n] = bf16 ? format::floatToBf16Bits(acc) : format::floatToHalfBits(acc);
        }
    }
    return nullptr;
}

} // namespace sqz
