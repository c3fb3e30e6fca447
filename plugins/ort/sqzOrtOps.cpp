/*
 * sqzOrtOps.cpp: libsqz_ort_ops.so, the onnxruntime custom-op library of sqz-export.
 *
 * Two ops in domain "sqz", opset 1:
 *   - sqz::SqzLinear, the exported graphs' op, on the CPU execution provider, and (built with
 *     SQZ_ORT_CUDA: libsqz_ort_ops_cuda.so) on the CUDA execution provider too;
 *   - sqz::DenseLinear (CPU): y = x W^T for a plain fp16 W [N, K], which no exported file holds:
 *     sqz_export.ort_session puts it on a graph's fp16 lm_head at session creation, so the head is read
 *     as fp16 instead of the fp32 copy onnxruntime folds it into (sqzHalfLinearCpuRows below 12 rows,
 *     fp32 tiles into onnxruntime's Gemm above).
 * SqzLinear's adapter is thin:
 *   - every rule of the op (attributes, input count, shapes) comes from the TensorRT plugin's
 *     plain-C++ core (plugins/sqzLinearPlugin/sqzLinearPluginCore.h), so both front doors accept and
 *     refuse the same nodes with the same messages;
 *   - the arithmetic is the plain C++ CPU kernel (plugins/common/sqzLinearCpu.h) on the packed bytes
 *     onnxruntime holds for the initializers (no dense copy, no pre-packing);
 *   - the output rows are cut into ranges of equal work (sqzLinearCpuSplit) and run on onnxruntime's
 *     intra-op thread pool (KernelContext_ParallelFor), so the op shares the session's threads;
 *   - from kGEMM_MIN_M rows of x on (prefill) W is dequantized in tiles of 1M weights, at least 256
 *     rows (sqzDequantTileRows; sqzDequantCpuRows on the same threads) into onnxruntime's own CPU Gemm (CreateOp / InvokeOp:
 *     MLAS, the GEMM of the graph's MatMuls), instead of the GEMV, whose cost grows with every 16 rows;
 *   - on the CUDA execution provider the call goes to the CUDA launcher (plugins/common/sqzLinear.h:
 *     GEMV for M <= 16, dequantize + GEMM above) on the session's compute stream, with the workspace
 *     from the session's CUDA allocator; x must then be fp16 or bf16.
 *
 *   inputs  0 x          fp16 | bf16 | fp32 [..., K]   (converted to fp32 scratch when not fp32)
 *           1 qweight    int32 [N, ceil(K/32) * bits]  layout 2
 *           2 lut        fp16  [N, 2^bits]
 *           3 row_ptr    int32 [N + 1]     } optional sparse part: all four or none (3 or 7 inputs)
 *           4 col        int32 [nnz]       }
 *           5 val        fp16  [nnz]       }
 *           6 chunk_row  int32 [...]       } read by the CUDA SpMV only; checked, not used here
 *   output  0 y          dtype(x) [..., N]  fp32 accumulation, one rounding to x's dtype
 *
 * ABI: only onnxruntime's C API (onnxruntime_c_api.h), and only functions of API version <= 17
 * (onnxruntime >= 1.17), requested from the OrtApiBase that onnxruntime passes to RegisterCustomOps.
 * The library links no libonnxruntime: the Python wheel's runtime lives inside its pybind module,
 * and a C/C++ host has its own libonnxruntime loaded already. Only RegisterCustomOps is exported.
 */
#include "onnxruntime_c_api.h"

#include "sqzFormat.h"
#include "sqzLinearCpu.h"
#include "sqzLinearPluginCore.h"
#if defined(SQZ_ORT_CUDA)
#include "sqzLinear.h"
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace
{

namespace core = sqz::plugin;
namespace cpu = sqz::cpu;

//! The C API version this library asks for: KernelContext_ParallelFor and OrtCustomOp::GetStartVersion
//! arrived in 1.17, CreateKernelV2/KernelComputeV2/InferOutputShapeFn in 1.16-1.17.
constexpr uint32_t kORT_API_VERSION = 17;
constexpr char const* kDOMAIN = "sqz";
constexpr char const* kCPU_PROVIDER = "CPUExecutionProvider";
constexpr char const* kCUDA_PROVIDER = "CUDAExecutionProvider";
constexpr int kOPSET = 1;

//! Splits below this many output rows per part cost more in hand-offs than they save.
constexpr int64_t kMIN_ROWS_PER_PART = 16;

//! From this many rows of x on, the op dequantizes W in tiles into onnxruntime's Gemm (MLAS) instead of
//! running the LUT GEMV. Measured in onnxruntime 1.32 on the 2-core AVX-512 dev machine (2026-12-02,
//! 3-bit + 0.45%, weights rotated past the last-level cache), GEMV against the Gemm path, ms a layer:
//! 4096 x 4096 at M = 8 2.98 / 3.94, M = 12 4.32 / 4.65, M = 16 7.59 / 5.99; 4096 x 11008 at M = 8
//! 7.35 / 7.87, M = 12 12.64 / 10.63, M = 16 19.31 / 11.20. MLAS crosses over earlier than torch's GEMM
//! does for the torch op (sqz_export.kernels.ops.CPU_GEMM_MIN_M).
constexpr int64_t kGEMM_MIN_M = 12;

OrtApi const* gApi = nullptr; //!< set once by RegisterCustomOps

#define SQZ_ORT_RETURN_IF_ERROR(expr)                                                                                \
    do                                                                                                                 \
    {                                                                                                                  \
        if (OrtStatus* _status = (expr))                                                                               \
        {                                                                                                              \
            return _status;                                                                                            \
        }                                                                                                              \
    } while (0)

OrtStatus* error(OrtErrorCode code, std::string const& message)
{
    return gApi->CreateStatus(code, message.c_str());
}

//! Element type and extents of a tensor value (-1 for an extent unknown at session creation).
struct TensorDesc
{
    ONNXTensorElementDataType type{ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED};
    std::vector<int64_t> dims;
};

OrtStatus* describe(OrtTensorTypeAndShapeInfo const* info, TensorDesc& out)
{
    size_t rank = 0;
    SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorElementType(info, &out.type));
    SQZ_ORT_RETURN_IF_ERROR(gApi->GetDimensionsCount(info, &rank));
    out.dims.assign(rank, 0);
    return rank ? gApi->GetDimensions(info, out.dims.data(), rank) : nullptr;
}

OrtStatus* describeValue(OrtValue const* value, TensorDesc& out)
{
    OrtTensorTypeAndShapeInfo* info = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorTypeAndShape(value, &info));
    OrtStatus* status = describe(info, out);
    gApi->ReleaseTensorTypeAndShapeInfo(info);
    return status;
}

core::TensorType coreType(ONNXTensorElementDataType type)
{
    switch (type)
    {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return core::TensorType::kFLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return core::TensorType::kBFLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return core::TensorType::kFLOAT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return core::TensorType::kINT32;
    default: return core::TensorType::kOTHER;
    }
}

//! The CPU kernel takes fp32 x too; the CUDA launcher fp16 and bf16 only.
bool isActivationType(ONNXTensorElementDataType type, bool cuda)
{
    return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 || type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16
        || (!cuda && type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
}

//! "" if the weight inputs (1..nbInputs-1) have the op's types, else a message naming the input.
std::string checkWeightTypes(std::vector<TensorDesc> const& inputs)
{
    int32_t const nbInputs = static_cast<int32_t>(inputs.size());
    std::vector<core::TensorType> types(inputs.size());
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        types[i] = coreType(inputs[i].type);
    }
    for (int32_t i = core::kQWEIGHT; i < nbInputs; ++i)
    {
        if (!core::supportsType(i, nbInputs, types.data()))
        {
            return core::positionName(i, nbInputs) + " must be " + core::expectedTypeName(i, nbInputs);
        }
    }
    return "";
}

//! "" if the CSR part is well formed (what the kernel indexes with), else why not. O(N + nnz), run
//! once per node at session creation (constant weights) so a corrupt file fails early, not in a read.
std::string checkCsr(core::SqzLinearParams const& p, int32_t const* rowPtr, int32_t const* col, int64_t nnz)
{
    if (rowPtr[0] != 0 || rowPtr[p.outFeatures] != nnz)
    {
        return "row_ptr must start at 0 and end at nnz=" + std::to_string(nnz) + ", got " + std::to_string(rowPtr[0])
            + " ... " + std::to_string(rowPtr[p.outFeatures]);
    }
    for (int32_t n = 0; n < p.outFeatures; ++n)
    {
        if (rowPtr[n + 1] < rowPtr[n])
        {
            return "row_ptr decreases at row " + std::to_string(n);
        }
    }
    for (int64_t j = 0; j < nnz; ++j)
    {
        if (col[j] < 0 || col[j] >= p.inFeatures)
        {
            return "col[" + std::to_string(j) + "]=" + std::to_string(col[j]) + " is outside [0, in_features="
                + std::to_string(p.inFeatures) + ")";
        }
    }
    return "";
}

struct TileSlot;

//! What a node of either op keeps beside its own fields: its name for messages, the CPU memory info of
//! its scratch, and onnxruntime's Gemm for the large-M path.
struct KernelBase
{
    char const* op{""};              //!< "SqzLinear" or "DenseLinear", for messages
    std::string node;                //!< node name, for messages
    bool cuda{false};                //!< the CUDA execution provider's op (device tensors)
    cpu::Isa isa{cpu::Isa::kScalar}; //!< CPU: the ISA every call runs (chosen once, logged)
    OrtMemoryInfo* cpuMemory{nullptr};
    OrtOp* gemm{nullptr};            //!< CPU: onnxruntime's own Gemm (fp32, transB=1) for M >= kGEMM_MIN_M
    mutable std::atomic<bool> gemmLogged{false}; //!< the first large-M call was logged

    explicit KernelBase(char const* opName)
        : op(opName)
    {
    }
    KernelBase(KernelBase const&) = delete;
    KernelBase& operator=(KernelBase const&) = delete;
    ~KernelBase()
    {
        if (gemm != nullptr)
        {
            gApi->ReleaseOp(gemm);
        }
        if (cpuMemory != nullptr)
        {
            gApi->ReleaseMemoryInfo(cpuMemory);
        }
    }

    std::string prefix() const { return std::string(op) + " node '" + node + "': "; }

    OrtStatus* fail(std::string const& message) const { return error(ORT_INVALID_ARGUMENT, prefix() + message); }

    //! The node's name (first: every message names it).
    OrtStatus* readName(OrtKernelInfo const* info);

    //! The CPU memory info and (CPU) the Gemm, once the node is accepted; *gemmStatus (owned by the
    //! caller, for logCreation) says why there is no Gemm.
    OrtStatus* createResources(OrtKernelInfo const* info, OrtStatus** gemmStatus);

    //! y [M, N] = x [M, K] W^T through onnxruntime's Gemm (the large-M path of both ops), W made in fp32
    //! tiles of sqzDequantTileRows rows by `fill` on the session's threads: for each tile, tiledGemm sets `slot`
    //! (a base of `job`) and runs fill(job, part) for its parts. `made` names how W becomes fp32 in the
    //! log line of the node's first such call.
    OrtStatus* tiledGemm(OrtKernelContext* context, float const* x, float* y, int64_t m, int64_t k, int64_t n,
        TileSlot& slot, void (*fill)(void*, size_t), void* job, char const* made) const;
};

//! One SqzLinear node of a session.
struct Kernel : KernelBase
{
    core::SqzLinearParams params;    //!< validated attributes
    int32_t nbInputs{0};             //!< 3 (dense) or 7 (dense + sparse)
    bool weightsChecked{false};      //!< weights were constant and checked at creation
    int64_t nnz{0};                  //!< non-zeros of the sparse part, when weightsChecked

    Kernel()
        : KernelBase(core::kPLUGIN_NAME)
    {
    }

    OrtStatus* checkX(TensorDesc const& x) const
    {
        if (!isActivationType(x.type, cuda))
        {
            return fail(std::string("input 0 (x) must be ") + (cuda ? "fp16 or bf16 on CUDA" : "fp16, bf16 or fp32"));
        }
        return nullptr;
    }

    //! Non-zeros given the inputs' extents (0 for a dense-only node).
    int64_t nnzOf(std::vector<TensorDesc> const& inputs) const
    {
        return nbInputs == core::kNB_INPUTS_SPARSE ? inputs[core::kCOL].dims[0] : 0;
    }

    //! Shapes and types of all inputs against the attributes, and the CSR contents when host pointers
    //! to them are given (CPU; a CUDA node's weights are device tensors).
    OrtStatus* checkInputs(std::vector<TensorDesc> const& inputs, int32_t const* rowPtr, int32_t const* col) const
    {
        SQZ_ORT_RETURN_IF_ERROR(checkX(inputs[core::kX]));
        std::string message = checkWeightTypes(inputs);
        if (message.empty())
        {
            std::vector<std::vector<int64_t>> dims;
            for (TensorDesc const& input : inputs)
            {
                dims.push_back(input.dims);
            }
            message = core::checkInputShapes(params, dims);
        }
        if (message.empty() && nbInputs == core::kNB_INPUTS_SPARSE && rowPtr != nullptr)
        {
            message = checkCsr(params, rowPtr, col, inputs[core::kCOL].dims[0]);
        }
        return message.empty() ? nullptr : fail(message);
    }

    OrtStatus* create(OrtKernelInfo const* info);
    OrtStatus* compute(OrtKernelContext* context) const;
    OrtStatus* runCpu(OrtKernelContext* context, TensorDesc const& x, std::vector<void*> const& data, void* yData,
        int64_t m, int64_t nnzNow) const;
    OrtStatus* runGemm(OrtKernelContext* context, cpu::CpuShape const& shape, cpu::CpuArgs const& args) const;
#if defined(SQZ_ORT_CUDA)
    OrtStatus* runCuda(OrtKernelContext* context, OrtValue const* xValue, TensorDesc const& x,
        std::vector<void*> const& data, void* yData, int64_t m, int64_t nnzNow) const;
#endif
};

//! A line in onnxruntime's log (INFO lines show from log_severity_level 1 on); a failure to log is ignored.
void logMessage(OrtLogger const* logger, OrtLoggingLevel level, std::string const& message, char const* function)
{
    if (OrtStatus* logged = gApi->Logger_LogMessage(logger, level, message.c_str(), ORT_FILE, __LINE__, function))
    {
        gApi->ReleaseStatus(logged);
    }
}

//! onnxruntime's CPU Gemm (opset 13, fp32, transB=1: y = x W^T with W row-major [N, K]), invoked by the
//! large-M path on the session's intra-op threads (MLAS), so prefill runs at the speed of the graph's own
//! MatMuls instead of the GEMV's, whose cost grows with every 16 rows of x.
OrtStatus* createGemm(OrtKernelInfo const* info, OrtOp** gemm)
{
    // A kernel created outside a graph gets no schema defaults: every attribute Gemm reads is set.
    int64_t const transA = 0;
    int64_t const transB = 1;
    float const alpha = 1.0F;
    float const beta = 0.0F;
    OrtOpAttr* attributes[4] = {};
    OrtStatus* status = gApi->CreateOpAttr("transA", &transA, 1, ORT_OP_ATTR_INT, &attributes[0]);
    if (status == nullptr)
    {
        status = gApi->CreateOpAttr("transB", &transB, 1, ORT_OP_ATTR_INT, &attributes[1]);
    }
    if (status == nullptr)
    {
        status = gApi->CreateOpAttr("alpha", &alpha, 1, ORT_OP_ATTR_FLOAT, &attributes[2]);
    }
    if (status == nullptr)
    {
        status = gApi->CreateOpAttr("beta", &beta, 1, ORT_OP_ATTR_FLOAT, &attributes[3]);
    }
    if (status == nullptr)
    {
        char const* typeNames[] = {"T"};
        ONNXTensorElementDataType typeValues[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
        status = gApi->CreateOp(info, "Gemm", "", 13, typeNames, typeValues, 1, attributes, 4, 2, 1, gemm);
    }
    for (OrtOpAttr* attribute : attributes)
    {
        if (attribute != nullptr)
        {
            gApi->ReleaseOpAttr(attribute);
        }
    }
    return status;
}

OrtStatus* KernelBase::readName(OrtKernelInfo const* info)
{
    size_t size = 0;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelInfo_GetNodeName(info, nullptr, &size));
    node.assign(size, '\0');
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelInfo_GetNodeName(info, node.data(), &size));
    node.resize(std::strlen(node.c_str()));
    return nullptr;
}

OrtStatus* KernelBase::createResources(OrtKernelInfo const* info, OrtStatus** gemmStatus)
{
    *gemmStatus = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpuMemory));
    // Without onnxruntime's Gemm (a minimal build has no CreateOp) the GEMV runs at every M: slower
    // prefill, same results.
    *gemmStatus = cuda ? nullptr : createGemm(info, &gemm);
    if (*gemmStatus != nullptr)
    {
        gemm = nullptr;
    }
    return nullptr;
}

//! The creation log line of a node, and the warning when onnxruntime's Gemm is missing (releases gemmStatus).
void logCreation(KernelBase const& kernel, OrtKernelInfo const* info, std::string const& message, OrtStatus* gemmStatus)
{
    OrtLogger const* logger = nullptr;
    if (gApi->KernelInfo_GetLogger(info, &logger) == nullptr && logger != nullptr)
    {
        logMessage(logger, ORT_LOGGING_LEVEL_INFO, kernel.prefix() + message, "create");
        if (gemmStatus != nullptr)
        {
            std::string const warning = kernel.prefix() + "onnxruntime's Gemm is not available ("
                + gApi->GetErrorMessage(gemmStatus) + "): the GEMV runs at every M";
            logMessage(logger, ORT_LOGGING_LEVEL_WARNING, warning, "create");
        }
    }
    if (gemmStatus != nullptr)
    {
        gApi->ReleaseStatus(gemmStatus);
    }
}

OrtStatus* Kernel::create(OrtKernelInfo const* info)
{
    SQZ_ORT_RETURN_IF_ERROR(readName(info));

    // Attributes, through the plugin core's parser (same names, ranges and messages as TensorRT's).
    std::vector<int64_t> values;
    std::vector<char const*> names;
    values.reserve(core::attributeSpecs().size());
    for (core::AttributeSpec const& spec : core::attributeSpecs())
    {
        int64_t value = 0;
        if (OrtStatus* missing = gApi->KernelInfoGetAttribute_int64(info, spec.name, &value))
        {
            gApi->ReleaseStatus(missing); // absent: the core reports it if it is required
            continue;
        }
        values.push_back(value);
        names.push_back(spec.name);
    }
    std::vector<core::FieldView> fields;
    for (size_t i = 0; i < values.size(); ++i)
    {
        fields.push_back({names[i], &values[i], core::FieldType::kINT64, 1});
    }
    core::ParseResult const parsed = core::parseFields(fields);
    if (!parsed.error.empty())
    {
        return fail(parsed.error);
    }
    params = parsed.params;

    size_t count = 0;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelInfo_GetInputCount(info, &count));
    nbInputs = static_cast<int32_t>(count);
    std::string const countError = core::checkInputCount(nbInputs);
    if (!countError.empty())
    {
        return fail(countError);
    }

    // Weights are initializers: check them once here. x's extents come from the graph's type info
    // (-1 where symbolic, which the core treats as dynamic).
    std::vector<TensorDesc> inputs(count);
    OrtTypeInfo* typeInfo = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelInfo_GetInputTypeInfo(info, 0, &typeInfo));
    OrtTensorTypeAndShapeInfo const* xInfo = nullptr;
    OrtStatus* status = gApi->CastTypeInfoToTensorInfo(typeInfo, &xInfo);
    if (status == nullptr && xInfo != nullptr)
    {
        status = describe(xInfo, inputs[core::kX]);
    }
    gApi->ReleaseTypeInfo(typeInfo);
    SQZ_ORT_RETURN_IF_ERROR(status);
    bool allConstant = true;
    std::vector<void const*> data(count, nullptr);
    for (size_t i = core::kQWEIGHT; i < count; ++i)
    {
        int isConstant = 0;
        OrtValue const* value = nullptr;
        SQZ_ORT_RETURN_IF_ERROR(gApi->KernelInfoGetConstantInput_tensor(info, i, &isConstant, &value));
        if (!isConstant || value == nullptr)
        {
            allConstant = false;
            break;
        }
        SQZ_ORT_RETURN_IF_ERROR(describeValue(value, inputs[i]));
        void* raw = nullptr;
        SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorMutableData(const_cast<OrtValue*>(value), &raw));
        data[i] = raw;
    }
    if (allConstant)
    {
        if (inputs[core::kX].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED)
        {
            inputs[core::kX].type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; // untyped graph input: checked per call
        }
        bool const hostCsr = nbInputs == core::kNB_INPUTS_SPARSE && !cuda;
        SQZ_ORT_RETURN_IF_ERROR(checkInputs(inputs, //
            hostCsr ? static_cast<int32_t const*>(data[core::kROW_PTR]) : nullptr,
            hostCsr ? static_cast<int32_t const*>(data[core::kCOL]) : nullptr));
        nnz = nnzOf(inputs);
        weightsChecked = true;
    }

    isa = cpu::sqzCpuEffectiveIsa(cpu::sqzCpuBestIsa(), params.bits);
    OrtStatus* gemmStatus = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(createResources(info, &gemmStatus));
    std::string const kernelName = cuda ? std::string("CUDA launcher (GEMV for M <= 16, dequantize + GEMM above)")
                                        : std::string("CPU LUT kernel for M < ") + std::to_string(kGEMM_MIN_M)
            + ", dequantized tiles + onnxruntime's Gemm above, isa=" + cpu::sqzCpuIsaName(isa);
    logCreation(*this, info,
        kernelName + " (bits=" + std::to_string(params.bits) + ", K=" + std::to_string(params.inFeatures) + ", N="
            + std::to_string(params.outFeatures) + (nbInputs == core::kNB_INPUTS_SPARSE ? ", sparse" : ", dense")
            + (weightsChecked ? ", weights checked at creation)" : ", weights not constant: checked per call)"),
        gemmStatus);
    return nullptr;
}

//! One call's arguments, shared by the parallel parts.
struct Job
{
    cpu::CpuShape shape;
    cpu::CpuArgs args;
    cpu::Isa isa;
    std::vector<int64_t> bounds;
};

void runPart(void* data, size_t part)
{
    Job const& job = *static_cast<Job const*>(data);
    cpu::sqzLinearCpuRows(job.shape, job.args, job.isa, job.bounds[part], job.bounds[part + 1]);
}

//! The tile of W that one large-M fill makes: rows [n0, n0 + rows) into tile [rows, K], in `parts`
//! equal ranges. Set by tiledGemm; the base of both ops' jobs.
struct TileSlot
{
    int64_t n0{0};
    int64_t rows{0};
    int64_t parts{1};
    float* tile{nullptr};
};

//! A SqzLinear tile: W = LUT[idx] + S dequantized by sqzDequantCpuRows.
struct DequantJob : TileSlot
{
    cpu::CpuShape shape{};
    cpu::CpuArgs args{};
    cpu::Isa isa{cpu::Isa::kScalar};
};

void dequantPart(void* data, size_t part)
{
    DequantJob const& job = *static_cast<DequantJob const*>(data);
    int64_t const begin = job.n0 + job.rows * static_cast<int64_t>(part) / job.parts;
    int64_t const end = job.n0 + job.rows * static_cast<int64_t>(part + 1) / job.parts;
    cpu::sqzDequantCpuRows(
        job.shape, job.args, job.isa, begin, end, job.tile + (begin - job.n0) * job.shape.inFeatures);
}

//! Parts to cut `rows` output rows into: one per hardware thread, at least kMIN_ROWS_PER_PART rows each.
int64_t partsFor(int64_t rows)
{
    // Read once: std::thread::hardware_concurrency() reads /sys on every call, which cost more than a
    // decode-sized GEMV (about 15 us a call on the dev machine, against 5-35 us of kernel).
    static int64_t const threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
    return std::clamp<int64_t>(rows / kMIN_ROWS_PER_PART, 1, threads);
}

//! Runs fn(data, 0 .. parts-1) on the session's intra-op threads (inline when there is one part).
OrtStatus* parallelFor(OrtKernelContext* context, void (*fn)(void*, size_t), int64_t parts, void* data)
{
    if (parts == 1)
    {
        fn(data, 0);
        return nullptr;
    }
    return gApi->KernelContext_ParallelFor(
        context, fn, static_cast<size_t>(parts), static_cast<size_t>(parts), data);
}

//! An OrtValue over a caller's fp32 buffer [rows, cols] (no copy), released on scope exit.
struct FloatView
{
    OrtValue* value{nullptr};
    ~FloatView()
    {
        if (value != nullptr)
        {
            gApi->ReleaseValue(value);
        }
    }
    OrtStatus* wrap(OrtMemoryInfo const* info, float const* data, int64_t rows, int64_t cols)
    {
        int64_t const dims[2] = {rows, cols};
        return gApi->CreateTensorWithDataAsOrtValue(info, const_cast<float*>(data),
            static_cast<size_t>(rows * cols) * sizeof(float), dims, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &value);
    }
};

//! A scratch buffer from onnxruntime's CPU allocator (the session's arena), freed on scope exit.
//! KernelContext_GetAllocator hands out a new OrtAllocator wrapper on every call, owned by the caller:
//! it is released here too (left alone, it leaked about 240 bytes per SqzLinear call).
struct Scratch
{
    OrtAllocator* allocator{nullptr};
    void* data{nullptr};
    ~Scratch()
    {
        if (data != nullptr)
        {
            allocator->Free(allocator, data);
        }
        if (allocator != nullptr)
        {
            gApi->ReleaseAllocator(allocator);
        }
    }
    OrtStatus* allocate(OrtKernelContext* context, OrtMemoryInfo const* info, size_t bytes)
    {
        SQZ_ORT_RETURN_IF_ERROR(gApi->KernelContext_GetAllocator(context, info, &allocator));
        data = allocator->Alloc(allocator, std::max<size_t>(bytes, 1));
        return data != nullptr
            ? nullptr
            : error(ORT_FAIL, "SqzLinear: out of memory for " + std::to_string(bytes) + " bytes of scratch");
    }
};

//! x as fp32 [M, K] and an fp32 y [M, N] for the CPU loops: the tensors themselves when x is fp32, else
//! one scratch buffer (a few KB at decode, next to the weights' MBs) holding x converted, and y until
//! finish() rounds it once into the output's dtype.
struct Fp32Io
{
    Scratch scratch;
    float const* x{nullptr};
    float* y{nullptr};
    ONNXTensorElementDataType type{ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    void* out{nullptr};
    int64_t outCount{0};

    OrtStatus* begin(OrtKernelContext* context, OrtMemoryInfo const* memory, ONNXTensorElementDataType xType,
        void const* xData, void* yData, int64_t m, int64_t k, int64_t n)
    {
        type = xType;
        out = yData;
        outCount = m * n;
        if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        {
            x = static_cast<float const*>(xData);
            y = static_cast<float*>(yData);
            return nullptr;
        }
        SQZ_ORT_RETURN_IF_ERROR(scratch.allocate(context, memory, static_cast<size_t>(m * (k + n)) * sizeof(float)));
        auto const* src = static_cast<uint16_t const*>(xData);
        auto* dst = static_cast<float*>(scratch.data);
        if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
        {
            for (int64_t i = 0; i < m * k; ++i)
            {
                dst[i] = sqz::format::bf16BitsToFloat(src[i]);
            }
        }
        else
        {
            cpu::sqzCpuHalfToFloat(src, dst, m * k);
        }
        x = dst;
        y = dst + m * k;
        return nullptr;
    }

    void finish() const
    {
        if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        {
            return;
        }
        auto* dst = static_cast<uint16_t*>(out);
        if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
        {
            for (int64_t i = 0; i < outCount; ++i)
            {
                dst[i] = sqz::format::floatToBf16Bits(y[i]);
            }
        }
        else
        {
            cpu::sqzCpuFloatToHalf(y, dst, outCount);
        }
    }
};

OrtStatus* Kernel::compute(OrtKernelContext* context) const
{
    size_t count = 0;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelContext_GetInputCount(context, &count));
    std::vector<OrtValue const*> values(static_cast<size_t>(nbInputs), nullptr);
    for (size_t i = 0; i < values.size() && i < count; ++i)
    {
        SQZ_ORT_RETURN_IF_ERROR(gApi->KernelContext_GetInput(context, i, &values[i]));
    }
    for (size_t i = 0; i < values.size(); ++i)
    {
        if (values[i] == nullptr)
        {
            return fail(core::positionName(static_cast<int32_t>(i), nbInputs) + " is missing at run time");
        }
    }
    std::vector<TensorDesc> inputs(values.size());
    SQZ_ORT_RETURN_IF_ERROR(describeValue(values[core::kX], inputs[core::kX]));
    std::vector<void*> data(values.size(), nullptr);
    for (size_t i = 0; i < values.size(); ++i)
    {
        SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorMutableData(const_cast<OrtValue*>(values[i]), &data[i]));
    }
    TensorDesc const& x = inputs[core::kX];
    int64_t nnzNow = nnz;
    if (weightsChecked)
    {
        SQZ_ORT_RETURN_IF_ERROR(checkX(x));
        if (x.dims.empty() || x.dims.back() != params.inFeatures)
        {
            return fail("input 0 (x) must be [..., in_features=" + std::to_string(params.inFeatures) + "]");
        }
    }
    else
    {
        for (size_t i = core::kQWEIGHT; i < values.size(); ++i)
        {
            SQZ_ORT_RETURN_IF_ERROR(describeValue(values[i], inputs[i]));
        }
        bool const hostCsr = nbInputs == core::kNB_INPUTS_SPARSE && !cuda;
        SQZ_ORT_RETURN_IF_ERROR(checkInputs(inputs, //
            hostCsr ? static_cast<int32_t const*>(data[core::kROW_PTR]) : nullptr,
            hostCsr ? static_cast<int32_t const*>(data[core::kCOL]) : nullptr));
        nnzNow = nnzOf(inputs);
    }

    int64_t const m = core::rowsOf(x.dims);
    if (m > INT32_MAX)
    {
        return fail("x has " + std::to_string(m) + " rows; the CPU kernel takes at most 2^31 - 1 per call");
    }
    std::vector<int64_t> const yDims = core::outputShape(params, x.dims);
    OrtValue* yValue = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelContext_GetOutput(context, 0, yDims.data(), yDims.size(), &yValue));
    void* yData = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorMutableData(yValue, &yData));
    if (m == 0)
    {
        return nullptr;
    }
#if defined(SQZ_ORT_CUDA)
    if (cuda)
    {
        return runCuda(context, values[core::kX], x, data, yData, m, nnzNow);
    }
#endif
    return runCpu(context, x, data, yData, m, nnzNow);
}

OrtStatus* Kernel::runCpu(OrtKernelContext* context, TensorDesc const& x, std::vector<void*> const& data, void* yData,
    int64_t m, int64_t nnzNow) const
{
    int64_t const k = params.inFeatures;
    int64_t const n = params.outFeatures;
    Fp32Io io;
    SQZ_ORT_RETURN_IF_ERROR(io.begin(context, cpuMemory, x.type, data[core::kX], yData, m, k, n));

    Job job{};
    job.shape.m = static_cast<int32_t>(m);
    job.shape.inFeatures = params.inFeatures;
    job.shape.outFeatures = params.outFeatures;
    job.shape.bits = params.bits;
    job.shape.nnz = static_cast<int32_t>(nnzNow);
    if (nnzNow > 0)
    {
        job.args.rowPtr = static_cast<int32_t const*>(data[core::kROW_PTR]);
        job.args.col = static_cast<int32_t const*>(data[core::kCOL]);
        job.args.val = static_cast<uint16_t const*>(data[core::kVAL]);
    }
    job.args.x = io.x;
    job.args.qweight = static_cast<int32_t const*>(data[core::kQWEIGHT]);
    job.args.lut = static_cast<uint16_t const*>(data[core::kLUT]);
    job.args.y = io.y;
    job.isa = isa;
    if (m >= kGEMM_MIN_M && gemm != nullptr)
    {
        SQZ_ORT_RETURN_IF_ERROR(runGemm(context, job.shape, job.args));
    }
    else
    {
        int32_t const parts = static_cast<int32_t>(partsFor(n));
        job.bounds.resize(static_cast<size_t>(parts) + 1);
        cpu::sqzLinearCpuSplit(job.shape, job.args.rowPtr, parts, job.bounds.data());
        SQZ_ORT_RETURN_IF_ERROR(parallelFor(context, runPart, parts, &job));
    }
    io.finish();
    return nullptr;
}

//! The large-M path of both ops: W in tiles of output rows, each made fp32 by `fill` (on the session's
//! threads) and multiplied by onnxruntime's Gemm, so the weight is decoded once per call and the multiply
//! runs at the graph's own GEMM speed. Scratch: one fp32 tile, plus an [M, tile rows] output tile when W
//! takes more than one.
OrtStatus* KernelBase::tiledGemm(OrtKernelContext* context, float const* x, float* y, int64_t m, int64_t k,
    int64_t n, TileSlot& slot, void (*fill)(void*, size_t), void* job, char const* made) const
{
    int64_t const tileRows = cpu::sqzDequantTileRows(k, n);
    OrtLogger const* logger = nullptr;
    if (!gemmLogged.exchange(true) && gApi->KernelContext_GetLogger(context, &logger) == nullptr && logger != nullptr)
    {
        logMessage(logger, ORT_LOGGING_LEVEL_INFO,
            prefix() + std::to_string(m) + " rows of x: W " + made + " in tiles of " + std::to_string(tileRows)
                + " rows into onnxruntime's Gemm",
            "tiledGemm");
    }
    bool const tiled = tileRows < n;
    Scratch scratch;
    SQZ_ORT_RETURN_IF_ERROR(scratch.allocate(
        context, cpuMemory, static_cast<size_t>(tileRows * k + (tiled ? m * tileRows : 0)) * sizeof(float)));
    slot.tile = static_cast<float*>(scratch.data);
    float* const out = tiled ? slot.tile + tileRows * k : y;
    FloatView xView;
    SQZ_ORT_RETURN_IF_ERROR(xView.wrap(cpuMemory, x, m, k));
    for (int64_t n0 = 0; n0 < n; n0 += tileRows)
    {
        slot.n0 = n0;
        slot.rows = std::min(tileRows, n - n0);
        slot.parts = partsFor(slot.rows);
        SQZ_ORT_RETURN_IF_ERROR(parallelFor(context, fill, slot.parts, job));
        FloatView w;
        FloatView yView;
        SQZ_ORT_RETURN_IF_ERROR(w.wrap(cpuMemory, slot.tile, slot.rows, k));
        SQZ_ORT_RETURN_IF_ERROR(yView.wrap(cpuMemory, out, m, slot.rows));
        OrtValue const* inputs[2] = {xView.value, w.value};
        SQZ_ORT_RETURN_IF_ERROR(gApi->InvokeOp(context, gemm, inputs, 2, &yView.value, 1));
        if (tiled)
        {
            for (int64_t i = 0; i < m; ++i)
            {
                std::memcpy(y + i * n + n0, out + i * slot.rows, static_cast<size_t>(slot.rows) * sizeof(float));
            }
        }
    }
    return nullptr;
}

//! SqzLinear's large-M path: tiles of sqzDequantTileRows rows (1M weights, at least 256 rows).
OrtStatus* Kernel::runGemm(OrtKernelContext* context, cpu::CpuShape const& shape, cpu::CpuArgs const& args) const
{
    DequantJob job;
    job.shape = shape;
    job.args = args;
    job.isa = isa;
    return tiledGemm(
        context, args.x, args.y, shape.m, shape.inFeatures, shape.outFeatures, job, dequantPart, &job, "dequantized");
}


// --- DenseLinear: an fp16 weight read as fp16 ---------------------------------------------------

constexpr char const* kDENSE_NAME = "DenseLinear";
constexpr size_t kDENSE_X = 0;
constexpr size_t kDENSE_W = 1;

//! One DenseLinear node: y = x W^T with W a plain fp16 [N, K] (sqz_export puts one on a tied lm_head's
//! embedding at session creation), read as fp16 by sqzHalfLinearCpuRows for M < kGEMM_MIN_M, and
//! converted into fp32 tiles for onnxruntime's Gemm above. onnxruntime itself would fold W into an fp32
//! copy at session creation: twice the bytes to hold, and to read at every decode step.
struct DenseKernel : KernelBase
{
    DenseKernel()
        : KernelBase(kDENSE_NAME)
    {
    }

    OrtStatus* checkWeight(TensorDesc const& w) const
    {
        if (w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 || w.dims.size() != 2 || w.dims[0] < 1 || w.dims[1] < 1
            || w.dims[0] > INT32_MAX || w.dims[1] > INT32_MAX)
        {
            return fail("input 1 (w) must be fp16 [out_features, in_features], both in [1, 2^31 - 1]");
        }
        return nullptr;
    }

    OrtStatus* create(OrtKernelInfo const* info);
    OrtStatus* compute(OrtKernelContext* context) const;
};

//! One DenseLinear call's arguments, shared by the parallel parts of the GEMV (`parts` of N) or of a
//! large-M tile's conversion (the TileSlot).
struct HalfJob : TileSlot
{
    cpu::HalfLinearArgs args{};
    cpu::Isa isa{cpu::Isa::kScalar};
};

void halfRowsPart(void* data, size_t part)
{
    HalfJob const& job = *static_cast<HalfJob const*>(data);
    int64_t const n = job.args.outFeatures;
    int64_t const p = static_cast<int64_t>(part);
    cpu::sqzHalfLinearCpuRows(job.args, job.isa, n * p / job.parts, n * (p + 1) / job.parts);
}

void halfTilePart(void* data, size_t part)
{
    HalfJob const& job = *static_cast<HalfJob const*>(data);
    int64_t const k = job.args.inFeatures;
    int64_t const p = static_cast<int64_t>(part);
    int64_t const begin = job.rows * p / job.parts;
    int64_t const end = job.rows * (p + 1) / job.parts;
    cpu::sqzCpuHalfToFloat(job.args.w + (job.n0 + begin) * k, job.tile + begin * k, (end - begin) * k);
}

OrtStatus* DenseKernel::create(OrtKernelInfo const* info)
{
    SQZ_ORT_RETURN_IF_ERROR(readName(info));
    std::string weight = "w not constant: checked per call";
    int isConstant = 0;
    OrtValue const* w = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelInfoGetConstantInput_tensor(info, kDENSE_W, &isConstant, &w));
    if (isConstant && w != nullptr)
    {
        TensorDesc desc;
        SQZ_ORT_RETURN_IF_ERROR(describeValue(w, desc));
        SQZ_ORT_RETURN_IF_ERROR(checkWeight(desc));
        weight = "K=" + std::to_string(desc.dims[1]) + ", N=" + std::to_string(desc.dims[0]);
    }
    isa = cpu::sqzCpuBestIsa();
    OrtStatus* gemmStatus = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(createResources(info, &gemmStatus));
    logCreation(*this, info,
        std::string("CPU fp16 GEMV for M < ") + std::to_string(kGEMM_MIN_M)
            + ", fp32 tiles + onnxruntime's Gemm above, isa=" + cpu::sqzCpuIsaName(isa) + " (" + weight + ")",
        gemmStatus);
    return nullptr;
}

OrtStatus* DenseKernel::compute(OrtKernelContext* context) const
{
    OrtValue const* xValue = nullptr;
    OrtValue const* wValue = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelContext_GetInput(context, kDENSE_X, &xValue));
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelContext_GetInput(context, kDENSE_W, &wValue));
    if (xValue == nullptr || wValue == nullptr)
    {
        return fail("inputs 0 (x) and 1 (w) are both required");
    }
    TensorDesc x;
    TensorDesc w;
    SQZ_ORT_RETURN_IF_ERROR(describeValue(xValue, x));
    SQZ_ORT_RETURN_IF_ERROR(describeValue(wValue, w));
    SQZ_ORT_RETURN_IF_ERROR(checkWeight(w));
    int64_t const n = w.dims[0];
    int64_t const k = w.dims[1];
    if (!isActivationType(x.type, false))
    {
        return fail("input 0 (x) must be fp16, bf16 or fp32");
    }
    if (x.dims.empty() || x.dims.back() != k)
    {
        return fail("input 0 (x) must be [..., in_features=" + std::to_string(k) + "] for w [" + std::to_string(n) + ", "
            + std::to_string(k) + "]");
    }
    int64_t const m = core::rowsOf(x.dims);
    if (m > INT32_MAX)
    {
        return fail("x has " + std::to_string(m) + " rows; the CPU kernel takes at most 2^31 - 1 per call");
    }
    std::vector<int64_t> yDims = x.dims;
    yDims.back() = n;
    OrtValue* yValue = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelContext_GetOutput(context, 0, yDims.data(), yDims.size(), &yValue));
    void* yData = nullptr;
    void* xData = nullptr;
    void* wData = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorMutableData(yValue, &yData));
    SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorMutableData(const_cast<OrtValue*>(xValue), &xData));
    SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorMutableData(const_cast<OrtValue*>(wValue), &wData));
    if (m == 0)
    {
        return nullptr;
    }
    Fp32Io io;
    SQZ_ORT_RETURN_IF_ERROR(io.begin(context, cpuMemory, x.type, xData, yData, m, k, n));
    HalfJob job;
    job.args = {static_cast<int32_t>(m), static_cast<int32_t>(k), static_cast<int32_t>(n), io.x,
        static_cast<uint16_t const*>(wData), io.y};
    job.isa = isa;
    if (m >= kGEMM_MIN_M && gemm != nullptr)
    {
        SQZ_ORT_RETURN_IF_ERROR(tiledGemm(context, io.x, io.y, m, k, n, job, halfTilePart, &job, "converted to fp32"));
    }
    else
    {
        job.parts = partsFor(n);
        SQZ_ORT_RETURN_IF_ERROR(parallelFor(context, halfRowsPart, job.parts, &job));
    }
    io.finish();
    return nullptr;
}

#if defined(SQZ_ORT_CUDA)
//! The CUDA launcher on the session's compute stream; its workspace (dequantized tiles for large M)
//! comes from the session's allocator for x's device.
OrtStatus* Kernel::runCuda(OrtKernelContext* context, OrtValue const* xValue, TensorDesc const& x,
    std::vector<void*> const& data, void* yData, int64_t m, int64_t nnzNow) const
{
    sqz::SqzLinearShape shape{};
    shape.m = static_cast<int32_t>(m);
    shape.inFeatures = params.inFeatures;
    shape.outFeatures = params.outFeatures;
    shape.bits = params.bits;
    shape.nnz = static_cast<int32_t>(nnzNow);
    shape.chunkNnz = params.chunkNnz;
    shape.dtype = x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 ? sqz::DataType::kBF16 : sqz::DataType::kHALF;
    if (char const* message = sqz::sqzLinearValidate(shape))
    {
        return fail(message);
    }
    void* stream = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->KernelContext_GetGPUComputeStream(context, &stream));
    size_t const bytes = sqz::sqzLinearWorkspaceSize(shape);
    Scratch workspace;
    if (bytes > 0)
    {
        OrtMemoryInfo const* device = nullptr;
        SQZ_ORT_RETURN_IF_ERROR(gApi->GetTensorMemoryInfo(xValue, &device));
        SQZ_ORT_RETURN_IF_ERROR(workspace.allocate(context, device, bytes));
    }
    sqz::SqzLinearArgs args{};
    args.x = data[core::kX];
    args.qweight = static_cast<int32_t const*>(data[core::kQWEIGHT]);
    args.lut = data[core::kLUT];
    if (nnzNow > 0)
    {
        args.rowPtr = static_cast<int32_t const*>(data[core::kROW_PTR]);
        args.col = static_cast<int32_t const*>(data[core::kCOL]);
        args.val = data[core::kVAL];
        args.chunkRow = static_cast<int32_t const*>(data[core::kCHUNK_ROW]);
    }
    args.y = yData;
    args.workspace = workspace.data;
    args.workspaceBytes = bytes;
    cudaError_t const status
        = sqz::sqzLinearLaunch(shape, args, sqz::KernelKind::kAuto, static_cast<cudaStream_t>(stream));
    if (status != cudaSuccess)
    {
        return error(ORT_EP_FAIL, prefix() + "CUDA launch failed: " + cudaGetErrorString(status));
    }
    return nullptr;
}
#endif

// --- OrtCustomOp callbacks ---------------------------------------------------------------------

template <class K>
OrtStatus* ORT_API_CALL createKernel(OrtCustomOp const* op, OrtApi const*, OrtKernelInfo const* info, void** out)
{
    *out = nullptr;
    auto* kernel = new (std::nothrow) K();
    if (kernel == nullptr)
    {
        return error(ORT_FAIL, std::string(op->GetName(op)) + ": out of memory creating a kernel");
    }
    kernel->cuda = std::strcmp(op->GetExecutionProviderType(op), kCUDA_PROVIDER) == 0;
    try
    {
        if (OrtStatus* status = kernel->create(info))
        {
            delete kernel;
            return status;
        }
    }
    catch (std::exception const& e)
    {
        delete kernel;
        return error(ORT_FAIL, std::string(op->GetName(op)) + ": " + e.what());
    }
    *out = kernel;
    return nullptr;
}

template <class K>
OrtStatus* ORT_API_CALL computeKernel(void* kernel, OrtKernelContext* context)
{
    try
    {
        return static_cast<K const*>(kernel)->compute(context);
    }
    catch (std::exception const& e)
    {
        return error(ORT_FAIL, static_cast<K const*>(kernel)->prefix() + e.what());
    }
}

template <class K>
void ORT_API_CALL destroyKernel(void* kernel)
{
    delete static_cast<K*>(kernel);
}

//! y = x's shape (its symbols kept) with the last extent replaced by `outFeatures`, x's element type.
OrtStatus* setOutputLikeX(OrtShapeInferContext* context, int64_t outFeatures, char const* opName)
{
    OrtTensorTypeAndShapeInfo* xInfo = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->ShapeInferContext_GetInputTypeShape(context, 0, &xInfo));
    TensorDesc x;
    OrtStatus* status = describe(xInfo, x);
    std::vector<char const*> symbols(x.dims.size(), nullptr);
    if (status == nullptr && !x.dims.empty())
    {
        status = gApi->GetSymbolicDimensions(xInfo, symbols.data(), symbols.size());
    }
    if (status == nullptr && x.dims.empty())
    {
        status = error(ORT_INVALID_GRAPH, std::string(opName) + ": input 0 (x) is a scalar; expected [..., in_features]");
    }
    if (status == nullptr)
    {
        x.dims.back() = outFeatures;
        symbols.back() = "";
        OrtTensorTypeAndShapeInfo* yInfo = nullptr;
        status = gApi->CreateTensorTypeAndShapeInfo(&yInfo);
        if (status == nullptr)
        {
            status = gApi->SetTensorElementType(yInfo, x.type);
        }
        if (status == nullptr)
        {
            status = gApi->SetDimensions(yInfo, x.dims.data(), x.dims.size());
        }
        if (status == nullptr)
        {
            status = gApi->SetSymbolicDimensions(yInfo, symbols.data(), symbols.size());
        }
        if (status == nullptr)
        {
            status = gApi->ShapeInferContext_SetOutputTypeShape(context, 0, yInfo);
        }
        if (yInfo != nullptr)
        {
            gApi->ReleaseTensorTypeAndShapeInfo(yInfo);
        }
    }
    return status; // xInfo belongs to the context (onnxruntime frees it; releasing it here is a double free)
}

//! SqzLinear: N is the out_features attribute.
OrtStatus* ORT_API_CALL inferOutputShape(OrtCustomOp const*, OrtShapeInferContext* context)
{
    OrtOpAttr const* attr = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->ShapeInferContext_GetAttribute(context, "out_features", &attr));
    if (attr == nullptr)
    {
        return error(ORT_INVALID_GRAPH, "SqzLinear: missing required attribute 'out_features'");
    }
    int64_t outFeatures = 0;
    size_t read = 0;
    SQZ_ORT_RETURN_IF_ERROR(gApi->ReadOpAttr(attr, ORT_OP_ATTR_INT, &outFeatures, sizeof(outFeatures), &read));
    return setOutputLikeX(context, outFeatures, core::kPLUGIN_NAME);
}

//! DenseLinear: N is w's first extent (-1 where unknown).
OrtStatus* ORT_API_CALL inferDenseOutputShape(OrtCustomOp const*, OrtShapeInferContext* context)
{
    OrtTensorTypeAndShapeInfo* wInfo = nullptr;
    SQZ_ORT_RETURN_IF_ERROR(gApi->ShapeInferContext_GetInputTypeShape(context, kDENSE_W, &wInfo));
    TensorDesc w;
    SQZ_ORT_RETURN_IF_ERROR(describe(wInfo, w));
    if (w.dims.size() != 2)
    {
        return error(ORT_INVALID_GRAPH, "DenseLinear: input 1 (w) must be 2-D [out_features, in_features]");
    }
    return setOutputLikeX(context, w.dims[0], kDENSE_NAME);
}

char const* ORT_API_CALL opName(OrtCustomOp const*)
{
    return core::kPLUGIN_NAME;
}

char const* ORT_API_CALL cpuProvider(OrtCustomOp const*)
{
    return kCPU_PROVIDER;
}

#if defined(SQZ_ORT_CUDA)
char const* ORT_API_CALL cudaProvider(OrtCustomOp const*)
{
    return kCUDA_PROVIDER;
}
#endif

//! x (and so y) is any of fp16/bf16/fp32: UNDEFINED lets the kernel check it; the weights are fixed.
ONNXTensorElementDataType ORT_API_CALL inputType(OrtCustomOp const*, size_t index)
{
    switch (index)
    {
    case core::kX: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    case core::kLUT:
    case core::kVAL: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    }
}

size_t ORT_API_CALL inputCount(OrtCustomOp const*)
{
    return core::kNB_INPUTS_SPARSE;
}

ONNXTensorElementDataType ORT_API_CALL outputType(OrtCustomOp const*, size_t)
{
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

size_t ORT_API_CALL outputCount(OrtCustomOp const*)
{
    return core::kNB_OUTPUTS;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL inputCharacteristic(OrtCustomOp const*, size_t index)
{
    return index < static_cast<size_t>(core::kNB_INPUTS_DENSE) ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtMemType ORT_API_CALL inputMemoryType(OrtCustomOp const*, size_t)
{
    return OrtMemTypeDefault;
}

int ORT_API_CALL variadicMinArity(OrtCustomOp const*)
{
    return 1;
}

int ORT_API_CALL variadicHomogeneity(OrtCustomOp const*)
{
    return 1;
}

int ORT_API_CALL startVersion(OrtCustomOp const*)
{
    return kOPSET;
}

int ORT_API_CALL endVersion(OrtCustomOp const*)
{
    return kOPSET;
}

char const* ORT_API_CALL denseName(OrtCustomOp const*)
{
    return kDENSE_NAME;
}

//! x is any of fp16/bf16/fp32 (checked by the kernel); w is fp16.
ONNXTensorElementDataType ORT_API_CALL denseInputType(OrtCustomOp const*, size_t index)
{
    return index == kDENSE_X ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

size_t ORT_API_CALL denseInputCount(OrtCustomOp const*)
{
    return 2;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL requiredCharacteristic(OrtCustomOp const*, size_t)
{
    return INPUT_OUTPUT_REQUIRED;
}

//! SqzLinear for one execution provider, filled for OrtCustomOp version 17: onnxruntime reads no field
//! added after that version.
OrtCustomOp makeOp(char const*(ORT_API_CALL* provider)(OrtCustomOp const*))
{
    OrtCustomOp op;
    std::memset(&op, 0, sizeof(op));
    op.version = kORT_API_VERSION;
    op.GetName = opName;
    op.GetExecutionProviderType = provider;
    op.GetInputType = inputType;
    op.GetInputTypeCount = inputCount;
    op.GetOutputType = outputType;
    op.GetOutputTypeCount = outputCount;
    op.KernelDestroy = destroyKernel<Kernel>;
    op.GetInputCharacteristic = inputCharacteristic;
    op.GetOutputCharacteristic = requiredCharacteristic;
    op.GetInputMemoryType = inputMemoryType;
    op.GetVariadicInputMinArity = variadicMinArity;
    op.GetVariadicInputHomogeneity = variadicHomogeneity;
    op.GetVariadicOutputMinArity = variadicMinArity;
    op.GetVariadicOutputHomogeneity = variadicHomogeneity;
    op.CreateKernelV2 = createKernel<Kernel>;
    op.KernelComputeV2 = computeKernel<Kernel>;
    op.InferOutputShapeFn = inferOutputShape;
    op.GetStartVersion = startVersion;
    op.GetEndVersion = endVersion;
    return op;
}

//! DenseLinear (CPU only): SqzLinear's op with its own name, two required inputs and its kernel.
OrtCustomOp makeDenseOp()
{
    OrtCustomOp op = makeOp(cpuProvider);
    op.GetName = denseName;
    op.GetInputType = denseInputType;
    op.GetInputTypeCount = denseInputCount;
    op.GetInputCharacteristic = requiredCharacteristic;
    op.KernelDestroy = destroyKernel<DenseKernel>;
    op.CreateKernelV2 = createKernel<DenseKernel>;
    op.KernelComputeV2 = computeKernel<DenseKernel>;
    op.InferOutputShapeFn = inferDenseOutputShape;
    return op;
}

//! Every op of the library: SqzLinear once per execution provider (inputs of the CUDA one live on the
//! device), DenseLinear on the CPU.
std::vector<OrtCustomOp> const gOps{
    makeOp(cpuProvider),
    makeDenseOp(),
#if defined(SQZ_ORT_CUDA)
    makeOp(cudaProvider),
#endif
};

} // namespace

/*!
 * The entry point of SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary_V2: adds
 * the "sqz" domain with SqzLinear and DenseLinear to `options`. The domain is created once per process and shared by
 * every session options object (onnxruntime keeps a pointer to it), so it is never released.
 */
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(
    OrtSessionOptions* options, OrtApiBase const* apiBase)
{
    static std::mutex mutex;
    static OrtCustomOpDomain* domain = nullptr;
    std::lock_guard<std::mutex> lock(mutex);
    if (gApi == nullptr)
    {
        OrtApi const* api = apiBase->GetApi(kORT_API_VERSION);
        if (api == nullptr)
        {
            // Every onnxruntime has API version 1, whose first entry is CreateStatus: fail the
            // registration rather than leave the nodes to the function fallback unnoticed.
            std::string const message = std::string("libsqz_ort_ops needs onnxruntime >= 1.17 (C API version ")
                + std::to_string(kORT_API_VERSION) + "), this process runs onnxruntime " + apiBase->GetVersionString();
            return apiBase->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
        }
        gApi = api;
    }
    if (domain == nullptr)
    {
        SQZ_ORT_RETURN_IF_ERROR(gApi->CreateCustomOpDomain(kDOMAIN, &domain));
        for (OrtCustomOp const& op : gOps)
        {
            if (OrtStatus* status = gApi->CustomOpDomain_Add(domain, &op))
            {
                gApi->ReleaseCustomOpDomain(domain);
                domain = nullptr;
                return status;
            }
        }
    }
    return gApi->AddCustomOpDomain(options, domain);
}
