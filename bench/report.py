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
    roles: dict[str, str] | None = None,
) -> str:
    roles = roles or {}
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
        lines += _ratios(table, rows, [m for m in metrics if m.primary], roles)
    if verdicts:
        lines += ["", "### Targets", "", "| target | value | limit | result |", "| --- | ---: | ---: | --- |"]
        for v in verdicts:
            value = "–" if v.value is None else f"{v.value:.2f}"
            result = {True: "PASS", False: "FAIL", None: "–"}[v.passed]
            lines.append(f"| {v.name} ({v.detail}) | {value} | {v.op} {v.limit:g} | {result} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if extra:
        lines += [""] + list(extra)
    return "\n".join(lines) + "\n"


def best_peer(table: dict[str, dict[str, dict[str, float]]], metric: Metric, roles: dict[str, str]) -> str | None:
    """The peer with the best median of `metric` in this workload's table."""
    peers = [s for s, r in roles.items() if r == "peer" and metric.key in table.get(s, {})]
    if not peers:
        return None
    pick = max if metric.higher_is_better else min
    return pick(peers, key=lambda s: table[s][metric.key]["median"])


def ratio(value: float, reference: float, metric: Metric) -> float | None:
    """How many times better `value` is than `reference` (> 1: better), on medians."""
    if value <= 0 or reference <= 0:
        return None
    return value / reference if metric.higher_is_better else reference / value


def _ratios(table: dict[str, dict[str, dict[str, float]]], rows: Sequence[str], metrics: Sequence[Metric],
            roles: dict[str, str]) -> list[str]:
    """Each system's medians of the primary metrics as multiples of plain disk's and of the best
    peer's (> 1: better than the reference)."""
    if not metrics or len(rows) < 2:
        return []
    heads: list[str] = []
    refs: list[tuple[Metric, str]] = []
    for m in metrics:
        if "disk" in rows and m.key in table["disk"]:
            heads.append(f"{m.label} x disk")
            refs.append((m, "disk"))
        peer = best_peer(table, m, roles)
        if peer is not None:
            heads.append(f"{m.label} x best peer ({peer})")
            refs.append((m, peer))
    if not refs:
        return []
    out = ["", "Ratios of the medians (> 1: better than the reference):", "",
           "| system | " + " | ".join(heads) + " |", "| --- | " + " | ".join("---:" for _ in heads) + " |"]
    for s in rows:
        cells = []
        for m, ref in refs:
            mine, other = table[s].get(m.key), table[ref].get(m.key)
            r = ratio(mine["median"], other["median"], m) if mine and other else None
            cells.append("–" if r is None else f"{r:.2f}")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out


def ratios(summary: Summary, workloads: Sequence[Workload], roles: dict[str, str]) -> dict[str, Any]:
    """For the JSON: ratios[workload][system][metric] = {"x_disk", "x_best_peer", "best_peer"}."""
    out: dict[str, Any] = {}
    for w in workloads:
        table = summary.get(w.name, {})
        for m in (m for m in w.metrics if m.primary):
            peer = best_peer(table, m, roles)
            for s, metrics in table.items():
                if m.key not in metrics:
                    continue
                entry: dict[str, Any] = {}
                for label, ref in (("x_disk", "disk"), ("x_best_peer", peer)):
                    if ref is not None and m.key in table.get(ref, {}):
                        entry[label] = ratio(metrics[m.key]["median"], table[ref][m.key]["median"], m)
                entry["best_peer"] = peer
                out.setdefault(w.name, {}).setdefault(s, {})[m.key] = entry
    return out


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
