"""Task accuracy through lm-eval: the local word-order task, its config, its metric names, and its runs."""

import json

import pytest

from harness.config import EvalConfig, MatrixError
from harness.evaluate import LOCAL_TASK, EvalUnavailable, run_tasks, word_order_task
from harness.matrix import parse_matrix
from harness.metrics import METRICS


def test_the_local_task_is_four_way_multiple_choice_over_word_orders(tmp_path):
    folder = word_order_task(tmp_path / "a", seed=0)
    rows = [json.loads(line) for line in (folder / f"{LOCAL_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) >= 40
    for row in rows:
        assert len(row["choices"]) == 4 and 0 <= row["label"] < 4
        assert len(set(row["choices"])) == 4 and row["context"]
        assert len({tuple(sorted(choice.split())) for choice in row["choices"]}) == 1  # the same words reordered
    assert {row["label"] for row in rows} == {0, 1, 2, 3}  # the real ending is not always in one place
    again = word_order_task(tmp_path / "b", seed=0)
    assert (again / f"{LOCAL_TASK}.jsonl").read_text() == (folder / f"{LOCAL_TASK}.jsonl").read_text()
    assert f"task: {LOCAL_TASK}" in (folder / f"{LOCAL_TASK}.yaml").read_text()


def test_task_metric_names_are_known_with_a_direction():
    assert "task:arc_easy:acc" in METRICS and METRICS["task:arc_easy:acc"].higher_is_better
    for bad in ("task:arc_easy", "task::acc", "task:a:b:c", "tasks:a:acc"):
        assert bad not in METRICS


MATRIX = {
    "models": {"m": {"source": "embedded"}},
    "methods": {"fp32": {"backend": "torch", "dtype": "float32"}},
    "suites": {"cpu": {"models": ["m"], "methods": ["fp32"]}},
}


def test_eval_settings_come_from_the_matrix_and_bad_ones_are_named():
    matrix = parse_matrix({**MATRIX, "eval": {"limit": 50},
                           "suites": {"cpu": {**MATRIX["suites"]["cpu"], "eval": {"tasks": ["arc_easy"]}}}}, "m.toml")
    assert matrix.suites["cpu"].eval == EvalConfig(tasks=("arc_easy",), limit=50, batch_size=8)
    with pytest.raises(MatrixError, match=r"m.toml: suites.cpu.eval.tasks\[0\]"):
        parse_matrix({**MATRIX, "suites": {"cpu": {**MATRIX["suites"]["cpu"], "eval": {"tasks": [3]}}}}, "m.toml")
    with pytest.raises(MatrixError, match=r"m.toml: eval.shots: unknown field"):
        parse_matrix({**MATRIX, "eval": {"shots": 5}}, "m.toml")


def test_models_lm_eval_cannot_score_say_why(tmp_path):
    with pytest.raises(EvalUnavailable, match="no tokenizer"):
        run_tasks(object(), None, [LOCAL_TASK], 10, 1, tmp_path, 0)
    with pytest.raises(EvalUnavailable, match="needs a transformers model"):
        run_tasks(object(), object(), [LOCAL_TASK], 10, 1, tmp_path, 0)


@pytest.fixture(scope="module")
def embedded_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness import embedded

    folder = embedded.build(log=lambda message: None)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_the_embedded_model_beats_chance_and_unknown_tasks_are_reported(embedded_model, tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = embedded_model
    report = run_tasks(model, tokenizer, [LOCAL_TASK, "no_such_task"], None, 8, tmp_path / "tasks", 0)
    accuracy = report["figures"][f"task:{LOCAL_TASK}:acc"]
    assert accuracy > 0.5  # chance is 0.25 (the model scores 0.80 on all 50 passages)
    assert report["tasks"][LOCAL_TASK]["metrics"]["acc"]["stderr"] > 0
    assert "unavailable" in report["tasks"]["no_such_task"]
