"""The offline side of the baseline store: results files merged into it, and gated against it again.

Above results (which reads a run's files) and baselines (the store and its rules), so that neither imports
the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.baselines import (
    BaselineStore,
    compare,
    kernel_changes,
    provenance_mismatch,
    resolution_summary,
    run_differences,
    stale_figures,
    unresolved_message,
)
from harness.results import CellResult, read_run
from harness.tolerances import Tolerances


def import_results(store: BaselineStore, paths: list[Path], pool: bool = False) -> dict[Path, list[Path]]:
    """Merge results files into `store` under the hardware key each result was measured on; with `pool`,
    each repeated figure also keeps the stored baseline's samples (BaselineStore.merge).

    Results made slower on purpose (--inject-decode-delay-ms) are refused; cells with errors are skipped.
    """
    written: dict[Path, list[Path]] = {}
    for path in paths:
        results = read_run(path).results
        for result in results:
            if result.config.get("inject_decode_delay_ms") or result.config.get("inject_device_slowdown"):
                raise ValueError(f"{path}: {result.id} was slowed on purpose (inject_decode_delay_ms or "
                                 "inject_device_slowdown); "
                                 "it cannot become a baseline")
        by_key: dict[str, list[CellResult]] = {}
        for result in results:
            key = result.hardware.get("hardware_key")
            if not key:
                raise ValueError(f"{path}: {result.id} has no hardware.hardware_key")
            by_key.setdefault(key, []).append(result)
        written[path] = [p for key, group in by_key.items() for p in store.merge(key, group, pool=pool)]
    return written


def gate_results(
    store: BaselineStore, paths: list[Path], matrix: Any, fail_unresolved: bool = False
) -> tuple[list[str], int, str | None]:
    """Hold the figures of results files against the stored baselines of the hardware that measured them.

    The gate of a run, again, offline (a GPU runner's artifact checked on any machine): each result is held
    to the tolerances of the matrix suite it was measured in. Returns one line per figure or problem, and
    the number of failures: regressions, errors of the run, batch-consistency failures and baselines
    measured differently; and a line counting, per metric, the figures that passed with spreads wider
    than their tolerance (None when there are none). Those figures are marked `noisy`, or `FAIL` with
    `fail_unresolved`. A failing figure's line ends with what differed between the baseline's run and
    this one (library versions, driver, host; `run_differences`).
    """
    lines: list[str] = []
    failures = 0
    checks: list[tuple[str, bool]] = []  # (metric, whether its spreads hid the tolerance) of every verdict
    tolerances: dict[str, Tolerances] = {}
    for path in paths:
        run = read_run(path)
        failures += len(run.failures)
        lines.extend(f"FAIL {failure}" for failure in run.failures)
        for result in run.results:
            key = result.hardware.get("hardware_key")
            if not key:
                raise ValueError(f"{path}: {result.id} has no hardware.hardware_key")
            suite = result.config.get("suite")
            if suite not in matrix.suites:
                raise ValueError(f"{path}: {result.id} was measured in suite {suite!r}, which {matrix.path} "
                                 f"does not have (suites: {', '.join(matrix.suites)})")
            if suite not in tolerances:
                tolerances[suite] = Tolerances.from_mapping(matrix.suites[suite].tolerances,
                                                            f"{matrix.path} suite {suite!r} tolerances")
            if result.error:
                failures += 1
                lines.append(f"FAIL {result.id}: the run failed: {result.error}")
                continue
            broken = result.non_finite(sorted(result.details.get("non_finite_figures") or {}))
            failures += len(broken)
            lines.extend(f"FAIL {line}" for line in broken)
            consistency = result.details.get("batch_consistency") or {}
            if consistency.get("consistent") is False:
                failures += 1
                lines.append(f"FAIL {result.id}: batched rows differ from rows generated alone")
            baseline = store.get(key, result)
            if baseline is None:
                lines.append(f"new  {result.id}: no baseline under {key}")
                continue
            mismatch = provenance_mismatch(result, baseline)
            if mismatch:
                failures += 1
                lines.append(f"FAIL {result.id}: the baseline was measured differently ({'; '.join(mismatch)})")
                continue
            stale = stale_figures(result, baseline)
            for name, why in stale.items():
                failures += 1
                lines.append(f"FAIL {name} of {result.id}: the baseline was read another way ({why})")
            differences = run_differences(result, baseline)
            differed = f"; the baseline's run differed in: {', '.join(differences)}" if differences else ""
            for verdict in compare(result, baseline, tolerances[suite]):
                checks.append((verdict.metric, verdict.unresolved))
                if verdict.regressed:
                    failures += 1
                    lines.append(f"FAIL {verdict.message}{differed}")
                elif verdict.resolved:
                    lines.append(f"ok   {verdict.message}")
                elif fail_unresolved:
                    failures += 1
                    lines.append(f"FAIL {unresolved_message(verdict)}{differed}")
                else:
                    lines.append(f"noisy {verdict.message}")
            kernels = kernel_changes(result, baseline)
            if kernels:
                failures += 1
                lines.append(f"FAIL {kernels}{differed}")
            device_error = (result.details.get("device_timing") or {}).get("error")
            if device_error:
                failures += 1
                lines.append(f"FAIL {result.id}: the device timer failed: {device_error}")
    return lines, failures, resolution_summary(checks)
