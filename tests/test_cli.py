"""The command line: hardware comparison and importing a run's results into baselines."""

import json

import pytest

from harness.baselines import BaselineStore
from harness.cli import NOTHING_COMPARED, main
from harness.config import ModelSpec
from harness.figure import Figure
from harness.models import ModelError, resolve
from harness.results import CellResult


def cell(method, key, decode, batch_size=1, delay=0):
    return CellResult(method=method, model="m", batch_size=batch_size,
                      figures={"decode_tokens_per_s": Figure(decode, 1.0, 3, (decode - 1, decode, decode + 1))},
                      config={"inject_decode_delay_ms": delay}, hardware={"hardware_key": key})


def test_compare_prints_per_cell_ratios_between_two_keys(tmp_path, capsys):
    store = BaselineStore(tmp_path)
    store.merge("gpu-a", [cell("fp16", "gpu-a", 100.0), cell("nf4", "gpu-a", 50.0)])
    store.merge("gpu-b", [cell("fp16", "gpu-b", 150.0)])
    assert main(["--baselines-dir", str(tmp_path), "compare", "gpu-a", "gpu-b"]) == 0
    out = capsys.readouterr().out
    assert "fp16|m|b1" in out and "1.500" in out
    assert "nf4" not in out


def test_compare_names_an_unknown_key(tmp_path, capsys):
    BaselineStore(tmp_path).merge("gpu-a", [cell("fp16", "gpu-a", 100.0)])
    assert main(["--baselines-dir", str(tmp_path), "compare", "gpu-a", "gpu-z"]) == 2
    assert "no baselines for hardware key 'gpu-z'" in capsys.readouterr().err


def write_results(path, results):
    path.write_text(json.dumps({"cell": "x", "status": "ok", "results": [r.to_dict() for r in results]}) + "\n")


def test_import_results_merges_under_the_key_that_measured_them(tmp_path):
    results = tmp_path / "run.jsonl"
    write_results(results, [cell("fp16", "gpu-a", 100.0), cell("fp16", "gpu-b", 120.0)])
    assert main(["--baselines-dir", str(tmp_path / "bl"), "import-results", str(results)]) == 0
    store = BaselineStore(tmp_path / "bl")
    assert store.hardware_keys() == ["gpu-a", "gpu-b"]
    assert store.load("gpu-b", "m")["fp16|m|b1"].figures["decode_tokens_per_s"].value == 120.0


def test_import_results_pools_a_cell_that_several_processes_measured(tmp_path):
    results = tmp_path / "run.jsonl"
    with open(results, "w") as handle:  # one record per process, as `run.processes = 2` writes them
        for decode in (100.0, 130.0):
            handle.write(json.dumps({"cell": "x", "role": "process", "status": "ok",
                                     "results": [cell("fp16", "gpu-a", decode).to_dict()]}) + "\n")
    assert main(["--baselines-dir", str(tmp_path / "bl"), "import-results", str(results)]) == 0
    stored = BaselineStore(tmp_path / "bl").load("gpu-a", "m")["fp16|m|b1"]
    decode = stored.figures["decode_tokens_per_s"]
    assert decode.n == 6 and decode.value == 115.0 and decode.spread > 14  # both processes, not the last one
    assert stored.details["pooled_runs"] == 2


def test_import_results_pool_adds_the_run_to_the_stored_baseline(tmp_path):
    results = tmp_path / "run.jsonl"
    write_results(results, [cell("fp16", "gpu-a", 100.0)])
    assert main(["--baselines-dir", str(tmp_path / "bl"), "import-results", str(results)]) == 0
    write_results(results, [cell("fp16", "gpu-a", 130.0)])  # another runner of the same key
    assert main(["--baselines-dir", str(tmp_path / "bl"), "import-results", "--pool", str(results)]) == 0
    stored = BaselineStore(tmp_path / "bl").load("gpu-a", "m")["fp16|m|b1"]
    assert stored.figures["decode_tokens_per_s"].n == 6 and stored.figures["decode_tokens_per_s"].value == 115.0
    assert stored.details["pooled_runs"] == 2


def test_import_results_refuses_a_slowed_run_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "run.jsonl"
    write_results(results, [cell("fp16", "gpu-a", 100.0, delay=5)])
    assert main(["--baselines-dir", str(tmp_path / "bl"), "import-results", str(results)]) == 2
    assert "made worse on purpose" in capsys.readouterr().err
    assert not (tmp_path / "bl").exists() or BaselineStore(tmp_path / "bl").hardware_keys() == []


def test_import_results_names_a_broken_line(tmp_path, capsys):
    results = tmp_path / "run.jsonl"
    results.write_text("{not json\n")
    assert main(["--baselines-dir", str(tmp_path), "import-results", str(results)]) == 2
    assert "run.jsonl:1: not a quantbench results record" in capsys.readouterr().err


@pytest.mark.parametrize("version", [2, 0, "1", True])
def test_import_results_refuses_another_results_version_naming_the_line(tmp_path, capsys, version):
    results = tmp_path / "run.jsonl"
    write_results(results, [cell("fp16", "gpu-a", 100.0)])  # line 1: no schema_version, read as version 1
    record = {"schema_version": version, "cell": "x", "status": "ok", "results": [cell("fp16", "gpu-b", 1.0).to_dict()]}
    with open(results, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    assert main(["--baselines-dir", str(tmp_path / "bl"), "import-results", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"run.jsonl:2: field 'schema_version' is {version!r}; this suite reads results files of version 1" in err
    assert not (tmp_path / "bl").exists() or BaselineStore(tmp_path / "bl").hardware_keys() == []


def test_a_hub_model_that_cannot_be_reached_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="model 'llama': hub id 'meta-llama/Llama-2-7b-hf' could not be resolved"):
        resolve(ModelSpec(name="llama", source="hub", hub_id="meta-llama/Llama-2-7b-hf"))


def test_the_report_has_tables_and_inline_plots_for_each_key(tmp_path, capsys):
    store = BaselineStore(tmp_path)
    for key, speed in (("gpu-a", 100.0), ("gpu-b", 180.0)):
        results = []
        for method, kld in (("fp16", 0.0), ("nf4", 0.01)):
            per_model = CellResult(method=method, model="m", batch_size=None,
                                   figures={"ppl": Figure(10.0), "kld_mean": Figure(kld)})
            results.append(per_model)
            for batch, factor in ((1, 1), (8, 6)):
                results.append(CellResult(method=method, model="m", batch_size=batch, figures={
                    "decode_tokens_per_s": Figure(speed * factor, 1.0),
                    "peak_vram_mib": Figure(1000.0 if method == "fp16" else 400.0)}))
        store.merge(key, results)
    assert main(["--baselines-dir", str(tmp_path), "report", "gpu-a", "gpu-b", "--out", str(tmp_path / "r")]) == 0
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "### m on gpu-a" in markdown and "| nf4 | 10 | - | 0.01 | - | 100.0 ±1.0% | 600.0 ±0.2% | 400 |" in markdown
    assert "1.800" in markdown  # gpu-b decodes 1.8x faster
    page = (tmp_path / "r" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4  # two plots per key


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    from harness.report import pareto_front

    points = [("fp16", 1000, 0.0), ("nf4", 400, 0.01), ("fp4", 400, 0.02), ("int8", 700, 0.001), ("bad", 900, 0.05)]
    assert pareto_front(points) == ["fp16", "nf4", "int8"]


def test_the_step_summary_lists_every_gated_figure():
    from harness.report import step_summary

    text = step_summary([{"cell": "fp16|m|b1", "status": "regressed",
                          "figures": {"decode_tokens_per_s": {"value": 90.0, "baseline": 100.0, "change": 0.1}}}])
    assert "1 gated results, 1 regressed" in text
    assert "| `fp16|m|b1` | decode_tokens_per_s | 90 | 100 | - | +10.0% | regressed |" in text
    noisy = step_summary([{"cell": "fp16|m|b1", "status": "ok", "unresolved": ["decode_tokens_per_s"],
                           "figures": {"decode_tokens_per_s": {"value": 90.0, "baseline": 100.0, "change": 0.1}}}])
    assert "| +10.0% | ok (noise > tolerance) |" in noisy
    grew = {"value": 12.0, "baseline": 0.0, "change": None}  # no relative change from 0 (null in the JSON)
    from_zero = step_summary([{"cell": "nf4|m|b1", "status": "regressed", "figures": {"quantize_peak_vram_mib": grew}}])
    assert "| 12 | 0 | - | from 0 | regressed |" in from_zero


def gated_cell(decode, key="gpu-a", consistent=True, error=None):
    result = cell("fp16", key, decode)
    result.config["suite"] = "cpu"
    result.details["batch_consistency"] = {"consistent": consistent}
    result.error = error
    return result


@pytest.mark.parametrize(("decode", "consistent", "error", "code", "expected"), [
    (99.0, True, None, 0, "ok   decode_tokens_per_s of fp16|m|b1 worsened 1.0%, within tolerance"),
    # the cpu suite allows 50 % (matrix.toml): 40 tokens/s is a regression, 99 is not
    (40.0, True, None, 1, "FAIL decode_tokens_per_s of fp16|m|b1 regressed 60.0% (baseline 100 tokens/s"),
    (100.0, False, None, 1, "FAIL fp16|m|b1: batched rows differ from rows generated alone"),
    (100.0, True, "out of memory at batch size 1", 1, "FAIL fp16|m|b1: the run failed: out of memory"),
])
def test_gate_holds_a_results_file_against_the_baselines_offline(tmp_path, capsys, decode, consistent, error,
                                                                 code, expected):
    BaselineStore(tmp_path / "bl").merge("gpu-a", [gated_cell(100.0)])
    results = tmp_path / "run.jsonl"
    write_results(results, [gated_cell(decode, consistent=consistent, error=error)])
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == code
    assert expected in capsys.readouterr().out


def test_a_batch_inconsistency_its_baseline_recorded_too_is_known_and_one_that_is_new_fails(tmp_path, capsys):
    store = BaselineStore(tmp_path / "bl")
    store.merge("gpu-a", [gated_cell(100.0, consistent=False)])
    results = tmp_path / "run.jsonl"
    write_results(results, [gated_cell(100.0, consistent=False)])
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == 0
    out = capsys.readouterr().out
    assert "known fp16|m|b1: batched rows differ from rows generated alone (inconsistent as its baseline of gpu-a " \
           "recorded on" in out and "0 failure(s)" in out
    store.merge("gpu-a", [gated_cell(100.0, consistent=True)])  # a consistent baseline: inconsistency is news
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == 1
    assert "FAIL fp16|m|b1: batched rows differ from rows generated alone" in capsys.readouterr().out


def test_gate_fails_a_figure_read_by_another_memory_protocol_and_still_gates_the_rest(tmp_path, capsys):
    old = gated_cell(100.0)
    old.figures["peak_nvml_mib"] = Figure(12856.0)
    BaselineStore(tmp_path / "bl").merge("gpu-a", [old])
    new = gated_cell(40.0)
    new.figures["peak_nvml_mib"] = Figure(14102.0)
    new.details["memory_protocol"] = 2
    results = tmp_path / "run.jsonl"
    write_results(results, [new])
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == 1
    out = capsys.readouterr().out
    assert "FAIL peak_nvml_mib of fp16|m|b1: the baseline was read another way (details.memory_protocol: " \
           "baseline 1, now 2" in out
    assert "FAIL decode_tokens_per_s of fp16|m|b1 regressed 60.0%" in out
    assert "2 failure(s) in" in out and "peak_nvml_mib of fp16|m|b1 regressed" not in out


def test_a_failing_line_of_the_offline_gate_says_what_differed_from_the_baselines_run(tmp_path, capsys):
    old = gated_cell(100.0)
    old.environment = {"packages": {"torch": "2.11.0"}}
    BaselineStore(tmp_path / "bl").merge("gpu-a", [old])
    new = gated_cell(40.0)
    new.environment = {"packages": {"torch": "2.12.0"}}
    results = tmp_path / "run.jsonl"
    write_results(results, [new])
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == 1
    assert "regressed 60.0%" in (out := capsys.readouterr().out)
    assert "; the baseline's run differed in: torch 2.11.0 -> 2.12.0\n" in out


def test_gate_marks_a_figure_whose_spreads_hide_its_tolerance_and_fails_it_only_when_asked(tmp_path, capsys):
    noisy = gated_cell(100.0)
    noisy.figures["decode_tokens_per_s"] = Figure(100.0, spread=40.0)  # noise 2 x hypot(40, 40): 113 %
    BaselineStore(tmp_path / "bl").merge("gpu-a", [noisy])
    results = tmp_path / "run.jsonl"
    measured = gated_cell(80.0)
    measured.figures["decode_tokens_per_s"] = Figure(80.0, spread=40.0)  # 20 % slower: within the noise
    write_results(results, [measured])
    args = ["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "noisy decode_tokens_per_s of fp16|m|b1 worsened 20.0%, within tolerance" in out
    assert "0 failure(s) in 1 check(s)\n1 of 1 check(s) passed with spreads wider than their tolerance " \
           "(decode_tokens_per_s 1/1)" in out
    assert main([*args, "--fail-unresolved"]) == 1
    assert "FAIL decode_tokens_per_s of fp16|m|b1 cannot be gated at 50.0%: the spreads of baseline and run " \
           "let a regression of up to 113.1% pass (this run: +20.0%, + is worse)" in capsys.readouterr().out


def test_gate_reports_a_cell_without_baseline_and_an_unknown_suite(tmp_path, capsys):
    results = tmp_path / "run.jsonl"
    write_results(results, [gated_cell(100.0, key="gpu-new")])
    # not a failure, but no pass either: nothing was compared (exit status NOTHING_COMPARED, saying why)
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == NOTHING_COMPARED
    out = capsys.readouterr().out
    assert "new  fp16|m|b1: no baseline under gpu-new" in out
    assert "nothing was compared: no cell has a baseline under gpu-new" in out
    odd = gated_cell(100.0)
    odd.config["suite"] = "nightly"
    write_results(results, [odd])
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == 2
    assert "measured in suite 'nightly', which" in capsys.readouterr().err


def test_pooling_two_runs_takes_the_median_of_all_repeats_and_keeps_single_figures():
    from harness.results import pool

    first = CellResult(method="fp16", model="m", batch_size=1,
                       figures={"decode_tokens_per_s": Figure.of([100.0, 101.0, 99.0]), "load_s": Figure(2.0)})
    again = CellResult(method="fp16", model="m", batch_size=1,
                       figures={"decode_tokens_per_s": Figure.of([60.0, 61.0, 59.0]), "load_s": Figure(9.0)})
    pooled = pool(first, again)
    decode = pooled.figures["decode_tokens_per_s"]
    assert decode.n == 6 and decode.value == 80.0 and decode.spread > 20
    assert pooled.figures["load_s"].value == 2.0 and pooled.details["pooled_runs"] == 2


def test_gate_pools_a_cell_measured_twice_in_one_run(tmp_path, capsys):
    BaselineStore(tmp_path / "bl").merge("gpu-a", [gated_cell(100.0)])
    results = tmp_path / "run.jsonl"
    first, again = gated_cell(100.0), gated_cell(100.0)
    first.figures["decode_tokens_per_s"] = Figure.of([10.0, 11.0, 12.0])  # a stall in the first run
    again.figures["decode_tokens_per_s"] = Figure.of([100.0, 101.0, 99.0])
    results.write_text("".join(json.dumps({"cell": "x", "status": "ok", "results": [r.to_dict()]}) + "\n"
                               for r in (first, again)))
    main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)])
    out = capsys.readouterr().out
    assert out.count("decode_tokens_per_s of fp16|m|b1") == 1 and "measured 55.5 tokens/s" in out  # median of all six


def write_records(path, *records):
    """A results file of (status, role, results) records of one cell, in the order a run writes them."""
    path.write_text("".join(json.dumps({"cell": "cpu:fp16|m", "status": status, "reason": f"worker {status}",
                                        **({"role": role} if role else {}),
                                        "results": [r.to_dict() for r in results]}) + "\n"
                            for status, role, results in records))


def two_process_cell(decode):
    result = gated_cell(decode)
    result.figures["decode_tokens_per_s"] = Figure.of([decode - 1, decode, decode + 1])
    result.config["run"] = {"processes": 2}
    return result


@pytest.mark.parametrize("role", ["process", None])  # None: a file written before records named their role
def test_a_later_process_that_failed_fails_the_cell_offline_as_in_the_run(tmp_path, capsys, role):
    """`run.processes = 2`: the second process crashed, so the first process's figures must not pass for
    the pooled ones: the offline gate fails every result of the cell and import-results stores none."""
    BaselineStore(tmp_path / "bl").merge("gpu-a", [gated_cell(100.0)])
    results = tmp_path / "run.jsonl"
    write_records(results, ("ok", role, [two_process_cell(100.0)]), ("crashed", role, []))
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == 1
    assert "FAIL fp16|m|b1: the run failed: process 2 of 2: worker crashed: worker crashed" in capsys.readouterr().out
    assert main(["--baselines-dir", str(tmp_path / "new"), "import-results", str(results)]) == 0
    assert not (tmp_path / "new").exists() or BaselineStore(tmp_path / "new").hardware_keys() == []


def test_a_failed_recheck_is_left_out_and_a_good_one_pools(tmp_path, capsys):
    """--recheck in a one-process run: the run gates the first figures when the recheck's worker failed (it
    still fails on them), and the pooled figures when it succeeded; the offline gate reads the same."""
    BaselineStore(tmp_path / "bl").merge("gpu-a", [gated_cell(100.0)])
    results = tmp_path / "run.jsonl"
    slow, again = gated_cell(40.0), gated_cell(100.0)
    slow.figures["decode_tokens_per_s"] = Figure.of([39.0, 40.0, 41.0])
    again.figures["decode_tokens_per_s"] = Figure.of([99.0, 100.0, 101.0])
    write_records(results, ("ok", "process", [slow]), ("timeout", "recheck", [again]))
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == 1
    out = capsys.readouterr().out
    assert "measured 40 tokens/s" in out and "the run failed" not in out
    write_records(results, ("ok", None, [slow]), ("ok", None, [again]))  # the second record, by position a recheck
    main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)])
    assert "measured 70 tokens/s" in capsys.readouterr().out  # median of all six samples


def test_a_worker_that_failed_before_measuring_fails_the_offline_gate(tmp_path, capsys):
    """A preparation or first process that left no result still fails the replay, naming the cell and why;
    a skipped cell does not."""
    results = tmp_path / "run.jsonl"
    write_records(results, ("error", "prepare", []))
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == 1
    assert "FAIL cpu:fp16|m: the run failed: worker error: worker error" in capsys.readouterr().out
    write_records(results, ("skipped", "process", []))
    # a skipped cell does not fail, but a file of skipped cells compared nothing
    assert main(["--baselines-dir", str(tmp_path / "bl"), "gate", str(results)]) == NOTHING_COMPARED
    assert "FAIL" not in (out := capsys.readouterr().out) and "nothing was compared: the results files hold no cell " \
        "results" in out


def test_bandwidth_write_stores_the_measurement_with_its_provenance(tmp_path, capsys):
    from harness.hardware import hardware_key
    from harness.measure.bandwidth import read_bandwidth

    store = tmp_path / "baselines"
    assert main(["--baselines-dir", str(store), "bandwidth", "--device", "cpu", "--size-mib", "4", "--repeats", "3",
                 "--write"]) == 0
    key = hardware_key("cpu")
    value, _ = read_bandwidth(store, key)
    stored = json.loads((store / key / "hardware" / "memory-bandwidth.json").read_text())
    assert value > 0 and stored["hardware"]["hardware_key"] == key and "torch" in stored["versions"]["packages"]
    assert f"{key}: {value / 1e9:.0f} GB/s" in capsys.readouterr().out
    assert main(["--baselines-dir", str(store), "bandwidth", "--device", "cpu", "--repeats", "0"]) == 2
