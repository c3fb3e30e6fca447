/*
 * sqzLinearCpuAvx512Vbmi.cpp: the AVX-512 row loop (sqzLinearCpuRow.h) with a cheaper decode, for CPUs
 * that also have AVX512_VBMI (+ BW, VL): the Isa::kAvx512 path runs it where __builtin_cpu_supports says
 * so, and sqzLinearCpuAvx512.cpp elsewhere. Same weights in the same lanes, so the same FMAs and bits.
 *
 * 16 indices per step from one 64-bit window of the row's bit stream (4-bit: words 2h, 2h+1; 3-bit:
 * group bits 48h..48h+47, read inside the group's 12 bytes): vpmultishiftqb picks each index's byte
 * (8 bits from its bit offset), vpmovzxbd widens them to 16 lanes, and vpermps looks them up in the
 * 16-entry LUT, which it indexes with the low 4 bits only. A 3-bit index's fourth bit is the next
 * index's lowest, so the 3-bit LUT holds its 8 entries twice. About half the decode instructions of the
 * broadcast + shift + mask decode of sqzLinearCpuAvx512.cpp.
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
    template <int BITS>
    static V weights(uint32_t const* group, int step, Lut const& l)
    {
        static_assert(BITS == 3 || BITS == 4, "the SIMD paths decode 3- and 4-bit rows");
        uint64_t window;
        if constexpr (BITS == 4)
        {
            std::memcpy(&window, group + 2 * step, sizeof(window));
        }
        else
        {
            // Step 0: bytes 0-7 of the 12-byte group; step 1: bytes 4-11, whose bits 16.. are group bits 48..
            std::memcpy(&window, reinterpret_cast<unsigned char const*>(group) + 4 * step, sizeof(window));
            window >>= 16 * step;
        }
        __m128i const offsets = BITS == 4
            ? _mm_setr_epi8(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60)
            : _mm_setr_epi8(0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45);
        __m128i const bytes = _mm_multishift_epi64_epi8(offsets, _mm_set1_epi64x(static_cast<long long>(window)));
        return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(bytes), l.all);
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
