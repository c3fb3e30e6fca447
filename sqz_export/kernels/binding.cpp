// Python binding of the SqzLinear launcher (plugins/common/sqzLinear.h) for torch tensors.
//
// Only the launch itself lives here; the op schema, argument checks with tensor names, the CPU
// implementation and the kernel-choice logging are in sqz_export/kernels/ops.py. Launches go to
// torch's current CUDA stream of x's device, so they follow torch streams and CUDA graph capture.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <string>

#include "sqzLinear.h"

namespace
{

sqz::SqzLinearShape makeShape(int64_t m, int64_t inFeatures, int64_t outFeatures, int64_t bits, int64_t nnz,
    int64_t chunkNnz, bool bf16)
{
    TORCH_CHECK(m >= 0 && m <= INT32_MAX && inFeatures <= INT32_MAX && outFeatures <= INT32_MAX && nnz <= INT32_MAX,
        "sqz_linear: sizes must fit in int32 (m=", m, ", in_features=", inFeatures, ", out_features=", outFeatures,
        ", nnz=", nnz, ")");
    sqz::SqzLinearShape shape{};
    shape.m = static_cast<int32_t>(m);
    shape.inFeatures = static_cast<int32_t>(inFeatures);
    shape.outFeatures = static_cast<int32_t>(outFeatures);
    shape.bits = static_cast<int32_t>(bits);
    shape.nnz = static_cast<int32_t>(nnz);
    shape.chunkNnz = static_cast<int32_t>(chunkNnz);
    shape.dtype = bf16 ? sqz::DataType::kBF16 : sqz::DataType::kHALF;
    return shape;
}

sqz::KernelKind toKind(int64_t kind)
{
    TORCH_CHECK(kind >= 0 && kind <= 2, "sqz_linear: kernel kind must be 0 (auto), 1 (gemv) or 2 (dequant_gemm), got ", kind);
    return static_cast<sqz::KernelKind>(kind);
}

// Kernel kind sqzLinearChooseKernel picks (1 = gemv, 2 = dequant_gemm).
int64_t chooseKernel(int64_t m, int64_t inFeatures, int64_t outFeatures, int64_t bits, int64_t nnz, int64_t chunkNnz, bool bf16)
{
    return static_cast<int64_t>(sqz::sqzLinearChooseKernel(makeShape(m, inFeatures, outFeatures, bits, nnz, chunkNnz, bf16)));
}

int64_t workspaceSize(int64_t m, int64_t inFeatures, int64_t outFeatures, int64_t bits, int64_t nnz, int64_t chunkNnz,
    bool bf16, int64_t kind)
{
    return static_cast<int64_t>(
        sqz::sqzLinearWorkspaceSizeFor(makeShape(m, inFeatures, outFeatures, bits, nnz, chunkNnz, bf16), toKind(kind)));
}

std::string kernelName(int64_t kind)
{
    return sqz::sqzLinearKernelName(toKind(kind));
}

// y = x W^T into the preallocated y [m, N] (x [m, K] contiguous fp16/bf16). Tensors were checked in ops.py.
void launch(torch::Tensor const& x, torch::Tensor const& qweight, torch::Tensor const& lut,
    std::optional<torch::Tensor> const& rowPtr, std::optional<torch::Tensor> const& col,
    std::optional<torch::Tensor> const& val, std::optional<torch::Tensor> const& chunkRow, torch::Tensor const& y,
    std::optional<torch::Tensor> const& workspace, int64_t bits, int64_t chunkNnz, int64_t kind)
{
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "sqz_linear: x must be a contiguous 2-D CUDA tensor");
    TORCH_CHECK(y.is_cuda() && y.is_contiguous() && y.scalar_type() == x.scalar_type(), "sqz_linear: y must be contiguous, dtype of x");
    bool const bf16 = x.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(bf16 || x.scalar_type() == torch::kHalf, "sqz_linear: the CUDA kernels take fp16 or bf16 x");
    int64_t const nnz = col.has_value() ? col->numel() : 0;
    sqz::SqzLinearShape const shape = makeShape(x.size(0), x.size(1), qweight.size(0), bits, nnz, chunkNnz, bf16);
    if (char const* error = sqz::sqzLinearValidate(shape))
    {
        TORCH_CHECK(false, "sqz_linear: ", error);
    }
    sqz::SqzLinearArgs args{};
    args.x = x.data_ptr();
    args.qweight = qweight.data_ptr<int32_t>();
    args.lut = lut.data_ptr();
    args.rowPtr = nnz > 0 ? rowPtr->data_ptr<int32_t>() : nullptr;
    args.col = nnz > 0 ? col->data_ptr<int32_t>() : nullptr;
    args.val = nnz > 0 ? val->data_ptr() : nullptr;
    args.chunkRow = nnz > 0 && chunkRow.has_value() ? chunkRow->data_ptr<int32_t>() : nullptr;
    args.y = y.data_ptr();
    args.workspace = workspace.has_value() ? workspace->data_ptr() : nullptr;
    args.workspaceBytes = workspace.has_value() ? static_cast<size_t>(workspace->numel()) : 0;
    c10::cuda::CUDAGuard const guard(x.device());
    cudaError_t const status = sqz::sqzLinearLaunch(shape, args, toKind(kind), c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
    TORCH_CHECK(status == cudaSuccess, "sqz_linear: sqzLinearLaunch failed: ", cudaGetErrorString(status));
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "SqzLinear CUDA kernels (plugins/kernels/sqzLinear.cu)";
    m.def("launch", &launch, "y = x W^T on the current stream");
    m.def("choose_kernel", &chooseKernel, "kernel kind the launcher picks for a shape");
    m.def("workspace_size", &workspaceSize, "workspace bytes a kernel kind needs");
    m.def("kernel_name", &kernelName, "name of a kernel kind");
}
