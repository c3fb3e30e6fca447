"""The onnxruntime custom-op library ``libsqz_ort_ops.so`` (plugins/ort): build it, check one a user
names, and the session options that register it (sessions themselves come from
:func:`sqz_export.ort_session.create_session`, the one factory, so ``--unpack`` and ``--ort-ops`` meet
in one place).

Without the library onnxruntime runs an exported model's SqzLinear nodes through their model-local
ONNX function, which it constant-folds into dense fp32 weights at session creation (see
:mod:`sqz_export.export.onnx_function`). With it, each node runs the C++ CPU kernel on the packed
initializers as onnxruntime loaded them: the session holds the packed bytes, nothing dense.

The library needs onnxruntime's C API header at build time only (the PyPI wheel ships none; point
``ONNXRUNTIME_ROOT`` at an onnxruntime release archive, or ``ONNXRUNTIME_INCLUDE_DIR`` at a folder
holding ``onnxruntime_c_api.h``). It links no libonnxruntime: onnxruntime passes its API table to
the library's ``RegisterCustomOps`` when a session options object registers it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sqz_export.errors import UserError
from sqz_export.validate import check_input_file

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)

LIBRARY_NAME = "libsqz_ort_ops.so"
ENTRY_POINT = "RegisterCustomOps"
SOURCE_DIR = Path(__file__).resolve().parents[1] / "plugins" / "ort"
"""plugins/ort: the library's CMake project (configurable on its own: no CUDA needed)."""
HEADER = "onnxruntime_c_api.h"
_ELF_MAGIC = b"\x7fELF"


def find_headers(extra: Iterable[Path | str] = ()) -> Path | None:
    """The first folder holding onnxruntime's C API header, or None.

    Search order, as plugins/ort/CMakeLists.txt: env ``ONNXRUNTIME_INCLUDE_DIR``, env
    ``ONNXRUNTIME_ROOT``/include (a release archive), then ``extra`` (each as given and its include/).
    """
    candidates: list[Path] = []
    if os.environ.get("ONNXRUNTIME_INCLUDE_DIR"):
        candidates.append(Path(os.environ["ONNXRUNTIME_INCLUDE_DIR"]))
    if os.environ.get("ONNXRUNTIME_ROOT"):
        candidates.append(Path(os.environ["ONNXRUNTIME_ROOT"]) / "include")
    for folder in extra:
        candidates += [Path(folder), Path(folder) / "include"]
    return next((folder for folder in candidates if (folder / HEADER).is_file()), None)


def build_library(build_dir: Path | str, include_dir: Path | str, jobs: int = 2) -> Path:
    """Configures and builds plugins/ort with CMake into ``build_dir``; returns the library's path.

    Raises:
        RuntimeError: cmake is missing, the headers were not accepted (CMake's skip message), or the
            compiler failed; the message holds the end of CMake's output.
    """
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("building the onnxruntime custom-op library needs cmake (>= 3.18) on the PATH")
    build_dir = Path(build_dir)
    steps = [
        [cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), f"-DONNXRUNTIME_INCLUDE_DIR={include_dir}",
         "-DCMAKE_BUILD_TYPE=Release"],
        [cmake, "--build", str(build_dir), "-j", str(jobs)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        output = done.stdout + done.stderr
        if done.returncode != 0 or "skipping onnxruntime custom-op library" in output:
            raise RuntimeError(f"{' '.join(step)} failed:\n{output[-4000:]}")
    library = build_dir / LIBRARY_NAME
    if not library.is_file():
        raise RuntimeError(f"the build in {build_dir} finished without {LIBRARY_NAME}")
    logger.info("built %s against %s", library, include_dir)
    return library


def check_library(path: Path | str, what: str = "--ort-ops") -> Path:
    """``path`` as a loadable onnxruntime custom-op library, or a UserError saying what it is instead.

    Checked before any session is made: an existing file, an ELF shared object that loads in this
    process, and one that exports ``RegisterCustomOps`` (what onnxruntime calls).
    """
    path = check_input_file(path, what)
    expected = (
        f"expected {LIBRARY_NAME}, the onnxruntime custom-op library built from plugins/ort (see plugins/README.md)"
    )
    with path.open("rb") as handle:
        if handle.read(4) != _ELF_MAGIC:
            raise UserError(f"{what} {path}: not a shared library (no ELF header); {expected}")
    try:
        library = ctypes.CDLL(str(path.resolve()))
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be loaded ({exc}); {expected}") from exc
    if not hasattr(library, ENTRY_POINT):
        raise UserError(
            f"{what} {path}: does not export {ENTRY_POINT}, so it is no onnxruntime custom-op library; {expected}"
        )
    return path


def session_options(ort_ops: Path | str | None = None, threads: int | None = None) -> onnxruntime.SessionOptions:
    """Session options with the custom-op library registered (when given); warnings and errors only.

    ``threads`` sets onnxruntime's intra-op thread count (None: its default, one per physical core),
    which the custom op's row split runs on too.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if ort_ops is not None:
        try:
            options.register_custom_ops_library(str(Path(ort_ops).resolve()))
        except Exception as exc:  # onnxruntime raises its own exception types, not OSError
            raise UserError(f"onnxruntime refused the custom-op library {ort_ops}: {exc}") from exc
    return options


def main() -> None:
    """``python -m sqz_export.ort_ops [BUILD_DIR]``: builds the library from the headers found."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    headers = find_headers()
    if headers is None:
        sys.exit(
            "onnxruntime headers not found: set ONNXRUNTIME_ROOT (a release archive) or ONNXRUNTIME_INCLUDE_DIR "
            f"(a folder with {HEADER})"
        )
    build_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE_DIR.parents[1] / "build" / "ort"
    print(build_library(build_dir, headers))


if __name__ == "__main__":
    main()
