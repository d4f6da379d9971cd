"""systemd integration: the unit file verifies, and the daemon speaks the notify protocol to a
real NOTIFY_SOCKET datagram socket (READY=1 once the mount is live, STOPPING=1 at unmount)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mifs_e2e import Archive, is_fuse_mounted, mifs_env, run_mifs, wait_until

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "mifs@.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd): .ci/setup installs it"
    # verify checks that ExecStart's binary exists: point it at the mifs we test.
    mifs_bin = Path(sys.executable).parent / "mifs"
    assert mifs_bin.exists()
    unit = tmp_path / "mifs@.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mifs", str(mifs_bin)))
    (tmp_path / "mifs@demo.service").symlink_to(unit)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "mifs@demo.service")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if "mifs@" in line]
    assert complaints == []


def test_unit_is_a_notify_service_that_restarts_drains_and_is_hardened() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert any(v.startswith("mifs.key:") for v in s["LoadCredential"])
    assert "--foreground" in s["ExecStart"][0] and "--config /etc/mifs/%i.toml" in s["ExecStart"][0]
    assert "--key-credential mifs.key" in s["ExecStart"][0]
    minutes = re.fullmatch(r"(\d+)min", s["TimeoutStopSec"][0])
    assert minutes and int(minutes.group(1)) >= 5, "stopping drains the upload queue: needs time"
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
    assert "/dev/fuse rw" in s["DeviceAllow"]


def _notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(60)
    return sock


def _receive_until(sock: socket.socket, field: str) -> list[str]:
    """Every datagram received until one carries `field` (e.g. READY=1)."""
    seen: list[str] = []
    while True:
        message = sock.recv(4096).decode()
        seen.append(message)
        if field in message.split("\n"):
            return seen


def test_foreground_daemon_notifies_ready_and_stopping(archive: Archive, tmp_path: Path) -> None:
    sock = _notify_socket(tmp_path)
    env = {**mifs_env(), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    archive.mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mifs", "mount", str(archive.store), str(archive.mountpoint),
         "--key-file", str(archive.key_file), "--cache-dir", str(archive.cache_dir), "--foreground"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    archive.mounts.append((archive.mountpoint, archive.cache_dir))
    try:
        messages = _receive_until(sock, "READY=1")
        # READY=1 promises a live mount: it must already serve requests.
        assert is_fuse_mounted(archive.mountpoint)
        (archive.mountpoint / "probe").write_bytes(b"ready means ready")
        assert any(line.startswith("STATUS=mounted at") for m in messages for line in m.split("\n"))
        result = run_mifs("umount", archive.mountpoint)
        assert result.returncode == 0, result.stderr
        archive.mounts.remove((archive.mountpoint, archive.cache_dir))
        _receive_until(sock, "STOPPING=1")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    wait_until(lambda: not is_fuse_mounted(archive.mountpoint), 30, "the mount to go away")
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
