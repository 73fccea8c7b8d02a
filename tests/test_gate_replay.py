"""One gate: every live scenario replayed offline reaches the same verdict.

Each scenario runs the plugin's path (`QuantBench.verdict`, which `check` maps to pass and fail) over faked
workers, then judges the results file that run wrote with `quantbench gate`'s path (`replay`), and the two
verdicts must be equal: statuses, every check with its figures and messages, the key and the file looked at.
The workers report a hardware key other than the run's (--hardware-key), so the offline gate must read the
run's key from the results file to look where the run looked.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import plugin, runner
from harness.baselines import BaselineStore
from harness.cli import NOTHING_COMPARED, build_parser, main
from harness.figure import Figure
from harness.gate import CellVerdict, GatePolicy, Status, add_gate_options, replay
from harness.isolation import Outcome
from harness.matrix import load_matrix
from harness.results import CellResult

MATRIX = """
[run]
prompt_tokens = 8
new_tokens = 6
repeats = 3
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
models = ["tiny"]
methods = ["fp32"]
batch_sizes = [1, 2]
"""
RUN_KEY = "the-runs-key"  # --hardware-key of every run here
DETECTED = "what-the-worker-saw"  # the key each worker puts in its results
DECODE = [100.0, 100.5, 99.5]
METRICS = {None: ["ppl"], 1: ["decode_tokens_per_s", "peak_nvml_mib"], 2: ["decode_tokens_per_s", "peak_nvml_mib"]}


def worker_results(job, decode=DECODE, ppl=7.5, nvml=1000.0):
    """What a worker of `job` reports for fp32|tiny: the per-model cell and batch sizes 1 and 2, read back as
    the harness reads a worker's output."""
    config = {"suite": job["suite"], "method": job["method"], "model": job["model"], "run": job["run"],
              "accuracy": job["accuracy"]}
    cells = [CellResult("fp32", "tiny", None, {"ppl": Figure(ppl)}, config=config,
                        hardware={"hardware_key": DETECTED}),
             *(CellResult("fp32", "tiny", b, {"decode_tokens_per_s": Figure.of(decode),
                                              "peak_nvml_mib": Figure(nvml)},
                          config=config, hardware={"hardware_key": DETECTED}) for b in (1, 2))]
    return [CellResult.from_dict(json.loads(json.dumps(cell.to_dict()))) for cell in cells]


def session(tmp_path, monkeypatch, outcomes, **options):
    """A QuantBench whose measuring workers return `outcomes(job)` in turn (preparation always succeeds)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "matrix.toml").write_text(MATRIX)
    values = {"--matrix": str(tmp_path / "matrix.toml"), "--results-dir": str(tmp_path / "results"),
              "--baselines-dir": str(tmp_path / "baselines"), "--hardware-key": RUN_KEY, "--tolerance": [],
              "--no-cpu-split": True, **options}

    def run(job, timeout_s, env):
        return Outcome("ok") if job.get("prepare_only") else next(outcomes)(job)

    monkeypatch.setattr(runner, "run_isolated", run)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # one results file, -main
    return plugin.QuantBench(SimpleNamespace(rootpath=tmp_path, getoption=values.get)), values


def measuring(*outcomes):
    return iter(outcomes)


def ok(**figures):
    return lambda job: Outcome("ok", results=worker_results(job, **figures))


def record_baseline(tmp_path, monkeypatch, edit=None, **figures):
    """Store fp32|tiny's baselines under RUN_KEY through the live --update-baselines path; `edit(cells)` then
    changes the stored file (as an older recording would differ)."""
    recorder, _ = session(tmp_path / "record", monkeypatch, measuring(ok(**figures)), **{
        "--update-baselines": True, "--baselines-dir": str(tmp_path / "baselines")})
    [cell] = recorder.cells()
    assert recorder.verdict(plugin.CellRef(cell, None), ["ppl"])[1].status is Status.RECORDED
    if edit is not None:
        path = BaselineStore(tmp_path / "baselines").path(RUN_KEY, "tiny")
        document = json.loads(path.read_text())
        edit(document["cells"])
        path.write_text(json.dumps(document))


def live_and_offline(tmp_path, monkeypatch, outcomes, store=None, **options):
    """The verdicts of the live run, per cell id, and those `replay` reaches from the file the run wrote;
    the baselines are those under `store` (default: `tmp_path`)."""
    store = store or tmp_path
    live, values = session(tmp_path, monkeypatch, outcomes, **{"--baselines-dir": str(store / "baselines"), **options})
    [cell] = live.cells()
    verdicts = {}
    for batch_size, metrics in METRICS.items():
        ref = plugin.CellRef(cell, batch_size)
        verdicts[ref.id] = live.verdict(ref, metrics)[1]
        request = SimpleNamespace(node=SimpleNamespace(user_properties=[]))
        if verdicts[ref.id].failed:  # check() maps the same verdict to the test's outcome
            with pytest.raises(pytest.fail.Exception):
                live.check(request, ref, metrics)
        else:
            live.check(request, ref, metrics)
    [results] = (tmp_path / "results").glob("*.jsonl")
    matrix = load_matrix(tmp_path / "matrix.toml")
    report = replay(BaselineStore(store / "baselines"), [results], matrix,
                    GatePolicy.from_options(values.get, matrix))
    return verdicts, {verdict.cell: verdict for verdict in report.verdicts}, results


def decision(verdict: CellVerdict):
    """A verdict without its messages."""
    return (verdict.cell, verdict.status, verdict.failed, [
        (c.metric, c.status, c.fails, c.baseline, c.measured, c.change, c.tolerance) for c in verdict.checks])


def statuses(verdicts):
    return {cell: verdict.status for cell, verdict in verdicts.items()}


def test_strict_baselines_fail_a_missing_baseline_live_and_offline(tmp_path, monkeypatch):
    live, offline, results = live_and_offline(tmp_path, monkeypatch, measuring(ok()), **{"--strict-baselines": True})
    assert live == offline
    assert set(statuses(live).values()) == {Status.MISSING} and all(v.failed for v in live.values())
    assert live["fp32|tiny|b1"].reason == (f"fp32|tiny|b1: no baseline in {tmp_path / 'baselines' / RUN_KEY}"
                                           "/tiny.json; record one with --update-baselines")
    args = ["--baselines-dir", str(tmp_path / "baselines"), "gate", "--matrix", str(tmp_path / "matrix.toml"),
            str(results)]
    assert main([*args, "--strict-baselines"]) == 1
    assert main(args) == NOTHING_COMPARED  # not strict: no failure, and nothing compared


def test_a_missing_baseline_passes_when_not_strict_live_and_offline(tmp_path, monkeypatch, capsys):
    live, offline, results = live_and_offline(tmp_path, monkeypatch, measuring(ok()))
    assert live == offline
    assert set(statuses(live).values()) == {Status.MISSING} and not any(v.failed for v in live.values())
    assert main(["--baselines-dir", str(tmp_path / "baselines"), "gate", "--matrix", str(tmp_path / "matrix.toml"),
                 str(results)]) == NOTHING_COMPARED
    assert f"new  fp32|tiny|b1: no baseline under {RUN_KEY}" in capsys.readouterr().out  # the run's key


def test_a_regression_fails_live_and_offline(tmp_path, monkeypatch, capsys):
    record_baseline(tmp_path, monkeypatch)
    live, offline, results = live_and_offline(tmp_path, monkeypatch, measuring(ok(decode=[90.0, 90.5, 89.5])))
    assert live == offline
    assert statuses(live) == {"fp32|tiny": Status.PASS, "fp32|tiny|b1": Status.REGRESSED,
                              "fp32|tiny|b2": Status.REGRESSED}
    [regressed] = [c for c in live["fp32|tiny|b1"].checks if c.fails]
    assert (regressed.metric, regressed.baseline, regressed.measured, regressed.tolerance) == (
        "decode_tokens_per_s", 100.0, 90.0, 0.05)
    assert regressed.delta_percent == pytest.approx(10.0)
    assert main(["--baselines-dir", str(tmp_path / "baselines"), "gate", "--matrix", str(tmp_path / "matrix.toml"),
                 str(results)]) == 1
    assert "FAIL decode_tokens_per_s of fp32|tiny|b1 regressed 10.0%" in capsys.readouterr().out


def test_a_tolerance_override_passes_the_same_figures_live_and_offline(tmp_path, monkeypatch, capsys):
    record_baseline(tmp_path, monkeypatch)
    override = ["fp32:decode_tokens_per_s=0.2"]
    live, offline, results = live_and_offline(tmp_path, monkeypatch, measuring(ok(decode=[90.0, 90.5, 89.5])),
                                              **{"--tolerance": override})
    assert live == offline
    assert set(statuses(live).values()) == {Status.PASS}
    args = ["--baselines-dir", str(tmp_path / "baselines"), "gate", "--matrix", str(tmp_path / "matrix.toml"),
            str(results)]
    assert main(args) == 1  # the matrix's 5 %
    assert main([*args, "--tolerance", override[0]]) == 0
    assert "worsened 10.0%, within tolerance (baseline 100 tokens/s, measured 90 tokens/s; tolerance 20.0%" in \
        capsys.readouterr().out


def test_a_recheck_that_clears_pools_both_runs_live_and_offline(tmp_path, monkeypatch):
    record_baseline(tmp_path, monkeypatch)
    stalled, again = ok(decode=[40.0, 41.0, 39.0]), ok(decode=DECODE * 3)
    live, offline, _ = live_and_offline(tmp_path, monkeypatch, measuring(stalled, again), **{"--recheck": True})
    assert live == offline
    assert not any(v.failed for v in live.values()) and live["fp32|tiny|b1"].rechecked
    [decode] = [c for c in offline["fp32|tiny|b2"].checks if c.metric == "decode_tokens_per_s"]
    assert decode.measured == 99.75  # the median of all twelve samples


def test_a_recheck_that_does_not_clear_says_so_live_and_offline(tmp_path, monkeypatch):
    record_baseline(tmp_path, monkeypatch)
    slow = ok(decode=[40.0, 41.0, 39.0])
    live, offline, _ = live_and_offline(tmp_path, monkeypatch, measuring(slow, slow), **{"--recheck": True})
    assert live == offline
    [regressed] = [c for c in live["fp32|tiny|b1"].checks if c.fails]
    assert regressed.message.endswith(" (pooled over a recheck)")


def test_processes_pool_live_and_offline(tmp_path, monkeypatch):
    record_baseline(tmp_path, monkeypatch)
    first, second = ok(decode=[90.0, 90.5, 89.5]), ok(decode=[110.0, 110.5, 109.5])
    live, offline, _ = live_and_offline(tmp_path, monkeypatch, measuring(first, second), **{"--processes": 2})
    assert live == offline
    [decode] = [c for c in live["fp32|tiny|b1"].checks if c.metric == "decode_tokens_per_s"]
    assert decode.measured == 100.0 and not live["fp32|tiny|b1"].rechecked  # pooled processes are no recheck


def test_a_crashed_process_fails_every_test_of_its_cell_live_and_offline(tmp_path, monkeypatch):
    record_baseline(tmp_path, monkeypatch)
    crashed = lambda job: Outcome("crashed", "killed by signal SIGSEGV")  # noqa: E731
    live, offline, _ = live_and_offline(tmp_path, monkeypatch, measuring(ok(), crashed), **{"--processes": 2})
    # one pooling policy (harness.results.pool_processes): the same decision and the same words
    assert live == offline
    assert set(statuses(live).values()) == {Status.ERROR}
    assert live["fp32|tiny|b1"].reason == ("fp32|tiny|b1: the run failed: process 2 of 2: worker crashed: "
                                           "killed by signal SIGSEGV")


def test_a_stale_figure_fails_with_one_message_live_and_offline(tmp_path, monkeypatch):
    def older_tracker(cells):
        for cell in cells.values():
            cell["details"]["memory_protocol"] = 0

    record_baseline(tmp_path, monkeypatch, edit=older_tracker)
    live, offline, _ = live_and_offline(tmp_path, monkeypatch, measuring(ok()))
    assert live == offline
    assert statuses(live) == {"fp32|tiny": Status.PASS, "fp32|tiny|b1": Status.INCOMPARABLE,
                              "fp32|tiny|b2": Status.INCOMPARABLE}
    stale = [c for c in live["fp32|tiny|b1"].checks if c.status is Status.STALE]
    assert [(c.metric, c.fails) for c in stale] == [("peak_nvml_mib", True)]
    assert stale[0].message.startswith("peak_nvml_mib of fp32|tiny|b1: the baseline was read another way "
                                       "(details.memory_protocol: baseline 0, now 1; ")
    assert stale[0].message.endswith("); re-record it with --update-baselines")
    assert [c.status for c in live["fp32|tiny|b1"].checks if c.metric == "decode_tokens_per_s"] == [Status.PASS]


def test_a_baseline_measured_differently_fails_live_and_offline(tmp_path, monkeypatch):
    def other_stride(cells):
        for cell in cells.values():
            cell["config"]["accuracy"]["stride"] = 16

    record_baseline(tmp_path, monkeypatch, edit=other_stride)
    live, offline, _ = live_and_offline(tmp_path, monkeypatch, measuring(ok()))
    assert live == offline
    assert set(statuses(live).values()) == {Status.INCOMPARABLE}
    assert "was measured differently (config.accuracy.stride: baseline 16, now 32)" in live["fp32|tiny"].reason


def test_fail_unresolved_fails_a_check_the_noise_hid_live_and_offline(tmp_path, monkeypatch):
    record_baseline(tmp_path, monkeypatch, decode=[50.0, 100.0, 150.0])
    noisy = ok(decode=[45.0, 95.0, 145.0])
    live, offline, _ = live_and_offline(tmp_path / "lenient", monkeypatch, measuring(noisy), store=tmp_path)
    assert not any(v.failed for v in live.values())
    live, offline, _ = live_and_offline(tmp_path, monkeypatch, measuring(noisy), **{"--fail-unresolved": True})
    assert live == offline
    assert statuses(live)["fp32|tiny|b1"] is Status.UNRESOLVED and live["fp32|tiny|b1"].failed


def test_a_non_finite_figure_fails_live_and_offline(tmp_path, monkeypatch):
    record_baseline(tmp_path, monkeypatch)
    live, offline, _ = live_and_offline(tmp_path, monkeypatch, measuring(ok(ppl=math.nan)))
    assert live == offline
    assert statuses(live)["fp32|tiny"] is Status.ERROR and "measured nan" in live["fp32|tiny"].reason


def test_the_offline_gate_looks_under_the_key_the_run_recorded_or_the_one_named(tmp_path, monkeypatch, capsys):
    record_baseline(tmp_path, monkeypatch)
    _, offline, results = live_and_offline(tmp_path, monkeypatch, measuring(ok()))
    assert {v.hardware_key for v in offline.values()} == {RUN_KEY}
    args = ["--baselines-dir", str(tmp_path / "baselines"), "gate", "--matrix", str(tmp_path / "matrix.toml"),
            str(results)]
    assert main(args) == 0
    assert main([*args, "--hardware-key", DETECTED]) == NOTHING_COMPARED
    assert f"nothing was compared: no cell has a baseline under {DETECTED}" in capsys.readouterr().out
    records = [json.loads(line) for line in results.read_text().splitlines()]
    for record in records:  # as a results file written before runs recorded their key reads
        del record["hardware_key"]
    results.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(args) == NOTHING_COMPARED  # the worker's key, which has no baselines


ROOT = Path(__file__).parent.parent
H200 = ROOT / "docs" / "evidence" / "nvidia-h200-140gb"


@pytest.mark.parametrize("name", ["device-aa3", "device-aa4"])
def test_the_committed_device_gates_replay_as_committed(name, capsys):
    """The device-time gates of runs P and R ran live with --strict-baselines against the committed baselines;
    replayed the same way with the committed matrix, each prints its committed transcript (docs/evidence/
    nvidia-h200-140gb/README.md). Re-recording those cells' baselines changes the replays: regenerate the
    transcripts then. Runs M and N gated run L's baselines, which run Q replaced: their transcripts stay as
    the gate printed them against those baselines (commit ecdda64)."""
    code = main(["--baselines-dir", str(ROOT / "baselines"), "gate", "--strict-baselines",
                 "--matrix", str(ROOT / "benchmarks" / "matrix.toml"), str(H200 / f"{name}-results.jsonl")])
    committed = (H200 / f"{name}.txt").read_text()
    assert capsys.readouterr().out == committed
    assert code == (1 if "\nFAIL " in "\n" + committed else 0)


def test_the_gate_options_are_declared_once_for_both_front_ends(tmp_path):
    declared = []
    add_gate_options(lambda name, **how: declared.append(name))
    assert declared == ["--strict-baselines", "--fail-unresolved", "--tolerance", "--hardware-key"]
    in_pytest = []
    group = SimpleNamespace(addoption=lambda name, **how: in_pytest.append(name))
    plugin.pytest_addoption(SimpleNamespace(getgroup=lambda *args: group))
    assert set(declared) <= set(in_pytest)
    args = build_parser().parse_args(["gate", "run.jsonl", "--strict-baselines", "--fail-unresolved", "--tolerance",
                                      "ppl=0.02", "--tolerance", "fp32:ttft_ms=1", "--hardware-key", "k"])
    (tmp_path / "matrix.toml").write_text(MATRIX)
    policy = GatePolicy.from_options(lambda name: getattr(args, name[2:].replace("-", "_")),
                                     load_matrix(tmp_path / "matrix.toml"))
    assert (policy.strict_baselines, policy.fail_unresolved, args.hardware_key) == (True, True, "k")
    assert (policy.for_suite("cpu").for_cell("fp32", "ppl"), policy.for_suite("cpu").for_cell("fp32", "ttft_ms")) == (
        0.02, 1.0)
