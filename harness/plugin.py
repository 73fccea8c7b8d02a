"""The pytest plugin: options, markers, the matrix parametrization, the baseline gate and the summary.

Registered through the `pytest11` entry point, so its options and markers work from any checkout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from harness import hardware
from harness.baselines import BaselineError, BaselineStore, Tolerances, resolution_summary
from harness.config import Cell, Matrix, MatrixError, load_matrix
from harness.gate import (
    CellVerdict,
    GatePolicy,
    Status,
    add_gate_options,
    cell_error,
    judge,
    judge_consistency,
    recheck_reasons,
    run_failed,
    skipped,
)
from harness.hardware import cpu_share_env, gpu_info, hardware_key, worker_cpu_share, worker_gpu_env
from harness.isolation import Outcome, run_isolated
from harness.methods import BACKENDS, Method, method_class
from harness.metrics import TASK_PREFIX
from harness.results import CellResult, cell_id, json_safe

RESULTS_SCHEMA_VERSION = 1
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


def new_run_id() -> str:
    """A run's id: its UTC start to the microsecond and its process id, so ids sort by start time and two runs
    started in the same second (or microsecond, on one host) never share a results file or a summary."""
    now = time.time()
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.{int(now % 1 * 1e6):06d}Z-p{os.getpid()}"


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
        self.update = option("--update-baselines")
        self.pool_baselines = option("--pool-baselines")
        if self.pool_baselines and not self.update:
            raise pytest.UsageError("--pool-baselines pools this run into the stored baselines: it needs "
                                    "--update-baselines")
        self.replace_unreadable = option("--replace-unreadable-baselines")
        if self.replace_unreadable and not self.update:
            raise pytest.UsageError("--replace-unreadable-baselines replaces unreadable baseline files with this "
                                    "run's: it needs --update-baselines")
        self.delay_ms = option("--inject-decode-delay-ms")
        self.processes = option("--processes")
        if self.processes is not None and self.processes < 1:
            raise pytest.UsageError(f"--processes: must be 1 or more, got {self.processes}")
        self.device_slowdown = option("--inject-device-slowdown") or 0.0
        if not 0 <= self.device_slowdown < 1:
            raise pytest.UsageError(f"--inject-device-slowdown: a fraction in [0, 1), got {self.device_slowdown}")
        if self.update and (self.delay_ms or self.device_slowdown):
            raise pytest.UsageError("--inject-decode-delay-ms and --inject-device-slowdown make cells slower on "
                                    "purpose; they cannot be combined with --update-baselines")
        # an xdist worker writes under its controller's id (handed over in pytest_configure_node)
        self.run_id = (getattr(config, "workerinput", None) or {}).get("quantbench_run_id") or new_run_id()
        self.outcomes: dict[str, Outcome] = {}
        self.written: set[str] = set()  # cells with a record in the results file
        self.recheck_enabled = option("--recheck") and not self.update
        self.jobs: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}  # cell -> (measuring job, env)
        self.rechecked: set[str] = set()
        self.recheck_reasons: dict[str, list[str]] = {}  # cells pooled over a recheck: the regressions that asked
        self.prepared: set[str] = set()  # models whose weights were built (or found) by a prepare worker
        self.references: dict[tuple[str, str], str] = {}  # (suite, model) -> how its reference job ended
        self.records: list[dict[str, Any]] = []
        self.eval_cells: set[str] = set()  # cells whose task-accuracy test was selected (`-m eval`)
        self._matrix: Matrix | None = None
        self._policy: GatePolicy | None = None
        self._matrix_error: str | None = None
        self._keys: dict[str, str] = {}

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

    def hardware_key(self, device: str) -> str:
        if device not in self._keys:
            self._keys[device] = self.config.getoption("--hardware-key") or hardware_key(device)
        return self._keys[device]

    # ---- running cells ---------------------------------------------------------------------------------
    def outcome(self, cell: Cell) -> Outcome:
        """Run the cell's worker once (all its batch sizes) and keep the outcome for the other tests.

        Whatever goes wrong while producing it, in a worker or in the harness around it, becomes the cell's
        outcome: its other tests read the same one, and the worker never runs twice.
        """
        if cell.key not in self.outcomes:
            try:
                self.outcomes[cell.key] = self._produce(cell)
            except Exception as exc:  # a harness fault, not the worker's: recorded once, like a worker error
                outcome = Outcome("error", f"the harness failed while producing the outcome of {cell.key}: "
                                           f"{type(exc).__name__}: {exc}")
                if cell.key not in self.written:
                    try:
                        self._write_results(cell, outcome, "process")
                    except OSError as again:
                        outcome.reason += f"; its results record could not be written either ({again})"
                self.outcomes[cell.key] = outcome
        return self.outcomes[cell.key]

    def _produce(self, cell: Cell) -> Outcome:
        """Prepare, measure (and with --update-baselines store) one cell; see `outcome`."""
        gpu = gpu_info() if cell.suite.device == "cuda" else None
        if cell.suite.device == "cuda" and gpu is None:
            outcome = Outcome("skipped", "no CUDA GPU on this machine (NVML sees none)")
        else:
            # under pytest-xdist each worker takes its own GPU, so a matrix spreads over a multi-GPU host, and
            # its own slice of the CPUs, so one cell's compilers and host loop stay off another's timed region
            worker = os.environ.get("PYTEST_XDIST_WORKER")
            env = worker_gpu_env(worker, gpu["count"]) if gpu else {}
            if not self.config.getoption("--no-cpu-split"):
                count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
                env.update(cpu_share_env(worker_cpu_share(worker, count)))
            job = {
                "suite": cell.suite.name,
                "device": cell.suite.device,
                "method_class": BACKENDS[cell.method.backend],
                "method": cell.method.to_dict(),
                "model": {f: getattr(cell.model, f) for f in cell.model.__dataclass_fields__},
                "batch_sizes": list(cell.batch_sizes),
                "run": {**cell.suite.run.__dict__, "processes": self.processes or cell.suite.run.processes},
                "accuracy": cell.suite.accuracy.__dict__,
                "inject_decode_delay_ms": self.delay_ms,
                "inject_device_slowdown": self.device_slowdown,
            }
            reference = self.matrix().methods.get(cell.suite.reference or "")
            if reference is not None:
                job["reference"] = {"method": reference.to_dict(), "role": "compare"}
            if cell.key in self.eval_cells:
                job["eval"] = dataclasses.asdict(cell.suite.eval)
            outcome = Outcome("ok")
            if cell.model.name not in self.prepared:
                outcome = run_isolated({**job, "prepare_only": True}, cell.suite.run.cell_timeout_s, env)
            if outcome.status == "ok":
                self.prepared.add(cell.model.name)
                cls = method_class(cell.method.backend)
                if cls.prepare is not Method.prepare or not cls.RUNTIME.torch_in_measured_process:
                    # the method builds its checkpoint in a process of its own (the quantization's cost), or
                    # is measured without torch on the model and ids that process resolves (harness/worker.py)
                    outcome = run_isolated({**job, "prepare_only": True, "prepare_method": True},
                                           cell.suite.run.cell_timeout_s, env)
                    job["prepared"] = outcome.prepared
            if outcome.status == "ok":
                if reference is not None:
                    self._ensure_reference(cell, job, reference, env)
                outcome = self._measure(cell, job, env)
                self.jobs[cell.key] = (job, env)
            else:
                self._write_results(cell, outcome, "prepare")
            if self.update and outcome.results:
                try:
                    self.store.merge(self.hardware_key(cell.suite.device), outcome.results,
                                     pool=self.pool_baselines, replace_unreadable=self.replace_unreadable,
                                     log=outcome.notes.append)
                except (BaselineError, ValueError, OSError) as exc:
                    # the worker measured; the figures are in the results file and the stored baselines stay
                    # as they were (an unwritable folder, an invalid file)
                    outcome.store_error = f"baselines not updated: {exc}"
        return outcome

    def _measure(self, cell: Cell, job: dict[str, Any], env: dict[str, str]) -> Outcome:
        """Run the measuring job in `run.processes` processes, one after another, and pool their samples.

        Each process's results are written as they come. A later process that fails fails the cell: its
        first process's figures alone would pass for the pooled ones.
        """
        processes = job["run"]["processes"]
        outcome = run_isolated(job, cell.suite.run.cell_timeout_s, env)
        self._write_results(cell, outcome, "process")
        for number in range(2, processes + 1):
            if outcome.status != "ok":
                break
            again = run_isolated(job, cell.suite.run.cell_timeout_s, env)
            self._write_results(cell, again, "process")
            if again.status != "ok":
                return replace(again, reason=f"process {number} of {processes}: {again.reason}", results=[])
            outcome.pool(again)
        return outcome

    def _ensure_reference(self, cell: Cell, job: dict[str, Any], reference: Any, env: dict[str, str]) -> None:
        """Have the reference method score the model's evaluation ids once (a worker caches its logits)."""
        key = (cell.suite.name, cell.model.name)
        if key in self.references:
            return
        outcome = run_isolated({**job, "method_class": BACKENDS[reference.backend], "method": reference.to_dict(),
                                "reference": {"method": reference.to_dict(), "role": "compute"},
                                "prepared": None},  # the cell's method's record is not the reference's
                               cell.suite.run.cell_timeout_s, env)
        # a failed reference leaves the cells without divergence figures; their details say why
        self.references[key] = f"{outcome.status}: {outcome.reason}" if outcome.status != "ok" else "ok"

    def repeated_regressions(self, cell: Cell) -> list[str]:
        """The regressions of figures with repeats (speeds) in any batch size of a cell, against its baselines.

        Looked at once, before the cell's first test is gated, so that a recheck pools every batch size and
        every test of the cell gates the same figures whatever order they run in, as `quantbench gate` does
        offline. A baseline that cannot be read is left to the tests to report.
        """
        outcome = self.outcomes.get(cell.key)
        if outcome is None or outcome.status != "ok":
            return []
        key = self.hardware_key(cell.suite.device)
        found: list[str] = []
        for result in outcome.results:
            if result.error:
                continue
            try:
                baseline = self.store.get(key, result)
            except BaselineError:
                continue
            found += recheck_reasons(result, judge(result, baseline, self.policy(), hardware_key=key,
                                                   baseline_path=self.store.path(key, result.model)))
        return found

    def recheck(self, cell: Cell) -> bool:
        """Measure a cell once more when a figure with repeats regressed, and pool each repeated figure's
        samples with the first run's (--recheck).

        Once per cell, before its first test is gated: then all its tests see the pooled figures. False when
        rechecking is off or done, nothing regressed, or the second run failed.
        """
        if not self.recheck_enabled or cell.key in self.rechecked or cell.key not in self.jobs:
            return False
        self.rechecked.add(cell.key)
        reasons = self.repeated_regressions(cell)
        if not reasons:
            return False
        job, env = self.jobs[cell.key]
        again = run_isolated(job, cell.suite.run.cell_timeout_s, env)
        self._write_results(cell, again, "recheck")
        if again.status != "ok":
            return False
        self.outcomes[cell.key].pool(again)
        self.recheck_reasons[cell.key] = reasons
        return True

    def _write_results(self, cell: Cell, outcome: Outcome, role: str) -> None:
        """Append one process's outcome to the run's results file; `role` (prepare, process or recheck) lets
        `quantbench gate` and `import-results` pool the records as this run did (harness/results.read_run)."""
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        path = self.results_dir / f"{self.run_id}-{worker}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        # the suite and the key it was gated under let `quantbench gate` look where this run looked
        record = {"schema_version": RESULTS_SCHEMA_VERSION, "cell": cell.key, "suite": cell.suite.name,
                  "hardware_key": self.hardware_key(cell.suite.device), "role": role, "status": outcome.status,
                  "reason": outcome.reason, "wall_s": outcome.wall_s,
                  "results": [r.to_dict() for r in outcome.results]}
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.written.add(cell.key)

    # ---- the gate ----------------------------------------------------------------------------------------
    def verdict(self, ref: CellRef, metrics: list[str]) -> tuple[CellResult | None, CellVerdict]:
        """The cell's result (pooled over a recheck where one ran) and the gate's verdict on `metrics` of it."""
        outcome = self.outcome(ref.cell)
        if outcome.status == "skipped":
            return None, skipped(ref.id, f"{ref.id}: {outcome.reason}")
        if outcome.store_error:
            return None, cell_error(ref.id, f"{ref.id}: {outcome.store_error}")
        self.recheck(ref.cell)
        result = outcome.result(ref.batch_size)
        if result is None:
            return None, run_failed(ref.id, f"worker {outcome.status}: {outcome.reason}")
        key = self.hardware_key(ref.cell.suite.device)
        path = self.store.path(key, ref.cell.model.name)
        try:
            baseline = None if self.update else self.store.get(key, result)
        except BaselineError as exc:
            return result, cell_error(ref.id, str(exc))
        return result, judge(result, baseline, self.policy(), metrics=metrics, hardware_key=key, baseline_path=path,
                             recording=self.update)

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
        record: dict[str, Any] = {"cell": ref.id, "suite": ref.cell.suite.name, "figures": {},
                                  "status": verdict.status.value}
        notes = self.outcome(ref.cell).notes
        if notes:
            record["notes"] = notes
        if ref.cell.key in self.recheck_reasons:
            record["rechecked"] = self.recheck_reasons[ref.cell.key]
        for name in metrics:
            if name in result.figures:
                fig = result.figures[name]
                record["figures"][name] = {"value": fig.value, "spread": fig.spread, "n": fig.n}
        for check in verdict.checks:  # relative figures against a zero baseline are unbounded: null in JSON
            if check.compared and check.metric in record["figures"]:
                record["figures"][check.metric].update(
                    baseline=check.baseline, change=_finite(check.change), tolerance=check.tolerance,
                    noise=_finite(check.noise), noise_abs=check.noise_abs)
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
        """Fail the test when a left-padded batch's greedy tokens differ from the lone prompts'."""
        outcome = self.outcome(ref.cell)
        if outcome.status == "skipped":
            pytest.skip(f"{ref.id}: {outcome.reason}")
        result = outcome.result(None)
        verdict = judge_consistency(result) if result is not None else run_failed(
            ref.id, f"worker {outcome.status}: {outcome.reason}")
        if verdict.status is Status.SKIPPED:
            pytest.skip(verdict.reason)
        if verdict.failed:
            pytest.fail(verdict.failure_text(), pytrace=False)

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
        for line in summary_table(self.records).splitlines():
            terminalreporter.write_line(line)
        missing = sorted({r["cell"] for r in self.records  # a cell with no baseline, not one lacking a figure
                          if r["status"] == Status.MISSING and "missing_metrics" not in r})
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            terminalreporter.write_line(f"{len(missing)} cell(s) have no baseline for this hardware "
                                        f"(record with --update-baselines): {shown}")
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
        seen[f"{cell.method.name}|{cell.model.name}"] = seen.get(f"{cell.method.name}|{cell.model.name}", 0) + 1
    params = []
    for cell in cells:
        marks = [getattr(pytest.mark, cell.suite.name), getattr(pytest.mark, method_class(cell.method.backend).MARKER),
                 pytest.mark.xdist_group(cell.key)]
        if cell.model.slow:
            marks.append(pytest.mark.slow)
        prefix = f"{cell.suite.name}:" if seen[f"{cell.method.name}|{cell.model.name}"] > 1 else ""
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

