"""Task accuracy through lm-eval, on the model the worker already loaded (tests marked `eval`).

lm-eval's HF wrapper takes the loaded transformers model, so a quantized model is evaluated exactly as it
was benchmarked. Tasks whose data lm-eval must download are reported as unavailable where there is no
network; `quantbench_word_order` is always available: a four-way multiple-choice task built from the
held-out corpus text (which ordering of a passage's last words is the real one), written as a local lm-eval
task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

LOCAL_TASK = "quantbench_word_order"
TASK_FORMAT = 1


class EvalUnavailable(RuntimeError):
    """Task accuracy cannot be measured for this cell (no tokenizer, an engine lm-eval cannot wrap, no data)."""


def word_order_task(folder: Path, documents: int = 200, seed: int = 0) -> Path:
    """Write the local task (a jsonl of passages and a task YAML) into `folder`; return the folder.

    The held-out corpus text is cut into consecutive passages of 32 words; each keeps its first 20 words as
    the context, and the choices are its real last 12 words and three copies with one pair of neighbouring
    words swapped (at seeded places). A model that knows the language prefers the real order; the same words
    in every choice keep the likelihoods comparable without length normalisation. (Endings taken from other
    passages left the embedded model near chance, text of one kind reads alike to a model this small; whole
    shuffles were too easy, 0.98.)
    """
    from harness.corpus import split

    folder.mkdir(parents=True, exist_ok=True)
    words = split().heldout.split()
    passages = [words[i:i + 32] for i in range(0, len(words) - 31, 32)][:documents]
    if len(passages) < 4:
        raise EvalUnavailable("the held-out corpus text has fewer than 4 passages of 32 words")
    rng = random.Random(seed)
    rows = []
    for passage in passages:
        real = passage[20:]
        endings = [real]
        for position in rng.sample(range(len(real) - 1), len(real) - 1):
            swapped = real[:position] + [real[position + 1], real[position]] + real[position + 2:]
            if swapped not in endings:
                endings.append(swapped)
            if len(endings) == 4:
                break
        if len(endings) < 4:
            continue  # a passage of repeated words has too few distinct swaps
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"context": " ".join(passage[:20]), "choices": [" " + " ".join(endings[i]) for i in order],
                     "label": order.index(0)})
    data = folder / f"{LOCAL_TASK}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / f"{LOCAL_TASK}.yaml").write_text(
        f"task: {LOCAL_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n", encoding="utf-8")
    return folder


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], limit: int | None, batch_size: int,
              task_folder: Path, seed: int) -> dict[str, Any]:
    """lm-eval `tasks` on the loaded `model`; per task its metrics with their standard errors, or why not.

    Returns {"figures": {"task:<task>:<metric>": value}, "tasks": {task: {...}}, "lm_eval": version}.
    """
    if tokenizer is None:
        raise EvalUnavailable("lm-eval scores text, and this model has no tokenizer (synthetic models are "
                              "fed token ids)")
    if not hasattr(model, "generation_config"):
        raise EvalUnavailable("lm-eval's HF wrapper needs a transformers model; this engine's is not one")
    from importlib.metadata import version

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if LOCAL_TASK in tasks:
        from harness.cache import file_lock

        with file_lock(task_folder.parent / f".{task_folder.name}.lock"):  # xdist workers write the same files
            word_order_task(task_folder, seed=seed)
    manager = TaskManager(include_path=str(task_folder))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    figures: dict[str, float] = {}
    report: dict[str, Any] = {}
    for task in tasks:
        try:
            output = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, random_seed=seed,
                                     numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                     log_samples=False)
        except Exception as exc:  # unknown task, data that needs a download: the task's cell says which
            report[task] = {"unavailable": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        results = output["results"][task]
        metrics = {}
        for key, value in results.items():
            name, comma, _filter = key.partition(",")  # metrics are "<metric>,<filter>"; the rest is metadata
            if not comma or name.endswith("_stderr") or not isinstance(value, int | float) \
                    or isinstance(value, bool):
                continue
            stderr = results.get(f"{name}_stderr,{_filter}") if _filter else results.get(f"{name}_stderr")
            metrics[name] = {"value": float(value), "stderr": stderr if isinstance(stderr, int | float) else None}
            figures[f"task:{task}:{name}"] = float(value)
        report[task] = {"metrics": metrics, "samples": output.get("n-samples", {}).get(task),
                        "limit": limit, "version": output.get("versions", {}).get(task)}
    return {"figures": figures, "tasks": report, "lm_eval": version("lm_eval")}
