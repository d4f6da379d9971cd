"""systemd's notify protocol: READY=1, STATUS=..., STOPPING=1 on $NOTIFY_SOCKET.

Must not know anything about mifs: it sends datagrams. A no-op when not run by systemd
(no NOTIFY_SOCKET), so callers never need to check.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address:
            # "@name" is an abstract socket: a leading NUL byte on the wire.
            self._address = "\0" + address[1:] if address.startswith("@") else address

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send 'KEY=value' fields as one datagram; False if systemd could not be told."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", f"STATUS={status}") if status else self.send("READY=1")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}") if status else self.send("STOPPING=1")
