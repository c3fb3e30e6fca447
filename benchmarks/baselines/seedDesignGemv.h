/*
 * seedDesignGemv.h: launcher of the seed-design baseline GEMV (seedDesignGemv.cu says what it is).
 */
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace sqz
{
namespace baseline
{

//! y[n] = sum_k x[k] * LUT[n, idx[n, k]] for one activation row (batch 1), bits 3 or 4.
//! qweight: layout 1 int32 [ceil(K/32) * bits, N]; lut: fp16 [N, 2^bits]; x: fp16 [K]; y: fp32 [N]
//! (zeroed here on `stream`, then accumulated with atomics). Returns cudaErrorInvalidValue for bad
//! arguments (nothing is launched), else the launch status.
cudaError_t seedDesignGemv(uint32_t const* qweight, __half const* lut, __half const* x, float* y, int32_t K,
    int32_t N, int32_t bits, cudaStream_t stream) noexcept;

} // namespace baseline
} // namespace sqz
