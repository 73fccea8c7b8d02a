"""The baseline store: its file format, its validation, and merges that never lose or corrupt a file."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import harness.cache
from harness.baselines import SCHEMA_VERSION, BaselineError, BaselineStore
from harness.figure import Figure
from harness.results import CellResult

HW = "nvidia-h200-141gb"
MODEL = "tinyllama-1.1b-arch"
KEY = "fp16|tinyllama-1.1b-arch|b1"


def make_cell(method: str = "fp16", model: str = MODEL, batch_size: int | None = 1, ppl: float = 7.25,
              error: str | None = None) -> CellResult:
    return CellResult(
        method=method,
        model=model,
        batch_size=batch_size,
        figures={
            "ppl": Figure(ppl),
            "decode_tokens_per_s": Figure.of([101.0, 99.5, 100.25]),
        },
        config={"dtype": "float16", "new_tokens": 32},
        environment={"torch": "2.13.0"},
        hardware={"gpu": "NVIDIA H200"},
        details={"oom": False},
        error=error,
    )


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    return BaselineStore(tmp_path / "baselines")


def stored(store: BaselineStore, model: str = MODEL) -> dict[str, Any]:
    return json.loads(store.path(HW, model).read_text())


def write_raw(store: BaselineStore, text: str, model: str = MODEL) -> Path:
    path = store.path(HW, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def corrupt(store: BaselineStore, change: Any) -> Path:
    """Store one valid cell, then rewrite its file with `change` applied to the decoded document."""
    store.merge(HW, [make_cell()])
    document = stored(store)
    change(document)
    return write_raw(store, json.dumps(document, indent=2))


def test_merge_then_load_round_trips(store: BaselineStore) -> None:
    cells = [make_cell(), make_cell("bnb-int8", batch_size=8), make_cell("awq", batch_size=None)]
    assert store.merge(HW, cells) == [store.path(HW, MODEL)]
    assert store.load(HW, MODEL) == {cell.id: cell for cell in cells}
    assert store.get(HW, cells[1]) == cells[1]
    assert store.get(HW, make_cell("gptq")) is None


def test_the_file_follows_the_documented_layout(store: BaselineStore) -> None:
    store.merge(HW, [make_cell()])
    path = store.path(HW, MODEL)
    text = path.read_text()
    document = json.loads(text)
    assert path == store.root / HW / f"{MODEL}.json"
    assert text.endswith("}\n") and text == json.dumps(document, sort_keys=True, indent=2) + "\n"
    assert document["schema_version"] == SCHEMA_VERSION
    assert (document["hardware_key"], document["model"]) == (HW, MODEL)
    cell = document["cells"][KEY]
    assert cell["id"] == KEY
    assert cell["figures"]["ppl"] == {"value": 7.25, "spread": 0.0, "n": 1, "samples": []}
    recorded_at = datetime.fromisoformat(cell["recorded_at"])
    assert recorded_at.utcoffset() == timezone.utc.utcoffset(None)


def test_recorded_at_is_when_the_cell_was_measured(store: BaselineStore) -> None:
    """A results file merged later (quantbench import-results) keeps the time its worker measured the cell;
    a cell without that stamp gets the merge's time."""
    measured = make_cell()
    measured.details["measured_at"] = "2026-11-28T18:48:36+00:00"
    store.merge(HW, [measured, make_cell("gptq")])
    document = json.loads(store.path(HW, MODEL).read_text())
    assert document["cells"][KEY]["recorded_at"] == "2026-11-28T18:48:36+00:00"
    other = datetime.fromisoformat(document["cells"][make_cell("gptq").id]["recorded_at"])
    assert abs((datetime.now(timezone.utc) - other).total_seconds()) < 60
    stamped_badly = make_cell("awq")
    stamped_badly.details["measured_at"] = "yesterday"
    with pytest.raises(BaselineError, match=r"recorded_at.*expected an ISO 8601 time, got 'yesterday'"):
        store.merge(HW, [stamped_badly])
    assert json.loads(store.path(HW, MODEL).read_text()) == document  # nothing written


def test_a_missing_file_loads_as_no_cells(store: BaselineStore) -> None:
    assert store.load(HW, MODEL) == {}
    assert store.get(HW, make_cell()) is None
    assert store.hardware_keys() == []


def test_merge_replaces_its_cells_and_keeps_every_other(store: BaselineStore) -> None:
    store.merge(HW, [make_cell("fp16"), make_cell("bnb-int8"), make_cell("fp16", model="llama-2-7b-arch")])
    other_model = store.path(HW, "llama-2-7b-arch").read_bytes()
    kept = stored(store)["cells"]["bnb-int8|tinyllama-1.1b-arch|b1"]

    assert store.merge(HW, [make_cell("fp16", ppl=8.5), make_cell("awq")]) == [store.path(HW, MODEL)]

    loaded = store.load(HW, MODEL)
    assert sorted(loaded) == ["awq|tinyllama-1.1b-arch|b1", "bnb-int8|tinyllama-1.1b-arch|b1", KEY]
    assert loaded[KEY].figures["ppl"].value == 8.5
    assert stored(store)["cells"]["bnb-int8|tinyllama-1.1b-arch|b1"] == kept
    assert store.path(HW, "llama-2-7b-arch").read_bytes() == other_model


def recording(decode: list[float], uuid: str, when: str, ppl: float = 7.25, stride: int = 32) -> CellResult:
    """One machine's recording of the same cell: the same config, another card and time."""
    cell = make_cell(ppl=ppl)
    cell.figures["decode_tokens_per_s"] = Figure.of(decode)
    cell.config = {**cell.config, "accuracy": {"stride": stride}}
    cell.hardware = {"gpu": {"name": "NVIDIA H200", "uuid": uuid}, "cpu": "Xeon"}
    cell.details = {"measured_at": when}
    return cell


def test_pooling_keeps_every_recordings_samples_and_names_each_recording(store: BaselineStore) -> None:
    """Two machines of one key, 20 % apart, each with a tight spread: pooled, the baseline's spread counts
    the difference between them, and a third recording adds to the list rather than starting it again."""
    store.merge(HW, [recording([100.0, 101.0, 99.0], "GPU-aaaa", "2026-11-28T10:00:00+00:00")])
    store.merge(HW, [recording([80.0, 81.0, 79.0], "GPU-bbbb", "2026-11-29T10:00:00+00:00", ppl=7.5)], pool=True)
    pooled = store.load(HW, MODEL)[KEY]
    decode = pooled.figures["decode_tokens_per_s"]
    assert decode.n == 6 and decode.value == 90.0 and decode.relative_spread > 0.1
    assert pooled.figures["ppl"].value == 7.5  # a single figure is the newest recording's
    assert pooled.details["pooled_runs"] == 2 and pooled.details["measured_at"] == "2026-11-29T10:00:00+00:00"
    assert [r["gpu_uuid"] for r in pooled.details["pooled_from"]] == ["GPU-aaaa", "GPU-bbbb"]
    store.merge(HW, [recording([90.0, 91.0, 89.0], "GPU-cccc", "2026-11-30T10:00:00+00:00")], pool=True)
    again = store.load(HW, MODEL)[KEY]
    assert again.figures["decode_tokens_per_s"].n == 9 and again.details["pooled_runs"] == 3
    assert [r["gpu_uuid"] for r in again.details["pooled_from"]] == ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
    store.merge(HW, [recording([50.0, 51.0, 49.0], "GPU-dddd", "2026-12-01T10:00:00+00:00")])  # no pool: replaced
    assert store.load(HW, MODEL)[KEY].figures["decode_tokens_per_s"].n == 3


def test_pooling_refuses_a_baseline_measured_differently_and_writes_nothing(store: BaselineStore) -> None:
    store.merge(HW, [recording([100.0, 101.0, 99.0], "GPU-aaaa", "2026-11-28T10:00:00+00:00")])
    before = store.path(HW, MODEL).read_bytes()
    other = recording([80.0, 81.0, 79.0], "GPU-bbbb", "2026-11-29T10:00:00+00:00", stride=16)
    with pytest.raises(BaselineError, match=r"tinyllama-1\.1b-arch\.json: cells\['fp16\|tinyllama-1\.1b-arch\|b1'\]: "
                                            r"cannot pool with a baseline measured differently "
                                            r"\(config\.accuracy\.stride: baseline 32, now 16\)"):
        store.merge(HW, [other], pool=True)
    assert store.path(HW, MODEL).read_bytes() == before
    assert store.merge(HW, [make_cell(model="llama-2-7b-arch")], pool=True)  # nothing stored yet: stored as is


def test_merge_never_touches_another_hardware_key(store: BaselineStore) -> None:
    other = BaselineStore(store.root)
    other.merge("nvidia-a100-80gb", [make_cell()])
    other_file = store.path("nvidia-a100-80gb", MODEL)
    before = (other_file.read_bytes(), other_file.stat().st_mtime_ns)

    store.merge(HW, [make_cell(ppl=9.0), make_cell(model="llama-2-7b-arch")])

    assert (other_file.read_bytes(), other_file.stat().st_mtime_ns) == before
    assert sorted(p.name for p in other_file.parent.iterdir()) == [f"{MODEL}.json"]
    assert store.hardware_keys() == ["nvidia-a100-80gb", HW]


def test_error_cells_are_not_written(store: BaselineStore) -> None:
    broken = make_cell("gptq", error="CUDA out of memory")
    assert store.merge(HW, [make_cell(), broken]) == [store.path(HW, MODEL)]
    assert list(store.load(HW, MODEL)) == [KEY]

    assert store.merge(HW, [make_cell("awq", model="llama-2-7b-arch", error="killed")]) == []
    assert not store.path(HW, "llama-2-7b-arch").exists()


def test_an_error_cell_does_not_replace_its_baseline(store: BaselineStore) -> None:
    store.merge(HW, [make_cell()])
    store.merge(HW, [make_cell(ppl=99.0, error="crashed")])
    assert store.load(HW, MODEL)[KEY].figures["ppl"].value == 7.25


def in_cell(change: Any) -> Any:
    """`change` applied to the stored cell rather than to the whole document."""
    return lambda document: change(document["cells"][KEY])


def add_unknown_metric(cell: dict[str, Any]) -> None:
    cell["figures"]["tps"] = cell["figures"]["ppl"]


def rekey(document: dict[str, Any]) -> None:
    document["cells"]["awq|tinyllama-1.1b-arch|b1"] = document["cells"].pop(KEY)


BAD_FILES = [
    pytest.param(in_cell(lambda c: c["figures"]["ppl"].update(value="abc")),
                 f"cells[{KEY!r}].figures.ppl.value: expected a number, got 'abc'", id="value not a number"),
    pytest.param(in_cell(add_unknown_metric),
                 f"cells[{KEY!r}].figures: unknown metric 'tps'; known metrics: ", id="unknown metric"),
    pytest.param(in_cell(lambda c: c["figures"]["ppl"].pop("n")),
                 f"cells[{KEY!r}].figures.ppl: missing field 'n'", id="figure field missing"),
    pytest.param(in_cell(lambda c: c.update(batch_size="1")),
                 f"cells[{KEY!r}].batch_size: expected an integer, got '1'", id="batch size not an integer"),
    pytest.param(in_cell(lambda c: c.update(config=[])),
                 f"cells[{KEY!r}].config: expected an object, got []", id="config not an object"),
    pytest.param(in_cell(lambda c: c.pop("recorded_at")),
                 f"cells[{KEY!r}]: missing field 'recorded_at'", id="cell field missing"),
    pytest.param(in_cell(lambda c: c.update(error="oom")),
                 f"cells[{KEY!r}].error: a baseline cell cannot carry an error", id="stored error"),
    pytest.param(in_cell(lambda c: c.update(batch_size=2)),
                 f"cells[{KEY!r}].id: {KEY!r} does not match", id="id disagrees with content"),
    pytest.param(rekey, f"cells['awq|tinyllama-1.1b-arch|b1']: the key disagrees with the cell's id {KEY!r}",
                 id="key disagrees with id"),
    pytest.param(lambda d: d.update(hardware_key="nvidia-a100-80gb"),
                 f"hardware_key: the file says 'nvidia-a100-80gb' but its path says {HW!r}",
                 id="hardware key disagrees with path"),
    pytest.param(lambda d: d.update(model="llama-2-7b-arch"),
                 f"model: the file says 'llama-2-7b-arch' but its path says {MODEL!r}",
                 id="model disagrees with path"),
    pytest.param(lambda d: d.pop("cells"), "top level: missing field 'cells'", id="cells missing"),
    pytest.param(lambda d: d.update(schema_version=0),
                 "schema_version 0 in {path}; this suite reads 1; fix it, or run `pytest --update-baselines "
                 "--replace-unreadable-baselines` to move it aside to tinyllama-1.1b-arch.json.v0",
                 id="older schema"),
    pytest.param(lambda d: d.update(schema_version=2), "schema_version 2 in {path}; this suite reads 1",
                 id="newer schema"),
    pytest.param(lambda d: d.pop("schema_version"), "schema_version: missing", id="schema version missing"),
]


@pytest.mark.parametrize(("change", "expected"), BAD_FILES)
def test_an_invalid_file_names_itself_and_the_field(store: BaselineStore, change: Any, expected: str) -> None:
    path = corrupt(store, change)
    with pytest.raises(BaselineError) as caught:
        store.load(HW, MODEL)
    assert str(path) in str(caught.value)
    assert expected.format(path=path) in str(caught.value)


@pytest.mark.parametrize(("change", "expected"), BAD_FILES)
def test_a_merge_into_an_invalid_file_writes_nothing(store: BaselineStore, change: Any,
                                                    expected: str) -> None:
    path = corrupt(store, change)
    before = path.read_bytes()
    # The other model sorts first, so its new file would be written first if checks did not come first.
    with pytest.raises(BaselineError) as caught:
        store.merge(HW, [make_cell("awq"), make_cell(model="llama-2-7b-arch")])
    assert expected.format(path=path) in str(caught.value)
    assert path.read_bytes() == before
    assert not store.path(HW, "llama-2-7b-arch").exists()


def test_malformed_json_names_file_line_and_column(store: BaselineStore) -> None:
    path = write_raw(store, '{\n  "schema_version": 1,\n<<<<<<< HEAD\n}\n')
    with pytest.raises(BaselineError, match=r"not valid JSON at line 3 column 1") as caught:
        store.load(HW, MODEL)
    assert str(caught.value).startswith(f"{path}: ")
    with pytest.raises(BaselineError):
        store.merge(HW, [make_cell()])
    assert path.read_text() == '{\n  "schema_version": 1,\n<<<<<<< HEAD\n}\n'


def test_a_key_written_twice_is_an_error(store: BaselineStore) -> None:
    store.merge(HW, [make_cell()])
    text = store.path(HW, MODEL).read_text().replace('"cells": {', '"cells": {}, "cells": {', 1)
    path = write_raw(store, text)
    with pytest.raises(BaselineError, match=r"the key 'cells' appears twice") as caught:
        store.load(HW, MODEL)
    assert str(path) in str(caught.value)


def test_a_result_that_cannot_be_stored_writes_nothing(store: BaselineStore) -> None:
    store.merge(HW, [make_cell()])
    before = store.path(HW, MODEL).read_bytes()
    not_finite = make_cell("awq", ppl=float("nan"))
    unknown = make_cell("gptq")
    unknown.figures["tps"] = Figure(1.0)
    not_json = make_cell("gguf")
    not_json.config["path"] = Path("/models/x.gguf")

    with pytest.raises(BaselineError, match=r"cells\['awq\|tinyllama-1.1b-arch\|b1'\]\.figures\.ppl\.value: "
                                            r"expected a finite number, got nan"):
        store.merge(HW, [make_cell("bnb-int8"), not_finite])
    with pytest.raises(BaselineError, match=r"figures: unknown metric 'tps'"):
        store.merge(HW, [unknown])
    with pytest.raises(BaselineError, match=r"cells\['gguf\|tinyllama-1.1b-arch\|b1'\]: cannot be stored"):
        store.merge(HW, [not_json])
    assert store.path(HW, MODEL).read_bytes() == before


def test_a_non_finite_diagnostic_is_stored_as_null(store: BaselineStore) -> None:
    cell = make_cell()
    cell.details["batch_consistency"] = {"rows": [{"batched_logit_gap": float("nan"), "margin": float("inf")}]}
    store.merge(HW, [cell])
    row = stored(store)["cells"][KEY]["details"]["batch_consistency"]["rows"][0]
    assert row == {"batched_logit_gap": None, "margin": None}
    assert store.load(HW, MODEL)[KEY].figures["ppl"].value == 7.25


def test_an_interrupted_write_leaves_the_old_file(store: BaselineStore,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store.merge(HW, [make_cell()])
    path = store.path(HW, MODEL)
    before = path.read_bytes()

    def power_cut(src: str, dst: str) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(harness.cache.os, "replace", power_cut)
    with pytest.raises(OSError, match="disk went away"):
        store.merge(HW, [make_cell(ppl=9.0), make_cell("awq")])
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_names_that_are_not_slugs_are_refused(store: BaselineStore) -> None:
    for model in ("meta-llama/Llama-2-7b", "..", ".hidden", "a b", ""):
        with pytest.raises(ValueError, match="cannot name a baseline file"):
            store.path(HW, model)
        with pytest.raises(ValueError, match="model name"):
            store.merge(HW, [make_cell(model=model)])
    with pytest.raises(ValueError, match="hardware key '../elsewhere'"):
        store.merge("../elsewhere", [make_cell()])
    assert not store.root.exists()


def test_concurrent_merges_lose_no_cell(store: BaselineStore) -> None:
    def worker(method: str) -> None:
        own = BaselineStore(store.root)
        for batch_size in range(1, 11):
            own.merge(HW, [make_cell(method, batch_size=batch_size)])

    threads = [threading.Thread(target=worker, args=(method,)) for method in ("fp16", "awq", "gptq")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.load(HW, MODEL)) == 30
