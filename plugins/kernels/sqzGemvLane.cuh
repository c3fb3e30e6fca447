/*
 * sqzGemvLane.cuh: the per-lane work of the SqzLinear GEMV kernel, as __host__ __device__ code.
 *
 * sqzGemvKernel (sqzLinear.cu) is: load the row's LUT, gemvLanePartial() on every lane, warp-shuffle
 * sum, store. Everything data-dependent (group -> lane mapping, 128-bit vs 32-bit weight loads, vector
 * vs scalar x loads, the K tail, the CSR row walk) is in gemvLanePartial, so a host test can run it
 * for lanes 0..31 and check it against the reference without a GPU (tests/test_kernels.py drives it
 * through sqzGemvEmulate in a small host library). The LUT lookup is a template parameter: a
 * warp-shuffle from registers on the device (ShuffleLut), a table read on the host and for 8-bit (TableLut).
 * Layout and lane-mapping pictures: the comment block at the top of sqzLinear.cu.
 */
#pragma once

#include "sqzFormat.h"
#include "sqzLinear.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <math.h>

#include <cstdint>
#include <type_traits>

// Full unrolling keeps the decoded words and the accumulators in registers on the device; host
// compilers (nvcc's host pass, the emulation in tests) do not know the pragma.
#if defined(__CUDA_ARCH__)
#define SQZ_UNROLL _Pragma("unroll")
#else
#define SQZ_UNROLL
#endif

namespace sqz
{
namespace detail
{

SQZ_HOST_DEVICE int32_t imin(int32_t a, int32_t b)
{
    return a < b ? a : b;
}

//! Weights are read once per m-tile: streaming loads (evict-first) on the device keep L2 for x.
SQZ_HOST_DEVICE uint4 loadStreaming(uint4 const* p)
{
#if defined(__CUDA_ARCH__)
    return __ldcs(p);
#else
    return *p;
#endif
}

SQZ_HOST_DEVICE uint32_t loadStreaming(uint32_t const* p)
{
#if defined(__CUDA_ARCH__)
    return __ldcs(p);
#else
    return *p;
#endif
}

//! Activations and CSR indices are re-read by many warps: read-only cached loads.
SQZ_HOST_DEVICE uint4 loadCached(uint4 const* p)
{
#if defined(__CUDA_ARCH__)
    return __ldg(p);
#else
    return *p;
#endif
}

SQZ_HOST_DEVICE int32_t loadCached(int32_t const* p)
{
#if defined(__CUDA_ARCH__)
    return __ldg(p);
#else
    return *p;
#endif
}

// ---- dtype helpers (fp16 / bf16 activations, fp32 math) ---------------------------------------

template <typename T>
struct Io;

template <>
struct Io<__half>
{
    static SQZ_HOST_DEVICE float toFloat(__half v)
    {
        return __half2float(v);
    }
    static SQZ_HOST_DEVICE __half fromFloat(float v)
    {
        return __float2half_rn(v);
    }
    //! 8 packed fp16 (one 128-bit load) -> fp32
    static SQZ_HOST_DEVICE void unpack8(uint4 q, float (&out)[8])
    {
        uint32_t const words[4] = {q.x, q.y, q.z, q.w};
SQZ_UNROLL
        for (int i = 0; i < 4; ++i)
        {
            __half_raw lo;
            __half_raw hi;
            lo.x = static_cast<unsigned short>(words[i] & 0xFFFFu); // element 2i sits in the low half
            hi.x = static_cast<unsigned short>(words[i] >> 16);
            out[2 * i] = __half2float(__half(lo));
            out[2 * i + 1] = __half2float(__half(hi));
        }
    }
};

template <>
struct Io<__nv_bfloat16>
{
    static SQZ_HOST_DEVICE float toFloat(__nv_bfloat16 v)
    {
        return __bfloat162float(v);
    }
    static SQZ_HOST_DEVICE __nv_bfloat16 fromFloat(float v)
    {
        return __float2bfloat16_rn(v);
    }
    static SQZ_HOST_DEVICE void unpack8(uint4 q, float (&out)[8])
    {
        uint32_t const words[4] = {q.x, q.y, q.z, q.w};
SQZ_UNROLL
        for (int i = 0; i < 4; ++i)
        {
            __nv_bfloat16_raw lo;
            __nv_bfloat16_raw hi;
            lo.x = static_cast<unsigned short>(words[i] & 0xFFFFu);
            hi.x = static_cast<unsigned short>(words[i] >> 16);
            out[2 * i] = __bfloat162float(__nv_bfloat16(lo));
            out[2 * i + 1] = __bfloat162float(__nv_bfloat16(hi));
        }
    }
};

// ---- GEMV per-lane work -------------------------------------------------------------------------

/*
 * LUT lookups. `bits` are the group's stream bits from the index on (format::groupBits): the index is
 * their low BITS bits, the rest is the following indices.
 *
 * ShuffleLut (device, BITS <= 5): lane l holds LUT[l mod 2^BITS] in a register, i.e. the table
 * repeated 32 / 2^BITS times across the warp. A lookup is one __shfl_sync with the raw stream bits as
 * the source lane: shfl reads its source lane modulo 32, and lane (v mod 32) holds LUT[v mod 2^BITS],
 * so the index needs neither a mask nor address arithmetic (shift + shfl per weight, against shift +
 * mask + add + LDS from a shared table). shfl is warp-collective, so every lane of the warp must make
 * the same lookups in the same order: the lane loops of gemvLanePartial have warp-uniform trip counts,
 * and lanes past the end look up (harmless) zero words and drop the result.
 *
 * TableLut: a table in memory (shared memory on the device for 8-bit, whose 256 entries do not fit in
 * a warp; the row's LUT as fp32 in the host emulation). Same values, so the same sums, bit for bit.
 */
template <int BITS>
struct TableLut
{
    float const* table; // [2^BITS] fp32

    SQZ_HOST_DEVICE float operator()(uint32_t bits) const
    {
        return table[bits & ((1u << BITS) - 1u)];
    }
};

template <int BITS>
struct ShuffleLut
{
    static_assert(BITS <= 5, "a warp holds at most 32 LUT entries");
    float entry; // LUT[lane mod 2^BITS]

    SQZ_HOST_DEVICE float operator()(uint32_t bits) const
    {
#if defined(__CUDA_ARCH__)
        return __shfl_sync(0xFFFFFFFFu, entry, static_cast<int>(bits));
#else
        static_cast<void>(bits);
        return entry; // never called on the host: the emulation uses TableLut
#endif
    }
};

struct GemvParams
{
    void const* x;           // [m, K], T
    uint32_t const* qweight; // [N, G * bits]
    __half const* lut;       // [N, 2^bits]
    int32_t const* rowPtr;   // [N + 1] or nullptr
    int32_t const* col;      // [nnz]
    __half const* val;       // [nnz]
    void* y;                 // [m, N], T
    int32_t m;
    int32_t K;
    int32_t N;
    int32_t groups;          // G = ceil(K / 32)
    bool wordsVec;           // rows are 16-byte aligned: 128-bit weight loads
    bool xVec;               // x rows are 16-byte aligned (K % 8 == 0): 128-bit activation loads
};

inline bool isAligned16(void const* ptr)
{
    return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

//! Every row of x starts 16-byte aligned (K % 8 == 0 and x aligned): 8 activations are one 128-bit
//! load. The rule of both kernel families.
inline bool xRowsAligned16(SqzLinearShape const& s, void const* x)
{
    return s.inFeatures % 8 == 0 && isAligned16(x);
}

/*
 * The GEMV's parameters for one call, with the launcher's load-width rules: 128-bit weight loads when
 * every row starts 16-byte aligned (G * bits words a multiple of 4), 128-bit x loads when K % 8 == 0.
 * The host emulation forces the 32-bit paths with allowVecWords/allowVecX = false to test them.
 */
inline GemvParams makeGemvParams(
    SqzLinearShape const& s, SqzLinearArgs const& a, bool allowVecWords = true, bool allowVecX = true)
{
    GemvParams p{};
    p.x = a.x;
    p.qweight = reinterpret_cast<uint32_t const*>(a.qweight);
    p.lut = static_cast<__half const*>(a.lut);
    p.rowPtr = s.nnz > 0 ? a.rowPtr : nullptr;
    p.col = a.col;
    p.val = static_cast<__half const*>(a.val);
    p.y = a.y;
    p.m = s.m;
    p.K = s.inFeatures;
    p.N = s.outFeatures;
    p.groups = (s.inFeatures + format::kGROUP_SIZE - 1) / format::kGROUP_SIZE;
    p.wordsVec = allowVecWords && (static_cast<int64_t>(p.groups) * s.bits) % 4 == 0 && isAligned16(a.qweight);
    p.xVec = allowVecX && xRowsAligned16(s, a.x);
    return p;
}

//! Calls f(std::integral_constant<int, b>{}) for the supported width b == bits: the one switch that
//! turns the runtime bit width into a template argument (launcher and host emulation). bits is
//! validated (sqzLinearValidate) before this is reached.
template <typename F>
inline void withBits(int32_t bits, F&& f)
{
    switch (bits)
    {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;
    }
}

//! Rows of x per GEMV m-tile: the smallest of 1, 2, 4, 8, 16 that holds m (16 above; the kernel then
//! loops over m-tiles). The launcher and the host emulation both pick the kernel instance by it.
inline int gemvTileRows(int32_t m)
{
    return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16;
}

//! Output rows per warp of the GEMV for `BITS` and an m-tile of `MT`: two rows share each x load and
//! conversion when the accumulators fit (MT <= 4; shuffle LUTs only), one row otherwise. The kernel,
//! the launcher and the host emulation all take it from here.
SQZ_CONSTEXPR int gemvRowsPerWarp(int bits, int mt)
{
    return bits <= 5 && mt <= 4 ? 2 : 1;
}

/*
 * One group (32 indices, k0 .. k0+31) of NT weight rows against MT rows of x: decode each index once,
 * look it up once, then fma it into every x row of the tile. Eight indices at a time: one 128-bit x
 * load (whole group inside K, aligned x rows) or up to 8 scalar loads, and 8 conversions, per x row
 * serve all NT weight rows, and only 8 * NT looked-up weights are live. The lookups are warp-collective
 * (see ShuffleLut), so they sit outside every lane-dependent branch: all 32 lanes run them at the same
 * instruction, then an inactive lane (no group here) skips the rest. Scalar x reads stop at K. The
 * order of the fmas into acc[j][r] is k0, k0+1, ... in both x paths, whatever NT and MT are.
 */
template <int BITS, int MT, int NT, typename T, typename Lut>
SQZ_HOST_DEVICE void gemvGroup(uint32_t const* const (&w)[NT], bool active, int32_t k0, Lut const (&lut)[NT],
    T const* xTile, int32_t K, int32_t rowsInTile, bool xVec, float (&acc)[NT][MT])
{
    int32_t const valid = imin(format::kGROUP_SIZE, K - k0);
    bool const vec = xVec && valid == format::kGROUP_SIZE;
    T const* xGroup = xTile + k0; // x[m0, k0]; row r of the tile is K elements further per r
SQZ_UNROLL
    for (int c = 0; c < format::kGROUP_SIZE / 8; ++c)
    {
        float wv[NT][8];
SQZ_UNROLL
        for (int j = 0; j < NT; ++j)
        {
SQZ_UNROLL
            for (int e = 0; e < 8; ++e)
            {
                wv[j][e] = lut[j](format::groupBits<BITS>(w[j], 8 * c + e));
            }
        }
        if (!active)
        {
            continue;
        }
SQZ_UNROLL
        for (int r = 0; r < MT; ++r)
        {
            if (r < rowsInTile)
            {
                T const* xr = xGroup + static_cast<int64_t>(r) * K + 8 * c;
                if (vec)
                {
                    float xf[8];
                    Io<T>::unpack8(loadCached(reinterpret_cast<uint4 const*>(xr)), xf);
SQZ_UNROLL
                    for (int j = 0; j < NT; ++j)
                    {
SQZ_UNROLL
                        for (int e = 0; e < 8; ++e)
                        {
                            acc[j][r] = fmaf(wv[j][e], xf[e], acc[j][r]);
                        }
                    }
                }
                else
                {
SQZ_UNROLL
                    for (int e = 0; e < 8; ++e)
                    {
                        if (8 * c + e < valid)
                        {
                            float const xv = Io<T>::toFloat(xr[e]);
SQZ_UNROLL
                            for (int j = 0; j < NT; ++j)
                            {
                                acc[j][r] = fmaf(wv[j][e], xv, acc[j][r]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/*
 * Lane `lane`'s fp32 partial sums of y[m0 .. m0+rowsInTile-1, n0 + j] (acc[j][r], zeroed here) for the
 * warp's NT output rows n0 .. n0+NT-1 (rows >= N are skipped: their sums are never stored): its share
 * of each row's packed groups, then its share of each row's CSR non-zeros. `lut[j]` looks up row
 * n0 + j's LUT as fp32.
 *   dense:  units u = lane, lane + 32, ... (a unit = unitGroups(BITS) groups = whole 128-bit loads);
 *           without 16-byte aligned rows the same groups are read as 32-bit words, in the same order.
 *           Both loops step all 32 lanes together (warp-uniform trip counts, for ShuffleLut).
 *   sparse: non-zeros row_ptr[n] + lane, + 32, ...
 * Per output element the summation order depends on neither NT nor MT, so every tiling gives the
 * same bits.
 */
template <int BITS, int MT, int NT, typename T, typename Lut>
SQZ_HOST_DEVICE void gemvLanePartial(GemvParams const& p, int32_t n0, int lane, Lut const (&lut)[NT], int32_t m0,
    int32_t rowsInTile, float (&acc)[NT][MT])
{
    constexpr int kUNIT_GROUPS = format::unitGroups(BITS);
    constexpr int kUNIT_WORDS = kUNIT_GROUPS * BITS; // multiple of 4
    static_assert(kUNIT_WORDS % 4 == 0, "a unit is whole 128-bit loads");
SQZ_UNROLL
    for (int j = 0; j < NT; ++j)
    {
SQZ_UNROLL
        for (int r = 0; r < MT; ++r)
        {
            acc[j][r] = 0.0f;
        }
    }
    int64_t const wordsPerRow = static_cast<int64_t>(p.groups) * BITS;
    uint32_t const* rows[NT];
    bool rowValid[NT];
SQZ_UNROLL
    for (int j = 0; j < NT; ++j)
    {
        rowValid[j] = n0 + j < p.N; // warp-uniform
        rows[j] = p.qweight + static_cast<int64_t>(rowValid[j] ? n0 + j : n0) * wordsPerRow;
    }
    T const* xTile = static_cast<T const*>(p.x) + static_cast<int64_t>(m0) * p.K;

    if (p.wordsVec)
    {
        int32_t const units = p.groups / kUNIT_GROUPS;
        for (int32_t u0 = 0; u0 < units; u0 += 32)
        {
            int32_t const u = u0 + lane;
            bool const active = u < units;
            uint32_t w[NT][kUNIT_WORDS];
SQZ_UNROLL
            for (int j = 0; j < NT; ++j)
            {
                uint4 const* src = reinterpret_cast<uint4 const*>(rows[j] + static_cast<int64_t>(u) * kUNIT_WORDS);
SQZ_UNROLL
                for (int v = 0; v < kUNIT_WORDS / 4; ++v)
                {
                    uint4 const q = active && rowValid[j] ? loadStreaming(src + v) : make_uint4(0u, 0u, 0u, 0u);
                    w[j][4 * v] = q.x;
                    w[j][4 * v + 1] = q.y;
                    w[j][4 * v + 2] = q.z;
                    w[j][4 * v + 3] = q.w;
                }
            }
SQZ_UNROLL
            for (int g = 0; g < kUNIT_GROUPS; ++g)
            {
                uint32_t const* wg[NT];
SQZ_UNROLL
                for (int j = 0; j < NT; ++j)
                {
                    wg[j] = w[j] + g * BITS;
                }
                gemvGroup<BITS, MT, NT, T>(wg, active, (u * kUNIT_GROUPS + g) * format::kGROUP_SIZE, lut, xTile, p.K,
                    rowsInTile, p.xVec, acc);
            }
        }
    }
    else
    {
        // Group g goes to lane (g / unit) % 32 as in the vector path, so the per-lane summation order
        // (and the result) is the same whichever path runs.
        for (int32_t g0 = 0; g0 < p.groups; g0 += 32 * kUNIT_GROUPS)
        {
            for (int gi = 0; gi < kUNIT_GROUPS; ++gi)
            {
                int32_t const g = g0 + lane * kUNIT_GROUPS + gi;
                bool const active = g < p.groups;
                uint32_t w[NT][BITS];
                uint32_t const* wg[NT];
SQZ_UNROLL
                for (int j = 0; j < NT; ++j)
                {
SQZ_UNROLL
                    for (int b = 0; b < BITS; ++b)
                    {
                        w[j][b] = active && rowValid[j] ? loadStreaming(rows[j] + static_cast<int64_t>(g) * BITS + b) : 0u;
                    }
                    wg[j] = w[j];
                }
                gemvGroup<BITS, MT, NT, T>(wg, active, g * format::kGROUP_SIZE, lut, xTile, p.K, rowsInTile, p.xVec, acc);
            }
        }
    }

    // Sparse part: the warp owns its rows, so its lanes add each row's non-zeros to their own partial sums.
    if (p.rowPtr != nullptr)
    {
SQZ_UNROLL
        for (int j = 0; j < NT; ++j)
        {
            if (!rowValid[j])
            {
                continue;
            }
            int32_t const nzEnd = p.rowPtr[n0 + j + 1];
            for (int32_t k = p.rowPtr[n0 + j] + lane; k < nzEnd; k += 32)
            {
                int32_t const c = loadCached(p.col + k);
                float const v = __half2float(p.val[k]);
SQZ_UNROLL
                for (int r = 0; r < MT; ++r)
                {
                    if (r < rowsInTile)
                    {
                        acc[j][r] = fmaf(v, Io<T>::toFloat(xTile[static_cast<int64_t>(r) * p.K + c]), acc[j][r]);
                    }
                }
            }
        }
    }
}

} // namespace detail
} // namespace sqz
