/*
 * sqzLinearCpuRow.h: the SIMD row loop of the SqzLinear CPU kernel, written once over an ISA "traits"
 * type and included by one translation unit per ISA (sqzLinearCpuAvx2.cpp, sqzLinearCpuAvx512.cpp),
 * each of which compiles it under `#pragma GCC target(...)`. Everything here has internal linkage, so
 * the AVX-512 instantiation can never be picked by the linker for a CPU without AVX-512.
 *
 * One output row n, a tile of MT rows of x (decode: MT = M <= 16):
 *
 *   row n words (layout 2)   | g0: bits words | g1: bits words | ... | g(K/32-1) | tail group |
 *                              one group = 32 indices = `bits` int32 words, little-endian bit stream
 *   per group, per step s    L = T::kLanes indices (8 AVX2, 16 AVX-512) decoded in a register:
 *                              broadcast the stream bits, shift lane j right by bits*j (vpsrlvd),
 *                              mask -> L indices -> L fp32 weights by a permute of the row's LUT
 *                              held in registers (3-bit: 8 floats; 4-bit: 16 floats)
 *   per x row i < MT         acc[i] += weights * x[i, k..k+L)       (the weights are reused MT times)
 *   then                     y[i, n] += sum(acc[i]); after the last K block: + tail k (scalar) + CSR
 *                            row n (kLanes non-zeros at a time, x gathered; finishRow, sqzLinearCpuFinish.h)
 *
 * The packed words are read once per x tile: for M <= 16 (AVX-512) or <= 8 (AVX2) exactly once.
 * With a small MT the FMAs of one accumulator form a dependency chain, so steps rotate over
 * kChains = 4 / MT independent accumulators (summed at the end). At M = 1 T::kRowsAtM1 output rows go
 * together (4 AVX-512, 2 AVX2), which gives the chains and overlaps the rows' horizontal sums: over
 * SmolLM2's 210 layers (K = 576 and 1536, 3-bit, one thread) 7.4 ms a pass with one row, 6.3 with four.
 */
#pragma once

#include "sqzLinearCpu.h"
#include "sqzLinearCpuFinish.h"
#include "sqzLinearCpuIsa.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace
{

using sqz::cpu::CpuArgs;
using sqz::cpu::CpuShape;

//! One step of one group: L weights decoded once, then MT FMAs into accumulator chain STEP % kChains.
//! STEP is a template argument so the stream window, the shifts and the accumulator are constants
//! (a runtime index would put the accumulators in memory).
//! 32-bit stream window of 3-bit chunk c (indices 8c..8c+7 start at its bit 0): chunk c begins at
//! group bit 24c, i.e. word 0 bit 0, word 0 bit 24, word 1 bit 16, word 2 bit 8.
inline uint32_t chunk3(uint32_t const* w, int c)
{
    switch (c)
    {
    case 0: return w[0];
    case 1: return (w[0] >> 24) | (w[1] << 8);
    case 2: return (w[1] >> 16) | (w[2] << 16);
    default: return w[2] >> 8;
    }
}

template <class T, int BITS, int MT, int ROWS, int CHAINS, int STEP>
inline void groupStep(uint32_t const* group, int64_t words, float const* xg, int64_t xStride,
    typename T::Lut const (&lut)[ROWS], typename T::V (&acc)[ROWS][MT][CHAINS])
{
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
    {
        typename T::V const w = T::template weights<BITS>(group + r * words, STEP, lut[r]);
#pragma GCC unroll 16
        for (int i = 0; i < MT; ++i)
        {
            acc[r][i][STEP % CHAINS] = T::fma(w, xg + i * xStride + STEP * T::kLanes, acc[r][i][STEP % CHAINS]);
        }
    }
}

template <class T, int BITS, int MT, int ROWS, int CHAINS, int... STEPS>
inline void groupSteps(uint32_t const* group, int64_t words, float const* xg, int64_t xStride,
    typename T::Lut const (&lut)[ROWS], typename T::V (&acc)[ROWS][MT][CHAINS], std::integer_sequence<int, STEPS...>)
{
    (groupStep<T, BITS, MT, ROWS, CHAINS, STEPS>(group, words, xg, xStride, lut, acc), ...);
}

//! Prefetches the packed words of row n + kPREFETCH_ROWS at the columns it is reading: with K
//! blocks (K > 4096 at M = 1) a chunk's rows are read as segments one row apart, a stride the hardware
//! prefetcher does not follow (measured: 4096 x 11008 at M = 1 ran 1.4x slower per weight than
//! 4096 x 4096 without it, at the same speed with it; M = 4 1.4x faster too). One prefetch per group
//! and row.
//!
//! y[m0 + i, n + r] (+)= the dense sum over groups [g0, g1) of rows n .. n + ROWS - 1, for i < MT
//! (stored when g0 == 0); xb holds x[m0 + i, 32 g0 ...] at xb + i * xStride. ROWS > 1 is for one x row
//! (decode): the rows' FMA chains are independent and the x loads are shared, and the row's horizontal
//! sum, which for SmolLM2's K = 576 cost as much as half of its 18 groups, overlaps with the others'.
template <class T, int BITS, int MT, int ROWS = 1>
void rowTile(CpuShape const& s, CpuArgs const& a, int64_t n, int64_t m0, int64_t g0, int64_t g1, float const* xb,
    int64_t xStride)
{
    using V = typename T::V;
    constexpr int kSteps = 32 / T::kLanes;
    constexpr int kChains = MT * ROWS >= 4 ? 1 : (4 / (MT * ROWS) < kSteps ? 4 / (MT * ROWS) : kSteps);
    int64_t const K = s.inFeatures;
    int64_t const words = static_cast<int64_t>(BITS) * ((K + 31) / 32);
    auto const* row = reinterpret_cast<uint32_t const*>(a.qweight) + n * words;
    typename T::Lut lut[ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
    {
        lut[r] = T::template loadLut<BITS>(a.lut + (n + r) * (1 << BITS));
    }

    V acc[ROWS][MT][kChains];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
    {
#pragma GCC unroll 16
        for (int i = 0; i < MT; ++i)
        {
            for (int c = 0; c < kChains; ++c)
            {
                acc[r][i][c] = T::zero();
            }
        }
    }
    for (int64_t g = g0; g < g1; ++g)
    {
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; ++r)
        {
            __builtin_prefetch(row + (kPREFETCH_ROWS + r) * words + g * BITS);
        }
        groupSteps<T, BITS, MT, ROWS, kChains>(row + g * BITS, words, xb + (g - g0) * 32, xStride, lut, acc,
            std::make_integer_sequence<int, kSteps>{});
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
    {
#pragma GCC unroll 16
        for (int i = 0; i < MT; ++i)
        {
            for (int c = 1; c < kChains; ++c)
            {
                acc[r][i][0] = T::add(acc[r][i][0], acc[r][i][c]);
            }
            float& out = a.y[(m0 + i) * s.outFeatures + n + r];
            out = (g0 == 0 ? 0.0f : out) + T::sum(acc[r][i][0]);
        }
    }
}

//! Rows [r0, r1) of y for x rows [m0, m0 + mt) (mt <= T::kMaxTile), tiles of 16, 8, 4, 2, 1 rows (one
//! x row: T::kRowsAtM1 output rows at a time);
//! x row m0 + i of the block at xb + i * xStride.
template <class T, int BITS>
void rowsTile(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, int64_t m0, int64_t mt, int64_t g0,
    int64_t g1, float const* xb, int64_t xStride)
{
    int64_t n = r0;
    if (mt == 1)
    {
        for (; n + T::kRowsAtM1 <= r1; n += T::kRowsAtM1)
        {
            rowTile<T, BITS, 1, T::kRowsAtM1>(s, a, n, m0, g0, g1, xb, xStride);
        }
    }
    for (; n < r1; ++n)
    {
        int64_t m = m0;
        int64_t const end = m0 + mt;
        if constexpr (T::kMaxTile >= 16)
        {
            if (end - m >= 16)
            {
                rowTile<T, BITS, 16>(s, a, n, m, g0, g1, xb + (m - m0) * xStride, xStride);
                m += 16;
            }
        }
        if (end - m >= 8)
        {
            rowTile<T, BITS, 8>(s, a, n, m, g0, g1, xb + (m - m0) * xStride, xStride);
            m += 8;
        }
        if (end - m >= 4)
        {
            rowTile<T, BITS, 4>(s, a, n, m, g0, g1, xb + (m - m0) * xStride, xStride);
            m += 4;
        }
        if (end - m >= 2)
        {
            rowTile<T, BITS, 2>(s, a, n, m, g0, g1, xb + (m - m0) * xStride, xStride);
            m += 2;
        }
        if (end - m >= 1)
        {
            rowTile<T, BITS, 1>(s, a, n, m, g0, g1, xb + (m - m0) * xStride, xStride);
        }
    }
}

//! Rows [r0, r1): x in tiles of up to T::kMaxTile rows; within a tile, K in blocks whose x slice
//! (tile rows x block columns, fp32) fits in kX_BLOCK_BYTES of L1; output rows in chunks of
//! kROW_CHUNK, each chunk running every K block over its rows. So a chunk's packed words (16 rows x
//! K * bits / 8 bytes, 24 KB for 3-bit K = 4096) stay in L2 across the blocks and the x slice stays in
//! L1 across the chunk's rows. With more than one x row, x is first repacked block by block into
//! `xPacked` ([block][tile row][block columns], contiguous slices): rows K * 4 bytes apart (16 KB for
//! K = 4096) would fall into the same L1 sets and evict each other.
//! Each block adds its partial sums to y; the K tail (< 32) and the CSR rows are added last (finishRow).
template <class T, int BITS>
void rowsSimd(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1)
{
    constexpr int64_t kX_BLOCK_BYTES = 16 * 1024;
    constexpr int64_t kROW_CHUNK = 16;
    int64_t const K = s.inFeatures;
    int64_t const fullGroups = K / 32;
    std::vector<float> xPacked;
    for (int64_t m0 = 0; m0 < s.m; m0 += T::kMaxTile)
    {
        int64_t const mt = s.m - m0 < T::kMaxTile ? s.m - m0 : T::kMaxTile;
        int64_t const blockGroups = kX_BLOCK_BYTES / (mt * 32 * 4) > 0 ? kX_BLOCK_BYTES / (mt * 32 * 4) : 1;
        float const* xTile = a.x + m0 * K;
        if (mt > 1)
        {
            xPacked.resize(static_cast<size_t>(mt * fullGroups * 32));
            for (int64_t g0 = 0; g0 < fullGroups; g0 += blockGroups)
            {
                int64_t const cols = ((g0 + blockGroups < fullGroups ? g0 + blockGroups : fullGroups) - g0) * 32;
                for (int64_t i = 0; i < mt; ++i)
                {
                    std::copy_n(xTile + i * K + g0 * 32, cols, xPacked.data() + mt * g0 * 32 + i * cols);
                }
            }
        }
        for (int64_t c0 = r0; c0 < r1; c0 += kROW_CHUNK)
        {
            int64_t const c1 = c0 + kROW_CHUNK < r1 ? c0 + kROW_CHUNK : r1;
            if (fullGroups == 0)
            {
                for (int64_t n = c0; n < c1; ++n)
                {
                    for (int64_t i = 0; i < mt; ++i)
                    {
                        a.y[(m0 + i) * s.outFeatures + n] = 0.0f;
                    }
                }
            }
            for (int64_t g0 = 0; g0 < fullGroups; g0 += blockGroups)
            {
                int64_t const g1 = g0 + blockGroups < fullGroups ? g0 + blockGroups : fullGroups;
                bool const packed = mt > 1;
                float const* xb = packed ? xPacked.data() + mt * g0 * 32 : xTile + g0 * 32;
                rowsTile<T, BITS>(s, a, c0, c1, m0, mt, g0, g1, xb, packed ? (g1 - g0) * 32 : K);
            }
            if (mt == 1 && fullGroups * 32 == K)
            {
                if (s.nnz > 0)
                {
                    finishRowsNoTail<T>(s, a, c0, c1, xTile, a.y + m0 * s.outFeatures);
                }
            }
            else
            {
                for (int64_t n = c0; n < c1; ++n)
                {
                    finishRow<T>(s, a, n, m0, static_cast<int>(mt), fullGroups * 32);
                }
            }
        }
    }
}

//! W rows [r0, r1) as fp32 [r1 - r0, K] at w: each group's indices decoded kLanes at a time as in the
//! GEMV, stored instead of multiplied; the K tail (< 32) and the CSR values are added by finishDequant.
template <class T, int BITS>
void dequantSimd(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, float* w)
{
    constexpr int kSteps = 32 / T::kLanes;
    int64_t const K = s.inFeatures;
    int64_t const words = static_cast<int64_t>(BITS) * ((K + 31) / 32);
    for (int64_t n = r0; n < r1; ++n)
    {
        auto const* row = reinterpret_cast<uint32_t const*>(a.qweight) + n * words;
        typename T::Lut const lut = T::template loadLut<BITS>(a.lut + n * (1 << BITS));
        float* out = w + (n - r0) * K;
        for (int64_t g = 0; g < K / 32; ++g)
        {
#pragma GCC unroll 4
            for (int step = 0; step < kSteps; ++step)
            {
                T::store(out + g * 32 + step * T::kLanes, T::template weights<BITS>(row + g * BITS, step, lut));
            }
        }
        sqz::cpu::detail::finishDequant(s, a, n, (K / 32) * 32, out);
    }
}

template <class T>
void dequantByBits(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, float* w)
{
    if (s.bits == 3)
    {
        dequantSimd<T, 3>(s, a, r0, r1, w);
    }
    else
    {
        dequantSimd<T, 4>(s, a, r0, r1, w);
    }
}

//! rowsSimd for the row's bit width (3 or 4; sqzCpuEffectiveIsa sends the others to the scalar path).
template <class T>
void rowsByBits(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1)
{
    if (s.bits == 3)
    {
        rowsSimd<T, 3>(s, a, r0, r1);
    }
    else
    {
        rowsSimd<T, 4>(s, a, r0, r1);
    }
}

} // namespace
