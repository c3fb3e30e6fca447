"""The CUDA sources compile (nvcc, warnings as errors) and the C++ format mirror matches formats.py.

No GPU is needed: CI machines have nvcc but no device, so this is what proves the .cu files build
there. The kernels are compiled once per session (`-c`, sm_80 by default: about a minute on 2 cores);
set SQZ_CUDA_TEST_ARCHS="80,90" to check more architectures. The torch bindings, which only the GPU
machine links, are type-checked here against the installed torch headers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from toolchain import cuda_include_dir

from sqz_export import formats

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "plugins" / "common"
KERNELS = REPO / "plugins" / "kernels"
BASELINES = REPO / "benchmarks" / "baselines"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++")
ARCHS = [a.strip() for a in os.environ.get("SQZ_CUDA_TEST_ARCHS", "80").split(",") if a.strip()]
WARNINGS_AS_ERRORS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


@pytest.fixture(scope="session")
def nvcc_build(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    if NVCC is None:
        pytest.skip("nvcc not found on PATH")
    out = tmp_path_factory.mktemp("nvcc") / "sqzLinear.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [
        NVCC, "-std=c++17", "-O3", *gencode, f"-I{COMMON}", f"-I{KERNELS}", *WARNINGS_AS_ERRORS, "-Xptxas", "-v",
        "-c", str(KERNELS / "sqzLinear.cu"), "-o", str(out),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)


def test_kernels_compile_without_warnings(nvcc_build: subprocess.CompletedProcess[str]) -> None:
    assert nvcc_build.returncode == 0, f"nvcc failed for sm_{ARCHS}:\n{nvcc_build.stderr[-6000:]}"


def test_gemv_kernels_do_not_spill(nvcc_build: subprocess.CompletedProcess[str]) -> None:
    """Register spills in the decode GEMV would turn its loads into local-memory traffic."""
    assert nvcc_build.returncode == 0
    spills = []
    kernel = None
    for line in nvcc_build.stderr.splitlines():
        if "Compiling entry function" in line:
            kernel = line
        elif "spill stores" in line and kernel and "sqzGemvKernel" in kernel:
            stores = int(re.search(r"(\d+) bytes spill stores", line).group(1))
            if stores:
                spills.append(f"{kernel.split('function')[-1].strip()}: {line.strip()}")
    assert not spills, "GEMV kernels spill:\n" + "\n".join(spills)


def test_seed_design_baseline_compiles(tmp_path: Path) -> None:
    """benchmarks/kernels.py builds this baseline on the GPU machine; a compile error must show up in CI."""
    if NVCC is None:
        pytest.skip("nvcc not found on PATH")
    cmd = [
        NVCC, "-std=c++17", "-O3", f"-gencode=arch=compute_{ARCHS[0]},code=sm_{ARCHS[0]}", f"-I{COMMON}",
        f"-I{BASELINES}", *WARNINGS_AS_ERRORS, "-c", str(BASELINES / "seedDesignGemv.cu"), "-o", str(tmp_path / "b.o"),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.mark.parametrize(
    "binding", [REPO / "sqz_export" / "kernels" / "binding.cpp", BASELINES / "seedDesignBinding.cpp"], ids=lambda p: p.name
)
def test_torch_binding_type_checks(binding: Path, tmp_path: Path) -> None:
    """g++ -fsyntax-only against torch's headers: catches API misuse before a GPU session's JIT build.

    A CPU build of torch ships the c10/cuda headers but not the one its CMake generates
    (cuda_cmake_macros.h), so the test writes that one-line header itself.
    """
    from torch.utils import cpp_extension

    cuda_include = cuda_include_dir()
    if CXX is None or cuda_include is None:
        pytest.skip("needs g++ and the CUDA runtime headers (cuda_runtime_api.h)")
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    system = [tmp_path, *cpp_extension.include_paths(), sysconfig.get_paths()["include"], cuda_include]
    cmd = [
        CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DTORCH_EXTENSION_NAME=probe",
        *[f"-isystem{p}" for p in system], f"-I{COMMON}", f"-I{BASELINES}", str(binding),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


def _cpp_constant(name: str) -> str:
    text = (COMMON / "sqzFormat.h").read_text()
    match = re.search(rf"constexpr\s+int32_t\s+{name}(\[\])?\s*=\s*([^;]+);", text)
    assert match, f"sqzFormat.h does not define {name}"
    return match.group(2).strip()


@pytest.mark.parametrize(
    ("cpp", "py"),
    [
        ("kFORMAT_VERSION", formats.FORMAT_VERSION),
        ("kLAYOUT_KMAJOR", formats.LAYOUT_KMAJOR),
        ("kLAYOUT_ROWMAJOR", formats.LAYOUT_ROWMAJOR),
        ("kGROUP_SIZE", formats.GROUP_SIZE),
        ("kDEFAULT_CHUNK_NNZ", formats.DEFAULT_CHUNK_NNZ),
        ("kSUPPORTED_BITS", formats.SUPPORTED_BITS),
    ],
)
def test_cpp_format_mirror_matches_formats_py(cpp: str, py: int | tuple[int, ...]) -> None:
    value = _cpp_constant(cpp)
    if isinstance(py, tuple):
        assert [int(v) for v in value.strip("{} ").split(",")] == list(py)
    else:
        assert int(value) == py
