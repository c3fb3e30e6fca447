/*
 * Load-time self registration of libsqz_trt_plugin.so, against a stand-in libnvinfer (fakeNvinfer.cpp):
 *   1. a process that has libnvinfer loaded dlopens the plugin library -> sqz::SqzLinear v1 is registered;
 *   2. TensorRT's loadLibrary path calls getCreators -> the self registration is withdrawn first, so
 *      TensorRT's own registerCreator of the returned creators succeeds (it refuses duplicates).
 *
 * Usage: sqzPluginRegistrationTest /path/to/libnvinfer.so.<major> /path/to/libsqz_trt_plugin.so
 */
#include "sqzTestCheck.h"
#include "NvInferRuntime.h"

#include <cstring>
#include <dlfcn.h>
#include <iostream>

using namespace nvinfer1;

namespace
{


} // namespace

int main(int argc, char** argv)
{
    if (argc != 3)
    {
        std::cerr << "usage: " << argv[0] << " libnvinfer.so.N libsqz_trt_plugin.so" << std::endl;
        return 2;
    }
    // The "TensorRT" of this process, loaded first as in `import tensorrt` or a linked runtime.
    void* nvinfer = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (nvinfer == nullptr)
    {
        std::cerr << "dlopen " << argv[1] << ": " << dlerror() << std::endl;
        return 2;
    }
    using GetRegistry = IPluginRegistry* (*) ();
    auto getRegistry = reinterpret_cast<GetRegistry>(dlsym(nvinfer, "getPluginRegistry"));
    EXPECT(getRegistry != nullptr);
    if (getRegistry == nullptr)
    {
        return 1;
    }
    IPluginRegistry* registry = getRegistry();
    EXPECT(registry->getCreator("SqzLinear", "1", "sqz") == nullptr);

    void* plugin = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
    if (plugin == nullptr)
    {
        std::cerr << "dlopen " << argv[2] << ": " << dlerror() << std::endl;
        return 2;
    }
    IPluginCreatorInterface* selfRegistered = registry->getCreator("SqzLinear", "1", "sqz");
    EXPECT(selfRegistered != nullptr);
    EXPECT(registry->getCreator("SqzLinear", "1", "") == nullptr); // registered under its namespace only

    // What IPluginRegistry::loadLibrary does next: getCreators, then registerCreator for each.
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(plugin, "getCreators"));
    EXPECT(getCreators != nullptr);
    if (getCreators == nullptr)
    {
        return 1;
    }
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    EXPECT(nbCreators == 1 && creators[0] == selfRegistered);
    EXPECT(registry->getCreator("SqzLinear", "1", "sqz") == nullptr); // withdrawn for TensorRT to take over
    for (int32_t i = 0; i < nbCreators; ++i)
    {
        EXPECT(registry->registerCreator(*creators[i], "sqz"));
    }
    EXPECT(registry->getCreator("SqzLinear", "1", "sqz") == selfRegistered);
    // A second getCreators (another loadLibrary) withdraws nothing it did not register.
    getCreators(nbCreators);
    EXPECT(registry->getCreator("SqzLinear", "1", "sqz") == selfRegistered);

    if (sqz::test::failures())
    {
        std::cerr << sqz::test::failures() << " check(s) failed" << std::endl;
        return 1;
    }
    std::cout << "sqzPluginRegistrationTest: self registration and getCreators hand-over passed" << std::endl;
    return 0;
}
