"""One metric's value with its spread: what every measurement returns and every result holds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One metric's value: the median of its repeats and their spread (sample standard deviation)."""

    value: float
    spread: float = 0.0
    n: int = 1
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, samples: list[float] | tuple[float, ...]) -> Figure:
        """Summarise repeated measurements: median value, standard deviation as spread."""
        if not samples:
            raise ValueError("a figure needs at least one sample")
        spread = statistics.stdev(samples) if len(samples) > 1 else 0.0
        return cls(float(statistics.median(samples)), float(spread), len(samples), tuple(float(s) for s in samples))

    @property
    def finite(self) -> bool:
        """Value, spread and every sample are finite numbers."""
        return all(math.isfinite(x) for x in (self.value, self.spread, *self.samples))

    @property
    def relative_spread(self) -> float:
        """Spread as a fraction of the value (0 when the value is 0)."""
        return self.spread / abs(self.value) if self.value else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "spread": self.spread, "n": self.n, "samples": list(self.samples)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        return cls(float(data["value"]), float(data.get("spread", 0.0)), int(data.get("n", 1)),
                   tuple(float(s) for s in data.get("samples", ())))
