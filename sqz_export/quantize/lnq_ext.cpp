// Column loops of the LNQ refinement (sqz_export/quantize/lnq.py) in C++ for CPU tensors.
//
// The torch versions of these loops issue about a dozen tensor ops per column on [rows, levels]
// tensors of a few thousand elements, so on a CPU they run at the speed of op dispatch, not of the
// arithmetic. Here one call does a whole lazy block of columns: every row is independent inside a
// block (its own error, its own residual), so rows are split over torch's intra-op threads.
//
// In the two sweeps each element is computed with the same fp32 operations, in the same order, as the
// torch code (separate multiply and add: this file is compiled with -ffp-contract=off, so no FMA
// contraction; ties of argmin go to the first level, as torch.argmin does), so both give
// bit-identical results; tests/test_lnq.py checks that they do. The refit's normal equations are
// summed in another order than torch's dense product (see normalEquations).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <optional>
#include <vector>

namespace
{

void checkFloat2d(torch::Tensor const& t, char const* name)
{
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), "lnq: ", name,
        " must be a contiguous 2-D fp32 CPU tensor");
}

void checkRows(torch::Tensor const& t, int64_t rows, int64_t cols, char const* name)
{
    TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, "lnq: ", name, " must be [", rows, ", ", cols, "]");
}

// Checks the arguments every function shares: Hessians [P, K, K], the row -> Hessian map [R] and the
// optional exact mask [R, K].
void checkHessians(int64_t rows, int64_t k, torch::Tensor const& hessians, torch::Tensor const& group,
    std::optional<torch::Tensor> const& exact)
{
    TORCH_CHECK(hessians.device().is_cpu() && hessians.dim() == 3 && hessians.scalar_type() == torch::kFloat32
            && hessians.is_contiguous() && hessians.size(1) == k && hessians.size(2) == k,
        "lnq: hessians must be a contiguous fp32 CPU tensor [P, ", k, ", ", k, "]");
    TORCH_CHECK(group.device().is_cpu() && group.dim() == 1 && group.scalar_type() == torch::kInt64 && group.is_contiguous()
            && group.size(0) == rows,
        "lnq: group must be a contiguous int64 CPU tensor [", rows, "]");
    TORCH_CHECK(rows == 0 || (group.min().item<int64_t>() >= 0 && group.max().item<int64_t>() < hessians.size(0)),
        "lnq: group indices must be in [0, ", hessians.size(0), ")");
    if (exact.has_value())
    {
        TORCH_CHECK(exact->scalar_type() == torch::kBool && exact->is_contiguous(), "lnq: exact must be a contiguous bool tensor");
        checkRows(*exact, rows, k, "exact");
    }
}

void checkIndices(torch::Tensor const& indices, int64_t rows, int64_t k)
{
    TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == torch::kInt64 && indices.is_contiguous(),
        "lnq: indices must be a contiguous int64 CPU tensor");
    checkRows(indices, rows, k, "indices");
}

// The arguments of the two column sweeps: weight [R, K], lut [R, C], block [b0, b1).
struct Sweep
{
    int64_t rows;
    int64_t k;
    int64_t levels;
};

Sweep checkSweep(torch::Tensor const& weight, torch::Tensor const& lut, torch::Tensor const& indices, torch::Tensor const& hessians,
    torch::Tensor const& group, std::optional<torch::Tensor> const& exact, int64_t b0, int64_t b1)
{
    checkFloat2d(weight, "weight");
    checkFloat2d(lut, "lut");
    Sweep c{weight.size(0), weight.size(1), lut.size(1)};
    checkRows(lut, c.rows, c.levels, "lut");
    checkIndices(indices, c.rows, c.k);
    checkHessians(c.rows, c.k, hessians, group, exact);
    TORCH_CHECK(0 <= b0 && b0 < b1 && b1 <= c.k, "lnq: column block [", b0, ", ", b1, ") is outside [0, ", c.k, ")");
    return c;
}

// One lazy block [b0, b1) of coordinate descent (lnq.coordinate_descent's inner loop). Updates e
// [R, K] and indices [R, K] in place, and r_block [R, b1 - b0] (the block's part of r = e H).
void coordinateDescentBlock(torch::Tensor const& weight, torch::Tensor const& lut, torch::Tensor& e, torch::Tensor& rBlock,
    torch::Tensor& indices, std::optional<torch::Tensor> const& exact, torch::Tensor const& hessians, torch::Tensor const& group,
    int64_t b0, int64_t b1)
{
    Sweep const c = checkSweep(weight, lut, indices, hessians, group, exact, b0, b1);
    int64_t const width = b1 - b0;
    checkFloat2d(e, "e");
    checkRows(e, c.rows, c.k, "e");
    checkFloat2d(rBlock, "r_block");
    checkRows(rBlock, c.rows, width, "r_block");

    float const* w = weight.data_ptr<float>();
    float const* l = lut.data_ptr<float>();
    float* ep = e.data_ptr<float>();
    float* rp = rBlock.data_ptr<float>();
    int64_t* ip = indices.data_ptr<int64_t>();
    bool const* xp = exact.has_value() ? exact->data_ptr<bool>() : nullptr;
    float const* hp = hessians.data_ptr<float>();
    int64_t const* gp = group.data_ptr<int64_t>();
    int64_t const k = c.k;
    int64_t const levels = c.levels;

    at::parallel_for(0, c.rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
        {
            float const* h = hp + gp[n] * k * k;
            float const* lutRow = l + n * levels;
            float* r = rp + n * width;
            for (int64_t j = b0; j < b1; ++j)
            {
                int64_t const jj = j - b0;
                if (xp != nullptr && xp[n * k + j])
                {
                    continue; // an exact entry keeps its index and carries no error
                }
                float const wj = w[n * k + j];
                float const ej = ep[n * k + j];
                float const twiceR = 2.0f * r[jj];
                float const hjj = h[j * k + j];
                int64_t best = 0;
                float bestGain = 0.0f;
                float bestD = 0.0f;
                for (int64_t level = 0; level < levels; ++level)
                {
                    float const t = wj - lutRow[level];
                    float const d = t - ej;
                    float const hd = hjj * d;
                    float const s = twiceR + hd;
                    float const gain = d * s;
                    if (level == 0 || gain < bestGain || (std::isnan(gain) && !std::isnan(bestGain)))
                    {
                        best = level;
                        bestGain = gain;
                        bestD = d;
                    }
                }
                ip[n * k + j] = best;
                ep[n * k + j] = ej + bestD;
                float const* hRow = h + j * k;
                for (int64_t jj2 = jj; jj2 < width; ++jj2)
                {
                    float const update = bestD * hRow[b0 + jj2];
                    r[jj2] = r[jj2] + update;
                }
            }
        }
    });
}

// One lazy block [b0, b1) of the GPTQ sweep (lnq.gptq_sweep's inner loop) on the fed-back weights w
// [R, K], updated in place (the block's columns end as the reconstruction). Writes indices [R, K] of
// the block's columns; returns the block's scaled errors [R, b1 - b0] for the caller's lazy update.
torch::Tensor gptqBlock(torch::Tensor const& weight, torch::Tensor const& lut, torch::Tensor& w, torch::Tensor& indices,
    std::optional<torch::Tensor> const& exact, torch::Tensor const& chol, torch::Tensor const& group, int64_t b0, int64_t b1,
    bool exactTakesFeedback)
{
    Sweep const c = checkSweep(weight, lut, indices, chol, group, exact, b0, b1);
    int64_t const width = b1 - b0;
    checkFloat2d(w, "w");
    checkRows(w, c.rows, c.k, "w");
    torch::Tensor errBlock = torch::zeros({c.rows, width}, weight.options());

    float const* original = weight.data_ptr<float>();
    float const* l = lut.data_ptr<float>();
    float* wp = w.data_ptr<float>();
    int64_t* ip = indices.data_ptr<int64_t>();
    bool const* xp = exact.has_value() ? exact->data_ptr<bool>() : nullptr;
    float const* cp = chol.data_ptr<float>();
    int64_t const* gp = group.data_ptr<int64_t>();
    float* errp = errBlock.data_ptr<float>();
    int64_t const k = c.k;
    int64_t const levels = c.levels;

    at::parallel_for(0, c.rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
        {
            float const* u = cp + gp[n] * k * k;
            float const* lutRow = l + n * levels;
            float* row = wp + n * k;
            for (int64_t j = b0; j < b1; ++j)
            {
                float const column = row[j];
                int64_t index = 0;
                float bestDistance = 0.0f;
                for (int64_t level = 0; level < levels; ++level)
                {
                    float const distance = std::fabs(column - lutRow[level]);
                    if (level == 0 || distance < bestDistance || (std::isnan(distance) && !std::isnan(bestDistance)))
                    {
                        index = level;
                        bestDistance = distance;
                    }
                }
                float quantized = lutRow[index];
                if (xp != nullptr && xp[n * k + j])
                {
                    quantized = exactTakesFeedback ? column : original[n * k + j];
                }
                ip[n * k + j] = index;
                float const err = (column - quantized) / u[j * k + j];
                float const* uRow = u + j * k;
                for (int64_t j2 = j; j2 < b1; ++j2)
                {
                    float const update = err * uRow[j2];
                    row[j2] = row[j2] - update;
                }
                row[j] = quantized;
                errp[n * width + (j - b0)] = err;
            }
        }
    });
    return errBlock;
}

// dst[0, n) += src[0, n): the refit's inner loop, compiled for the widest vector ISA the CPU has.
__attribute__((target_clones("avx512f", "avx2", "default"))) void addRow(float* dst, float const* src, int64_t n)
{
    for (int64_t i = 0; i < n; ++i)
    {
        dst[i] += src[i];
    }
}

// The normal equations of every row's LUT refit (lnq.solve_luts) for fixed indices: gram [R, C, C]
// = P^T H P and rhs [R, C] = target^T H P (fp64), P the one-hot of the free entries' indices. P is
// one-hot, so H P is H's rows summed per level, K^2 additions per row instead of the K^2 C
// multiply-adds of a dense product with P. The sums differ from that product's in rounding only.
std::vector<torch::Tensor> normalEquations(torch::Tensor const& target, torch::Tensor const& indices,
    std::optional<torch::Tensor> const& exact, torch::Tensor const& hessians, torch::Tensor const& group, int64_t levels)
{
    checkFloat2d(target, "target");
    int64_t const rows = target.size(0);
    int64_t const k = target.size(1);
    TORCH_CHECK(levels >= 1 && levels <= 256, "lnq: levels must be in [1, 256], got ", levels);
    checkIndices(indices, rows, k);
    TORCH_CHECK(indices.numel() == 0 || (indices.min().item<int64_t>() >= 0 && indices.max().item<int64_t>() < levels),
        "lnq: indices must be in [0, ", levels, ")");
    checkHessians(rows, k, hessians, group, exact);
    auto const f64 = target.options().dtype(torch::kFloat64);
    torch::Tensor gram = torch::zeros({rows, levels, levels}, f64);
    torch::Tensor rhs = torch::zeros({rows, levels}, f64);

    float const* tp = target.data_ptr<float>();
    int64_t const* ip = indices.data_ptr<int64_t>();
    bool const* xp = exact.has_value() ? exact->data_ptr<bool>() : nullptr;
    float const* hp = hessians.data_ptr<float>();
    int64_t const* gp = group.data_ptr<int64_t>();
    double* gramp = gram.data_ptr<double>();
    double* rhsp = rhs.data_ptr<double>();

    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> sums(static_cast<size_t>(levels * k)); // [C, K]: (P^T H) of one row
        for (int64_t n = begin; n < end; ++n)
        {
            float const* h = hp + gp[n] * k * k;
            int64_t const* idx = ip + n * k;
            bool const* ex = xp != nullptr ? xp + n * k : nullptr;
            std::fill(sums.begin(), sums.end(), 0.0f);
            for (int64_t j = 0; j < k; ++j)
            {
                if (ex == nullptr || !ex[j])
                {
                    addRow(sums.data() + idx[j] * k, h + j * k, k);
                }
            }
            double* gr = gramp + n * levels * levels;
            double* rh = rhsp + n * levels;
            float const* t = tp + n * k;
            for (int64_t a = 0; a < levels; ++a)
            {
                float const* s = sums.data() + a * k;
                double dot = 0.0;
                for (int64_t l = 0; l < k; ++l)
                {
                    dot += static_cast<double>(s[l]) * static_cast<double>(t[l]);
                    if (ex == nullptr || !ex[l])
                    {
                        gr[a * levels + idx[l]] += static_cast<double>(s[l]);
                    }
                }
                rh[a] = dot;
            }
        }
    });
    return {gram, rhs};
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("coordinate_descent_block", &coordinateDescentBlock, "LNQ coordinate descent over one lazy block of columns (in place)");
    m.def("gptq_block", &gptqBlock, "GPTQ error feedback over one lazy block of columns (in place); returns the block's errors");
    m.def("normal_equations", &normalEquations, "P^T H P and target^T H P of every row's LUT refit (fp64)");
}
