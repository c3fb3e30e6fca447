#include "sqzGemvEmulate.h"

#include "sqzGemvLane.cuh"

#include <cstdint>

namespace sqz
{
namespace
{

//! sqzGemvKernel<BITS, MT, T> on the host: every warp's lane code for lanes 0..31, then the butterfly.
template <int BITS, int MT, typename T>
void emulateTile(detail::GemvParams const& p)
{
    constexpr int kLUT = 1 << BITS;
    constexpr int NT = detail::gemvRowsPerWarp(BITS, MT);
    T* y = static_cast<T*>(p.y);
    float tables[NT][kLUT];
    for (int32_t n0 = 0; n0 < p.N; n0 += NT)
    {
        detail::TableLut<BITS> lut[NT];
        for (int j = 0; j < NT; ++j)
        {
            int32_t const n = detail::imin(n0 + j, p.N - 1); // as the kernel: a row past N is never stored
            for (int i = 0; i < kLUT; ++i)
            {
                tables[j][i] = __half2float(p.lut[static_cast<int64_t>(n) * kLUT + i]);
            }
            lut[j] = detail::TableLut<BITS>{tables[j]};
        }
        for (int32_t m0 = 0; m0 < p.m; m0 += MT)
        {
            int32_t const rowsInTile = detail::imin(MT, p.m - m0);
            float partial[32][NT][MT];
            for (int lane = 0; lane < 32; ++lane)
            {
                detail::gemvLanePartial<BITS, MT, NT, T>(p, n0, lane, lut, m0, rowsInTile, partial[lane]);
            }
            for (int j = 0; j < NT && n0 + j < p.N; ++j)
            {
                for (int r = 0; r < rowsInTile; ++r)
                {
                    float v[32];
                    for (int lane = 0; lane < 32; ++lane)
                    {
                        v[lane] = partial[lane][j][r];
                    }
                    for (int offset = 16; offset > 0; offset >>= 1) // v += __shfl_xor_sync(v, offset)
                    {
                        float next[32];
                        for (int lane = 0; lane < 32; ++lane)
                        {
                            next[lane] = v[lane] + v[lane ^ offset];
                        }
                        for (int lane = 0; lane < 32; ++lane)
                        {
                            v[lane] = next[lane];
                        }
                    }
                    y[static_cast<int64_t>(m0 + r) * p.N + n0 + j] = detail::Io<T>::fromFloat(v[j * MT + r]);
                }
            }
        }
    }
}

//! The m-tile the launcher picks for p.m (detail::gemvTileRows), so the emulation runs what the GPU runs.
template <int BITS, typename T>
void emulate(detail::GemvParams const& p)
{
    switch (detail::gemvTileRows(p.m))
    {
    case 1: emulateTile<BITS, 1, T>(p); break;
    case 2: emulateTile<BITS, 2, T>(p); break;
    case 4: emulateTile<BITS, 4, T>(p); break;
    case 8: emulateTile<BITS, 8, T>(p); break;
    default: emulateTile<BITS, 16, T>(p); break;
    }
}

} // namespace

char const* sqzGemvEmulate(
    SqzLinearShape const& s, SqzLinearArgs const& a, bool forceScalarWords, bool forceScalarX) noexcept
{
    if (char const* error = sqzLinearValidate(s))
    {
        return error;
    }
    detail::GemvParams const p = detail::makeGemvParams(s, a, !forceScalarWords, !forceScalarX);
    detail::withBits(s.bits, [&](auto bits) {
        if (s.dtype == DataType::kHALF)
        {
            emulate<decltype(bits)::value, __half>(p);
        }
        else
        {
            emulate<decltype(bits)::value, __nv_bfloat16>(p);
        }
    });
    return nullptr;
}

} // namespace sqz
