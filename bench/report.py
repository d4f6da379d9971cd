"""Results: medians with min-max per workload, system and metric, the targets' verdicts, a
markdown report for humans and a JSON file for machines.

Must not import mifs nor measure anything: it only reads Samples.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.registry import Metric, Sample, Verdict, Workload

Summary = dict[str, dict[str, dict[str, dict[str, float]]]]
"""summary[workload][system][metric] = {"median", "min", "max", "n"}"""


def summarize(samples: Sequence[Sample]) -> Summary:
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for s in samples:
        for key, value in s.metrics.items():
            values.setdefault(s.workload, {}).setdefault(s.system, {}).setdefault(key, []).append(value)
    return {
        w: {
            sysname: {
                key: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
                for key, v in metrics.items()
            }
            for sysname, metrics in systems.items()
        }
        for w, systems in values.items()
    }


def _cell(stats: dict[str, float] | None, metric: Metric) -> str:
    if stats is None:
        return "–"
    d = metric.digits
    text = f"{stats['median']:.{d}f}"
    if stats["n"] > 1:
        text += f" ({stats['min']:.{d}f}–{stats['max']:.{d}f})"
    return text


def markdown(
    *,
    title: str,
    header: Sequence[str],
    workloads: Sequence[Workload],
    systems: Sequence[str],
    summary: Summary,
    verdicts: Sequence[Verdict],
    notes: Sequence[str],
    extra: Sequence[str] = (),
) -> str:
    lines = [f"## {title}", ""]
    lines += [f"- {h}" for h in header]
    for workload in workloads:
        table = summary.get(workload.name, {})
        rows = [s for s in systems if s in table]
        if not rows:
            continue
        metrics = [m for m in workload.metrics if any(m.key in table[s] for s in rows)]
        lines += ["", f"### {workload.name}", "", workload.description + ".", ""]
        lines.append("| system | " + " | ".join(m.label for m in metrics) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in metrics) + " |")
        for s in rows:
            lines.append(f"| {s} | " + " | ".join(_cell(table[s].get(m.key), m) for m in metrics) + " |")
    if verdicts:
        lines += ["", "### Targets", "", "| target | value | limit | result |", "| --- | ---: | ---: | --- |"]
        for v in verdicts:
            value = "–" if v.value is None else f"{v.value:.2f}"
            result = {True: "PASS", False: "FAIL", None: "–"}[v.passed]
            lines.append(f"| {v.name} ({v.detail}) | {value} | ≤ {v.limit:g} | {result} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if extra:
        lines += [""] + list(extra)
    return "\n".join(lines) + "\n"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
