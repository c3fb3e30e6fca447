/*
 * SqzLinear plugin core: every rule of the sqz::SqzLinear op that does not need TensorRT.
 *
 * The TensorRT adapter (sqzLinearPlugin.h) is a thin translation layer: it turns PluginFields,
 * Dims/DimsExprs and DataTypes into the plain types below, asks this core, and reports the core's
 * message through the TensorRT logger. Keeping the rules here lets them be unit-tested on any machine
 * (no TensorRT, no GPU), see tests/sqzLinearPluginCoreTest.cpp.
 *
 * Op contract (mirrors sqz_export/formats.py, layout 2; documented in plugins/README.md):
 *   inputs  0 x          fp16|bf16 [..., K]
 *           1 qweight    int32     [N, ceil(K/32) * bits]     (layout 2, row-major words)
 *           2 lut        fp16      [N, 2^bits]
 *           3 row_ptr    int32     [N + 1]                    (optional sparse part: inputs 3..6 together)
 *           4 col        int32     [nnz]
 *           5 val        fp16      [nnz]
 *           6 chunk_row  int32     [ceil(nnz / chunk_nnz)]
 *   output  0 y          dtype(x)  [..., N]
 */
#pragma once

#include "sqzFormat.h" // the packed format's constants, shared with the kernels (plugins/common)

#include <cstdint>
#include <string>
#include <vector>

namespace sqz
{
namespace plugin
{

constexpr char const* kPLUGIN_NAME = "SqzLinear";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "sqz";

constexpr int32_t kNB_INPUTS_DENSE = 3;  //!< x, qweight, lut
constexpr int32_t kNB_INPUTS_SPARSE = 7; //!< x, qweight, lut, row_ptr, col, val, chunk_row
constexpr int32_t kNB_OUTPUTS = 1;

//! Input positions, in ONNX input order.
enum InputIndex : int32_t
{
    kX = 0,
    kQWEIGHT = 1,
    kLUT = 2,
    kROW_PTR = 3,
    kCOL = 4,
    kVAL = 5,
    kCHUNK_ROW = 6,
};

//! Attribute (plugin field) types the core understands; the adapter maps PluginFieldType onto these.
enum class FieldType : int32_t
{
    kINT32,
    kINT64,
    kCHAR,
    kOTHER,
};

//! A non-owning view of one plugin field (same shape as nvinfer1::PluginField).
struct FieldView
{
    char const* name;
    void const* data;
    FieldType type;
    int32_t length;
};

//! Tensor element types, as far as the op cares.
enum class TensorType : int32_t
{
    kFLOAT16,
    kBFLOAT16,
    kFLOAT32,
    kINT32,
    kOTHER,
};

//! The op's attributes. chunkNnz == 0 means "not given" (allowed only without the sparse inputs).
struct SqzLinearParams
{
    int32_t bits{0};
    int32_t inFeatures{0};
    int32_t outFeatures{0};
    int32_t layout{0};
    int32_t chunkNnz{0};

    bool operator==(SqzLinearParams const& other) const noexcept;
};

//! One attribute of the op, as the creator announces it (getFieldNames) and README documents it.
struct AttributeSpec
{
    char const* name;
    bool required;
    char const* allowed;
};

//! The int32 attributes, in the order getFieldNames reports and getFieldsToSerialize writes them.
std::vector<AttributeSpec> const& attributeSpecs();

//! Attributes that the ONNX parser consumes to pick the plugin; tolerated (and ignored) if present.
bool isParserAttribute(char const* name);

//! Result of parsing: params are meaningful only when error is empty.
struct ParseResult
{
    SqzLinearParams params;
    std::string error;
};

//! Reads and validates the attributes (int32 or int64 values; unknown names are an error).
ParseResult parseFields(std::vector<FieldView> const& fields);

//! Checks attribute values against each other and the supported set; returns "" if valid.
std::string validateParams(SqzLinearParams const& params);

//! Checks the number of inputs (3 dense, 7 dense+sparse); returns "" if valid.
std::string checkInputCount(int32_t nbInputs);

//! Dimension value that is not known at build time (a dynamic extent).
constexpr int64_t kDYNAMIC = -1;

/*!
 * Checks input ranks and extents against the attributes; returns "" if valid.
 * dims[i] are the extents of input i; kDYNAMIC extents are accepted where the op allows a dynamic
 * extent (the leading dims of x) and only checked when known elsewhere.
 */
std::string checkInputShapes(SqzLinearParams const& params, std::vector<std::vector<int64_t>> const& dims);

//! Output y extents: x's extents with the last replaced by out_features.
std::vector<int64_t> outputShape(SqzLinearParams const& params, std::vector<int64_t> const& xDims);

//! Rows of x seen as a matrix [M, K]: product of all but the last extent (kDYNAMIC if any is dynamic).
int64_t rowsOf(std::vector<int64_t> const& dims);

//! Non-zeros of the sparse part given the number of inputs and the extent of `col` (0 when dense).
int64_t sparseNnz(int32_t nbInputs, int64_t colExtent);

/*!
 * supportsFormatCombination rule for position pos (inputs first, then the output).
 * types[0..pos] are the types TensorRT proposes so far; the output must equal x's type.
 */
bool supportsType(int32_t pos, int32_t nbInputs, TensorType const* types);

//! The type(s) expected at a position, for messages: e.g. "fp16 or bf16".
char const* expectedTypeName(int32_t pos, int32_t nbInputs);

//! The name of input/output position pos, for messages: e.g. "input 1 (qweight)".
std::string positionName(int32_t pos, int32_t nbInputs);

/*!
 * Serialized attributes: a byte buffer holding the int32 values in attributeSpecs() order, and the
 * field views that point into it. The views stay valid while the buffer is alive and unmodified,
 * so the adapter keeps one SerializedFields per plugin for getFieldsToSerialize.
 */
struct SerializedFields
{
    std::vector<uint8_t> buffer;
    std::vector<FieldView> fields;
};

//! Writes params into out (buffer + views); parseFields(out.fields) returns params again.
void serializeFields(SqzLinearParams const& params, SerializedFields& out);

} // namespace plugin
} // namespace sqz
