"""Errors the user can act on: the CLI prints their message without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what was wrong and what was expected."""
