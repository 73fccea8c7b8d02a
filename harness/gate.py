"""The gate: one cell's results judged against its baseline under one policy, live and offline.

`judge` is the only place that decides whether a cell passes: the pytest plugin calls it for every test of a
cell (and to decide whether to recheck one), and `quantbench gate` calls it for every result of a run's
results files (`replay`), so a run read back is judged as it was judged live. It is pure: the front ends load
the results and the baseline, and map its `CellVerdict` to pass, skip and fail or to printed lines. The options
that shape the policy are declared once for both front ends (`add_gate_options`).

Above results (which reads a run's files) and baselines (the store and its rules), so that neither imports
the other; this module also merges results files into the store (`import_results`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from harness.baselines import (
    BaselineStore,
    GateBaseline,
    StoredBaseline,
    Verdict,
    compare,
    kernel_changes,
    provenance_mismatch,
    resolution_summary,
    run_differences,
    stale_figures,
    unresolved_message,
)
from harness.hardware import is_cpu_key
from harness.measure.consistency import describe_failure
from harness.metrics import DEVICE_METRICS
from harness.results import CellResult, read_run
from harness.tolerances import Tolerances

RECORD = "record one with --update-baselines"
# the config fields of the faults a run injects to test the gate: such a result never becomes a baseline
INJECTED = ("inject_decode_delay_ms", "inject_device_slowdown", "inject_weight_noise")
RERECORD = "re-record it with --update-baselines"


class Status(StrEnum):
    """What the gate found, for one check and for a cell; the values are the results summary's vocabulary."""

    PASS = "ok"
    IMPROVED = "improved"  # better by more than the tolerance and the noise (a check only; the cell passes)
    UNRESOLVED = "unresolved"  # passed, but the spreads were wider than the tolerance
    REGRESSED = "regressed"
    STALE = "stale"  # a baseline figure read another way (a check only; the cell is incomparable)
    MISSING = "missing"  # no baseline, or no baseline figure
    NOT_COMPARED = "not compared"  # an accuracy figure with no baseline measured on its weights and library versions
    INCOMPARABLE = "incomparable"  # the baseline was measured differently, or some of its figures are stale
    RECORDED = "updated"  # --update-baselines: the figures became the baseline, nothing was compared
    ERROR = "error"  # the run failed, a figure is not finite, the device timer or batch consistency failed
    KNOWN = "known"  # batch inconsistent as its baseline's run was too (a check only; the cell passes)
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """One thing a cell was held to: a figure against its baseline's, or a condition of its run (`metric` None).

    `change` is relative to the baseline and signed so that + is worse; `noise` is the relative change the
    spreads explain and `noise_abs` the same in the metric's unit (`baselines.Verdict`). `fails` says whether
    this check fails the cell under the policy it was judged by.
    """

    metric: str | None
    status: Status
    message: str
    fails: bool
    baseline: float | None = None
    measured: float | None = None
    change: float | None = None
    tolerance: float | None = None
    noise: float | None = None
    noise_abs: float | None = None
    why: str | None = None  # a stale figure: what was read another way; a figure not compared: why not
    baseline_key: str | None = None  # the hardware key of the baseline this check was held to

    @property
    def delta_percent(self) -> float | None:
        """The change in percent, + worse (None for a check that compares no figure)."""
        return None if self.change is None else 100 * self.change

    @property
    def compared(self) -> bool:
        """A figure held against its baseline figure."""
        return self.change is not None


@dataclass(frozen=True)
class CellVerdict:
    """The gate's verdict on one cell (one batch size, or the per-model figures): its checks and its status."""

    cell: str
    status: Status
    checks: tuple[Check, ...] = ()
    hardware_key: str | None = None
    baseline_path: str | None = None
    differences: tuple[str, ...] = ()  # what differed from the baseline's run, where a comparison failed
    rechecked: bool = False  # the figures were pooled over a recheck

    @property
    def failed(self) -> bool:
        return any(check.fails for check in self.checks)

    @property
    def reason(self) -> str:
        """The first check's message: why a cell was skipped, or failed as a whole."""
        return self.checks[0].message if self.checks else self.cell

    def failure_text(self) -> str:
        """What a failing test says: one line per failing check, then what differed from the baseline's run."""
        lines = []
        for check in self.checks:
            if not check.fails:
                continue
            if check.status is Status.STALE:  # a test names the file to re-record
                lines.append(f"{self.cell}: {check.metric} of the baseline in {self.baseline_path} was read another "
                             f"way ({check.why}); {RERECORD}")
            else:
                lines.append(check.message)
        if self.differences:
            lines.append(f"{self.cell}: the baseline's run differed in: {', '.join(self.differences)}")
        return "\n".join(lines)

    def lines(self) -> list[str]:
        """What `quantbench gate` prints: one line per check, `ok`, `noisy`, `new` or `FAIL` first.

        A figure held to another hardware key's baseline than the run's ends with `[baseline of KEY]`; a failing
        comparison's line ends with what differed from the baseline's run; a figure the baseline lacks is
        printed only where it fails (--strict-baselines).
        """
        differed = f"; the baseline's run differed in: {', '.join(self.differences)}" if self.differences else ""
        lines = []
        for check in self.checks:
            crossed = check.compared and check.baseline_key not in (None, self.hardware_key)
            key = f" [baseline of {check.baseline_key}]" if crossed else ""
            if check.status is Status.SKIPPED:
                continue
            if check.status is Status.MISSING and not check.fails:
                if check.metric is None:
                    lines.append(f"new  {self.cell}: no baseline under {self.hardware_key}")
            elif check.status is Status.NOT_COMPARED and not check.fails:
                lines.append(f"new  {check.message}")
            elif check.fails:
                compared = check.status in (Status.REGRESSED, Status.UNRESOLVED)
                lines.append(f"FAIL {check.message}{key}{differed if compared else ''}")
            elif check.status is Status.UNRESOLVED:
                lines.append(f"noisy {check.message}{key}")
            elif check.status is Status.KNOWN:
                lines.append(f"known {check.message}")
            else:
                lines.append(f"ok   {check.message}{key}")
        return lines


@dataclass(frozen=True)
class GatePolicy:
    """How figures are held to their baselines: the tolerances of each matrix suite (with --tolerance applied),
    whether a missing baseline fails (--strict-baselines) and whether a check the noise hid fails
    (--fail-unresolved)."""

    tolerances: Mapping[str, Tolerances] = field(default_factory=dict)
    strict_baselines: bool = False
    fail_unresolved: bool = False

    @classmethod
    def from_options(cls, option: Callable[[str], Any], matrix: Any) -> GatePolicy:
        """The policy of the options `add_gate_options` declared, read by `option("--name")`, over `matrix`.

        Raises ValueError naming a --tolerance that names an unknown metric or method or is out of range.
        """
        specs = list(option("--tolerance") or [])
        tolerances = {
            name: Tolerances.from_mapping(suite.tolerances, f"{matrix.path} suite {name!r} tolerances").with_cli(
                specs, matrix.methods)
            for name, suite in matrix.suites.items()
        }
        return cls(tolerances, bool(option("--strict-baselines")), bool(option("--fail-unresolved")))

    def for_suite(self, suite: str) -> Tolerances:
        """The tolerances of the matrix suite `suite`."""
        try:
            return self.tolerances[suite]
        except KeyError:
            raise ValueError(f"no tolerances for suite {suite!r} (suites: {', '.join(self.tolerances)})") from None


def add_gate_options(addoption: Callable[..., Any]) -> None:
    """Declare the options of the gate's policy on either front end: a pytest option group's `addoption` or an
    argparse parser's `add_argument` (both take argparse's arguments)."""
    addoption("--strict-baselines", action="store_true",
              help="fail cells that have no baseline, and figures their baseline does not have")
    addoption("--fail-unresolved", action="store_true",
              help="fail a figure whose spreads (baseline and run) are wider than its tolerance, since a regression "
                   "within that noise would pass (release gates on dedicated runners)")
    addoption("--tolerance", action="append", default=[], metavar="[METHOD:]METRIC=FRACTION",
              help="override a tolerance, e.g. decode_tokens_per_s=0.1 or bnb-int8:ppl=0.02")
    addoption("--hardware-key", default=None,
              help="the hardware key whose baselines gate (and --update-baselines writes); default: this machine's "
                   "(quantbench gate: the key the run recorded, else the one each result was measured on)")


def _check(verdict: Verdict, status: Status, message: str, fails: bool, key: str) -> Check:
    return Check(verdict.metric, status, message, fails, verdict.baseline, verdict.measured, verdict.change,
                 verdict.tolerance, verdict.noise, verdict.noise_abs, baseline_key=key)


def _figure_check(verdict: Verdict, policy: GatePolicy, pooled: str, key: str, elsewhere: str) -> Check:
    """One figure's check against the baseline of `key`; `elsewhere` ends a failing message when that is another
    hardware key than the run's."""
    if verdict.regressed:
        return _check(verdict, Status.REGRESSED, verdict.message + pooled + elsewhere, True, key)
    if verdict.unresolved:
        if policy.fail_unresolved:
            return _check(verdict, Status.UNRESOLVED, unresolved_message(verdict) + pooled + elsewhere, True, key)
        return _check(verdict, Status.UNRESOLVED, verdict.message, False, key)
    improved = -verdict.change > verdict.tolerance and -verdict.change > verdict.noise
    return _check(verdict, Status.IMPROVED if improved else Status.PASS, verdict.message, False, key)


def _nothing_to_gate(result: CellResult, metrics: list[str]) -> str:
    """Why none of `metrics` was measured for `result` (a skip's reason)."""
    device = result.details.get("device_timing") or {}
    if "unavailable" in device and set(metrics) <= set(DEVICE_METRICS):
        return f"{result.id}: no device figures: {device['unavailable']}"
    quantization = result.details.get("quantization") or {}
    if any(m.startswith("quantize_") for m in metrics) and quantization.get("checkpoint"):
        return (f"{result.id}: quantization not measured in this run: the checkpoint "
                + ("is the user's" if quantization.get("user_checkpoint")
                   else f"came from the cache (built {quantization.get('built_at')}, "
                        f"{quantization.get('quantize_s', 0):.1f} s); delete it to measure again"))
    why = result.details.get("reference")
    return (f"{result.id}: {', '.join(metrics)} not measured"
            + (f": {why}" if isinstance(why, str) else " for this method, device or suite"))


def skipped(cell: str, why: str) -> CellVerdict:
    """A cell that was not measured (`why` names the cell)."""
    return CellVerdict(cell, Status.SKIPPED, (Check(None, Status.SKIPPED, why, False),))


def cell_error(cell: str, why: str) -> CellVerdict:
    """A cell that fails as a whole: `why` names the cell and what went wrong (a store that cannot be read or
    written)."""
    return CellVerdict(cell, Status.ERROR, (Check(None, Status.ERROR, why, True),))


def run_failed(cell: str, why: str) -> CellVerdict:
    """A cell whose run failed: no result, or a result carrying the run's error."""
    return cell_error(cell, f"{cell}: the run failed: {why}")


def judge_consistency(result: CellResult, baseline: StoredBaseline | None = None) -> CellVerdict:
    """Batch consistency: whether a left-padded batch's greedy tokens equal the lone prompts'.

    Inconsistent rows fail the cell, except where `baseline` (the baseline its accuracy figures meet) recorded
    the cell inconsistent too: then the check is KNOWN, passes, and names the baseline, so that a backend that
    is not batch-invariant on a model (llama.cpp's CPU path with flash attention on SmolLM2's q8_0 file) is a
    recorded property the gate keeps showing, and a cell that was consistent and no longer is still fails.
    """
    report = result.details.get("batch_consistency")
    if report is None:
        return skipped(result.id, f"{result.id}: batch consistency is off (run.consistency_tokens = 0)")
    if report.get("consistent") is None:
        return skipped(result.id, f"{result.id}: {report.get('reason')}")
    if report["consistent"]:
        return CellVerdict(result.id, Status.PASS, (Check(None, Status.PASS, f"{result.id}: batch consistent", False),))
    described = describe_failure(report) if report.get("rows") else ""
    message = f"{result.id}: batched rows differ from rows generated alone" + (f": {described}" if described else "")
    stored = baseline.cell if baseline is not None else None
    if stored is not None and (stored.details.get("batch_consistency") or {}).get("consistent") is False:
        known = (f"{message} (inconsistent as its baseline of {baseline.key} recorded on "
                 f"{stored.details.get('measured_at') or 'an unrecorded date'}, {baseline.path})")
        return CellVerdict(result.id, Status.KNOWN, (Check(None, Status.KNOWN, known, False,
                                                           baseline_key=baseline.key),))
    return cell_error(result.id, message)


def judge(result: CellResult, baseline: GateBaseline, policy: GatePolicy, *, metrics: Iterable[str] | None = None,
          recording: bool = False) -> CellVerdict:
    """Judge `result` against the baselines `baseline` names per figure (BaselineStore.gate_baseline) under `policy`.

    `metrics` are the figures gated (a test's); None gates every figure, and batch consistency too (the offline
    gate). With `recording` (--update-baselines) nothing is compared: only what makes figures no measurement fails.

    A cell fails when its run failed, a gated figure is not finite, the device timer failed under a device
    figure, a figure regressed (worse by more than its tolerance and its noise), the decode step's kernels
    changed, the baseline was measured differently or a figure of it read another way; under the policy, also
    when the baseline (or one of its figures) is missing, an accuracy figure had no baseline to be compared with,
    or the noise hid a figure's tolerance.
    """
    cell = result.id
    where = {"hardware_key": baseline.own.key, "baseline_path": str(baseline.own.path)}
    if result.error:
        return run_failed(cell, result.error)
    asked = None if metrics is None else list(metrics)
    broken = result.details.get("non_finite_figures") or {}
    errors = [Check(name, Status.ERROR, line, True)
              for name in (sorted(broken) if asked is None else asked) if name in broken
              for line in result.non_finite([name])]
    known: list[Check] = []
    if asked is None:
        consistency = judge_consistency(result, baseline.accuracy)
        errors += [check for check in consistency.checks if check.fails]
        known = [check for check in consistency.checks if check.status is Status.KNOWN]
    timer = (result.details.get("device_timing") or {}).get("error")
    device = [Check(None, Status.ERROR, f"{cell}: the device timer failed: {timer}", True)] \
        if timer and (asked is None or set(asked) & set(DEVICE_METRICS)) else []
    wanted = [m for m in (sorted(result.figures) if asked is None else asked) if m in result.figures]
    if not wanted and not errors + device:
        why = _nothing_to_gate(result, asked) if asked else f"{cell}: no figures measured"
        return replace(skipped(cell, why), **where)

    def verdict(status: Status, checks: list[Check], **more: Any) -> CellVerdict:
        return CellVerdict(cell, Status.ERROR if errors + device else status, tuple(errors + checks + device + known),
                           **where, **more)

    if recording or not wanted:  # nothing to compare: only the errors above can fail the cell
        return verdict(Status.RECORDED, [])
    processes = int((result.config.get("run") or {}).get("processes") or 1)
    rechecked = result.details.get("pooled_runs", 1) > processes  # a recheck pools one run beyond the processes
    groups: dict[int, tuple[StoredBaseline | None, list[str]]] = {}  # the figures judged against one baseline
    for name in wanted:
        stored = baseline.for_metric(name)
        groups.setdefault(id(stored), (stored, []))[1].append(name)
    statuses, checks, differences = [], [], []
    for stored, names in groups.values():
        if stored is None:
            status, found = Status.NOT_COMPARED, [
                Check(m, Status.NOT_COMPARED, f"{m} of {cell}: not compared ({baseline.not_compared})",
                      policy.strict_baselines, why=baseline.not_compared) for m in names]
            differed: tuple[str, ...] = ()
        else:
            status, found, differed = _judge_against(replace(result, figures={m: result.figures[m] for m in names}),
                                                     stored, baseline.own.key, policy, rechecked)
        statuses.append(status)
        checks += found
        differences += [d for d in differed if d not in differences]
    return verdict(min(statuses, key=_RANK.index), checks, differences=tuple(differences), rechecked=rechecked)


# how a cell's status is made of the statuses of its figures' groups (one per baseline): the worst first
_RANK = (Status.REGRESSED, Status.INCOMPARABLE, Status.MISSING, Status.NOT_COMPARED, Status.UNRESOLVED, Status.PASS)


def _judge_against(gated: CellResult, stored: StoredBaseline, run_key: str, policy: GatePolicy,
                   rechecked: bool) -> tuple[Status, list[Check], tuple[str, ...]]:
    """The figures of `gated` judged against one stored baseline: the status, the checks and what differed from
    the baseline's run where a comparison failed."""
    cell, path, baseline, key = gated.id, stored.path, stored.cell, stored.key
    if baseline is None:
        return Status.MISSING, [Check(None, Status.MISSING, f"{cell}: no baseline in {path}; {RECORD}",
                                      policy.strict_baselines)], ()
    mismatch = provenance_mismatch(gated, baseline)
    if mismatch:
        return Status.INCOMPARABLE, [Check(
            None, Status.INCOMPARABLE, f"{cell}: the baseline in {path} was measured differently "
                                       f"({'; '.join(mismatch)}); {RERECORD}", True, baseline_key=key)], ()
    pooled = " (pooled over a recheck)" if rechecked else ""
    elsewhere = (f"; held to the baseline of {key} in {path}: another CPU key, on the same weights and library "
                 "versions" if key != run_key else "")
    stale = [Check(name, Status.STALE, f"{name} of {cell}: the baseline was read another way ({why}); {RERECORD}",
                   True, why=why, baseline_key=key) for name, why in stale_figures(gated, baseline).items()]
    figures = [_figure_check(v, policy, pooled, key, elsewhere) for v in compare(gated, baseline, policy.for_suite(
        gated.config.get("suite", "")))]
    kernels = kernel_changes(gated, baseline) if "decode_kernels_per_step" in gated.figures else None
    if kernels:
        figures.append(Check("decode_kernels_per_step", Status.REGRESSED, kernels, True, baseline_key=key))
    missing = [Check(m, Status.MISSING, f"{cell}: baseline has no {m}; record it with --update-baselines",
                     policy.strict_baselines, baseline_key=key) for m in gated.figures if m not in baseline.figures]
    differences = tuple(run_differences(gated, baseline)) if any(c.fails for c in figures) else ()
    statuses = {check.status for check in figures if check.fails}
    status = (Status.REGRESSED if Status.REGRESSED in statuses else Status.INCOMPARABLE if stale
              else Status.MISSING if any(c.fails for c in missing) else Status.UNRESOLVED if statuses
              else Status.PASS)
    return status, stale + figures + missing, differences


def recheck_reasons(result: CellResult, verdict: CellVerdict) -> list[str]:
    """The regressions of `verdict` that measuring again could clear: figures with repeats (speeds)."""
    return [check.message for check in verdict.checks
            if check.status is Status.REGRESSED and check.compared and len(result.figures[check.metric].samples) > 1]


def import_results(store: BaselineStore, paths: list[Path], pool: bool = False) -> dict[Path, list[Path]]:
    """Merge results files into `store` under the hardware key each result was measured on; with `pool`,
    each repeated figure also keeps the stored baseline's samples (BaselineStore.merge).

    Results made slower on purpose (--inject-decode-delay-ms) are refused; cells with errors are skipped.
    """
    written: dict[Path, list[Path]] = {}
    for path in paths:
        results = read_run(path).results
        for result in results:
            if any(result.config.get(name) for name in INJECTED):
                raise ValueError(f"{path}: {result.id} was made worse on purpose ({' or '.join(INJECTED)}); "
                                 "it cannot become a baseline")
        by_key: dict[str, list[CellResult]] = {}
        for result in results:
            key = result.hardware.get("hardware_key")
            if not key:
                raise ValueError(f"{path}: {result.id} has no hardware.hardware_key")
            by_key.setdefault(key, []).append(result)
        written[path] = [p for key, group in by_key.items() for p in store.merge(key, group, pool=pool)]
    return written


@dataclass(frozen=True)
class GateReport:
    """A run's results files judged again: every verdict, the lines `quantbench gate` prints, and the tallies."""

    verdicts: list[CellVerdict]
    lines: list[str]
    noisy: str | None  # the checks that passed with spreads wider than their tolerance, per metric
    nothing_compared: str | None  # why no figure was held against a baseline; None when some were
    notices: tuple[str, ...] = ()  # what a reader must see first: the run's keys that have no baselines

    @property
    def failures(self) -> int:
        return sum(line.startswith("FAIL") for line in self.lines)


def replay(store: BaselineStore, paths: list[Path], matrix: Any, policy: GatePolicy | None = None,
           hardware_key: str | None = None) -> GateReport:
    """Judge the results of a run's files again, offline, as the live run judged them (`judge`, every figure).

    Each result is held to the tolerances of the matrix suite it was measured in, against the baselines of
    `hardware_key`, else of the key the run recorded for its suite (--hardware-key included), else of the key
    its worker detected. Without a `policy`, the matrix's tolerances as they are, nothing strict.
    """
    if policy is None:
        policy = GatePolicy.from_options({}.get, matrix)
    verdicts: list[CellVerdict] = []
    keys: set[str] = set()
    for path in paths:
        run = read_run(path)
        verdicts += [run_failed(cell, why) for cell, why in run.failures]
        for result in run.results:
            suite = result.config.get("suite")
            key = hardware_key or run.hardware_keys.get(suite) or result.hardware.get("hardware_key")
            if not key:
                raise ValueError(f"{path}: {result.id} has no hardware.hardware_key")
            if suite not in matrix.suites:
                raise ValueError(f"{path}: {result.id} was measured in suite {suite!r}, which {matrix.path} "
                                 f"does not have (suites: {', '.join(matrix.suites)})")
            keys.add(key)
            verdicts.append(judge(result, store.gate_baseline(key, result), policy))
    return gate_report(store, verdicts, keys)


def gate_report(store: BaselineStore, verdicts: list[CellVerdict], keys: set[str]) -> GateReport:
    """The report of a run's verdicts (judged live by `quantbench run`, or again by `replay`) under `keys`."""
    compared = [check for verdict in verdicts for check in verdict.checks if check.compared]
    noisy = resolution_summary((check.metric or "", check.status is Status.UNRESOLVED) for check in compared)
    nothing = None if compared else _why_nothing_compared(store, verdicts, keys)
    return GateReport(verdicts, [line for verdict in verdicts for line in verdict.lines()], noisy, nothing,
                      tuple(no_baselines_notices(store, keys)))


def no_baselines_notices(store: BaselineStore, keys: Iterable[str]) -> list[str]:
    """One line per hardware key of a run that has no baseline file at all: what its run could and could not
    compare (the top of the pytest summary and of `quantbench gate`)."""
    stored = ", ".join(key for key in store.hardware_keys() if store.has_baselines(key)) or "none"
    lines = []
    for key in sorted(keys):
        if store.has_baselines(key):
            continue
        if is_cpu_key(key):
            compared = ("its speed and memory figures had no baselines and were not compared; the accuracy figures "
                        "of its CPU cells were compared with another CPU key's baseline where the weights and "
                        "library versions match (each figure names its baseline's key), and are 'not compared' "
                        "where none does")
        else:
            compared = "none of its figures had a baseline to be compared with"
        lines.append(f"NOTICE: hardware key {key} has no baselines in {store.root} (keys stored: {stored}): "
                     f"{compared}; record its own with --update-baselines")
    return lines


def _why_nothing_compared(store: BaselineStore, verdicts: list[CellVerdict], keys: set[str]) -> str:
    if not verdicts:
        return "nothing was compared: the results files hold no cell results"
    if any(verdict.status in (Status.MISSING, Status.NOT_COMPARED) for verdict in verdicts):
        stored = ", ".join(store.hardware_keys()) or "none"
        return (f"nothing was compared: no cell has a baseline under {', '.join(sorted(keys))} in {store.root} "
                f"(keys stored: {stored}); record them (quantbench import-results, or pytest --update-baselines), "
                "or name the run's key with --hardware-key")
    return "nothing was compared: every cell failed, was skipped or has a baseline measured differently"
