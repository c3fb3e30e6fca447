"""Atomic outputs: a reader never sees half a file or half a folder, and a failed run leaves nothing.

Every artifact sqz-export writes (checkpoints, ONNX folders, engines, JSON reports, caches) goes
through here: it is written under a temporary name in the destination's own folder (same file
system, so the final rename is atomic) and renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sqz_export.errors import OUTPUT_ERRNOS, UserError, describe_os_error


def _raise_write_error(path: Path, exc: BaseException) -> None:
    """Turns the machine refusing a write (disk full, file size limit, read-only) into a UserError
    that names the output; any other exception is the caller's to re-raise."""
    if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
        raise UserError(f"could not write {path}: {describe_os_error(exc)}; nothing partial was left (a full disk or a file size limit?)") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def open_for_write(path: Path) -> Iterator[BinaryIO]:
    """Yields a binary handle on a temporary file that replaces ``path`` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _raise_write_error(path, exc)
        raise


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename."""
    with open_for_write(path) as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike[str], what: str, folder_output: bool = False) -> Path:
    """The resolved ``path``, after checking that a file or folder can be created beside it.

    Outputs are written next to their destination and renamed, so what must be writable is the
    destination's folder, or the nearest existing one above it (the rest is created). Checking by
    creating a file is the only test that sees read-only mounts, ACLs and root alike; it runs before
    long work so that a bad location fails at once rather than after minutes.

    Args:
        path: the output file or folder.
        what: how the user named it, for the message ("-o", "--json").
        folder_output: the output is a folder (else a file, which an existing folder cannot become).

    Raises:
        UserError: the location cannot hold new files.
    """
    out = Path(path).expanduser().resolve()
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".sqz-export-write-check.")
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot create files in {folder} ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)
    if not folder_output and out.is_dir():
        raise UserError(f"{what} {path} is a folder; expected the name of a file to write")
    return out


def check_replaceable(out_dir: str | os.PathLike[str], marker: str, kind: str) -> Path:
    """The resolved destination, after checking it is absent, empty, or a folder of this kind.

    Call it before long work too, so a bad ``-o`` fails at once rather than at the end.

    Raises:
        UserError: ``out_dir`` exists, is not empty, and is not a folder of this kind, or its
            location is not writable.
    """
    out = check_writable(out_dir, "output", folder_output=True)
    if out.exists() and not (out / marker).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} exists and is not an sqz-export {kind}; refusing to overwrite it")
    return out


@contextlib.contextmanager
def replace_folder(out_dir: str | os.PathLike[str], marker: str, kind: str) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``out_dir`` that replaces it when the block succeeds.

    Args:
        out_dir: the destination folder.
        marker: a file every folder of this kind holds; an existing non-empty ``out_dir`` without it
            is someone else's data and is never overwritten.
        kind: what the folder is, for the error message ("checkpoint", "ONNX folder").

    Raises:
        UserError: see :func:`check_replaceable`.
    """
    out = check_replaceable(out_dir, marker, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
        for child in tmp.iterdir():
            if child.is_file():
                os.chmod(child, 0o666 & ~_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(out, exc)
        raise
