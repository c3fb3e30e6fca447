/*
 * sqzLinearCpuAvx512Vbmi.cpp: the AVX-512 row loop (sqzLinearCpuRow.h) with a cheaper decode, for CPUs
 * that also have AVX512_VBMI (+ BW, VL): the Isa::kAvx512 path runs it where __builtin_cpu_supports says
 * so, and sqzLinearCpuAvx512.cpp elsewhere. Same weights in the same lanes, so the same FMAs and bits.
 *
 * 16 indices per step from one 64-bit window of the row's bit stream (4-bit: words 2h, 2h+1; 3-bit:
 * group bits 48h..48h+47, read inside the group's 12 bytes), broadcast to the 8 qwords by the load
 * itself; vpmultishiftqb puts index i's 8 bits (from its bit offset) in the low byte of dword lane i, and
 * vpermps looks the lanes up in the 16-entry LUT, which it indexes with their low 4 bits only (the
 * other bytes are never read). A 3-bit index's fourth bit is the next index's lowest, so the 3-bit LUT
 * holds its 8 entries twice. Two vector operations per 16 weights besides the FMA, against six in
 * sqzLinearCpuAvx512.cpp (two broadcasts from general registers, blend, shift, mask, permute); the first
 * version of this file, which widened 16 bytes with vpmovzxbd, had four.
 */
// Every header with inline functions of external linkage comes before the target pragma (see
// sqzLinearCpuAvx512.cpp).
#include "sqzFormat.h"
#include "sqzLinearCpuIsa.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "sqzLinearCpuAvx512Lanes.h"
#include "sqzLinearCpuRow.h"

namespace
{

struct Avx512Vbmi : Avx512Lanes
{
    //! vpmultishiftqb control: dword lane i (qword i / 2, byte 4 (i % 2)) takes the 8 window bits from
    //! bit `base + BITS * i`; the other bytes are never read, since vpermps indexes with the low 4 bits.
    template <int BITS, int BASE>
    static __m512i laneOffsets()
    {
        auto o = [](int i) { return static_cast<long long>((BASE + BITS * i) & 63); };
        auto q = [&](int i) { return o(2 * i) | (o(2 * i + 1) << 32); };
        return _mm512_setr_epi64(q(0), q(1), q(2), q(3), q(4), q(5), q(6), q(7));
    }

    template <int BITS>
    static V weights(uint32_t const* group, int step, Lut const& l)
    {
        static_assert(BITS == 3 || BITS == 4, "the SIMD paths decode 3- and 4-bit rows");
        // 4-bit: step s reads words 2s, 2s+1. 3-bit: step 0 reads bytes 0-7 of the 12-byte group, step 1
        // bytes 4-11, whose bits 16.. are group bits 48.. (the compiler makes the copy and the broadcast
        // one vpbroadcastq load, no shuffle).
        long long bits;
        std::memcpy(&bits, reinterpret_cast<unsigned char const*>(group) + (BITS == 4 ? 8 : 4) * step, sizeof(bits));
        __m512i const window = _mm512_set1_epi64(bits);
        __m512i const offsets = BITS == 4 ? laneOffsets<4, 0>() : (step == 0 ? laneOffsets<3, 0>() : laneOffsets<3, 16>());
        return _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(offsets, window), l.all);
    }
};

} // namespace

void sqz::cpu::detail::rowsAvx512Vbmi(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1) noexcept
{
    rowsByBits<Avx512Vbmi>(s, a, r0, r1);
}

void sqz::cpu::detail::dequantAvx512Vbmi(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, float* w) noexcept
{
    dequantByBits<Avx512Vbmi>(s, a, r0, r1, w);
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
void sqz::cpu::detail::rowsAvx512Vbmi(CpuShape const&, CpuArgs const&, int64_t, int64_t) noexcept {}
void sqz::cpu::detail::dequantAvx512Vbmi(CpuShape const&, CpuArgs const&, int64_t, int64_t, float*) noexcept {}
#endif
