/*
 * sqzHalfLinearRow.h: the loop of sqzHalfLinearCpuRows (y = x W^T, W fp16 [N, K]), one template for
 * every ISA: the portable path (sqzLinearCpu.cpp) and the SIMD files, each of which includes this
 * after its own `#pragma GCC target` with its lane traits (internal linkage: one copy per ISA).
 *
 * Traits T: V, kLanes, zero(), add(V, V), fma(w, x pointer, acc), sum(V), halfToFloat(h), loadHalf(pointer
 * to kLanes fp16) -> V. One output row at a time, each row of W read once from memory and from L1 for
 * every further row of x (K * 2 bytes: 1.1 KB at K = 576). Blocks of 4 rows read as 4 interleaved short
 * streams ran at half the bandwidth (8.7 against 15-17 GB/s on one core of the dev machine): the
 * prefetcher wants one long stream.
 */
#pragma once

#include "sqzLinearCpu.h"

#include <cstdint>

namespace
{

constexpr int kHALF_ACC = 4; //!< independent accumulators per dot product (FMA latency x throughput)

//! y[m, n] for every m: one row of W, read front to back (rows follow each other in memory, so the
//! whole call is one sequential stream for the prefetcher), kHALF_ACC lane vectors per step.
template <class T>
void halfRow(sqz::cpu::HalfLinearArgs const& a, int64_t n) noexcept
{
    int64_t const k = a.inFeatures;
    int64_t constexpr step = int64_t{kHALF_ACC} * T::kLanes;
    int64_t const kUnrolled = k - k % step;
    int64_t const kVec = k - k % T::kLanes;
    uint16_t const* w = a.w + n * k;
    for (int64_t m = 0; m < a.m; ++m)
    {
        float const* x = a.x + m * k;
        typename T::V acc[kHALF_ACC];
        for (int j = 0; j < kHALF_ACC; ++j)
        {
            acc[j] = T::zero();
        }
        int64_t i = 0;
        for (; i < kUnrolled; i += step)
        {
            for (int j = 0; j < kHALF_ACC; ++j)
            {
                acc[j] = T::fma(T::loadHalf(w + i + j * T::kLanes), x + i + j * T::kLanes, acc[j]);
            }
        }
        for (; i < kVec; i += T::kLanes)
        {
            acc[0] = T::fma(T::loadHalf(w + i), x + i, acc[0]);
        }
        for (int j = 1; j < kHALF_ACC; ++j)
        {
            acc[0] = T::add(acc[0], acc[j]);
        }
        float out = T::sum(acc[0]);
        for (; i < k; ++i)
        {
            out += T::halfToFloat(w[i]) * x[i];
        }
        a.y[m * a.outFeatures + n] = out;
    }
}

template <class T>
void halfRows(sqz::cpu::HalfLinearArgs const& a, int64_t r0, int64_t r1) noexcept
{
    for (int64_t n = r0; n < r1; ++n)
    {
        halfRow<T>(a, n);
    }
}

} // namespace
