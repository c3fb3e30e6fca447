/*
 * sqzHalfLinearTest.cpp: sqzHalfLinearCpuRows (the dense fp16 GEMV) on every ISA this CPU has, against
 * a double-precision reference: K with and without a lane tail, M = 0..11, row ranges that leave the
 * first and last rows unwritten, weights and x that are never zero. Prints "<cases> cases, <bad> differ".
 */
#include "sqzFormat.h"
#include "sqzLinearCpu.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

int main()
{
    using namespace sqz::cpu;
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> uniform(0.25F, 1.0F);
    std::bernoulli_distribution negative(0.5);
    auto value = [&] { return negative(rng) ? -uniform(rng) : uniform(rng); };
    int cases = 0;
    int bad = 0;
    for (int32_t k : {1, 7, 8, 16, 17, 40, 576, 1000})
    {
        for (int32_t n : {1, 3, 4, 9, 37})
        {
            for (int32_t m : {0, 1, 2, 5, 11})
            {
                std::vector<uint16_t> w(static_cast<size_t>(n) * k);
                std::vector<float> x(static_cast<size_t>(m) * k);
                for (auto& h : w)
                {
                    h = sqz::format::floatToHalfBits(value());
                }
                for (auto& v : x)
                {
                    v = value();
                }
                for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
                {
                    if (!sqzCpuSupports(isa))
                    {
                        continue;
                    }
                    // Rows [1, n - 1) when there are enough: the bounds of a split's middle part.
                    int64_t const r0 = n > 2 ? 1 : 0;
                    int64_t const r1 = n > 2 ? n - 1 : n;
                    std::vector<float> y(static_cast<size_t>(m) * n, 12345.0F);
                    HalfLinearArgs const args{m, k, n, x.data(), w.data(), y.data()};
                    sqzHalfLinearCpuRows(args, isa, r0, r1);
                    ++cases;
                    bool ok = true;
                    for (int32_t i = 0; i < m; ++i)
                    {
                        for (int32_t j = 0; j < n; ++j)
                        {
                            float const got = y[static_cast<size_t>(i) * n + j];
                            if (j < r0 || j >= r1)
                            {
                                ok = ok && got == 12345.0F; // rows outside the range are not written
                                continue;
                            }
                            double expected = 0.0;
                            double magnitude = 0.0;
                            for (int32_t c = 0; c < k; ++c)
                            {
                                double const term = static_cast<double>(x[static_cast<size_t>(i) * k + c])
                                    * sqz::format::halfBitsToFloat(w[static_cast<size_t>(j) * k + c]);
                                expected += term;
                                magnitude += std::fabs(term);
                            }
                            // fp32 accumulation in any order: within k ulps of the sum of magnitudes.
                            ok = ok && std::fabs(got - expected) <= 1.2e-7 * k * magnitude + 1e-30;
                        }
                    }
                    if (!ok)
                    {
                        std::printf("differ: isa=%s k=%d n=%d m=%d\n", sqzCpuIsaName(isa), k, n, m);
                        ++bad;
                    }
                }
            }
        }
    }
    std::printf("%d cases, %d differ\n", cases, bad);
    return bad == 0 ? 0 : 1;
}
