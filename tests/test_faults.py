"""Hostile input and faults (issue #18): a broken figure never passes, a fault becomes the cell's one outcome,
a remedy works, and what the matrix or the command line gets wrong is refused before anything runs."""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import plugin, runner
from harness.baselines import BaselineError, BaselineStore, RelativeNoiseAwareRule
from harness.config import MatrixError
from harness.figure import Figure
from harness.gate import replay
from harness.isolation import Outcome, run_isolated
from harness.matrix import load_matrix
from harness.results import CellResult
from harness.tolerances import Tolerances

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
reference = "fp32"
models = ["tiny"]
methods = ["fp32"]
batch_sizes = [1, 2]
"""
HW = "test-host"


def make_session(tmp_path: Path, matrix: str = MATRIX, **options) -> plugin.QuantBench:
    """A QuantBench over a matrix file, without pytest around it (its workers are faked by the tests)."""
    (tmp_path / "matrix.toml").write_text(matrix)
    values = {"--matrix": str(tmp_path / "matrix.toml"), "--results-dir": str(tmp_path / "results"),
              "--baselines-dir": str(tmp_path / "baselines"), "--hardware-key": HW, "--tolerance": [],
              "--no-cpu-split": True, **options}
    return plugin.QuantBench(SimpleNamespace(rootpath=tmp_path, getoption=values.get))


def measured_cells(ppl: float = 7.5, decode: float = 100.0) -> list[CellResult]:
    """A worker's results for the fp32|tiny cell, read back as the harness reads a worker's output."""
    config = {"suite": "cpu", "run": {"new_tokens": 6}}
    cells = [CellResult("fp32", "tiny", None, {"ppl": Figure(ppl)}, config=config,
                        hardware={"hardware_key": HW}),
             *(CellResult("fp32", "tiny", b, {"decode_tokens_per_s": Figure.of([decode, decode * 1.01])},
                          config=config, hardware={"hardware_key": HW}) for b in (1, 2))]
    return [CellResult.from_dict(json.loads(json.dumps(cell.to_dict()))) for cell in cells]


def fake_workers(monkeypatch, measure):
    """Replace the worker processes: preparation and the reference succeed, `measure(job)` measures."""
    calls = []

    def run(job, timeout_s, env):
        calls.append(job)
        if job.get("prepare_only") or (job.get("reference") or {}).get("role") == "compute":
            return Outcome("ok")
        return measure(job)

    monkeypatch.setattr(runner, "run_isolated", run)
    return calls


def a_request():
    return SimpleNamespace(node=SimpleNamespace(user_properties=[]))


def measuring_calls(calls):
    return [job for job in calls if not job.get("prepare_only") and job.get("reference", {}).get("role") != "compute"]


# ---- 1. no non-finite figure passes -------------------------------------------------------------------------

def test_a_nan_figure_read_from_a_worker_leaves_the_figures_and_is_named():
    cell = CellResult("gguf-q4", "tiny", None, {"ppl": Figure(math.nan), "load_s": Figure(1.0)})
    read = CellResult.from_dict(json.loads(json.dumps(cell.to_dict())))  # a worker's out.json keeps NaN
    assert set(read.figures) == {"load_s"} and read.details["non_finite_figures"] == {"ppl": "nan"}
    json.dumps(read.to_dict(), allow_nan=False)  # strict JSON from here on
    assert read.non_finite(["ppl", "load_s"]) == [
        "ppl of gguf-q4|tiny measured nan, not a finite number: the measurement is broken (a corrupted cached "
        "artifact or a numerical failure); it is not compared or stored"]


def test_a_nan_perplexity_fails_its_test_live_and_reaches_no_file_as_nan(tmp_path, monkeypatch):
    fake_workers(monkeypatch, lambda job: Outcome("ok", results=measured_cells(ppl=math.nan)))
    session = make_session(tmp_path)
    [cell] = session.cells()
    with pytest.raises(pytest.fail.Exception, match=r"ppl of fp32\|tiny measured nan, not a finite number"):
        session.check(a_request(), plugin.CellRef(cell, None), ["ppl"])
    [results] = (tmp_path / "results").glob("*.jsonl")

    def strict(constant):
        raise ValueError(f"{constant} is not strict JSON")

    [record] = [json.loads(line, parse_constant=strict) for line in results.read_text().splitlines()]
    assert record["results"][0]["details"]["non_finite_figures"] == {"ppl": "nan"}
    assert "ppl" not in record["results"][0]["figures"]


def test_a_nan_figure_in_an_older_results_file_fails_the_offline_gate(tmp_path):
    store = BaselineStore(tmp_path / "baselines")
    store.merge(HW, measured_cells())
    results = tmp_path / "run-main.jsonl"
    cells = [cell.to_dict() for cell in measured_cells()]
    cells[0]["figures"]["ppl"]["value"] = math.nan  # as written before NaN was caught
    results.write_text(json.dumps({"cell": "cpu:fp32|tiny", "role": "process", "status": "ok", "results": cells}))
    (tmp_path / "matrix.toml").write_text(MATRIX)
    report = replay(store, [results], load_matrix(tmp_path / "matrix.toml"))
    lines, failures = report.lines, report.failures
    assert failures == 1
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL ppl of fp32|tiny measured nan, not a finite number: the measurement is broken (a corrupted cached "
        "artifact or a numerical failure); it is not compared or stored"]
    assert not any("within noise" in line and "ppl" in line for line in lines)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_the_rule_regresses_a_figure_that_is_not_finite(value):
    verdict = RelativeNoiseAwareRule().check("c", "ppl", Figure(7.0), Figure(value), 0.01)
    assert verdict.regressed and "is not a finite number" in verdict.message


# ---- 2. every metric declares its range; the reader refuses values outside it ------------------------------

@pytest.mark.parametrize(("metric", "value", "problem"), [
    ("decode_tokens_per_s", -499.5, "-499.5 is outside the range of decode_tokens_per_s (0)"),
    ("top1_agreement", 1.5, "1.5 is outside the range of top1_agreement (0 to 1)"),
    ("ppl", 0.5, "0.5 is outside the range of ppl (1)"),
])
def test_a_baseline_outside_its_metrics_range_is_refused_by_file_and_field(tmp_path, metric, value, problem):
    store = BaselineStore(tmp_path / "baselines")
    cell = CellResult("fp32", "tiny", 1, {metric: Figure.of([1.0, 1.0])})
    [path] = store.merge(HW, [cell])
    document = json.loads(path.read_text())
    document["cells"]["fp32|tiny|b1"]["figures"][metric]["samples"][1] = value
    path.write_text(json.dumps(document))
    with pytest.raises(BaselineError) as caught:
        store.load(HW, "tiny")
    assert f"{path}: cells['fp32|tiny|b1'].figures.{metric}.samples[1]: {problem}" in str(caught.value)


def test_a_result_outside_its_metrics_range_never_becomes_a_baseline(tmp_path):
    store = BaselineStore(tmp_path / "baselines")
    with pytest.raises(BaselineError, match=r"figures.decode_tokens_per_s.value: -1.0 is outside the range"):
        store.merge(HW, [CellResult("fp32", "tiny", 1, {"decode_tokens_per_s": Figure(-1.0)})])
    assert not store.path(HW, "tiny").exists()


# ---- 4. a remedy that works ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "aside"), [
    ('{"schema_version": 1, "cells": {', "tiny.json.corrupt"),  # truncated
    ('{"schema_version": 0, "cells": {}}', "tiny.json.v0"),
    ('{"cells": {}}', "tiny.json.corrupt"),  # no schema_version
])
def test_an_unreadable_baseline_file_names_the_command_that_replaces_it_and_the_command_works(tmp_path, text, aside):
    store = BaselineStore(tmp_path / "baselines")
    path = store.path(HW, "tiny")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(BaselineError) as refused:
        store.merge(HW, measured_cells())
    assert f"run `pytest --update-baselines --replace-unreadable-baselines` to move it aside to {aside}" in str(
        refused.value)
    assert path.read_text() == text  # without the option nothing changes
    notes = []
    assert store.merge(HW, measured_cells(), replace_unreadable=True, log=notes.append) == [path]
    assert (path.parent / aside).read_text() == text  # kept, under the name the message gave
    assert sorted(store.load(HW, "tiny")) == ["fp32|tiny", "fp32|tiny|b1", "fp32|tiny|b2"]
    assert notes == [f"{path} could not be read ({str(refused.value).split('; ')[0]}); moved aside to "
                     f"{path.parent / aside}, and a new file records this run"]
    path.write_text(text)  # broken again: the first file set aside is kept
    store.merge(HW, measured_cells(), replace_unreadable=True, log=notes.append)
    assert (path.parent / f"{aside}.1").read_text() == (path.parent / aside).read_text() == text


def test_a_newer_schema_is_never_moved_aside(tmp_path):
    store = BaselineStore(tmp_path / "baselines")
    path = store.path(HW, "tiny")
    path.parent.mkdir(parents=True)
    path.write_text('{"schema_version": 2}')
    with pytest.raises(BaselineError, match="update quantbench to read it"):
        store.merge(HW, measured_cells(), replace_unreadable=True)
    assert path.read_text() == '{"schema_version": 2}' and sorted(p.name for p in path.parent.iterdir()) == [
        "tiny.json"]


def test_the_live_remedy_replaces_the_file_and_a_failed_store_reads_as_such_not_as_a_worker_error(
        tmp_path, monkeypatch):
    calls = fake_workers(monkeypatch, lambda job: Outcome("ok", results=measured_cells()))
    path = BaselineStore(tmp_path / "baselines").path(HW, "tiny")
    path.parent.mkdir(parents=True)
    path.write_text("{")
    session = make_session(tmp_path, **{"--update-baselines": True})
    [cell] = session.cells()
    with pytest.raises(pytest.fail.Exception) as failed:
        session.check(a_request(), plugin.CellRef(cell, 1), ["decode_tokens_per_s"])
    assert "fp32|tiny|b1: baselines not updated: " in str(failed.value) and "worker" not in str(failed.value)
    assert "--replace-unreadable-baselines" in str(failed.value)

    session = make_session(tmp_path, **{"--update-baselines": True, "--replace-unreadable-baselines": True})
    request = a_request()
    session.check(request, plugin.CellRef(cell, 1), ["decode_tokens_per_s"])
    [record] = [value for name, value in request.node.user_properties if name == "quantbench"]
    assert record["status"] == "updated" and "moved aside to" in record["notes"][0]
    assert path.with_name("tiny.json.corrupt").read_text() == "{"
    assert len(measuring_calls(calls)) == 2  # one per session
    with pytest.raises(pytest.UsageError, match="--replace-unreadable-baselines .* needs --update-baselines"):
        make_session(tmp_path, **{"--replace-unreadable-baselines": True})


# ---- 6. faults inside the harness ------------------------------------------------------------------------------

def test_a_worker_that_exits_while_it_dumps_its_stacks_is_still_a_timeout(tiny_job, worker_env):
    outcome = run_isolated(tiny_job("isolation_methods:ExitOnStackDumpMethod"), timeout_s=10, env=worker_env)
    assert outcome.status == "timeout" and "10 s" in outcome.reason


def test_an_exception_producing_a_cells_outcome_is_its_one_recorded_outcome(tmp_path, monkeypatch):
    def broken(job):
        raise RuntimeError("the harness tripped")

    calls = fake_workers(monkeypatch, broken)
    session = make_session(tmp_path)
    [cell] = session.cells()
    for batch_size, metrics in ((None, ["ppl"]), (1, ["decode_tokens_per_s"]), (2, ["decode_tokens_per_s"])):
        with pytest.raises(pytest.fail.Exception,
                           match=r"the harness failed while producing the outcome of cpu:fp32\|tiny: "
                                 r"RuntimeError: the harness tripped"):
            session.check(a_request(), plugin.CellRef(cell, batch_size), metrics)
    assert len(measuring_calls(calls)) == 1
    [results] = (tmp_path / "results").glob("*.jsonl")
    [record] = [json.loads(line) for line in results.read_text().splitlines()]
    assert (record["cell"], record["status"]) == ("cpu:fp32|tiny", "error")


def test_a_baselines_folder_that_cannot_be_written_fails_each_test_once_measured(tmp_path, monkeypatch):
    calls = fake_workers(monkeypatch, lambda job: Outcome("ok", results=measured_cells()))
    session = make_session(tmp_path, **{"--update-baselines": True})

    def immutable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "baselines" / HW))

    monkeypatch.setattr(session.store, "merge", immutable)
    [cell] = session.cells()
    for batch_size in (1, 2):
        with pytest.raises(pytest.fail.Exception, match=r"fp32\|tiny\|b\d: baselines not updated: \[Errno 13\] "
                                                        r"Permission denied: '.*test-host'"):
            session.check(a_request(), plugin.CellRef(cell, batch_size), ["decode_tokens_per_s"])
    assert len(measuring_calls(calls)) == 1
    [results] = (tmp_path / "results").glob("*.jsonl")
    assert len(results.read_text().splitlines()) == 1


# ---- 7. what the matrix or the command line gets wrong is refused before anything runs -----------------------

@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("new_tokens = 6", "new_tokens = 1"),
     r"run\.new_tokens: must be at least 2 \(decode throughput is timed from the first new token to the last\)"),
    (lambda t: t.replace('methods = ["fp32"]', "methods = []"), r"suites\.cpu\.methods: empty"),
    (lambda t: t.replace('models = ["tiny"]', "models = []"), r"suites\.cpu\.models: empty"),
    (lambda t: t.replace('models = ["tiny"]\n', ""), r"suites\.cpu\.models: required"),
    (lambda t: t.replace("context_tokens = 32", "context_tokens = 1").replace("stride = 32", "stride = 1"),
     r"accuracy\.context_tokens: must be at least 2"),
    (lambda t: t.replace("[accuracy]", '[accuracy]\ntext = "empty.txt"'), r"accuracy\.text: 'empty.txt' is empty"),
    (lambda t: t.replace("[accuracy]", '[accuracy]\ntext = "nope.txt"'),
     r"accuracy\.text: 'nope.txt' is neither a text file"),
    (lambda t: t.replace("repeats = 3", "repeats = 3\ncell_timeout_s = nan"),
     r"run\.cell_timeout_s: must be a finite number, got nan"),
    (lambda t: t.replace('reference = "fp32"', 'reference = ["fp32"]'), r"suites\.cpu\.reference: unknown method"),
])
def test_a_matrix_that_cannot_run_is_refused_by_file_and_field(tmp_path, monkeypatch, edit, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "matrix.toml").write_text(edit(MATRIX))
    with pytest.raises(MatrixError, match=message) as refused:
        load_matrix(tmp_path / "matrix.toml")
    assert str(tmp_path / "matrix.toml") in str(refused.value)


@pytest.mark.parametrize(("sizes", "message"), [
    ("0", r"--batch-sizes: 0 in no suite of .*matrix.toml; its batch sizes: 1, 2"),
    ("-1", r"--batch-sizes: -1 in no suite"),
    ("8", r"--batch-sizes: 8 in no suite"),
    (",", r"--batch-sizes: \(none\) in no suite"),
])
def test_batch_sizes_that_select_nothing_are_a_usage_error(tmp_path, sizes, message):
    session = make_session(tmp_path, **{"--batch-sizes": sizes})
    with pytest.raises(pytest.UsageError, match=message):
        session.pytest_sessionstart(None)


def test_filters_that_select_no_cell_are_a_usage_error(tmp_path):
    matrix = MATRIX + '[methods.bf16]\nbackend = "torch"\ndtype = "bfloat16"\n[suites.other]\nmodels = ["tiny"]\n' \
                      'methods = ["bf16"]\nbatch_sizes = [4]\n'
    session = make_session(tmp_path, matrix, **{"--methods": "fp32", "--batch-sizes": "4"})
    with pytest.raises(pytest.UsageError, match=r"together select no cell of .*matrix.toml"):
        session.pytest_sessionstart(None)


def test_a_tolerance_for_an_unknown_method_is_refused_like_the_matrixs_own(tmp_path):
    session = make_session(tmp_path, **{"--tolerance": ["fp23:ppl=0.1"]})
    with pytest.raises(pytest.UsageError, match=r"--tolerance 'fp23:ppl=0.1': unknown method 'fp23'; known: fp32"):
        session.pytest_sessionstart(None)
    assert Tolerances().with_cli(["fp23:ppl=0.1"]).for_cell("fp23", "ppl") == 0.1  # no matrix: nothing to check
    assert make_session(tmp_path, **{"--tolerance": ["fp32:ppl=0.1"]}).tolerances(
        make_session(tmp_path).cells()[0]).for_cell("fp32", "ppl") == 0.1


class CharTokenizer:
    """One id per character, BOS first."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * add_special_tokens + [ord(c) for c in text]}


@pytest.mark.parametrize(("text", "message"), [
    ("", r"accuracy.text '.*' gives 1 evaluation tokens; one window needs 32"),
    ("fourteen chars", r"gives 15 evaluation tokens; one window needs 32 \(accuracy.context_tokens = 32, "
                       r"accuracy.max_eval_tokens = 96\)"),
])
def test_an_evaluation_text_too_short_for_one_window_is_refused_with_the_counts(tmp_path, text, message):
    from harness.config import AccuracyConfig
    from harness.models import ModelError, ResolvedModel, eval_ids

    path = tmp_path / "short.txt"
    path.write_text(text)
    accuracy = AccuracyConfig(context_tokens=32, stride=32, max_eval_tokens=96, text=str(path))
    with pytest.raises(ModelError, match=message):
        eval_ids(ResolvedModel.__new__(ResolvedModel), CharTokenizer(), accuracy, 0)
    path.write_text("x" * 40)
    assert len(eval_ids(ResolvedModel.__new__(ResolvedModel), CharTokenizer(), accuracy, 0)) == 41


# ---- 8. unique run ids ------------------------------------------------------------------------------------------

def test_two_runs_started_in_the_same_second_never_share_files(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.time, "time", lambda: 1_700_000_000.25)  # the same instant, even
    monkeypatch.setattr(runner.os, "getpid", lambda: 4241)
    first = make_session(tmp_path)
    monkeypatch.setattr(runner.os, "getpid", lambda: 4242)  # another pytest process
    second = make_session(tmp_path)
    assert (first.run_id, second.run_id) == ("20231114T221320.250000Z-p4241", "20231114T221320.250000Z-p4242")
    [cell] = first.cells()
    for session in (first, second):
        session.runner.write_results(cell, Outcome("ok"), runner.Role.PROCESS)
    assert len(list((tmp_path / "results").glob("*.jsonl"))) == 2


def test_xdist_workers_write_under_their_controllers_run_id(tmp_path):
    controller = make_session(tmp_path)
    node = SimpleNamespace(workerinput={})
    controller.pytest_configure_node(node)
    (tmp_path / "matrix.toml").write_text(MATRIX)
    config = SimpleNamespace(rootpath=tmp_path, workerinput=node.workerinput,
                             getoption={"--matrix": str(tmp_path / "matrix.toml")}.get)
    assert plugin.QuantBench(config).run_id == controller.run_id


# ---- 5. safetensors only, where weights are loaded --------------------------------------------------------------

@pytest.fixture
def pickled_folder(tmp_path, worker_env, monkeypatch):
    """A local model whose only real weights are a pickle, beside an empty junk.safetensors."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from harness.models import synthetic_folder

    monkeypatch.setenv("QUANTBENCH_CACHE", worker_env["QUANTBENCH_CACHE"])
    source = synthetic_folder("tiny-test", 0, log=lambda message: None)
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(source).state_dict(), folder / "pytorch_model.bin")
    (folder / "junk.safetensors").write_bytes(b"")
    return folder


def test_a_pickle_beside_junk_safetensors_is_refused_unless_the_matrix_opts_in(pickled_folder):
    from harness.config import ModelSpec
    from harness.methods.dense import DenseMethod
    from harness.models import ModelError, resolve

    spec = ModelSpec(name="mine", source="local", path=str(pickled_folder))
    with pytest.raises(ModelError, match=r"model 'mine': .* holds pickle weights \(pytorch_model.bin\), which can "
                                         r"run code when loaded; .* set pickle_weights = true in \[models.mine\]"):
        resolve(spec)
    method = DenseMethod({"dtype": "float32"}, "cpu")
    with pytest.raises(OSError, match="no file named model.safetensors"):  # the loader refuses it too
        method.load(str(pickled_folder))
    opted = resolve(ModelSpec(name="mine", source="local", path=str(pickled_folder), pickle_weights=True))
    assert len(opted.provenance["weights_sha256"]) == 64
    method.pickle_weights = True
    assert method.load(str(pickled_folder)).config.hidden_size == 128


def test_empty_safetensors_weights_are_refused_and_the_weights_hash_is_in_the_provenance(pickled_folder):
    from harness.config import ModelSpec
    from harness.models import ModelError, resolve, synthetic_folder

    (pickled_folder / "pytorch_model.bin").unlink()
    (pickled_folder / "model.safetensors").write_bytes(b"")
    spec = ModelSpec(name="mine", source="local", path=str(pickled_folder))
    with pytest.raises(ModelError, match=r"model.safetensors is not a readable safetensors file"):
        resolve(spec)
    shard = next(synthetic_folder("tiny-test", 0, log=lambda message: None).glob("model-*.safetensors"))
    (pickled_folder / "model.safetensors").write_bytes(shard.read_bytes())
    first = resolve(spec).provenance["weights_sha256"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (pickled_folder / "model.safetensors").write_bytes(bytes(data))
    assert resolve(spec).provenance["weights_sha256"] != first


# ---- 3. cached artifacts are verified by content before a measured run uses them -------------------------------

@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def overwrite_in_place(path: Path) -> bytes:
    """Flip one byte near the end (behind any header), keeping the size and restoring the mtime; the old bytes."""
    stat = path.stat()
    data = path.read_bytes()
    changed = bytearray(data)
    changed[-3] ^= 0xFF
    path.write_bytes(bytes(changed))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    return data


def test_a_file_overwritten_in_place_with_its_mtime_restored_is_hashed_again(private_cache, tmp_path):
    from harness.cache import file_sha256, sha256_file

    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 4096)
    before = file_sha256(path)
    overwrite_in_place(path)
    assert file_sha256(path) == sha256_file(path) != before


def test_a_cached_gguf_overwritten_in_place_is_rebuilt(private_cache):
    from harness.gguf import gguf_file
    from harness.models import synthetic_folder

    folder = synthetic_folder("tiny-test", 0, log=lambda message: None)
    path = gguf_file(folder, "q8_0", log=lambda message: None)
    good = overwrite_in_place(path)
    logs = []
    assert gguf_file(folder, "q8_0", log=logs.append) == path
    assert any("unusable (sha256 differs from the one recorded at build time); rebuilding" in line for line in logs)
    assert path.read_bytes() == good


def test_cached_synthetic_weights_changed_behind_their_header_are_rebuilt(private_cache):
    from harness.cache import MANIFEST
    from harness.models import synthetic_folder

    folder = synthetic_folder("tiny-test", 0, log=lambda message: None)
    [shard] = folder.glob("model-*.safetensors")
    good = overwrite_in_place(shard)
    logs = []
    assert synthetic_folder("tiny-test", 0, log=logs.append) == folder
    assert any("differ from when they were built (the sha256 of model-00001.safetensors differs" in line
               for line in logs), logs
    assert shard.read_bytes() == good
    (folder / MANIFEST).unlink()  # a cache built before manifests: recorded as it is, not rebuilt
    logs.clear()
    assert synthetic_folder("tiny-test", 0, log=logs.append) == folder and not logs
    assert (folder / MANIFEST).is_file()


def test_a_quantized_checkpoint_corrupted_behind_an_intact_header_is_rebuilt(private_cache):
    from harness.cache import MANIFEST
    from harness.models import synthetic_folder
    from harness.quant import QuantSpec, quantized_folder

    source = synthetic_folder("tiny-test", 0, log=lambda message: None)
    spec = QuantSpec(format="gptq", quantizer="rtn", group_size=32, sym=True)
    folder, built = quantized_folder(source, spec, None, "cpu", log=lambda message: None)
    assert built["fresh"]
    good = overwrite_in_place(folder / "model.safetensors")
    logs = []
    again, cached = quantized_folder(source, spec, None, "cpu", log=logs.append)
    assert again == folder and cached["fresh"] and any("is unusable (the sha256 of model.safetensors" in line
                                                       for line in logs), logs
    assert (folder / "model.safetensors").read_bytes() == good
    (folder / MANIFEST).unlink()  # built before manifests: its tensors check out, so it is recorded and used
    assert not quantized_folder(source, spec, None, "cpu", log=lambda message: None)[1]["fresh"]
    assert (folder / MANIFEST).is_file()


def test_cached_reference_logits_that_changed_are_computed_again(private_cache, tmp_path):
    import numpy as np

    from harness.cache import MANIFEST
    from harness.measure.divergence import Reference, ReferenceError

    path = tmp_path / "reference"
    key = {"model": "tiny"}
    Reference(key, np.zeros((4, 2), dtype=np.int64), np.zeros((4, 2), dtype=np.float32),
              np.ones(4)).save(path)
    assert Reference.cached(path) and Reference.load(path, key).nll.sum() == 4
    overwrite_in_place(path / "reference.npz")
    assert not Reference.cached(path)  # the reference step computes it again
    with pytest.raises(ReferenceError, match="the sha256 of reference.npz differs"):
        Reference.load(path, key)
    Reference(key, np.zeros((4, 2), dtype=np.int64), np.zeros((4, 2), dtype=np.float32), np.ones(4)).save(path)
    (path / MANIFEST).unlink()  # saved before manifests: checked by loading, then recorded
    assert Reference.cached(path) and (path / MANIFEST).is_file()


def test_the_embedded_model_is_checked_against_its_recorded_hash(private_cache, tmp_path):
    import hashlib

    from harness import embedded
    from harness.cache import MANIFEST, write_manifest

    folder = tmp_path / "embedded"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / embedded.METADATA_FILE).write_text(json.dumps(
        {"model_sha256": hashlib.sha256(b"weights" * 100).hexdigest()}))
    assert embedded._changed(folder) is None and (folder / MANIFEST).is_file()  # an older build: recorded
    overwrite_in_place(folder / "model.safetensors")
    assert "the sha256 of model.safetensors differs" in embedded._changed(folder)
    (folder / MANIFEST).unlink()
    assert embedded._changed(folder) == "the sha256 of model.safetensors differs from its metadata's"
    write_manifest(folder)
    assert embedded._changed(folder) is None
