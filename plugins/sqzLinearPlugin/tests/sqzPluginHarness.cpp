/*
 * Harness for libsqz_trt_plugin.so that needs neither libnvinfer nor a GPU: it plays TensorRT's
 * part (IPluginRegistry::loadLibrary, the builder's calls, engine serialization/deserialization)
 * on the plugin's CPU-only paths, through the library's exported entry points.
 *
 * Usage: sqzPluginHarness /path/to/libsqz_trt_plugin.so      (exit status = number of failed checks)
 */
#include "sqzTestCheck.h"
#include "NvInferRuntime.h"

#include <cstring>
#include <deque>
#include <dlfcn.h>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{


//! Stand-in for TensorRT's logger: records messages so checks can assert what the plugin reported.
class RecordingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            errors.emplace_back(msg);
        }
    }

    //! True if an error since the last call mentions every fragment; clears the record.
    bool reported(std::vector<std::string> const& fragments)
    {
        bool found = false;
        for (auto const& e : errors)
        {
            bool all = true;
            for (auto const& f : fragments)
            {
                all = all && e.find(f) != std::string::npos;
            }
            found = found || all;
        }
        if (!found)
        {
            std::cerr << "  logged errors were:" << std::endl;
            for (auto const& e : errors)
            {
                std::cerr << "    " << e << std::endl;
            }
        }
        errors.clear();
        return found;
    }

    std::vector<std::string> errors;
};

class LoggerFinder : public ILoggerFinder
{
public:
    explicit LoggerFinder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};

//! Minimal IExprBuilder: constants only, as getOutputShapes of SqzLinear needs (the builder's own is internal).
class ConstantDimImpl : public apiv::VDimensionExpr
{
public:
    ConstantDimImpl(bool constant, int64_t value)
        : mConstant(constant)
        , mValue(value)
    {
    }
    bool isConstant() const override
    {
        return mConstant;
    }
    int64_t getConstantValue() const override
    {
        return mConstant ? mValue : -1;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    bool mConstant;
    int64_t mValue;
};

class HarnessDim : public IDimensionExpr
{
public:
    explicit HarnessDim(apiv::VDimensionExpr* impl)
    {
        mImpl = impl;
    }
    ~HarnessDim() noexcept override = default;
};

class HarnessExprBuilder : public IExprBuilder
{
public:
    class Impl : public apiv::VExprBuilder
    {
    public:
        explicit Impl(HarnessExprBuilder& owner)
            : mOwner(owner)
        {
        }
        IDimensionExpr const* constant(int64_t value) override
        {
            return mOwner.make(true, value);
        }
        IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
        {
            return nullptr; // SqzLinear's shape rule needs no arithmetic
        }
        IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
        {
            return nullptr;
        }

    private:
        HarnessExprBuilder& mOwner;
    };

    HarnessExprBuilder()
        : mBuilderImpl(*this)
    {
        mImpl = &mBuilderImpl;
    }
    ~HarnessExprBuilder() noexcept override = default;

    IDimensionExpr const* make(bool constant, int64_t value)
    {
        mDimImpls.emplace_back(constant, value);
        mDims.emplace_back(&mDimImpls.back());
        return &mDims.back();
    }

    DimsExprs dims(std::vector<int64_t> const& extents) // -1 = a dynamic extent
    {
        DimsExprs out{};
        out.nbDims = static_cast<int32_t>(extents.size());
        for (size_t i = 0; i < extents.size(); ++i)
        {
            out.d[i] = make(extents[i] >= 0, extents[i]);
        }
        return out;
    }

private:
    Impl mBuilderImpl;
    std::deque<ConstantDimImpl> mDimImpls;
    std::deque<HarnessDim> mDims;
};

Dims makeDims(std::vector<int64_t> const& extents)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(extents.size());
    for (size_t i = 0; i < extents.size(); ++i)
    {
        d.d[i] = extents[i];
    }
    return d;
}

DynamicPluginTensorDesc desc(DataType type, std::vector<int64_t> const& dims, std::vector<int64_t> const& maxDims)
{
    DynamicPluginTensorDesc out{};
    out.desc.type = type;
    out.desc.format = TensorFormat::kLINEAR;
    out.desc.dims = makeDims(dims);
    out.min = makeDims(maxDims);
    out.opt = makeDims(maxDims);
    out.max = makeDims(maxDims);
    return out;
}

struct Attrs
{
    int32_t bits{3}, k{100}, n{48}, layout{2}, chunk{32};
    std::vector<PluginField> fields() const
    {
        return {PluginField("bits", &bits, PluginFieldType::kINT32, 1),
            PluginField("in_features", &k, PluginFieldType::kINT32, 1),
            PluginField("out_features", &n, PluginFieldType::kINT32, 1),
            PluginField("layout", &layout, PluginFieldType::kINT32, 1),
            PluginField("chunk_nnz", &chunk, PluginFieldType::kINT32, 1)};
    }
};

IPluginV3* create(IPluginCreatorV3One& creator, std::vector<PluginField> const& fields, TensorRTPhase phase)
{
    PluginFieldCollection fc{};
    fc.nbFields = static_cast<int32_t>(fields.size());
    fc.fields = fields.data();
    return creator.createPlugin("layers.0.mlp.down_proj", &fc, phase);
}

std::vector<int32_t> intValues(PluginFieldCollection const& fc)
{
    std::vector<int32_t> values;
    for (int32_t i = 0; i < fc.nbFields; ++i)
    {
        EXPECT(fc.fields[i].type == PluginFieldType::kINT32 && fc.fields[i].length == 1);
        values.push_back(*static_cast<int32_t const*>(fc.fields[i].data));
    }
    return values;
}

void checkBuildPhase(IPluginCreatorV3One& creator, RecordingLogger& logger)
{
    Attrs const a;
    std::unique_ptr<IPluginV3> plugin(create(creator, a.fields(), TensorRTPhase::kBUILD));
    EXPECT(plugin != nullptr);
    if (!plugin)
    {
        return;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    EXPECT(core && build && runtime);
    EXPECT(std::strcmp(core->getPluginName(), "SqzLinear") == 0);
    EXPECT(std::strcmp(core->getPluginVersion(), "1") == 0);
    EXPECT(std::strcmp(core->getPluginNamespace(), "sqz") == 0);
    EXPECT(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0);
    EXPECT(build->getNbOutputs() == 1);

    // Output type follows x; fp32 x is refused with a message.
    for (DataType x : {DataType::kHALF, DataType::kBF16})
    {
        DataType in[3] = {x, DataType::kINT32, DataType::kHALF};
        DataType out[1] = {DataType::kFLOAT};
        EXPECT(build->getOutputDataTypes(out, 1, in, 3) == 0 && out[0] == x);
    }
    DataType badIn[3] = {DataType::kFLOAT, DataType::kINT32, DataType::kHALF};
    DataType out[1];
    EXPECT(build->getOutputDataTypes(out, 1, badIn, 3) != 0);
    EXPECT(logger.reported({"input 0 (x)", "fp32", "fp16 or bf16"}));

    // Output shapes: [b, s, K] -> [b, s, N]; a wrong qweight is refused at build time.
    HarnessExprBuilder exprs;
    DimsExprs inputs[3] = {exprs.dims({-1, -1, 100}), exprs.dims({48, 12}), exprs.dims({48, 8})};
    DimsExprs outputs[1]{};
    EXPECT(build->getOutputShapes(inputs, 3, nullptr, 0, outputs, 1, exprs) == 0);
    EXPECT(outputs[0].nbDims == 3);
    EXPECT(outputs[0].d[0] == inputs[0].d[0] && outputs[0].d[1] == inputs[0].d[1]);
    EXPECT(outputs[0].d[2]->isConstant() && outputs[0].d[2]->getConstantValue() == 48);
    inputs[1] = exprs.dims({48, 16});
    EXPECT(build->getOutputShapes(inputs, 3, nullptr, 0, outputs, 1, exprs) != 0);
    EXPECT(logger.reported({"input 1 (qweight)", "[48, 16]", "[48, 12]"}));

    // Formats: linear only; the documented type per position.
    std::vector<DynamicPluginTensorDesc> io{desc(DataType::kHALF, {-1, 100}, {64, 100}),
        desc(DataType::kINT32, {48, 12}, {48, 12}), desc(DataType::kHALF, {48, 8}, {48, 8}),
        desc(DataType::kHALF, {-1, 48}, {64, 48})};
    for (int32_t pos = 0; pos < 4; ++pos)
    {
        EXPECT(build->supportsFormatCombination(pos, io.data(), 3, 1));
    }
    io[3].desc.type = DataType::kBF16; // output must match x
    EXPECT(!build->supportsFormatCombination(3, io.data(), 3, 1));
    io[3].desc.type = DataType::kHALF;
    io[1].desc.type = DataType::kFLOAT;
    EXPECT(!build->supportsFormatCombination(1, io.data(), 3, 1));
    io[1].desc.type = DataType::kINT32;
    io[0].desc.format = TensorFormat::kCHW32;
    EXPECT(!build->supportsFormatCombination(0, io.data(), 3, 1));
    io[0].desc.format = TensorFormat::kLINEAR;

    EXPECT(build->configurePlugin(io.data(), 3, &io[3], 1) == 0);
    (void) build->getWorkspaceSize(io.data(), 3, &io[3], 1); // must not fault without a GPU
    io[2].desc.dims = makeDims({48, 16}); // a 4-bit LUT for a 3-bit layer
    EXPECT(build->configurePlugin(io.data(), 3, &io[3], 1) != 0);
    EXPECT(logger.reported({"input 2 (lut)", "[48, 8]"}));
    io[2].desc.dims = makeDims({48, 8});

    // The sparse variant: 7 inputs, nnz = 70, chunk_nnz = 32 -> 3 chunks.
    std::vector<DynamicPluginTensorDesc> sp{io[0], io[1], io[2], desc(DataType::kINT32, {49}, {49}),
        desc(DataType::kINT32, {70}, {70}), desc(DataType::kHALF, {70}, {70}), desc(DataType::kINT32, {3}, {3}),
        io[3]};
    for (int32_t pos = 0; pos < 8; ++pos)
    {
        EXPECT(build->supportsFormatCombination(pos, sp.data(), 7, 1));
    }
    EXPECT(build->configurePlugin(sp.data(), 7, &sp[7], 1) == 0);
    sp[6].desc.dims = makeDims({2});
    EXPECT(build->configurePlugin(sp.data(), 7, &sp[7], 1) != 0);
    EXPECT(logger.reported({"input 6 (chunk_row)", "[3]"}));
    EXPECT(build->configurePlugin(sp.data(), 5, &sp[7], 1) != 0);
    EXPECT(logger.reported({"3 inputs", "got 5"}));

    // Runtime shape check with concrete dims.
    PluginTensorDesc rt[4];
    for (int32_t i = 0; i < 4; ++i)
    {
        rt[i] = io[i].desc;
    }
    rt[0].dims = makeDims({2, 7, 100});
    rt[3].dims = makeDims({2, 7, 48});
    EXPECT(runtime->onShapeChange(rt, 3, &rt[3], 1) == 0);
    rt[0].dims = makeDims({2, 7, 64});
    EXPECT(runtime->onShapeChange(rt, 3, &rt[3], 1) != 0);
    EXPECT(logger.reported({"input 0 (x)", "in_features=100"}));
}

void checkCreator(IPluginCreatorV3One& creator, RecordingLogger& logger)
{
    EXPECT(std::strcmp(creator.getPluginName(), "SqzLinear") == 0);
    EXPECT(std::strcmp(creator.getPluginVersion(), "1") == 0);
    EXPECT(std::strcmp(creator.getPluginNamespace(), "sqz") == 0);

    PluginFieldCollection const* names = creator.getFieldNames();
    EXPECT(names != nullptr && names->nbFields == 5);
    char const* expected[] = {"bits", "in_features", "out_features", "layout", "chunk_nnz"};
    for (int32_t i = 0; names && i < names->nbFields && i < 5; ++i)
    {
        EXPECT(std::strcmp(names->fields[i].name, expected[i]) == 0);
        EXPECT(names->fields[i].type == PluginFieldType::kINT32);
    }

    // Bad attributes: no plugin, and the logger says which attribute and why.
    Attrs bad;
    bad.bits = 5;
    EXPECT(create(creator, bad.fields(), TensorRTPhase::kBUILD) == nullptr);
    EXPECT(logger.reported({"layers.0.mlp.down_proj", "bits=5", "2, 3, 4, 8"}));
    bad = Attrs{};
    bad.layout = 1;
    EXPECT(create(creator, bad.fields(), TensorRTPhase::kBUILD) == nullptr);
    EXPECT(logger.reported({"layout=1"}));
    std::vector<PluginField> missing = Attrs{}.fields();
    missing.erase(missing.begin() + 1);
    EXPECT(create(creator, missing, TensorRTPhase::kBUILD) == nullptr);
    EXPECT(logger.reported({"missing required attribute 'in_features'"}));

    // int64 attributes and the parser's string attributes are accepted.
    int64_t const bits = 4, k = 64, n = 16, layout = 2;
    std::vector<PluginField> wide{PluginField("bits", &bits, PluginFieldType::kINT64, 1),
        PluginField("in_features", &k, PluginFieldType::kINT64, 1),
        PluginField("out_features", &n, PluginFieldType::kINT64, 1),
        PluginField("layout", &layout, PluginFieldType::kINT64, 1),
        PluginField("plugin_namespace", "sqz", PluginFieldType::kCHAR, 4),
        PluginField("plugin_version", "1", PluginFieldType::kCHAR, 2)};
    std::unique_ptr<IPluginV3> widePlugin(create(creator, wide, TensorRTPhase::kBUILD));
    EXPECT(widePlugin != nullptr);

    checkBuildPhase(creator, logger);

    // Engine serialization round trip: fields to serialize -> runtime-phase plugin -> same fields.
    Attrs const a;
    std::unique_ptr<IPluginV3> built(create(creator, a.fields(), TensorRTPhase::kBUILD));
    EXPECT(built != nullptr);
    if (!built)
    {
        return;
    }
    auto* runtime = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    EXPECT(saved != nullptr && saved->nbFields == 5);
    std::vector<int32_t> const values = intValues(*saved);
    EXPECT((values == std::vector<int32_t>{3, 100, 48, 2, 32}));
    for (int32_t i = 0; i < saved->nbFields && names; ++i)
    {
        EXPECT(std::strcmp(saved->fields[i].name, names->fields[i].name) == 0);
    }
    std::vector<PluginField> const copy(saved->fields, saved->fields + saved->nbFields);
    std::unique_ptr<IPluginV3> loaded(create(creator, copy, TensorRTPhase::kRUNTIME));
    EXPECT(loaded != nullptr);
    if (loaded)
    {
        auto* loadedRuntime
            = static_cast<IPluginV3OneRuntime*>(loaded->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        EXPECT(intValues(*loadedRuntime->getFieldsToSerialize()) == values);
        std::unique_ptr<IPluginV3> attached(loadedRuntime->attachToContext(nullptr));
        EXPECT(attached != nullptr);
        std::unique_ptr<IPluginV3> cloned(loaded->clone());
        EXPECT(cloned != nullptr);
    }
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::cerr << "usage: " << argv[0] << " libsqz_trt_plugin.so" << std::endl;
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::cerr << "dlopen failed: " << dlerror() << std::endl;
        return 2;
    }
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    EXPECT(setLoggerFinder != nullptr && getCreators != nullptr);
    if (!setLoggerFinder || !getCreators)
    {
        return 1;
    }
    RecordingLogger logger;
    LoggerFinder finder(&logger);
    setLoggerFinder(&finder);
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    EXPECT(nbCreators == 1 && creators != nullptr);
    for (int32_t i = 0; creators && i < nbCreators; ++i)
    {
        EXPECT(std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
        checkCreator(*static_cast<IPluginCreatorV3One*>(creators[i]), logger);
    }
    EXPECT(logger.errors.empty());
    if (sqz::test::failures())
    {
        std::cerr << sqz::test::failures() << " check(s) failed" << std::endl;
        return 1;
    }
    std::cout << "sqzPluginHarness: " << nbCreators << " creator(s), all checks passed" << std::endl;
    return 0;
}
