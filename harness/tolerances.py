"""Relative tolerances per metric, per method and for noise: the policy a figure is judged under.

Read from the matrix file's `[tolerances]` tables and from `--tolerance` options; both readers name the
table or the option in their errors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from harness.metrics import METRICS
from harness.values import is_number, shown


@dataclass(frozen=True)
class Tolerances:
    """Relative tolerances per metric, overridable per metric and per method, and the noise allowance.

    A method override beats a metric override, which beats the metric's default from METRICS.
    """

    defaults: dict[str, float] = field(default_factory=lambda: {n: m.tolerance for n, m in METRICS.items()})
    metric_overrides: dict[str, float] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    noise_sigmas: float = 2.0

    def for_cell(self, method: str, metric: str) -> float:
        """The tolerance that applies to `metric` in cells of `method`."""
        if metric not in self.defaults and metric not in METRICS:
            raise KeyError(f"unknown metric {metric!r}; known metrics: {', '.join(sorted(self.defaults))}")
        method_tolerances = self.method_overrides.get(method, {})
        if metric in method_tolerances:
            return method_tolerances[metric]
        return self.metric_overrides.get(metric, self.defaults.get(metric, METRICS[metric].tolerance))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str) -> Tolerances:
        """Read a tolerance table such as the matrix file's `[tolerances]`; `source` names it in errors.

        `{"ppl": 0.02, "methods": {"bnb-int8": {"decode_tokens_per_s": 0.2}}, "noise_sigmas": 2}`
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a table, got {shown(data)}")
        metric_overrides: dict[str, float] = {}
        method_overrides: dict[str, dict[str, float]] = {}
        noise_sigmas = 2.0
        for key, value in data.items():
            if key == "methods":
                if not isinstance(value, dict):
                    raise ValueError(f"{source}: methods: expected a table of methods, got {shown(value)}")
                for method, table in value.items():
                    if not isinstance(table, dict):
                        raise ValueError(f"{source}: methods.{method}: expected a table of "
                                         f"metric = tolerance, got {shown(table)}")
                    method_overrides[method] = {
                        name: _tolerance(tol, source, f"methods.{method}.{name}", name)
                        for name, tol in table.items()
                    }
            elif key == "noise_sigmas":
                if not is_number(value) or not 0 <= value < math.inf:
                    raise ValueError(f"{source}: noise_sigmas: expected a number of at least 0 "
                                     f"(0 ignores noise), got {shown(value)}")
                noise_sigmas = float(value)
            else:
                metric_overrides[key] = _tolerance(value, source, key, key)
        return cls(metric_overrides=metric_overrides, method_overrides=method_overrides,
                   noise_sigmas=noise_sigmas)

    def with_cli(self, specs: list[str], methods: Iterable[str] | None = None) -> Tolerances:
        """These tolerances with `--tolerance` specs applied in order: `metric=0.1` or `method:metric=0.1`.

        With `methods` (the matrix's), a spec naming any other method is refused, as the matrix's own table
        refuses one: a typo would otherwise leave the tolerance it meant to change as it was.
        """
        known = None if methods is None else sorted(methods)
        metric_overrides = dict(self.metric_overrides)
        method_overrides = {method: dict(table) for method, table in self.method_overrides.items()}
        for spec in specs:
            source = f"--tolerance {spec!r}"
            target, equals, value = spec.rpartition("=")
            # Metric names have no ':', so the last one splits; a method name may carry its own.
            method, colon, name = (part.strip() for part in target.rpartition(":"))
            if not equals or not name or (colon and not method):
                raise ValueError(
                    f"{source}: expected metric=TOLERANCE or method:metric=TOLERANCE, e.g. ppl=0.02"
                )
            try:
                number: Any = float(value)
            except ValueError:
                number = value
            if colon and known is not None and method not in known:
                raise ValueError(f"{source}: unknown method {method!r}; known: {', '.join(known)}")
            if colon:
                method_overrides.setdefault(method, {})[name] = _tolerance(number, source, target, name)
            else:
                metric_overrides[name] = _tolerance(number, source, target, name)
        return replace(self, metric_overrides=metric_overrides, method_overrides=method_overrides)


def _tolerance(value: Any, source: str, where: str, metric_name: str) -> float:
    """Check one relative tolerance: a known metric and a number in [0, 10)."""
    if metric_name not in METRICS:
        known = ", ".join(sorted(METRICS))
        raise ValueError(f"{source}: {where}: unknown metric {metric_name!r}; known metrics: {known}")
    if not is_number(value) or not 0 <= value < 10:
        raise ValueError(f"{source}: {where}: expected a relative tolerance from 0 up to 10 "
                         f"(0.05 = 5%), got {shown(value)}")
    return float(value)
