/*
 * A stand-in libnvinfer.so.<major> for the registration test: just the two C entry points the plugin
 * library looks up at load time (getPluginRegistry, getLogger) and an in-memory IPluginRegistry with
 * TensorRT's documented semantics (registerCreator refuses a second creator of the same
 * namespace::name version). Built for tests only; never installed.
 */
#include "NvInferRuntime.h"

#include <cstring>
#include <iostream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

class StderrLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::cerr << "[fake nvinfer] " << msg << std::endl;
        }
    }
};

struct Entry
{
    IPluginCreatorInterface* creator;
    std::string ns;
};

IPluginCreatorV3One* asV3(IPluginCreatorInterface const* creator)
{
    bool const v3 = std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0;
    return v3 ? static_cast<IPluginCreatorV3One*>(const_cast<IPluginCreatorInterface*>(creator)) : nullptr;
}

class FakeRegistry : public IPluginRegistry
{
public:
    ~FakeRegistry() noexcept override = default;
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool isParentSearchEnabled() const override
    {
        return false;
    }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override
    {
        return nullptr;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const pluginNamespace) noexcept override
    {
        IPluginCreatorV3One* v3 = asV3(&creator);
        if (v3 == nullptr || getCreator(v3->getPluginName(), v3->getPluginVersion(), pluginNamespace) != nullptr)
        {
            return false;
        }
        mEntries.push_back({&creator, pluginNamespace});
        refresh();
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override
    {
        *numCreators = static_cast<int32_t>(mList.size());
        return mList.data();
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const pluginName, AsciiChar const* const pluginVersion,
        AsciiChar const* const pluginNamespace) noexcept override
    {
        for (Entry const& e : mEntries)
        {
            IPluginCreatorV3One* v3 = asV3(e.creator);
            if (std::strcmp(v3->getPluginName(), pluginName) == 0 && std::strcmp(v3->getPluginVersion(), pluginVersion) == 0
                && e.ns == pluginNamespace)
            {
                return e.creator;
            }
        }
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const& creator) noexcept override
    {
        for (auto it = mEntries.begin(); it != mEntries.end(); ++it)
        {
            if (it->creator == &creator)
            {
                mEntries.erase(it);
                refresh();
                return true;
            }
        }
        return false;
    }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return 0;
    }
#if NV_TENSORRT_MAJOR > 10 || NV_TENSORRT_MINOR >= 10 // added in TensorRT 10.10
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept override
    {
        return getAllCreators(numCreators);
    }
#endif
#if NV_TENSORRT_MAJOR < 11
    // TensorRT 10's deprecated IPluginV2 registry methods: not used by an IPluginV3 library.
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override
    {
        return false;
    }
    IPluginCreator* const* getPluginCreatorList(int32_t* const numCreators) const noexcept override
    {
        *numCreators = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override
    {
        return false;
    }
#endif

private:
    void refresh()
    {
        mList.clear();
        for (Entry const& e : mEntries)
        {
            mList.push_back(e.creator);
        }
    }

    std::vector<Entry> mEntries;
    std::vector<IPluginCreatorInterface*> mList;
};

} // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept
{
    static FakeRegistry registry;
    return &registry;
}

extern "C" __attribute__((visibility("default"))) ILogger* getLogger() noexcept
{
    static StderrLogger logger;
    return &logger;
}
