/*
 * sqzFormat.h: C++ mirror of sqz_export/formats.py (the packed SqzLinear weight format).
 *
 * formats.py is the single definition; this header repeats its constants (tests/test_cuda_build.py
 * checks that the two agree) and provides the index decode shared by the CUDA kernels and the host
 * reference, so the bit twiddling the kernels run is also exercised on the CPU.
 *
 * Bit stream (both layouts): K is split into groups of 32 indices; a group of 32 b-bit indices is the
 * little-endian bit stream of b int32 words, index j at stream bits [b*j, b*j + b). Because a group
 * fills whole words, one output row's words in layout 2 (row-major, [N, ceil(K/32) * b]) are one
 * continuous bit stream: index k of the row starts at bit b*k.
 *
 *   4-bit group = 4 words:  word w = | i(8w+7) | ... | i(8w+0) |          (bit 31 ... bit 0)
 *   3-bit group = 3 words:  word 0 = | i10[1:0] | i9 | ... | i0 |
 *                           word 1 = | i21[0] | i20 | ... | i11 | i10[2] |
 *                           word 2 = | i31 | ... | i22 | i21[2:1] |
 *
 * Padded indices (k >= K in the last group) are 0 and never reach the output.
 */
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SQZ_HOST_DEVICE __host__ __device__ __forceinline__
#define SQZ_CONSTEXPR __host__ __device__ constexpr
#else
#define SQZ_HOST_DEVICE inline
#define SQZ_CONSTEXPR constexpr
#endif

namespace sqz
{
namespace format
{

constexpr int32_t kFORMAT_VERSION = 1;      //!< formats.FORMAT_VERSION
constexpr int32_t kLAYOUT_KMAJOR = 1;       //!< formats.LAYOUT_KMAJOR (checkpoint layout)
constexpr int32_t kLAYOUT_ROWMAJOR = 2;     //!< formats.LAYOUT_ROWMAJOR (the layout the kernels read)
constexpr int32_t kGROUP_SIZE = 32;         //!< formats.GROUP_SIZE
constexpr int32_t kDEFAULT_CHUNK_NNZ = 32;  //!< formats.DEFAULT_CHUNK_NNZ
constexpr int32_t kSUPPORTED_BITS[] = {2, 3, 4, 8}; //!< formats.SUPPORTED_BITS
constexpr int32_t kNUM_SUPPORTED_BITS = 4;

SQZ_CONSTEXPR bool isSupportedBits(int32_t bits)
{
    return bits == 2 || bits == 3 || bits == 4 || bits == 8;
}

//! formats.packed_words: int32 words holding one output row's indices.
SQZ_CONSTEXPR int64_t packedWords(int64_t inFeatures, int32_t bits)
{
    return (inFeatures + kGROUP_SIZE - 1) / kGROUP_SIZE * bits;
}

//! LUT entries per output row.
SQZ_CONSTEXPR int32_t lutEntries(int32_t bits)
{
    return 1 << bits;
}

//! Words per "vector unit": the fewest whole groups whose words fill whole 128-bit (4-word) loads.
SQZ_CONSTEXPR int32_t unitGroups(int32_t bits)
{
    return bits % 4 == 0 ? 1 : (bits % 2 == 0 ? 2 : 4);
}

static_assert(sizeof(int32_t) * 8 == kGROUP_SIZE, "a group of b-bit indices must fill exactly b int32 words");
static_assert(kSUPPORTED_BITS[kNUM_SUPPORTED_BITS - 1] == 8, "kSUPPORTED_BITS and its count disagree");
static_assert(packedWords(32, 3) == 3 && packedWords(33, 3) == 6 && packedWords(4096, 4) == 512, "packedWords");
static_assert(lutEntries(3) == 8 && lutEntries(4) == 16, "lutEntries");
static_assert(unitGroups(3) * 3 % 4 == 0 && unitGroups(4) * 4 % 4 == 0 && unitGroups(2) * 2 % 4 == 0
        && unitGroups(8) * 8 % 4 == 0,
    "a vector unit must be a whole number of 128-bit loads");
static_assert(kLAYOUT_ROWMAJOR == 2 && kLAYOUT_KMAJOR == 1, "layout ids are part of the file format");

//! nullptr if a packed layer of this shape is valid, else a static message naming the bad field. The
//! weight half of the CUDA launcher's (sqzLinearValidate) and the CPU kernel's (sqzCpuValidate) checks.
inline char const* validateLayerShape(int64_t inFeatures, int64_t outFeatures, int32_t bits, int64_t nnz)
{
    if (inFeatures < 1)
    {
        return "shape.inFeatures (K) must be >= 1";
    }
    if (inFeatures > (1 << 30))
    {
        return "shape.inFeatures (K) must be <= 2^30";
    }
    if (outFeatures < 1)
    {
        return "shape.outFeatures (N) must be >= 1";
    }
    if (!isSupportedBits(bits))
    {
        return "shape.bits must be 2, 3, 4 or 8";
    }
    if (nnz < 0)
    {
        return "shape.nnz must be >= 0";
    }
    return nullptr;
}

//! The group's bit stream from index j (0..31) on: index j in the low BITS bits, the bits above it
//! unspecified (the following indices). With j a compile-time constant (unrolled loops) the word
//! choice and the shifts fold away; straddling indices (3-bit j = 10, 21) read two words.
template <int BITS>
SQZ_HOST_DEVICE uint32_t groupBits(uint32_t const* w, int j)
{
    int const bit = BITS * j;
    int const word = bit >> 5;
    int const shift = bit & 31;
    uint32_t v = w[word] >> shift;
    if (shift + BITS > 32)
    {
        v |= w[word + 1] << (32 - shift);
    }
    return v;
}

//! Index j (0..31) of one group whose BITS words are `w`.
template <int BITS>
SQZ_HOST_DEVICE uint32_t groupIndex(uint32_t const* w, int j)
{
    return groupBits<BITS>(w, j) & ((1u << BITS) - 1u);
}

//! Index k of one layout-2 row (runtime bits): the row's words are one bit stream (see the header comment).
SQZ_HOST_DEVICE uint32_t rowIndex(uint32_t const* rowWords, int32_t bits, int64_t k)
{
    int64_t const bit = static_cast<int64_t>(bits) * k;
    int64_t const word = bit >> 5;
    int const shift = static_cast<int>(bit & 31);
    uint32_t v = rowWords[word] >> shift;
    if (shift + bits > 32)
    {
        v |= rowWords[word + 1] << (32 - shift);
    }
    return v & ((1u << bits) - 1u);
}

// ---- fp16 / bf16 bit patterns on the host (the reference must not depend on CUDA's host helpers) ----

inline float halfBitsToFloat(uint16_t h)
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t const exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    uint32_t bits;
    if (exponent == 0x1Fu)
    {
        bits = sign | 0x7F800000u | (mantissa << 13); // inf / nan
    }
    else if (exponent != 0)
    {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    else if (mantissa == 0)
    {
        bits = sign; // +-0
    }
    else
    {
        // subnormal: value = mantissa * 2^-24; normalize.
        int32_t e = -1;
        do
        {
            mantissa <<= 1;
            ++e;
        } while ((mantissa & 0x400u) == 0);
        bits = sign | static_cast<uint32_t>(112 - e) << 23 | ((mantissa & 0x3FFu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

//! float -> fp16, round to nearest even (as __float2half_rn), overflow to inf, NaN kept NaN.
inline uint16_t floatToHalfBits(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, sizeof(x));
    uint16_t const sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    uint32_t const absx = x & 0x7FFFFFFFu;
    if (absx >= 0x7F800000u)
    {
        return static_cast<uint16_t>(sign | (absx > 0x7F800000u ? 0x7E00u : 0x7C00u));
    }
    if (absx >= 0x477FF000u) // >= 65520 rounds to inf
    {
        return static_cast<uint16_t>(sign | 0x7C00u);
    }
    if (absx < 0x33000001u) // <= 2^-25 rounds to 0
    {
        return sign;
    }
    int32_t const exponent = static_cast<int32_t>(absx >> 23) - 127;
    uint32_t mantissa = (absx & 0x7FFFFFu) | 0x800000u; // 24 bits with the implicit one
    int32_t shift;                                      // bits dropped from the 24-bit mantissa
    uint32_t halfExp;
    if (exponent < -14)
    {
        shift = 13 + (-14 - exponent); // subnormal half
        halfExp = 0;
    }
    else
    {
        shift = 13;
        halfExp = static_cast<uint32_t>(exponent + 15);
    }
    uint32_t const kept = mantissa >> shift;
    uint32_t const rest = mantissa & ((1u << shift) - 1u);
    uint32_t const half = 1u << (shift - 1);
    uint32_t rounded = kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
    uint32_t out;
    if (halfExp == 0)
    {
        out = rounded; // may carry into the smallest normal: the bit pattern is still right
    }
    else
    {
        out = (halfExp << 10) + (rounded - 0x400u); // carry out of the mantissa bumps the exponent
    }
    return static_cast<uint16_t>(sign | out);
}

inline float bf16BitsToFloat(uint16_t b)
{
    uint32_t const bits = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

//! float -> bf16, round to nearest even (as __float2bfloat16_rn), NaN kept NaN.
inline uint16_t floatToBf16Bits(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, sizeof(x));
    if ((x & 0x7FFFFFFFu) > 0x7F800000u)
    {
        return static_cast<uint16_t>((x >> 16) | 0x40u);
    }
    x += 0x7FFFu + ((x >> 16) & 1u);
    return static_cast<uint16_t>(x >> 16);
}

} // namespace format
} // namespace sqz
