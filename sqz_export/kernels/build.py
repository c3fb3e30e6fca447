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
_PLUGINS_DIR = _PACKAGE_DIR.parents[1] / "plugins"


def source_files() -> list[Path]:
    """Sources of the extension: the pybind binding, the kernels and the launcher's host policy."""
    return [
        _PACKAGE_DIR / "binding.cpp",
        _PLUGINS_DIR / "kernels" / "sqzLinear.cu",
        _PLUGINS_DIR / "kernels" / "sqzLinearPolicy.cpp",
    ]


def include_dirs() -> list[Path]:
    return [_PLUGINS_DIR / "common", _PLUGINS_DIR / "kernels"]


@functools.cache
def extension() -> ModuleType:
    """Builds (or loads from torch's cache) and returns the extension module.

    Raises:
        FileNotFoundError: the kernel sources are not next to the package (a wheel install without
            the repository's plugins/ folder).
        RuntimeError: the compiler failed (torch.utils.cpp_extension's error, with the log).
    """
    from torch.utils import cpp_extension

    missing = [str(p) for p in source_files() + include_dirs() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            "sqz_export.kernels needs the repository's plugins/ sources to build the CUDA extension; missing: "
            + ", ".join(missing)
        )
    if "CUDA_HOME" not in os.environ and cpp_extension.CUDA_HOME is None:
        raise RuntimeError(
            "sqz_export.kernels: CUDA_HOME is not set and no CUDA toolkit was found (export CUDA_HOME=/usr/local/cuda)"
        )
    logger.info("building the SqzLinear CUDA extension %s (first use; cached by torch afterwards)", EXTENSION_NAME)
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(p) for p in source_files()],
        extra_include_paths=[str(p) for p in include_dirs()],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        verbose=logger.isEnabledFor(logging.DEBUG),
    )
