"""The worker process: load one (method, model) once, measure every batch size, write results as it goes.

A job with `prepare_only` only builds what the model needs (embedded or synthetic weights) and exits, so
that work never shows in the measured process's memory or time.

What differs between engines is their runtime (harness/runtimes.py), which the worker asks and never branches
around. An engine with its own CUDA runtime (llama.cpp: `RUNTIME = NATIVE`) is measured in a process that never
loads torch. On the CUDA 13 image of the H200 machines, llama.cpp segfaulted loading a model after `import
torch`, and `import torch` aborted after llama.cpp was loaded (docs/evidence/nvidia-h200-140gb/
gguf-torch-conflict.log, from gguf_probe.py beside it); the likely cause is that torch's wheels bring their
own CUDA libraries under the same names as the system's ones the engine was built against. So the engine's
prepare process, which may use torch, also resolves the model and makes the token ids (seeded ids come from
torch's generator, so every backend gets the same ones) and the tokenizer's ids of the held-out check text,
and the measured process refuses any import of torch with an error that says why.

Run as `python -m harness.worker JOB.json OUT.json`. The parent (harness.isolation) reads OUT.json even
when this process crashes, runs out of memory or is killed, so finished batch sizes are never lost.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib.abc
import json
import os
import random
import signal
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.cache import atomic_write_text, cache_root
from harness.config import AccuracyConfig, ModelSpec, ModelUnavailable, RunConfig
from harness.figure import Figure
from harness.hardware import apply_cpu_share, environment, machine_info
from harness.measure import consistency
from harness.measure.accuracy import perplexity
from harness.measure.divergence import Collector, Comparer, Reference, reference_dir, reference_key
from harness.measure.telemetry import gpu_telemetry
from harness.measure.throughput import measure_generation, timed
from harness.methods import MethodUnavailable, method_class
from harness.models import ResolvedModel, eval_ids, ids_digest, prompt_ids, resolve, tokenizer_check, weights_digest
from harness.results import WORKER_PARENT_VAR, CellResult, WorkerStatus


def log(message: str) -> None:
    print(f"[worker] {message}", file=sys.stderr, flush=True)


class _Output:
    """The OUT.json file, rewritten atomically after every step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": WorkerStatus.RUNNING, "results": []}
        self.flush()

    def flush(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    def add(self, result: CellResult) -> None:
        # when the figures were taken: a baseline imported from this results file later keeps this time
        result.details.setdefault("measured_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.data["results"].append(result.to_dict())
        self.flush()

    def finish(self, status: WorkerStatus, reason: str | None = None) -> None:
        self.data["status"] = status
        self.data["reason"] = reason
        self.flush()


def _import_model_code(pretrained: str) -> None:
    """Import the architecture's modeling code, so load time measures weights, not Python imports."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(pretrained))]


class _RefuseTorch(importlib.abc.MetaPathFinder):
    """Fails every import of torch in a process that measures an engine with its own CUDA runtime."""

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"import of {name!r} refused: {self.engine} is measured in a process without torch "
                              "(torch's CUDA libraries and the engine's cannot share a process; harness/worker.py)")


def refuse_torch(engine: str) -> None:
    """From now on, importing torch in this process raises ImportError (it must not be loaded yet)."""
    if "torch" in sys.modules:
        raise RuntimeError(f"torch was imported before {engine}'s measured process refused it")
    sys.meta_path.insert(0, _RefuseTorch(engine))


def _tokenizer(resolved: Any) -> Any:
    if not resolved.has_tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolved.pretrained)


def _inputs(resolved: Any, tokenizer: Any, job: dict[str, Any], seed: int) -> dict[str, Any]:
    """What a measured process feeds the model: evaluation ids, prompt rows (4 at least, for the batch
    consistency check), and the tokenizer's ids of the held-out text an engine compares its own with."""
    run = RunConfig(**job["run"])
    return {
        "resolved": dataclasses.asdict(resolved),
        "eval_ids": eval_ids(resolved, tokenizer, AccuracyConfig(**job["accuracy"]), seed),
        "prompt_ids": prompt_ids(resolved, tokenizer, max(4, *job["batch_sizes"]), run.prompt_tokens, seed),
        "tokenizer_check": tokenizer_check(tokenizer) if tokenizer is not None else None,
    }


def run_job(job: dict[str, Any], out: _Output) -> None:
    """Prepare, compute a reference, or measure one (method, model); see the module docstring."""
    seed = job["run"]["seed"]
    random.seed(seed)
    device = job["device"]
    method = method_class(job["method_class"])(job["method"]["params"], device)
    method.pickle_weights = bool(job["model"].get("pickle_weights"))
    runtime = method.RUNTIME
    torch_free = not runtime.torch_in_measured_process and not job.get("prepare_only")  # the module docstring
    if torch_free:
        refuse_torch(type(method).__name__)
        log(f"{type(method).__name__}: measured without torch (torch refused in this process)")
    else:
        import torch

        torch.manual_seed(seed)
    try:
        method.check_available()
    except MethodUnavailable as exc:
        out.finish(WorkerStatus.SKIPPED, str(exc))
        return

    if not torch_free:
        try:
            resolved = resolve(ModelSpec(**job["model"]), log=log)
        except ModelUnavailable as exc:  # an optional model not installed here, as a missing library skips
            out.finish("skipped", str(exc))
            return
    elif "inputs" in (job.get("prepared") or {}):  # resolving the embedded model imports torch
        resolved = ResolvedModel(**job["prepared"]["inputs"]["resolved"])
    else:
        raise RuntimeError(f"{type(method).__name__} is measured without torch, on the model and ids its "
                           "prepare process resolves: run the job with prepare_only and prepare_method first "
                           "and pass its 'prepared' record (harness/plugin.py does)")
    if job.get("prepare_only"):
        # building the embedded or synthetic weights, and a method's checkpoint, happens here, outside the
        # process that is measured; an evaluation text too short for one window is refused here too
        if job["accuracy"].get("text"):
            eval_ids(resolved, _tokenizer(resolved), AccuracyConfig(**job["accuracy"]), seed)
        if job.get("prepare_method"):
            try:
                with runtime.track_memory(device) as memory:
                    prepared = method.prepare(resolved, seed, log)
            except MethodUnavailable as exc:  # not on this model (no GGUF file of its own, unfit widths)
                out.finish("skipped", str(exc))
                return
            if prepared is not None:
                # the memory the work used: a GPU's, or host memory for work done on the CPU (RTN packing)
                peak = "peak_vram_mib" if prepared.get("device", device) == "cuda" else "peak_anon_rss_mib"
                if peak in memory:
                    prepared["peak_mib"] = memory[peak].value
                    prepared["peak_metric"] = peak
                method.prepared = prepared
                warmed = method.compile_kernels(resolved.pretrained, log)
                if warmed:
                    prepared["kernels"] = warmed
            if not runtime.torch_in_measured_process:  # the measured process will not load torch (docstring)
                prepared = prepared or {}
                prepared["inputs"] = _inputs(resolved, _tokenizer(resolved), job, seed)
            out.data["prepared"] = prepared
        out.finish(WorkerStatus.OK)
        return
    method.prepared = job.get("prepared")
    if method.prepared is None:
        method.prepared = method.prepare(resolved, seed, log)  # nothing was prepared for this job: do it here
    tokenizer = None if torch_free else _tokenizer(resolved)  # transformers loads torch
    method.inputs = (method.prepared or {}).get("inputs") or _inputs(resolved, tokenizer, job, seed)
    accuracy = AccuracyConfig(**job["accuracy"])
    ids = method.inputs["eval_ids"]
    reference = job.get("reference")
    key = reference_key(resolved.provenance, reference["method"], job["accuracy"], ids_digest(ids)) if reference \
        else None

    if reference and reference["role"] == "compute":
        folder = reference_dir(cache_root(), key)
        if not Reference.cached(folder):  # missing, or changed since it was saved
            model, _, _ = _load(method, resolved, device)
            collector = Collector()
            perplexity(lambda window: method.logits(model, window), ids, accuracy, [collector])
            collector.reference(key).save(folder)
        log(f"reference logits of {reference['method']['name']} in {folder}")
        out.finish(WorkerStatus.OK)
        return

    model, load_s, load_memory = _load(method, resolved, device)
    noise = float(job.get("inject_weight_noise", 0))
    if noise:  # testing the gate only: the measured model, never the reference, never a file on disk
        changed = method.corrupt_weights(model, noise, seed)
        log(f"TESTING THE GATE: {changed} weight tensor(s) of {resolved.name} multiplied by 1 + {noise:g} x N(0, 1)")
    method.warm_up(model)
    base = {
        "method": job["method"]["name"],
        "model": resolved.name,
        "config": {
            "suite": job["suite"],
            "method": job["method"],
            "model": job["model"],
            "run": job["run"],
            "accuracy": job["accuracy"],
            "inject_decode_delay_ms": job.get("inject_decode_delay_ms", 0),
            "inject_device_slowdown": job.get("inject_device_slowdown", 0),
            "inject_weight_noise": job.get("inject_weight_noise", 0),
        },
        "environment": environment(),
        "hardware": machine_info(device),
    }
    run = RunConfig(**job["run"])
    all_ids = method.inputs["prompt_ids"]
    model_cell = CellResult(batch_size=None, figures={"load_s": Figure(load_s)}, **base,
                            details={"model": resolved.provenance, "synthetic": resolved.synthetic,
                                     "load_peak_rss_mib": load_memory["peak_rss_mib"].value})
    model_cell.details["weights_bytes"] = method.weights_bytes(model)
    # with the weights' sha256 (details.model.weights_sha256), what decides the accuracy figures: the gate
    # compares them with another CPU key's baseline only where both match (harness/baselines.py)
    model_cell.details["accuracy_packages"] = [*method.ACCURACY_PACKAGES, *(["lm-eval"] if job.get("eval") else [])]
    _quantization(method.prepared, model_cell)
    _accuracy(method, model, model_cell, ids, accuracy, reference, key)
    if run.consistency_tokens:
        model_cell.details["batch_consistency"] = _consistency(method, model, all_ids, run)
    if job.get("eval"):
        _tasks(model, tokenizer, model_cell, job["eval"], seed)
    model_cell.details["method"] = method.describe(model)
    out.add(model_cell)

    method.inject_delay_ms = float(job.get("inject_decode_delay_ms", 0))
    for batch_size in job["batch_sizes"]:
        rows = all_ids[:batch_size]
        cell = CellResult(batch_size=batch_size, details={"prompt_ids_digest": ids_digest(rows),
                                                          "synthetic": resolved.synthetic,
                                                          "model": resolved.provenance}, **base)
        _throughput(method, model, cell, rows, run, device, float(job.get("inject_device_slowdown", 0)))
        out.add(cell)
    out.finish(WorkerStatus.OK)


def _load(method: Any, resolved: Any, device: str) -> tuple[Any, float, dict[str, Any]]:
    """Load the model through the method; return it, the load time and the memory seen while loading."""
    runtime = method.RUNTIME
    if runtime.runs_transformers_models:
        _import_model_code(resolved.pretrained)
    with runtime.track_memory(device) as memory, timed(runtime.sync_device(device)) as seconds:
        model = method.load(resolved.pretrained)
    method.verify(model, generated=False)
    log(f"loaded {resolved.name} in {seconds[0]:.1f} s")
    return model, seconds[0], memory


def _tasks(model: Any, tokenizer: Any, cell: CellResult, evaluation: dict[str, Any], seed: int) -> None:
    """lm-eval task figures on the loaded model; why not, in the cell's details, where they cannot run."""
    from harness.evaluate import TASK_FORMAT, EvalUnavailable, run_tasks

    folder = cache_root() / "tasks" / f"v{TASK_FORMAT}-seed{seed}"
    try:
        report = run_tasks(model, tokenizer, list(evaluation["tasks"]), evaluation["limit"] or None,
                           evaluation["batch_size"], folder, seed)
    except EvalUnavailable as exc:
        cell.details["tasks"] = {"unavailable": str(exc)}
        return
    except ImportError as exc:
        cell.details["tasks"] = {"unavailable": f"lm-eval is not installed (quantbench's 'eval' extra): {exc}"}
        return
    cell.details["tasks"] = {"results": report["tasks"], "lm_eval": report["lm_eval"], "settings": evaluation}
    cell.figures.update({name: Figure(value) for name, value in report["figures"].items()})
    log(f"tasks: {report['figures']}")


def _quantization(prepared: dict[str, Any] | None, cell: CellResult) -> None:
    """The quantization's cost as figures when this run measured it; a cached build's record goes to details."""
    prepared = {k: v for k, v in (prepared or {}).items() if k != "inputs"}  # ids: not a record of the build
    if not prepared:
        return
    folder = Path(prepared["checkpoint"]) if prepared.get("checkpoint") else None
    tensors = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    if tensors:  # what calibration made, which can differ between machines: the gate reads it across CPU keys
        prepared["weights_sha256"] = weights_digest(tensors)
    cell.details["quantization"] = prepared
    if prepared.get("fresh") and "quantize_s" in prepared:
        cell.figures["quantize_s"] = Figure(prepared["quantize_s"])
        if "peak_mib" in prepared:  # peak_vram_mib or peak_anon_rss_mib, chosen where it was measured
            cell.figures[f"quantize_{prepared['peak_metric']}"] = Figure(prepared["peak_mib"])


def _accuracy(method: Any, model: Any, cell: CellResult, ids: list[int], accuracy: AccuracyConfig,
              reference: dict[str, Any] | None, key: dict[str, Any] | None) -> None:
    """Perplexity, and divergence from the cached reference when there is one."""
    comparer = None
    if reference:
        folder = reference_dir(cache_root(), key)
        if (folder / "key.json").is_file():
            comparer = Comparer(Reference.load(folder, key))
        else:
            cell.details["reference"] = (f"no reference logits from {reference['method']['name']} "
                                         "(its cell failed or was skipped): no divergence figures")
    result = perplexity(lambda window: method.logits(model, window), ids, accuracy, [comparer] if comparer else [])
    cell.figures["ppl"] = Figure(result.ppl)
    cell.details["ppl"] = {"stderr": result.stderr, "nll_mean": result.nll_mean, "protocol": result.protocol,
                           "eval_ids_digest": ids_digest(ids),
                           "label": "synthetic weights: says nothing about a real model"
                           if cell.details["synthetic"] else f"evaluation text {accuracy.text}" if accuracy.text
                           else "held-out corpus text"}
    log(f"ppl {result.ppl:.3f} +- {result.stderr:.3f} over {result.scored_tokens} tokens")
    if comparer is not None:
        divergence = comparer.figures()
        cell.details["ppl_ratio_stderr"] = divergence.pop("ppl_ratio_stderr")
        cell.details["reference"] = {"method": reference["method"]["name"], "top_k": key["top_k"]}
        cell.figures.update({name: Figure(value) for name, value in divergence.items()})


def _consistency(method: Any, model: Any, all_ids: list[list[int]], run: RunConfig) -> dict[str, Any]:
    """Greedy tokens of prompts of different lengths, batched with left padding and alone."""
    lengths = consistency.prompt_lengths(run.prompt_tokens)
    prompts = [row[:length] for row, length in zip(all_ids[:len(lengths)], lengths, strict=True)]
    try:
        report = consistency.check(lambda rows, n: method.greedy(model, rows, n), prompts, run.consistency_tokens,
                                   logits_dtype=method.logits_dtype(model),
                                   logit_tolerance=method.consistency_tolerance())
    except NotImplementedError as exc:
        report = {"consistent": None, "reason": f"not checked: {exc}"}
    except method.RUNTIME.out_of_memory_errors() as exc:
        report = {"consistent": None, "reason": f"not checked: out of memory: {str(exc).splitlines()[0]}"}
        del exc
        method.RUNTIME.release_cached_memory()
    log(f"batch consistency: {report['consistent']}")
    return report


def _throughput(method: Any, model: Any, cell: CellResult, rows: list[list[int]], run: RunConfig,
                device: str, inject_fraction: float = 0.0) -> None:
    """Time generation at one batch size and track its memory; out-of-memory becomes the cell's error."""

    def generate(n: int, streamer: Any) -> None:
        method.generate(model, rows, n, streamer)

    runtime = method.RUNTIME
    telemetry: dict[str, Any] = {}
    try:
        with runtime.track_memory(device) as memory:
            timing = measure_generation(generate, runtime.sync_device(device), len(rows), run.prompt_tokens,
                                        run.new_tokens, run.warmup, run.repeats,
                                        around_repeats=lambda: gpu_telemetry(device, telemetry))
    except runtime.out_of_memory_errors() as exc:
        cell.error = f"out of memory at batch size {len(rows)}: {str(exc).splitlines()[0]}"
        log(cell.error)
        del exc
        runtime.release_cached_memory()
        return
    try:
        method.verify(model, generated=True)
    except RuntimeError as exc:
        # the figures stay in the results for diagnosis; a cell with an error never becomes a baseline
        cell.error = str(exc)
        log(cell.error)
    cell.figures.update(timing.figures())
    cell.figures.update({k: v for k, v in memory.items() if isinstance(v, Figure)})
    cell.details["nvml_scope"] = memory.get("nvml_scope")
    cell.details["memory_protocol"] = memory["protocol"]
    cell.details["method"] = method.describe(model)
    if telemetry:
        if "energy_j" in telemetry:  # the timed repeats' energy, prefill included, per token they generated
            telemetry["energy_j_per_token"] = telemetry["energy_j"] / (run.repeats * len(rows) * run.new_tokens)
        cell.details["gpu_telemetry"] = telemetry
    decode = cell.figures["decode_tokens_per_s"]
    log(f"b{len(rows)}: decode {decode.value:.1f} tok/s (+-{100 * decode.relative_spread:.1f}%), "
        f"prefill {cell.figures['prefill_tokens_per_s'].value:.0f} tok/s")
    if cell.error is None:
        _device_timing(method, model, cell, rows, run, device, timing.decode_s, inject_fraction)


def _device_timing(method: Any, model: Any, cell: CellResult, rows: list[list[int]], run: RunConfig, device: str,
                   decode_s: tuple[float, ...], inject_fraction: float) -> None:
    """Device figures of one batch size (harness/measure/device.py), after and outside the memory-tracked and
    telemetry-watched repeats: an engine's own timer where it runs its own decode loop (llama.cpp), else the
    suite's; why not, in the cell's details, where the method or device has none."""
    timing = method.engine_timing(model, len(rows), run.repeats) if device == "cuda" else None
    details: dict[str, Any] = {}
    if timing is None:
        why = method.device_timing_unavailable() if device == "cuda" else \
            "on a CPU the device is the host: the cell's speeds are its generate() figures"
        if why:
            cell.details["device_timing"] = {"unavailable": why}
            return
        from harness.measure.device import measure_device

        try:
            timing, generated = measure_device(model, rows, run.new_tokens - 1, method.compiled, cuda=True,
                                               capturable=method.capture_blocker(), inject_fraction=inject_fraction)
        except method.RUNTIME.out_of_memory_errors() as exc:
            cell.details["device_timing"] = {"unavailable": f"out of memory: {str(exc).splitlines()[0]}"}
            del exc
            method.RUNTIME.release_cached_memory()
            return
        except Exception as exc:  # the device timer failed on this method: its tests fail with this, never skip
            cell.details["device_timing"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            log(f"device timing failed: {cell.details['device_timing']['error']}")
            traceback.print_exc()
            method.RUNTIME.release_cached_memory()
            return
        details["generated_ids_digest"] = ids_digest(generated)
        method.RUNTIME.release_cached_memory()
    cell.figures.update(timing.figures(decode_s, run.new_tokens - 1))
    cell.details["device_timing"] = {**timing.details(), **details}
    log(f"b{len(rows)}: device decode {cell.figures['decode_device_tokens_per_s'].value:.1f} tok/s "
        f"(+-{100 * cell.figures['decode_device_tokens_per_s'].relative_spread:.2f}%, {timing.how.value}), "
        f"{timing.kernels_per_step} kernels a step")


def _die_with_parent() -> None:
    """On Linux, ask for SIGKILL when the run that started this worker exits (prctl PR_SET_PDEATHSIG).

    The worker runs in a session of its own, so a signal that kills the run alone (`timeout`, SIGKILL) would
    otherwise leave it measuring, holding device memory and slowing whatever runs next on that device.
    """
    parent = os.environ.get(WORKER_PARENT_VAR)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != int(parent):  # the run exited before the request took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m harness.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    _die_with_parent()
    # a crash in native code (a kernel, a CUDA runtime) or a hang still names the Python line it was at:
    # tracebacks of every thread go to the log on SIGSEGV/SIGFPE/SIGABRT/SIGBUS/SIGILL, and on the SIGUSR1
    # that the parent sends a worker before killing it at its timeout
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    job = json.loads(Path(argv[0]).read_text())
    out = _Output(Path(argv[1]))
    try:
        apply_cpu_share()  # before torch or an engine starts its thread pools
        run_job(job, out)
    except Exception as exc:
        out.finish(WorkerStatus.ERROR, f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
