"""Tables for people: the end-of-run summary and the per-cell comparison of two hardware keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.baselines import BaselineStore
from harness.config import cell_id
from harness.measure.bandwidth import read_bandwidth
from harness.metrics import METRICS
from harness.roofline import decode_figure, efficiency


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def figure_status(record: dict[str, Any], name: str) -> str:
    """A gated figure's status: its cell's, and whether a recheck was pooled or the noise hid the tolerance."""
    return (record["status"] + (" (rechecked)" if "rechecked" in record else "")
            + (" (noise > tolerance)" if name in record.get("unresolved", ()) else ""))


def _worse_by(fig: dict[str, Any]) -> str:
    """A gated figure's relative change (positive = worse); from a zero baseline there is none to give."""
    change = fig.get("change")
    if change is not None:
        return f"{100 * change:+.1f}%"
    return "from 0" if fig.get("baseline") == 0 and fig["value"] != 0 else "-"


def summary_table(records: list[dict[str, Any]]) -> str:
    """One row per gated figure: value with spread, baseline, change (positive = worse) and status."""
    rows = []
    for record in sorted(records, key=lambda r: r["cell"]):
        for name, fig in sorted(record["figures"].items()):
            spread = f" +-{100 * fig['spread'] / fig['value']:.1f}%" if fig.get("spread") and fig["value"] else ""
            status = "not compared" if "not_compared" in fig else figure_status(record, name)
            rows.append([record["cell"], name, _num(fig["value"]) + spread, METRICS[name].unit,
                         _num(fig.get("baseline")), fig.get("baseline_key") or "-", _worse_by(fig), status])
    return _table(["cell", "metric", "value", "unit", "baseline", "baseline key", "worse by", "status"], rows)


def compare_hardware(store: BaselineStore, key_a: str, key_b: str, metrics: list[str] | None = None) -> str:
    """Per-cell ratios B / A of every figure both hardware keys have (for tokens/s, > 1 means B is faster)."""
    known = set(store.hardware_keys())
    for key in (key_a, key_b):
        if key not in known:
            raise KeyError(f"no baselines for hardware key {key!r} in {store.root}; known: {', '.join(sorted(known))}")
    models_a = {p.stem for p in (store.root / key_a).glob("*.json")}
    models_b = {p.stem for p in (store.root / key_b).glob("*.json")}
    limit_a, limit_b = read_bandwidth(store.root, key_a), read_bandwidth(store.root, key_b)
    rows = []
    for model in sorted(models_a & models_b):
        cells_a, cells_b = store.load(key_a, model), store.load(key_b, model)
        for cell in sorted(set(cells_a) & set(cells_b)):
            a, b = cells_a[cell], cells_b[cell]
            model_key = cell_id(a.method, a.model)
            for name in sorted(set(a.figures) & set(b.figures)):
                if metrics and name not in metrics:
                    continue
                va, vb = a.figures[name].value, b.figures[name].value
                ratio = vb / va if va else float("nan")
                roof = ["-", "-"]
                if name in ("decode_tokens_per_s", "decode_device_tokens_per_s"):
                    roof = [_percent(efficiency(a, cells_a.get(model_key), limit_a, name)),
                            _percent(efficiency(b, cells_b.get(model_key), limit_b, name))]
                rows.append([cell, name, _num(va), _num(vb), f"{ratio:.3f}", METRICS[name].unit, *roof])
    if not rows:
        return f"{key_a} and {key_b} share no cells"
    return _table(["cell", "metric", key_a, key_b, "B/A", "unit", "roofline A", "roofline B"], rows)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (lower x and lower y are better)."""
    front = []
    for name, x, y in points:
        if not any((ox <= x and oy <= y) and (ox < x or oy < y) for _, ox, oy in points):
            front.append(name)
    return front


def _cells_by_method(cells: dict[str, Any]) -> dict[str, dict[int | None, Any]]:
    by_method: dict[str, dict[int | None, Any]] = {}
    for cell in cells.values():
        by_method.setdefault(cell.method, {})[cell.batch_size] = cell
    return by_method


def _figure(cell: Any, name: str) -> float | None:
    return cell.figures[name].value if cell is not None and name in cell.figures else None


def _model_markdown(key: str, model: str, by_method: dict[str, dict[int | None, Any]],
                    measured: tuple[float, str] | None = None) -> str:
    sizes = sorted({b for cells in by_method.values() for b in cells if b is not None})
    memory = memory_figure(by_method)
    gpu = memory != "peak_rss_mib"
    device = any(_figure(c, "decode_device_tokens_per_s") for m in by_method.values() for c in m.values())
    header = ["method", "ppl", "ppl ratio", "KLD mean", "top-1"] + [f"decode b{b}" for b in sizes]
    if device:
        header += [f"device decode b{b}" for b in sizes]
    header.append(f"{memory} b{sizes[0]}" if sizes else memory)
    if gpu:
        header += [f"roofline b{b}" for b in sizes]
    lines = [f"### {model} on {key}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, cells in sorted(by_method.items()):
        per_model = cells.get(None)
        row = [method] + [_num(_figure(per_model, n)) for n in ("ppl", "ppl_ratio", "kld_mean", "top1_agreement")]
        row += [_rate(cells.get(b), "decode_tokens_per_s", 1) for b in sizes]
        if device:
            row += [_rate(cells.get(b), "decode_device_tokens_per_s", 2) for b in sizes]
        row.append(_num(_figure(cells.get(sizes[0]) if sizes else None, memory)))
        if gpu:
            row += [_roofline(cells.get(b), per_model, measured) for b in sizes]
        lines.append("| " + " | ".join(row) + " |")
    if gpu:
        ceiling = measured[1] if measured else "the data sheet's (no quantbench bandwidth --write for this key)"
        lines += ["", "roofline: decode steps/s x weight bytes over the GPU's memory bandwidth (harness/roofline.py; "
                  "from the device decode figure, or generate()'s where marked 'e2e'; KV-cache reads not counted; "
                  "'-' where the weight bytes were not recorded); bandwidth: " + ceiling]
        lines += [f"memory: {memory} (NVML's where every cell has it: torch and llama.cpp cells alike)"]
    return "\n".join(lines)


def _rate(cell: Any, name: str, spread_digits: int) -> str:
    """A throughput figure with its relative spread, or '-'."""
    value = _figure(cell, name)
    if not value:
        return "-"
    return f"{value:.1f} ±{100 * cell.figures[name].relative_spread:.{spread_digits}f}%"


def memory_figure(by_method: dict[str, dict[int | None, Any]]) -> str:
    """The memory figure a table or plot compares across backends: NVML's device memory of the worker's
    processes where every GPU cell has it (llama.cpp's allocations are invisible to torch's counters, and its
    host RSS is no device figure), else torch's peak VRAM, else on a CPU the peak RSS."""
    batch_cells = [c for m in by_method.values() for b, c in m.items() if b is not None]
    for name in ("peak_nvml_mib", "peak_vram_mib"):
        if batch_cells and all(_figure(c, name) for c in batch_cells):
            return name
    if any(_figure(c, "peak_vram_mib") or _figure(c, "peak_nvml_mib") for c in batch_cells):
        return "peak_vram_mib"
    return "peak_rss_mib"


def _roofline(cell: Any, model_cell: Any, measured: tuple[float, str] | None) -> str:
    share = _percent(efficiency(cell, model_cell, measured))
    return share + " e2e" if share != "-" and decode_figure(cell) == "decode_tokens_per_s" else share


def _plots(key: str, model: str, by_method: dict[str, dict[int | None, Any]]) -> list[tuple[str, bytes]]:
    """PNG plots: decode tokens/s against batch size, and memory against KL divergence (Pareto front)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, cells in sorted(by_method.items()):
        sizes = sorted(b for b in cells if b is not None and _figure(cells[b], "decode_tokens_per_s"))
        if sizes:
            ax.plot(sizes, [_figure(cells[b], "decode_tokens_per_s") for b in sizes], marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s", title=f"{model} on {key}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    plots.append((f"Decode throughput against batch size: {model} on {key}", _png(fig, io, plt)))

    points = []
    memory_name = memory_figure(by_method)
    for method, cells in by_method.items():
        sizes = sorted(b for b in cells if b is not None)
        memory = _figure(cells.get(sizes[0]), memory_name) if sizes else None
        kld = _figure(cells.get(None), "kld_mean")
        if memory is not None and kld is not None:
            points.append((method, memory, kld))
    if points:
        front = set(pareto_front(points))
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, x, y in points:
            ax.scatter(x, max(y, 1e-7), color="tab:red" if name in front else "tab:gray")
            ax.annotate(name, (x, max(y, 1e-7)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(yscale="log", xlabel=f"{memory_name} at the smallest batch", ylabel="mean KL divergence (nats)",
               title=f"Memory against accuracy loss: {model} on {key} (red: Pareto front)")
        ax.grid(True, alpha=0.3)
        plots.append((f"Memory against KL divergence: {model} on {key}", _png(fig, io, plt)))
    return plots


def _png(fig: Any, io: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(store: BaselineStore, keys: list[str], out_dir: Path) -> tuple[Path, Path]:
    """Write report.md and a self-contained report.html (plots inlined) for the given hardware keys."""
    import base64
    import html

    known = set(store.hardware_keys())
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise KeyError(f"no baselines for hardware key(s) {', '.join(unknown)} in {store.root}; "
                       f"known: {', '.join(sorted(known))}")
    sections_md = ["# quantbench report", ""]
    sections_html = ["<h1>quantbench report</h1>"]
    for key in keys:
        measured = read_bandwidth(store.root, key)
        for model in sorted(p.stem for p in (store.root / key).glob("*.json")):
            by_method = _cells_by_method(store.load(key, model))
            table = _model_markdown(key, model, by_method, measured)
            sections_md += [table, ""]
            sections_html.append(_markdown_table_html(table, html))
            for title, png in _plots(key, model, by_method):
                data = base64.b64encode(png).decode()
                sections_html.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    if len(keys) >= 2:
        comparison = compare_hardware(store, keys[0], keys[1], ["decode_tokens_per_s", "prefill_tokens_per_s",
                                                                  "decode_device_tokens_per_s"])
        sections_md += [f"## {keys[1]} against {keys[0]}", "", "```", comparison, "```", ""]
        sections_html.append(f"<h2>{html.escape(keys[1])} against {html.escape(keys[0])}</h2>"
                             f"<pre>{html.escape(comparison)}</pre>")
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(sections_md), encoding="utf-8")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}figure{margin:1em 0}")
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>quantbench report</title>"
                         f"<style>{style}</style></head><body>{''.join(sections_html)}</body></html>",
                         encoding="utf-8")
    return md_path, html_path


def _markdown_table_html(table: str, html: Any) -> str:
    lines = table.splitlines()
    title = html.escape(lines[0].lstrip("# "))
    rows = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines[2:] if line.strip()]
    header, body = rows[0], rows[2:]
    head = "".join(f"<th>{c}</th>" for c in header)
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return f"<h3>{title}</h3><table><tr>{head}</tr>{cells}</table>"


def step_summary(records: list[dict[str, Any]]) -> str:
    """The run's gated figures as a GitHub Actions step summary (markdown)."""
    rows = ["| cell | metric | value | baseline | baseline key | worse by | status |",
            "|---|---|---:|---:|---|---:|---|"]
    for record in sorted(records, key=lambda r: r["cell"]):
        for name, fig in sorted(record["figures"].items()):
            status = "not compared" if "not_compared" in fig else figure_status(record, name)
            rows.append(f"| `{record['cell']}` | {name} | {_num(fig['value'])} | {_num(fig.get('baseline'))} | "
                        f"{fig.get('baseline_key') or '-'} | {_worse_by(fig)} | {status} |")
    regressed = sum(r["status"] == "regressed" for r in records)
    return f"## quantbench\n\n{len(records)} gated results, {regressed} regressed.\n\n" + "\n".join(rows) + "\n"


REAL_MODEL_COLUMNS = (  # (header, how a method's cells give it)
    ("weights MiB", lambda m, b: _mib(m.details.get("weights_bytes"))),
    ("ppl", lambda m, b: _num(_figure(m, "ppl"))),
    ("ppl ratio", lambda m, b: _num(_figure(m, "ppl_ratio"))),
    ("KLD mean", lambda m, b: _num(_figure(m, "kld_mean"))),
    ("KLD p99", lambda m, b: _num(_figure(m, "kld_p99"))),
    ("top-1", lambda m, b: _num(_figure(m, "top1_agreement"))),
    ("batch consistent", lambda m, b: {True: "yes", False: "no"}.get(
        (m.details.get("batch_consistency") or {}).get("consistent"), "-")),
    ("decode tok/s", lambda m, b: _rate(b, "decode_tokens_per_s", 0)),
    ("prefill tok/s", lambda m, b: _rate(b, "prefill_tokens_per_s", 0)),
    ("peak RSS MiB", lambda m, b: _num(_figure(b, "peak_rss_mib"))),
    ("load s", lambda m, b: _num(_figure(m, "load_s"))),
    ("quantize s", lambda m, b: _num(_figure(m, "quantize_s") or (m.details.get("quantization") or {}).get(
        "quantize_s"))),
)


def _mib(value: float | None) -> str:
    return "-" if not value else f"{value / 2**20:.0f}"


README_BLOCK = ("<!-- real-model table: generated by `quantbench real-model KEY MODEL --readme README.md` -->",
                "<!-- end of the real-model table -->")
SUMMARY_COLUMNS = ("weights MiB", "ppl", "ppl ratio", "KLD mean", "top-1", "batch consistent")


def real_model_summary(store: BaselineStore, key: str, model: str) -> str:
    """The README's short table of real-model accuracy per method (the columns of SUMMARY_COLUMNS), from the
    same baselines and in the same order as real_model_page."""
    by_method, size = _real_model_cells(store, key, model)
    columns = [column for column in REAL_MODEL_COLUMNS if column[0] in SUMMARY_COLUMNS]
    return "\n".join([f"From [`baselines/{key}/{model}.json`](baselines/{key}/{model}.json) (whole table, speed "
                      "and memory: [docs/real-model.md](docs/real-model.md)):", "",
                      *_real_model_table(by_method, size, columns)]) + "\n"


def with_readme_summary(readme: str, summary: str) -> str:
    """`readme` with the text between README_BLOCK's markers replaced by `summary`."""
    start, end = README_BLOCK
    if start not in readme or end not in readme:
        raise KeyError(f"the README has no real-model block: it needs the lines {start!r} and {end!r}")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{summary}{end}{tail}"


def real_model_page(store: BaselineStore, key: str, model: str) -> str:
    """docs/real-model.md: what each method costs on a model with real weights, from its stored baselines.

    One row per method: accuracy against the suite's reference (per-model figures) and the speed and memory
    of the smallest batch size; the heading says which weights, file and protocol the figures are of.
    """
    by_method, size = _real_model_cells(store, key, model)
    first = next(cells[None] for cells in by_method.values() if None in cells)
    provenance = first.details.get("model") or {}
    accuracy = first.config.get("accuracy") or {}
    protocol = (first.details.get("ppl") or {}).get("protocol") or {}
    reference = (first.details.get("reference") or {})
    origin = (f"package {provenance['package']} {provenance['version']}, file {provenance['file']}"
              if provenance.get("package") else f"file {provenance.get('path', '?')}")
    lines = [
        f"# What each method costs on a real model: {model}",
        "",
        f"Generated from [`baselines/{key}/{model}.json`](../baselines/{key}/{model}.json) by "
        f"`quantbench real-model {key} {model} --out docs/real-model.md`; tests/test_docs.py checks that this "
        "page is what the command writes from the committed file. Do not edit it by hand.",
        "",
        f"- weights: {origin}, sha256 `{provenance.get('gguf_sha256', '?')}`; "
        f"{provenance.get('weights', provenance.get('source', '?'))}",
        f"- accuracy: perplexity over {protocol.get('scored_tokens', '?')} held-out tokens of the corpus "
        f"(harness/corpus.py) in the model's own tokens, {accuracy.get('context_tokens')}-token windows, "
        f"stride {accuracy.get('stride')}; KL divergence and top-1 agreement against "
        f"{reference.get('method', 'the reference')}; batch consistency of greedy tokens, batched and alone",
        f"- speed and memory: batch size {size}, {first.config['run']['prompt_tokens']}-token prompts, "
        f"{first.config['run']['new_tokens']} new tokens, on {key}; the median of the timed repeats and their "
        "spread",
        "",
        *_real_model_table(by_method, size, REAL_MODEL_COLUMNS),
    ]
    return "\n".join(lines) + "\n"


def _real_model_cells(store: BaselineStore, key: str, model: str) -> tuple[dict[str, dict[int | None, Any]], int]:
    """The stored cells of `model` on `key` by method and batch size, and the smallest batch size."""
    path = store.path(key, model)
    if not path.is_file():
        raise KeyError(f"no baselines for {model} on {key}: {path} does not exist")
    by_method = _cells_by_method(store.load(key, model))
    sizes = sorted({b for cells in by_method.values() for b in cells if b is not None})
    if not sizes or not any(None in cells for cells in by_method.values()):
        raise KeyError(f"{path}: no method has both its per-model and batch-size cells")
    return by_method, sizes[0]


def _real_model_table(by_method: dict[str, dict[int | None, Any]], size: int, columns: Any) -> list[str]:
    """A markdown table, a row per method with its per-model cell, in order of KL divergence."""
    lines = ["| method | " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for method, cells in sorted(by_method.items(), key=lambda item: _figure(item[1].get(None), "kld_mean") or 0):
        if None in cells:
            lines.append("| " + " | ".join([method] + [value(cells[None], cells.get(size)) for _, value in columns])
                         + " |")
    return lines
