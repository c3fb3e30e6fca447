/*
 * sqzCpuDecodePaths.cpp: both AVX-512 decodes of the CPU kernel (broadcast + shift,
 * sqzLinearCpuAvx512.cpp; vpmultishiftqb, sqzLinearCpuAvx512Vbmi.cpp) must give the same GEMV outputs
 * and dequantized weights, bit for bit: the kAvx512 path runs one or the other by CPU. Random words,
 * LUTs, x and CSR parts; odd K and N, K tails, M across the 16-row tiles. Built and run by
 * tests/test_kernels.py where the CPU has VBMI; prints "<cases> cases, <n> differ" and fails when n > 0.
 */
#include "sqzFormat.h"
#include "sqzLinearCpuIsa.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace
{

using sqz::cpu::CpuArgs;
using sqz::cpu::CpuShape;
namespace detail = sqz::cpu::detail;

//! True when both decodes agree on the GEMV output and the dequantized weight of one random layer.
bool sameBits(std::mt19937& rng, int32_t bits, int32_t K, int32_t N, int32_t M, bool sparse)
{
    int32_t const words = ((K + 31) / 32) * bits;
    std::vector<int32_t> qweight(static_cast<size_t>(N) * words);
    for (auto& w : qweight)
    {
        w = static_cast<int32_t>(rng());
    }
    std::vector<uint16_t> lut(static_cast<size_t>(N) << bits);
    for (auto& v : lut)
    {
        v = static_cast<uint16_t>(0x3000 + (rng() & 0x0fff)); // fp16 in [0.125, 0.5)
    }
    std::vector<float> x(static_cast<size_t>(M) * K);
    for (auto& v : x)
    {
        v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 997.0f;
    }
    std::vector<int32_t> rowPtr(static_cast<size_t>(N) + 1, 0);
    std::vector<int32_t> col;
    std::vector<uint16_t> val;
    if (sparse)
    {
        for (int32_t n = 0; n < N; ++n)
        {
            for (int32_t k = n % 3; k < K; k += 37)
            {
                col.push_back(k);
                val.push_back(static_cast<uint16_t>(0x2c00 + (rng() & 0xff)));
            }
            rowPtr[n + 1] = static_cast<int32_t>(col.size());
        }
    }
    CpuShape s{};
    s.m = M;
    s.inFeatures = K;
    s.outFeatures = N;
    s.bits = bits;
    s.nnz = static_cast<int32_t>(col.size());
    CpuArgs a{};
    a.x = x.data();
    a.qweight = qweight.data();
    a.lut = lut.data();
    if (s.nnz > 0)
    {
        a.rowPtr = rowPtr.data();
        a.col = col.data();
        a.val = val.data();
    }
    std::vector<float> yShift(static_cast<size_t>(M) * N);
    std::vector<float> yVbmi(yShift.size());
    std::vector<float> wShift(static_cast<size_t>(N) * K);
    std::vector<float> wVbmi(wShift.size());
    a.y = yShift.data();
    detail::rowsAvx512(s, a, 0, N);
    a.y = yVbmi.data();
    detail::rowsAvx512Vbmi(s, a, 0, N);
    detail::dequantAvx512(s, a, 0, N, wShift.data());
    detail::dequantAvx512Vbmi(s, a, 0, N, wVbmi.data());
    return std::memcmp(yShift.data(), yVbmi.data(), yShift.size() * sizeof(float)) == 0
        && std::memcmp(wShift.data(), wVbmi.data(), wShift.size() * sizeof(float)) == 0;
}

} // namespace

int main()
{
    std::mt19937 rng(1);
    int cases = 0;
    int differ = 0;
    for (int32_t bits : {3, 4})
    {
        for (int32_t K : {20, 45, 96, 257, 1040, 4224})
        {
            for (int32_t N : {3, 17})
            {
                for (int32_t M : {1, 3, 4, 16, 17})
                {
                    for (bool sparse : {false, true})
                    {
                        ++cases;
                        if (!sameBits(rng, bits, K, N, M, sparse))
                        {
                            ++differ;
                            std::printf("differs: bits %d K %d N %d M %d sparse %d\n", bits, K, N, M, sparse ? 1 : 0);
                        }
                    }
                }
            }
        }
    }
    std::printf("%d cases, %d differ\n", cases, differ);
    return differ != 0;
}
