"""The pytest plugin end to end: parametrized ids, baselines written, the gate passing and failing."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

MATRIX = """
[run]
prompt_tokens = 8
new_tokens = 6
warmup = 1
repeats = 3
cell_timeout_s = 120
[accuracy]
context_tokens = 32
stride = 32
max_eval_tokens = 96
[models.tiny]
source = "synthetic"
arch = "tiny-test"
[methods.fp32]
backend = "torch"
dtype = "float32"
[suites.cpu]
reference = "fp32"
models = ["tiny"]
methods = ["fp32"]
batch_sizes = [1]
[suites.cpu.tolerances]
decode_tokens_per_s = 0.5
prefill_tokens_per_s = 0.9
ttft_ms = 9.0
"""


@pytest.fixture
def suite(pytester, worker_env, monkeypatch):
    """A pytester project with the real benchmark file, a tiny matrix and its own baseline store."""
    for name, value in worker_env.items():
        monkeypatch.setenv(name, value)
    shutil.copy(ROOT / "benchmarks" / "test_matrix.py", pytester.path / "test_matrix.py")
    (pytester.path / "matrix.toml").write_text(MATRIX)

    def run(*args):
        return pytester.runpytest_subprocess(
            "--matrix", "matrix.toml", "--baselines-dir", "baselines", "--results-dir", "results",
            "-p", "no:cacheprovider", "--benchmark-disable", *args)

    return run


def baseline_files(path):
    return sorted(path.glob("baselines/*/*.json"))


# Stored figures that any run of the tiny cell beats however busy the machine is (speeds near zero, times of
# hours): a test that needs its speeds to pass gates against these, so its verdict never depends on a
# measured speed. A test that needs a regression stores a speed no run reaches instead (a decode slowed by
# 150 ms per token makes at most 1 / 0.15 s = 6.7 tokens/s).
ANY_RUN_BEATS = {"decode_tokens_per_s": 1e-3, "prefill_tokens_per_s": 1e-3, "ttft_ms": 1e9, "load_s": 1e6}
NO_SLOWED_RUN_REACHES = {"decode_tokens_per_s": 1000.0}


def pin_figures(path, values, cells=None):
    """Store `values` (metric -> value, no spread) for those metrics of every cell (or of `cells`) in `path`."""
    stored = json.loads(path.read_text())
    for key, cell in stored["cells"].items():
        for name, value in values.items():
            if name in cell["figures"] and (cells is None or key in cells):
                figure = cell["figures"][name]
                figure.update(value=value, spread=0.0, samples=[value] * len(figure["samples"]))
    path.write_text(json.dumps(stored))
    return stored


def test_cells_are_parametrized_with_readable_ids_and_markers(suite):
    result = suite("--collect-only", "-q", "-m", "cpu and torch")
    result.stdout.fnmatch_lines(["test_matrix.py::test_decode[[]fp32|tiny|b1[]]",
                                 "test_matrix.py::test_perplexity[[]fp32|tiny[]]"])
    # 8: seven gated tests and test_quantize; the lm-eval test is deselected unless -m names eval, the
    # device-time tests for a CPU suite's cells always
    assert re.search(r"\b8(/\d+)? tests collected", result.stdout.str())
    assert "no tests collected" in suite("--collect-only", "-q", "-m", "gpu").stdout.str()


def test_record_then_gate_then_catch_a_slowdown(suite, pytester):
    recorded = suite("--update-baselines")
    recorded.assert_outcomes(passed=7, skipped=1)  # torch weights are not quantized: no quantize figures
    files = baseline_files(pytester.path)
    assert len(files) == 1 and files[0].name == "tiny.json"
    stored = json.loads(files[0].read_text())
    cell = stored["cells"]["fp32|tiny|b1"]
    assert cell["figures"]["decode_tokens_per_s"]["n"] == 3
    assert cell["config"]["run"]["new_tokens"] == 6
    assert cell["environment"]["packages"]["torch"]
    assert stored["cells"]["fp32|tiny"]["figures"]["kld_mean"]["value"] == 0
    assert stored["cells"]["fp32|tiny"]["figures"]["top1_agreement"]["value"] == 1
    assert cell["hardware"]["hardware_key"] == files[0].parent.name

    pin_figures(files[0], ANY_RUN_BEATS)
    gated = suite()
    gated.assert_outcomes(passed=7, skipped=1)
    assert "ok" in gated.stdout.str()

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    summary = sorted((pytester.path / "results").glob("*-summary.json"))[-1].read_text()
    records = {r["cell"]: r for r in json.loads(summary, parse_constant=strict)["records"]}
    kld = records["fp32|tiny"]["figures"]["kld_mean"]  # the reference against itself: a zero baseline
    assert (kld["baseline"], kld["change"], kld["noise"]) == (0, 0, None) and kld["noise_abs"] > 0

    stored = pin_figures(files[0], NO_SLOWED_RUN_REACHES)
    stored["cells"]["fp32|tiny|b1"]["environment"]["packages"]["torch"] = "2.0.0"  # as if recorded on an older torch
    files[0].write_text(json.dumps(stored))
    before = files[0].read_bytes()
    slowed = suite("--inject-decode-delay-ms", "150", "-k", "test_decode",
                   "--benchmark-enable", "--benchmark-json", str(pytester.path / "bench.json"))
    slowed.assert_outcomes(failed=1)
    # the regressed figure still reaches pytest-benchmark's JSON (its compare tooling sees the regression)
    [bench] = json.loads((pytester.path / "bench.json").read_text())["benchmarks"]
    assert bench["extra_info"]["cell"] == "fp32|tiny|b1" and bench["stats"]["rounds"] == 3
    assert "was not used" not in slowed.stdout.str()
    slowed.stdout.re_match_lines([r".*decode_tokens_per_s of fp32\|tiny\|b1 regressed \d+\.\d% \(baseline .* "
                                  r"tokens/s, measured .* tokens/s; tolerance 50\.0%, noise .*\)",
                                  r".*fp32\|tiny\|b1: the baseline's run differed in: torch 2\.0\.0 -> \d.*"])
    assert files[0].read_bytes() == before


def test_processes_pool_every_process_into_the_baseline_and_a_one_process_gate_still_compares(suite, pytester):
    suite("--update-baselines", "-k", "test_decode", "--processes", "2").assert_outcomes(passed=1)
    [path] = baseline_files(pytester.path)
    stored = json.loads(path.read_text())["cells"]["fp32|tiny|b1"]
    assert stored["figures"]["decode_tokens_per_s"]["n"] == 6  # 3 repeats in each of 2 processes
    assert stored["details"]["pooled_runs"] == 2 and stored["config"]["run"]["processes"] == 2
    [results] = (pytester.path / "results").glob("*.jsonl")  # each process's own figures, one record each
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["cell"] for r in records] == ["cpu:fp32|tiny"] * 2
    assert [r["results"][1]["figures"]["decode_tokens_per_s"]["n"] for r in records] == [3, 3]
    # the matrix's one process against a two-process baseline; what is checked is that they compare, so the
    # stored speeds are ones any run beats, and the tolerances wide
    pin_figures(path, ANY_RUN_BEATS)
    gated = suite("-k", "test_decode", "--tolerance", "decode_tokens_per_s=0.99",
                  "--tolerance", "prefill_tokens_per_s=0.99")
    gated.assert_outcomes(passed=1)
    assert "measured differently" not in gated.stdout.str()
    suite("--processes", "0").stderr.fnmatch_lines(["*--processes: must be 1 or more, got 0*"])


def test_pool_baselines_adds_a_run_to_the_stored_baseline_instead_of_replacing_it(suite, pytester):
    suite("--update-baselines", "-k", "test_decode").assert_outcomes(passed=1)
    suite("--update-baselines", "--pool-baselines", "-k", "test_decode").assert_outcomes(passed=1)
    [path] = baseline_files(pytester.path)
    stored = json.loads(path.read_text())["cells"]["fp32|tiny|b1"]
    assert stored["figures"]["decode_tokens_per_s"]["n"] == 6 and stored["details"]["pooled_runs"] == 2
    assert len(stored["details"]["pooled_from"]) == 2
    suite("--pool-baselines").stderr.fnmatch_lines(["*--pool-baselines * needs --update-baselines*"])


def test_a_later_process_that_fails_fails_the_cell_without_the_earlier_figures(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from harness import plugin, runner
    from harness.figure import Figure
    from harness.isolation import Outcome
    from harness.results import CellResult

    (tmp_path / "matrix.toml").write_text(MATRIX)
    options = {"--matrix": str(tmp_path / "matrix.toml"), "--results-dir": str(tmp_path / "results"),
               "--processes": 3}
    session = plugin.QuantBench(SimpleNamespace(rootpath=tmp_path, getoption=options.get))
    [cell] = session.cells()

    def measured(decode):
        return Outcome("ok", results=[CellResult("fp32", "tiny", 1, {"decode_tokens_per_s": Figure.of(decode)})])

    runs = iter([measured([10.0, 11.0]), measured([12.0, 13.0]), Outcome("crashed", "killed by signal SIGSEGV")])
    monkeypatch.setattr(runner, "run_isolated", lambda job, timeout_s, env: next(runs))
    outcome = session.runner._measure(cell, {"run": {"processes": 3}}, {})
    # the first processes' results stay, each carrying why the cell failed (the policy a results file is read with)
    why = "process 3 of 3: worker crashed: killed by signal SIGSEGV"
    assert (outcome.status, outcome.reason) == ("crashed", why)
    assert [r.error for r in outcome.results] == [why]
    [results] = (tmp_path / "results").glob("*.jsonl")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["role"], r["status"]) for r in records] == [("process", "ok"), ("process", "ok"), ("process", "crashed")]

    runs = iter([measured([10.0, 11.0]), measured([12.0, 13.0])])
    pooled = session.runner._measure(cell, {"run": {"processes": 2}}, {})
    figure = pooled.result(1).figures["decode_tokens_per_s"]
    assert pooled.status == "ok" and figure.n == 4 and figure.value == 11.5


def test_recheck_measures_a_regressed_cell_again_and_a_real_slowdown_still_fails(suite, pytester):
    suite("--update-baselines", "-k", "test_decode").assert_outcomes(passed=1)
    [path] = baseline_files(pytester.path)
    pin_figures(path, NO_SLOWED_RUN_REACHES)
    slowed = suite("--inject-decode-delay-ms", "150", "-k", "test_decode", "--recheck")
    slowed.assert_outcomes(failed=1)
    slowed.stdout.re_match_lines([r".*decode_tokens_per_s of fp32\|tiny\|b1 regressed .* \(pooled over a recheck\)"])
    results = pytester.path / "results"
    last = sorted(results.glob("*.jsonl"))[-1]  # the gating run's (run ids sort by time; -main or -gwN)
    assert [(json.loads(line)["cell"], json.loads(line)["role"]) for line in last.read_text().splitlines()] == [
        ("cpu:fp32|tiny", "process"), ("cpu:fp32|tiny", "recheck")]
    summary = json.loads(sorted(results.glob("*-summary.json"))[-1].read_text())
    decode = next(r for r in summary["records"] if r["cell"] == "fp32|tiny|b1")
    assert decode["figures"]["decode_tokens_per_s"]["n"] == 6 and decode["rechecked"]


def test_a_recheck_pools_every_batch_size_of_the_cell_whichever_test_runs_first(suite, pytester):
    (pytester.path / "matrix.toml").write_text(MATRIX.replace("batch_sizes = [1]", "batch_sizes = [1, 2]"))
    suite("--update-baselines", "-k", "test_decode").assert_outcomes(passed=2)
    [path] = baseline_files(pytester.path)
    pin_figures(path, ANY_RUN_BEATS, cells=["fp32|tiny|b1"])
    pin_figures(path, {"decode_tokens_per_s": 1e9}, cells=["fp32|tiny|b2"])  # b2 "regresses" on any machine
    gated = suite("-k", "test_decode", "--recheck")
    gated.stdout.re_match_lines([r".*decode_tokens_per_s of fp32\|tiny\|b2 regressed .* \(pooled over a recheck\)"])
    summary = json.loads(sorted((pytester.path / "results").glob("*-summary.json"))[-1].read_text())
    records = {r["cell"]: r for r in summary["records"]}
    # b1 is gated first, yet it gates the pooled figures too: one recheck for the whole cell
    assert [records[f"fp32|tiny|b{b}"]["figures"]["decode_tokens_per_s"]["n"] for b in (1, 2)] == [6, 6]
    assert records["fp32|tiny|b1"]["rechecked"] == records["fp32|tiny|b2"]["rechecked"]
    last = sorted((pytester.path / "results").glob("*.jsonl"))[-1]  # the gating run's: measured, then rechecked
    assert [json.loads(line)["cell"] for line in last.read_text().splitlines()] == ["cpu:fp32|tiny"] * 2


def test_a_memory_figure_read_another_way_fails_while_the_cells_speeds_still_gate(suite, pytester):
    suite("--update-baselines", "-k", "test_memory or test_decode").assert_outcomes(passed=2)
    [path] = baseline_files(pytester.path)
    stored = pin_figures(path, ANY_RUN_BEATS)  # the speeds gate as usual, whatever this machine's load
    stored["cells"]["fp32|tiny|b1"]["details"]["memory_protocol"] = 0  # recorded by an older tracker
    path.write_text(json.dumps(stored))
    # on the CPU no figure depends on the protocol; let peak RSS stand in for the GPU's NVML figure
    (pytester.path / "conftest.py").write_text(
        "import harness.baselines\nharness.baselines.PROTOCOL_METRICS = ('peak_rss_mib',)\n")
    gated = suite("-k", "test_memory or test_decode")
    gated.assert_outcomes(passed=1, failed=1)
    gated.stdout.re_match_lines([r".*fp32\|tiny\|b1: peak_rss_mib of the baseline in .*tiny\.json was read another "
                                 r"way \(details\.memory_protocol: baseline 0, now 1; .*\); re-record it"])
    summary = json.loads(sorted((pytester.path / "results").glob("*-summary.json"))[-1].read_text())
    statuses = sorted(r["status"] for r in summary["records"] if r["cell"] == "fp32|tiny|b1")
    assert statuses == ["incomparable", "ok"]  # memory (stale), decode (gated as usual)
    assert json.loads(path.read_text()) == stored  # nothing written


def test_a_figure_whose_spreads_hide_its_tolerance_is_counted_and_fails_only_when_asked(suite, pytester):
    suite("--update-baselines", "-k", "test_decode").assert_outcomes(passed=1)
    [path] = baseline_files(pytester.path)
    stored = json.loads(path.read_text())
    decode = stored["cells"]["fp32|tiny|b1"]["figures"]["decode_tokens_per_s"]
    decode["spread"] = decode["value"]  # a baseline as noisy as a busy shared host makes it: noise > 50 %
    path.write_text(json.dumps(stored))

    passed = suite("-k", "test_decode")
    passed.assert_outcomes(passed=1)
    passed.stdout.fnmatch_lines(["*fp32|tiny|b1*decode_tokens_per_s*ok (noise > tolerance)*",
                                 "1 of 1 check(s) passed with spreads wider than their tolerance "
                                 "(decode_tokens_per_s 1/1)*"])

    failed = suite("-k", "test_decode", "--fail-unresolved")
    failed.assert_outcomes(failed=1)
    failed.stdout.re_match_lines([r".*decode_tokens_per_s of fp32\|tiny\|b1 cannot be gated at 50\.0%: the spreads "
                                  r"of baseline and run let a regression of up to \d+\.\d% pass .*quieter host"])
    summary = json.loads(sorted((pytester.path / "results").glob("*-summary.json"))[-1].read_text())
    [record] = [r for r in summary["records"] if r["cell"] == "fp32|tiny|b1"]
    assert (record["status"], record["unresolved"]) == ("unresolved", ["decode_tokens_per_s"])
    assert record["figures"]["decode_tokens_per_s"]["noise"] > 0.5
    assert json.loads(path.read_text()) == stored  # nothing written


def test_a_slowed_run_can_never_become_a_baseline(suite):
    result = suite("--update-baselines", "--inject-decode-delay-ms", "5")
    assert "cannot be combined with --update-baselines" in result.stderr.str()
    assert result.ret != 0


def test_a_missing_baseline_is_reported_and_fails_only_when_strict(suite, pytester):
    lenient = suite("-k", "test_perplexity")
    lenient.assert_outcomes(passed=1)
    assert "have no baseline for this hardware" in lenient.stdout.str()
    strict = suite("-k", "test_perplexity", "--strict-baselines")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*fp32|tiny: no baseline in *tiny.json; record one with --update-baselines*"])
    assert baseline_files(pytester.path) == []


def test_a_corrupt_baseline_fails_with_its_file_named_and_is_never_overwritten(suite, pytester):
    suite("--update-baselines", "-k", "test_perplexity").assert_outcomes(passed=1)
    [path] = baseline_files(pytester.path)
    data = json.loads(path.read_text())
    data["cells"]["fp32|tiny"]["figures"]["ppl"]["value"] = "high"
    path.write_text(json.dumps(data))
    corrupt = path.read_bytes()

    gated = suite("-k", "test_perplexity")
    gated.assert_outcomes(failed=1)
    assert f"{path.name}: cells['fp32|tiny'].figures.ppl.value: expected a number, got 'high'" in gated.stdout.str()
    updating = suite("-k", "test_perplexity", "--update-baselines")
    updating.assert_outcomes(failed=1)
    updating.stdout.fnmatch_lines(["*baselines not updated*expected a number*"])
    assert path.read_bytes() == corrupt


def test_bad_command_line_input_is_a_usage_error(suite):
    result = suite("--methods", "fp64")
    assert "--methods: unknown name(s) fp64" in result.stderr.str()
    result = suite("--tolerance", "speed=0.1")
    assert "speed" in result.stderr.str() and result.ret != 0


def test_the_matrix_spreads_over_xdist_workers_and_merges_one_store(suite, pytester):
    matrix = pytester.path / "matrix.toml"
    matrix.write_text(MATRIX.replace('methods = ["fp32"]', 'methods = ["fp32", "bf16"]')
                      + '[methods.bf16]\nbackend = "torch"\ndtype = "bfloat16"\n')
    result = suite("-n", "2", "--dist", "loadgroup", "--update-baselines")
    result.assert_outcomes(passed=14, skipped=2)
    [path] = baseline_files(pytester.path)
    assert sorted(json.loads(path.read_text())["cells"]) == [
        "bf16|tiny", "bf16|tiny|b1", "fp32|tiny", "fp32|tiny|b1"]
    # the controller's summary sees the figures of both workers
    assert "bf16|tiny|b1" in result.stdout.str() and "fp32|tiny|b1" in result.stdout.str()
    # each worker's cells ran on its own half of the CPUs, and their figures say so
    cpus = len(os.sched_getaffinity(0))
    shares = {cell["hardware"]["cpu_affinity"] for cell in json.loads(path.read_text())["cells"].values()}
    assert shares <= {cpus // 2, (cpus + 1) // 2}, shares


def test_a_baseline_measured_differently_is_refused_not_compared(suite, pytester):
    suite("--update-baselines", "-k", "test_perplexity").assert_outcomes(passed=1)
    matrix = pytester.path / "matrix.toml"
    matrix.write_text(MATRIX.replace("context_tokens = 32\nstride = 32", "context_tokens = 32\nstride = 16"))
    result = suite("-k", "test_perplexity")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*fp32|tiny: the baseline in *tiny.json was measured differently "
                                 "(config.accuracy.stride: baseline 32, now 16); re-record it with --update-baselines"])


def test_task_accuracy_runs_only_when_asked_and_says_why_it_cannot(suite):
    assert "test_task_accuracy" not in suite("--collect-only", "-q", "-m", "cpu").stdout.str()
    result = suite("-m", "cpu and eval", "-rs")
    result.assert_outcomes(skipped=1)
    # the synthetic model has no tokenizer; without lm-eval installed the reason names the extra instead
    assert re.search(r"fp32\|tiny: task accuracy not measured: (lm-eval is not installed|.*no tokenizer)",
                     result.stdout.str())
