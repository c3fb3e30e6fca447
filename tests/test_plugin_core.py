"""The SqzLinear plugin's C++ side: the plain-C++ core always, the TensorRT harness when headers exist.

The core (attribute validation, shape rules, type rules, serialization round trip) needs no TensorRT
and no GPU, so it is built and run here with cmake. The harness loads libsqz_trt_plugin.so and plays
TensorRT's part on its CPU-only paths; it needs TensorRT headers (env TRT_INCLUDE_DIR or
TensorRT_ROOT) and the CUDA toolkit to build the library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "plugins" / "sqzLinearPlugin"
HAS_TOOLCHAIN = shutil.which("cmake") is not None and (shutil.which("c++") or shutil.which("g++")) is not None


def trt_headers() -> Path | None:
    """Folder holding NvInfer.h from TRT_INCLUDE_DIR or TensorRT_ROOT(/include), if any."""
    candidates = [os.environ.get("TRT_INCLUDE_DIR")]
    root = os.environ.get("TensorRT_ROOT")
    if root:
        candidates += [root, str(Path(root) / "include")]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "NvInfer.h").is_file():
            return Path(candidate)
    return None


def run(cmd: list[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs cmake and a C++ compiler")
def test_core_builds_and_passes_its_tests(tmp_path: Path) -> None:
    build = tmp_path / "core"
    configure = run(["cmake", "-S", str(PLUGIN_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
    # Configured alone, the folder builds the core only and says why the TensorRT library is skipped.
    assert "skipping TensorRT plugin:" in configure.stdout
    run(["cmake", "--build", str(build), "--target", "sqzLinearPluginCoreTest", "-j2"])
    result = run([str(build / "sqzLinearPluginCoreTest")])
    assert "all checks passed" in result.stdout


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs cmake and a C++ compiler")
@pytest.mark.skipif(trt_headers() is None, reason="TensorRT headers not found: set TRT_INCLUDE_DIR or TensorRT_ROOT")
@pytest.mark.skipif(not (REPO / "CMakeLists.txt").is_file(), reason="no top-level CMakeLists.txt (it defines sqz_kernels)")
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(), reason="needs nvcc for the kernels")
def test_plugin_library_passes_the_harness(tmp_path: Path) -> None:
    build = tmp_path / "trt"
    headers = trt_headers()
    # One CUDA architecture: the harness never launches a kernel, it only needs the library to link.
    configure = run([
        "cmake", "-S", str(REPO), "-B", str(build), f"-DTRT_INCLUDE_DIR={headers}",
        "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_CUDA_ARCHITECTURES=90",
    ])
    assert "skipping TensorRT plugin" not in configure.stdout
    run(["cmake", "--build", str(build), "--target", "sqzPluginHarness", "sqzPluginRegistrationTest", "-j2"], timeout=1800)
    plugin_dir = build / "plugins" / "sqzLinearPlugin"
    library = plugin_dir / "libsqz_trt_plugin.so"
    result = run([str(plugin_dir / "sqzPluginHarness"), str(library)])
    assert "1 creator(s), all checks passed" in result.stdout
    # Self registration at load time in a process that has (a stand-in) libnvinfer, and the hand-over to loadLibrary.
    fake_nvinfer = sorted((plugin_dir / "fake_nvinfer").glob("libnvinfer.so.*"))
    assert fake_nvinfer, "the stand-in libnvinfer.so.<major> was not built"
    result = run([str(plugin_dir / "sqzPluginRegistrationTest"), str(fake_nvinfer[0]), str(library)])
    assert "self registration and getCreators hand-over passed" in result.stdout
    # The library's ABI is exactly TensorRT's two entry points, and it does not depend on libnvinfer.
    if shutil.which("nm") and shutil.which("ldd"):
        symbols = run(["nm", "-D", "--defined-only", str(library)]).stdout.split()
        assert sorted(s for s in symbols if s in ("getCreators", "setLoggerFinder") or s.startswith("_Z")) == ["getCreators", "setLoggerFinder"]
        assert "libnvinfer" not in run(["ldd", str(library)]).stdout
