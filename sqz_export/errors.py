"""Errors the user can act on: the CLI prints their message without a traceback."""

from __future__ import annotations

import errno

OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
"""OSErrors the user's machine causes when writing (full disk, file size limit, read-only or forbidden place)."""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what was wrong and what was expected."""


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: the file it concerns (when known) and what went wrong."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason
