"""Fixtures for end-to-end tests: archives made with `mifs init`, mounts made with `mifs mount`.

Must not import mifs: the e2e tests see mifs only through the CLI and the mounted filesystem.
Every archive is checked after its test for unexpected Traceback/ERROR/WARNING lines in the
daemon log, and no test leaves a mount or a daemon behind, whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mifs_e2e import Archive  # noqa: E402

# Any single e2e test that runs longer than this is stuck: its mount is torn down so that
# the blocked system call fails and the test reports instead of hanging CI.
TEST_TIMEOUT = float(os.environ.get("MIFS_TEST_TIMEOUT", "300"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chunk_size(size): `mifs init --chunk-size size` for the archive fixture")
    config.addinivalue_line("markers", "expect_log(*regexes): daemon log lines this test expects (allowed)")


def fuse_available() -> str | None:
    """Why e2e tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


@pytest.fixture
def archive(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Archive]:
    """A fresh archive (`mifs init STORE --key-file KEY`), not mounted."""
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    arc = Archive(tmp_path / "archive")
    marker = request.node.get_closest_marker("chunk_size")
    arc.init(chunk_size=marker.args[0] if marker else None)
    arc.start_watchdog(TEST_TIMEOUT)
    problems: list[str] = []
    try:
        yield arc
    finally:
        arc.stop_watchdog()
        for mountpoint, _cache in list(arc.mounts):
            try:
                arc.umount(mountpoint)
            except AssertionError as exc:
                problems.append(f"umount of {mountpoint} failed: {exc}")
        cleaned = arc.force_cleanup()
        if cleaned:
            problems.append("mounts or daemons were left behind: " + "; ".join(cleaned))
        if arc.watchdog_fired:
            problems.append(f"test ran longer than {TEST_TIMEOUT:.0f}s; its mount was torn down")
        allowed = [re.compile(rx) for m in request.node.iter_markers("expect_log") for rx in m.args]
        bad_lines = arc.unexpected_log_lines(allowed)
        if bad_lines:
            problems.append("unexpected lines in the daemon log:\n" + "\n".join(bad_lines[:20]))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def mounted(archive: Archive) -> Iterator[Archive]:
    """The archive mounted with `mifs mount STORE MP --key-file KEY --cache-dir CACHE`.

    Teardown runs `mifs umount MP` and asserts it succeeded; if it did not, the archive
    fixture kills the daemon and runs `fusermount3 -u -z`, and the test errors.
    """
    archive.mount()
    yield archive
    archive.stop_watchdog()
    if any(m == archive.mountpoint for m, _ in archive.mounts):
        archive.umount()


# --- SeaweedFS S3 server for the store tests (tests/s3server.py) ------------------------------
# Self-contained: starts nothing unless a test asks for S3, and stops whatever was started.

from collections.abc import Iterator as _S3Iterator  # noqa: E402

import s3server as _s3server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server() -> _S3Iterator[_s3server.SeaweedS3]:
    """A SeaweedFS S3 gateway on 127.0.0.1 (free ports, auth on) shared by the whole session.

    Has endpoint_url, access_key, secret_key, region, new_bucket(), client(), stop(), start().
    A test that stop()s it must start() it again (same ports, same data).
    """
    yield _s3server.shared_server()


@pytest.fixture(scope="session", autouse=True)
def _s3_server_reaper() -> _S3Iterator[None]:
    """Stops the session's SeaweedFS process at the end, whoever started it."""
    yield
    _s3server.close_shared_server()
