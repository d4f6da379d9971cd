"""Test helper: a real SeaweedFS S3 gateway (`weed server -s3`) on 127.0.0.1, free ports, auth on.

Must not import mifs: it only runs and watches a `weed` process for the S3 tests.
No weed process outlives the test session: stop() at session end, an atexit hook as a
backstop, and PR_SET_PDEATHSIG so the kernel kills weed even if pytest itself is killed.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

WEED = Path(sys.executable).resolve().parent / "weed"
if not WEED.exists():
    WEED = Path(sys.prefix) / "bin" / "weed"

REGION = "us-east-1"

# One volume per collection (SeaweedFS makes one collection per bucket; the default is 7
# volumes per collection, which makes every fresh bucket slow and fills volume slots).
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 2
copy_3 = 3
copy_other = 1
"""

_PR_SET_PDEATHSIG = 1


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All sockets stay bound until every port is picked: picking one at a time can return the
    same port twice (it happened: weed's volume port equal to its filer gRPC port).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must not load anything


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class Identity:
    access_key: str
    secret_key: str = field(repr=False)


class SeaweedS3:
    """One `weed server` with master, volume, filer and S3 gateway in one process.

    Ports and the data directory are chosen once, so stop()/start() brings the same
    server (same endpoint, same objects) back: outage tests need that.
    """

    def __init__(self, base_dir: Path | None = None, *, weed: Path = WEED, tls: bool = False) -> None:
        self.weed = weed
        self.tls = tls
        # Short path: weed puts unix sockets here, and sun_path is limited to 108 bytes.
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="mifs-weed-")) if base_dir is None else base_dir
        self.data_dir = self.base_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base_dir / "weed.log"
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
        if tls:
            names.append("s3.https")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.host = "127.0.0.1"
        self.region = REGION
        self.admin = Identity("mifsadmin" + secrets.token_hex(4), secrets.token_hex(20))
        self.reader = Identity("mifsreader" + secrets.token_hex(4), secrets.token_hex(20))
        """An identity that may read and list but not write (for AccessDenied tests)."""
        config = {
            "identities": [
                {
                    "name": "mifs-admin",
                    "credentials": [{"accessKey": self.admin.access_key, "secretKey": self.admin.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "mifs-reader",
                    "credentials": [{"accessKey": self.reader.access_key, "secretKey": self.reader.secret_key}],
                    "actions": ["Read", "List"],
                },
            ]
        }
        self.config_path = self.base_dir / "s3.json"
        self.config_path.write_text(json.dumps(config))
        self.config_path.chmod(0o600)
        (self.base_dir / "master.toml").write_text(_MASTER_TOML)
        self.ca_bundle = self.base_dir / "ca.pem"
        """With tls=True: the PEM of the CA that signed the HTTPS endpoint's certificate."""
        if tls:
            _write_test_pki(self.base_dir, self.host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_holder: list[subprocess.Popen[bytes] | None] = [None]  # seen by the finalizer
        self._bucket_counter = 0
        self._admin_client: Any = None
        self._session_buckets: dict[str, str] = {}
        self._lock = threading.Lock()
        self.last_startup_seconds: float | None = None
        self._finalizer = weakref.finalize(self, _stop_process_and_clean, self._proc_holder, self.ports, self.base_dir, self._own_dir)

    # --- what tests use ---------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def https_endpoint_url(self) -> str:
        """With tls=True: the same gateway over HTTPS (certificate for 127.0.0.1 from ca_bundle)."""
        assert self.tls
        return f"https://{self.host}:{self.ports['s3.https']}"

    @property
    def access_key(self) -> str:
        return self.admin.access_key

    @property
    def secret_key(self) -> str:
        return self.admin.secret_key

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(self.weed),
            "server",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.telemetry=false",
            "-master.peers=none",  # single master: no raft election wait (start ~2.4 s instead of 3.5-17 s)
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.ip.bind={self.host}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config_path}",
            "-s3.autoCreateBucket=false",  # behave like AWS: a put to a missing bucket fails
        ] + (
            [
                f"-s3.port.https={p['s3.https']}",
                f"-s3.cert.file={self.base_dir / 'server.pem'}",
                f"-s3.key.file={self.base_dir / 'server.key'}",
            ]
            if self.tls
            else []
        )

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, timeout: float = 5.0) -> Any:
        """A boto3 S3 client for test setup and inspection (not the code under test).

        The admin client with default timeouts is made once and shared (boto3 clients are
        thread-safe); making one costs ~0.1 s.
        """
        if access_key is None and secret_key is None and timeout == 5.0:
            with self._lock:
                if self._admin_client is None:
                    self._admin_client = self._make_client(self.access_key, self.secret_key, timeout)
                return self._admin_client
        return self._make_client(access_key or self.access_key, secret_key or self.secret_key, timeout)

    def _make_client(self, access_key: str, secret_key: str, timeout: float) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=timeout,
                read_timeout=timeout,
            ),
        )

    def new_bucket(self, stem: str = "mifs-test") -> str:
        """Create a bucket with a name no other test uses and return its name."""
        with self._lock:
            self._bucket_counter += 1
            name = f"{stem}-{self._bucket_counter}-{secrets.token_hex(3)}"
        self.client().create_bucket(Bucket=name)
        return name

    def session_bucket(self, purpose: str) -> str:
        """One bucket per purpose for the whole session (tests then take a fresh prefix in it)."""
        with self._lock:
            name = self._session_buckets.get(purpose)
        if name is None:
            name = self.new_bucket(purpose)
            with self._lock:
                name = self._session_buckets.setdefault(purpose, name)
        return name

    def unique_prefix(self, stem: str = "t") -> str:
        """A key prefix no other test of this session uses."""
        with self._lock:
            self._bucket_counter += 1
            return f"{stem}{self._bucket_counter}-{secrets.token_hex(3)}"

    def start(self, timeout: float = 60.0) -> float:
        """Start weed and wait until the S3 gateway stores and returns an object; the seconds taken."""
        if self.running:
            return 0.0
        begin = time.monotonic()
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.base_dir,  # weed reads master.toml from its working directory
                env={**os.environ, "TMPDIR": str(self.base_dir)},  # glog files go to TMPDIR
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        finally:
            log.close()
        _live_procs[self._proc] = self.ports
        self._proc_holder[0] = self._proc
        try:
            self._wait_ready(begin + timeout)
        except BaseException:
            self.stop()
            raise
        self.last_startup_seconds = time.monotonic() - begin
        return self.last_startup_seconds

    def stop(self, grace: float = 0.5) -> None:
        """Stop weed by pid: SIGTERM, wait `grace` seconds, SIGKILL. Ports and data stay for start().

        weed's filer waits 15 s for its gRPC streams on SIGTERM, so this usually ends in SIGKILL.
        That is safe for the data: volume files and the filer's leveldb journal are handed to
        the OS before a request is answered (objects survive the restart tests). grace=0 kills
        at once, like a crash.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_process(proc, grace)
        _remove_grpc_sockets(self.ports)

    def close(self) -> None:
        """stop() and remove the data directory (if this object made it)."""
        self.stop()
        self._finalizer()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- internals ----------------------------------------------------------------------------

    def _wait_ready(self, deadline: float) -> None:
        """Ready = a bucket can be created and an object written and read back (master,
        volume server, filer and gateway all up), not merely an open port."""
        client = self.client(timeout=2.0)
        probe = "mifs-ready-probe"
        last: BaseException | None = None
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode} during startup:\n{self.log_tail()}")
            try:
                try:
                    client.create_bucket(Bucket=probe)
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except client.exceptions.BucketAlreadyExists:
                    pass
                client.put_object(Bucket=probe, Key="probe", Body=b"ready")
                if client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ready":
                    return
            except Exception as exc:  # noqa: BLE001 - anything means "not yet"
                last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"weed S3 gateway not ready in time (last error: {last!r}):\n{self.log_tail()}")
            time.sleep(0.05)  # poll interval of a condition wait with a deadline


def _write_test_pki(directory: Path, ip: str) -> None:
    """A throwaway CA (ca.pem) and a server certificate for `ip` signed by it (server.pem/.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mifs test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "server.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)


def _stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        if grace > 0:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _live_procs.pop(proc, None)


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """weed also serves gRPC on /tmp/seaweedfs-<service>-grpc-<port>.sock (path hard-coded, not
    under TMPDIR) and leaves them behind when killed; the ports are ours, so are the sockets."""
    for service in ("master", "volume", "filer", "s3"):
        Path(f"/tmp/seaweedfs-{service}-grpc-{ports[service + '.grpc']}.sock").unlink(missing_ok=True)


def _stop_process_and_clean(
    holder: list[subprocess.Popen[bytes] | None], ports: dict[str, int], base_dir: Path, remove: bool
) -> None:
    proc = holder[0]
    if proc is not None:
        _stop_process(proc, 0.5)
    _remove_grpc_sockets(ports)
    if remove:
        shutil.rmtree(base_dir, ignore_errors=True)


_live_procs: dict[subprocess.Popen[bytes], dict[str, int]] = {}


@atexit.register
def _kill_leftovers() -> None:
    for proc, ports in list(_live_procs.items()):
        _stop_process(proc, 0.0)
        _remove_grpc_sockets(ports)


# --- the one server of a test session ---------------------------------------------------------

_shared: SeaweedS3 | None = None
_shared_lock = threading.Lock()


def shared_server() -> SeaweedS3:
    """The session's server, started on first use (by the s3_server fixture or a BACKENDS factory)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = SeaweedS3(tls=True)  # HTTP for most tests, HTTPS too for the TLS tests
        if not _shared.running:
            _shared.start()
        return _shared


def close_shared_server() -> None:
    """Stop the session's server and delete its data (session end)."""
    global _shared
    with _shared_lock:
        server, _shared = _shared, None
    if server is not None:
        server.close()
