/*
 * SqzLinear TensorRT plugin (IPluginV3): y = x @ (LUT[idx] + S)^T, the sqz::SqzLinear ONNX op.
 *
 * A thin adapter: the op's rules (attributes, shapes, types, serialization) live in the plain-C++
 * core (sqzLinearPluginCore.h), the math in the CUDA launcher (plugins/common/sqzLinear.h). This
 * class only translates TensorRT's types, reports the core's messages through the TensorRT logger,
 * and calls the launcher on TensorRT's stream. Compiles against TensorRT 10.x and 11.x headers
 * (only IPluginV3 / IPluginV3One* / IPluginCreatorV3One interfaces, all present since 10.0).
 */
#pragma once

#include "NvInferRuntime.h"
#include "sqzLinear.h"
#include "sqzLinearPluginCore.h"

#include <string>
#include <vector>

namespace sqz
{
namespace plugin
{

//! Logs through the logger TensorRT handed to setLoggerFinder (or found at load time); stderr otherwise.
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

class SqzLinearPlugin final : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit SqzLinearPlugin(SqzLinearParams const& params);
    SqzLinearPlugin(SqzLinearPlugin const& other);
    SqzLinearPlugin& operator=(SqzLinearPlugin const&) = delete;
    ~SqzLinearPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    SqzLinearParams const& params() const noexcept
    {
        return mParams;
    }

private:
    //! Launcher shape for M rows of x; nnz and dtype as configured.
    SqzLinearShape launchShape(int64_t rows) const noexcept;
    //! Checks shapes with the core and the launcher; logs and returns false on the first problem.
    bool checkShapes(std::vector<std::vector<int64_t>> const& dims, char const* phase) const noexcept;

    SqzLinearParams mParams;
    //! The execution context's error recorder (attachToContext); enqueue failures go there and to the log.
    nvinfer1::IErrorRecorder* mErrorRecorder{nullptr};
    // Set by configurePlugin (build) / onShapeChange (runtime).
    int32_t mNbInputs{kNB_INPUTS_DENSE};
    int64_t mNnz{0};
    sqz::DataType mDtype{sqz::DataType::kHALF};
    int64_t mRows{0};
    sqz::KernelKind mLoggedKind{sqz::KernelKind::kAuto};
    // Storage behind getFieldsToSerialize (views into mSerialized.buffer).
    SerializedFields mSerialized;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class SqzLinearPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    SqzLinearPluginCreator();
    ~SqzLinearPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugin
} // namespace sqz
