// Unit tests of the SqzLinear plugin core (plain C++: no TensorRT, no CUDA). Exit status = failures.
#include "sqzTestCheck.h"
#include "sqzLinearPluginCore.h"

#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

using namespace sqz::plugin;

namespace
{


//! The error is non-empty and mentions every fragment (messages must name the attribute/tensor).
void expectError(std::string const& error, std::vector<std::string> const& fragments, int line)
{
    bool ok = !error.empty();
    for (auto const& f : fragments)
    {
        ok = ok && error.find(f) != std::string::npos;
    }
    if (!ok)
    {
        std::cerr << __FILE__ << ":" << line << ": error message '" << error << "' lacks an expected fragment"
                  << std::endl;
        ++sqz::test::failures();
    }
}
#define EXPECT_ERROR(error, ...) expectError((error), {__VA_ARGS__}, __LINE__)

struct Attrs
{
    int32_t bits{3}, k{100}, n{48}, layout{2}, chunk{32};
};

std::vector<FieldView> fieldsOf(Attrs const& a, bool withChunk = true)
{
    std::vector<FieldView> f{{"bits", &a.bits, FieldType::kINT32, 1}, {"in_features", &a.k, FieldType::kINT32, 1},
        {"out_features", &a.n, FieldType::kINT32, 1}, {"layout", &a.layout, FieldType::kINT32, 1}};
    if (withChunk)
    {
        f.push_back({"chunk_nnz", &a.chunk, FieldType::kINT32, 1});
    }
    return f;
}

void testParseValid()
{
    Attrs a;
    ParseResult r = parseFields(fieldsOf(a));
    EXPECT(r.error.empty());
    EXPECT(r.params.bits == 3 && r.params.inFeatures == 100 && r.params.outFeatures == 48);
    EXPECT(r.params.layout == 2 && r.params.chunkNnz == 32);

    // chunk_nnz is optional (dense-only layers).
    r = parseFields(fieldsOf(a, false));
    EXPECT(r.error.empty() && r.params.chunkNnz == 0);

    // int64 attributes (ONNX ints are int64) and the parser's own string attributes are accepted.
    int64_t const bits = 4, k = 4096, n = 11008, layout = 2;
    char const ns[] = "sqz";
    char const version[] = "1";
    r = parseFields({{"bits", &bits, FieldType::kINT64, 1}, {"in_features", &k, FieldType::kINT64, 1},
        {"out_features", &n, FieldType::kINT64, 1}, {"layout", &layout, FieldType::kINT64, 1},
        {"plugin_namespace", ns, FieldType::kCHAR, 4}, {"plugin_version", version, FieldType::kCHAR, 2}});
    EXPECT(r.error.empty());
    EXPECT(r.params.bits == 4 && r.params.inFeatures == 4096 && r.params.outFeatures == 11008);
}

void testParseErrors()
{
    Attrs a;
    std::vector<FieldView> f = fieldsOf(a);
    f.erase(f.begin()); // no bits
    EXPECT_ERROR(parseFields(f).error, "missing required attribute 'bits'");

    for (int32_t bad : {0, 1, 5, 6, 7, 16, -3})
    {
        a.bits = bad;
        EXPECT_ERROR(parseFields(fieldsOf(a)).error, "bits=" + std::to_string(bad), "2, 3, 4, 8");
    }
    for (int32_t good : {2, 3, 4, 8})
    {
        a.bits = good;
        EXPECT(parseFields(fieldsOf(a)).error.empty());
    }
    a = Attrs{};
    a.layout = 1;
    EXPECT_ERROR(parseFields(fieldsOf(a)).error, "layout=1", "layout 2");
    a = Attrs{};
    a.k = 0;
    EXPECT_ERROR(parseFields(fieldsOf(a)).error, "in_features=0", "positive");
    a = Attrs{};
    a.n = -3;
    EXPECT_ERROR(parseFields(fieldsOf(a)).error, "out_features=-3");
    a = Attrs{};
    a.chunk = -1;
    EXPECT_ERROR(parseFields(fieldsOf(a)).error, "chunk_nnz=-1");

    a = Attrs{};
    f = fieldsOf(a);
    int32_t const extra = 1;
    f.push_back({"group_size", &extra, FieldType::kINT32, 1});
    EXPECT_ERROR(parseFields(f).error, "unknown attribute 'group_size'");

    f = fieldsOf(a);
    int32_t const two[] = {3, 4};
    f[0] = {"bits", two, FieldType::kINT32, 2};
    EXPECT_ERROR(parseFields(f).error, "'bits'", "single integer");

    f = fieldsOf(a);
    float const fbits = 3.0F;
    f[0] = {"bits", &fbits, FieldType::kOTHER, 1};
    EXPECT_ERROR(parseFields(f).error, "'bits'", "integer");

    f = fieldsOf(a);
    int64_t const huge = int64_t{1} << 40;
    f[1] = {"in_features", &huge, FieldType::kINT64, 1};
    EXPECT_ERROR(parseFields(f).error, "'in_features'", "int32");
}

SqzLinearParams params(int32_t bits, int32_t k, int32_t n, int32_t chunk = 32)
{
    SqzLinearParams p;
    p.bits = bits;
    p.inFeatures = k;
    p.outFeatures = n;
    p.layout = 2;
    p.chunkNnz = chunk;
    return p;
}

void testShapes()
{
    // K=100 -> 4 groups of 32: 3-bit rows hold 12 words, 4-bit rows 16.
    SqzLinearParams const p = params(3, 100, 48);
    std::vector<std::vector<int64_t>> dense{{2, 5, 100}, {48, 12}, {48, 8}};
    EXPECT(checkInputShapes(p, dense).empty());
    // Dynamic leading dims of x are allowed (batch, sequence).
    EXPECT(checkInputShapes(p, {{kDYNAMIC, kDYNAMIC, 100}, {48, 12}, {48, 8}}).empty());

    // nnz = 70 with chunk 32 -> 3 chunks.
    std::vector<std::vector<int64_t>> sparse{{1, 100}, {48, 12}, {48, 8}, {49}, {70}, {70}, {3}};
    EXPECT(checkInputShapes(p, sparse).empty());
    EXPECT(sparseNnz(7, 70) == 70);
    EXPECT(sparseNnz(3, 70) == 0);

    EXPECT_ERROR(checkInputShapes(p, {{2, 99}, {48, 12}, {48, 8}}), "input 0 (x)", "in_features=100");
    EXPECT_ERROR(checkInputShapes(p, {{}, {48, 12}, {48, 8}}), "input 0 (x)", "scalar");
    EXPECT_ERROR(checkInputShapes(p, {{2, 100}, {48, 16}, {48, 8}}), "input 1 (qweight)", "[48, 16]", "[48, 12]");
    EXPECT_ERROR(checkInputShapes(p, {{2, 100}, {12, 48}, {48, 8}}), "input 1 (qweight)");
    EXPECT_ERROR(checkInputShapes(p, {{2, 100}, {48, 12}, {48, 16}}), "input 2 (lut)", "[48, 8]");
    EXPECT_ERROR(checkInputShapes(p, {{2, 100}, {48, 12}}), "3 inputs", "got 2");
    EXPECT_ERROR(checkInputCount(5), "got 5");
    EXPECT(checkInputCount(3).empty() && checkInputCount(7).empty());

    auto bad = sparse;
    bad[kROW_PTR] = {48};
    EXPECT_ERROR(checkInputShapes(p, bad), "input 3 (row_ptr)", "[49]");
    bad = sparse;
    bad[kVAL] = {69};
    EXPECT_ERROR(checkInputShapes(p, bad), "input 5 (val)", "[70]");
    bad = sparse;
    bad[kCHUNK_ROW] = {2};
    EXPECT_ERROR(checkInputShapes(p, bad), "input 6 (chunk_row)", "[3]", "chunk_nnz=32");
    bad = sparse;
    bad[kCOL] = {7, 10};
    EXPECT_ERROR(checkInputShapes(p, bad), "input 4 (col)");
    EXPECT_ERROR(checkInputShapes(params(3, 100, 48, 0), sparse), "chunk_nnz=0", "sparse inputs");
    // Without the sparse inputs chunk_nnz is irrelevant.
    EXPECT(checkInputShapes(params(3, 100, 48, 0), dense).empty());

    EXPECT((outputShape(p, {2, 5, 100}) == std::vector<int64_t>{2, 5, 48}));
    EXPECT((outputShape(p, {kDYNAMIC, 100}) == std::vector<int64_t>{kDYNAMIC, 48}));
    EXPECT(rowsOf({2, 5, 100}) == 10);
    EXPECT(rowsOf({100}) == 1);
    EXPECT(rowsOf({kDYNAMIC, 1, 100}) == kDYNAMIC);
}

void testTypes()
{
    using T = TensorType;
    for (int32_t nbInputs : {3, 7})
    {
        for (T x : {T::kFLOAT16, T::kBFLOAT16, T::kFLOAT32, T::kINT32})
        {
            std::vector<T> types{x, T::kINT32, T::kFLOAT16};
            if (nbInputs == 7)
            {
                types.insert(types.end(), {T::kINT32, T::kINT32, T::kFLOAT16, T::kINT32});
            }
            types.push_back(x); // output
            bool const xOk = x == T::kFLOAT16 || x == T::kBFLOAT16;
            EXPECT(supportsType(0, nbInputs, types.data()) == xOk);
            for (int32_t pos = 1; pos <= nbInputs; ++pos)
            {
                EXPECT(supportsType(pos, nbInputs, types.data()));
            }
            // The output must have x's type; the weights must have their fixed types.
            types.back() = x == T::kFLOAT16 ? T::kBFLOAT16 : T::kFLOAT16;
            EXPECT(!supportsType(nbInputs, nbInputs, types.data()));
            types[kQWEIGHT] = T::kFLOAT16;
            EXPECT(!supportsType(kQWEIGHT, nbInputs, types.data()));
            types[kLUT] = T::kBFLOAT16;
            EXPECT(!supportsType(kLUT, nbInputs, types.data()));
        }
    }
    EXPECT(std::string(expectedTypeName(0, 3)) == "fp16 or bf16");
    EXPECT(std::string(expectedTypeName(1, 3)) == "int32");
    EXPECT(positionName(3, 3) == "output 0 (y)");
    EXPECT(positionName(6, 7) == "input 6 (chunk_row)");
}

void testSerializationRoundTrip()
{
    for (int32_t bits : {2, 3, 4, 8})
    {
        for (int32_t k : {32, 100, 4096})
        {
            for (int32_t n : {1, 48, 11008})
            {
                for (int32_t chunk : {0, 1, 32, 256})
                {
                    SqzLinearParams const p = params(bits, k, n, chunk);
                    SerializedFields s;
                    serializeFields(p, s);
                    EXPECT(s.buffer.size() == 5 * sizeof(int32_t));
                    EXPECT(s.fields.size() == attributeSpecs().size());
                    ParseResult r = parseFields(s.fields);
                    EXPECT(r.error.empty());
                    EXPECT(r.params == p);
                    // Serializing the parsed params again gives the same bytes.
                    SerializedFields again;
                    serializeFields(r.params, again);
                    EXPECT(again.buffer == s.buffer);
                }
            }
        }
    }
}

} // namespace

int main()
{
    testParseValid();
    testParseErrors();
    testShapes();
    testTypes();
    testSerializationRoundTrip();
    if (sqz::test::failures())
    {
        std::cerr << sqz::test::failures() << " check(s) failed" << std::endl;
        return 1;
    }
    std::cout << "sqzLinearPluginCoreTest: all checks passed" << std::endl;
    return 0;
}
