#include "sqzLinearPluginCore.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <limits>
#include <sstream>

namespace sqz
{
namespace plugin
{
namespace
{

constexpr char const* kINPUT_NAMES[kNB_INPUTS_SPARSE] = {"x", "qweight", "lut", "row_ptr", "col", "val", "chunk_row"};
constexpr char const* kPARSER_ATTRIBUTES[] = {"plugin_namespace", "plugin_version"};

template <size_t N>
std::string joined(int32_t const (&values)[N])
{
    std::ostringstream out;
    for (size_t i = 0; i < N; ++i)
    {
        out << (i ? ", " : "") << values[i];
    }
    return out.str();
}

std::string shapeText(std::vector<int64_t> const& dims)
{
    std::ostringstream out;
    out << '[';
    for (size_t i = 0; i < dims.size(); ++i)
    {
        out << (i ? ", " : "");
        if (dims[i] == kDYNAMIC)
        {
            out << '?';
        }
        else
        {
            out << dims[i];
        }
    }
    out << ']';
    return out.str();
}

//! "" if dims match expected (kDYNAMIC in dims matches anything), else a message naming the input.
std::string expectShape(int32_t index, std::vector<int64_t> const& dims, std::vector<int64_t> const& expected,
    std::string const& why)
{
    bool ok = dims.size() == expected.size();
    for (size_t i = 0; ok && i < dims.size(); ++i)
    {
        ok = dims[i] == kDYNAMIC || dims[i] == expected[i];
    }
    if (ok)
    {
        return "";
    }
    return positionName(index, kNB_INPUTS_SPARSE) + " has shape " + shapeText(dims) + ", expected "
        + shapeText(expected) + " (" + why + ")";
}

bool readInt(FieldView const& field, int32_t& value, std::string& error)
{
    if (field.length != 1 || field.data == nullptr)
    {
        error = std::string("attribute '") + field.name + "' must be a single integer, got " + std::to_string(field.length)
            + " values";
        return false;
    }
    if (field.type == FieldType::kINT32)
    {
        value = *static_cast<int32_t const*>(field.data);
        return true;
    }
    if (field.type == FieldType::kINT64)
    {
        int64_t const wide = *static_cast<int64_t const*>(field.data);
        if (wide < std::numeric_limits<int32_t>::min() || wide > std::numeric_limits<int32_t>::max())
        {
            error = std::string("attribute '") + field.name + "' = " + std::to_string(wide) + " does not fit in int32";
            return false;
        }
        value = static_cast<int32_t>(wide);
        return true;
    }
    error = std::string("attribute '") + field.name + "' must be an integer (int32 or int64)";
    return false;
}

} // namespace

bool SqzLinearParams::operator==(SqzLinearParams const& other) const noexcept
{
    return bits == other.bits && inFeatures == other.inFeatures && outFeatures == other.outFeatures
        && layout == other.layout && chunkNnz == other.chunkNnz;
}

std::vector<AttributeSpec> const& attributeSpecs()
{
    static std::vector<AttributeSpec> const specs{
        {"bits", true, "2, 3, 4 or 8"},
        {"in_features", true, "K > 0"},
        {"out_features", true, "N > 0"},
        {"layout", true, "2 (row-major words, the kernel layout)"},
        {"chunk_nnz", false, "> 0 with the sparse inputs; 0 or absent without them"},
    };
    return specs;
}

bool isParserAttribute(char const* name)
{
    return std::any_of(std::begin(kPARSER_ATTRIBUTES), std::end(kPARSER_ATTRIBUTES),
        [name](char const* known) { return std::strcmp(known, name) == 0; });
}

ParseResult parseFields(std::vector<FieldView> const& fields)
{
    ParseResult result;
    SqzLinearParams& p = result.params;
    int32_t* const slots[] = {&p.bits, &p.inFeatures, &p.outFeatures, &p.layout, &p.chunkNnz};
    std::vector<AttributeSpec> const& specs = attributeSpecs();
    std::vector<bool> seen(specs.size(), false);
    for (FieldView const& field : fields)
    {
        if (field.name == nullptr)
        {
            result.error = "a plugin field has no name";
            return result;
        }
        if (isParserAttribute(field.name))
        {
            continue;
        }
        auto const spec = std::find_if(specs.begin(), specs.end(),
            [&field](AttributeSpec const& s) { return std::strcmp(s.name, field.name) == 0; });
        if (spec == specs.end())
        {
            result.error = std::string("unknown attribute '") + field.name
                + "'; SqzLinear takes bits, in_features, out_features, layout, chunk_nnz";
            return result;
        }
        size_t const i = static_cast<size_t>(spec - specs.begin());
        if (!readInt(field, *slots[i], result.error))
        {
            return result;
        }
        seen[i] = true;
    }
    for (size_t i = 0; i < specs.size(); ++i)
    {
        if (specs[i].required && !seen[i])
        {
            result.error = std::string("missing required attribute '") + specs[i].name + "' (" + specs[i].allowed + ")";
            return result;
        }
    }
    result.error = validateParams(p);
    return result;
}

std::string validateParams(SqzLinearParams const& params)
{
    if (!format::isSupportedBits(params.bits))
    {
        return "attribute bits=" + std::to_string(params.bits) + " is not supported; expected one of "
            + joined(format::kSUPPORTED_BITS);
    }
    if (params.inFeatures <= 0)
    {
        return "attribute in_features=" + std::to_string(params.inFeatures) + " must be positive";
    }
    if (params.outFeatures <= 0)
    {
        return "attribute out_features=" + std::to_string(params.outFeatures) + " must be positive";
    }
    if (params.layout != format::kLAYOUT_ROWMAJOR)
    {
        return "attribute layout=" + std::to_string(params.layout)
            + " is not supported; the kernels read layout 2 (row-major words; sqz-export export converts "
              "the checkpoint's layout 1)";
    }
    if (params.chunkNnz < 0)
    {
        return "attribute chunk_nnz=" + std::to_string(params.chunkNnz) + " must not be negative";
    }
    return "";
}

std::string checkInputCount(int32_t nbInputs)
{
    if (nbInputs == kNB_INPUTS_DENSE || nbInputs == kNB_INPUTS_SPARSE)
    {
        return "";
    }
    return "SqzLinear takes 3 inputs (x, qweight, lut) or 7 (plus row_ptr, col, val, chunk_row), got "
        + std::to_string(nbInputs);
}

std::string checkInputShapes(SqzLinearParams const& params, std::vector<std::vector<int64_t>> const& dims)
{
    int32_t const nbInputs = static_cast<int32_t>(dims.size());
    std::string error = checkInputCount(nbInputs);
    if (!error.empty())
    {
        return error;
    }
    int64_t const k = params.inFeatures;
    int64_t const n = params.outFeatures;
    std::vector<int64_t> const& x = dims[kX];
    if (x.empty())
    {
        return positionName(kX, nbInputs) + " is a scalar; expected [..., in_features=" + std::to_string(k) + "]";
    }
    if (x.back() != kDYNAMIC && x.back() != k)
    {
        return positionName(kX, nbInputs) + " has shape " + shapeText(x) + "; its last extent must be in_features="
            + std::to_string(k);
    }
    std::string const why = "bits=" + std::to_string(params.bits) + ", in_features=" + std::to_string(k)
        + ", out_features=" + std::to_string(n);
    error = expectShape(kQWEIGHT, dims[kQWEIGHT], {n, format::packedWords(params.inFeatures, params.bits)},
        "[out_features, ceil(in_features/32)*bits] for " + why);
    if (error.empty())
    {
        error = expectShape(kLUT, dims[kLUT], {n, format::lutEntries(params.bits)}, "[out_features, 2^bits] for " + why);
    }
    if (!error.empty() || nbInputs == kNB_INPUTS_DENSE)
    {
        return error;
    }
    if (params.chunkNnz <= 0)
    {
        return "attribute chunk_nnz=" + std::to_string(params.chunkNnz)
            + " must be positive when the sparse inputs (row_ptr, col, val, chunk_row) are given";
    }
    error = expectShape(kROW_PTR, dims[kROW_PTR], {n + 1}, "[out_features + 1]");
    if (!error.empty())
    {
        return error;
    }
    if (dims[kCOL].size() != 1)
    {
        return positionName(kCOL, nbInputs) + " has shape " + shapeText(dims[kCOL]) + ", expected [nnz]";
    }
    int64_t const nnz = dims[kCOL][0];
    error = expectShape(kVAL, dims[kVAL], {nnz}, "[nnz], the length of col");
    if (error.empty() && nnz != kDYNAMIC)
    {
        int64_t const chunks = (nnz + params.chunkNnz - 1) / params.chunkNnz;
        error = expectShape(kCHUNK_ROW, dims[kCHUNK_ROW], {chunks},
            "[ceil(nnz/chunk_nnz)] for nnz=" + std::to_string(nnz) + ", chunk_nnz=" + std::to_string(params.chunkNnz));
    }
    return error;
}

std::vector<int64_t> outputShape(SqzLinearParams const& params, std::vector<int64_t> const& xDims)
{
    std::vector<int64_t> out = xDims;
    if (!out.empty())
    {
        out.back() = params.outFeatures;
    }
    return out;
}

int64_t rowsOf(std::vector<int64_t> const& dims)
{
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < dims.size(); ++i)
    {
        if (dims[i] == kDYNAMIC)
        {
            return kDYNAMIC;
        }
        rows *= dims[i];
    }
    return rows;
}

int64_t sparseNnz(int32_t nbInputs, int64_t colExtent)
{
    return nbInputs == kNB_INPUTS_SPARSE ? colExtent : 0;
}

bool supportsType(int32_t pos, int32_t nbInputs, TensorType const* types)
{
    TensorType const t = types[pos];
    if (pos == nbInputs) // the output: same type as x
    {
        return t == types[kX];
    }
    switch (pos)
    {
    case kX: return t == TensorType::kFLOAT16 || t == TensorType::kBFLOAT16;
    case kLUT:
    case kVAL: return t == TensorType::kFLOAT16;
    case kQWEIGHT:
    case kROW_PTR:
    case kCOL:
    case kCHUNK_ROW: return t == TensorType::kINT32;
    default: return false;
    }
}

char const* expectedTypeName(int32_t pos, int32_t nbInputs)
{
    if (pos == nbInputs)
    {
        return "the type of x";
    }
    switch (pos)
    {
    case kX: return "fp16 or bf16";
    case kLUT:
    case kVAL: return "fp16";
    default: return "int32";
    }
}

std::string positionName(int32_t pos, int32_t nbInputs)
{
    if (pos == nbInputs)
    {
        return "output 0 (y)";
    }
    if (pos >= 0 && pos < kNB_INPUTS_SPARSE)
    {
        return "input " + std::to_string(pos) + " (" + kINPUT_NAMES[pos] + ")";
    }
    return "position " + std::to_string(pos);
}

void serializeFields(SqzLinearParams const& params, SerializedFields& out)
{
    int32_t const values[] = {params.bits, params.inFeatures, params.outFeatures, params.layout, params.chunkNnz};
    std::vector<AttributeSpec> const& specs = attributeSpecs();
    static_assert(sizeof(values) / sizeof(values[0]) == 5, "one value per attribute spec");
    out.buffer.assign(sizeof(values), 0);
    std::memcpy(out.buffer.data(), values, sizeof(values));
    out.fields.clear();
    for (size_t i = 0; i < specs.size(); ++i)
    {
        out.fields.push_back({specs[i].name, out.buffer.data() + i * sizeof(int32_t), FieldType::kINT32, 1});
    }
}

} // namespace plugin
} // namespace sqz
