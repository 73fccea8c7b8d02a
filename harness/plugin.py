"""The pytest plugin: options, markers, the matrix parametrization, the baseline gate and the summary.

Registered through the `pytest11` entry point, so its options and markers work from any checkout.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import hardware
from harness.baselines import BaselineStore, resolution_summary
from harness.config import Cell, Matrix, MatrixError
from harness.gate import (
    CellVerdict,
    GatePolicy,
    Status,
    add_gate_options,
    no_baselines_notices,
)
from harness.hardware import gpu_info
from harness.isolation import Outcome
from harness.matrix import load_matrix
from harness.methods import BACKENDS, method_class
from harness.metrics import TASK_PREFIX
from harness.results import RESULTS_SCHEMA_VERSION, CellResult, cell_id, json_safe
from harness.runner import Runner, RunOptions, new_run_id
from harness.tolerances import Tolerances

DEFAULT_MATRIX = Path("benchmarks") / "matrix.toml"
STANDARD_MARKERS = {
    "gpu": "cells of the GPU suite (CUDA)",
    "cpu": "cells of the CPU suite (the embedded default)",
    "slow": "cells of large models",
    "eval": "task accuracy through lm-eval (needs real models and data)",
    "device_time": "device-time figures (GPU suites only: on a CPU the device is the host)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantbench", "quantization benchmark matrix")
    group.addoption("--matrix", default=None, help=f"matrix TOML file (default: {DEFAULT_MATRIX} under rootdir)")
    group.addoption("--models", default=None, help="comma-separated model names to keep")
    group.addoption("--methods", default=None, help="comma-separated method names to keep")
    group.addoption("--batch-sizes", default=None, help="comma-separated batch sizes to keep")
    group.addoption("--baselines-dir", default=None, help="baseline store (default: baselines/ under rootdir)")
    group.addoption("--results-dir", default=None, help="where run results go (default: results/ under rootdir)")
    group.addoption("--update-baselines", action="store_true",
                    help="write this run's figures as the baselines of this hardware (other keys untouched)")
    group.addoption("--pool-baselines", action="store_true",
                    help="with --update-baselines: pool each repeated figure's samples with the stored "
                         "baseline's instead of replacing it (baselines spanning several runners or days)")
    group.addoption("--replace-unreadable-baselines", action="store_true",
                    help="with --update-baselines: move a baseline file that cannot be read (malformed, or of an "
                         "older schema) aside to <file>.corrupt or <file>.v<N> and record this run in a new one")
    add_gate_options(group.addoption)  # --strict-baselines, --fail-unresolved, --tolerance, --hardware-key
    group.addoption("--recheck", action="store_true",
                    help="measure a cell again when a figure with repeats regresses, and gate the pooled "
                         "samples of both runs (noisy shared runners)")
    group.addoption("--processes", type=int, default=None, metavar="N",
                    help="measure each (method, model) in N processes, one after another, and pool their "
                         "samples (overrides the matrix's run.processes; spreads then count what changes "
                         "between processes)")
    group.addoption("--no-cpu-split", action="store_true",
                    help="under pytest-xdist, let every worker's cells use all CPUs (default: a slice each)")
    group.addoption("--inject-decode-delay-ms", type=float, default=0.0,
                    help="TESTING THE GATE ONLY: sleep this long per generated token inside the timed region")
    group.addoption("--inject-device-slowdown", type=float, default=0.0, metavar="FRACTION",
                    help="TESTING THE GATE ONLY: a spin kernel inside every captured decode step, FRACTION of "
                         "the step's measured device time long (0.03: 3 %% slower)")
    group.addoption("--inject-weight-noise", type=float, default=0.0, metavar="FRACTION",
                    help="TESTING THE GATE ONLY: a broken quantizer; every floating-point weight and scale of the "
                         "measured model is multiplied by 1 + FRACTION x N(0, 1) after loading (torch-side methods)")


def pytest_configure(config: pytest.Config) -> None:
    for name, help_text in STANDARD_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
    for backend in BACKENDS:
        config.addinivalue_line("markers", f"{backend}: cells of the {backend} backend")
    # pytest-xdist registers this too when installed; cells carry it either way
    config.addinivalue_line("markers", "xdist_group(name): keep a (method, model) on one xdist worker")
    session = QuantBench(config)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, "quantbench-session")
    for suite in session.suite_names():
        if suite not in STANDARD_MARKERS:
            config.addinivalue_line("markers", f"{suite}: cells of the matrix suite {suite!r}")


SESSION_KEY = pytest.StashKey["QuantBench"]()


@dataclass(frozen=True)
class CellRef:
    """A test's cell: a (suite, method, model) unit and the batch size (None: per-model figures)."""

    cell: Cell
    batch_size: int | None

    @property
    def id(self) -> str:
        return cell_id(self.cell.method.name, self.cell.model.name, self.batch_size)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _csv(value: str | None, cast: type = str) -> list[Any] | None:
    if not value:
        return None
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise pytest.UsageError(f"expected a comma-separated list of {cast.__name__}, got {value!r}") from None


class QuantBench:
    """One pytest session's view of the matrix, its workers' outcomes and the gate's verdicts."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        root = Path(str(config.rootpath))
        option = config.getoption
        self.matrix_path = Path(option("--matrix")) if option("--matrix") else root / DEFAULT_MATRIX
        self.store = BaselineStore(Path(option("--baselines-dir") or root / "baselines"))
        self.results_dir = Path(option("--results-dir") or root / "results")
        try:
            self.options = RunOptions.from_options(option)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        # an xdist worker writes under its controller's id (handed over in pytest_configure_node)
        self.run_id = (getattr(config, "workerinput", None) or {}).get("quantbench_run_id") or new_run_id()
        self.records: list[dict[str, Any]] = []
        self.eval_cells: set[str] = set()  # cells whose task-accuracy test was selected (`-m eval`)
        self._runner: Runner | None = None
        self._matrix: Matrix | None = None
        self._policy: GatePolicy | None = None
        self._matrix_error: str | None = None

    # ---- the matrix ------------------------------------------------------------------------------------
    def suite_names(self) -> list[str]:
        try:
            return list(self.matrix().suites)
        except pytest.UsageError:
            return []

    def matrix(self) -> Matrix:
        if self._matrix is None and self._matrix_error is None:
            try:
                self._matrix = load_matrix(self.matrix_path)
            except MatrixError as exc:
                self._matrix_error = str(exc)
        if self._matrix_error:
            raise pytest.UsageError(self._matrix_error)
        assert self._matrix is not None
        return self._matrix

    def cells(self) -> list[Cell]:
        option = self.config.getoption
        try:
            return self.matrix().cells(_csv(option("--models")), _csv(option("--methods")),
                                       _csv(option("--batch-sizes"), int))
        except MatrixError as exc:
            raise pytest.UsageError(str(exc)) from None

    def policy(self) -> GatePolicy:
        """The gate's policy of this run's options (harness/gate.py), over the matrix's suites."""
        if self._policy is None:
            try:
                self._policy = GatePolicy.from_options(self.config.getoption, self.matrix())
            except ValueError as exc:
                raise pytest.UsageError(str(exc)) from None
        return self._policy

    def tolerances(self, cell: Cell) -> Tolerances:
        """The tolerances that hold the figures of `cell`: its suite's, with --tolerance applied."""
        return self.policy().for_suite(cell.suite.name)

    @property
    def runner(self) -> Runner:
        """The run's cell pipeline (harness/runner.py), made when the first cell needs it."""
        if self._runner is None:
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            self._runner = Runner(self.matrix(), self.store, self.results_dir, self.policy(), self.options,
                                  self.run_id, worker)
            self._runner.eval_cells = self.eval_cells
        return self._runner

    def hardware_key(self, device: str) -> str:
        return self.runner.hardware_key(device)

    def outcome(self, cell: Cell) -> Outcome:
        """The cell's workers' outcome, run once (Runner.outcome)."""
        return self.runner.outcome(cell)

    # ---- the gate ----------------------------------------------------------------------------------------
    def verdict(self, ref: CellRef, metrics: list[str]) -> tuple[CellResult | None, CellVerdict]:
        """The cell's result (pooled over a recheck where one ran) and the gate's verdict on `metrics` of it."""
        return self.runner.verdict(ref.cell, ref.batch_size, metrics)

    def check(self, request: pytest.FixtureRequest, ref: CellRef, metrics: list[str],
              measured: Callable[[CellResult], None] | None = None) -> CellResult:
        """Gate `metrics` of a cell against its baseline; skip or fail the test with the reason.

        `measured` receives the cell's result (pooled over a recheck where one ran) before the verdict,
        so a figure that fails its gate still reaches pytest-benchmark's JSON, where a regression shows.
        """
        result, verdict = self.verdict(ref, metrics)
        if verdict.status is Status.SKIPPED:
            pytest.skip(verdict.reason)
        if result is None or verdict.status is Status.ERROR:
            text = verdict.failure_text()
            if result is None and verdict.reason.startswith(f"{ref.id}: the run failed: "):
                text += f"\n--- worker log (tail) ---\n{self.outcome(ref.cell).log_tail}"
            pytest.fail(text, pytrace=False)
        if measured is not None:
            measured(result)
        for name in metrics:
            if name in result.figures:
                request.node.user_properties.append((name, result.figures[name].value))
        request.node.user_properties.append(("quantbench", self._record(ref, result, verdict, metrics)))
        if verdict.failed:
            pytest.fail(verdict.failure_text(), pytrace=False)
        return result

    def _record(self, ref: CellRef, result: CellResult, verdict: CellVerdict, metrics: list[str]) -> dict[str, Any]:
        """The summary's record of one test's verdict: the figures gated (pooled over a recheck where one ran)
        with their baselines, and what the checks found."""
        record: dict[str, Any] = {"cell": ref.id, "suite": ref.cell.suite.name, "hardware_key": verdict.hardware_key,
                                  "figures": {}, "status": verdict.status.value}
        notes = self.outcome(ref.cell).notes
        if notes:
            record["notes"] = notes
        if ref.cell.key in self.runner.recheck_reasons:
            record["rechecked"] = self.runner.recheck_reasons[ref.cell.key]
        for name in metrics:
            if name in result.figures:
                fig = result.figures[name]
                record["figures"][name] = {"value": fig.value, "spread": fig.spread, "n": fig.n}
        for check in verdict.checks:  # relative figures against a zero baseline are unbounded: null in JSON
            if check.compared and check.metric in record["figures"]:
                record["figures"][check.metric].update(
                    baseline=check.baseline, baseline_key=check.baseline_key, change=_finite(check.change),
                    tolerance=check.tolerance, noise=_finite(check.noise), noise_abs=check.noise_abs)
            elif check.status is Status.NOT_COMPARED and check.metric in record["figures"]:
                record["figures"][check.metric]["not_compared"] = check.why
        unresolved = [check.metric for check in verdict.checks if check.status is Status.UNRESOLVED]
        if unresolved:
            record["unresolved"] = unresolved
        missing = [check.metric for check in verdict.checks if check.status is Status.MISSING and check.metric]
        if missing:
            record["missing_metrics"] = missing
        if verdict.differences:
            record["run_differences"] = list(verdict.differences)
        return record

    def check_consistency(self, ref: CellRef) -> None:
        """Fail the test when a left-padded batch's greedy tokens differ from the lone prompts' (Runner's verdict);
        an inconsistency the baseline recorded too is an expected failure."""
        verdict = self.runner.consistency_verdict(ref.cell)
        if verdict.status is Status.SKIPPED:
            pytest.skip(verdict.reason)
        if verdict.failed:
            pytest.fail(verdict.failure_text(), pytrace=False)
        if verdict.status is Status.KNOWN:  # shown as an expected failure, never as a pass
            pytest.xfail(verdict.reason)

    def check_tasks(self, request: pytest.FixtureRequest, ref: CellRef) -> None:
        """Gate the lm-eval figures of a cell; skip with the reason where no task could run."""
        result = self.outcome(ref.cell).result(None)
        tasks = (result.details.get("tasks") or {}) if result is not None else {}
        missing = {task: entry["unavailable"] for task, entry in tasks.get("results", {}).items()
                   if "unavailable" in entry}
        names = sorted(n for n in result.figures if n.startswith(TASK_PREFIX)) if result is not None else []
        if result is not None and not names:
            why = tasks.get("unavailable") or "; ".join(f"{t}: {w}" for t, w in missing.items()) or "no figures"
            pytest.skip(f"{ref.id}: task accuracy not measured: {why}")
        if missing:
            request.node.user_properties.append(("tasks_unavailable", json.dumps(missing)))
        self.check(request, ref, names)  # a worker that failed fails here, naming why

    # ---- hooks of this object, registered as a plugin ---------------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        # lm-eval tasks take minutes: their tests run only when `-m` names them (`-m "cpu and eval"`)
        wanted = "eval" in (config.getoption("markexpr", "") or "")
        kept, dropped = [], []
        for item in items:
            ref = getattr(item, "callspec", None) and item.callspec.params.get("qb_cell")
            on_host = item.get_closest_marker("device_time") and isinstance(ref, CellRef) \
                and ref.cell.suite.device != "cuda"  # a CPU suite's speeds are its generate() figures
            (dropped if on_host or (item.get_closest_marker("eval") and not wanted) else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
        for item in kept:
            ref = getattr(item, "callspec", None) and item.callspec.params.get("qb_model_cell")
            if item.get_closest_marker("eval") and isinstance(ref, CellRef):
                self.eval_cells.add(ref.cell.key)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        # pytest-xdist: the workers' results files belong to this run
        node.workerinput["quantbench_run_id"] = self.run_id

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # A matrix or filter named on the command line is checked before anything runs.
        option = self.config.getoption
        if any(option(name) for name in ("--matrix", "--models", "--methods", "--batch-sizes", "--tolerance")):
            self.cells()
            self.policy()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # user_properties travel from pytest-xdist workers to the controller, so this sees every cell.
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == "quantbench":
                self.records.append({**value, "outcome": report.outcome})

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        from harness.report import summary_table

        if not self.records:
            return
        terminalreporter.section("quantbench")
        keys = {record["hardware_key"] for record in self.records if record.get("hardware_key")}
        for line in no_baselines_notices(self.store, keys):
            terminalreporter.write_line(line)
        for line in summary_table(self.records).splitlines():
            terminalreporter.write_line(line)
        missing = sorted({r["cell"] for r in self.records  # a cell with no baseline, not one lacking a figure
                          if r["status"] == Status.MISSING and "missing_metrics" not in r})
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            terminalreporter.write_line(f"{len(missing)} cell(s) have no baseline for this hardware "
                                        f"(record with --update-baselines): {shown}")
        not_compared = {f"{record['cell']} {name}": fig["not_compared"] for record in self.records
                        for name, fig in record["figures"].items() if "not_compared" in fig}
        if not_compared:
            shown = "; ".join(f"{figure}: {why}" for figure, why in list(not_compared.items())[:4])
            more = " ..." if len(not_compared) > 4 else ""
            terminalreporter.write_line(
                f"{len(not_compared)} accuracy figure(s) not compared: no baseline measured on the same weights and "
                f"library versions (--strict-baselines fails them): {shown}{more}")
        for note in dict.fromkeys(note for record in self.records for note in record.get("notes", ())):
            terminalreporter.write_line(note)
        line = resolution_summary((name, name in record.get("unresolved", ())) for record in self.records
                                  for name, fig in record["figures"].items() if "change" in fig)
        if line:
            terminalreporter.write_line(line)
        path = self.results_dir / f"{self.run_id}-summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe({"schema_version": RESULTS_SCHEMA_VERSION, "run_id": self.run_id,
                                              "matrix": str(self.matrix_path), "records": self.records}),
                                   indent=1, allow_nan=False))
        terminalreporter.write_line(f"results: {path} (figures with provenance: {self.run_id}-*.jsonl)")
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            from harness.report import step_summary

            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(step_summary(self.records))


@pytest.fixture
def quantbench(request: pytest.FixtureRequest) -> QuantBench:
    """The session's QuantBench: `quantbench.check(request, qb_cell, [metrics])` gates a cell."""
    return request.config.stash[SESSION_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    wants_batch = "qb_cell" in metafunc.fixturenames
    wants_model = "qb_model_cell" in metafunc.fixturenames
    if not (wants_batch or wants_model):
        return
    session: QuantBench = metafunc.config.stash[SESSION_KEY]
    try:
        cells = session.cells()
    except pytest.UsageError as exc:
        pytest.fail(str(exc), pytrace=False)
    seen: dict[str, int] = {}
    for cell in cells:
        seen[cell_id(cell.method.name, cell.model.name)] = seen.get(cell_id(cell.method.name, cell.model.name), 0) + 1
    params = []
    for cell in cells:
        marks = [getattr(pytest.mark, cell.suite.name), getattr(pytest.mark, method_class(cell.method.backend).MARKER),
                 pytest.mark.xdist_group(cell.key)]
        if cell.model.slow:
            marks.append(pytest.mark.slow)
        prefix = f"{cell.suite.name}:" if seen[cell_id(cell.method.name, cell.model.name)] > 1 else ""
        sizes = cell.batch_sizes if wants_batch else (None,)
        for batch_size in sizes:
            ref = CellRef(cell, batch_size)
            params.append(pytest.param(ref, id=prefix + ref.id, marks=marks))
    metafunc.parametrize("qb_cell" if wants_batch else "qb_model_cell", params)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Give pytest-benchmark's machine record the GPU-aware facts the baselines are keyed by."""
    device = "cuda" if gpu_info() is not None else "cpu"
    machine_info["quantbench"] = hardware.machine_info(device)


def record_benchmark(benchmark: Any, result: CellResult) -> None:
    """Hand the worker's per-repeat decode times to pytest-benchmark, and every figure as extra_info.

    pytest-benchmark times callables in its own process; the suite's timed region runs in an isolated
    worker, so each timed repeat becomes one pytest-benchmark round (its `compare` and JSON then work).
    """
    timing = result.figures.get("decode_tokens_per_s")
    if benchmark.disabled or timing is None or not timing.samples:
        benchmark._mode = "quantbench worker timings"  # handed over (or nothing to hand): not "unused"
        return
    tokens = (result.batch_size or 1) * (result.config["run"]["new_tokens"] - 1)
    stats = benchmark._make_stats(1)
    for tokens_per_s in timing.samples:
        stats.update(tokens / tokens_per_s)
    benchmark._mode = "quantbench worker timings"
    benchmark.extra_info.update({"cell": result.id, "unit": "seconds per decode of new_tokens - 1 tokens"})
    benchmark.extra_info.update({name: fig.value for name, fig in result.figures.items()})
    benchmark.extra_info["hardware_key"] = result.hardware.get("hardware_key")
    benchmark.extra_info["config"] = result.config

