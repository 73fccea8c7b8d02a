"""The worker process: load one (method, model) once, measure every batch size, write results as it goes.

A job with `prepare_only` only builds what the model needs (embedded or synthetic weights) and exits, so
that work never shows in the measured process's memory or time.

Run as `python -m harness.worker JOB.json OUT.json`. The parent (harness.isolation) reads OUT.json even
when this process crashes, runs out of memory or is killed, so finished batch sizes are never lost.
"""

from __future__ import annotations

import json
import random
import sys
import traceback
from pathlib import Path
from typing import Any

from harness.cache import atomic_write_text, cache_root
from harness.config import AccuracyConfig, ModelSpec, RunConfig
from harness.hardware import environment, machine_info
from harness.measure.accuracy import perplexity
from harness.measure.divergence import Collector, Comparer, Reference, reference_dir, reference_key
from harness.measure.memory import track_memory
from harness.measure.throughput import measure_generation, timed
from harness.methods import MethodUnavailable, method_class
from harness.models import eval_ids, ids_digest, prompt_ids, resolve
from harness.results import CellResult, Figure


def log(message: str) -> None:
    print(f"[worker] {message}", file=sys.stderr, flush=True)


class _Output:
    """The OUT.json file, rewritten atomically after every step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "running", "results": []}
        self.flush()

    def flush(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    def add(self, result: CellResult) -> None:
        self.data["results"].append(result.to_dict())
        self.flush()

    def finish(self, status: str, reason: str | None = None) -> None:
        self.data["status"] = status
        self.data["reason"] = reason
        self.flush()


def _import_model_code(pretrained: str) -> None:
    """Import the architecture's modeling code, so load time measures weights, not Python imports."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(pretrained))]


def run_job(job: dict[str, Any], out: _Output) -> None:
    """Measure the job's (method, model) at each of its batch sizes; see the module docstring."""
    import torch

    seed = job["run"]["seed"]
    random.seed(seed)
    torch.manual_seed(seed)
    device = job["device"]
    run = RunConfig(**job["run"])
    accuracy = AccuracyConfig(**job["accuracy"])
    spec = ModelSpec(**job["model"])
    method_spec = job["method"]
    method = method_class(job["method_class"])(method_spec["params"], device)
    try:
        method.check_available()
    except MethodUnavailable as exc:
        out.finish("skipped", str(exc))
        return

    resolved = resolve(spec, log=log)
    if job.get("prepare_only"):
        # building the embedded or synthetic weights happens here, outside the process that is measured
        out.finish("ok")
        return
    tokenizer = None
    if resolved.has_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolved.pretrained)

    ids = eval_ids(resolved, tokenizer, accuracy, seed)
    reference = job.get("reference")
    key = None
    if reference:
        key = reference_key(resolved.provenance, reference["method"], job["accuracy"], ids_digest(ids))
    if reference and reference["role"] == "compute" and (reference_dir(cache_root(), key) / "key.json").is_file():
        log(f"reference logits of {reference['method']['name']} already cached")
        out.finish("ok")
        return

    _import_model_code(resolved.pretrained)
    with track_memory(device) as load_memory, timed(device) as load_time:
        model = method.load(resolved.pretrained)
    method.verify(model, generated=False)
    log(f"loaded {spec.name} with {method_spec['name']} in {load_time[0]:.1f} s")

    base = {
        "method": method_spec["name"],
        "model": spec.name,
        "config": {
            "suite": job["suite"],
            "method": method_spec,
            "model": job["model"],
            "run": job["run"],
            "accuracy": job["accuracy"],
            "inject_decode_delay_ms": job.get("inject_decode_delay_ms", 0),
        },
        "environment": environment(),
        "hardware": machine_info(device),
    }
    model_details = {"model": resolved.provenance, "synthetic": resolved.synthetic,
                     "load_peak_rss_mib": load_memory["peak_rss_mib"].value}
    model_cell = CellResult(batch_size=None, figures={"load_s": Figure(load_time[0])}, details=model_details,
                            **base)
    observers: list[Any] = []
    if reference and reference["role"] == "compute":
        observers.append(Collector())
    elif reference:
        folder = reference_dir(cache_root(), key)
        if (folder / "key.json").is_file():
            observers.append(Comparer(Reference.load(folder, key)))
        else:
            model_details["reference"] = (f"no reference logits from {reference['method']['name']} "
                                          "(its cell failed or was skipped): no divergence figures")
    result = perplexity(lambda window: method.logits(model, window), ids, accuracy, observers)
    model_cell.figures["ppl"] = Figure(result.ppl)
    model_details["ppl"] = {"stderr": result.stderr, "nll_mean": result.nll_mean,
                            "protocol": result.protocol, "eval_ids_digest": ids_digest(ids),
                            "label": "synthetic weights: says nothing about a real model"
                            if resolved.synthetic else "held-out corpus text"}
    log(f"ppl {result.ppl:.3f} +- {result.stderr:.3f} over {result.scored_tokens} tokens")
    for observer in observers:
        if isinstance(observer, Collector):
            observer.reference(key).save(reference_dir(cache_root(), key))
            log(f"reference logits of {reference['method']['name']} saved")
            out.finish("ok")
            return
        divergence = observer.figures()
        model_details["ppl_ratio_stderr"] = divergence.pop("ppl_ratio_stderr")
        model_details["reference"] = {"method": reference["method"]["name"], "top_k": key["top_k"]}
        model_cell.figures.update({name: Figure(value) for name, value in divergence.items()})
    model_details["method"] = method.describe(model)
    out.add(model_cell)

    all_ids = prompt_ids(resolved, tokenizer, max(job["batch_sizes"]), run.prompt_tokens, seed)
    method.inject_delay_ms = float(job.get("inject_decode_delay_ms", 0))

    for batch_size in job["batch_sizes"]:
        rows = all_ids[:batch_size]

        def generate(n: int, streamer: Any, rows: list[list[int]] = rows) -> None:
            method.generate(model, rows, n, streamer)

        cell = CellResult(batch_size=batch_size, details={"prompt_ids_digest": ids_digest(rows),
                                                          "synthetic": resolved.synthetic}, **base)
        try:
            with track_memory(device) as memory:
                timing = measure_generation(generate, device, batch_size, run.prompt_tokens, run.new_tokens,
                                            run.warmup, run.repeats)
            method.verify(model, generated=True)
        except torch.OutOfMemoryError as exc:
            cell.error = f"out of memory at batch size {batch_size}: {str(exc).splitlines()[0]}"
            log(cell.error)
            del exc
            torch.cuda.empty_cache()
            out.add(cell)
            continue
        cell.figures.update(timing.figures())
        cell.figures.update({k: v for k, v in memory.items() if isinstance(v, Figure)})
        cell.details["nvml_scope"] = memory.get("nvml_scope")
        cell.details["method"] = method.describe(model)
        figs = cell.figures
        log(f"b{batch_size}: decode {figs['decode_tokens_per_s'].value:.1f} tok/s "
            f"(+-{100 * figs['decode_tokens_per_s'].relative_spread:.1f}%), "
            f"prefill {figs['prefill_tokens_per_s'].value:.0f} tok/s")
        out.add(cell)
    out.finish("ok")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m harness.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    out = _Output(Path(argv[1]))
    try:
        run_job(job, out)
    except Exception as exc:
        out.finish("error", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
