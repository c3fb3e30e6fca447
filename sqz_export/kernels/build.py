"""Builds of the torch extensions (torch.utils.cpp_extension): SqzLinear's from plugins/kernels/, and
the quantizer's column loops.

Two SqzLinear extensions, each from the same kernel sources the native libraries (the TensorRT
plugin) and the C++ tests compile, so they all run one kernel source:

- the CPU kernel (:func:`cpu_extension`): built by ``scripts/setup.sh`` (``python -m
  sqz_export.kernels.build``) so CI and the README's commands have it; later loads come from torch's
  on-disk cache in well under a second;
- the CUDA kernels (:func:`extension`): built on first use, only when a CUDA device is present.

And the LNQ refinement's column loops (:func:`lnq_extension`, sqz_export/quantize/lnq_ext.cpp), also
built by ``scripts/setup.sh``.

Build errors propagate to the caller with the compiler's log, never a silent fallback.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

EXTENSION_NAME = "sqz_kernels_ext"
"""Module name of the compiled CUDA extension (also its folder under the torch extensions cache)."""
CPU_EXTENSION_NAME = "sqz_cpu_kernels_ext"
"""Module name of the compiled CPU extension."""
LNQ_EXTENSION_NAME = "sqz_lnq_ext"
"""Module name of the compiled LNQ column loops."""

_PACKAGE_DIR = Path(__file__).resolve().parent
PLUGINS_DIR = _PACKAGE_DIR.parents[1] / "plugins"
"""The repository's plugins/ folder: kernel sources and the launcher headers."""


def source_files() -> list[Path]:
    """Sources of the extension: the pybind binding, the kernels and the launcher's host policy."""
    return [
        _PACKAGE_DIR / "binding.cpp",
        PLUGINS_DIR / "kernels" / "sqzLinear.cu",
        PLUGINS_DIR / "kernels" / "sqzLinearPolicy.cpp",
    ]


def cpu_source_files() -> list[Path]:
    """Sources of the CPU extension: its binding, the dispatch/scalar file and one file per SIMD ISA."""
    kernels = PLUGINS_DIR / "kernels"
    return [
        _PACKAGE_DIR / "cpu_binding.cpp",
        kernels / "sqzLinearCpu.cpp",
        kernels / "sqzLinearCpuAvx2.cpp",
        kernels / "sqzLinearCpuAvx512.cpp",
        kernels / "sqzLinearCpuAvx512Vbmi.cpp",
    ]


def include_dirs() -> list[Path]:
    return [PLUGINS_DIR / "common", PLUGINS_DIR / "kernels"]


def build_extension(name: str, sources: list[Path], includes: list[Path], extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    """Builds (or loads from torch's cache) a C++ or CUDA extension from repository sources.

    Shared by the product's extension and the benchmarks' baseline kernels, so both are compiled
    with the same flags and fail the same way.

    Raises:
        FileNotFoundError: a source or include folder is missing (e.g. a wheel install without the
            repository's plugins/ folder).
        RuntimeError: no CUDA toolkit, or the compiler failed (torch.utils.cpp_extension's error, with the log).
    """
    from torch.utils import cpp_extension

    missing = [str(p) for p in sources + includes if not p.exists()]
    if missing:
        raise FileNotFoundError(f"building the extension {name} needs these repository sources: " + ", ".join(missing))
    cuda = any(path.suffix == ".cu" for path in sources)
    if cuda and "CUDA_HOME" not in os.environ and cpp_extension.CUDA_HOME is None:
        raise RuntimeError(
            f"building the CUDA extension {name}: CUDA_HOME is not set and no CUDA toolkit was found "
            "(export CUDA_HOME=/usr/local/cuda)"
        )
    logger.info("building the extension %s (first use; cached by torch afterwards)", name)
    # -fopenmp: ATen's at::parallel_for is inline in its headers and runs the whole range on the
    # calling thread unless the extension itself is compiled with OpenMP. The -lgomp it links resolves
    # to the libgomp.so.1 torch has already loaded, so the extension shares torch's thread pool.
    return cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources],
        extra_include_paths=[str(p) for p in includes],
        extra_cflags=["-O3", "-std=c++17", "-Wall", "-Wextra", "-fopenmp", *extra_cflags],
        extra_cuda_cflags=["-O3", "-std=c++17", "-Xcompiler", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=logger.isEnabledFor(logging.DEBUG),
    )


@functools.cache
def extension() -> ModuleType:
    """The SqzLinear extension (built once per process); errors as :func:`build_extension`."""
    return build_extension(EXTENSION_NAME, source_files(), include_dirs())


@functools.cache
def cpu_extension() -> ModuleType:
    """The SqzLinear CPU extension (built once, then loaded from torch's cache); errors as
    :func:`build_extension`, re-raised with how to rebuild it."""
    try:
        return build_extension(CPU_EXTENSION_NAME, cpu_source_files(), include_dirs())
    except (OSError, RuntimeError) as exc:
        raise RuntimeError(
            f"the SqzLinear CPU kernel ({CPU_EXTENSION_NAME}) could not be built or loaded: {exc}\n"
            "It needs a C++17 compiler (g++) and the repository's plugins/ folder; rebuild it with "
            "`python -m sqz_export.kernels.build` (scripts/setup.sh does)."
        ) from exc


@functools.cache
def lnq_extension() -> ModuleType:
    """The LNQ column loops (built once, then loaded from torch's cache); errors as
    :func:`build_extension`. Compiled without FMA contraction, so they give the torch loops' bits."""
    return build_extension(LNQ_EXTENSION_NAME, [_PACKAGE_DIR.parent / "quantize" / "lnq_ext.cpp"], [], ("-ffp-contract=off",))


def main() -> None:
    """``python -m sqz_export.kernels.build``: builds the CPU extensions and says where they are."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = cpu_extension()
    print(f"sqz CPU kernel: {module.__file__} (best ISA on this CPU: {module.isa_name(module.best_isa())})")
    print(f"LNQ column loops: {lnq_extension().__file__}")


if __name__ == "__main__":
    main()
