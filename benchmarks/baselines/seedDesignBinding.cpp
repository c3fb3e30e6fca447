// Python binding of the seed-design baseline GEMV (seedDesignGemv.cu), for benchmarks/kernels.py only.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "seedDesignGemv.h"

namespace
{

// y (fp32 [N]) = W x for x fp16 [K]; qweight layout 1 int32 [ceil(K/32) * bits, N], lut fp16 [N, 2^bits].
void gemv(torch::Tensor const& x, torch::Tensor const& qweight, torch::Tensor const& lut, torch::Tensor const& y,
    int64_t bits)
{
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 1 && x.scalar_type() == torch::kHalf,
        "seed-design gemv: x must be a contiguous 1-D fp16 CUDA tensor");
    TORCH_CHECK(qweight.is_cuda() && qweight.is_contiguous() && qweight.dim() == 2 && qweight.scalar_type() == torch::kInt32,
        "seed-design gemv: qweight must be a contiguous 2-D int32 CUDA tensor (layout 1)");
    int64_t const k = x.size(0);
    int64_t const n = qweight.size(1);
    TORCH_CHECK(qweight.size(0) == (k + 31) / 32 * bits, "seed-design gemv: qweight must be [ceil(K/32) * bits, N], got ",
        qweight.sizes(), " for K=", k, " bits=", bits);
    TORCH_CHECK(lut.is_cuda() && lut.is_contiguous() && lut.scalar_type() == torch::kHalf && lut.size(0) == n
            && lut.size(1) == (int64_t{1} << bits),
        "seed-design gemv: lut must be contiguous fp16 [N, 2^bits]");
    TORCH_CHECK(y.is_cuda() && y.is_contiguous() && y.scalar_type() == torch::kFloat && y.numel() == n,
        "seed-design gemv: y must be a contiguous fp32 CUDA tensor of N elements");
    TORCH_CHECK(k <= INT32_MAX && n <= INT32_MAX, "seed-design gemv: K and N must fit in int32");
    c10::cuda::CUDAGuard const guard(x.device());
    cudaError_t const status = sqz::baseline::seedDesignGemv(reinterpret_cast<uint32_t const*>(qweight.data_ptr<int32_t>()),
        reinterpret_cast<__half const*>(lut.data_ptr<at::Half>()), reinterpret_cast<__half const*>(x.data_ptr<at::Half>()),
        y.data_ptr<float>(), static_cast<int32_t>(k), static_cast<int32_t>(n), static_cast<int32_t>(bits),
        c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
    TORCH_CHECK(status == cudaSuccess, "seed-design gemv: launch failed: ", cudaGetErrorString(status));
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "The seed's batch-1 LUT GEMV design (benchmarks/baselines/seedDesignGemv.cu), a benchmark baseline";
    m.def("gemv", &gemv, "y = W x (fp32 y, zeroed and accumulated with atomics) on the current stream");
}
