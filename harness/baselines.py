"""The baseline store and the comparison rules that decide whether a figure regressed.

Baselines live in one JSON file per hardware key and model, `baselines/<hardware_key>/<model>.json`,
laid out as `BaselineFile` below. Loading validates every field, so a hand-edited or half-merged file
fails with the file and the field named instead of gating against garbage. Writing merges: only the
given cells change, every other cell and every other file stays as it was.

A regression needs two things (asv's rule): the figure got worse by more than its tolerance, and by
more than the measured noise of baseline and run together can explain.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypedDict

from harness.cache import atomic_write_text, file_lock
from harness.figure import Figure
from harness.hardware import is_cpu_key, short_uuid
from harness.measure.memory import MEMORY_PROTOCOL_DEFAULT, PROTOCOL_METRICS
from harness.metrics import DEVICE_METRICS, METRICS
from harness.metrics import metric as metric_spec
from harness.results import CellResult, cell_id, pool
from harness.tolerances import Tolerances
from harness.values import is_number, shown

SCHEMA_VERSION = 1

# A slug names a folder or a file: no separators, and no leading dot so it can never be `..` or hidden.
_SLUG = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")

REPLACE_COMMAND = "pytest --update-baselines --replace-unreadable-baselines"


def _remedy(path: Path, suffix: str) -> str:
    """What to do about a baseline file that cannot be read: the command that moves it aside and records anew."""
    return (f"fix it, or run `{REPLACE_COMMAND}` to move it aside to {path.name}{suffix} (kept beside it) "
            "and record this run's cells in a new file")


class FigureDict(TypedDict):
    """One stored figure: `Figure.to_dict()`."""

    value: float
    spread: float
    n: int
    samples: list[float]


class CellDict(TypedDict):
    """One stored cell: `CellResult.to_dict()` plus when it was recorded."""

    id: str
    method: str
    model: str
    batch_size: int | None
    figures: dict[str, FigureDict]
    config: dict[str, Any]
    environment: dict[str, Any]
    hardware: dict[str, Any]
    details: dict[str, Any]
    error: str | None
    recorded_at: str


class BaselineFile(TypedDict):
    """One baseline file, `baselines/<hardware_key>/<model>.json`; cells are keyed by their id."""

    schema_version: int
    hardware_key: str
    model: str
    cells: dict[str, CellDict]


class BaselineError(Exception):
    """A baseline file (or a result about to become one) does not follow the schema."""


class NewerSchemaError(BaselineError):
    """A baseline file written by a newer quantbench: this one must not read or replace it."""


class UnreadableBaselineError(BaselineError):
    """A stored baseline file that cannot be read: malformed, invalid or of an older schema.

    `aside` is where --replace-unreadable-baselines moves it before writing a new file.
    """

    def __init__(self, message: str, aside: Path) -> None:
        super().__init__(message)
        self.aside = aside


def _check_slug(name: str, what: str) -> None:
    if not isinstance(name, str) or not _SLUG.match(name):
        raise ValueError(
            f"{what} {name!r} cannot name a baseline file: use letters, digits, '.', '_' and '-' only, "
            "not starting with '.'"
        )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; in a baseline that silently drops a cell, which is
    # what a careless merge-conflict resolution produces.
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise BaselineError(f"the key {key!r} appears twice in one object")
        data[key] = value
    return data


class _Reader:
    """Checks decoded JSON against the schema; every failure names the file and the field path."""

    def __init__(self, file: Path, hint: str) -> None:
        self.file = file
        self.hint = hint

    def fail(self, where: str, problem: str) -> NoReturn:
        raise BaselineError(f"{self.file}: {where}: {problem}; {self.hint}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {shown(value)}")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, f"expected a string, got {shown(value)}")
        return value

    def integer(self, value: Any, where: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"expected an integer, got {shown(value)}")
        if value < minimum:
            self.fail(where, f"expected an integer of at least {minimum}, got {value}")
        return value

    def number(self, value: Any, where: str, minimum: float | None = None) -> float:
        if not is_number(value):
            self.fail(where, f"expected a number, got {shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer literal beyond any float
            number = math.inf if value > 0 else -math.inf
        if not math.isfinite(number):
            self.fail(where, f"expected a finite number, got {number}")
        if minimum is not None and number < minimum:
            self.fail(where, f"expected a number of at least {minimum}, got {number}")
        return number

    def fields(self, data: dict[str, Any], where: str, schema: type) -> None:
        expected = schema.__required_keys__
        missing = sorted(expected - data.keys())
        if missing:
            self.fail(where, "missing field " + ", ".join(repr(name) for name in missing))
        unknown = sorted(data.keys() - expected)
        if unknown:
            known = ", ".join(sorted(expected))
            self.fail(where, f"unknown field {', '.join(map(repr, unknown))}; known fields: {known}")

    def document(self, data: Any, hardware_key: str, model: str) -> BaselineFile:
        data = self.mapping(data, "top level")
        # The version comes first: an older file has other fields, and that is the useful message.
        if "schema_version" not in data:
            self.fail("schema_version", "missing")
        version = data["schema_version"]
        if isinstance(version, bool) or not isinstance(version, int):
            self.fail("schema_version", f"expected an integer, got {shown(version)}")
        if version < SCHEMA_VERSION:
            raise UnreadableBaselineError(
                f"schema_version {version} in {self.file}; this suite reads {SCHEMA_VERSION}; "
                + _remedy(self.file, f".v{version}"), self.file.with_name(f"{self.file.name}.v{version}"))
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"schema_version {version} in {self.file}; this suite reads {SCHEMA_VERSION}; "
                "update quantbench to read it"
            )
        self.fields(data, "top level", BaselineFile)
        for name, expected in (("hardware_key", hardware_key), ("model", model)):
            found = self.string(data[name], name)
            if found != expected:
                self.fail(name, f"the file says {found!r} but its path says {expected!r}; "
                                "move the file or correct the field")
        cells = self.mapping(data["cells"], "cells")
        for key, cell in cells.items():
            self.cell(cell, key, model)
        return data  # type: ignore[return-value]

    def cell(self, data: Any, key: str, model: str) -> None:
        where = f"cells[{key!r}]"
        data = self.mapping(data, where)
        self.fields(data, where, CellDict)
        method = self.string(data["method"], f"{where}.method")
        if self.string(data["model"], f"{where}.model") != model:
            self.fail(f"{where}.model", f"expected {model!r}, the file's model, got {data['model']!r}")
        batch_size = data["batch_size"]
        if batch_size is not None:
            self.integer(batch_size, f"{where}.batch_size", 1)
        own_id = self.string(data["id"], f"{where}.id")
        if own_id != cell_id(method, model, batch_size):
            self.fail(f"{where}.id", f"{own_id!r} does not match method, model and batch_size "
                                     f"({cell_id(method, model, batch_size)!r})")
        if key != own_id:
            self.fail(where, f"the key disagrees with the cell's id {own_id!r}")
        for name in ("config", "environment", "hardware", "details"):
            self.mapping(data[name], f"{where}.{name}")
        if data["error"] is not None:
            self.fail(f"{where}.error", "a baseline cell cannot carry an error; remove the cell")
        recorded_at = self.string(data["recorded_at"], f"{where}.recorded_at")
        try:
            datetime.fromisoformat(recorded_at)
        except ValueError:
            self.fail(f"{where}.recorded_at", f"expected an ISO 8601 time, got {recorded_at!r}")
        figures = self.mapping(data["figures"], f"{where}.figures")
        for name, figure in figures.items():
            if name not in METRICS:
                known = ", ".join(sorted(METRICS))
                self.fail(f"{where}.figures", f"unknown metric {name!r}; known metrics: {known}")
            self.figure(figure, f"{where}.figures.{name}", name)

    def figure(self, data: Any, where: str, name: str) -> None:
        data = self.mapping(data, where)
        self.fields(data, where, FigureDict)
        self.measurement(data["value"], f"{where}.value", name)
        self.number(data["spread"], f"{where}.spread", minimum=0.0)
        self.integer(data["n"], f"{where}.n", 1)
        samples = data["samples"]
        if not isinstance(samples, list):
            self.fail(f"{where}.samples", f"expected a list of numbers, got {shown(samples)}")
        for index, sample in enumerate(samples):
            self.measurement(sample, f"{where}.samples[{index}]", name)

    def measurement(self, value: Any, where: str, name: str) -> None:
        """A figure's value or sample: a finite number inside the metric's range (a negative speed would pass
        every check as an improvement)."""
        problem = metric_spec(name).range_problem(self.number(value, where))
        if problem:
            self.fail(where, problem)


class BaselineStore:
    """The baseline files under one root folder, one subfolder per hardware key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, hardware_key: str, model: str) -> Path:
        """The file holding `model`'s baselines on `hardware_key`; both must be slugs."""
        _check_slug(hardware_key, "hardware key")
        _check_slug(model, "model name")
        return self.root / hardware_key / f"{model}.json"

    def hardware_keys(self) -> list[str]:
        """The hardware keys that have a baseline folder, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _SLUG.match(p.name))

    def load(self, hardware_key: str, model: str) -> dict[str, CellResult]:
        """The cells stored for `model` on `hardware_key`, by cell id; empty when there is no file.

        Raises BaselineError naming the file and the field when the file does not follow the schema.
        """
        document = self._read(hardware_key, model)
        if document is None:
            return {}
        return {key: CellResult.from_dict(cell) for key, cell in document["cells"].items()}

    def get(self, hardware_key: str, cell: CellResult) -> CellResult | None:
        """The stored baseline of `cell` on `hardware_key`, or None when it has none."""
        return self.load(hardware_key, cell.model).get(cell.id)

    def has_baselines(self, hardware_key: str) -> bool:
        """Whether `hardware_key` has any baseline file."""
        folder = self.root / hardware_key
        return folder.is_dir() and any(folder.glob("*.json"))

    def gate_baseline(self, hardware_key: str, cell: CellResult) -> GateBaseline:
        """The baselines the figures of `cell` are judged against when the run gates under `hardware_key`.

        Speed and memory figures only ever meet the baseline of `hardware_key`. So do accuracy figures
        (MetricSpec.accuracy), except on a CPU key: there they meet its own baseline when that was measured on
        the same weights (`_weights_differ`: a baseline without a weights sha256 does not qualify where the cell
        has one), else the first other CPU key's (sorted) that was measured the same way, on the same
        weights, with the same versions of the libraries that decide them (`accuracy_differences`); when some key
        has a baseline of the cell but none qualifies, they are not compared and `GateBaseline.not_compared` says
        why, key by key (when no key has one, the baseline is missing as on any key). Raises
        BaselineError when the file of `hardware_key` cannot be read; another key's file that cannot be read is
        one more reason in `not_compared`.
        """
        own = StoredBaseline(hardware_key, self.path(hardware_key, cell.model), self.get(hardware_key, cell))
        if not is_cpu_key(hardware_key):
            return GateBaseline(own, own)
        reasons = []
        if own.cell is not None:
            differ = _weights_differ(cell, own.cell)
            if differ is None:
                return GateBaseline(own, own)
            reasons.append(f"{hardware_key}: {differ}")
        others = [key for key in self.hardware_keys() if is_cpu_key(key) and key != hardware_key]
        for key in others:
            try:
                stored = self.get(key, cell)
            except BaselineError as exc:
                reasons.append(f"{key}: its baseline file cannot be read ({str(exc).split('; ')[0]})")
                continue
            if stored is None:
                continue
            mismatch = provenance_mismatch(cell, stored) or accuracy_differences(cell, stored)
            if not mismatch:
                return GateBaseline(own, StoredBaseline(key, self.path(key, cell.model), stored))
            reasons.append(f"{key}: {'; '.join(mismatch)}")
        if not reasons:  # no CPU key has a baseline of this cell: it is missing, as on any key
            return GateBaseline(own, own)
        if own.cell is None:
            reasons.insert(0, f"{hardware_key}: no baseline")
        return GateBaseline(own, None, "; ".join(reasons))

    def merge(self, hardware_key: str, results: Iterable[CellResult], pool: bool = False,
              replace_unreadable: bool = False, log: Callable[[str], None] = print) -> list[Path]:
        """Store `results` as the baselines of their cells on `hardware_key`; return the files written.

        A stored cell is replaced whole, or with `pool` its repeated figures take the stored samples too
        (`pool_with_baseline`); every other cell, model and hardware key is kept as it was. Cells with an
        error are not stored (their figures are no baseline); callers find them by `result.error`. Every
        file is read and checked before any is written, so an invalid file or result, or a stored cell that
        cannot be pooled, raises BaselineError and leaves the disk as it was. With `replace_unreadable`, a
        file that cannot be read (UnreadableBaselineError) is moved aside to its `aside` name instead, `log`
        says where, and a new file holds the given cells.
        """
        _check_slug(hardware_key, "hardware key")
        by_model: dict[str, dict[str, CellResult]] = {}
        for result in results:
            if result.error is None:
                _check_slug(result.model, "model name")
                by_model.setdefault(result.model, {})[result.id] = result
        if not by_model:
            return []
        recorded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # One lock for the whole store: pytest-xdist workers each merge their own cells into the same
        # files, and a read-modify-write without it loses cells.
        with file_lock(self.root / ".lock"):
            texts: dict[Path, str] = {}
            asides: dict[Path, tuple[Path, str]] = {}
            for model, cells in sorted(by_model.items()):
                path = self.path(hardware_key, model)
                try:
                    stored = self._read(hardware_key, model)
                except UnreadableBaselineError as exc:
                    if not replace_unreadable:
                        raise
                    asides[path] = (_free_name(exc.aside), str(exc).split("; ")[0])
                    stored = None
                document = stored or BaselineFile(
                    schema_version=SCHEMA_VERSION, hardware_key=hardware_key, model=model, cells={}
                )
                for key, result in cells.items():
                    if pool and key in document["cells"]:
                        stored = CellResult.from_dict(dict(document["cells"][key]))
                        result = pool_with_baseline(stored, result, path)
                    # a cell's recorded_at is when it was measured, also when its results file is imported
                    # later (the worker stamps details.measured_at; the store's check refuses a bad stamp by
                    # name), and the merge's time otherwise
                    document["cells"][key] = _stored_cell(path, result,
                                                          result.details.get("measured_at") or recorded_at)
                texts[path] = json.dumps(document, sort_keys=True, indent=2, allow_nan=False) + "\n"
            for path, (aside, why) in asides.items():
                os.replace(path, aside)
                log(f"{path} could not be read ({why}); moved aside to {aside}, and a new file records this run")
            for path, text in texts.items():
                atomic_write_text(path, text)
        return list(texts)

    def _read(self, hardware_key: str, model: str) -> BaselineFile | None:
        path = self.path(hardware_key, model)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        remedy, aside = _remedy(path, ".corrupt"), path.with_name(f"{path.name}.corrupt")
        try:
            data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except UnicodeDecodeError as exc:
            raise UnreadableBaselineError(
                f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); {remedy}", aside) from None
        except json.JSONDecodeError as exc:
            raise UnreadableBaselineError(
                f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; {remedy}", aside
            ) from None
        except ValueError as exc:  # what the decoder refuses beyond its grammar: an integer of 4300+ digits
            raise UnreadableBaselineError(f"{path}: not readable JSON ({exc}); {remedy}", aside) from None
        except BaselineError as exc:
            raise UnreadableBaselineError(f"{path}: {exc}; {remedy}", aside) from None
        try:
            return _Reader(path, remedy).document(data, hardware_key, model)
        except (UnreadableBaselineError, NewerSchemaError):  # a newer schema is no damage: a newer suite reads it
            raise
        except BaselineError as exc:
            raise UnreadableBaselineError(str(exc), aside) from None


@dataclass(frozen=True)
class StoredBaseline:
    """One hardware key's baseline of a cell and the file it lives in; `cell` is None when the file has none."""

    key: str
    path: Path
    cell: CellResult | None


@dataclass(frozen=True)
class GateBaseline:
    """What each figure of one cell is judged against (`BaselineStore.gate_baseline`).

    `own` is the baseline of the key the run gates under: every speed and memory figure meets it. `accuracy` is
    the one the accuracy figures meet (`own`, or another CPU key's); None when they are compared with nothing,
    and then `not_compared` says why.
    """

    own: StoredBaseline
    accuracy: StoredBaseline | None
    not_compared: str | None = None

    @classmethod
    def none(cls, key: str, path: Path) -> GateBaseline:
        """No baseline for any figure under `key` (a recording compares nothing)."""
        own = StoredBaseline(key, path, None)
        return cls(own, own)

    def for_metric(self, metric: str) -> StoredBaseline | None:
        """The baseline `metric` is judged against; None: not compared (`not_compared` says why)."""
        return self.accuracy if metric_spec(metric).accuracy else self.own


def _weights_of(cell: CellResult) -> str | None:
    return (cell.details.get("model") or {}).get("weights_sha256")


def _weights_differ(measured: CellResult, baseline: CellResult) -> str | None:
    """Why `baseline` may have been measured on other weights than `measured`: their sha256 differ, or only
    `measured` records one. None when they agree, or when `measured` records none (a model without a weights
    hash, such as a synthetic one, gates its own key as before weights were recorded)."""
    old, new = _weights_of(baseline), _weights_of(measured)
    if not new:
        return None
    if not old:
        return "weights unknown (the baseline records no weights sha256; re-record it)"
    if old != new:
        return f"weights differ (baseline sha256 {old[:16]}, now {new[:16]})"
    return None


def accuracy_differences(measured: CellResult, baseline: CellResult) -> list[str]:
    """What decides the accuracy figures and differs between `baseline` and `measured`, or is unknown.

    The weights (`details.model.weights_sha256`), the checkpoint the method quantized them into where it built
    one (`details.quantization.weights_sha256`: GPTQModel's calibration on an AMX Xeon and on an AVX2 EPYC made
    checkpoints 1.5 % apart in SmolLM2's perplexity), and the versions of the libraries the measured method declares
    (`details.accuracy_packages`: torch, transformers and the method's own, Method.ACCURACY_PACKAGES). A
    baseline of another hardware key is compared only when this is empty: then the figures are the same
    computation on other cores, where a change is the code's and not the machine's.
    """
    if not _weights_of(measured):
        found = ["weights unknown (this run records no weights sha256 for its model)"]
    else:
        found = [differ] if (differ := _weights_differ(measured, baseline)) else []
    quantized = (measured.details.get("quantization") or {}).get("weights_sha256")
    if quantized:  # a checkpoint the method built: calibration through other kernels builds other weights
        stored = (baseline.details.get("quantization") or {}).get("weights_sha256")
        if not stored:
            found.append("quantized weights unknown (the baseline records no sha256 of its checkpoint; re-record it)")
        elif stored != quantized:
            found.append(f"quantized weights differ (baseline checkpoint sha256 {stored[:16]}, now {quantized[:16]}: "
                         "quantized through other kernels or inputs)")
    names = measured.details.get("accuracy_packages")
    if not names:
        return [*found, "this run records no accuracy_packages"]
    old_packages = baseline.environment.get("packages") or {}
    new_packages = measured.environment.get("packages") or {}
    for name in names:
        if old_packages.get(name) != new_packages.get(name):
            found.append(f"{name} differs ({old_packages.get(name)} -> {new_packages.get(name)})")
    return found


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2` ... : the first that does not exist, so an earlier file set aside is kept."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _run_of(cell: CellResult) -> dict[str, Any]:
    """What tells one recording of a cell from another, as `details.pooled_from` lists it."""
    facts = {"measured_at": cell.details.get("measured_at"),
             "quantbench_revision": cell.environment.get("quantbench_revision"),
             "gpu_uuid": (cell.hardware.get("gpu") or {}).get("uuid"), "cpu": cell.hardware.get("cpu"),
             "processes": cell.details.get("pooled_runs", 1)}
    return {name: value for name, value in facts.items() if value is not None}


def pool_with_baseline(baseline: CellResult, measured: CellResult, where: Path | str) -> CellResult:
    """`measured` stored with the samples of `baseline` pooled into each figure that has repeats in both.

    Baselines pooled over recordings on several machines of one hardware key (or several days of one)
    carry the spread between them, which no single recording can measure (docs/gate-and-baselines.md: Pooled
    baselines). The pooled cell keeps the new recording's single figures (memory, perplexity, load time) and
    provenance, and `details.pooled_from` lists every recording pooled, oldest first. A baseline measured another
    way (`provenance_mismatch`) cannot be pooled: BaselineError, naming the cell and the fields.
    """
    mismatch = provenance_mismatch(measured, baseline)
    if mismatch:
        raise BaselineError(f"{where}: cells[{measured.id!r}]: cannot pool with a baseline measured differently "
                            f"({'; '.join(mismatch)}); store the run without pooling to replace it")
    pooled = pool(measured, baseline)
    runs = baseline.details.get("pooled_from") or [_run_of(baseline)]
    return replace(pooled, details={**pooled.details, "pooled_from": [*runs, _run_of(measured)]})


def _stored_cell(path: Path, result: CellResult, recorded_at: str) -> CellDict:
    """`result` as it will be stored, checked by the same rules a load applies."""
    try:
        # The round trip turns tuples into lists and keeps NaN visible, so the check sees the file's view.
        data = json.loads(json.dumps({**result.to_dict(), "recorded_at": recorded_at}))
    except TypeError as exc:
        raise BaselineError(
            f"{path}: cells[{result.id!r}]: cannot be stored as JSON ({exc}); "
            "keep config, environment, hardware and details to plain JSON values"
        ) from None
    _Reader(path, "nothing was stored; fix what produced this result").cell(data, result.id, result.model)
    return data


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


@dataclass(frozen=True)
class Verdict:
    """How one metric of one cell compares with its baseline.

    `change` is relative to the baseline and signed so that positive is worse whatever the metric's
    direction. `noise` is the relative change that the spreads of baseline and run can explain, and
    `noise_abs` the same in the metric's unit (against a zero baseline only that one is finite).
    `resolved` is False when those spreads alone exceed the tolerance: then a regression larger than the
    tolerance but within the noise passes, and the check caught only what the noise could not hide.
    """

    cell_id: str
    metric: str
    baseline: float
    measured: float
    change: float
    tolerance: float
    noise: float
    regressed: bool
    resolved: bool = True
    noise_abs: float = 0.0

    @property
    def unresolved(self) -> bool:
        """Passed only because the spreads were wider than the tolerance."""
        return not self.regressed and not self.resolved

    @property
    def message(self) -> str:
        """One line for people: what changed, by how much, and the limits it was held to."""
        unit = METRICS[self.metric].unit if self.metric in METRICS else ""
        suffix = f" {unit}" if unit else ""
        if self.baseline:
            amount, noise = f"{abs(self.change):.1%}", f"{self.noise:.1%}"
        else:  # no relative change from zero: say how far, in the metric's unit
            amount = f"by {_number(abs(self.measured - self.baseline))}{suffix}"
            noise = f"{_number(self.noise_abs)}{suffix}"
        if not math.isfinite(self.measured) or not math.isfinite(self.baseline):
            outcome = "is not a finite number"
        elif self.regressed and self.metric in METRICS and METRICS[self.metric].exact:
            outcome = "changed (an exact figure: any change fails)"
        elif self.regressed:
            outcome = f"regressed {amount}"
        elif self.change < 0:
            outcome = f"improved {amount}"
        elif self.change == 0:
            outcome = "did not change"
        elif self.change <= self.tolerance:
            outcome = f"worsened {amount}, within tolerance"
        else:
            outcome = f"worsened {amount}, within noise"
        return (
            f"{self.metric} of {self.cell_id} {outcome} (baseline {_number(self.baseline)}{suffix}, "
            f"measured {_number(self.measured)}{suffix}; "
            f"tolerance {self.tolerance:.1%}, noise {noise})"
        )


class RegressionRule(Protocol):
    """Decides whether one measured figure regressed from its baseline figure."""

    def check(
        self, cell_id: str, metric: str, baseline: Figure, measured: Figure, tolerance: float
    ) -> Verdict:
        """Compare `measured` with `baseline` under a relative `tolerance`."""
        ...


@dataclass(frozen=True)
class RelativeNoiseAwareRule:
    """Regressed when worse by more than the tolerance and by more than `noise_sigmas` combined spreads.

    The noise is the standard deviation of the difference of two independent figures,
    sqrt(spread_baseline^2 + spread_measured^2), times `noise_sigmas`, and never less than the metric's
    absolute floor (the resolution of a single measurement, such as a load time). A check is unresolved
    when the spread part alone is wider than the tolerance (the floor is the metric's declared resolution).
    """

    noise_sigmas: float = 2.0

    def check(
        self, cell_id: str, metric: str, baseline: Figure, measured: Figure, tolerance: float
    ) -> Verdict:
        """Compare `measured` with `baseline` under a relative `tolerance` and the measured noise.

        A figure that is not finite regressed, whatever its direction: NaN compares false with everything and
        would otherwise pass as "within noise".
        """
        spec = metric_spec(metric)
        if not (measured.finite and baseline.finite):
            return Verdict(cell_id, metric, baseline.value, measured.value, math.inf, tolerance, 0.0, True)
        difference = measured.value - baseline.value
        # a metric's floor is the smallest change its measurement resolves: below it, a change is noise
        spread_noise = self.noise_sigmas * math.hypot(baseline.spread, measured.spread)
        noise = max(spread_noise, spec.floor)
        worse_by = -difference if spec.higher_is_better else difference
        scale = abs(baseline.value)
        if scale:
            change, relative_noise = worse_by / scale, noise / scale
        else:
            # Against a zero baseline any change is unbounded relative to it; its sign still says which way.
            change = math.copysign(math.inf, worse_by) if worse_by else 0.0
            relative_noise = math.inf if noise else 0.0
        regressed = change > tolerance and abs(worse_by) > noise
        resolved = spread_noise <= tolerance * scale
        if spec.exact:  # a deterministic count: any change either way is one
            regressed, resolved = measured.value != baseline.value, True
        return Verdict(cell_id, metric, baseline.value, measured.value, change, tolerance, relative_noise,
                       regressed, resolved, noise)


def compare(
    measured: CellResult,
    baseline: CellResult | None,
    tolerances: Tolerances,
    rule: RegressionRule | None = None,
) -> list[Verdict]:
    """Verdicts for the figures `measured` and `baseline` both have, read the same way, sorted by metric.

    Figures only one side has, and figures read another way (`stale_figures`), are left to the caller to
    report. Without a `rule`, a RelativeNoiseAwareRule with the tolerances' `noise_sigmas` decides.
    """
    if baseline is None:
        return []
    if baseline.id != measured.id:
        raise ValueError(f"cannot compare cell {measured.id!r} with the baseline of {baseline.id!r}")
    if rule is None:
        rule = RelativeNoiseAwareRule(tolerances.noise_sigmas)
    return [
        rule.check(measured.id, name, baseline.figures[name], measured.figures[name],
                   tolerances.for_cell(measured.method, name))
        for name in sorted(measured.figures.keys() & baseline.figures.keys() - stale_figures(measured, baseline).keys())
    ]


def regressions(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """The verdicts that regressed."""
    return [verdict for verdict in verdicts if verdict.regressed]


def unresolved(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """The verdicts that passed only because the spreads were wider than the tolerance."""
    return [verdict for verdict in verdicts if verdict.unresolved]


def unresolved_message(verdict: Verdict) -> str:
    """Why an unresolved check fails under --fail-unresolved."""
    return (f"{verdict.metric} of {verdict.cell_id} cannot be gated at {verdict.tolerance:.1%}: the spreads of "
            f"baseline and run let a regression of up to {verdict.noise:.1%} pass (this run: {verdict.change:+.1%}, "
            "+ is worse); measure on a quieter host (fewer xdist workers, nothing else running)")


def resolution_summary(checks: Iterable[tuple[str, bool]]) -> str | None:
    """One line on the checks whose noise hid their tolerance, per metric: `checks` are (metric, unresolved)."""
    checked: Counter[str] = Counter()
    hidden: Counter[str] = Counter()
    for metric, noisy in checks:
        checked[metric] += 1
        hidden[metric] += noisy
    parts = ", ".join(f"{metric} {hidden[metric]}/{checked[metric]}" for metric in sorted(hidden) if hidden[metric])
    if not parts:
        return None
    return (f"{hidden.total()} of {checked.total()} check(s) passed with spreads wider than their tolerance "
            f"({parts}): a regression inside their noise would have passed too; --fail-unresolved fails them")


# Settings that change what a figure means; a baseline made under others is not comparable.
_COMPARABLE_CONFIG = ("method", "model", "run", "accuracy")
# These decide a limit or a pass/fail check, or how many processes' samples pool into a figure (its spread
# shows that), not how any stored figure is measured.
_IGNORED_RUN_FIELDS = ("cell_timeout_s", "consistency_tokens", "processes")


def stale_figures(measured: CellResult, baseline: CellResult) -> dict[str, str]:
    """The figures of `baseline` that were read another way than `measured`'s, each with why.

    A change of the memory tracker (`details.memory_protocol`, none recorded: 1) makes the figures it reads
    incomparable, and only those: the cell's speeds and accuracy still gate. Device figures read under
    another device-timing protocol or another way (a captured graph against kernels' own durations, after a
    failed capture) are stale the same way.
    """
    stale: dict[str, str] = {}
    old, new = (cell.details.get("memory_protocol", MEMORY_PROTOCOL_DEFAULT) for cell in (baseline, measured))
    if old != new:
        why = (f"details.memory_protocol: baseline {old}, now {new}; harness/measure/memory.py says how each "
               "protocol reads memory")
        stale.update({m: why for m in PROTOCOL_METRICS if m in measured.figures and m in baseline.figures})
    old_device, new_device = (cell.details.get("device_timing") or {} for cell in (baseline, measured))
    for name, metrics in (("protocol", DEVICE_METRICS), ("how", DEVICE_METRICS),
                          ("prefill_protocol", ("prefill_device_tokens_per_s",))):
        old_value, new_value = (_device_timing_field(timing, name) for timing in (old_device, new_device))
        if old_value != new_value:
            why = (f"details.device_timing.{name}: baseline {old_value}, now {new_value}; "
                   "harness/measure/device.py says how each reads device time")
            stale.update({m: why for m in metrics
                          if m in measured.figures and m in baseline.figures and m not in stale})
    return stale


def _device_timing_field(timing: dict[str, Any], name: str) -> Any:
    """A field of a cell's `details.device_timing`; timings recorded before the prefill was timed over bursts
    of replays have no `prefill_protocol` and read 1."""
    if name == "prefill_protocol" and "protocol" in timing:
        return timing.get(name, 1)
    return timing.get(name)


def kernel_changes(measured: CellResult, baseline: CellResult) -> str | None:
    """The kernels a decode step launches that differ from its baseline's (added and gone), or None.

    The set of kernel names of one profiled step is deterministic for the same libraries and GPU: a change
    means another kernel ran (a silent fallback, another cuBLAS heuristic), which speed alone may not show.
    """
    old = (baseline.details.get("device_timing") or {}).get("kernel_names")
    new = (measured.details.get("device_timing") or {}).get("kernel_names")
    if not old or not new or set(old) == set(new):
        return None
    added, gone = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    parts = ([f"new: {', '.join(added)}"] if added else []) + ([f"gone: {', '.join(gone)}"] if gone else [])
    return f"the decode step's kernels of {measured.id} changed ({'; '.join(parts)})"


# Facts of the run (not of the config) that often explain a change: where a regression's message looks first.
_HOST_FIELDS = ("cpu", "cpu_isa", "cpu_vector_flags", "cpu_count", "cpu_affinity", "system")
_GPU_FIELDS = ("driver", "cuda_driver")
_ENVIRONMENT_FIELDS = ("quantbench_revision", "torch_cuda", "cudnn")


def run_differences(measured: CellResult, baseline: CellResult) -> list[str]:
    """What differed between the run that recorded `baseline` and the one that measured `measured`.

    Library versions, the suite's revision, CUDA, the driver, the GPU itself (its uuid), the host (CPU, CPU
    share, kernel) and how the GPU ran during the timed repeats (clocks, throttling): not reasons to refuse
    a comparison (catching what a release changes is the gate's point) but the first places to look when a
    figure moved. Fields that one side did not record are left out.
    """
    def pairs(old: dict[str, Any], new: dict[str, Any], names: Iterable[str], prefix: str) -> list[str]:
        return [f"{prefix}{name} {old[name]} -> {new[name]}" for name in names
                if name in old and name in new and old[name] != new[name]]

    old_packages = baseline.environment.get("packages") or {}
    new_packages = measured.environment.get("packages") or {}
    found = pairs(old_packages, new_packages, sorted(old_packages), "")
    found += pairs(baseline.environment, measured.environment, _ENVIRONMENT_FIELDS, "")
    old_gpu, new_gpu = baseline.hardware.get("gpu") or {}, measured.hardware.get("gpu") or {}
    found += pairs(old_gpu, new_gpu, _GPU_FIELDS, "gpu.")
    old_card, new_card = short_uuid(old_gpu.get("uuid")), short_uuid(new_gpu.get("uuid"))
    if old_card and new_card and old_gpu["uuid"] != new_gpu["uuid"]:
        # the same model of card but another one (often on another host)
        found.append(f"another GPU (uuid GPU-{old_card}... -> GPU-{new_card}...)")
    found += pairs(baseline.hardware, measured.hardware, _HOST_FIELDS, "")
    return found + _telemetry_differences(baseline.details.get("gpu_telemetry") or {},
                                          measured.details.get("gpu_telemetry") or {})


def _telemetry_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How the GPU ran differently during the two runs' timed repeats (harness/measure/telemetry.py): clocks
    more than 5 % apart at either edge, time held at a power or thermal cap, other clock-event reasons."""
    found = []
    for name in ("sm_clock_mhz", "memory_clock_mhz"):
        edges = zip(old.get(name, ()), new.get(name, ()), strict=False)  # (start, end) of each run
        if any(abs(b - a) > 0.05 * max(a, b) for a, b in edges):
            found.append(f"gpu {name[:-4].replace('_', ' ')} {'/'.join(map(str, old[name]))} -> "
                         f"{'/'.join(map(str, new[name]))} MHz at the timed repeats' edges")
    for name in ("power_capped_ms", "thermal_capped_ms"):
        if name in old and name in new and old[name] != new[name] and max(old[name], new[name]) > 0:
            found.append(f"gpu {name} {old[name]:g} -> {new[name]:g}")
    if "clock_event_reasons" in old and "clock_event_reasons" in new:
        if set(old["clock_event_reasons"]) != set(new["clock_event_reasons"]):
            found.append(f"gpu clock event reasons {', '.join(old['clock_event_reasons']) or 'none'} -> "
                         f"{', '.join(new['clock_event_reasons']) or 'none'}")
    return found


def provenance_mismatch(measured: CellResult, baseline: CellResult) -> list[str]:
    """The config fields and input digests on which a baseline differs from a measured cell.

    A figure only compares with one measured the same way: the same method parameters, model source,
    run and accuracy settings, and the same token ids (digests). Library versions are meant to differ.
    """
    differences = []
    for section in _COMPARABLE_CONFIG:
        old, new = baseline.config.get(section), measured.config.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if key not in _IGNORED_RUN_FIELDS and old.get(key) != new.get(key):
                    differences.append(f"config.{section}.{key}: baseline {old.get(key)!r}, now {new.get(key)!r}")
        elif old != new:
            differences.append(f"config.{section}: baseline {old!r}, now {new!r}")
    for digest in ("prompt_ids_digest",):
        old, new = baseline.details.get(digest), measured.details.get(digest)
        if old and new and old != new:
            differences.append(f"details.{digest}: baseline {old}, now {new} (different token ids)")
    old = baseline.details.get("ppl", {}).get("eval_ids_digest")
    new = measured.details.get("ppl", {}).get("eval_ids_digest")
    if old and new and old != new:
        differences.append(f"details.ppl.eval_ids_digest: baseline {old}, now {new} (different evaluation ids)")
    return differences

