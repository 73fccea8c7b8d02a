"""The cell pipeline, without pytest: prepare the model, prepare the method, score the reference, measure.

A `Runner` runs the cells of a matrix in worker processes (harness/isolation.py), writes every process's
outcome to the run's results file as it comes, stores baselines with `update`, and judges a cell's result
against its baseline with the gate's one function (harness/gate.py). The pytest plugin drives it test by
test; `quantbench run` drives it from a script.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.baselines import BaselineError, BaselineStore, GateBaseline
from harness.config import Cell, Matrix
from harness.gate import (
    CellVerdict,
    GatePolicy,
    GateReport,
    cell_error,
    gate_report,
    judge,
    judge_consistency,
    recheck_reasons,
    run_failed,
    skipped,
)
from harness.hardware import cpu_share_env, gpu_info, hardware_key, worker_cpu_share, worker_gpu_env
from harness.isolation import Outcome, run_isolated
from harness.methods import BACKENDS, Method, method_class
from harness.results import (
    RESULTS_SCHEMA_VERSION,
    CellResult,
    ProcessRecord,
    Role,
    WorkerStatus,
    cell_id,
    json_safe,
    pool_processes,
)


class JobKind(enum.Enum):
    """The jobs a cell's worker processes run, in order (harness/worker.py reads the job's flags)."""

    PREPARE_MODEL = "prepare-model"  # build or find the model's weights (once per model and run)
    PREPARE_METHOD = "prepare-method"  # quantize, convert or resolve what the measured process loads
    REFERENCE = "reference"  # the suite's reference method scores the evaluation ids (once per model)
    MEASURE = "measure"  # the timed, memory-tracked and scored run of every batch size


def new_run_id() -> str:
    """A run's id: its UTC start to the microsecond and its process id, so ids sort by start time and two runs
    started in the same second (or microsecond, on one host) never share a results file or a summary."""
    now = time.time()
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.{int(now % 1 * 1e6):06d}Z-p{os.getpid()}"


@dataclass(frozen=True)
class RunOptions:
    """How a run measures and stores, besides the gate's policy (the pytest options of the same names)."""

    update: bool = False  # --update-baselines
    pool_baselines: bool = False  # --pool-baselines
    replace_unreadable: bool = False  # --replace-unreadable-baselines
    recheck: bool = False  # --recheck
    processes: int | None = None  # --processes (None: the matrix's run.processes)
    delay_ms: float = 0.0  # --inject-decode-delay-ms
    device_slowdown: float = 0.0  # --inject-device-slowdown
    weight_noise: float = 0.0  # --inject-weight-noise
    cpu_split: bool = True  # not --no-cpu-split
    hardware_key: str | None = None  # --hardware-key (None: detected)

    def __post_init__(self) -> None:
        if self.pool_baselines and not self.update:
            raise ValueError("--pool-baselines pools this run into the stored baselines: it needs "
                             "--update-baselines")
        if self.replace_unreadable and not self.update:
            raise ValueError("--replace-unreadable-baselines replaces unreadable baseline files with this "
                             "run's: it needs --update-baselines")
        if self.processes is not None and self.processes < 1:
            raise ValueError(f"--processes: must be 1 or more, got {self.processes}")
        if not 0 <= self.device_slowdown < 1:
            raise ValueError(f"--inject-device-slowdown: a fraction in [0, 1), got {self.device_slowdown}")
        if not 0 <= self.weight_noise < 1:
            raise ValueError(f"--inject-weight-noise: a fraction in [0, 1), got {self.weight_noise}")
        if self.update and (self.delay_ms or self.device_slowdown or self.weight_noise):
            raise ValueError("--inject-decode-delay-ms, --inject-device-slowdown and --inject-weight-noise make "
                             "cells worse on purpose; they cannot be combined with --update-baselines")

    @classmethod
    def from_options(cls, option: Any) -> RunOptions:
        """From a getter of the pytest options (`config.getoption`, or an argparse namespace's `get`)."""
        return cls(update=bool(option("--update-baselines")), pool_baselines=bool(option("--pool-baselines")),
                   replace_unreadable=bool(option("--replace-unreadable-baselines")),
                   recheck=bool(option("--recheck")), processes=option("--processes"),
                   delay_ms=option("--inject-decode-delay-ms") or 0.0,
                   device_slowdown=option("--inject-device-slowdown") or 0.0,
                   weight_noise=option("--inject-weight-noise") or 0.0,
                   cpu_split=not option("--no-cpu-split"), hardware_key=option("--hardware-key"))


def measure_job(cell: Cell, matrix: Matrix, options: RunOptions, evaluate: bool) -> dict[str, Any]:
    """The measuring job of a cell (JobKind.MEASURE); `job` makes the others from it."""
    job: dict[str, Any] = {
        "suite": cell.suite.name,
        "device": cell.suite.device,
        "method_class": BACKENDS[cell.method.backend],
        "method": cell.method.to_dict(),
        "model": {f: getattr(cell.model, f) for f in cell.model.__dataclass_fields__},
        "batch_sizes": list(cell.batch_sizes),
        "run": {**cell.suite.run.__dict__, "processes": options.processes or cell.suite.run.processes},
        "accuracy": cell.suite.accuracy.__dict__,
        "inject_decode_delay_ms": options.delay_ms,
        "inject_device_slowdown": options.device_slowdown,
        "inject_weight_noise": options.weight_noise,
    }
    reference = matrix.methods.get(cell.suite.reference or "")
    if reference is not None:
        job["reference"] = {"method": reference.to_dict(), "role": "compare"}
    if evaluate:
        job["eval"] = dataclasses.asdict(cell.suite.eval)
    return job


def job(kind: JobKind, measuring: dict[str, Any], reference: Any = None) -> dict[str, Any]:
    """The job of `kind` for the cell whose measuring job is `measuring` (harness/worker.py reads its flags)."""
    if kind is JobKind.MEASURE:
        return measuring
    if kind is JobKind.PREPARE_MODEL:
        return {**measuring, "prepare_only": True}
    if kind is JobKind.PREPARE_METHOD:
        return {**measuring, "prepare_only": True, "prepare_method": True}
    if reference is None:
        raise ValueError("a reference job needs the reference method")
    return {**measuring, "method_class": BACKENDS[reference.backend], "method": reference.to_dict(),
            "reference": {"method": reference.to_dict(), "role": "compute"},
            "prepared": None}  # the cell's method's record is not the reference's


def needs_method_preparation(backend: str) -> bool:
    """Whether a backend's method is prepared in a process of its own before it is measured: it builds a
    checkpoint (the quantization's cost), or is measured without torch on what that process resolves."""
    cls = method_class(backend)
    return cls.prepare is not Method.prepare or not cls.RUNTIME.torch_in_measured_process


class Runner:
    """One run's cells: their workers' outcomes, the results file, stored baselines and the gate's verdicts.

    `outcome(cell)` runs a cell's workers once (all its batch sizes); `verdict` judges one batch size of it.
    `worker` names the results file of this process of the run (pytest-xdist workers share a run id).
    """

    def __init__(self, matrix: Matrix, store: BaselineStore, results_dir: Path, policy: GatePolicy,
                 options: RunOptions, run_id: str | None = None, worker: str = "main") -> None:
        self.matrix = matrix
        self.store = store
        self.results_dir = results_dir
        self.policy = policy
        self.options = options
        self.run_id = run_id or new_run_id()
        self.worker = worker
        self.outcomes: dict[str, Outcome] = {}
        self.written: set[str] = set()  # cells with a record in the results file
        self.jobs: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}  # cell -> (measuring job, env)
        self.rechecked: set[str] = set()
        self.recheck_reasons: dict[str, list[str]] = {}  # cells pooled over a recheck: the regressions that asked
        self.prepared: set[str] = set()  # models whose weights were built (or found) by a prepare worker
        self.references: dict[tuple[str, str], str] = {}  # (suite, model) -> how its reference job ended
        self.eval_cells: set[str] = set()  # cells whose task accuracy is measured too
        self._keys: dict[str, str] = {}

    @property
    def results_path(self) -> Path:
        return self.results_dir / f"{self.run_id}-{self.worker}.jsonl"

    def hardware_key(self, device: str) -> str:
        if device not in self._keys:
            self._keys[device] = self.options.hardware_key or hardware_key(device)
        return self._keys[device]

    # ---- running cells ---------------------------------------------------------------------------------
    def outcome(self, cell: Cell) -> Outcome:
        """Run the cell's workers once (all its batch sizes) and keep the outcome for its other batch sizes.

        Whatever goes wrong while producing it, in a worker or in the harness around it, becomes the cell's
        outcome: its other tests read the same one, and the worker never runs twice.
        """
        if cell.key not in self.outcomes:
            try:
                self.outcomes[cell.key] = self._produce(cell)
            except Exception as exc:  # a harness fault, not the worker's: recorded once, like a worker error
                outcome = Outcome(WorkerStatus.ERROR, f"the harness failed while producing the outcome of {cell.key}: "
                                           f"{type(exc).__name__}: {exc}")
                if cell.key not in self.written:
                    try:
                        self.write_results(cell, outcome, Role.PROCESS)
                    except OSError as again:
                        outcome.reason += f"; its results record could not be written either ({again})"
                self.outcomes[cell.key] = outcome
        return self.outcomes[cell.key]

    def _env(self, gpu: dict[str, Any] | None) -> dict[str, str]:
        # under pytest-xdist each worker takes its own GPU, so a matrix spreads over a multi-GPU host, and
        # its own slice of the CPUs, so one cell's compilers and host loop stay off another's timed region
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        env = worker_gpu_env(worker, gpu["count"]) if gpu else {}
        if self.options.cpu_split:
            count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
            env.update(cpu_share_env(worker_cpu_share(worker, count)))
        return env

    def _produce(self, cell: Cell) -> Outcome:
        """Prepare, measure (and with `update` store) one cell; see `outcome`."""
        gpu = gpu_info() if cell.suite.device == "cuda" else None
        if cell.suite.device == "cuda" and gpu is None:
            return Outcome(WorkerStatus.SKIPPED, "no CUDA GPU on this machine (NVML sees none)")
        env = self._env(gpu)
        measuring = measure_job(cell, self.matrix, self.options, cell.key in self.eval_cells)
        reference = self.matrix.methods.get(cell.suite.reference or "")
        timeout = cell.suite.run.cell_timeout_s
        outcome = Outcome(WorkerStatus.OK)
        if cell.model.name not in self.prepared:
            outcome = run_isolated(job(JobKind.PREPARE_MODEL, measuring), timeout, env)
        if outcome.status == WorkerStatus.OK:
            self.prepared.add(cell.model.name)
            if needs_method_preparation(cell.method.backend):
                outcome = run_isolated(job(JobKind.PREPARE_METHOD, measuring), timeout, env)
                measuring["prepared"] = outcome.prepared
        if outcome.status == WorkerStatus.OK:
            if reference is not None:
                self._ensure_reference(cell, measuring, reference, env)
            outcome = self._measure(cell, measuring, env)
            self.jobs[cell.key] = (measuring, env)
        else:
            self.write_results(cell, outcome, Role.PREPARE)
        if self.options.update and outcome.results:
            try:
                self.store.merge(self.hardware_key(cell.suite.device), outcome.results,
                                 pool=self.options.pool_baselines, replace_unreadable=self.options.replace_unreadable,
                                 log=outcome.notes.append)
            except (BaselineError, ValueError, OSError) as exc:
                # the worker measured; the figures are in the results file and the stored baselines stay
                # as they were (an unwritable folder, an invalid file)
                outcome.store_error = f"baselines not updated: {exc}"
        return outcome

    def _measure(self, cell: Cell, measuring: dict[str, Any], env: dict[str, str]) -> Outcome:
        """Run the measuring job in `run.processes` processes, one after another, and pool their samples.

        Each process's results are written as they come. A later process that fails fails the cell: its
        first process's figures alone would pass for the pooled ones.
        """
        processes = measuring["run"]["processes"]
        outcome = run_isolated(measuring, cell.suite.run.cell_timeout_s, env)
        self.write_results(cell, outcome, Role.PROCESS)
        records = [ProcessRecord(Role.PROCESS, outcome.status, outcome.reason, outcome.results)]
        for _ in range(2, processes + 1):
            if records[-1].status != WorkerStatus.OK:
                break
            again = run_isolated(measuring, cell.suite.run.cell_timeout_s, env)
            self.write_results(cell, again, Role.PROCESS)
            records.append(ProcessRecord(Role.PROCESS, again.status, again.reason, again.results))
            outcome.wall_s += again.wall_s
        pooled = pool_processes(records, processes)
        if pooled.results_carry_failure:
            return replace(outcome, status=records[-1].status, reason=pooled.failure, results=pooled.results)
        return replace(outcome, results=pooled.results)

    def _ensure_reference(self, cell: Cell, measuring: dict[str, Any], reference: Any, env: dict[str, str]) -> None:
        """Have the reference method score the model's evaluation ids once (a worker caches its logits)."""
        key = (cell.suite.name, cell.model.name)
        if key in self.references:
            return
        outcome = run_isolated(job(JobKind.REFERENCE, measuring, reference), cell.suite.run.cell_timeout_s, env)
        # a failed reference leaves the cells without divergence figures; their details say why
        self.references[key] = f"{outcome.status}: {outcome.reason}" if outcome.status != WorkerStatus.OK else "ok"

    def repeated_regressions(self, cell: Cell) -> list[str]:
        """The regressions of figures with repeats (speeds) in any batch size of a cell, against its baselines.

        Looked at once, before the cell's first batch size is gated, so that a recheck pools every batch size
        and every test of the cell gates the same figures whatever order they run in, as `quantbench gate`
        does offline. A baseline that cannot be read is left to the verdicts to report.
        """
        outcome = self.outcomes.get(cell.key)
        if outcome is None or outcome.status != WorkerStatus.OK:
            return []
        key = self.hardware_key(cell.suite.device)
        found: list[str] = []
        for result in outcome.results:
            if result.error:
                continue
            try:
                baseline = self.store.gate_baseline(key, result)
            except BaselineError:
                continue
            found += recheck_reasons(result, judge(result, baseline, self.policy))
        return found

    def recheck(self, cell: Cell) -> bool:
        """Measure a cell once more when a figure with repeats regressed, and pool each repeated figure's
        samples with the first run's (--recheck).

        Once per cell, before its first batch size is gated: then all its verdicts see the pooled figures.
        False when rechecking is off (or recording), done, nothing regressed, or the second run failed.
        """
        if not self.options.recheck or self.options.update or cell.key in self.rechecked \
                or cell.key not in self.jobs:
            return False
        self.rechecked.add(cell.key)
        reasons = self.repeated_regressions(cell)
        if not reasons:
            return False
        measuring, env = self.jobs[cell.key]
        again = run_isolated(measuring, cell.suite.run.cell_timeout_s, env)
        self.write_results(cell, again, Role.RECHECK)
        if again.status != WorkerStatus.OK:
            return False
        self.outcomes[cell.key].pool(again)
        self.recheck_reasons[cell.key] = reasons
        return True

    def write_results(self, cell: Cell, outcome: Outcome, role: Role) -> None:
        """Append one process's outcome to the run's results file; `role` lets `quantbench gate` and
        `import-results` pool the records as this run did (harness/results.read_run)."""
        path = self.results_path
        path.parent.mkdir(parents=True, exist_ok=True)
        # the suite and the key it was gated under let `quantbench gate` look where this run looked
        record = {"schema_version": RESULTS_SCHEMA_VERSION, "cell": cell.key, "suite": cell.suite.name,
                  "hardware_key": self.hardware_key(cell.suite.device), "role": str(role),
                  "status": outcome.status, "reason": outcome.reason, "wall_s": outcome.wall_s,
                  "results": [r.to_dict() for r in outcome.results]}
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.written.add(cell.key)

    # ---- the gate ----------------------------------------------------------------------------------------
    def consistency_verdict(self, cell: Cell) -> CellVerdict:
        """The batch-consistency verdict of a cell's per-model result, judged against the baseline its accuracy
        figures meet (a baseline that cannot be read fails in those figures' tests, not here)."""
        outcome = self.outcome(cell)
        ref_id = cell_id(cell.method.name, cell.model.name, None)
        if outcome.status == WorkerStatus.SKIPPED:
            return skipped(ref_id, f"{ref_id}: {outcome.reason}")
        result = outcome.result(None)
        if result is None:
            return run_failed(ref_id, f"worker {outcome.status}: {outcome.reason}")
        try:
            baseline = self.store.gate_baseline(self.hardware_key(cell.suite.device), result).accuracy
        except BaselineError:
            baseline = None
        return judge_consistency(result, baseline)

    def verdict(self, cell: Cell, batch_size: int | None, metrics: list[str] | None) -> tuple[CellResult | None,
                                                                                       CellVerdict]:
        """One batch size's result (pooled over a recheck where one ran) and the gate's verdict on `metrics`."""
        ref_id = cell_id(cell.method.name, cell.model.name, batch_size)
        outcome = self.outcome(cell)
        if outcome.status == WorkerStatus.SKIPPED:
            return None, skipped(ref_id, f"{ref_id}: {outcome.reason}")
        if outcome.store_error:
            return None, cell_error(ref_id, f"{ref_id}: {outcome.store_error}")
        self.recheck(cell)
        result = outcome.result(batch_size)
        if result is None:
            return None, run_failed(ref_id, f"worker {outcome.status}: {outcome.reason}")
        key = self.hardware_key(cell.suite.device)
        try:
            baseline = (GateBaseline.none(key, self.store.path(key, cell.model.name)) if self.options.update
                        else self.store.gate_baseline(key, result))
        except BaselineError as exc:
            return result, cell_error(ref_id, str(exc))
        return result, judge(result, baseline, self.policy, metrics=metrics, recording=self.options.update)


def run_cells(runner: Runner, cells: list[Cell]) -> GateReport:
    """Run `cells` one after another and judge every figure of each (batch consistency included, as `judge`
    does for every figure): the report `quantbench gate` would make of the results file the run wrote."""
    verdicts = [runner.verdict(cell, batch_size, None)[1] for cell in cells for batch_size in (None, *cell.batch_sizes)]
    keys = {runner.hardware_key(cell.suite.device) for cell in cells}
    return gate_report(runner.store, verdicts, keys)
