"""Where the host toolchain's CUDA headers are, for the tests that compile C++ without a GPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder (cuda_runtime_api.h): $CUDA_HOME, /usr/local/cuda, or nvcc's own."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None
