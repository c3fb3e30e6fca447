/*
 * sqzLinearCpu.cpp: the SqzLinear CPU kernel's dispatch, validation, balanced row split and the
 * portable scalar path (sqzLinearCpu.h). Compiled for the baseline ISA; the AVX2 and AVX-512 row
 * loops live in their own translation units (sqzLinearCpuAvx2.cpp, sqzLinearCpuAvx512.cpp) and only
 * run after the CPU said it has them (__builtin_cpu_supports, which also checks the OS saves the
 * registers). Bit layout: sqzFormat.h; the SIMD row loop and its register use: sqzLinearCpuRow.h.
 */
#include "sqzLinearCpu.h"

#include "sqzFormat.h"
#include "sqzHalfLinearRow.h"
#include "sqzLinearCpuFinish.h"
#include "sqzLinearCpuIsa.h"

#include <algorithm>
#include <cstdint>

namespace sqz
{
namespace cpu
{

namespace
{

constexpr int kSCALAR_TILE = 16; //!< x rows per pass of the scalar path

//! finishRow's traits for the portable path: the bit-arithmetic fp16 conversion, one non-zero at a time.
struct PortableFinish
{
    static constexpr int kLanes = 1;
    static float halfToFloat(uint16_t h) { return format::halfBitsToFloat(h); }
};

//! sqzHalfLinearRow.h's traits for the portable path: one weight per step.
struct PortableHalf : PortableFinish
{
    using V = float;
    static V zero() { return 0.0F; }
    static V loadHalf(uint16_t const* p) { return format::halfBitsToFloat(*p); }
    static V add(V a, V b) { return a + b; }
    static V fma(V w, float const* x, V acc) { return acc + w * *x; }
    static float sum(V v) { return v; }
};

//! Rows [r0, r1), every bit width: decode one index at a time (sqz::format::rowIndex), LUT from an
//! fp32 copy of the row's table, x in tiles of kSCALAR_TILE rows.
void rowsScalar(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1) noexcept
{
    int64_t const K = s.inFeatures;
    int64_t const words = format::packedWords(K, s.bits);
    int32_t const entries = format::lutEntries(s.bits);
    auto const* qweight = reinterpret_cast<uint32_t const*>(a.qweight);
    float lut[256];
    for (int64_t n = r0; n < r1; ++n)
    {
        for (int32_t e = 0; e < entries; ++e)
        {
            lut[e] = format::halfBitsToFloat(a.lut[n * entries + e]);
        }
        uint32_t const* row = qweight + n * words;
        for (int64_t m0 = 0; m0 < s.m; m0 += kSCALAR_TILE)
        {
            int const mt = static_cast<int>(std::min<int64_t>(kSCALAR_TILE, s.m - m0));
            float acc[kSCALAR_TILE] = {};
            for (int64_t k = 0; k < K; ++k)
            {
                float const w = lut[format::rowIndex(row, s.bits, k)];
                for (int i = 0; i < mt; ++i)
                {
                    acc[i] += w * a.x[(m0 + i) * K + k];
                }
            }
            for (int i = 0; i < mt; ++i)
            {
                a.y[(m0 + i) * s.outFeatures + n] = acc[i];
            }
            finishRow<PortableFinish>(s, a, n, m0, mt, K);
        }
    }
}

} // namespace

void detail::finishDequant(CpuShape const& s, CpuArgs const& a, int64_t n, int64_t kBegin, float* out) noexcept
{
    int64_t const K = s.inFeatures;
    int32_t const entries = format::lutEntries(s.bits);
    auto const* row = reinterpret_cast<uint32_t const*>(a.qweight) + n * format::packedWords(K, s.bits);
    for (int64_t k = kBegin; k < K; ++k)
    {
        out[k] = format::halfBitsToFloat(a.lut[n * entries + format::rowIndex(row, s.bits, k)]);
    }
    int32_t const nzBegin = s.nnz > 0 ? a.rowPtr[n] : 0;
    int32_t const nzEnd = s.nnz > 0 ? a.rowPtr[n + 1] : 0;
    for (int32_t j = nzBegin; j < nzEnd; ++j)
    {
        out[a.col[j]] += format::halfBitsToFloat(a.val[j]);
    }
}

bool detail::hasAvx512Vbmi() noexcept
{
#if defined(__x86_64__) || defined(_M_X64)
    static bool const has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
    return has;
#else
    return false;
#endif
}

bool sqzCpuSupports(Isa isa) noexcept
{
#if defined(__x86_64__) || defined(_M_X64)
    switch (isa)
    {
    case Isa::kScalar: return true;
    case Isa::kAvx2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
    }
    return false;
#else
    return isa == Isa::kScalar;
#endif
}

Isa sqzCpuBestIsa() noexcept
{
    if (sqzCpuSupports(Isa::kAvx512))
    {
        return Isa::kAvx512;
    }
    return sqzCpuSupports(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
}

Isa sqzCpuEffectiveIsa(Isa requested, int32_t bits) noexcept
{
    return bits == 3 || bits == 4 ? requested : Isa::kScalar;
}

char const* sqzCpuIsaName(Isa isa) noexcept
{
    switch (isa)
    {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    }
    return "unknown";
}

char const* sqzCpuValidate(CpuShape const& s) noexcept
{
    if (s.m < 0)
    {
        return "shape.m (rows of x) must be >= 0";
    }
    return format::validateLayerShape(s.inFeatures, s.outFeatures, s.bits, s.nnz);
}

void sqzLinearCpuRows(CpuShape const& s, CpuArgs const& a, Isa isa, int64_t rowBegin, int64_t rowEnd) noexcept
{
    if (s.m == 0 || rowBegin >= rowEnd)
    {
        return;
    }
    switch (sqzCpuEffectiveIsa(isa, s.bits))
    {
    case Isa::kAvx512:
        detail::hasAvx512Vbmi() ? detail::rowsAvx512Vbmi(s, a, rowBegin, rowEnd) : detail::rowsAvx512(s, a, rowBegin, rowEnd);
        return;
    case Isa::kAvx2: detail::rowsAvx2(s, a, rowBegin, rowEnd); return;
    case Isa::kScalar: rowsScalar(s, a, rowBegin, rowEnd); return;
    }
}

void sqzHalfLinearCpuRows(HalfLinearArgs const& a, Isa isa, int64_t rowBegin, int64_t rowEnd) noexcept
{
    if (a.m == 0 || rowBegin >= rowEnd)
    {
        return;
    }
    switch (isa)
    {
    case Isa::kAvx512: detail::halfRowsAvx512(a, rowBegin, rowEnd); return;
    case Isa::kAvx2: detail::halfRowsAvx2(a, rowBegin, rowEnd); return;
    case Isa::kScalar: halfRows<PortableHalf>(a, rowBegin, rowEnd); return;
    }
}

void sqzDequantCpuRows(CpuShape const& s, CpuArgs const& a, Isa isa, int64_t rowBegin, int64_t rowEnd, float* w) noexcept
{
    if (rowBegin >= rowEnd)
    {
        return;
    }
    switch (sqzCpuEffectiveIsa(isa, s.bits))
    {
    case Isa::kAvx512:
        detail::hasAvx512Vbmi() ? detail::dequantAvx512Vbmi(s, a, rowBegin, rowEnd, w) : detail::dequantAvx512(s, a, rowBegin, rowEnd, w);
        return;
    case Isa::kAvx2: detail::dequantAvx2(s, a, rowBegin, rowEnd, w); return;
    case Isa::kScalar:
        for (int64_t n = rowBegin; n < rowEnd; ++n)
        {
            detail::finishDequant(s, a, n, 0, w + (n - rowBegin) * s.inFeatures);
        }
        return;
    }
}

namespace
{

//! dst[i] = convert(src[i]): the F16C loop where the CPU has F16C (the AVX2 unit's), the portable bit
//! arithmetic otherwise.
template <class Src, class Dst>
void convertRun(Src const* src, Dst* dst, int64_t count, void (*f16cRun)(Src const*, Dst*, int64_t) noexcept,
    Dst (*portable)(Src)) noexcept
{
    static bool const f16c = sqzCpuSupports(Isa::kAvx2);
    if (f16c)
    {
        f16cRun(src, dst, count);
        return;
    }
    for (int64_t i = 0; i < count; ++i)
    {
        dst[i] = portable(src[i]);
    }
}

} // namespace

void sqzCpuHalfToFloat(uint16_t const* src, float* dst, int64_t count) noexcept
{
    convertRun<uint16_t, float>(src, dst, count, detail::halfToFloatF16c, format::halfBitsToFloat);
}

void sqzCpuFloatToHalf(float const* src, uint16_t* dst, int64_t count) noexcept
{
    convertRun<float, uint16_t>(src, dst, count, detail::floatToHalfF16c, format::floatToHalfBits);
}

void sqzLinearCpuSplit(CpuShape const& s, int32_t const* rowPtr, int32_t parts, int64_t* bounds) noexcept
{
    int64_t const N = s.outFeatures;
    int64_t const words = format::packedWords(s.inFeatures, s.bits);
    auto const work = [&](int64_t n) { return n * words + (s.nnz > 0 ? static_cast<int64_t>(rowPtr[n]) : 0); };
    int64_t const total = work(N);
    bounds[0] = 0;
    for (int32_t p = 1; p < parts; ++p)
    {
        int64_t const target = total * p / parts;
        int64_t lo = bounds[p - 1];
        int64_t hi = N;
        while (lo < hi) // first n with work(n) >= target
        {
            int64_t const mid = (lo + hi) / 2;
            if (work(mid) < target)
            {
                lo = mid + 1;
            }
            else
            {
                hi = mid;
            }
        }
        bounds[p] = lo;
    }
    bounds[parts] = N;
}

} // namespace cpu
} // namespace sqz
