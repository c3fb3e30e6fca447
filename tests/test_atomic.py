"""Atomic outputs: no partial file or folder survives, foreign folders are never overwritten."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sqz_export import atomic
from sqz_export.errors import UserError


def test_write_bytes_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "engines" / "model.engine"
    atomic.write_bytes(target, b"\x01\x02\x03")
    assert target.read_bytes() == b"\x01\x02\x03"
    atomic.write_bytes(target, memoryview(b"new"))
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.engine"]


def test_replace_folder_swaps_in_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic.replace_folder(out, "marker", "test folder") as tmp:
        (tmp / "marker").write_text("v1")
    assert (out / "marker").read_text() == "v1"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.replace_folder(out, "marker", "test folder") as tmp:
            (tmp / "marker").write_text("v2")
            raise RuntimeError("boom")
    assert (out / "marker").read_text() == "v1"  # the failed run changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and left no temporary folder


def test_replace_folder_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not an sqz-export test folder; refusing to overwrite it"):
        with atomic.replace_folder(tmp_path / "precious", "marker", "test folder"):
            pass
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    """Temporary files and folders are private (0600/0700); the published outputs must not be."""
    mask = os.umask(0o022)
    try:
        atomic.write_bytes(tmp_path / "report.json", b"{}")
        with atomic.replace_folder(tmp_path / "out", "marker", "test folder") as tmp:
            (tmp / "marker").write_text("x")
            os.chmod(tmp / "marker", 0o600)
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "marker").stat().st_mode) == 0o644
