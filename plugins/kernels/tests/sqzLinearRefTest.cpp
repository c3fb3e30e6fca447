/*
 * CPU-only tests of the kernel library's host side: the format mirror (index decode the kernels use,
 * fp16/bf16 bit conversions), the host reference sqzLinearRef on an exact integer case, and the
 * launcher policy (validation messages, kernel choice, workspace size). No GPU needed; run by ctest.
 */
#include "sqzFormat.h"
#include "sqzGemvEmulate.h"
#include "sqzLinear.h"
#include "sqzLinearConfig.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace
{

int gFailures = 0;

void check(bool ok, std::string const& what)
{
    if (!ok)
    {
        std::fprintf(stderr, "FAILED: %s\n", what.c_str());
        ++gFailures;
    }
}

using namespace sqz;

//! Naive packer: index k of a row at stream bits [bits*k, bits*k + bits), bit by bit (layout 2 row).
std::vector<uint32_t> packRow(std::vector<uint32_t> const& idx, int32_t bits)
{
    std::vector<uint32_t> words(static_cast<size_t>(format::packedWords(static_cast<int64_t>(idx.size()), bits)), 0u);
    for (size_t k = 0; k < idx.size(); ++k)
    {
        for (int32_t t = 0; t < bits; ++t)
        {
            size_t const pos = k * static_cast<size_t>(bits) + static_cast<size_t>(t);
            words[pos / 32] |= ((idx[k] >> t) & 1u) << (pos % 32);
        }
    }
    return words;
}

template <int BITS>
void testGroupDecode(std::mt19937& rng)
{
    for (int trial = 0; trial < 200; ++trial)
    {
        std::vector<uint32_t> idx(32);
        for (auto& v : idx)
        {
            v = rng() & ((1u << BITS) - 1u);
        }
        std::vector<uint32_t> const words = packRow(idx, BITS);
        check(words.size() == static_cast<size_t>(BITS), "a group of 32 indices fills exactly bits words");
        for (int j = 0; j < 32; ++j)
        {
            check(format::groupIndex<BITS>(words.data(), j) == idx[static_cast<size_t>(j)],
                "groupIndex<" + std::to_string(BITS) + "> index " + std::to_string(j));
        }
    }
}

void testRowDecode(std::mt19937& rng)
{
    for (int32_t bits : format::kSUPPORTED_BITS)
    {
        for (int32_t k : {1, 31, 32, 33, 45, 100, 257})
        {
            std::vector<uint32_t> idx(static_cast<size_t>(k));
            for (auto& v : idx)
            {
                v = rng() & ((1u << bits) - 1u);
            }
            std::vector<uint32_t> const words = packRow(idx, bits);
            for (int32_t i = 0; i < k; ++i)
            {
                check(format::rowIndex(words.data(), bits, i) == idx[static_cast<size_t>(i)],
                    "rowIndex bits=" + std::to_string(bits) + " K=" + std::to_string(k) + " k=" + std::to_string(i));
            }
        }
    }
}

void testHalfConversions()
{
    int mismatches = 0;
    for (uint32_t h = 0; h < 0x10000u; ++h)
    {
        auto const bitsIn = static_cast<uint16_t>(h);
        bool const nan = (bitsIn & 0x7C00u) == 0x7C00u && (bitsIn & 0x3FFu) != 0;
        float const f = format::halfBitsToFloat(bitsIn);
        if (nan)
        {
            mismatches += std::isnan(f) && std::isnan(format::halfBitsToFloat(format::floatToHalfBits(f))) ? 0 : 1;
        }
        else
        {
            mismatches += format::floatToHalfBits(f) == bitsIn ? 0 : 1;
        }
        float const b = format::bf16BitsToFloat(bitsIn);
        bool const bnan = std::isnan(b);
        mismatches += (bnan ? std::isnan(format::bf16BitsToFloat(format::floatToBf16Bits(b)))
                            : format::floatToBf16Bits(b) == bitsIn)
            ? 0
            : 1;
    }
    check(mismatches == 0, "fp16/bf16 bit patterns survive float round trips (" + std::to_string(mismatches) + " mismatches)");
    check(format::floatToHalfBits(1.0f) == 0x3C00u, "1.0 -> 0x3C00");
    check(format::floatToHalfBits(65504.0f) == 0x7BFFu, "65504 -> largest finite fp16");
    check(format::floatToHalfBits(65520.0f) == 0x7C00u, "65520 rounds to inf");
    check(format::floatToHalfBits(std::ldexp(1.0f, -24)) == 0x0001u, "2^-24 -> smallest subnormal");
    check(format::floatToHalfBits(1.0f + std::ldexp(1.0f, -11)) == 0x3C00u, "tie rounds to even (down)");
    check(format::floatToHalfBits(1.0f + 3.0f * std::ldexp(1.0f, -11)) == 0x3C02u, "tie rounds to even (up)");
    check(format::floatToHalfBits(-2.0f) == 0xC000u, "-2 -> 0xC000");
    check(format::floatToBf16Bits(1.0f + std::ldexp(1.0f, -8)) == 0x3F80u, "bf16 tie rounds to even");
}

/*
 * Exact case: small integer LUT values, activations and sparse values, so every product and sum is an
 * integer far below 2048 and fp32/fp16 represent all of them exactly; the reference must match the
 * integer result bit for bit. Odd K (not a multiple of 32) and odd N. The GEMV kernel's lane code
 * (sqzGemvEmulate, both load paths) must give the same bits.
 */
void testReferenceExact(int32_t bits, DataType dtype)
{
    int32_t const m = 3;
    int32_t const kIn = 45;
    int32_t const nOut = 7;
    int32_t const entries = 1 << bits;
    std::mt19937 rng(static_cast<uint32_t>(bits * 100 + static_cast<int>(dtype)));
    auto const toBits = [dtype](float v) {
        return dtype == DataType::kBF16 ? format::floatToBf16Bits(v) : format::floatToHalfBits(v);
    };
    std::vector<uint16_t> lut(static_cast<size_t>(nOut * entries));
    std::vector<int> lutInt(lut.size());
    for (size_t i = 0; i < lut.size(); ++i)
    {
        lutInt[i] = static_cast<int>(i % static_cast<size_t>(entries)) - entries / 2 + static_cast<int>(i / static_cast<size_t>(entries)) % 3;
        lut[i] = format::floatToHalfBits(static_cast<float>(lutInt[i]));
    }
    std::vector<uint32_t> idx(static_cast<size_t>(nOut * kIn));
    std::vector<int32_t> qweight;
    for (int32_t n = 0; n < nOut; ++n)
    {
        std::vector<uint32_t> row(static_cast<size_t>(kIn));
        for (auto& v : row)
        {
            v = rng() % static_cast<uint32_t>(entries);
        }
        std::copy(row.begin(), row.end(), idx.begin() + n * kIn);
        for (uint32_t w : packRow(row, bits))
        {
            int32_t s;
            std::memcpy(&s, &w, sizeof(s));
            qweight.push_back(s);
        }
    }
    std::vector<int> xInt(static_cast<size_t>(m * kIn));
    std::vector<uint16_t> x(xInt.size());
    for (size_t i = 0; i < x.size(); ++i)
    {
        xInt[i] = static_cast<int>(rng() % 5) - 2;
        x[i] = toBits(static_cast<float>(xInt[i]));
    }
    // CSR: rows 0 and 5 hold non-zeros, row 3 a single one, the rest none.
    std::vector<int32_t> rowPtr = {0, 2, 2, 2, 3, 3, 6, 6};
    std::vector<int32_t> col = {0, 44, 17, 1, 2, 40};
    std::vector<int> valInt = {3, -1, 2, 1, -4, 5};
    std::vector<uint16_t> val;
    for (int v : valInt)
    {
        val.push_back(format::floatToHalfBits(static_cast<float>(v)));
    }
    std::vector<int32_t> chunkRow = {0, 5}; // chunkNnz = 4
    std::vector<uint16_t> y(static_cast<size_t>(m * nOut), 0xFFFFu);

    SqzLinearShape shape{m, kIn, nOut, bits, static_cast<int32_t>(col.size()), 4, dtype};
    SqzLinearArgs args{};
    args.x = x.data();
    args.qweight = qweight.data();
    args.lut = lut.data();
    args.rowPtr = rowPtr.data();
    args.col = col.data();
    args.val = val.data();
    args.chunkRow = chunkRow.data();
    args.y = y.data();
    char const* error = sqzLinearRef(shape, args);
    check(error == nullptr, std::string("sqzLinearRef accepted the exact case: ") + (error ? error : ""));
    for (bool forceScalar : {false, true})
    {
        std::vector<uint16_t> emulated(y.size(), 0xFFFFu);
        SqzLinearArgs emulatedArgs = args;
        emulatedArgs.y = emulated.data();
        check(sqzGemvEmulate(shape, emulatedArgs, forceScalar, forceScalar) == nullptr, "sqzGemvEmulate accepted the case");
        check(emulated == y,
            "GEMV lane code == reference, bits=" + std::to_string(bits) + " forceScalar=" + std::to_string(forceScalar));
    }
    for (int32_t r = 0; r < m; ++r)
    {
        for (int32_t n = 0; n < nOut; ++n)
        {
            int expected = 0;
            for (int32_t k = 0; k < kIn; ++k)
            {
                expected += xInt[static_cast<size_t>(r * kIn + k)] * lutInt[static_cast<size_t>(n * entries) + idx[static_cast<size_t>(n * kIn + k)]];
            }
            for (int32_t j = rowPtr[static_cast<size_t>(n)]; j < rowPtr[static_cast<size_t>(n) + 1]; ++j)
            {
                expected += valInt[static_cast<size_t>(j)] * xInt[static_cast<size_t>(r * kIn + col[static_cast<size_t>(j)])];
            }
            check(y[static_cast<size_t>(r * nOut + n)] == toBits(static_cast<float>(expected)),
                "exact reference bits=" + std::to_string(bits) + " dtype=" + std::to_string(static_cast<int>(dtype))
                    + " y[" + std::to_string(r) + "," + std::to_string(n) + "]");
        }
    }
}

void testPolicy()
{
    SqzLinearShape shape{1, 4096, 11008, 3, 0, 0, DataType::kHALF};
    check(sqzLinearValidate(shape) == nullptr, "a LLaMA shape is valid");
    check(sqzLinearChooseKernel(shape) == KernelKind::kGemv, "m = 1 -> gemv");
    check(sqzLinearWorkspaceSize(shape) == 0, "gemv needs no workspace");
    shape.m = kGEMV_MAX_M;
    check(sqzLinearChooseKernel(shape) == KernelKind::kGemv, "m = 16 -> gemv");
    shape.m = kGEMV_MAX_M + 1;
    check(sqzLinearChooseKernel(shape) == KernelKind::kDequantGemm, "m = 17 -> dequant+gemm");
    check(sqzLinearWorkspaceSize(shape) == static_cast<size_t>(11008) * 4096 * 2, "workspace = padded N x padded K fp16");
    shape.outFeatures = 7;
    shape.inFeatures = 45;
    check(sqzLinearWorkspaceSize(shape) == 64 * 64 * 2, "odd shapes pad to whole tiles (64 x 64 here)");
    check(sqzLinearWorkspaceSizeFor(shape, KernelKind::kGemv) == 0, "explicit gemv needs no workspace");
    shape.m = 1;
    check(sqzLinearWorkspaceSizeFor(shape, KernelKind::kDequantGemm) == 64 * 64 * 2, "explicit dequant+gemm at m = 1");

    auto const refused = [](SqzLinearShape s, char const* field) {
        char const* message = sqzLinearValidate(s);
        return message != nullptr && std::strstr(message, field) != nullptr;
    };
    SqzLinearShape const ok{4, 45, 7, 4, 0, 0, DataType::kBF16};
    check(sqzLinearValidate(ok) == nullptr, "odd K and N, bf16 are valid");
    SqzLinearShape s = ok;
    s.bits = 5;
    check(refused(s, "bits"), "bits = 5 refused, naming bits");
    s = ok;
    s.inFeatures = 0;
    check(refused(s, "inFeatures"), "K = 0 refused");
    s = ok;
    s.outFeatures = 0;
    check(refused(s, "outFeatures"), "N = 0 refused");
    s = ok;
    s.m = -1;
    check(refused(s, "shape.m"), "m < 0 refused");
    s = ok;
    s.nnz = 10;
    check(refused(s, "chunkNnz"), "nnz > 0 needs chunkNnz > 0");
    s = ok;
    s.dtype = static_cast<DataType>(7);
    check(refused(s, "dtype"), "unknown dtype refused");
    check(std::strlen(sqzLinearKernelName(KernelKind::kGemv)) > 0, "kernel names exist");
}

} // namespace

int main()
{
    std::mt19937 rng(1234);
    testGroupDecode<2>(rng);
    testGroupDecode<3>(rng);
    testGroupDecode<4>(rng);
    testGroupDecode<8>(rng);
    testRowDecode(rng);
    testHalfConversions();
    for (int32_t bits : {2, 3, 4, 8})
    {
        testReferenceExact(bits, DataType::kHALF);
        testReferenceExact(bits, DataType::kBF16);
    }
    testPolicy();
    if (gFailures != 0)
    {
        std::fprintf(stderr, "%d check(s) failed\n", gFailures);
        return 1;
    }
    std::printf("sqzLinearRefTest: all checks passed\n");
    return 0;
}
