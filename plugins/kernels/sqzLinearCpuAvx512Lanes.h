/*
 * sqzLinearCpuAvx512Lanes.h: the 16-lane fp32 operations that both AVX-512 traits of the CPU kernel
 * share (sqzLinearCpuAvx512.cpp: broadcast + shift decode; sqzLinearCpuAvx512Vbmi.cpp: vpmultishiftqb
 * decode). Each of those files includes it after its own `#pragma GCC target`, and nothing else does:
 * it has internal linkage, so every copy is compiled for its file's ISA only.
 */
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace
{

struct Avx512Lanes
{
    using V = __m512;
    static constexpr int kLanes = 16;
    static constexpr int kMaxTile = 16; // 32 zmm registers: 16 accumulators + LUT + decode temporaries
    static constexpr int kRowsAtM1 = 4; // output rows a step at M = 1: 4 LUTs + 4 chains

    struct Lut
    {
        __m512 all; //!< the row's LUT as 16 fp32 lanes, indexed by vpermps with the low 4 bits of an index
    };

    //! A row's LUT as 16 fp32 lanes: 4 bits, its 16 entries; 3 bits, its 8 entries twice. The VBMI
    //! decode leaves the next index's low bit above a 3-bit index, so it reads lanes 8-15 as 0-7; the
    //! shift + mask decode never indexes them.
    template <int BITS>
    static Lut loadLut(uint16_t const* lut)
    {
        if constexpr (BITS == 4)
        {
            return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(lut)))};
        }
        else
        {
            __m128i const eight = _mm_loadu_si128(reinterpret_cast<__m128i const*>(lut));
            return {_mm512_cvtph_ps(_mm256_broadcastsi128_si256(eight))};
        }
    }

    static void store(float* out, V w) { _mm512_storeu_ps(out, w); }
    static V zero() { return _mm512_setzero_ps(); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V fma(V w, float const* x, V acc) { return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc); }
    static float sum(V v) { return _mm512_reduce_add_ps(v); }
    static float halfToFloat(uint16_t h) { return _cvtsh_ss(h); }
    static V loadHalf(uint16_t const* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(p))); }
    //! acc + val[0, 16) (fp16) * x[col[0, 16)]: the CSR non-zeros of finishRow (sqzLinearCpuFinish.h).
    static V gatherFma(uint16_t const* val, int32_t const* col, float const* x, V acc)
    {
        __m512 const values = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(val)));
        __m512 const xs = _mm512_i32gather_ps(_mm512_loadu_si512(col), x, 4);
        return _mm512_fmadd_ps(values, xs, acc);
    }
};

} // namespace
