#include "sqzLinearPlugin.h"

#include <exception>
#include <limits>
#include <string>

using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ILogger;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

namespace sqz
{
namespace plugin
{
namespace
{

TensorType tensorType(nvinfer1::DataType type) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kHALF: return TensorType::kFLOAT16;
    case nvinfer1::DataType::kBF16: return TensorType::kBFLOAT16;
    case nvinfer1::DataType::kFLOAT: return TensorType::kFLOAT32;
    case nvinfer1::DataType::kINT32: return TensorType::kINT32;
    default: return TensorType::kOTHER;
    }
}

char const* typeName(nvinfer1::DataType type) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kHALF: return "fp16";
    case nvinfer1::DataType::kBF16: return "bf16";
    case nvinfer1::DataType::kFLOAT: return "fp32";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kINT8: return "int8";
    default: return "another type";
    }
}

FieldType fieldType(PluginFieldType type) noexcept
{
    switch (type)
    {
    case PluginFieldType::kINT32: return FieldType::kINT32;
    case PluginFieldType::kINT64: return FieldType::kINT64;
    case PluginFieldType::kCHAR: return FieldType::kCHAR;
    default: return FieldType::kOTHER;
    }
}

std::vector<int64_t> dimsOf(Dims const& dims)
{
    // Dims::d holds -1 for an extent that is dynamic at build time, the core's kDYNAMIC.
    return std::vector<int64_t>(dims.d, dims.d + dims.nbDims);
}

std::vector<int64_t> dimsOf(DimsExprs const& dims)
{
    std::vector<int64_t> out;
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        out.push_back(dims.d[i]->isConstant() ? dims.d[i]->getConstantValue() : kDYNAMIC);
    }
    return out;
}

void logError(std::string const& message) noexcept
{
    logMessage(ILogger::Severity::kERROR, std::string(kPLUGIN_NAME) + ": " + message);
}

sqz::DataType launcherType(nvinfer1::DataType type) noexcept
{
    return type == nvinfer1::DataType::kBF16 ? sqz::DataType::kBF16 : sqz::DataType::kHALF;
}

} // namespace

SqzLinearPlugin::SqzLinearPlugin(SqzLinearParams const& params)
    : mParams(params)
{
}

// Copies the configuration, not the serialization storage (its views would point into `other`).
SqzLinearPlugin::SqzLinearPlugin(SqzLinearPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mParams(other.mParams)
    , mErrorRecorder(other.mErrorRecorder)
    , mNbInputs(other.mNbInputs)
    , mNnz(other.mNnz)
    , mDtype(other.mDtype)
    , mRows(other.mRows)
{
}

IPluginCapability* SqzLinearPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* SqzLinearPlugin::clone() noexcept
{
    try
    {
        return new SqzLinearPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string("clone failed: ") + e.what());
        return nullptr;
    }
}

char const* SqzLinearPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* SqzLinearPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* SqzLinearPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t SqzLinearPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

int32_t SqzLinearPlugin::getOutputDataTypes(
    nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    std::string const error = checkInputCount(nbInputs);
    if (!error.empty() || nbOutputs != kNB_OUTPUTS)
    {
        logError(error.empty() ? "expected 1 output" : error);
        return -1;
    }
    TensorType const x = tensorType(inputTypes[kX]);
    if (x != TensorType::kFLOAT16 && x != TensorType::kBFLOAT16)
    {
        logError("input 0 (x) is " + std::string(typeName(inputTypes[kX]))
            + "; expected fp16 or bf16 (export the model in fp16/bf16; TensorRT 11 networks are strongly typed)");
        return -1;
    }
    outputTypes[0] = inputTypes[kX];
    return 0;
}

int32_t SqzLinearPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    try
    {
        std::string const countError = checkInputCount(nbInputs);
        if (!countError.empty() || nbOutputs != kNB_OUTPUTS)
        {
            logError(countError.empty() ? "expected 1 output" : countError);
            return -1;
        }
        std::vector<std::vector<int64_t>> dims;
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims.push_back(dimsOf(inputs[i]));
        }
        if (!checkShapes(dims, "build"))
        {
            return -1;
        }
        // y = x's extents with the last one (in_features) replaced by out_features.
        DimsExprs const& x = inputs[kX];
        outputs[0].nbDims = x.nbDims;
        for (int32_t i = 0; i + 1 < x.nbDims; ++i)
        {
            outputs[0].d[i] = x.d[i];
        }
        outputs[0].d[x.nbDims - 1] = exprBuilder.constant(mParams.outFeatures);
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(std::string("getOutputShapes failed: ") + e.what());
        return -1;
    }
}

bool SqzLinearPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (!checkInputCount(nbInputs).empty() || nbOutputs != kNB_OUTPUTS || pos < 0 || pos > nbInputs)
    {
        return false;
    }
    if (inOut[pos].desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    TensorType types[kNB_INPUTS_SPARSE + kNB_OUTPUTS];
    for (int32_t i = 0; i <= pos; ++i)
    {
        types[i] = tensorType(inOut[i].desc.type);
    }
    bool const ok = supportsType(pos, nbInputs, types);
    if (!ok)
    {
        // TensorRT probes several combinations; a refusal is only an error if none remains (it then says so).
        logMessage(ILogger::Severity::kVERBOSE,
            std::string(kPLUGIN_NAME) + ": refused " + typeName(inOut[pos].desc.type) + " for "
                + positionName(pos, nbInputs) + "; expected " + expectedTypeName(pos, nbInputs));
    }
    return ok;
}

bool SqzLinearPlugin::checkShapes(std::vector<std::vector<int64_t>> const& dims, char const* phase) const noexcept
{
    try
    {
        std::string const error = checkInputShapes(mParams, dims);
        if (!error.empty())
        {
            logError(std::string(phase) + ": " + error);
            return false;
        }
        return true;
    }
    catch (std::exception const& e)
    {
        logError(std::string("shape check failed: ") + e.what());
        return false;
    }
}

SqzLinearShape SqzLinearPlugin::launchShape(int64_t rows) const noexcept
{
    SqzLinearShape shape{};
    shape.m = static_cast<int32_t>(rows);
    shape.inFeatures = mParams.inFeatures;
    shape.outFeatures = mParams.outFeatures;
    shape.bits = mParams.bits;
    shape.nnz = static_cast<int32_t>(mNnz);
    shape.chunkNnz = mNnz > 0 ? mParams.chunkNnz : 0;
    shape.dtype = mDtype;
    return shape;
}

int32_t SqzLinearPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        std::string const countError = checkInputCount(nbInputs);
        if (!countError.empty() || nbOutputs != kNB_OUTPUTS)
        {
            logError(countError.empty() ? "expected 1 output" : countError);
            return -1;
        }
        std::vector<std::vector<int64_t>> dims;
        std::vector<TensorType> types;
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims.push_back(dimsOf(in[i].desc.dims));
            types.push_back(tensorType(in[i].desc.type));
        }
        if (!checkShapes(dims, "build"))
        {
            return -1;
        }
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            if (!supportsType(i, nbInputs, types.data()))
            {
                logError(positionName(i, nbInputs) + " is " + typeName(in[i].desc.type) + "; expected "
                    + expectedTypeName(i, nbInputs));
                return -1;
            }
        }
        mNbInputs = nbInputs;
        mNnz = sparseNnz(nbInputs, nbInputs == kNB_INPUTS_SPARSE ? in[kCOL].desc.dims.d[0] : 0);
        if (mNnz > std::numeric_limits<int32_t>::max() || mNnz < 0)
        {
            logError("input 4 (col) must have a fixed length below 2^31, got " + std::to_string(mNnz));
            return -1;
        }
        mDtype = launcherType(in[kX].desc.type);
        // Ask the launcher too, at the largest M of the profile: it knows its own limits (alignment, sizes).
        int64_t const maxRows = rowsOf(dimsOf(in[kX].max));
        if (maxRows < 0 || maxRows > std::numeric_limits<int32_t>::max())
        {
            logError("input 0 (x) needs a bounded number of rows (product of all but the last extent) below 2^31");
            return -1;
        }
        if (char const* launcherError = sqzLinearValidate(launchShape(maxRows)))
        {
            logError(std::string("kernel launcher refused the shape: ") + launcherError);
            return -1;
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(std::string("configurePlugin failed: ") + e.what());
        return -1;
    }
}

size_t SqzLinearPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        // Largest M of the profile: the workspace is allocated once per profile.
        int64_t const maxRows = rowsOf(dimsOf(inputs[kX].max));
        SqzLinearShape shape = launchShape(maxRows < 0 ? 0 : maxRows);
        shape.nnz = static_cast<int32_t>(sparseNnz(nbInputs, nbInputs == kNB_INPUTS_SPARSE ? inputs[kCOL].max.d[0] : 0));
        shape.chunkNnz = shape.nnz > 0 ? mParams.chunkNnz : 0;
        shape.dtype = launcherType(inputs[kX].desc.type);
        return sqzLinearWorkspaceSize(shape);
    }
    catch (std::exception const& e)
    {
        logError(std::string("getWorkspaceSize failed: ") + e.what());
        return 0;
    }
}

int32_t SqzLinearPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept
{
    try
    {
        std::vector<std::vector<int64_t>> dims;
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims.push_back(dimsOf(in[i].dims));
        }
        if (!checkShapes(dims, "runtime"))
        {
            return -1;
        }
        mNbInputs = nbInputs;
        mNnz = sparseNnz(nbInputs, nbInputs == kNB_INPUTS_SPARSE ? in[kCOL].dims.d[0] : 0);
        mDtype = launcherType(in[kX].type);
        mRows = rowsOf(dims[kX]);
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(std::string("onShapeChange failed: ") + e.what());
        return -1;
    }
}

int32_t SqzLinearPlugin::enqueue(PluginTensorDesc const* /*inputDesc*/, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    SqzLinearShape const shape = launchShape(mRows);
    if (shape.m == 0)
    {
        return 0; // an empty batch: nothing to compute
    }
    // One plugin instance serves the decode (M = batch) and prefill (M = batch * seq) profiles, so the
    // kernel is chosen per call from M by the launcher's explicit rule, and logged when it changes.
    KernelKind const kind = sqzLinearChooseKernel(shape);
    if (kind != mLoggedKind)
    {
        mLoggedKind = kind;
        logMessage(ILogger::Severity::kVERBOSE,
            std::string(kPLUGIN_NAME) + ": M=" + std::to_string(shape.m) + ", K=" + std::to_string(shape.inFeatures)
                + ", N=" + std::to_string(shape.outFeatures) + ", bits=" + std::to_string(shape.bits)
                + ", nnz=" + std::to_string(shape.nnz) + " -> kernel " + sqzLinearKernelName(kind));
    }
    bool const sparse = mNbInputs == kNB_INPUTS_SPARSE;
    SqzLinearArgs args{};
    args.x = inputs[kX];
    args.qweight = static_cast<int32_t const*>(inputs[kQWEIGHT]);
    args.lut = inputs[kLUT];
    args.rowPtr = sparse ? static_cast<int32_t const*>(inputs[kROW_PTR]) : nullptr;
    args.col = sparse ? static_cast<int32_t const*>(inputs[kCOL]) : nullptr;
    args.val = sparse ? inputs[kVAL] : nullptr;
    args.chunkRow = sparse ? static_cast<int32_t const*>(inputs[kCHUNK_ROW]) : nullptr;
    args.y = outputs[0];
    args.workspace = workspace;
    args.workspaceBytes = sqzLinearWorkspaceSize(shape);
    cudaError_t const status = sqzLinearLaunch(shape, args, kind, stream);
    if (status != cudaSuccess)
    {
        std::string const message = std::string(kPLUGIN_NAME) + ": kernel launch failed (M=" + std::to_string(shape.m)
            + ", K=" + std::to_string(shape.inFeatures) + ", N=" + std::to_string(shape.outFeatures)
            + "): " + cudaGetErrorString(status);
        if (mErrorRecorder != nullptr)
        {
            mErrorRecorder->reportError(nvinfer1::ErrorCode::kFAILED_EXECUTION, message.c_str());
        }
        logMessage(ILogger::Severity::kERROR, message);
        return -1;
    }
    return 0;
}

IPluginV3* SqzLinearPlugin::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept
{
    // No per-context resources (the kernels need only the stream and the workspace); keep the
    // context's error recorder so a failed launch is reported where the application looks.
    auto* attached = static_cast<SqzLinearPlugin*>(clone());
    if (attached != nullptr && context != nullptr)
    {
        attached->mErrorRecorder = context->getErrorRecorder();
    }
    return attached;
}

PluginFieldCollection const* SqzLinearPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        serializeFields(mParams, mSerialized);
        mFieldsToSerialize.clear();
        for (FieldView const& field : mSerialized.fields)
        {
            mFieldsToSerialize.emplace_back(field.name, field.data, PluginFieldType::kINT32, field.length);
        }
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
        mFieldCollection.fields = mFieldsToSerialize.data();
        return &mFieldCollection;
    }
    catch (std::exception const& e)
    {
        logError(std::string("getFieldsToSerialize failed: ") + e.what());
        return nullptr;
    }
}

SqzLinearPluginCreator::SqzLinearPluginCreator()
{
    // int32 fields: the ONNX parser converts each node attribute to the type announced here.
    for (AttributeSpec const& spec : attributeSpecs())
    {
        mFieldNames.emplace_back(spec.name, nullptr, PluginFieldType::kINT32, 1);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* SqzLinearPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* SqzLinearPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* SqzLinearPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* SqzLinearPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* SqzLinearPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept
{
    std::string const where = std::string("layer '") + (name ? name : "?") + "' ("
        + (phase == nvinfer1::TensorRTPhase::kBUILD ? "build" : "runtime") + "): ";
    try
    {
        std::vector<FieldView> fields;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            fields.push_back({f.name, f.data, fieldType(f.type), f.length});
        }
        ParseResult const parsed = parseFields(fields);
        if (!parsed.error.empty())
        {
            logError(where + parsed.error);
            return nullptr;
        }
        return new SqzLinearPlugin(parsed.params);
    }
    catch (std::exception const& e)
    {
        logError(where + "createPlugin failed: " + e.what());
        return nullptr;
    }
}

} // namespace plugin
} // namespace sqz
