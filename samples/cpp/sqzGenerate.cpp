/*
 * sqzGenerate: greedy generation from a sqz-export engine with the SqzLinear plugin, in plain C++.
 *
 *   sqzGenerate model.engine libsqz_trt_plugin.so [--tokens 1,2,3] [--steps 8]
 *
 * What an embedding runtime does, in order:
 *   1. create the TensorRT runtime (this loads libnvinfer), then dlopen the plugin library: it finds
 *      the loaded libnvinfer and registers sqz::SqzLinear v1 itself (no link to the plugin needed);
 *   2. deserialize the engine and open two execution contexts: profile 1 = prefill, profile 0 = decode
 *      (the order `sqz-export build` adds them);
 *   3. prefill the prompt with an empty KV cache; then decode one token at a time, feeding each step's
 *      present.N.key/value device buffers back as the next step's past_key_values.N.key/value.
 * Prints the generated token ids (decode them with the tokenizer saved next to the ONNX model).
 */
#include "NvInferRuntime.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace
{

constexpr int32_t kDECODE_PROFILE = 0;
constexpr int32_t kPREFILL_PROFILE = 1;

class Logger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::cerr << "[TensorRT] " << msg << std::endl;
        }
    }
};

void check(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
    }
}

void check(bool ok, std::string const& what)
{
    if (!ok)
    {
        throw std::runtime_error(what);
    }
}

//! One device allocation (at least 256 bytes, so empty tensors still get a valid address).
class DeviceBuffer
{
public:
    explicit DeviceBuffer(size_t bytes)
    {
        check(cudaMalloc(&mData, bytes < 256 ? 256 : bytes), "cudaMalloc");
    }
    ~DeviceBuffer()
    {
        cudaFree(mData);
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
    void* get() const
    {
        return mData;
    }

private:
    void* mData{nullptr};
};

size_t elementSize(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kINT32: return 4;
    default: throw std::runtime_error("unexpected tensor type in the engine");
    }
}

int64_t volume(nvinfer1::Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        v *= d.d[i];
    }
    return v;
}

nvinfer1::Dims dims(std::vector<int64_t> const& extents)
{
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(extents.size());
    for (size_t i = 0; i < extents.size(); ++i)
    {
        d.d[i] = extents[i];
    }
    return d;
}

float toFloat(uint16_t bits, nvinfer1::DataType type)
{
    uint32_t word;
    if (type == nvinfer1::DataType::kBF16)
    {
        word = static_cast<uint32_t>(bits) << 16;
    }
    else // IEEE half -> float
    {
        uint32_t const sign = (bits & 0x8000u) << 16;
        uint32_t exponent = (bits >> 10) & 0x1Fu;
        uint32_t mantissa = bits & 0x3FFu;
        if (exponent == 0x1Fu)
        {
            word = sign | 0x7F800000u | (mantissa << 13);
        }
        else if (exponent != 0)
        {
            word = sign | ((exponent + 112) << 23) | (mantissa << 13);
        }
        else if (mantissa == 0)
        {
            word = sign;
        }
        else // subnormal: normalize
        {
            exponent = 113;
            while ((mantissa & 0x400u) == 0)
            {
                mantissa <<= 1;
                --exponent;
            }
            word = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
        }
    }
    float value;
    std::memcpy(&value, &word, sizeof(value));
    return value;
}

struct Options
{
    std::string engine;
    std::string plugin;
    std::vector<int64_t> prompt{1};
    int32_t steps{8};
};

Options parse(int argc, char** argv)
{
    if (argc < 3)
    {
        throw std::runtime_error("usage: sqzGenerate model.engine libsqz_trt_plugin.so [--tokens 1,2,3] [--steps 8]");
    }
    Options o;
    o.engine = argv[1];
    o.plugin = argv[2];
    for (int i = 3; i + 1 < argc; i += 2)
    {
        std::string const flag = argv[i];
        if (flag == "--tokens")
        {
            o.prompt.clear();
            std::stringstream list(argv[i + 1]);
            for (std::string item; std::getline(list, item, ',');)
            {
                o.prompt.push_back(std::stoll(item));
            }
        }
        else if (flag == "--steps")
        {
            o.steps = std::stoi(argv[i + 1]);
        }
        else
        {
            throw std::runtime_error("unknown option " + flag);
        }
    }
    check(!o.prompt.empty() && o.steps >= 0, "--tokens needs at least one id and --steps must be >= 0");
    return o;
}

//! The decoder engine's tensors, grouped the way generation uses them.
struct Signature
{
    std::vector<std::string> past;    //!< past_key_values.N.key/value
    std::vector<std::string> present; //!< present.N.key/value, same order
    bool hasPositionIds{false};
    nvinfer1::DataType logitsType{nvinfer1::DataType::kHALF};
    nvinfer1::DataType cacheType{nvinfer1::DataType::kHALF};
    int64_t kvHeads{0};
    int64_t headDim{0};
};

Signature inspect(nvinfer1::ICudaEngine const& engine)
{
    Signature s;
    for (int32_t i = 0; i < engine.getNbIOTensors(); ++i)
    {
        std::string const name = engine.getIOTensorName(i);
        if (name.rfind("past_key_values.", 0) == 0)
        {
            s.past.push_back(name);
            s.present.push_back("present." + name.substr(std::strlen("past_key_values.")));
            nvinfer1::Dims const d = engine.getTensorShape(name.c_str()); // [batch, heads, past, head_dim]
            s.kvHeads = d.d[1];
            s.headDim = d.d[3];
            s.cacheType = engine.getTensorDataType(name.c_str());
        }
        s.hasPositionIds = s.hasPositionIds || name == "position_ids";
    }
    check(!s.past.empty(), "the engine has no past_key_values inputs: build it from a decoder-with-past ONNX");
    s.logitsType = engine.getTensorDataType("logits");
    return s;
}

class Generator
{
public:
    Generator(nvinfer1::ICudaEngine& engine, Signature const& signature, cudaStream_t stream)
        : mSig(signature)
        , mStream(stream)
    {
        mPrefill.reset(engine.createExecutionContext());
        mDecode.reset(engine.createExecutionContext());
        check(mPrefill && mDecode, "could not create execution contexts");
        check(engine.getNbOptimizationProfiles() == 2, "expected the decode and prefill profiles of `sqz-export build`");
        check(mPrefill->setOptimizationProfileAsync(kPREFILL_PROFILE, stream), "select the prefill profile");
        check(mDecode->setOptimizationProfileAsync(kDECODE_PROFILE, stream), "select the decode profile");
    }

    //! Runs `tokens` after a cache of `mPast` tokens; returns the greedy next token.
    int64_t step(std::vector<int64_t> const& tokens)
    {
        nvinfer1::IExecutionContext& ctx = mPast == 0 ? *mPrefill : *mDecode;
        int64_t const seq = static_cast<int64_t>(tokens.size());
        std::vector<int64_t> mask(static_cast<size_t>(mPast + seq), 1);
        std::vector<int64_t> positions;
        for (int64_t i = 0; i < seq; ++i)
        {
            positions.push_back(mPast + i);
        }
        std::vector<std::unique_ptr<DeviceBuffer>> keep;
        auto upload = [&](char const* name, std::vector<int64_t> const& host, std::vector<int64_t> const& shape) {
            keep.push_back(std::make_unique<DeviceBuffer>(host.size() * sizeof(int64_t)));
            check(cudaMemcpyAsync(keep.back()->get(), host.data(), host.size() * sizeof(int64_t), cudaMemcpyHostToDevice,
                      mStream),
                "upload");
            check(ctx.setInputShape(name, dims(shape)) && ctx.setTensorAddress(name, keep.back()->get()),
                std::string("bind ") + name);
        };
        upload("input_ids", tokens, {1, seq});
        upload("attention_mask", mask, {1, mPast + seq});
        if (mSig.hasPositionIds)
        {
            upload("position_ids", positions, {1, seq});
        }
        for (size_t i = 0; i < mSig.past.size(); ++i)
        {
            if (mCache.size() < mSig.past.size()) // prefill: an empty cache still needs a valid address
            {
                mCache.push_back(std::make_unique<DeviceBuffer>(0));
            }
            check(ctx.setInputShape(mSig.past[i].c_str(), dims({1, mSig.kvHeads, mPast, mSig.headDim}))
                    && ctx.setTensorAddress(mSig.past[i].c_str(), mCache[i]->get()),
                "bind " + mSig.past[i]);
        }
        // Outputs: logits [1, seq, vocab] and the grown cache [1, heads, past + seq, head_dim].
        nvinfer1::Dims const logitsShape = ctx.getTensorShape("logits");
        DeviceBuffer logits(static_cast<size_t>(volume(logitsShape)) * elementSize(mSig.logitsType));
        check(ctx.setTensorAddress("logits", logits.get()), "bind logits");
        std::vector<std::unique_ptr<DeviceBuffer>> present;
        for (auto const& name : mSig.present)
        {
            size_t const bytes
                = static_cast<size_t>(volume(ctx.getTensorShape(name.c_str()))) * elementSize(mSig.cacheType);
            present.push_back(std::make_unique<DeviceBuffer>(bytes));
            check(ctx.setTensorAddress(name.c_str(), present.back()->get()), "bind " + name);
        }
        check(ctx.enqueueV3(mStream), "enqueueV3");

        // Greedy: argmax over the last position's logits.
        int64_t const vocab = logitsShape.d[logitsShape.nbDims - 1];
        size_t const width = elementSize(mSig.logitsType);
        std::vector<uint8_t> last(static_cast<size_t>(vocab) * width);
        auto const* lastRow = static_cast<uint8_t const*>(logits.get()) + static_cast<size_t>((seq - 1) * vocab) * width;
        check(cudaMemcpyAsync(last.data(), lastRow, last.size(), cudaMemcpyDeviceToHost, mStream), "download logits");
        check(cudaStreamSynchronize(mStream), "synchronize");
        int64_t best = 0;
        float bestValue = -1e30F;
        for (int64_t v = 0; v < vocab; ++v)
        {
            float value;
            if (width == 4)
            {
                std::memcpy(&value, &last[static_cast<size_t>(v) * 4], 4);
            }
            else
            {
                uint16_t bits;
                std::memcpy(&bits, &last[static_cast<size_t>(v) * 2], 2);
                value = toFloat(bits, mSig.logitsType);
            }
            if (value > bestValue)
            {
                bestValue = value;
                best = v;
            }
        }
        mCache = std::move(present); // this step's present is the next step's past
        mPast += seq;
        return best;
    }

private:
    Signature mSig;
    cudaStream_t mStream;
    std::unique_ptr<nvinfer1::IExecutionContext> mPrefill;
    std::unique_ptr<nvinfer1::IExecutionContext> mDecode;
    std::vector<std::unique_ptr<DeviceBuffer>> mCache;
    int64_t mPast{0};
};

std::vector<char> readFile(std::string const& path)
{
    std::ifstream file(path, std::ios::binary);
    check(static_cast<bool>(file), path + ": cannot open");
    return std::vector<char>(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

} // namespace

int main(int argc, char** argv)
{
    try
    {
        Options const options = parse(argc, argv);
        Logger logger;
        std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
        check(runtime != nullptr, "could not create the TensorRT runtime");
        // libnvinfer is loaded now, so the plugin library registers its creators as it loads.
        void* plugin = dlopen(options.plugin.c_str(), RTLD_NOW | RTLD_LOCAL);
        check(plugin != nullptr, std::string("dlopen ") + options.plugin + ": " + (plugin ? "" : dlerror()));
        check(runtime->getPluginRegistry().getCreator("SqzLinear", "1", "sqz") != nullptr,
            options.plugin + " did not register sqz::SqzLinear version 1");

        std::vector<char> const blob = readFile(options.engine);
        std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
        check(engine != nullptr, options.engine + ": could not deserialize the engine (see the TensorRT errors above)");
        Signature const signature = inspect(*engine);

        cudaStream_t stream;
        check(cudaStreamCreate(&stream), "cudaStreamCreate");
        {
            Generator generator(*engine, signature, stream);
            std::vector<int64_t> generated{generator.step(options.prompt)};
            for (int32_t i = 1; i < options.steps; ++i)
            {
                generated.push_back(generator.step({generated.back()}));
            }
            std::cout << "prompt:";
            for (int64_t id : options.prompt)
            {
                std::cout << ' ' << id;
            }
            std::cout << "\ngenerated:";
            for (int64_t id : generated)
            {
                std::cout << ' ' << id;
            }
            std::cout << std::endl;
        }
        cudaStreamDestroy(stream);
        return 0;
    }
    catch (std::exception const& e)
    {
        std::cerr << "sqzGenerate: " << e.what() << std::endl;
        return 1;
    }
}
