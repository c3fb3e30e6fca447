"""Progress without a terminal: periodic one-line log messages with stage, done/total, rate and ETA."""

from __future__ import annotations

import logging

import pytest

from sqz_export import progress


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "use_bars", lambda: False)


def test_track_logs_done_total_rate_and_eta(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    with caplog.at_level(logging.INFO, logger="sqz_export.progress"):
        assert list(progress.track(range(4), 4, "Fisher", "windows")) == [0, 1, 2, 3]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("Fisher: 1/4 windows (25%), ") and "windows/s, ETA " in lines[0]
    assert lines[-1].startswith("Fisher: 4/4 windows (100%)") and "done in " in lines[-1]
    assert len(lines) == 4  # one line per update at interval 0, the last one says it is done


def test_lines_are_rate_limited(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    with caplog.at_level(logging.INFO, logger="sqz_export.progress"):
        list(progress.track(range(100), 100, "k-means", "layers"))
    assert [record.getMessage().split(",")[0] for record in caplog.records] == ["k-means: 100/100 layers (100%)"]


def test_disabled_progress_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sqz_export.progress"):
        list(progress.track(range(3), 3, "eval", "batches", enabled=False))
    assert caplog.records == []


def test_stage_logs_start_heartbeat_and_end(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import time

    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")
    with caplog.at_level(logging.INFO, logger="sqz_export.progress"):
        with progress.stage("export"):
            time.sleep(0.3)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "export ..."
    assert any(line.startswith("export: still running (") for line in lines[1:-1])
    assert lines[-1].startswith("export: done in ")
