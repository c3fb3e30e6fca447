/*
 * Memory-bounds test of the GEMV kernel's lane code (sqzGemvLane.cuh), run on the host through
 * sqzGemvEmulate: every buffer is allocated at its exact size (16-byte aligned, so the 128-bit paths
 * run), and the test is meant to be built with -fsanitize=address,undefined (tests/test_kernels.py
 * does), so any read past a row, a tensor or the CSR arrays aborts with a report. The numerical
 * checks live in the Python tests; this one exists because a stray read gives right results on the
 * host and a fault (or silent garbage) on the GPU. No GPU needed.
 */
#include "sqzFormat.h"
#include "sqzGemvEmulate.h"
#include "sqzLinear.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

namespace
{

//! An exact-size, 16-byte aligned heap buffer (posix_memalign keeps the size exact for the sanitizer).
class Buffer
{
public:
    explicit Buffer(size_t bytes)
    {
        if (bytes == 0 || posix_memalign(&mData, 16, bytes) != 0)
        {
            mData = nullptr;
        }
        mBytes = bytes;
    }
    ~Buffer()
    {
        std::free(mData);
    }
    Buffer(Buffer const&) = delete;
    Buffer& operator=(Buffer const&) = delete;

    template <typename U>
    U* as() const
    {
        return static_cast<U*>(mData);
    }
    size_t bytes() const
    {
        return mBytes;
    }

private:
    void* mData{nullptr};
    size_t mBytes{0};
};

int runCase(int32_t k, int32_t n, int32_t m, int32_t bits, bool bf16, bool sparse, bool forceScalar, std::mt19937& rng)
{
    int64_t const words = sqz::format::packedWords(k, bits);
    Buffer x(static_cast<size_t>(m) * k * 2);
    Buffer qweight(static_cast<size_t>(n * words) * 4);
    Buffer lut(static_cast<size_t>(n) << bits << 1);
    Buffer y(static_cast<size_t>(m) * n * 2);
    // Random bytes everywhere: every bit pattern is a valid index; fp16/bf16 bit patterns may be
    // NaN or Inf, which the bounds check does not mind.
    for (Buffer const* b : {&x, &qweight, &lut})
    {
        for (size_t i = 0; i < b->bytes(); ++i)
        {
            b->as<unsigned char>()[i] = static_cast<unsigned char>(rng());
        }
    }
    // Indices past K (the last group's padding) are random here too: the lane code decodes them but
    // must read no x for them.
    int32_t const nnzPerRow = sparse ? (k < 3 ? k : 3) : 0;
    int32_t const nnz = n * nnzPerRow;
    Buffer rowPtr(static_cast<size_t>(n + 1) * 4);
    Buffer col(static_cast<size_t>(nnz > 0 ? nnz : 1) * 4);
    Buffer val(static_cast<size_t>(nnz > 0 ? nnz : 1) * 2);
    for (int32_t r = 0; r <= n; ++r)
    {
        rowPtr.as<int32_t>()[r] = r * nnzPerRow;
    }
    for (int32_t j = 0; j < nnz; ++j)
    {
        int32_t const slot = j % nnzPerRow;
        col.as<int32_t>()[j] = slot == 0 ? 0 : (slot == 1 ? k - 1 : k / 2); // both ends of the row
        val.as<uint16_t>()[j] = 0x3C00u;                                        // 1.0 in fp16
    }
    sqz::SqzLinearShape const shape{m, k, n, bits, nnz, 32, bf16 ? sqz::DataType::kBF16 : sqz::DataType::kHALF};
    sqz::SqzLinearArgs args{};
    args.x = x.as<void>();
    args.qweight = qweight.as<int32_t>();
    args.lut = lut.as<void>();
    args.rowPtr = nnz > 0 ? rowPtr.as<int32_t>() : nullptr;
    args.col = nnz > 0 ? col.as<int32_t>() : nullptr;
    args.val = nnz > 0 ? val.as<void>() : nullptr;
    args.y = y.as<void>();
    if (char const* error = sqz::sqzGemvEmulate(shape, args, forceScalar, forceScalar))
    {
        std::fprintf(stderr, "FAILED: K=%d N=%d M=%d bits=%d: %s\n", k, n, m, bits, error);
        return 1;
    }
    return 0;
}

} // namespace

int main()
{
    // (K, N): K tails of every kind, 3-bit rows with and without 16-byte alignment, a partial second
    // lane step (K = 4224), odd N (a warp pair with one row past N).
    int32_t const shapes[][2] = {{1, 1}, {45, 7}, {100, 33}, {256, 40}, {520, 65}, {4224, 9}};
    int32_t const ms[] = {1, 3, 5, 17};
    int32_t const bitsList[] = {2, 3, 4, 8};
    std::mt19937 rng(7);
    int failures = 0;
    int cases = 0;
    for (auto const& shape : shapes)
    {
        for (int32_t m : ms)
        {
            for (int32_t bits : bitsList)
            {
                for (int variant = 0; variant < 4; ++variant)
                {
                    bool const sparse = (variant & 1) != 0;
                    bool const forceScalar = (variant & 2) != 0;
                    failures += runCase(shape[0], shape[1], m, bits, variant == 1, sparse, forceScalar, rng);
                    ++cases;
                }
            }
        }
    }
    if (failures != 0)
    {
        std::fprintf(stderr, "%d of %d cases failed\n", failures, cases);
        return 1;
    }
    std::printf("all %d cases stayed in bounds\n", cases);
    return 0;
}
