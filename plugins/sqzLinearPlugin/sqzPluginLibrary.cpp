/*
 * Entry points of libsqz_trt_plugin.so: the explicit registration list, the two functions TensorRT's
 * IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, Python registry.load_library) looks up,
 * and load-time self registration for processes that just dlopen the library (ctypes.CDLL,
 * Polygraphy --plugins, trtexec --staticPlugins, samples/cpp).
 *
 * The library links no libnvinfer: it uses only virtual interfaces. Self registration therefore
 * finds TensorRT's getPluginRegistry()/getLogger() in a libnvinfer that the process has already
 * loaded (dlopen with RTLD_NOLOAD); if none is loaded it does nothing.
 */
#include "sqzLinearPlugin.h"

#include <atomic>
#include <cstdlib>
#include <dlfcn.h>
#include <iostream>

#define SQZ_STRINGIFY_(x) #x
#define SQZ_STRINGIFY(x) SQZ_STRINGIFY_(x)

using nvinfer1::ILogger;
using nvinfer1::IPluginCreatorInterface;

namespace sqz
{
namespace plugin
{
namespace
{

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
std::atomic<ILogger*> gLoadTimeLogger{nullptr};

SqzLinearPluginCreator gSqzLinearCreator;

//! The registration list: every creator this library provides, in one place.
IPluginCreatorInterface* const kCREATORS[] = {&gSqzLinearCreator};
constexpr int32_t kNB_CREATORS = static_cast<int32_t>(sizeof(kCREATORS) / sizeof(kCREATORS[0]));

//! The soname of the libnvinfer these headers belong to (its ABI is what the vtables assume).
constexpr char const* kNVINFER_SONAME = "libnvinfer.so." SQZ_STRINGIFY(NV_TENSORRT_MAJOR);

/*!
 * Registers kCREATORS with an already-loaded TensorRT when the library is loaded, and remembers
 * which it registered. IPluginRegistry::loadLibrary refuses a library whose creators are already
 * registered, so getCreators() hands them back first (TensorRT then registers them itself).
 * Set SQZ_PLUGIN_NO_SELF_REGISTER=1 to turn this off.
 */
class SelfRegistration
{
public:
    SelfRegistration() noexcept
    {
        char const* off = std::getenv("SQZ_PLUGIN_NO_SELF_REGISTER");
        if (off != nullptr && off[0] != '\0' && off[0] != '0')
        {
            return;
        }
        void* nvinfer = dlopen(kNVINFER_SONAME, RTLD_LAZY | RTLD_NOLOAD);
        if (nvinfer == nullptr)
        {
            return; // no TensorRT in this process (yet): registration happens through getCreators
        }
        using GetRegistry = nvinfer1::IPluginRegistry* (*) ();
        using GetLogger = ILogger* (*) ();
        auto getRegistry = reinterpret_cast<GetRegistry>(dlsym(nvinfer, "getPluginRegistry"));
        auto getLogger = reinterpret_cast<GetLogger>(dlsym(nvinfer, "getLogger"));
        dlclose(nvinfer); // drops only the reference RTLD_NOLOAD added
        if (getLogger != nullptr)
        {
            gLoadTimeLogger = getLogger();
        }
        mRegistry = getRegistry != nullptr ? getRegistry() : nullptr;
        if (mRegistry == nullptr)
        {
            return;
        }
        for (int32_t i = 0; i < kNB_CREATORS; ++i)
        {
            auto* creator = static_cast<nvinfer1::IPluginCreatorV3One*>(kCREATORS[i]);
            if (mRegistry->getCreator(creator->getPluginName(), creator->getPluginVersion(),
                    creator->getPluginNamespace())
                != nullptr)
            {
                continue; // another copy of the library registered it already
            }
            mRegistered[i] = mRegistry->registerCreator(*creator, creator->getPluginNamespace());
            logMessage(mRegistered[i] ? ILogger::Severity::kVERBOSE : ILogger::Severity::kERROR,
                std::string(mRegistered[i] ? "registered " : "could not register ") + creator->getPluginNamespace()
                    + "::" + creator->getPluginName() + " version " + creator->getPluginVersion()
                    + " at library load");
        }
    }

    //! Deregisters what the constructor registered (before loadLibrary registers it, or at unload).
    void release() noexcept
    {
        for (int32_t i = 0; i < kNB_CREATORS; ++i)
        {
            if (mRegistered[i])
            {
                mRegistry->deregisterCreator(*kCREATORS[i]);
                mRegistered[i] = false;
            }
        }
    }

    ~SelfRegistration()
    {
        release();
    }

    SelfRegistration(SelfRegistration const&) = delete;
    SelfRegistration& operator=(SelfRegistration const&) = delete;

private:
    nvinfer1::IPluginRegistry* mRegistry{nullptr};
    bool mRegistered[kNB_CREATORS]{};
};

SelfRegistration gSelfRegistration;

} // namespace

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    ILogger* logger = nullptr;
    if (nvinfer1::ILoggerFinder* finder = gLoggerFinder.load())
    {
        logger = finder->findLogger();
    }
    if (logger == nullptr)
    {
        logger = gLoadTimeLogger.load();
    }
    if (logger != nullptr)
    {
        logger->log(severity, message.c_str());
    }
    else if (severity <= ILogger::Severity::kWARNING)
    {
        std::cerr << "[sqz_trt_plugin] " << message << std::endl;
    }
}

} // namespace plugin
} // namespace sqz

extern "C"
{
    //! Called by TensorRT before getCreators: the logger the plugin reports through.
    __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
    {
        sqz::plugin::gLoggerFinder = finder;
    }

    //! The creators of this library (IPluginRegistry::loadLibrary registers them).
    __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
    {
        sqz::plugin::gSelfRegistration.release();
        nbCreators = sqz::plugin::kNB_CREATORS;
        return sqz::plugin::kCREATORS;
    }
}
