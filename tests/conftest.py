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
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mifs_e2e import Archive, s3_env  # noqa: E402

# Any single e2e test that runs longer than this is stuck: its mount is torn down so that
# the blocked system call fails and the test reports instead of hanging CI.
TEST_TIMEOUT = float(os.environ.get("MIFS_TEST_TIMEOUT", "300"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chunk_size(size): `mifs init --chunk-size size` for the archive fixture")
    config.addinivalue_line("markers", "expect_log(*regexes): daemon log lines this test expects (allowed)")
    config.addinivalue_line("markers", "s3_own_bucket: the s3_archive fixture makes a bucket of its own for the test")


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
    yield from managed_archive(arc, request)


def managed_archive(
    arc: Archive, request: pytest.FixtureRequest, before_teardown: Callable[[], None] | None = None
) -> Iterator[Archive]:
    """Yield an initialised archive under the e2e guarantees: a watchdog while the test runs,
    then umount of every live mount (asserted), no daemon or mount left behind, no unexpected
    daemon log lines. before_teardown runs first (e.g. bring a stopped store back)."""
    arc.start_watchdog(TEST_TIMEOUT)
    problems: list[str] = []
    try:
        yield arc
    finally:
        arc.stop_watchdog()
        if before_teardown is not None:
            try:
                before_teardown()
            except Exception as exc:  # noqa: BLE001 - reported below, cleanup goes on
                problems.append(f"preparing the teardown failed: {exc!r}")
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


@pytest.fixture
def s3_archive(tmp_path: Path, request: pytest.FixtureRequest, s3_server: _s3server.SeaweedS3) -> Iterator[Archive]:
    """A fresh archive in the SeaweedFS server (`mifs init s3://BUCKET/PREFIX --endpoint-url
    URL`, admin credentials in the environment of every CLI call), not mounted.

    A fresh prefix in a bucket shared by the session, or with @pytest.mark.s3_own_bucket a
    bucket of its own. arc.s3_bucket / arc.s3_prefix name it. A test that stopped the server
    and failed gets it started again before its mounts are unmounted (an unmount waits for
    the uploads). Marker chunk_size as for `archive`.
    """
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    own = request.node.get_closest_marker("s3_own_bucket") is not None
    bucket = s3_server.new_bucket("mifs-e2e") if own else s3_server.session_bucket("mifs-e2e")
    prefix = s3_server.unique_prefix("arc")
    arc = Archive(
        tmp_path / "archive",
        store_url=f"s3://{bucket}/{prefix}",
        store_flags=["--endpoint-url", s3_server.endpoint_url],
        env=s3_env(s3_server.access_key, s3_server.secret_key, s3_server.region),
    )
    arc.s3_bucket, arc.s3_prefix = bucket, prefix
    marker = request.node.get_closest_marker("chunk_size")
    arc.init(chunk_size=marker.args[0] if marker else None)

    def server_running() -> None:
        s3_server.start()  # no-op if it runs

    yield from managed_archive(arc, request, before_teardown=server_running)


@pytest.fixture
def s3_mounted(s3_archive: Archive) -> Iterator[Archive]:
    """The S3 archive mounted with default flags; teardown as for `mounted`."""
    s3_archive.mount()
    yield s3_archive
    s3_archive.stop_watchdog()
    if any(m == s3_archive.mountpoint for m, _ in s3_archive.mounts):
        s3_archive.umount()
