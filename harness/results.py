"""One cell's results (its figures, each a harness.figure.Figure, with their provenance), pooled and read back."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.config import cell_id
from harness.figure import Figure

# The version of a run's results file (one JSON record per line), written into every record. A record without
# the field was written before it existed and reads as version 1; any other version is refused.
RESULTS_SCHEMA_VERSION = 1

__all__ = ["cell_id"]  # re-exported: the id scheme lives with the matrix spec (harness/config.py)


WORKER_PARENT_VAR = "QUANTBENCH_WORKER_PARENT"  # the run's process id, which its worker must not outlive


class WorkerStatus(enum.StrEnum):
    """How a worker process ended: the `status` of its output file and of every results record."""

    RUNNING = "running"  # written when the worker starts: a worker that died without finishing leaves it
    OK = "ok"
    SKIPPED = "skipped"  # the method cannot run here (the reason says why)
    ERROR = "error"  # the worker caught an exception and said so
    CRASHED = "crashed"  # the process died (a signal, an exit code, out of memory)
    TIMEOUT = "timeout"  # still running after cell_timeout_s, and killed


class Role(enum.StrEnum):
    """What one record of a results file is: `quantbench gate` pools the records as the run did."""

    PREPARE = "prepare"
    PROCESS = "process"
    RECHECK = "recheck"


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity inside it replaced by None, so strict JSON can hold it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


@dataclass
class CellResult:
    """Everything measured for one cell, with the config, environment and hardware that made it."""

    method: str
    model: str
    batch_size: int | None
    figures: dict[str, Figure] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def id(self) -> str:
        return cell_id(self.method, self.model, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["figures"] = {name: fig.to_dict() for name, fig in self.figures.items()}
        # details are diagnostics: a non-finite number there (a gap between two -inf logits) is "no value";
        # figures stay as measured, and the store refuses a non-finite one by name
        data["details"] = json_safe(self.details)
        data["id"] = self.id
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellResult:
        """A cell read from a worker's output, a results file or a baseline.

        A figure that is not finite (NaN logits make a NaN perplexity) is no measurement: it leaves the
        figures and is named in `details.non_finite_figures` (its value as text), where the gate fails it.
        """
        figures = {name: Figure.from_dict(fig) for name, fig in data.get("figures", {}).items()}
        broken = {name: str(fig.value) for name, fig in figures.items() if not fig.finite}
        details = dict(data.get("details", {}))
        if broken:
            details["non_finite_figures"] = {**details.get("non_finite_figures", {}), **broken}
        return cls(
            method=data["method"],
            model=data["model"],
            batch_size=data.get("batch_size"),
            figures={name: fig for name, fig in figures.items() if name not in broken},
            config=data.get("config", {}),
            environment=data.get("environment", {}),
            hardware=data.get("hardware", {}),
            details=details,
            error=data.get("error"),
        )

    def non_finite(self, metrics: list[str]) -> list[str]:
        """One line per metric of `metrics` that this cell measured as NaN or infinity."""
        broken = self.details.get("non_finite_figures") or {}
        return [f"{name} of {self.id} measured {broken[name]}, not a finite number: the measurement is broken "
                "(a corrupted cached artifact or a numerical failure); it is not compared or stored"
                for name in metrics if name in broken]


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's results file (one JSON object per measuring process and line), each with
    its cell results parsed."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a quantbench results record ({exc})") from None
        version = record.get("schema_version", 1) if isinstance(record, dict) else None
        if version is not None and (type(version) is not int or version != RESULTS_SCHEMA_VERSION):
            raise ValueError(f"{path}:{number}: field 'schema_version' is {version!r}; this suite reads results "
                             f"files of version {RESULTS_SCHEMA_VERSION} (written by another quantbench version?)")
        try:
            records.append({**record, "line": number,
                            "results": [CellResult.from_dict(r) for r in record["results"]]})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: not a quantbench results record ({exc})") from None
    return records


def read_results(path: Path) -> list[CellResult]:
    """Every cell result of a run's results file, as each process wrote it (nothing pooled)."""
    return [result for record in _records(path) for result in record["results"]]


def pool(first: CellResult, again: CellResult) -> CellResult:
    """One cell measured twice: each figure with repeats in both runs becomes the median and spread of all
    their samples; a figure measured once (perplexity, load time) keeps the first run's value, and
    `details.pooled_runs` counts the processes behind both."""
    figures = dict(first.figures)
    for name, figure in first.figures.items():
        other = again.figures.get(name)
        if other is not None and len(figure.samples) > 1 and len(other.samples) > 1:
            figures[name] = Figure.of(figure.samples + other.samples)
    runs = first.details.get("pooled_runs", 1) + again.details.get("pooled_runs", 1)
    return replace(first, figures=figures, details={**first.details, "pooled_runs": runs})


def pool_results(first: list[CellResult], again: list[CellResult]) -> list[CellResult]:
    """Two processes' results of one (method, model), each batch size pooled with its own; a result that
    either process could not measure (an error, or none) stays as the first has it."""
    others = {result.batch_size: result for result in again}
    pooled = []
    for result in first:
        other = others.get(result.batch_size)
        pooled.append(pool(result, other) if other is not None and not (result.error or other.error) else result)
    return pooled


@dataclass(frozen=True)
class ProcessRecord:
    """One measuring process of a cell, as the live run saw it or as its results file holds it."""

    role: Role
    status: str
    reason: str | None
    results: list[CellResult]


@dataclass(frozen=True)
class Pooled:
    """What a cell's processes come to: its results and, when one failed, why.

    `results_carry_failure`: each result carries `failure` as its error (a later process failed, so the first
    one's figures cannot pass for pooled ones and none becomes a baseline); otherwise the failure is the first
    process's own and its results stay as it measured them.
    """

    results: list[CellResult]
    failure: str | None = None
    results_carry_failure: bool = False


def pool_processes(records: list[ProcessRecord], processes: int) -> Pooled:
    """The one pooling policy of a cell's processes, used by the live run (harness/runner.py) and when a results
    file is read back (`read_run`): `run.processes` measuring processes, then at most one recheck.

    The processes' samples pool. A failed first process keeps what it measured and is the cell's failure; a
    later process that failed fails the cell, each result carrying why; a recheck pools when it succeeded and is
    left out when it failed.
    """
    first, *later = records
    if first.status != WorkerStatus.OK:
        failure = None if first.status == WorkerStatus.SKIPPED else f"worker {first.status}: {first.reason}"
        return Pooled(first.results, failure)
    pooled, number = first.results, 1
    for record in later:
        ok = record.status == WorkerStatus.OK
        if record.role == Role.PROCESS:
            number += 1
            if not ok:
                why = f"process {number} of {processes}: worker {record.status}: {record.reason}"
                return Pooled([replace(r, error=r.error or why) for r in pooled], why, results_carry_failure=True)
        elif not ok:
            continue  # a failed recheck leaves the first figures to be gated
        pooled = pool_results(pooled, record.results)
    return Pooled(pooled)


@dataclass
class RunRead:
    """A run's results file read as the run gated it: pooled results, the failures no result carries (cell, why),
    and the hardware key the run gated each suite under, where its records say (files written before they did,
    none)."""

    results: list[CellResult]
    failures: list[tuple[str, str]]
    hardware_keys: dict[str, str] = field(default_factory=dict)


def read_run(path: Path) -> RunRead:
    """The results of a run's results file, pooled per (method, model) as the live run pooled them.

    A cell's records come in the order the run wrote them (`role` says which each is; files written
    before it existed are read by position): its `run.processes` measuring processes, then at most one
    recheck (--recheck). As in the run, the processes' samples pool; a later process that failed fails the
    cell, so each of its results carries that error (the first process's figures cannot pass for pooled
    ones, and none becomes a baseline); a recheck pools when it succeeded and is left out when it failed;
    a failed first process (or preparation) keeps what it measured and its failure is reported.
    """
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for record in _records(path):
        by_cell.setdefault(str(record.get("cell") or f"line {record['line']}"), []).append(record)
    results: list[CellResult] = []
    failures: list[tuple[str, str]] = []
    keys: dict[str, str] = {}
    for cell, records in by_cell.items():
        keys.update({record["suite"]: record["hardware_key"] for record in records
                     if record.get("suite") and record.get("hardware_key")})
        processes = next((int(r.config.get("run", {}).get("processes") or 1)
                          for record in records for r in record["results"]), 1)
        seen = []
        for number, record in enumerate(records, 1):
            # files written before records had a role are read by position
            role = record.get("role") or (Role.PROCESS if number <= processes else Role.RECHECK)
            seen.append(ProcessRecord(Role(role), str(record.get("status")), record.get("reason"), record["results"]))
        pooled = pool_processes(seen, processes)
        if pooled.failure and not (pooled.results_carry_failure and pooled.results):
            failures.append((cell, pooled.failure))
        results.extend(pooled.results)
    return RunRead(results, failures, keys)
