"""Fuzzing the two readers of hand-edited files: any input loads, or fails naming the file (and the field).

Never an uncaught exception: a baseline file and a matrix file are edited by people and merged by git.
"""

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.baselines import BaselineError, BaselineStore
from harness.config import MatrixError
from harness.figure import Figure
from harness.matrix import load_matrix, parse_matrix
from harness.results import CellResult

HW, MODEL = "fuzz-host", "tiny"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["fp32", "tiny", "b1", "fp32|tiny|b1", "2026-12-01T00:00:00+00:00",
                                     "ppl", "decode_tokens_per_s", "task:x:acc", "cpu", "cuda", "torch"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def valid_document() -> dict[str, Any]:
    cells = [CellResult("fp32", MODEL, 1, {"decode_tokens_per_s": Figure.of([10.0, 11.0]), "ppl": Figure(7.0)},
                        config={"run": {}}, details={"measured_at": "2026-12-01T00:00:00+00:00"}),
             CellResult("fp32", MODEL, None, {"top1_agreement": Figure(0.9)})]
    with tempfile.TemporaryDirectory() as tmp:
        store = BaselineStore(Path(tmp))
        [path] = store.merge(HW, cells)
        return json.loads(path.read_text())


VALID = valid_document()


def paths_of(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a decoded JSON document (keys and list indices)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths_of(item, (*prefix, index))
    return found


@st.composite
def mutated(draw, document: dict[str, Any]) -> Any:
    """`document` with a few of its values replaced, deleted or given a stray sibling."""
    data = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        targets = paths_of(data)
        path = draw(st.sampled_from(targets))
        if not path:
            data = draw(json_values)
            continue
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace" or isinstance(parent, list) and action == "delete":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
    return data


def load_text(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = BaselineStore(Path(tmp))
        path = store.path(HW, MODEL)
        path.parent.mkdir(parents=True)
        path.write_bytes(text)
        try:
            store.load(HW, MODEL)
        except BaselineError as exc:
            assert str(path) in str(exc), exc


@FUZZ
@given(mutated(VALID))
def test_a_mutated_baseline_file_loads_or_names_its_file_and_field(document):
    load_text(json.dumps(document).encode())


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 json_values.map(lambda value: json.dumps(value).encode())))
def test_arbitrary_bytes_as_a_baseline_file_load_or_name_the_file(raw):
    load_text(raw)


@FUZZ
@given(st.sampled_from(["schema_version", "n", "value", "spread", "samples"]), st.integers(300, 5000))
def test_integer_literals_beyond_any_float_or_decoder_limit_name_the_file(field, digits):
    text = json.dumps(VALID)
    target = {"schema_version": '"schema_version": 1', "n": '"n": 2', "value": '"value": 10.5',
              "spread": '"spread": 0.7071067811865476', "samples": '"samples": [10.0'}[field]
    assert target in text
    head, _ = target.rsplit(" ", 1)
    load_text(text.replace(target, f"{head} {'[' if field == 'samples' else ''}{'9' * digits}", 1).encode())


MATRIX: dict[str, Any] = {
    "run": {"prompt_tokens": 8, "new_tokens": 6, "repeats": 3, "cell_timeout_s": 120.0},
    "accuracy": {"context_tokens": 32, "stride": 32, "max_eval_tokens": 96},
    "eval": {"tasks": ["quantbench_word_order"], "limit": 0},
    "tolerances": {"ppl": 0.02, "noise_sigmas": 2.0, "methods": {"fp32": {"decode_tokens_per_s": 0.2}}},
    "models": {"tiny": {"source": "synthetic", "arch": "tiny-test", "seed": 0},
               "local": {"source": "local", "path": "/nowhere", "pickle_weights": False}},
    "methods": {"fp32": {"backend": "torch", "dtype": "float32"},
                "nf4": {"backend": "bnb", "quant": "nf4"},
                "q4": {"backend": "gguf", "qtype": "q4_0"},
                "gptq": {"backend": "gptq", "bits": 4, "group_size": 32}},
    "suites": {"cpu": {"models": ["tiny"], "methods": ["fp32", "q4"], "batch_sizes": [1, 2], "reference": "fp32",
                       "run": {"warmup": 0}, "tolerances": {"ttft_ms": 1.0}}},
}


@FUZZ
@given(mutated(MATRIX))
def test_a_mutated_matrix_loads_or_names_the_file_and_field(data):
    try:
        matrix = parse_matrix(data, "fuzz.toml")
    except MatrixError as exc:
        assert str(exc).startswith("fuzz.toml: ") and len(str(exc)) > len("fuzz.toml: "), exc  # file, then field
    else:
        assert matrix.suites and all(suite.methods and suite.models for suite in matrix.suites.values())


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.integers(4000, 5000).map(lambda digits: f"[run]\nnew_tokens = {'9' * digits}\n".encode())))
def test_arbitrary_bytes_as_a_matrix_file_load_or_name_the_file(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "matrix.toml")
        path.write_bytes(raw)
        try:
            load_matrix(path)
        except MatrixError as exc:
            assert str(path) in str(exc), exc
