"""EXL2 checkpoints: ExLlamaV2's own conversion of a model folder, cached under the suite's cache by content.

The conversion (measurement, optimization, quantization and compilation, `harness/exl2_convert.py`) runs on a
CUDA GPU in a process of its own, with the interpreter of the measured environment (`sys.executable`): a
conversion that fails inside ExLlamaV2 ends its process with `os._exit(1)`, and this module reports the log's
last lines. It is fed the suite's calibration ids (`harness.quant.calibration_ids`, the rows GPTQ calibrates
on), never ExLlamaV2's bundled texts, so every backend sees the same data and a model without tokenizer converts.
The folder is keyed by the source weights' content, the bit rates, the calibration ids' digest and the
versions of exllamav2 and torch; it is built in a temporary folder renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from harness.cache import atomic_directory, atomic_write_text, cache_root, file_lock, manifest_problem, write_manifest
from harness.quant import source_digest

Log = Callable[[str], None]
CACHE_FORMAT = 1
CONVERTER = Path(__file__).with_name("exl2_convert.py")
HEAD_BITS = (2, 3, 4, 5, 6, 8)  # exllamav2 0.3.2: conversion/qparams.py, qparams_headoptions
MIN_BITS, MAX_BITS = 2.0, 8.0  # convert_exl2.py warns that a target outside this range is likely unattainable
LOG_TAIL_LINES = 30
# The tensors one EXL2 linear layer is stored as (conversion/adaptivegptq.py: AdaptiveGPTQ.pack)
PACKED = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}


class Exl2Error(ValueError):
    """An EXL2 request or build that cannot be honoured; the message names the field, file or step."""


@dataclass(frozen=True)
class Exl2Spec:
    """What an EXL2 checkpoint is made of: target bit rates and the calibration rows."""

    bits: float = 4.0  # target bits per weight of the decoder layers (ExLlamaV2 mixes 2-8 bit groups to reach it)
    head_bits: int = 6  # bits of the output head
    calibration_samples: int = 128  # rows of the quantization pass
    calibration_tokens: int = 512  # ids per row
    measurement_samples: int = 32  # rows (the first ones) of the measurement pass


def check_spec(spec: Exl2Spec, config: dict[str, Any] | None = None) -> None:
    """Refuse what ExLlamaV2's converter cannot honour, naming the field; before anything is built."""
    if not MIN_BITS <= spec.bits <= MAX_BITS:
        raise Exl2Error(f"bits: ExLlamaV2 targets {MIN_BITS:g} to {MAX_BITS:g} bits per weight, got {spec.bits}")
    if spec.head_bits not in HEAD_BITS:
        raise Exl2Error(f"head_bits: ExLlamaV2 0.3.2 quantizes the head at {', '.join(map(str, HEAD_BITS))} bits, "
                        f"got {spec.head_bits}")
    if spec.calibration_samples < 1 or spec.calibration_tokens < 2:
        raise Exl2Error(f"calibration_samples ({spec.calibration_samples}) must be >= 1 and calibration_tokens "
                        f"({spec.calibration_tokens}) >= 2")
    if not 1 <= spec.measurement_samples <= spec.calibration_samples:
        raise Exl2Error(f"measurement_samples: expected 1 to calibration_samples ({spec.calibration_samples}), "
                        f"got {spec.measurement_samples}")
    positions = (config or {}).get("max_position_embeddings")
    if positions and spec.calibration_tokens > positions:
        raise Exl2Error(f"calibration_tokens {spec.calibration_tokens} exceed the model's max_position_embeddings "
                        f"{positions}")


def library_versions() -> dict[str, str | None]:
    """The versions that decide a conversion's bytes, read from package metadata (importing exllamav2 would
    build its CUDA extension)."""
    found: dict[str, str | None] = {}
    for name in ("exllamav2", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def ids_digest(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16]


def cache_key(src: Path, spec: Exl2Spec, windows: list[list[int]], versions: dict[str, str | None]) -> dict[str, Any]:
    """Everything that decides a cached EXL2 folder's bytes."""
    return {"source": source_digest(src), "spec": asdict(spec), "calibration_ids": ids_digest(windows),
            "versions": versions, "converter": hashlib.sha256(CONVERTER.read_bytes()).hexdigest()[:16],
            "format": CACHE_FORMAT}


def conversion_job(src: Path, work: Path, out: Path, spec: Exl2Spec, ids_file: Path) -> dict[str, Any]:
    """The job harness/exl2_convert.py reads (its docstring lists the keys)."""
    return {"in_dir": str(src), "work_dir": str(work), "out_dir": str(out), "bits": float(spec.bits),
            "head_bits": spec.head_bits, "calibration": "ids", "ids_file": str(ids_file),
            "length": spec.calibration_tokens, "measurement_length": spec.calibration_tokens,
            "measurement_rows": spec.measurement_samples}


def packed_bits(folder: Path) -> dict[str, Any]:
    """Bits per weight the conversion produced, from the EXL2 tensors' headers: 8 x the bytes of each linear
    layer's packed tensors (PACKED) over its weights (inputs x outputs), for the decoder layers and the head."""
    from safetensors import safe_open

    shapes: dict[str, tuple[list[int], str]] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Exl2Error(f"{folder}: no *.safetensors written by ExLlamaV2")
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                piece = handle.get_slice(key)
                shapes[key] = (list(piece.get_shape()), piece.get_dtype())
    totals = {"decoder": [0, 0, 0], "head": [0, 0, 0]}  # bits, weights, layers
    for key, (shape, _) in shapes.items():
        if not key.endswith(".q_weight"):
            continue
        module = key.removesuffix(".q_weight")
        part = "head" if module.rsplit(".", 1)[-1] == "lm_head" else "decoder"
        inputs = shapes[f"{module}.q_invperm"][0][0]
        bits = 0
        for name in PACKED:
            tensor_shape, dtype = shapes[f"{module}.{name}"]
            count = 1
            for size in tensor_shape:
                count *= size
            bits += 8 * count * DTYPE_BYTES[dtype]
        totals[part][0] += bits
        totals[part][1] += inputs * shape[1]
        totals[part][2] += 1
    if not totals["decoder"][2]:
        raise Exl2Error(f"{folder}: no EXL2 linear layer (.q_weight) in the written tensors")
    stored = sum(DTYPE_BYTES[dtype] * _numel(shape) for shape, dtype in shapes.values())
    return {"decoder_bits_per_weight": totals["decoder"][0] / totals["decoder"][1],
            "decoder_linear_layers": totals["decoder"][2],
            "head_bits_per_weight": totals["head"][0] / totals["head"][1] if totals["head"][1] else None,
            "stored_tensor_bytes": stored,
            "counted": f"8 x bytes of {', '.join(PACKED)} / (inputs x outputs), per linear layer"}


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def read_exl2_config(folder: Path) -> dict[str, Any]:
    """config.json's quantization_config of an EXL2 folder, checked to be ExLlamaV2's."""
    path = folder / "config.json"
    if not path.is_file():
        raise Exl2Error(f"{folder}: no config.json")
    quantization = json.loads(path.read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") != "exl2":
        raise Exl2Error(f"{path}: quantization_config.quant_method is {quantization.get('quant_method')!r}, "
                        "not 'exl2' (ExLlamaV2's compile step writes it)")
    return quantization


def run_converter(job: dict[str, Any], job_file: Path, log_file: Path, python: str = sys.executable) -> dict[str, Any]:
    """Run harness/exl2_convert.py on `job`; its record (the last stdout line), or Exl2Error with the log's tail."""
    atomic_write_text(job_file, json.dumps(job, indent=1))
    with open(log_file, "w", encoding="utf-8") as handle:
        # stdin closed: ExLlamaV2's SIGINT handler asks the console whether to go on
        done = subprocess.run([python, str(CONVERTER), str(job_file)], stdin=subprocess.DEVNULL, stdout=handle,
                              stderr=subprocess.STDOUT, text=True, check=False)
    lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    if done.returncode != 0:
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        raise Exl2Error(f"ExLlamaV2's conversion exited with status {done.returncode} (log {log_file}):\n{tail}")
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    raise Exl2Error(f"ExLlamaV2's conversion printed no record (log {log_file})")


def exl2_folder(src: Path, spec: Exl2Spec, windows: list[list[int]], log: Log = print,
                python: str = sys.executable) -> tuple[Path, dict[str, Any]]:
    """The cached EXL2 folder of `src` under `spec`, converted on first use; and its sidecar (stats, `fresh`)."""
    src = Path(src)
    check_spec(spec, json.loads((src / "config.json").read_text()))
    if len(windows) != spec.calibration_samples or any(len(w) != spec.calibration_tokens for w in windows):
        raise Exl2Error(f"calibration: expected {spec.calibration_samples} rows of {spec.calibration_tokens} ids")
    key = cache_key(src, spec, windows, library_versions())
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root() / "exl2" / f"exl2-{spec.bits:g}bpw-h{spec.head_bits}-{digest}"
    sidecar_path = final / "quantbench.json"
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if sidecar_path.is_file():
            try:
                problem = manifest_problem(final)
                if problem is not None:
                    raise Exl2Error(problem)
                read_exl2_config(final)
                sidecar = json.loads(sidecar_path.read_text())
                if sidecar.get("key") == key:
                    log(f"EXL2 folder cached at {final}")
                    return final, {**sidecar, "fresh": False}
            except (Exl2Error, ValueError, OSError) as exc:
                log(f"cached EXL2 folder {final} is unusable ({exc}); rebuilding")
        work = final.parent / f".{final.name}.work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            with atomic_directory(final) as tmp:
                ids_file = work / "calibration_ids.json"
                atomic_write_text(ids_file, json.dumps(windows))
                started = time.perf_counter()
                # the log stays beside the folder, for a failed conversion above all
                record = run_converter(conversion_job(src, work, tmp, spec, ids_file), work / "job.json",
                                       final.parent / f"{final.name}.convert.log", python)
                seconds = time.perf_counter() - started
                # compile_model copies every non-tensor file of the source, its shard index among them, which
                # names the source's shards: not this folder's
                (tmp / "model.safetensors.index.json").unlink(missing_ok=True)
                quantization = read_exl2_config(tmp)
                sidecar = {"key": key, "source": str(src),
                           "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "quantize_s": seconds, "device": "cuda", "converter": record,
                           "quantization_config": quantization, "produced": packed_bits(tmp)}
                atomic_write_text(tmp / "quantbench.json", json.dumps(sidecar, indent=1, sort_keys=True))
                write_manifest(tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log(f"EXL2 {spec.bits:g} bpw converted in {sidecar['quantize_s']:.1f} s: "
        f"{sidecar['produced']['decoder_bits_per_weight']:.3f} bits per decoder weight")
    return final, {**sidecar, "fresh": True}
