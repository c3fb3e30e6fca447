"""JIT build of the SqzLinear CUDA extension (torch.utils.cpp_extension) from plugins/kernels/.

The same .cu the TensorRT plugin links is compiled here, so torch, the plugin and the tests all run
one kernel source. The build happens once per process (and is cached on disk by torch), only when
a CUDA device is present; build errors propagate to the caller, never a silent fallback.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

EXTENSION_NAME = "sqz_kernels_ext"
"""Module name of the compiled extension (also its folder under the torch extensions cache)."""

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


def include_dirs() -> list[Path]:
    return [PLUGINS_DIR / "common", PLUGINS_DIR / "kernels"]


def build_extension(name: str, sources: list[Path], includes: list[Path]) -> ModuleType:
    """Builds (or loads from torch's cache) a CUDA extension from repository sources.

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
        raise FileNotFoundError(f"building the CUDA extension {name} needs these repository sources: " + ", ".join(missing))
    if "CUDA_HOME" not in os.environ and cpp_extension.CUDA_HOME is None:
        raise RuntimeError(
            f"building the CUDA extension {name}: CUDA_HOME is not set and no CUDA toolkit was found "
            "(export CUDA_HOME=/usr/local/cuda)"
        )
    logger.info("building the CUDA extension %s (first use; cached by torch afterwards)", name)
    return cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources],
        extra_include_paths=[str(p) for p in includes],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        verbose=logger.isEnabledFor(logging.DEBUG),
    )


@functools.cache
def extension() -> ModuleType:
    """The SqzLinear extension (built once per process); errors as :func:`build_extension`."""
    return build_extension(EXTENSION_NAME, source_files(), include_dirs())
