/*
 * sqzLinearCpuAvx512.cpp: the CPU kernel's row loop (sqzLinearCpuRow.h) for AVX-512F.
 * Compiled for that target by the pragma below, whatever the build flags; called only after
 * sqzCpuSupports(Isa::kAvx512) said yes.
 *
 * 16 indices per step (two per group): 4-bit step h = words 2h (lanes 0-7) and 2h+1 (lanes 8-15);
 * 3-bit step h = chunk3 2h (lanes 0-7) and 2h+1 (lanes 8-15), i.e. group bits 48h..48h+47; each
 * half is a broadcast, lane j of a half shifts by bits*j. (A decode in vector registers only, each
 * lane picking its words with vpermd, measured 1.5x slower at M = 1 on the 2-core AMD EPYC dev
 * machine, which runs 512-bit ops as two 256-bit halves.) The whole LUT (8 or 16 floats) is one
 * zmm, looked up with vpermps.
 */
// Every header with inline functions of external linkage comes before the target pragma: compiled
// after it, their copies in this file could use the ISA, and the linker may keep any one copy.
#include "sqzFormat.h"
#include "sqzLinearCpuIsa.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,f16c")
// GCC 12's AVX-512 intrinsics self-initialize their "undefined" operands (__m512 __Y = __Y), which
// -Wuninitialized reports in every caller (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "sqzHalfLinearRow.h"
#include "sqzLinearCpuAvx512Lanes.h"
#include "sqzLinearCpuRow.h"

namespace
{

struct Avx512 : Avx512Lanes
{
    template <int BITS>
    static V weights(uint32_t const* group, int step, Lut const& l)
    {
        static_assert(BITS == 3 || BITS == 4, "the SIMD paths decode 3- and 4-bit rows");
        uint32_t const lo = BITS == 4 ? group[2 * step] : chunk3(group, 2 * step);
        uint32_t const hi = BITS == 4 ? group[2 * step + 1] : chunk3(group, 2 * step + 1);
        __m512i const stream = _mm512_mask_blend_epi32(
            static_cast<__mmask16>(0xFF00), _mm512_set1_epi32(static_cast<int>(lo)), _mm512_set1_epi32(static_cast<int>(hi)));
        __m512i const shifts = BITS == 4
            ? _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)
            : _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21);
        __m512i const idx = _mm512_and_si512(_mm512_srlv_epi32(stream, shifts), _mm512_set1_epi32((1 << BITS) - 1));
        return _mm512_permutexvar_ps(idx, l.all);
    }
};

} // namespace

void sqz::cpu::detail::rowsAvx512(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1) noexcept
{
    rowsByBits<Avx512>(s, a, r0, r1);
}

void sqz::cpu::detail::dequantAvx512(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, float* w) noexcept
{
    dequantByBits<Avx512>(s, a, r0, r1, w);
}

void sqz::cpu::detail::halfRowsAvx512(HalfLinearArgs const& a, int64_t r0, int64_t r1) noexcept
{
    halfRows<Avx512Lanes>(a, r0, r1);
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
void sqz::cpu::detail::rowsAvx512(CpuShape const&, CpuArgs const&, int64_t, int64_t) noexcept {}
void sqz::cpu::detail::dequantAvx512(CpuShape const&, CpuArgs const&, int64_t, int64_t, float*) noexcept {}
void sqz::cpu::detail::halfRowsAvx512(HalfLinearArgs const&, int64_t, int64_t) noexcept {}
#endif
