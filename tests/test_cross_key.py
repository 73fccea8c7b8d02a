"""Accuracy gated across CPU hardware keys: a CPU cell's accuracy figures meet another CPU key's baseline where
the weights and the library versions that decide them match, and only then; speed and memory never cross keys.

`BaselineStore.gate_baseline` picks the baseline of each figure, and the one judge (`gate.judge`) uses it, live and
offline alike; the notice at the top of a run whose key has no baselines comes from `gate.no_baselines_notices`.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import plugin
from harness.baselines import BaselineStore, accuracy_differences
from harness.cli import main
from harness.figure import Figure
from harness.gate import GatePolicy, Status, judge
from harness.results import RESULTS_SCHEMA_VERSION, CellResult
from harness.tolerances import Tolerances

RECORDED = "cpu-recorded-2c"  # the key whose baselines exist
UNSEEN = "cpu-unseen-2c"  # a CPU key with none
WEIGHTS = "b8c8040118916ccbba198a21c740110b58892dd35d0c224300eb33c56b82ee37"
VERSIONS = {"torch": "2.13.0", "transformers": "5.17.0", "bitsandbytes": "0.50.2", "numpy": "2.4.6"}
POLICY = GatePolicy({"cpu": Tolerances()})
STRICT = GatePolicy({"cpu": Tolerances()}, strict_baselines=True)
CONFIG = {"suite": "cpu", "method": {"name": "bnb-nf4-cpu", "backend": "bnb"}, "model": {"name": "embedded"},
          "run": {"new_tokens": 6}, "accuracy": {"stride": 32}}


def model_cell(ppl: float = 75.0, kld: float = 0.02, weights: str | None = WEIGHTS, key: str = RECORDED,
               **versions: str) -> CellResult:
    """The per-model cell of bnb-nf4-cpu on the embedded model, as a worker of `key` reports it."""
    details = {"model": {"source": "embedded"}, "accuracy_packages": ["torch", "transformers", "bitsandbytes"]}
    if weights:
        details["model"]["weights_sha256"] = weights
    return CellResult("bnb-nf4-cpu", "embedded", None,
                      {"ppl": Figure(ppl), "kld_mean": Figure(kld), "load_s": Figure(3.0)}, config=CONFIG,
                      environment={"packages": {**VERSIONS, **versions}},
                      hardware={"hardware_key": key, "device": "cpu"}, details=details)


def batch_cell(decode: float = 100.0, key: str = RECORDED) -> CellResult:
    return CellResult("bnb-nf4-cpu", "embedded", 1, {"decode_tokens_per_s": Figure.of([decode, decode * 1.01]),
                                                     "peak_anon_rss_mib": Figure(400.0)},
                      config=CONFIG, environment={"packages": dict(VERSIONS)},
                      hardware={"hardware_key": key, "device": "cpu"},
                      details={"model": {"source": "embedded", "weights_sha256": WEIGHTS}})


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    store = BaselineStore(tmp_path / "baselines")
    store.merge(RECORDED, [model_cell(), batch_cell()])
    return store


def checks(verdict) -> dict[str, object]:
    return {check.metric: check for check in verdict.checks if check.metric}


def test_matching_weights_and_versions_are_compared_against_the_other_cpu_key(store):
    verdict = judge(model_cell(ppl=75.1, key=UNSEEN), store.gate_baseline(UNSEEN, model_cell()), POLICY,
                    metrics=["ppl", "kld_mean"])
    assert verdict.status is Status.PASS and not verdict.failed
    assert {name: (c.status, c.baseline_key) for name, c in checks(verdict).items()} == {
        "ppl": (Status.PASS, RECORDED), "kld_mean": (Status.PASS, RECORDED)}
    assert all(line.endswith(f"[baseline of {RECORDED}]") for line in verdict.lines())


def test_a_regression_against_the_other_key_fails_naming_that_key(store):
    verdict = judge(model_cell(ppl=80.0), store.gate_baseline(UNSEEN, model_cell()), POLICY, metrics=["ppl"])
    assert verdict.status is Status.REGRESSED and verdict.failed
    assert f"held to the baseline of {RECORDED}" in verdict.failure_text()
    assert verdict.lines()[0].startswith("FAIL ppl of bnb-nf4-cpu|embedded regressed 6.7%")


@pytest.mark.parametrize("measured, why", [
    (model_cell(torch="2.12.0"), "torch differs (2.13.0 -> 2.12.0)"),
    (model_cell(bitsandbytes="0.49.0"), "bitsandbytes differs (0.50.2 -> 0.49.0)"),
    (model_cell(weights="0" * 64), "weights differ (baseline sha256 b8c8040118916ccb, now 0000000000000000)"),
    (model_cell(weights=None), "weights unknown (this run records no weights sha256 for its model)"),
])
def test_what_decides_accuracy_differing_means_not_compared_with_why(store, measured, why):
    verdict = judge(measured, store.gate_baseline(UNSEEN, measured), POLICY, metrics=["ppl", "kld_mean"])
    assert verdict.status is Status.NOT_COMPARED and not verdict.failed
    for check in checks(verdict).values():
        assert check.status is Status.NOT_COMPARED and not check.compared
        assert check.message.endswith(f"not compared ({UNSEEN}: no baseline; {RECORDED}: {why})")
    assert verdict.lines()[0].startswith("new  ppl of bnb-nf4-cpu|embedded: not compared (")


def quantized(checkpoint: str | None, **more) -> CellResult:
    """A cell whose method built a checkpoint (GPTQModel's): its sha256 decides the accuracy figures too."""
    cell = model_cell(**more)
    if checkpoint:
        cell.details["quantization"] = {"checkpoint": "/cache/quant/gptq", "weights_sha256": checkpoint}
    return cell


def test_a_checkpoint_quantized_into_other_weights_is_not_compared_across_keys(tmp_path):
    """GPTQModel's calibration on an AMX Xeon and an AVX2 EPYC made checkpoints 1.5 % apart in perplexity: a figure
    of another checkpoint is no regression of the code, so it is not compared; the same checkpoint is."""
    store = BaselineStore(tmp_path)
    store.merge(RECORDED, [quantized("a" * 64)])
    same = judge(quantized("a" * 64, ppl=75.1, key=UNSEEN), store.gate_baseline(UNSEEN, quantized("a" * 64)),
                 POLICY, metrics=["ppl"])
    assert same.status is Status.PASS and checks(same)["ppl"].baseline_key == RECORDED
    other = quantized("b" * 64, ppl=80.0, key=UNSEEN)
    verdict = judge(other, store.gate_baseline(UNSEEN, other), POLICY, metrics=["ppl"])
    assert verdict.status is Status.NOT_COMPARED and not verdict.failed
    assert (f"{RECORDED}: quantized weights differ (baseline checkpoint sha256 aaaaaaaaaaaaaaaa, now "
            "bbbbbbbbbbbbbbbb: quantized through other kernels or inputs)") in verdict.checks[0].message
    # a baseline recorded before checkpoints were hashed does not qualify for a cell that has one
    old = BaselineStore(tmp_path / "old")
    old.merge(RECORDED, [quantized(None)])
    verdict = judge(other, old.gate_baseline(UNSEEN, other), POLICY, metrics=["ppl"])
    assert "quantized weights unknown (the baseline records no sha256 of its checkpoint" in verdict.checks[0].message
    # on its own key a new checkpoint is still held to the old one's figures: a broken quantizer fails there
    own = judge(quantized("b" * 64, ppl=80.0), store.gate_baseline(RECORDED, quantized("b" * 64)), POLICY,
                metrics=["ppl"])
    assert own.status is Status.REGRESSED


def test_a_version_that_does_not_decide_accuracy_may_differ(store):
    measured = model_cell(numpy="3.0.0")  # numpy is no accuracy package of bnb
    assert accuracy_differences(measured, store.get(RECORDED, measured)) == []
    assert judge(measured, store.gate_baseline(UNSEEN, measured), POLICY, metrics=["ppl"]).status is Status.PASS


def test_a_baseline_without_a_weights_hash_is_never_compared_across_keys(tmp_path):
    """The baselines recorded before weights were hashed (the Xeon's, on an older embedded model)."""
    store = BaselineStore(tmp_path)
    store.merge(RECORDED, [model_cell(weights=None)])
    verdict = judge(model_cell(), store.gate_baseline(UNSEEN, model_cell()), POLICY, metrics=["ppl"])
    assert verdict.status is Status.NOT_COMPARED
    assert "weights unknown (the baseline records no weights sha256; re-record it)" in verdict.checks[0].message


def test_strict_baselines_fails_a_figure_not_compared(store):
    measured = model_cell(torch="2.12.0")
    verdict = judge(measured, store.gate_baseline(UNSEEN, measured), STRICT, metrics=["ppl"])
    assert verdict.failed and "ppl of bnb-nf4-cpu|embedded: not compared (" in verdict.failure_text()
    assert verdict.lines()[0].startswith("FAIL ppl of bnb-nf4-cpu|embedded: not compared (")


def test_speed_and_memory_never_cross_keys(store):
    measured = batch_cell(decode=10.0, key=UNSEEN)  # ten times slower: no other key's baseline may judge it
    verdict = judge(measured, store.gate_baseline(UNSEEN, measured), POLICY)
    assert verdict.status is Status.MISSING and not verdict.failed
    assert not any(check.compared for check in verdict.checks)
    assert judge(measured, store.gate_baseline(UNSEEN, measured), STRICT).failed
    # the per-model cell's load time stays per key too, while its accuracy crosses
    whole = judge(model_cell(), store.gate_baseline(UNSEEN, model_cell()), POLICY)
    assert {c.metric: c.baseline_key for c in whole.checks if c.compared} == {"kld_mean": RECORDED, "ppl": RECORDED}
    assert any(c.status is Status.MISSING and c.metric is None and UNSEEN in c.message for c in whole.checks)


def test_gpu_keys_never_cross(tmp_path):
    store = BaselineStore(tmp_path)
    store.merge("nvidia-h200-140gb", [model_cell()])
    baseline = store.gate_baseline("nvidia-h100-80gb-hbm3", model_cell())
    assert baseline.accuracy is baseline.own and baseline.own.cell is None
    store.merge(RECORDED, [model_cell()])  # a CPU key's baseline never judges a GPU key's cell either
    assert store.gate_baseline("nvidia-h100-80gb-hbm3", model_cell()).accuracy.cell is None


def test_the_own_keys_baseline_without_a_weights_hash_gives_way_to_another_keys(tmp_path):
    """A Xeon's own baselines, recorded on an earlier embedded model, never judge its accuracy once the cell
    records its weights; another key's baseline of the same weights and versions does."""
    store = BaselineStore(tmp_path)
    store.merge(UNSEEN, [model_cell(ppl=80.0, weights=None)])
    verdict = judge(model_cell(), store.gate_baseline(UNSEEN, model_cell()), POLICY)
    assert verdict.status is Status.NOT_COMPARED and not verdict.failed
    assert f"{UNSEEN}: weights unknown (the baseline records no weights sha256" in verdict.checks[0].message
    assert [c.baseline_key for c in verdict.checks if c.compared] == [UNSEEN]  # load_s: its own key's, as before
    store.merge(RECORDED, [model_cell()])
    assert store.gate_baseline(UNSEEN, model_cell()).accuracy.key == RECORDED
    synthetic = model_cell(weights=None)  # a cell without a weights hash gates its own key as before
    assert store.gate_baseline(UNSEEN, synthetic).accuracy.key == UNSEEN


def test_the_own_key_wins_and_other_weights_there_look_elsewhere(tmp_path):
    store = BaselineStore(tmp_path)
    store.merge(RECORDED, [model_cell()])
    store.merge(UNSEEN, [model_cell(weights="1" * 64)])  # the own key's baseline is of other weights
    baseline = store.gate_baseline(UNSEEN, model_cell())
    assert baseline.own.cell is not None and baseline.accuracy.key == RECORDED
    store.merge(UNSEEN, [model_cell(ppl=70.0)])  # the same weights on the own key: it gates, whatever else
    assert store.gate_baseline(UNSEEN, model_cell()).accuracy.key == UNSEEN


def test_no_baseline_on_any_key_is_missing_as_before(tmp_path):
    verdict = judge(model_cell(), BaselineStore(tmp_path).gate_baseline(UNSEEN, model_cell()), STRICT,
                    metrics=["ppl"])
    assert verdict.status is Status.MISSING and verdict.failed and "no baseline in" in verdict.failure_text()


def write_run(path: Path, key: str, results: list[CellResult]) -> Path:
    record = {"schema_version": RESULTS_SCHEMA_VERSION, "cell": "bnb-nf4-cpu|embedded", "suite": "cpu",
              "hardware_key": key, "role": "process", "status": "ok", "reason": "", "wall_s": 1.0,
              "results": [r.to_dict() for r in results]}
    path.write_text(json.dumps(record) + "\n")
    return path


MATRIX = """
[models.embedded]
source = "embedded"
[methods.bnb-nf4-cpu]
backend = "bnb"
quant = "nf4"
[suites.cpu]
models = ["embedded"]
methods = ["bnb-nf4-cpu"]
batch_sizes = [1]
"""


def test_quantbench_gate_puts_the_notice_first_and_names_each_figures_key(store, tmp_path, capsys):
    (tmp_path / "matrix.toml").write_text(MATRIX)
    run = write_run(tmp_path / "run.jsonl", UNSEEN, [model_cell(key=UNSEEN), batch_cell(key=UNSEEN)])
    code = main(["--baselines-dir", str(store.root), "gate", str(run), "--matrix", str(tmp_path / "matrix.toml")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].startswith(f"NOTICE: hardware key {UNSEEN} has no baselines in {store.root} "
                               f"(keys stored: {RECORDED}): its speed and memory figures had no baselines")
    assert f"ok   ppl of bnb-nf4-cpu|embedded did not change (baseline 75, measured 75; tolerance 1.0%, noise 0.0%)" \
           f" [baseline of {RECORDED}]" in lines
    assert f"new  bnb-nf4-cpu|embedded|b1: no baseline under {UNSEEN}" in lines
    strict = main(["--baselines-dir", str(store.root), "gate", str(run), "--matrix", str(tmp_path / "matrix.toml"),
                   "--strict-baselines"])
    assert strict == 1


def test_quantbench_gate_of_a_key_with_baselines_has_no_notice(store, tmp_path, capsys):
    (tmp_path / "matrix.toml").write_text(MATRIX)
    run = write_run(tmp_path / "run.jsonl", RECORDED, [model_cell(), batch_cell()])
    assert main(["--baselines-dir", str(store.root), "gate", str(run), "--matrix", str(tmp_path / "matrix.toml")]) == 0
    assert "NOTICE" not in capsys.readouterr().out


class Reporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, title: str) -> None:
        self.lines.append(f"== {title} ==")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def test_the_pytest_summary_starts_with_the_notice_and_records_each_figures_key(store, tmp_path):
    values = {"--baselines-dir": str(store.root), "--results-dir": str(tmp_path / "results"), "--tolerance": []}
    session = plugin.QuantBench(SimpleNamespace(rootpath=tmp_path, getoption=values.get))
    session.records = [
        {"cell": "bnb-nf4-cpu|embedded", "suite": "cpu", "hardware_key": UNSEEN, "status": "ok",
         "figures": {"ppl": {"value": 75.0, "spread": 0.0, "n": 1, "baseline": 75.0, "baseline_key": RECORDED,
                             "change": 0.0}}},
        {"cell": "bnb-nf4-cpu|embedded|b1", "suite": "cpu", "hardware_key": UNSEEN, "status": "missing",
         "figures": {"decode_tokens_per_s": {"value": 100.0, "spread": 1.0, "n": 2}}},
    ]
    reporter = Reporter()
    session.pytest_terminal_summary(reporter)
    assert reporter.lines[1].startswith(f"NOTICE: hardware key {UNSEEN} has no baselines")
    assert reporter.lines[2].split() == ["cell", "metric", "value", "unit", "baseline", "baseline", "key", "worse",
                                         "by", "status"]
    assert any(line.split()[:2] == ["bnb-nf4-cpu|embedded", "ppl"] and RECORDED in line for line in reporter.lines)
    assert any("1 cell(s) have no baseline for this hardware" in line for line in reporter.lines)


def heldout_ppl(method, model, ids: list[int]) -> float:
    import torch

    logits = method.logits(model, ids)
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())


def test_a_broken_quantizer_fails_the_cross_key_accuracy_check(tmp_path):
    """The shipped embedded model through the torch method, with its weights corrupted as a broken quantizer
    would (`Method.corrupt_weights`, what --inject-weight-noise does in the worker): against another CPU key's
    baseline of the intact model, the intact model passes and the broken one fails, naming that key."""
    from transformers import AutoTokenizer

    from harness.corpus import split
    from harness.embedded import SHIPPED_MODEL_SHA256, shipped
    from harness.methods.dense import DenseMethod

    folder = str(shipped())
    ids = AutoTokenizer.from_pretrained(folder)(split().heldout[:4000])["input_ids"][:256]
    method = DenseMethod({"dtype": "float32"}, "cpu")
    model = method.load(folder)
    intact = heldout_ppl(method, model, ids)
    assert method.corrupt_weights(model, 0.2, seed=0) > 0
    broken = heldout_ppl(method, model, ids)
    again = method.load(folder)  # nothing on disk changed
    assert heldout_ppl(method, again, ids) == intact

    store = BaselineStore(tmp_path)
    store.merge(RECORDED, [model_cell(ppl=intact, weights=SHIPPED_MODEL_SHA256)])
    for ppl, status in ((intact, Status.PASS), (broken, Status.REGRESSED)):
        measured = model_cell(ppl=ppl, weights=SHIPPED_MODEL_SHA256, key=UNSEEN)
        verdict = judge(measured, store.gate_baseline(UNSEEN, measured), POLICY, metrics=["ppl"])
        assert verdict.status is status, (intact, broken, verdict.lines())
        assert verdict.checks[0].baseline_key == RECORDED
    assert f"held to the baseline of {RECORDED}" in verdict.failure_text()


def test_the_worker_records_the_sha256_of_a_checkpoint_the_method_built(tmp_path):
    from harness import worker
    from harness.models import weights_digest

    folder = tmp_path / "gptq"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"packed int4 weights")
    (folder / "quantize_config.json").write_text("{}")
    cell = model_cell()
    worker._quantization({"checkpoint": str(folder), "fresh": True, "quantize_s": 12.0}, cell)
    assert cell.details["quantization"]["weights_sha256"] == weights_digest([folder / "model.safetensors"])
    assert cell.figures["quantize_s"].value == 12.0
    plain = model_cell()  # a method without a checkpoint folder (bitsandbytes quantizes at load) records none
    worker._quantization({"quantize_s": 1.0}, plain)
    assert "weights_sha256" not in plain.details["quantization"]
