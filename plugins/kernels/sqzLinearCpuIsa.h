/*
 * sqzLinearCpuIsa.h: internal entry points of the per-ISA translation units of the CPU kernel
 * (sqzLinearCpuAvx2.cpp, sqzLinearCpuAvx512.cpp, sqzLinearCpuAvx512Vbmi.cpp) and the scalar
 * dequantization finish they share with the portable path (sqzLinearCpu.cpp, compiled for the baseline
 * ISA). The GEMV's row finish is a template instead (sqzLinearCpuFinish.h), compiled per ISA.
 */
#pragma once

#include "sqzLinearCpu.h"

namespace sqz
{
namespace cpu
{
namespace detail
{

//! Row n of W as fp32 at out[0, K): entries k >= kBegin from the LUT (scalar), then the CSR values of
//! row n added to theirs; out[0, kBegin) holds the decoded LUT entries.
void finishDequant(CpuShape const& s, CpuArgs const& a, int64_t n, int64_t kBegin, float* out) noexcept;

//! W rows [r0, r1) as fp32 [r1 - r0, K] at w, with AVX2 + FMA + F16C / AVX-512F; bits must be 3 or 4.
void dequantAvx2(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, float* w) noexcept;
void dequantAvx512(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, float* w) noexcept;

//! The same rows and weights with AVX-512F + BW + VL + VBMI (a cheaper decode, the same bits); the
//! kAvx512 path runs these where hasAvx512Vbmi() says so.
void rowsAvx512Vbmi(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1) noexcept;
void dequantAvx512Vbmi(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1, float* w) noexcept;
bool hasAvx512Vbmi() noexcept;

//! sqzCpuHalfToFloat / sqzCpuFloatToHalf with F16C.
void halfToFloatF16c(uint16_t const* src, float* dst, int64_t count) noexcept;
void floatToHalfF16c(float const* src, uint16_t* dst, int64_t count) noexcept;

//! Rows [r0, r1) with AVX2 + FMA + F16C; bits must be 3 or 4.
void rowsAvx2(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1) noexcept;

//! sqzHalfLinearCpuRows with AVX2 + FMA + F16C / AVX-512F.
void halfRowsAvx2(HalfLinearArgs const& a, int64_t r0, int64_t r1) noexcept;
void halfRowsAvx512(HalfLinearArgs const& a, int64_t r0, int64_t r1) noexcept;

//! Rows [r0, r1) with AVX-512F; bits must be 3 or 4.
void rowsAvx512(CpuShape const& s, CpuArgs const& a, int64_t r0, int64_t r1) noexcept;

} // namespace detail
} // namespace cpu
} // namespace sqz
