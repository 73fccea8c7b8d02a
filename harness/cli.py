"""Command line (`quantbench ...` or `python -m harness.cli ...`).

compare, report, real-model, import-results, gate, calibrate, history, keys, build-*.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.baselines import BaselineStore
from harness.config import parse_cell_id
from harness.gate import GateReport, add_gate_options

NOTHING_COMPARED = 3  # `quantbench gate`'s exit status when no figure could be held against a baseline


def build_parser() -> argparse.ArgumentParser:
    """The `quantbench` argument parser: every subcommand and its options (docs/cli.md describes them)."""
    parser = argparse.ArgumentParser(prog="quantbench", description=__doc__)
    parser.add_argument("--baselines-dir", default="baselines", help="the baseline store (default: baselines)")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="per-cell ratios between two hardware keys' baselines")
    cmp.add_argument("key_a")
    cmp.add_argument("key_b")
    cmp.add_argument("--metrics", default=None, help="comma-separated metrics to show (default: all)")
    rep = sub.add_parser("report", help="markdown and self-contained HTML with plots for one or more hardware keys")
    rep.add_argument("keys", nargs="+", help="hardware keys; with two or more, the first two are compared")
    rep.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: report)")
    real = sub.add_parser("real-model", help="the markdown page of what each method costs on one model (accuracy, "
                          "speed, memory), from its stored baselines on one hardware key (docs/real-model.md)")
    real.add_argument("key", help="hardware key, e.g. cpu-amd-epyc-avx2-2c")
    real.add_argument("model", help="model name, e.g. smollm2-135m")
    real.add_argument("--out", type=Path, default=None, help="write the page here (default: print it)")
    real.add_argument("--readme", type=Path, default=None, help="also rewrite the short accuracy table between "
                      "the real-model markers of this README")
    imp = sub.add_parser("import-results", help="merge the figures of a run's results file (*.jsonl) into the "
                         "baselines of the hardware that produced them")
    imp.add_argument("results", nargs="+", type=Path)
    imp.add_argument("--pool", action="store_true",
                     help="pool each repeated figure's samples with the stored baseline's instead of replacing it "
                          "(baselines that span several runners or days of one hardware key)")
    gate = sub.add_parser("gate", help="judge a run's results files (*.jsonl) again, offline, against the baselines "
                          "of the hardware key the run gated under, as the live run judged them; exit 1 on any "
                          f"failure, {NOTHING_COMPARED} when nothing could be compared")
    gate.add_argument("results", nargs="+", type=Path)
    gate.add_argument("--matrix", type=Path, default=Path("benchmarks/matrix.toml"),
                      help="the matrix whose suites' tolerances apply (default: benchmarks/matrix.toml)")
    gate.add_argument("--failures-only", action="store_true", help="print only what failed")
    add_gate_options(gate.add_argument)  # as the pytest plugin declares them
    cal = sub.add_parser("calibrate", help="how the gate told noise from an injected slowdown, per cell and device "
                         "figure, from a recording, A/A gates on other leases and an injected gate (JSON)")
    cal.add_argument("--record", nargs="+", type=Path, required=True,
                     help="results files of the recording (--update-baselines --processes N)")
    cal.add_argument("--aa", nargs="+", type=Path, action="append", default=[],
                     help="results files of one gate of unchanged code; repeat the option for each gate")
    cal.add_argument("--injected", nargs="+", type=Path, default=[],
                     help="results files of a gate run with --inject-device-slowdown")
    cal.add_argument("--matrix", type=Path, default=Path("benchmarks/matrix.toml"),
                     help="the matrix whose suites' tolerances apply (default: benchmarks/matrix.toml)")
    cal.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print it)")
    hist = sub.add_parser("history", help="every recording of one cell's figure in the git history of its "
                          "baseline file, and how far apart they lie against their own spreads")
    hist.add_argument("key", help="hardware key, e.g. nvidia-h200-140gb")
    hist.add_argument("cell", help="cell id, e.g. 'fp16-compiled|llama-2-7b-arch|b1'")
    hist.add_argument("--metric", default="decode_tokens_per_s", help="default: decode_tokens_per_s")
    bw = sub.add_parser("bandwidth", help="measure the GPU's memory bandwidth (device-to-device copy), the "
                        "ceiling of the report's roofline figures")
    bw.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is visible)")
    bw.add_argument("--size-mib", type=int, default=2048, help="bytes copied per repeat, in MiB (default 2048)")
    bw.add_argument("--repeats", type=int, default=20, help="timed copies (default 20)")
    bw.add_argument("--write", action="store_true",
                    help="store it under <baselines-dir>/<hardware key>/hardware/memory-bandwidth.json")
    run = sub.add_parser("run", help="run a matrix suite's cells without pytest, write the results file and gate "
                         "every figure as the pytest run does (for scripts)")
    run.add_argument("--matrix", type=Path, default=Path("benchmarks") / "matrix.toml",
                     help="the matrix file (default: benchmarks/matrix.toml)")
    run.add_argument("--suite", default="cpu", help="the matrix suite to run (default: cpu)")
    run.add_argument("--models", default=None, help="comma-separated model names to keep")
    run.add_argument("--methods", default=None, help="comma-separated method names to keep")
    run.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes to keep")
    run.add_argument("--results-dir", type=Path, default=Path("results"), help="where results go (default: results)")
    run.add_argument("--processes", type=int, default=None, metavar="N",
                     help="measure each (method, model) in N processes and pool their samples")
    run.add_argument("--update-baselines", action="store_true", help="store this run's figures as baselines")
    run.add_argument("--pool-baselines", action="store_true",
                     help="with --update-baselines: pool the run's samples into the stored baselines")
    run.add_argument("--recheck", action="store_true", help="measure a cell again when a speed regresses")
    run.add_argument("--failures-only", action="store_true", help="print only the checks that failed")
    add_gate_options(run.add_argument)  # --strict-baselines, --fail-unresolved, --tolerance, --hardware-key
    sub.add_parser("keys", help="list the hardware keys with baselines, and this machine's keys")
    sub.add_parser("build-embedded", help="build (or find cached) the embedded model and print its folder")
    syn = sub.add_parser("build-synthetic", help="build (or find cached) synthetic weights for an architecture")
    syn.add_argument("arch")
    syn.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = BaselineStore(Path(args.baselines_dir))
    if args.command == "compare":
        from harness.report import compare_hardware

        metrics = args.metrics.split(",") if args.metrics else None
        try:
            print(compare_hardware(store, args.key_a, args.key_b, metrics))
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
    elif args.command == "report":
        from harness.report import write_report

        try:
            for path in write_report(store, args.keys, args.out):
                print(path)
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
    elif args.command == "real-model":
        from harness.report import real_model_page

        try:
            page = real_model_page(store, args.key, args.model)
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
        if args.readme:
            from harness.report import real_model_summary, with_readme_summary

            try:
                text = with_readme_summary(args.readme.read_text(encoding="utf-8"),
                                           real_model_summary(store, args.key, args.model))
            except (KeyError, OSError) as exc:
                print(f"error: {args.readme}: {exc.args[-1] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
                return 2
            args.readme.write_text(text, encoding="utf-8")
            print(args.readme)
        if args.out:
            args.out.write_text(page, encoding="utf-8")
            print(args.out)
        elif not args.readme:
            print(page, end="")
    elif args.command == "import-results":
        from harness.baselines import BaselineError
        from harness.gate import import_results

        try:
            for path, written in import_results(store, args.results, pool=args.pool).items():
                print(f"{path}: {len(written)} baseline file(s) updated: {', '.join(map(str, written))}")
        except (BaselineError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.command == "gate":
        return gate(store, args)
    elif args.command == "run":
        return run_suite(store, args)
    elif args.command == "calibrate":
        import json

        from harness.baselines import BaselineError
        from harness.calibration import calibrate
        from harness.config import MatrixError
        from harness.matrix import load_matrix

        try:
            document = calibrate(store, load_matrix(args.matrix), args.record, args.aa, args.injected)
        except (BaselineError, MatrixError, ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        text = json.dumps(document, indent=1)
        if args.out:
            args.out.write_text(text + "\n")
            print(args.out)
        else:
            print(text)
    elif args.command == "history":
        from harness.baselines import BaselineError
        from harness.history import HistoryError, describe, figure_history

        try:
            _, model, _ = parse_cell_id(args.cell)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            recordings = figure_history(store.path(args.key, model), args.cell, args.metric)
        except (BaselineError, HistoryError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(describe(recordings, args.cell, args.metric))
        return 0 if recordings else 1
    elif args.command == "bandwidth":
        import json

        from harness.hardware import environment, gpu_info, hardware_key, machine_info
        from harness.measure.bandwidth import measure_bandwidth, write_bandwidth

        device = args.device or ("cuda" if gpu_info() else "cpu")
        try:
            measured = measure_bandwidth(device, args.size_mib, repeats=args.repeats)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        key = hardware_key(device)
        print(json.dumps({"hardware_key": key, **{k: v for k, v in measured.items() if k != "samples_bytes_per_s"}},
                         indent=2))
        print(f"{key}: {measured['bytes_per_s'] / 1e9:.0f} GB/s (±{100 * measured['spread']:.1f}%)")
        if args.write:
            print(write_bandwidth(store.root, key, measured, machine_info(device), environment()))
    elif args.command == "keys":
        from harness.hardware import gpu_info, hardware_key

        print("stored:", ", ".join(store.hardware_keys()) or "(none)")
        print("this machine:", hardware_key("cpu"), *([hardware_key("cuda")] if gpu_info() else []))
    elif args.command == "build-embedded":
        from harness.embedded import build

        print(build())
    elif args.command == "build-synthetic":
        from harness.models import synthetic_folder

        print(synthetic_folder(args.arch, args.seed))
    return 0


def _option(args: argparse.Namespace) -> Callable[[str], Any]:
    """The options of `args` read by their pytest names (`--strict-baselines`), as the gate's policy reads them;
    an option the subcommand lacks reads None."""
    return lambda name: getattr(args, name[2:].replace("-", "_"), None)


def gate(store: BaselineStore, args: argparse.Namespace) -> int:
    """`quantbench gate`: print each verdict's lines and the tallies; the exit status says how it ended."""
    from harness.baselines import BaselineError
    from harness.config import MatrixError
    from harness.gate import GatePolicy, replay
    from harness.matrix import load_matrix

    try:
        matrix = load_matrix(args.matrix)
        policy = GatePolicy.from_options(_option(args), matrix)
        report = replay(store, args.results, matrix, policy, hardware_key=args.hardware_key)
    except (BaselineError, MatrixError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return print_report(report, args.failures_only)


def print_report(report: GateReport, failures_only: bool, recording: bool = False) -> int:
    """Print a gate report's lines and tallies; the exit status says how it ended (`recording`: comparing
    nothing is what a recording does, not a failure)."""
    for line in report.notices:
        print(line)
    for line in report.lines:
        if not failures_only or line.startswith("FAIL"):
            print(line)
    print(f"{report.failures} failure(s) in {len(report.lines)} check(s)")
    if report.noisy:
        print(report.noisy)
    if report.failures:
        return 1
    if report.nothing_compared and not recording:
        print(report.nothing_compared)
        return NOTHING_COMPARED
    return 0


def run_suite(store: BaselineStore, args: argparse.Namespace) -> int:
    """`quantbench run`: the suite's cells through harness/runner.py, judged as `quantbench gate` judges; the
    exit status is the gate's (1: something failed, 2: bad input, 3: nothing was compared)."""
    from harness.config import MatrixError
    from harness.gate import GatePolicy
    from harness.matrix import load_matrix
    from harness.runner import Runner, RunOptions, run_cells

    def names(value: str | None, cast: type = str) -> list | None:
        return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None

    try:
        matrix = load_matrix(args.matrix)
        if args.suite not in matrix.suites:
            raise ValueError(f"--suite: {matrix.path} has no suite {args.suite!r} (suites: {', '.join(matrix.suites)})")
        cells = [cell for cell in matrix.cells(names(args.models), names(args.methods), names(args.batch_sizes, int))
                 if cell.suite.name == args.suite]
        policy = GatePolicy.from_options(_option(args), matrix)
        runner = Runner(matrix, store, args.results_dir, policy, RunOptions.from_options(_option(args)))
    except (MatrixError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cells:
        print(f"error: no cells of suite {args.suite!r} left after the filters", file=sys.stderr)
        return 2
    report = run_cells(runner, cells)
    print(f"results: {runner.results_path}")
    return print_report(report, args.failures_only, recording=args.update_baselines)


if __name__ == "__main__":
    sys.exit(main())
