/*
 * Host emulation of the GEMV kernel (sqzGemvKernel in sqzLinear.cu) for tests without a GPU: it runs
 * the kernel's own per-lane code (detail::gemvLanePartial, sqzGemvLane.cuh) for lanes 0..31 of every
 * output row and reduces them in the kernel's butterfly (__shfl_xor_sync) order, so its output is
 * what the GPU computes, bit for bit, given correctly rounded fmaf on both sides.
 */
#pragma once

#include "sqzLinear.h"

namespace sqz
{

//! Same arguments as sqzLinearLaunch (host pointers). forceScalarWords / forceScalarX take the
//! 32-bit weight / scalar activation paths even when 128-bit loads would be allowed. Returns nullptr
//! or a validation message.
char const* sqzGemvEmulate(
    SqzLinearShape const& shape, SqzLinearArgs const& args, bool forceScalarWords, bool forceScalarX) noexcept;

} // namespace sqz
