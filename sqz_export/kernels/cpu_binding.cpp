// Python binding of the SqzLinear CPU kernel (plugins/common/sqzLinearCpu.h) for torch tensors.
//
// Only the call itself lives here; the op schema, argument checks with tensor names, dtype handling
// and the kernel-choice logging are in sqz_export/kernels/ops.py. Output rows are split into
// at::get_num_threads() ranges of equal work (sqzLinearCpuSplit) and run on torch's intra-op pool
// (at::parallel_for), so the kernel shares torch's threads instead of adding its own.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "sqzLinearCpu.h"

namespace
{

sqz::cpu::Isa toIsa(int64_t isa)
{
    TORCH_CHECK(isa >= 0 && isa <= 2, "sqz_linear: isa must be 0 (scalar), 1 (avx2) or 2 (avx512), got ", isa);
    auto const value = static_cast<sqz::cpu::Isa>(isa);
    TORCH_CHECK(sqz::cpu::sqzCpuSupports(value), "sqz_linear: this CPU does not support ", sqz::cpu::sqzCpuIsaName(value));
    return value;
}

// y = x W^T, fp32 [M, N] from fp32 x [M, K] (contiguous); tensors were checked in ops.py.
torch::Tensor linear(torch::Tensor const& x, torch::Tensor const& qweight, torch::Tensor const& lut,
    std::optional<torch::Tensor> const& rowPtr, std::optional<torch::Tensor> const& col,
    std::optional<torch::Tensor> const& val, int64_t bits, int64_t isa)
{
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2 && x.scalar_type() == torch::kFloat32,
        "sqz_linear: x must be a contiguous 2-D fp32 CPU tensor");
    TORCH_CHECK(qweight.is_contiguous() && lut.is_contiguous(), "sqz_linear: qweight and lut must be contiguous");
    int64_t const nnz = col.has_value() ? col->numel() : 0;
    TORCH_CHECK(x.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX && qweight.size(0) <= INT32_MAX && nnz <= INT32_MAX,
        "sqz_linear: sizes must fit in int32");
    sqz::cpu::CpuShape shape{};
    shape.m = static_cast<int32_t>(x.size(0));
    shape.inFeatures = static_cast<int32_t>(x.size(1));
    shape.outFeatures = static_cast<int32_t>(qweight.size(0));
    shape.bits = static_cast<int32_t>(bits);
    shape.nnz = static_cast<int32_t>(nnz);
    if (char const* error = sqz::cpu::sqzCpuValidate(shape))
    {
        TORCH_CHECK(false, "sqz_linear: ", error);
    }
    sqz::cpu::Isa const kernelIsa = toIsa(isa);
    torch::Tensor y = torch::empty({x.size(0), qweight.size(0)}, x.options());
    sqz::cpu::CpuArgs args{};
    args.x = x.data_ptr<float>();
    args.qweight = qweight.data_ptr<int32_t>();
    args.lut = reinterpret_cast<uint16_t const*>(lut.data_ptr<at::Half>());
    if (nnz > 0)
    {
        TORCH_CHECK(rowPtr->is_contiguous() && col->is_contiguous() && val->is_contiguous(), "sqz_linear: the sparse tensors must be contiguous");
        args.rowPtr = rowPtr->data_ptr<int32_t>();
        args.col = col->data_ptr<int32_t>();
        args.val = reinterpret_cast<uint16_t const*>(val->data_ptr<at::Half>());
    }
    args.y = y.data_ptr<float>();
    int32_t const parts = static_cast<int32_t>(std::max(1, at::get_num_threads()));
    std::vector<int64_t> bounds(static_cast<size_t>(parts) + 1);
    sqz::cpu::sqzLinearCpuSplit(shape, args.rowPtr, parts, bounds.data());
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p)
        {
            sqz::cpu::sqzLinearCpuRows(shape, args, kernelIsa, bounds[p], bounds[p + 1]);
        }
    });
    return y;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "SqzLinear CPU kernel (plugins/kernels/sqzLinearCpu.cpp)";
    m.def("linear", &linear, "fp32 y = x W^T from the packed weight, on torch's intra-op threads");
    m.def("best_isa", [] { return static_cast<int64_t>(sqz::cpu::sqzCpuBestIsa()); }, "widest ISA this CPU runs");
    m.def("supports", [](int64_t isa) { return isa >= 0 && isa <= 2 && sqz::cpu::sqzCpuSupports(static_cast<sqz::cpu::Isa>(isa)); },
        "whether this CPU runs an ISA");
    m.def("effective_isa", [](int64_t isa, int64_t bits) {
        return static_cast<int64_t>(sqz::cpu::sqzCpuEffectiveIsa(static_cast<sqz::cpu::Isa>(isa), static_cast<int32_t>(bits)));
    }, "the ISA a call with these bits runs");
    m.def("isa_name", [](int64_t isa) { return std::string(sqz::cpu::sqzCpuIsaName(static_cast<sqz::cpu::Isa>(isa))); }, "name of an ISA");
}
