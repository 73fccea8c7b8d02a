"""The runner outside pytest: `quantbench run` runs a suite's cells through harness/runner.py and gates them as
`quantbench gate` does; the job kinds and run options are checked in one place.

The workers are faked (their protocol is tested in test_isolation.py); the last test runs one real cell.
"""

import json
from pathlib import Path

import pytest

from harness import runner
from harness.baselines import BaselineStore
from harness.cli import NOTHING_COMPARED, main
from harness.figure import Figure
from harness.gate import replay
from harness.isolation import Outcome
from harness.matrix import load_matrix
from harness.results import RESULTS_SCHEMA_VERSION, CellResult
from harness.runner import JobKind, RunOptions

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
[methods.bf16]
backend = "torch"
dtype = "bfloat16"
[suites.cpu]
models = ["tiny"]
methods = ["fp32", "bf16"]
batch_sizes = [1, 2]
reference = "fp32"
"""
KEY = "runner-test-key"


def fake_workers(monkeypatch, decode: float = 100.0) -> list[dict]:
    """Replace the worker processes: preparation and the reference succeed; the measuring job reports a
    per-model figure and a decode speed per batch size. The jobs are returned as they were asked for."""
    jobs: list[dict] = []

    def run(job, timeout_s, env):
        jobs.append(job)
        if job.get("prepare_only") or (job.get("reference") or {}).get("role") == "compute":
            return Outcome("ok")
        config = {key: job[key] for key in ("suite", "method", "model", "run", "accuracy")}
        name = job["method"]["name"]
        speeds = [decode, decode * 1.005, decode * 0.995]
        results = [CellResult(name, "tiny", None, {"ppl": Figure(7.5)}, config=config,
                              hardware={"hardware_key": KEY}),
                   *(CellResult(name, "tiny", b, {"decode_tokens_per_s": Figure.of(speeds)}, config=config,
                                hardware={"hardware_key": KEY}) for b in job["batch_sizes"])]
        return Outcome("ok", results=[CellResult.from_dict(json.loads(json.dumps(r.to_dict()))) for r in results])

    monkeypatch.setattr(runner, "run_isolated", run)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    return jobs


def quantbench_run(tmp_path: Path, *extra: str) -> int:
    (tmp_path / "matrix.toml").write_text(MATRIX)
    return main(["--baselines-dir", str(tmp_path / "baselines"), "run", "--matrix", str(tmp_path / "matrix.toml"),
                 "--results-dir", str(tmp_path / "results"), "--hardware-key", KEY, *extra])


def test_quantbench_run_records_then_gates_and_fails_a_slowdown(tmp_path, monkeypatch, capsys):
    fake_workers(monkeypatch)
    assert quantbench_run(tmp_path) == NOTHING_COMPARED  # no baselines yet: it says so, and is no pass
    assert "nothing was compared" in capsys.readouterr().out
    assert quantbench_run(tmp_path, "--update-baselines") == 0
    assert BaselineStore(tmp_path / "baselines").path(KEY, "tiny").is_file()
    capsys.readouterr()
    assert quantbench_run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "ok   decode_tokens_per_s of bf16|tiny|b2" in out and "0 failure(s) in" in out

    fake_workers(monkeypatch, decode=70.0)  # 30 % slower: beyond the default tolerance
    assert quantbench_run(tmp_path, "--failures-only") == 1
    out = capsys.readouterr().out
    failing = sorted(line.split(" of ")[1].split(" ")[0] for line in out.splitlines() if line.startswith("FAIL"))
    assert failing == ["bf16|tiny|b1", "bf16|tiny|b2", "fp32|tiny|b1", "fp32|tiny|b2"]
    assert not any(line.startswith("ok ") for line in out.splitlines())  # --failures-only


def test_quantbench_run_and_quantbench_gate_read_a_run_alike(tmp_path, monkeypatch, capsys):
    """The lines `quantbench run` prints are those `quantbench gate` prints for the results file it wrote."""
    fake_workers(monkeypatch)
    quantbench_run(tmp_path, "--update-baselines")
    fake_workers(monkeypatch, decode=70.0)
    for old in (tmp_path / "results").glob("*"):
        old.unlink()
    capsys.readouterr()
    quantbench_run(tmp_path)
    live = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("ok ", "FAIL", "noisy"))]
    [results] = (tmp_path / "results").glob("*.jsonl")
    assert {json.loads(line)["schema_version"] for line in results.read_text().splitlines()} == {RESULTS_SCHEMA_VERSION}
    offline = replay(BaselineStore(tmp_path / "baselines"), [results], load_matrix(tmp_path / "matrix.toml"))
    assert sorted(live) == sorted(offline.lines)
    assert any(line.startswith("FAIL") for line in live)


def test_quantbench_run_asks_each_kind_of_job_once_per_model_and_method(tmp_path, monkeypatch):
    jobs = fake_workers(monkeypatch)
    quantbench_run(tmp_path, "--update-baselines")
    kinds = [("prepare" if j.get("prepare_only") else "reference" if j["reference"]["role"] == "compute"
              else "measure", j["method"]["name"]) for j in jobs]
    # the model is prepared once; the reference scores it once; each method is measured once
    assert kinds == [("prepare", "fp32"), ("reference", "fp32"), ("measure", "fp32"), ("measure", "bf16")]


def test_quantbench_run_refuses_bad_input_naming_it(tmp_path, monkeypatch, capsys):
    fake_workers(monkeypatch)
    assert quantbench_run(tmp_path, "--suite", "gpu") == 2
    assert "has no suite 'gpu' (suites: cpu)" in capsys.readouterr().err
    assert quantbench_run(tmp_path, "--methods", "fp8") == 2
    assert "fp8" in capsys.readouterr().err
    assert quantbench_run(tmp_path, "--pool-baselines") == 2
    assert "--pool-baselines pools this run into the stored baselines" in capsys.readouterr().err


def test_job_kinds_set_the_flags_the_worker_reads():
    measuring = {"method": {"name": "bf16"}, "method_class": "x", "reference": {"role": "compare"}}
    assert runner.job(JobKind.MEASURE, measuring) is measuring
    assert runner.job(JobKind.PREPARE_MODEL, measuring) == {**measuring, "prepare_only": True}
    assert runner.job(JobKind.PREPARE_METHOD, measuring)["prepare_method"] is True
    with pytest.raises(ValueError, match="needs the reference method"):
        runner.job(JobKind.REFERENCE, measuring)


@pytest.mark.parametrize("options, message", [
    ({"processes": 0}, "--processes: must be 1 or more"),
    ({"device_slowdown": 1.5}, "a fraction in \\[0, 1\\)"),
    ({"update": True, "delay_ms": 5.0}, "cannot be combined with --update-baselines"),
    ({"replace_unreadable": True}, "it needs --update-baselines"),
])
def test_run_options_refuse_what_cannot_be_meant(options, message):
    with pytest.raises(ValueError, match=message):
        RunOptions(**options)


def test_quantbench_run_measures_a_real_cell_end_to_end(tmp_path, capsys):
    """One real cell of the shipped matrix (fp32 on the embedded model, batch size 1), workers and all."""
    root = Path(__file__).resolve().parents[1]
    matrix = root / "benchmarks" / "matrix.toml"
    code = main(["--baselines-dir", str(tmp_path / "baselines"), "run", "--matrix", str(matrix), "--suite", "cpu",
                 "--models", "embedded", "--methods", "fp32", "--batch-sizes", "1",
                 "--results-dir", str(tmp_path / "results"), "--hardware-key", KEY, "--update-baselines"])
    out = capsys.readouterr().out
    assert code == 0, out
    stored = json.loads(BaselineStore(tmp_path / "baselines").path(KEY, "embedded").read_text())
    cell = stored["cells"]["fp32|embedded|b1"]
    assert cell["figures"]["decode_tokens_per_s"]["value"] > 0 and cell["figures"]["peak_rss_mib"]["value"] > 0
    [results] = (tmp_path / "results").glob("*.jsonl")  # the run's record, with the key it was stored under
    assert {json.loads(line)["hardware_key"] for line in results.read_text().splitlines()} == {KEY}
