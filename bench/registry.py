"""What can be measured on what: metric, sample, system and workload types and their registries.

Must not import mifs nor start anything: entries are classes, instantiated by the runner.
Adding a workload or a peer system is one class here-registered with a decorator.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from bench.context import Context


class BenchError(Exception):
    """A failure the harness reports as one clear line (exit code 1), not a traceback."""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    digits: int = 1
    primary: bool = False
    """Shown again in the workload's ratio table (x plain disk, x best peer)."""


@dataclass
class Sample:
    """One measurement of one workload on one system in one repeat."""

    system: str
    workload: str
    repeat: int
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A target of the issues, checked on the medians of a run."""

    name: str
    value: float | None
    limit: float
    passed: bool | None  # None: could not be evaluated
    detail: str
    op: str = "≤"
    """How value compares with limit when the target is met: "≤" or "≥"."""


class System(abc.ABC):
    """Something a workload runs on: a mount (mifs, plain disk, later gocryptfs, rclone, ...)
    or a raw store client. setup() once per run, close() always, also after a failure."""

    name: ClassVar[str]
    description: ClassVar[str]
    default: ClassVar[bool] = True
    uses_s3: ClassVar[bool] = False
    """Whether its data goes through the run's S3 server (then the server's CPU is measured)."""
    role: ClassVar[str] = "limit"
    """"mifs" (what is measured), "peer" (what users would mount instead) or "limit" (plain
    disk, raw boto3: what the machine and the S3 server can do)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.notes: list[str] = []

    def unavailable(self) -> str | None:
        """Why this system cannot run here (a missing package), or None."""
        return None

    def setup(self) -> None:
        pass

    def close(self) -> None:
        pass


class Workload(abc.ABC):
    """A client behaviour measured identically on every system that supports it."""

    name: ClassVar[str]
    description: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    def supports(self, system: System) -> bool: ...

    def prepare(self, system: System) -> None:
        """Untimed, once per system before the first repeat (for example: store the data to read)."""

    @abc.abstractmethod
    def run(self, system: System, repeat: int) -> Sample: ...

    def profile(self, system: System, output: Path) -> dict[str, Any] | None:
        """One extra run under py-spy, raw stacks to `output`, not in the statistics: the
        profile summary, or None if there is no daemon to profile on this system."""
        return None

    def verdicts(self, summary: dict[str, dict[str, dict[str, float]]], samples: Sequence[Sample]) -> list[Verdict]:
        """Targets checked on this workload's medians (summary[system][metric]["median"]);
        samples: this workload's samples, for per-repeat comparisons."""
        return []


SYSTEMS: dict[str, type[System]] = {}
WORKLOADS: dict[str, type[Workload]] = {}

_S = TypeVar("_S", bound=type[System])
_W = TypeVar("_W", bound=type[Workload])


def register_system(cls: _S) -> _S:
    SYSTEMS[cls.name] = cls
    return cls


def register_workload(cls: _W) -> _W:
    WORKLOADS[cls.name] = cls
    return cls
