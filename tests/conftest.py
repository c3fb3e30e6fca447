"""Session fixtures shared by the export, compare, generate, build and TensorRT tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# tests/ holds shared helpers (tiny_models, tolerances) imported as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_checkpoint  # noqa: E402  (needs the path above)

from sqz_export.export.sqz_model import export_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_checkpoint(tmp_path_factory.mktemp(f"ckpt-{arch}"), arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_export(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]
) -> Callable[[str, str], Path]:
    """(arch, 'fp16'|'fp32') -> export folder, exported once per session."""
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{arch}-{dtype}") / "out"
            export_checkpoint(tiny_checkpoint(arch), out, dtype={"fp16": torch.float16, "fp32": torch.float32}[dtype])
            cache[(arch, dtype)] = out
        return cache[(arch, dtype)]

    return get
