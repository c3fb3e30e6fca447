// Both AVX-512 decodes of the CPU kernel (broadcast + shift, sqzLinearCpuAvx512.cpp; vpmultishiftqb,
// sqzLinearCpuAvx512Vbmi.cpp) must give the same GEMV outputs and dequantized weights, bit for bit:
// the kAvx512 path runs one or the other by CPU. Random words, LUTs, x and CSR parts; odd K and N, K
// tails, M across the 16-row tiles. Built and run by tests/test_kernels.py where the CPU has VBMI.
#include "sqzLinearCpuIsa.h"
#include "sqzFormat.h"
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
using namespace sqz::cpu;
int main() {
    std::mt19937 rng(1);
    int bad = 0, cases = 0;
    for (int bits : {3, 4}) for (int K : {20, 45, 96, 257, 1040, 4224}) for (int N : {3, 17}) for (int M : {1, 3, 4, 16, 17}) for (int nnzOn : {0, 1}) {
        int words = ((K + 31) / 32) * bits;
        std::vector<int32_t> q(N * words); for (auto& w : q) w = (int32_t)rng();
        std::vector<uint16_t> lut(N * (1 << bits)); for (auto& v : lut) v = 0x3000 + (rng() & 0x0fff);
        std::vector<float> x(M * K); for (auto& v : x) v = (float)((int)(rng() % 2001) - 1000) / 997.0f;
        std::vector<int32_t> rowPtr(N + 1, 0), col; std::vector<uint16_t> val;
        if (nnzOn) { for (int n = 0; n < N; ++n) { for (int k = n % 3; k < K; k += 37) { col.push_back(k); val.push_back(0x2c00 + (rng() & 0xff)); } rowPtr[n + 1] = (int)col.size(); } }
        CpuShape s{}; s.m = M; s.inFeatures = K; s.outFeatures = N; s.bits = bits; s.nnz = (int)col.size();
        std::vector<float> y1(M * N), y2(M * N), w1(N * K), w2(N * K);
        CpuArgs a{}; a.x = x.data(); a.qweight = q.data(); a.lut = lut.data();
        if (s.nnz) { a.rowPtr = rowPtr.data(); a.col = col.data(); a.val = val.data(); }
        a.y = y1.data(); detail::rowsAvx512(s, a, 0, N);
        a.y = y2.data(); detail::rowsAvx512Vbmi(s, a, 0, N);
        detail::dequantAvx512(s, a, 0, N, w1.data()); detail::dequantAvx512Vbmi(s, a, 0, N, w2.data());
        ++cases;
        if (std::memcmp(y1.data(), y2.data(), y1.size() * 4) || std::memcmp(w1.data(), w2.data(), w1.size() * 4)) { ++bad; printf("differs: bits %d K %d N %d M %d nnz %d\n", bits, K, N, M, s.nnz); }
    }
    printf("%d cases, %d differ\n", cases, bad);
    return bad != 0;
}
