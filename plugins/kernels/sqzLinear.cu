/*
 * sqzLinear.cu: CUDA kernels and launcher of the SqzLinear op (API in plugins/common/sqzLinear.h).
 *
 *   y[m, n] = sum_k x[m, k] * (LUT[n, idx[n, k]] + S[n, k])
 *
 * Two kernel families, picked explicitly by m (sqzLinearChooseKernel):
 *   kGemv (m <= kGEMV_MAX_M = 16, decode and small batches): one warp owns one output row (two for
 *     m <= 4 and b <= 5, which then share every x load and conversion) for a tile of up to 16 rows of
 *     x; it streams the rows' packed words once (128-bit loads), decodes each index once and applies
 *     it to every x row of the tile, walks the rows' CSR non-zeros itself, and reduces its 32 lanes
 *     with shuffles. Weight bytes are read once per m-tile, so m <= 16 reads them exactly once.
 *   kDequantGemm (m > 16, prefill): W is dequantized once into the workspace, then a tensor-core
 *     (WMMA, fp32 accumulate) tiled GEMM computes x W^T; its epilogue adds the sparse part and rounds.
 *
 * The GEMV's per-lane work lives in sqzGemvLane.cuh as __host__ __device__ code, so the tests run the
 * kernel's own lane code on the CPU (kernels/tests/sqzGemvEmulate.cpp) as well as on a GPU.
 *
 * Bit layout the kernels read (layout 2 of sqz_export/formats.py, see also sqzFormat.h):
 *
 *   qweight int32 [N, G * b], G = ceil(K / 32); row n = the little-endian bit stream of its K indices
 *
 *   row n: | group 0: b words | group 1: b words | ... | group G-1: b words (indices >= K are 0) |
 *          group g holds indices k = 32g .. 32g+31; index j of a group at stream bits [b*j, b*j + b)
 *
 *   4-bit, group = 4 words = one 128-bit load:
 *        word w : | i(8w+7) | i(8w+6) | ... | i(8w+0) |                 (bit 31 ... bit 0)
 *   3-bit, group = 3 words; a "unit" of 4 groups = 12 words = three 128-bit loads:
 *        word 0 : | i10[1:0] | i9  | ... | i0  |
 *        word 1 : | i21[0] | i20 | ... | i11 | i10[2] |
 *        word 2 : | i31 | ... | i22 | i21[2:1] |
 *   2-bit: unit = 2 groups (4 words); 8-bit: unit = 1 group (8 words = two 128-bit loads).
 *
 *   A row is 16-byte aligned (128-bit loads allowed) iff G * b % 4 == 0, i.e. iff G is a multiple of
 *   the unit; otherwise (e.g. 3-bit with K not a multiple of 128) the kernel reads the same groups per
 *   lane as 32-bit words. Both paths accumulate in the same order, so they give identical results.
 *
 * Lane mapping in the GEMV (coalesced): lane l of the warp takes units l, l + 32, l + 64, ... of the
 * row, so the warp reads 32 consecutive units (3-bit: 32 x 48 B = 1.5 KB) per step, and the x
 * elements it needs (32 consecutive k per group) with 128-bit loads when K % 8 == 0.
 *
 * LUT: for b <= 5 each lane holds one fp32 entry, LUT[lane mod 2^b] (the table repeated across the
 * warp), and a lookup is a __shfl_sync whose source lane is the unmasked stream bits (shfl reads its
 * source lane mod 32): one shift + one shuffle per weight, no mask, no address arithmetic, no shared
 * memory (detail::ShuffleLut). The lane loops are warp-uniform so every lane takes part in every
 * shuffle. 8-bit LUTs (256 entries) stay in a per-warp shared-memory slot as fp32 (detail::TableLut).
 *
 * Sparse part, why per row: the warp that owns output row n walks row_ptr[n]..row_ptr[n+1] with its
 * 32 lanes, inside the same launch, and folds the products into the same per-lane sums before the
 * one warp reduction. That is deterministic (no atomics, fixed order), needs no workspace and no
 * second pass. Its imbalance is small because the dense part already gives every row the same work:
 * each lane does K / 32 / 32 groups of 32 indices (K = 4096: 4 groups = 128 fmas per x row), and a
 * row's non-zeros add ceil(nnz_row / 32) single fmas per lane. At SqueezeLLM's 0.45% a 4096-wide row
 * has ~18 non-zeros (one step); even a 10%-dense outlier row (~410) adds 13 fmas next to 128. The
 * balanced chunk partition (chunk_row) pays off for a standalone SpMV where rows are the only work;
 * the fused kernels therefore do not read chunk_row (it stays part of the format, validated at load).
 * The GEMM path adds the same per-row sums in its epilogue, one thread per output element.
 */
#include "sqzFormat.h"
#include "sqzGemvLane.cuh"
#include "sqzLinear.h"
#include "sqzLinearConfig.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "sqzLinear.cu needs sm_80 or newer (bf16 tensor-core WMMA); set CMAKE_CUDA_ARCHITECTURES / -arch accordingly"
#endif

namespace sqz
{
namespace
{

using detail::GemvParams;
using detail::Io;
using format::groupIndex;
using format::kGROUP_SIZE;

using config::kDEQUANT_WARPS;
using config::kGEMM_THREADS;
using config::kGEMV_WARPS;
using config::kMAX_GRID_Y;
using config::kSMEM_PAD;
using config::kTILE_K;
using config::kTILE_M;
using config::kTILE_N;

static_assert(kTILE_K == kGROUP_SIZE, "the dequantized workspace is padded to whole groups");
static_assert(kGEMV_MAX_M <= 32, "one lane per x row writes the GEMV outputs");

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    }
    return v;
}

// ---- GEMV ------------------------------------------------------------------------------------

//! The warp's LUT of one row: in registers for a shuffle lookup up to 5 bits, in shared memory for 8 bits.
template <int BITS, bool kSHUFFLE = (BITS <= 5)>
struct GemvLut;

template <int BITS>
struct GemvLut<BITS, true>
{
    using Lookup = detail::ShuffleLut<BITS>;
    __device__ static Lookup load(__half const* lutRow, int /*warp*/, int lane)
    {
        return Lookup{__half2float(lutRow[lane & ((1 << BITS) - 1)])};
    }
};

template <int BITS>
struct GemvLut<BITS, false>
{
    using Lookup = detail::TableLut<BITS>;
    //! One slot per warp: a warp owns one row here (gemvRowsPerWarp is 1 without shuffle LUTs).
    __device__ static Lookup load(__half const* lutRow, int warp, int lane)
    {
        constexpr int kLUT = 1 << BITS;
        __shared__ float sLut[kGEMV_WARPS][kLUT]; // fp32 copy of each warp's LUT row
        for (int i = lane; i < kLUT; i += 32)
        {
            sLut[warp][i] = __half2float(lutRow[i]);
        }
        __syncwarp();
        return Lookup{sLut[warp]};
    }
};

/*
 * Fused LUT-dequant GEMV + CSR row walk. Block = kGEMV_WARPS warps, warp w of block b owns the NT
 * output rows n0 = (b * kGEMV_WARPS + w) * NT .. n0 + NT - 1 (NT = gemvRowsPerWarp: 2 shares each x
 * load and conversion between two rows); blockIdx.y strides over m-tiles of MT rows of x.
 *   per lane: units u = lane, lane + 32, ... of each row (whole K per warp), then non-zeros
 *             row_ptr[n] + lane, + 32, ...; fp32 partial sums acc[NT][MT]
 *   per warp: butterfly shuffle reduction, lane j * MT + r writes y[m0 + r, n0 + j]
 */
template <int BITS, int MT, typename T>
__global__ void __launch_bounds__(kGEMV_WARPS * 32, 1) sqzGemvKernel(GemvParams const p)
{
    constexpr int NT = detail::gemvRowsPerWarp(BITS, MT);
    static_assert(NT * MT <= 32, "one lane per output element of the warp stores it");
    static_assert(NT == 1 || BITS <= 5, "shared-memory LUTs have one slot per warp");
    using Lut = GemvLut<BITS>;
    int const warp = static_cast<int>(threadIdx.x) >> 5;
    int const lane = static_cast<int>(threadIdx.x) & 31;
    int32_t const n0 = (static_cast<int32_t>(blockIdx.x) * kGEMV_WARPS + warp) * NT;
    if (n0 >= p.N)
    {
        return; // the whole warp leaves; the kernel has no block-wide barrier
    }
    typename Lut::Lookup lut[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j)
    {
        int32_t const n = min(n0 + j, p.N - 1); // a row past N looks up row N-1's table; its sums are dropped
        lut[j] = Lut::load(p.lut + static_cast<int64_t>(n) * (1 << BITS), warp, lane);
    }

    T* y = static_cast<T*>(p.y);
    int32_t const mTiles = (p.m + MT - 1) / MT;
    for (int32_t tile = static_cast<int32_t>(blockIdx.y); tile < mTiles; tile += static_cast<int32_t>(gridDim.y))
    {
        int32_t const m0 = tile * MT;
        int32_t const rowsInTile = min(MT, p.m - m0);
        float acc[NT][MT];
        detail::gemvLanePartial<BITS, MT, NT, T>(p, n0, lane, lut, m0, rowsInTile, acc);
#pragma unroll
        for (int j = 0; j < NT; ++j)
        {
#pragma unroll
            for (int r = 0; r < MT; ++r)
            {
                float const sum = warpSum(acc[j][r]);
                if (lane == j * MT + r && r < rowsInTile && n0 + j < p.N)
                {
                    y[static_cast<int64_t>(m0 + r) * p.N + n0 + j] = Io<T>::fromFloat(sum);
                }
            }
        }
    }
}

// ---- dequantize + GEMM (large m) -------------------------------------------------------------

/*
 * Workspace W_ws[Np, Kp] in T, Np = N rounded up to kTILE_N, Kp = 32 G: W_ws[n, k] = LUT[n, idx[n, k]]
 * for n < N, k < K, and 0 in the padding, so the GEMM reads whole tiles without bounds checks.
 * One warp per row, one group per lane step, four 128-bit stores per group. For bf16 activations the
 * workspace is bf16 (tensor cores need equal A and B types): each weight is rounded to bf16 once
 * (2^-9 relative), inside the (sqz_linear, bf16) tolerance; fp16 activations keep the fp16 LUT values exactly.
 */
template <int BITS, typename T>
__global__ void __launch_bounds__(kDEQUANT_WARPS * 32) sqzDequantKernel(
    uint32_t const* qweight, __half const* lut, T* ws, int32_t K, int32_t N, int32_t paddedN, int32_t groups)
{
    constexpr int kLUT = 1 << BITS;
    __shared__ float sLut[kDEQUANT_WARPS][kLUT];
    int const warp = static_cast<int>(threadIdx.x) >> 5;
    int const lane = static_cast<int>(threadIdx.x) & 31;
    int32_t const n = static_cast<int32_t>(blockIdx.x) * kDEQUANT_WARPS + warp;
    if (n >= paddedN)
    {
        return;
    }
    int64_t const paddedK = static_cast<int64_t>(groups) * kGROUP_SIZE;
    uint4* out = reinterpret_cast<uint4*>(ws + static_cast<int64_t>(n) * paddedK); // 8 T per uint4
    if (n >= N)
    {
        for (int64_t i = lane; i < paddedK / 8; i += 32)
        {
            out[i] = make_uint4(0u, 0u, 0u, 0u);
        }
        return;
    }
    for (int i = lane; i < kLUT; i += 32)
    {
        sLut[warp][i] = __half2float(lut[static_cast<int64_t>(n) * kLUT + i]);
    }
    __syncwarp();
    uint32_t const* row = qweight + static_cast<int64_t>(n) * groups * BITS;
    for (int32_t g = lane; g < groups; g += 32)
    {
        uint32_t w[BITS];
#pragma unroll
        for (int b = 0; b < BITS; ++b)
        {
            w[b] = __ldcs(row + static_cast<int64_t>(g) * BITS + b);
        }
        int32_t const valid = min(kGROUP_SIZE, K - g * kGROUP_SIZE);
#pragma unroll
        for (int c = 0; c < kGROUP_SIZE / 8; ++c)
        {
            T vals[8];
#pragma unroll
            for (int e = 0; e < 8; ++e)
            {
                int const j = 8 * c + e;
                vals[e] = Io<T>::fromFloat(j < valid ? sLut[warp][groupIndex<BITS>(w, j)] : 0.0f);
            }
            uint4 q;
            memcpy(&q, vals, sizeof(q));
            out[static_cast<int64_t>(g) * (kGROUP_SIZE / 8) + c] = q;
        }
    }
}

struct GemmParams
{
    void const* x;              // [m, K], T
    void const* ws;             // [Np, Kp], T (dequantized W, zero padded)
    int32_t const* rowPtr;      // [N + 1] or nullptr
    int32_t const* col;
    __half const* val;
    void* y;                    // [m, N], T
    int32_t m;
    int32_t K;
    int32_t N;
    int32_t paddedK;
    bool xVec;                  // K % 8 == 0 and x 16-byte aligned
};

/*
 * y = x W^T with WMMA 16x16x16 tensor-core tiles, fp32 accumulation. Block tile 64 (m) x 64 (n),
 * k step 32; warp (wm, wn) of the 2 x 2 warp grid owns a 32 x 32 sub-tile (2 x 2 fragments).
 *   sA[64][32 + pad]  x rows m0.., columns k0..   (row-major, = matrix_a row_major)
 *   sB[64][32 + pad]  W_ws rows n0.., columns k0..  (= W^T column-major, = matrix_b col_major)
 * Epilogue: fragments -> shared fp32 tile, + sum over row n's CSR non-zeros of val * x[m, col]
 * (one thread per output, CSR order), one rounding to T, coalesced stores along n.
 */
template <typename T>
__global__ void __launch_bounds__(kGEMM_THREADS) sqzGemmKernel(GemmParams const p)
{
    namespace wmma = nvcuda::wmma;
    constexpr int kLD = kTILE_K + kSMEM_PAD;  // 40 elements: a multiple of 8 as WMMA requires
    constexpr int kLDC = kTILE_N + 4;         // fp32 epilogue tile stride, a multiple of 4
    __shared__ __align__(32) T sA[kTILE_M][kLD];
    __shared__ __align__(32) T sB[kTILE_N][kLD];
    __shared__ __align__(32) float sC[kTILE_M][kLDC];

    int const tid = static_cast<int>(threadIdx.x);
    int const warp = tid >> 5;
    int const wm = warp >> 1;
    int const wn = warp & 1;
    int32_t const m0 = static_cast<int32_t>(blockIdx.y) * kTILE_M;
    int32_t const n0 = static_cast<int32_t>(blockIdx.x) * kTILE_N;
    T const* x = static_cast<T const*>(p.x);
    T const* ws = static_cast<T const*>(p.ws);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
    {
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
            wmma::fill_fragment(acc[i][j], 0.0f);
        }
    }

    constexpr int kCHUNKS = kTILE_M * kTILE_K / 8; // 8-element (128-bit) chunks per tile = 256
    for (int32_t k0 = 0; k0 < p.paddedK; k0 += kTILE_K)
    {
        for (int c = tid; c < kCHUNKS; c += kGEMM_THREADS)
        {
            int const r = c / (kTILE_K / 8);
            int const kc = (c % (kTILE_K / 8)) * 8;
            // B: always in range and aligned (padded workspace)
            uint4 const qb = *reinterpret_cast<uint4 const*>(ws + static_cast<int64_t>(n0 + r) * p.paddedK + k0 + kc);
            *reinterpret_cast<uint4*>(&sB[r][kc]) = qb;
            // A: x row m0 + r, columns k0 + kc .. + 7, zero outside [0, m) x [0, K)
            int32_t const m = m0 + r;
            int32_t const k = k0 + kc;
            if (p.xVec && m < p.m && k + 8 <= p.K)
            {
                *reinterpret_cast<uint4*>(&sA[r][kc])
                    = __ldg(reinterpret_cast<uint4 const*>(x + static_cast<int64_t>(m) * p.K + k));
            }
            else
            {
#pragma unroll
                for (int e = 0; e < 8; ++e)
                {
                    sA[r][kc + e] = (m < p.m && k + e < p.K) ? x[static_cast<int64_t>(m) * p.K + k + e]
                                                            : Io<T>::fromFloat(0.0f);
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTILE_K; kk += 16)
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i)
            {
                wmma::load_matrix_sync(a[i], &sA[wm * 32 + i * 16][kk], kLD);
                wmma::load_matrix_sync(b[i], &sB[wn * 32 + i * 16][kk], kLD);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
            {
#pragma unroll
                for (int j = 0; j < 2; ++j)
                {
                    wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i)
    {
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
            wmma::store_matrix_sync(&sC[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kLDC, wmma::mem_row_major);
        }
    }
    __syncthreads();

    T* y = static_cast<T*>(p.y);
    for (int e = tid; e < kTILE_M * kTILE_N; e += kGEMM_THREADS)
    {
        int const r = e / kTILE_N;
        int const c = e % kTILE_N;
        int32_t const m = m0 + r;
        int32_t const n = n0 + c;
        if (m < p.m && n < p.N)
        {
            float v = sC[r][c];
            if (p.rowPtr != nullptr)
            {
                T const* xr = x + static_cast<int64_t>(m) * p.K;
                int32_t const end = p.rowPtr[n + 1];
                for (int32_t j = p.rowPtr[n]; j < end; ++j)
                {
                    v = fmaf(__half2float(p.val[j]), Io<T>::toFloat(xr[__ldg(p.col + j)]), v);
                }
            }
            y[static_cast<int64_t>(m) * p.N + n] = Io<T>::fromFloat(v);
        }
    }
}

// ---- launch helpers --------------------------------------------------------------------------

int64_t paddedRows(SqzLinearShape const& s)
{
    return config::paddedRows(s.outFeatures);
}

int64_t paddedCols(SqzLinearShape const& s)
{
    return config::paddedCols(s.inFeatures);
}

template <int BITS, int MT, typename T>
void launchGemvTile(GemvParams const& p, cudaStream_t stream)
{
    constexpr int kROWS_PER_BLOCK = kGEMV_WARPS * detail::gemvRowsPerWarp(BITS, MT);
    int32_t const mTiles = (p.m + MT - 1) / MT;
    dim3 const grid((p.N + kROWS_PER_BLOCK - 1) / kROWS_PER_BLOCK, mTiles < kMAX_GRID_Y ? mTiles : kMAX_GRID_Y);
    sqzGemvKernel<BITS, MT, T><<<grid, kGEMV_WARPS * 32, 0, stream>>>(p);
}

//! The m-tile by detail::gemvTileRows (shared with the host emulation).
template <int BITS, typename T>
void launchGemv(GemvParams const& p, cudaStream_t stream)
{
    switch (detail::gemvTileRows(p.m))
    {
    case 1: launchGemvTile<BITS, 1, T>(p, stream); break;
    case 2: launchGemvTile<BITS, 2, T>(p, stream); break;
    case 4: launchGemvTile<BITS, 4, T>(p, stream); break;
    case 8: launchGemvTile<BITS, 8, T>(p, stream); break;
    default: launchGemvTile<BITS, 16, T>(p, stream); break;
    }
}

template <typename T>
void launchDequantGemm(SqzLinearShape const& s, SqzLinearArgs const& a, cudaStream_t stream)
{
    auto const* qweight = reinterpret_cast<uint32_t const*>(a.qweight);
    auto const* lut = static_cast<__half const*>(a.lut);
    T* ws = static_cast<T*>(a.workspace);
    int32_t const groups = static_cast<int32_t>(paddedCols(s) / kGROUP_SIZE);
    int32_t const nPad = static_cast<int32_t>(paddedRows(s));
    dim3 const dqGrid((nPad + kDEQUANT_WARPS - 1) / kDEQUANT_WARPS);
    detail::withBits(s.bits, [&](auto bits) {
        sqzDequantKernel<decltype(bits)::value, T>
            <<<dqGrid, kDEQUANT_WARPS * 32, 0, stream>>>(qweight, lut, ws, s.inFeatures, s.outFeatures, nPad, groups);
    });
    GemmParams p{};
    p.x = a.x;
    p.ws = ws;
    p.rowPtr = s.nnz > 0 ? a.rowPtr : nullptr;
    p.col = a.col;
    p.val = static_cast<__half const*>(a.val);
    p.y = a.y;
    p.m = s.m;
    p.K = s.inFeatures;
    p.N = s.outFeatures;
    p.paddedK = static_cast<int32_t>(paddedCols(s));
    p.xVec = detail::xRowsAligned16(s, a.x);
    // gridDim.y limit: m <= 65535 * 64 rows per launch is checked by sqzLinearValidate.
    dim3 const grid(nPad / kTILE_N, (s.m + kTILE_M - 1) / kTILE_M);
    sqzGemmKernel<T><<<grid, kGEMM_THREADS, 0, stream>>>(p);
}

} // namespace

// sqzLinearKernelName, sqzLinearValidate, sqzLinearChooseKernel and the workspace sizes live in
// sqzLinearPolicy.cpp (plain C++, shared with the host reference).

cudaError_t sqzLinearLaunch(
    SqzLinearShape const& s, SqzLinearArgs const& a, KernelKind kind, cudaStream_t stream) noexcept
{
    if (sqzLinearValidate(s) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (s.m == 0)
    {
        return cudaSuccess;
    }
    if (a.x == nullptr || a.qweight == nullptr || a.lut == nullptr || a.y == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (s.nnz > 0 && (a.rowPtr == nullptr || a.col == nullptr || a.val == nullptr))
    {
        return cudaErrorInvalidValue;
    }
    if ((reinterpret_cast<uintptr_t>(a.qweight) & 3u) != 0 || (reinterpret_cast<uintptr_t>(a.x) & 1u) != 0
        || (reinterpret_cast<uintptr_t>(a.y) & 1u) != 0)
    {
        return cudaErrorMisalignedAddress;
    }
    if (kind == KernelKind::kAuto)
    {
        kind = sqzLinearChooseKernel(s);
    }
    if (kind == KernelKind::kGemv)
    {
        GemvParams const p = detail::makeGemvParams(s, a);
        detail::withBits(s.bits, [&](auto bits) {
            if (s.dtype == DataType::kHALF)
            {
                launchGemv<decltype(bits)::value, __half>(p, stream);
            }
            else
            {
                launchGemv<decltype(bits)::value, __nv_bfloat16>(p, stream);
            }
        });
    }
    else if (kind == KernelKind::kDequantGemm)
    {
        if (a.workspace == nullptr || a.workspaceBytes < sqzLinearWorkspaceSizeFor(s, kind) || !detail::isAligned16(a.workspace))
        {
            return cudaErrorInvalidValue;
        }
        if (s.dtype == DataType::kHALF)
        {
            launchDequantGemm<__half>(s, a, stream);
        }
        else
        {
            launchDequantGemm<__nv_bfloat16>(s, a, stream);
        }
    }
    else
    {
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

} // namespace sqz
