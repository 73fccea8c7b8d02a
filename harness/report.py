"""Tables for people: the end-of-run summary and the per-cell comparison of two hardware keys."""

from __future__ import annotations

from typing import Any

from harness.baselines import BaselineStore
from harness.metrics import METRICS


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def summary_table(records: list[dict[str, Any]]) -> str:
    """One row per gated figure: value with spread, baseline, change (positive = worse) and status."""
    rows = []
    for record in sorted(records, key=lambda r: r["cell"]):
        for name, fig in sorted(record["figures"].items()):
            spread = f" +-{100 * fig['spread'] / fig['value']:.1f}%" if fig.get("spread") and fig["value"] else ""
            change = fig.get("change")
            rows.append([record["cell"], name, _num(fig["value"]) + spread, METRICS[name].unit,
                         _num(fig.get("baseline")), "-" if change is None else f"{100 * change:+.1f}%",
                         record["status"]])
    return _table(["cell", "metric", "value", "unit", "baseline", "worse by", "status"], rows)


def compare_hardware(store: BaselineStore, key_a: str, key_b: str, metrics: list[str] | None = None) -> str:
    """Per-cell ratios B / A of every figure both hardware keys have (for tokens/s, > 1 means B is faster)."""
    known = set(store.hardware_keys())
    for key in (key_a, key_b):
        if key not in known:
            raise KeyError(f"no baselines for hardware key {key!r} in {store.root}; known: {', '.join(sorted(known))}")
    models_a = {p.stem for p in (store.root / key_a).glob("*.json")}
    models_b = {p.stem for p in (store.root / key_b).glob("*.json")}
    rows = []
    for model in sorted(models_a & models_b):
        cells_a, cells_b = store.load(key_a, model), store.load(key_b, model)
        for cell in sorted(set(cells_a) & set(cells_b)):
            a, b = cells_a[cell], cells_b[cell]
            for name in sorted(set(a.figures) & set(b.figures)):
                if metrics and name not in metrics:
                    continue
                va, vb = a.figures[name].value, b.figures[name].value
                ratio = vb / va if va else float("nan")
                rows.append([cell, name, _num(va), _num(vb), f"{ratio:.3f}", METRICS[name].unit])
    if not rows:
        return f"{key_a} and {key_b} share no cells"
    return _table(["cell", "metric", key_a, key_b, "B/A", "unit"], rows)
