/*
 * sqzLinearCpuAvx2.cpp: the CPU kernel's row loop (sqzLinearCpuRow.h) for AVX2 + FMA + F16C.
 * Compiled for that target by the pragma below, whatever the build flags; called only after
 * sqzCpuSupports(Isa::kAvx2) said yes.
 *
 * 8 indices per step: 4-bit step q = word q of the group (8 whole nibbles); 3-bit step q = the 24 bits
 * at group bit 24q (chunk3). Lane j shifts by bits*j. 3-bit LUT = 8 floats = one ymm, looked up with
 * vpermps; 4-bit LUT = two ymm (entries 0-7, 8-15), looked up in both and blended on index bit 3.
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
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "sqzHalfLinearRow.h"
#include "sqzLinearCpuRow.h"

namespace
{

struct Avx2
{
    using V = __m256;
    static constexpr int kLanes = 8;
    static constexpr int kMaxTile = 8; // 16 ymm registers: 8 accumulators + LUT + decode temporaries
    static constexpr int kRowsAtM1 = 2; // output rows a step at M = 1: 2 LUTs (4 ymm at 4 bits) + 4 chains

    struct Lut
    {
        __m256 lo; //!< entries 0-7
        __m256 hi; //!< entries 8-15 (4-bit only)
    };

    template <int BITS>
    static Lut loadLut(uint16_t const* lut)
    {
        Lut l;
        l.lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(lut)));
        l.hi = BITS == 4 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(lut + 8))) : l.lo;
        return l;
    }

    template <int BITS>
    static V weights(uint32_t const* group, int step, Lut const& l)
    {
        static_assert(BITS == 3 || BITS == 4, "the SIMD paths decode 3- and 4-bit rows");
        if constexpr (BITS == 4)
        {
            __m256i const shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            __m256i const idx = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(group[step])), shifts), _mm256_set1_epi32(15));
            __m256 const low = _mm256_permutevar8x32_ps(l.lo, idx);
            __m256 const high = _mm256_permutevar8x32_ps(l.hi, idx);
            return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        }
        else
        {
            __m256i const shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
            __m256i const idx = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(chunk3(group, step))), shifts), _mm256_set1_epi32(7));
            return _mm256_permutevar8x32_ps(l.lo, idx);
        }
    }

    static void store(float* out, V w) { _mm256_storeu_ps(out, w); }
    static V zero() { return _mm256_setzero_ps(); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V fma(V w, float const* x, V acc) { return _mm256_fmadd_ps(w, _mm256_loadu_ps(x), acc); }
    static float halfToFloat(uint16_t h) { return _cvtsh_ss(h); }
    static V loadHalf(uint16_t const* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(p))); }
    //! acc + val[0, 8) (fp16) * x[col[0, 8)]: the CSR non-zeros of finishRow (sqzLinearCpuFinish.h).
    static V gatherFma(uint16_t const* val, int32_t const* col, float const* x, V acc)
    {
        __m256 const values = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(val)));
        __m256 const xs = _mm256_i32gather_ps(x, _mm256_loadu_si256(reinterpret_cast<__m256i const*>(col)), 4);
        return _mm256_fmadd_ps(values, xs, acc);
    }
    static float sum(V v)
    {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
};

} // namespace

void sqz::cpu::detail::rowsAvx2(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1) noexcept
{
    rowsByBits<Avx2>(s, a, r0, r1);
}

void sqz::cpu::detail::dequantAvx2(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, float* w) noexcept
{
    dequantByBits<Avx2>(s, a, r0, r1, w);
}

void sqz::cpu::detail::halfRowsAvx2(HalfLinearArgs const& a, int64_t r0, int64_t r1) noexcept
{
    halfRows<Avx2>(a, r0, r1);
}

void sqz::cpu::detail::halfToFloatF16c(uint16_t const* src, float* dst, int64_t count) noexcept
{
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
    {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(src + i))));
    }
    for (; i < count; ++i)
    {
        dst[i] = _cvtsh_ss(src[i]);
    }
}

void sqz::cpu::detail::floatToHalfF16c(float const* src, uint16_t* dst, int64_t count) noexcept
{
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
    {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < count; ++i)
    {
        dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    }
}

#pragma GCC pop_options
#else
void sqz::cpu::detail::rowsAvx2(CpuShape const&, CpuArgs const&, int64_t, int64_t) noexcept {}
void sqz::cpu::detail::dequantAvx2(CpuShape const&, CpuArgs const&, int64_t, int64_t, float*) noexcept {}
void sqz::cpu::detail::halfRowsAvx2(HalfLinearArgs const&, int64_t, int64_t) noexcept {}
void sqz::cpu::detail::halfToFloatF16c(uint16_t const*, float*, int64_t) noexcept {}
void sqz::cpu::detail::floatToHalfF16c(float const*, uint16_t*, int64_t) noexcept {}
#endif
