/*
 * sqzLinearCpuFinish.h: the end of one output row of the CPU kernel's GEMV, the K tail (< 32) and the
 * CSR residual, written once over a traits type T: the portable path (sqzLinearCpu.cpp: T::kLanes = 1,
 * every term in CSR order, as sqzLinearRef) and the SIMD row loop (sqzLinearCpuRow.h: the ISA's F16C
 * conversion and T::kLanes non-zeros at a time). Internal linkage, like sqzLinearCpuRow.h, so each
 * translation unit compiles its own copy for its own ISA.
 */
#pragma once

#include "sqzFormat.h"
#include "sqzLinearCpu.h"

#include <cstdint>

namespace
{

//! Rows ahead of the current one whose data the kernel prefetches (the packed words in rowTile, the
//! CSR arrays in finishRow).
constexpr int64_t kPREFETCH_ROWS = 8;

//! acc + the CSR non-zeros [j, nzEnd) of one row times x at their columns: T::kLanes at a time while
//! that many are left (T::gatherFma, summed into acc once), then one by one.
template <class T>
inline __attribute__((always_inline)) float addCsrRow(
    sqz::cpu::CpuArgs const& a, int32_t j, int32_t nzEnd, float const* x, float acc)
{
    if constexpr (T::kLanes > 1)
    {
        if (nzEnd - j >= T::kLanes)
        {
            typename T::V sparse = T::zero();
            for (; j + T::kLanes <= nzEnd; j += T::kLanes)
            {
                sparse = T::gatherFma(a.val + j, a.col + j, x, sparse);
            }
            acc += T::sum(sparse);
        }
    }
    for (; j < nzEnd; ++j)
    {
        acc += T::halfToFloat(a.val[j]) * x[a.col[j]];
    }
    return acc;
}

//! y[m0 + i, n] += the k >= kBegin tail of the dense sum + CSR row n, for i < mt; y holds the dense sum
//! over k < kBegin. T::halfToFloat converts the fp16 LUT entries and values; for T::kLanes > 1 the
//! non-zeros go T::kLanes at a time (T::gatherFma: x gathered at their columns), the last < kLanes of a
//! row one by one. The CSR of row n + kPREFETCH_ROWS is prefetched. At 0.45% sparse on LLaMA-7B shapes,
//! M = 1, 3-bit, the portable finish added 6-19% to the SIMD GEMV (single-threaded runs), the SIMD one 0-5%.
template <class T>
void finishRow(sqz::cpu::CpuShape const& s, sqz::cpu::CpuArgs const& a, int64_t n, int64_t m0, int mt, int64_t kBegin)
{
    int64_t const K = s.inFeatures;
    int32_t const entries = sqz::format::lutEntries(s.bits);
    auto const* row = reinterpret_cast<uint32_t const*>(a.qweight) + n * sqz::format::packedWords(K, s.bits);
    int32_t const nzBegin = s.nnz > 0 ? a.rowPtr[n] : 0;
    int32_t const nzEnd = s.nnz > 0 ? a.rowPtr[n + 1] : 0;
    if (s.nnz > 0 && n + kPREFETCH_ROWS < s.outFeatures)
    {
        int32_t const ahead = a.rowPtr[n + kPREFETCH_ROWS];
        __builtin_prefetch(a.col + ahead);
        __builtin_prefetch(a.val + ahead);
    }
    for (int i = 0; i < mt; ++i)
    {
        float const* x = a.x + (m0 + i) * K;
        float& out = a.y[(m0 + i) * s.outFeatures + n];
        float acc = out;
        for (int64_t k = kBegin; k < K; ++k)
        {
            acc += T::halfToFloat(a.lut[n * entries + sqz::format::rowIndex(row, s.bits, k)]) * x[k];
        }
        out = addCsrRow<T>(a, nzBegin, nzEnd, x, acc);
    }
}

//! finishRow for one x row (decode) with no K tail, rows [n0, n1): the same sums in the same order,
//! without the tail loop, the per-x-row loop and their index arithmetic. At SmolLM2's K = 576 a row has
//! about 3 of its non-zeros at 0.45%, and finishRow's set-up cost more than they did: over SmolLM2's 210
//! layers in one thread, finishRow made a dense pass 6.3 ms and a 0.45% one 8.1 ms; with this loop
//! 5.3 and 6.6 ms (a dense pass skips it).
template <class T>
void finishRowsNoTail(sqz::cpu::CpuShape const& s, sqz::cpu::CpuArgs const& a, int64_t n0, int64_t n1, float const* x, float* y)
{
    int32_t const* rowPtr = a.rowPtr;
    int32_t j = rowPtr[n0];
    for (int64_t n = n0; n < n1; ++n)
    {
        int32_t const nzEnd = rowPtr[n + 1];
        if (n + kPREFETCH_ROWS < s.outFeatures)
        {
            int32_t const ahead = rowPtr[n + kPREFETCH_ROWS];
            __builtin_prefetch(a.col + ahead);
            __builtin_prefetch(a.val + ahead);
        }
        y[n] = addCsrRow<T>(a, j, nzEnd, x, y[n]);
        j = nzEnd;
    }
}

} // namespace
