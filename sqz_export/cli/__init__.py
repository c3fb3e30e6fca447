"""The ``sqz-export`` command line: one subcommand per pipeline stage.

Each subcommand lives in its own module with ``register(subparsers)`` and ``run(args) -> int``.
Heavy imports (torch, onnx, tensorrt) happen inside ``run`` so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from sqz_export import __version__
from sqz_export.errors import OUTPUT_ERRNOS, UserError, describe_os_error
from sqz_export.progress import use_bars

COMMAND_MODULES = ("quantize", "eval", "inspect", "export", "compare", "generate", "build")
"""Pipeline order; this is also the order of ``sqz-export --help``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqz-export",
        description=(
            "Deployment compiler for SqueezeLLM dense-and-sparse quantization: quantize a Hugging Face "
            "causal LM, export it to ONNX with sqz::SqzLinear custom ops, build TensorRT engines, and "
            "compare accuracy and latency against the FP16 baseline."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `sqz-export COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages (kernel choices, refused matches)")
    parser.add_argument("--debug", action="store_true", default=debug_from_env(), help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"sqz_export.cli.{name}").register(subparsers)
    for subparser in subparsers.choices.values():  # `sqz-export quantize --debug` works too
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


DEBUG_ENV = "SQZ_DEBUG"
DEBUG_HELP = f"print the traceback of every error, the user's included (also ${DEBUG_ENV}=1)"
EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 1, 2, 130
"""Exit statuses: 1 an internal error (a bug), 2 bad input or environment, 130 interrupted (SIGINT)."""


def debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def crash_report_dir() -> Path:
    """Where internal errors leave their traceback (``$TMPDIR/sqz-export``)."""
    return Path(tempfile.gettempdir()) / "sqz-export"


def write_crash_report(command: str, argv: list[str], exc: BaseException) -> Path | None:
    """Writes the traceback of ``exc`` to a new file; None when even that fails."""
    try:
        folder = crash_report_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        path.write_text(f"sqz-export {__version__} {command}\nargv: {argv}\n\n{''.join(traceback.format_exception(exc))}")
        return path
    except OSError:
        return None


def quiet_third_party_output(verbose: bool) -> None:
    """Keeps transformers' advisory warnings and its own progress bars out of the tool's output.

    Our stages report their own progress; the GGUF loader's bar would otherwise flood CI logs.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is a dependency; this only guards partial installs
        return
    if not verbose:
        hf_logging.set_verbosity_error()
    if not use_bars():
        hf_logging.disable_progress_bar()
        os.environ.setdefault("TQDM_DISABLE", "1")  # bars drawn with tqdm directly (the GGUF loader's)


def return_freed_memory() -> None:
    """Makes glibc give large freed blocks back to the system (a fixed mmap threshold, two arenas).

    By default glibc raises its mmap threshold each time a large block is freed, so later tensors come
    from the heap and their memory stays with the process after they die; with worker threads each
    arena keeps its own. Quantizing a model block by block allocates and frees the same large tensors
    per block: measured on an 8-block LLaMA (hidden 2048), peak RSS 3.27 GB by default, 2.07 GB with
    this. glibc reads MALLOC_MMAP_THRESHOLD_ / MALLOC_ARENA_MAX itself; an explicit setting wins.
    """
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_ARENA_MAX" in os.environ:
        return
    m_mmap_threshold, m_arena_max = -3, -8
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_arena_max, 2)


def trim_freed_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's malloc_trim) after work that made many
    small allocations and freed them, which the mmap threshold does not cover: tokenizing the
    calibration text left 180 MB of them in the process (measured on the Wikipedia sample)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():  # noqa: ANN202 - a ctypes library or None
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a machine shared
    # with other work, spinning threads steal the cores the busy ones need (measured on 2 shared
    # cores: the Fisher pass took 744 s spinning, 139 s passive). An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return_freed_memory()
    # A file size limit (ulimit -f) then fails the write with EFBIG, reported below, instead of
    # killing the process without a word.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    quiet_third_party_output(verbose=args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001  (every failure ends here, reported once)
        return report_failure(args, argv, exc)


def report_failure(args: argparse.Namespace, argv: list[str] | None, exc: BaseException) -> int:
    """Prints one line for a failure and returns the exit status.

    The user's failures (bad input, a full disk, Ctrl-C) print their message; anything else is a bug,
    reported in one line with the path of a file that holds its traceback. ``--debug`` prints the
    traceback in every case.
    """
    if isinstance(exc, KeyboardInterrupt):
        message, status = "interrupted (outputs are renamed into place only when complete: nothing partial was left)", EXIT_INTERRUPTED
        if hasattr(args, "resume"):
            message += "; rerun the same command with --resume to continue from the finished blocks"
    elif isinstance(exc, UserError):
        message, status = str(exc), EXIT_USER
    elif isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
        message, status = describe_os_error(exc), EXIT_USER
        if not exc.filename:  # a write deep inside a library (an exporter's temporary file)
            message += f" while writing a file (a full disk or a file size limit? temporary files go to {tempfile.gettempdir()})"
    else:
        summary = f"{type(exc).__name__}: {exc}"
        if args.debug:
            traceback.print_exception(exc)
            print(f"sqz-export {args.command}: internal error: {summary}", file=sys.stderr)
            return EXIT_INTERNAL
        report = write_crash_report(args.command, sys.argv if argv is None else argv, exc)
        where = f"the traceback is in {report}" if report else "rerun with --debug for the traceback"
        print(f"sqz-export {args.command}: internal error (a bug in sqz-export): {summary}; {where}", file=sys.stderr)
        return EXIT_INTERNAL
    if args.debug:
        traceback.print_exception(exc)
    print(f"sqz-export {args.command}: error: {message}", file=sys.stderr)
    return status
