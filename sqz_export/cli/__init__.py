"""The ``sqz-export`` command line: one subcommand per pipeline stage.

Each subcommand lives in its own module with ``register(subparsers)`` and ``run(args) -> int``.
Heavy imports (torch, onnx, tensorrt) happen inside ``run`` so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sqz_export import __version__
from sqz_export.errors import UserError

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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"sqz_export.cli.{name}").register(subparsers)
    return parser


def progress_enabled() -> bool:
    """Progress bars only for a person watching a terminal, never in CI logs."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")


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
    if not progress_enabled():
        hf_logging.disable_progress_bar()
        os.environ.setdefault("TQDM_DISABLE", "1")  # bars drawn with tqdm directly (the GGUF loader's)


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a machine shared
    # with other work, spinning threads steal the cores the busy ones need (measured on 2 shared
    # cores: the Fisher pass took 744 s spinning, 139 s passive). An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    quiet_third_party_output(verbose=args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"sqz-export {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
