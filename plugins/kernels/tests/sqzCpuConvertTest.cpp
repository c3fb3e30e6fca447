/*
 * sqzCpuConvertTest.cpp: sqzCpuHalfToFloat / sqzCpuFloatToHalf (F16C where the CPU has it) against
 * the portable bit arithmetic of sqzFormat.h. Every one of the 65536 fp16 patterns to fp32; to fp16:
 * every fp16 value, the midpoints between neighbours (ties to even), one ulp of fp32 either side of
 * them, the overflow edge and 2^20 random fp32 patterns. Counts of odd-length runs exercise the scalar
 * tails. NaNs must stay NaNs (payloads may differ). Built and run by tests/test_kernels.py; prints
 * "<cases> cases, <n> differ" and fails when n > 0.
 */
#include "sqzFormat.h"
#include "sqzLinearCpu.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace
{

namespace format = sqz::format;

float fromBits(uint32_t bits)
{
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

uint32_t toBits(float f)
{
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    return bits;
}

bool isHalfNan(uint16_t h)
{
    return (h & 0x7C00u) == 0x7C00u && (h & 0x03FFu) != 0;
}

//! Differences of sqzCpuFloatToHalf from format::floatToHalfBits over `values`, in runs of 1..37.
int64_t toHalfDiffers(std::vector<float> const& values)
{
    std::vector<uint16_t> out(values.size());
    for (size_t begin = 0, run = 1; begin < values.size(); begin += run, run = run % 37 + 1)
    {
        size_t const count = std::min(run, values.size() - begin);
        sqz::cpu::sqzCpuFloatToHalf(values.data() + begin, out.data() + begin, static_cast<int64_t>(count));
    }
    int64_t differ = 0;
    for (size_t i = 0; i < values.size(); ++i)
    {
        uint16_t const expected = format::floatToHalfBits(values[i]);
        bool const same = std::isnan(values[i]) ? isHalfNan(out[i]) && (out[i] & 0x8000u) == (expected & 0x8000u)
                                                 : out[i] == expected;
        if (!same && differ++ < 5)
        {
            std::printf("to fp16: %08x gave %04x, expected %04x\n", toBits(values[i]), out[i], expected);
        }
    }
    return differ;
}

} // namespace

int main()
{
    std::vector<uint16_t> halves(65536);
    for (uint32_t h = 0; h < 65536; ++h)
    {
        halves[h] = static_cast<uint16_t>(h);
    }
    std::vector<float> floats(halves.size());
    for (size_t begin = 0, run = 1; begin < halves.size(); begin += run, run = run % 37 + 1)
    {
        size_t const count = std::min(run, halves.size() - begin);
        sqz::cpu::sqzCpuHalfToFloat(halves.data() + begin, floats.data() + begin, static_cast<int64_t>(count));
    }
    int64_t differ = 0;
    for (uint32_t h = 0; h < 65536; ++h)
    {
        float const expected = format::halfBitsToFloat(static_cast<uint16_t>(h));
        bool const same = isHalfNan(static_cast<uint16_t>(h)) ? std::isnan(floats[h]) : toBits(floats[h]) == toBits(expected);
        if (!same && differ++ < 5)
        {
            std::printf("to fp32: %04x gave %08x, expected %08x\n", h, toBits(floats[h]), toBits(expected));
        }
    }

    std::vector<float> values;
    for (uint32_t h = 0; h < 0x7C00u; ++h) // every finite non-negative fp16, its midpoint to the next, +-1 ulp
    {
        float const here = format::halfBitsToFloat(static_cast<uint16_t>(h));
        float const next = format::halfBitsToFloat(static_cast<uint16_t>(h + 1));
        float const mid = here + (next - here) / 2;
        for (float v : {here, mid, fromBits(toBits(mid) - 1), fromBits(toBits(mid) + 1)})
        {
            values.push_back(v);
            values.push_back(-v);
        }
    }
    for (float v : {65504.0f, 65519.99f, 65520.0f, 1e30f, INFINITY, -INFINITY, NAN})
    {
        values.push_back(v);
    }
    std::mt19937 rng(7);
    for (int i = 0; i < (1 << 20); ++i)
    {
        values.push_back(fromBits(static_cast<uint32_t>(rng())));
    }
    differ += toHalfDiffers(values);
    std::printf("%zu cases, %lld differ\n", halves.size() + values.size(), static_cast<long long>(differ));
    return differ == 0 ? 0 : 1;
}
