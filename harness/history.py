"""A baseline figure's history: every recording of one cell's figure in the git history of its file.

A figure's spread says how much its repeats varied inside one recording. Whether that is the noise a gate
meets shows only across recordings (other processes, hosts and days): where recordings lie further apart
than their spreads, a one-process gate fails on noise, and baselines want `--processes 2` or more, pooled
recordings (`--pool-baselines`), or a wider tolerance. `quantbench history KEY CELL` puts both side by side.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.hardware import short_uuid
from harness.results import CellResult


class HistoryError(Exception):
    """The history cannot be read (no git, not a git checkout, an unknown cell)."""


@dataclass(frozen=True)
class Recording:
    """One recording of a figure: the commit that stored it (or the working tree) and what it recorded."""

    commit: str
    date: str
    value: float
    spread: float
    n: int
    measured_at: str | None
    revision: str | None
    cpu_count: int | None
    gpu: str | None = None  # the card's uuid, shortened: recordings on other cards of one key tell apart
    runs: int = 1  # the processes (and pooled recordings) its samples came from

    @property
    def relative_spread(self) -> float:
        return self.spread / abs(self.value) if self.value else 0.0


def _git(folder: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise HistoryError("git is not installed: the history is read from git") from None
    if done.returncode != 0:
        raise HistoryError(f"git {' '.join(args)} in {folder}: {done.stderr.strip()}")
    return done.stdout


def _recording(document: Any, cell: str, metric: str, commit: str, date: str) -> Recording | None:
    """The figure as one version of the baseline file holds it (None: not there, or not readable)."""
    try:
        stored = CellResult.from_dict(document["cells"][cell])
        figure = stored.figures[metric]
        return Recording(commit, date, figure.value, figure.spread, figure.n, stored.details.get("measured_at"),
                         stored.environment.get("quantbench_revision"), stored.hardware.get("cpu_count"),
                         short_uuid((stored.hardware.get("gpu") or {}).get("uuid")),
                         int(stored.details.get("pooled_runs", 1)))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def figure_history(path: Path, cell: str, metric: str) -> list[Recording]:
    """Every distinct recording of `metric` of `cell` in the git history of baseline file `path`, oldest
    first, and the working tree's when it differs from the last commit's."""
    folder = path.parent
    if not folder.is_dir():
        raise HistoryError(f"{folder}: no such folder")
    _git(folder, "rev-parse", "--git-dir")  # a checkout, or a clear error
    log = _git(folder, "log", "--reverse", "--format=%H %ad", "--date=short", "--", path.name)
    found: list[Recording] = []

    def add(recording: Recording | None) -> None:
        last = found[-1] if found else None
        if recording is not None and (last is None or (recording.value, recording.measured_at, recording.n)
                                      != (last.value, last.measured_at, last.n)):
            found.append(recording)

    for line in log.splitlines():
        commit, date = line.split(" ", 1)
        try:
            document = json.loads(_git(folder, "show", f"{commit}:./{path.name}"))
        except (HistoryError, json.JSONDecodeError):
            continue  # deleted or not JSON in that commit
        add(_recording(document, cell, metric, commit[:7], date))
    if path.is_file():
        try:
            add(_recording(json.loads(path.read_text(encoding="utf-8")), cell, metric, "(working tree)", "-"))
        except json.JSONDecodeError as exc:
            raise HistoryError(f"{path}: not valid JSON ({exc})") from None
    return found


def describe(recordings: list[Recording], cell: str, metric: str) -> str:
    """A table of the recordings, and how far apart they lie against their own spreads."""
    if not recordings:
        return f"no recording of {metric} of {cell} in the history of its baseline file"
    lines = [f"{metric} of {cell}: {len(recordings)} recording(s)",
             f"{'commit':<15} {'date':<10} {'measured at':<25} {'value':>10} {'spread':>8} {'n':>3} "
             f"{'runs':>4} {'revision':<18} {'gpu':<8} cpus"]
    for r in recordings:
        lines.append(f"{r.commit:<15} {r.date:<10} {r.measured_at or '-':<25} {r.value:>10.4g} "
                     f"{100 * r.relative_spread:>7.1f}% {r.n:>3} {r.runs:>4} {r.revision or '-':<18} "
                     f"{r.gpu or '-':<8} {r.cpu_count or '-'}")
    if len(recordings) > 1:
        values = [r.value for r in recordings]
        middle = statistics.median(values)
        between = statistics.stdev(values) / abs(middle) if middle else 0.0
        within = statistics.median(r.relative_spread for r in recordings)
        lines.append(f"between recordings: median {middle:.4g}, range {min(values):.4g}-{max(values):.4g}, "
                     f"spread ±{100 * between:.1f}%; within a recording: median spread ±{100 * within:.1f}%")
        if within and between > 2 * within:
            lines.append(f"the recordings lie {between / within:.1f}x further apart than their own spreads: a "
                         "gate of one process can fail on that alone; record with --processes 2 or more, pool "
                         "recordings of several machines (--pool-baselines), or widen this metric's tolerance")
    return "\n".join(lines)
