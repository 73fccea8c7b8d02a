"""How well the gate tells a real slowdown from noise, per cell and device figure, from runs that happened.

Three kinds of runs go in: the recording (several processes, `--update-baselines --processes N`), gates of
unchanged code on other leases (A/A: every check should pass) and a gate with `--inject-device-slowdown`
(every device decode check of that method should fail). Each is read back as the live run gated it
(`results.read_run`), against the stored baselines and the matrix suite's tolerances, through the same
`judge` the gate uses. The between-process spread comes from the recording's processes, each on its own.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from harness.baselines import BaselineStore
from harness.gate import GatePolicy, Status, judge
from harness.results import CellResult, _records, read_run

CALIBRATED_METRICS = ("decode_device_tokens_per_s", "prefill_device_tokens_per_s", "decode_kernels_per_step")


def _uuid(result: CellResult) -> str | None:
    return (result.hardware.get("gpu") or {}).get("uuid")


def _verdicts(store: BaselineStore, matrix: Any, paths: list[Path]) -> dict[tuple[str, str], tuple[bool, float, Any]]:
    """(cell, metric) -> (regressed, the relative change, + worse, the measured result) for one gate's files,
    as the gate judges them (`gate.judge`, the matrix's tolerances); a kernel change regresses the kernel count."""
    policy = GatePolicy.from_options({}.get, matrix)
    found: dict[tuple[str, str], tuple[bool, float, Any]] = {}
    for path in paths:
        for result in read_run(path).results:
            if result.batch_size is None:
                continue
            key = result.hardware["hardware_key"]
            verdict = judge(result, store.gate_baseline(key, result), policy, metrics=CALIBRATED_METRICS)
            regressed = {check.metric for check in verdict.checks if check.status is Status.REGRESSED}
            for check in verdict.checks:
                if check.compared:
                    found[(result.id, check.metric or "")] = (check.metric in regressed, check.change, result)
    return found


def calibrate(store: BaselineStore, matrix: Any, record: list[Path], aa: list[list[Path]],
              injected: list[Path]) -> dict[str, Any]:
    """The calibration document: one entry per recorded cell and device figure (module docstring).

    Changes are relative to the baseline and signed so that + is worse, as the gate's verdicts are.
    """
    per_process: dict[tuple[str, str], list[float]] = {}
    uuids: dict[str, set[str]] = {}
    for path in record:
        for record_ in _records(path):
            if record_.get("role", "process") != "process":
                continue
            for result in record_["results"]:
                uuids.setdefault(result.id, set()).update(filter(None, [_uuid(result)]))
                for metric in CALIBRATED_METRICS:
                    if metric in result.figures and result.batch_size is not None:
                        per_process.setdefault((result.id, metric), []).append(result.figures[metric].value)
    gates = [_verdicts(store, matrix, paths) for paths in aa]
    slowed = _verdicts(store, matrix, injected)
    cells = []
    for (cell, metric), values in sorted(per_process.items()):
        checked = [gate[(cell, metric)] for gate in gates if (cell, metric) in gate]
        hit = slowed.get((cell, metric))
        for _, _, result in [*checked, *([hit] if hit else [])]:
            uuids[cell].update(filter(None, [_uuid(result)]))
        fraction = hit[2].config.get("inject_device_slowdown") if hit else None
        mean = statistics.fmean(values)
        cells.append({
            "cell": cell,
            "metric": metric,
            "processes": len(values),
            "gpu_uuids": sorted(uuids.get(cell, ())),
            "between_process_cv": statistics.stdev(values) / mean if len(values) > 1 and mean else 0.0,
            "aa_checks": len(checked),
            "aa_failures": sum(regressed for regressed, _, _ in checked),
            "aa_changes": [change for _, change, _ in checked],
            "injected_fraction": fraction,
            "injected_checks": int(hit is not None),
            "injected_failures": int(bool(hit and hit[0])),
            "injected_change": hit[1] if hit else None,
        })
    return {"record": [str(p) for p in record], "aa": [[str(p) for p in paths] for paths in aa],
            "injected": [str(p) for p in injected], "cells": cells}
