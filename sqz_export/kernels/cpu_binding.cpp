// Python binding of the SqzLinear CPU kernel (plugins/common/sqzLinearCpu.h) for torch tensors.
// For large M it dequantizes W tile by tile (sqzDequantCpuRows) into torch's GEMM instead.
//
// Only the call itself lives here; the op schema, argument checks with tensor names, dtype handling
// and the kernel-choice logging are in sqz_export/kernels/ops.py. Output rows are split into
// at::get_num_threads() ranges of equal work (sqzLinearCpuSplit) and run on torch's intra-op pool
// (at::parallel_for), so the kernel shares torch's threads instead of adding its own.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
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

// The large-M path: W in tiles of output rows, each dequantized to fp32 (on torch's threads) and
// multiplied by torch's GEMM (its own threads), so the packed words are decoded once per call rather
// than once per tile of x rows, and the multiply runs at GEMM speed.
void dequantGemm(sqz::cpu::CpuShape const& shape, sqz::cpu::CpuArgs const& args, sqz::cpu::Isa isa,
    torch::Tensor const& x, torch::Tensor& y)
{
    int64_t const N = shape.outFeatures;
    int64_t const K = shape.inFeatures;
    int64_t const tileRows = sqz::cpu::sqzDequantTileRows(K, N);
    torch::Tensor w = torch::empty({tileRows, K}, x.options());
    float* const wp = w.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += tileRows)
    {
        int64_t const rows = std::min(tileRows, N - n0);
        at::parallel_for(n0, n0 + rows, 16, [&](int64_t begin, int64_t end) {
            sqz::cpu::sqzDequantCpuRows(shape, args, isa, begin, end, wp + (begin - n0) * K);
        });
        y.narrow(1, n0, rows).copy_(at::mm(x, w.narrow(0, 0, rows).t()));
    }
}

// y = x W^T, fp32 [M, N] from fp32 x [M, K] (contiguous); tensors were checked in ops.py. `gemm`:
// dequantized tiles into torch's GEMM (large M) instead of the LUT GEMV.
torch::Tensor linear(torch::Tensor const& x, torch::Tensor const& qweight, torch::Tensor const& lut,
    std::optional<torch::Tensor> const& rowPtr, std::optional<torch::Tensor> const& col,
    std::optional<torch::Tensor> const& val, int64_t bits, int64_t isa, bool gemm)
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
    if (gemm && shape.m > 0)
    {
        dequantGemm(shape, args, kernelIsa, x, y);
        return y;
    }
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

// How many of torch's intra-op threads an at::parallel_for of this extension runs on: 1 when the
// extension was compiled without OpenMP (ATen then runs the range serially), a guard for the build flags.
int64_t parallelThreads()
{
    std::vector<char> seen(static_cast<size_t>(std::max(1, at::get_num_threads())), 0);
    at::parallel_for(0, static_cast<int64_t>(seen.size()), 1, [&](int64_t, int64_t) {
        seen[static_cast<size_t>(at::get_thread_num())] = 1;
    });
    return std::count(seen.begin(), seen.end(), 1);
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "SqzLinear CPU kernel (plugins/kernels/sqzLinearCpu.cpp)";
    m.def("linear", &linear, "fp32 y = x W^T from the packed weight, on torch's intra-op threads");
    m.def("parallel_threads", &parallelThreads, "threads an at::parallel_for of this extension runs on");
    m.def("best_isa", [] { return static_cast<int64_t>(sqz::cpu::sqzCpuBestIsa()); }, "widest ISA this CPU runs");
    m.def("supports", [](int64_t isa) { return isa >= 0 && isa <= 2 && sqz::cpu::sqzCpuSupports(static_cast<sqz::cpu::Isa>(isa)); },
        "whether this CPU runs an ISA");
    m.def("effective_isa", [](int64_t isa, int64_t bits) {
        return static_cast<int64_t>(sqz::cpu::sqzCpuEffectiveIsa(static_cast<sqz::cpu::Isa>(isa), static_cast<int32_t>(bits)));
    }, "the ISA a call with these bits runs");
    m.def("isa_name", [](int64_t isa) { return std::string(sqz::cpu::sqzCpuIsaName(static_cast<sqz::cpu::Isa>(isa))); }, "name of an ISA");
}
