#include "sqzGemvEmulate.h"

#include "sqzGemvLane.cuh"

#include <cstdint>

namespace sqz
{
namespace
{

constexpr int kEMULATED_TILE = 4; //!< m-tile of the emulation; per-row sums do not depend on the tile size

template <int BITS, typename T>
void emulate(detail::GemvParams const& p)
{
    constexpr int kLUT = 1 << BITS;
    float lut[kLUT];
    T* y = static_cast<T*>(p.y);
    for (int32_t n = 0; n < p.N; ++n)
    {
        for (int i = 0; i < kLUT; ++i)
        {
            lut[i] = __half2float(p.lut[static_cast<int64_t>(n) * kLUT + i]);
        }
        for (int32_t m0 = 0; m0 < p.m; m0 += kEMULATED_TILE)
        {
            int32_t const rowsInTile = detail::imin(kEMULATED_TILE, p.m - m0);
            float partial[32][kEMULATED_TILE];
            for (int lane = 0; lane < 32; ++lane)
            {
                detail::gemvLanePartial<BITS, kEMULATED_TILE, T>(
                    p, n, lane, detail::TableLut<BITS>{lut}, m0, rowsInTile, partial[lane]);
            }
            for (int r = 0; r < rowsInTile; ++r)
            {
                float v[32];
                for (int lane = 0; lane < 32; ++lane)
                {
                    v[lane] = partial[lane][r];
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
                y[static_cast<int64_t>(m0 + r) * p.N + n] = detail::Io<T>::fromFloat(v[r]);
            }
        }
    }
}

template <typename T>
void emulateBits(int32_t bits, detail::GemvParams const& p)
{
    switch (bits)
    {
    case 2: emulate<2, T>(p); break;
    case 3: emulate<3, T>(p); break;
    case 4: emulate<4, T>(p); break;
    case 8: emulate<8, T>(p); break;
    default: break;
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
    if (s.dtype == DataType::kHALF)
    {
        emulateBits<__half>(s.bits, p);
    }
    else
    {
        emulateBits<__nv_bfloat16>(s.bits, p);
    }
    return nullptr;
}

} // namespace sqz
