"""Test helper: an HTTP/1.1 proxy on 127.0.0.1 that injects S3 faults between a client and SeaweedFS.

Must not import mifs, and must not change what it forwards (S3 signatures cover the request).
Faults: 500 InternalError and 503 SlowDown answers, connections dropped before forwarding or
after the server executed the request, answers cut off half-way, delays, and request bodies
damaged on the way (one byte flipped: the only fault that changes what is forwarded). Which request gets
which fault follows a seeded random sequence in arrival order, bounded by max_faults and
max_consecutive, and every injected fault is counted.
"""

from __future__ import annotations

import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO
from urllib.parse import urlsplit

FAULT_KINDS = ("error_500", "slowdown_503", "drop_before", "drop_after", "truncate", "delay", "corrupt_body")
"""drop_before: the request is read, then the connection is closed; the server never sees it.
drop_after: the server executes the request, then the client's connection is closed unanswered.
truncate: the server executes the request; the client gets half of the answer, then a close.
corrupt_body: the request goes upstream with the middle byte of its body flipped (requests
without a body are forwarded unchanged)."""

FAILING_KINDS = frozenset(FAULT_KINDS) - {"delay"}
"""The faults that make the request fail at the client (a delay fails only past its timeout)."""


@dataclass(frozen=True)
class FaultPlan:
    """Per-request probabilities of each fault (their sum must be at most 1)."""

    error_500: float = 0.0
    slowdown_503: float = 0.0
    drop_before: float = 0.0
    drop_after: float = 0.0
    truncate: float = 0.0
    delay: float = 0.0
    corrupt_body: float = 0.0
    delay_seconds: float = 0.2
    seed: int = 0
    max_faults: int | None = None
    """Stop injecting after this many faults."""
    max_consecutive: int | None = 3
    """After this many faulted requests in a row, the next one goes through untouched."""
    methods: frozenset[str] | None = None
    """Only requests with these methods get faults (None: all)."""
    query_contains: str | None = None
    """Only requests whose path?query contains this text get faults (e.g. "partNumber=2")."""

    def __post_init__(self) -> None:
        total = sum(getattr(self, kind) for kind in FAULT_KINDS)
        if total > 1.0 + 1e-9 or any(getattr(self, kind) < 0 for kind in FAULT_KINDS):
            raise ValueError("fault probabilities must be >= 0 and sum to at most 1")


_ERROR_BODIES = {
    "error_500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "slowdown_503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
}


class _Closed(Exception):
    """The peer closed the connection."""


def _read_line(rfile: BinaryIO, limit: int = 65536) -> bytes:
    return rfile.readline(limit)


def _read_head(rfile: BinaryIO) -> list[bytes] | None:
    """The lines of a request or response head (without CRLFs); None at a clean EOF."""
    lines: list[bytes] = []
    while True:
        line = _read_line(rfile)
        if not line:
            if lines:
                raise _Closed()
            return None
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue  # stray CRLF between requests
            return lines
        lines.append(line.rstrip(b"\r\n"))


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _read_exact(rfile: BinaryIO, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        raise _Closed()
    return data


def _read_body(rfile: BinaryIO, lines: list[bytes]) -> bytes:
    """The raw body bytes (chunk framing kept), by Content-Length or chunked encoding."""
    if (_header(lines, b"transfer-encoding") or b"").lower() == b"chunked":
        raw = bytearray()
        while True:
            size_line = _read_line(rfile)
            if not size_line:
                raise _Closed()
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = _read_line(rfile)
                    if not trailer:
                        raise _Closed()
                    raw += trailer
                    if trailer in (b"\r\n", b"\n"):
                        return bytes(raw)
            raw += _read_exact(rfile, size + 2)
    length = _header(lines, b"content-length")
    return _read_exact(rfile, int(length)) if length else b""


class FaultProxy:
    """Forwards every request on a new upstream connection (Connection: close) and answers the
    client on its kept-alive connection, unless the plan says otherwise."""

    def __init__(self, upstream_url: str, plan: FaultPlan | None = None) -> None:
        parts = urlsplit(upstream_url)
        assert parts.scheme == "http" and parts.hostname and parts.port, upstream_url
        self.upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._plan = plan or FaultPlan()
        self._rng = random.Random(self._plan.seed)
        self._faults = 0
        self._consecutive = 0
        self._counts: Counter[str] = Counter()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def set_plan(self, plan: FaultPlan) -> None:
        """Switch plans (the random sequence restarts from the new plan's seed)."""
        with self._lock:
            self._plan = plan
            self._rng = random.Random(plan.seed)
            self._faults = 0
            self._consecutive = 0

    def counts(self) -> dict[str, int]:
        """requests, forwarded, and one entry per fault kind."""
        with self._lock:
            result = {"requests": 0, "forwarded": 0, **{kind: 0 for kind in FAULT_KINDS}}
            result.update(self._counts)
            return result

    @property
    def injected(self) -> int:
        """Faults injected so far (all kinds)."""
        counts = self.counts()
        return sum(counts[kind] for kind in FAULT_KINDS)

    @property
    def failures_injected(self) -> int:
        """Faults that make a request fail at the client (everything but delays)."""
        counts = self.counts()
        return sum(counts[kind] for kind in FAILING_KINDS)

    # --- internals ------------------------------------------------------------------------

    def _decide(self, method: str, target: str) -> str | None:
        with self._lock:
            plan = self._plan
            self._counts["requests"] += 1
            draw = self._rng.random()  # drawn for every request: the sequence depends on arrival order only
            eligible = (plan.methods is None or method in plan.methods) and (
                plan.query_contains is None or plan.query_contains in target
            )
            if not eligible:
                return None
            if plan.max_faults is not None and self._faults >= plan.max_faults:
                return None
            if plan.max_consecutive is not None and self._consecutive >= plan.max_consecutive:
                self._consecutive = 0
                return None
            threshold = 0.0
            for kind in FAULT_KINDS:
                threshold += getattr(plan, kind)
                if draw < threshold:
                    self._faults += 1
                    self._consecutive += 1
                    self._counts[kind] += 1
                    return kind
            self._consecutive = 0
            return None

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="faultproxy-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        try:
            while not self._stopping.is_set():
                head = _read_head(rfile)
                if head is None:
                    return
                method, target = head[0].split(b" ")[:2]
                if (_header(head, b"expect") or b"").lower() == b"100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, head)
                fault = self._decide(method.decode("latin-1"), target.decode("latin-1"))
                if fault == "drop_before":
                    return
                if fault in _ERROR_BODIES:
                    conn.sendall(self._error_response(fault, method == b"HEAD"))
                    continue
                if fault == "delay":
                    if self._stopping.wait(self._plan.delay_seconds):
                        return
                if fault == "corrupt_body" and body:
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
                response, body_start = self._forward(head, body)
                with self._lock:
                    self._counts["forwarded"] += 1
                if fault == "drop_after":
                    return
                if fault == "truncate":
                    # Half the body; an answer without a body is cut inside its status line
                    # (a cut between headers would look like a complete, empty answer).
                    cut = body_start + (len(response) - body_start) // 2 if len(response) > body_start else 8
                    conn.sendall(response[:cut])
                    return
                conn.sendall(response)
        except (OSError, _Closed, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                rfile.close()
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _error_response(fault: str, head_only: bool) -> bytes:
        status, reason, code, message = _ERROR_BODIES[fault]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        return head if head_only else head + body

    def _forward(self, head: list[bytes], body: bytes) -> tuple[bytes, int]:
        """Send the request upstream and return (the answer re-framed for keep-alive, body offset)."""
        out = [head[0]]
        for line in head[1:]:
            name = line.partition(b":")[0].strip().lower()
            if name in (b"expect", b"connection", b"keep-alive", b"proxy-connection"):
                continue
            out.append(line)
        out.append(b"Connection: close")
        request = b"\r\n".join(out) + b"\r\n\r\n" + body
        with socket.create_connection(self.upstream, timeout=60) as upstream:
            upstream.sendall(request)
            chunks = []
            while True:
                data = upstream.recv(1 << 20)
                if not data:
                    break
                chunks.append(data)
        raw = b"".join(chunks)
        while raw.startswith(b"HTTP/1.1 1"):  # interim 1xx answers
            raw = raw.split(b"\r\n\r\n", 1)[1]
        head_bytes, _, resp_body = raw.partition(b"\r\n\r\n")
        lines = head_bytes.split(b"\r\n")
        kept = [lines[0]] + [
            line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in (b"connection", b"keep-alive")
        ]
        status = int(lines[0].split(b" ")[1])
        framed = _header(lines, b"content-length") is not None or _header(lines, b"transfer-encoding") is not None
        is_head = head[0].startswith(b"HEAD ")
        if not framed and not is_head and status not in (204, 304):
            kept.append(b"Content-Length: %d" % len(resp_body))
        new_head = b"\r\n".join(kept) + b"\r\n\r\n"
        return new_head + resp_body, len(new_head)

