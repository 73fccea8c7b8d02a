"""compressed-tensors checkpoints made by llmcompressor, in an environment of its own, and cached.

llmcompressor 0.14 pins another compressed-tensors than vLLM does, so the two cannot share an environment.
The checkpoint is built by harness/llmcompressor_oneshot.py run with the interpreter that
`QUANTBENCH_LLMCOMPRESSOR_PYTHON` names (`tox -e vllm` makes that environment), in the method's prepare
process. Like GPTQ checkpoints (harness/quant.py) it is built into a temporary folder under a lock and renamed
into place only when complete, with a manifest of its files checked before each use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.cache import atomic_directory, cache_root, file_lock, file_sha256, manifest_problem, write_manifest
from harness.quant import TOKENIZER_FILES, source_digest

PYTHON_VAR = "QUANTBENCH_LLMCOMPRESSOR_PYTHON"
PATH_VAR = "QUANTBENCH_LLMCOMPRESSOR_PYTHONPATH"  # the PYTHONPATH of that interpreter (none by default)
SCRIPT = Path(__file__).with_name("llmcompressor_oneshot.py")
SCHEMES = ("w4a16", "w8a16", "w8a8")
SIDECAR = "quantbench.json"
BUILD_TIMEOUT_S = 1800


class CompressedError(RuntimeError):
    """A compressed-tensors checkpoint could not be built or is not what it should be."""


def llmcompressor_python() -> str | None:
    """The interpreter of the llmcompressor environment, or None when none is configured."""
    value = os.environ.get(PYTHON_VAR, "").strip()
    return value or None


def missing_builder() -> str | None:
    """Why no checkpoint can be built here (no llmcompressor interpreter), or None."""
    python = llmcompressor_python()
    if python is None:
        return (f"no llmcompressor environment: set {PYTHON_VAR} to the python of an environment with "
                "llmcompressor==0.14.0 (tox -e vllm makes one), or give a ready checkpoint")
    if shutil.which(python) is None and not Path(python).is_file():
        return f"{PYTHON_VAR}={python!r} is not an interpreter on this machine"
    return None


def cache_key(source: Path, scheme: str, group_size: int) -> dict[str, Any]:
    """Everything that decides a checkpoint's bytes: the source weights, the scheme and the script."""
    return {"source": source_digest(source), "scheme": scheme, "group_size": group_size if scheme == "w4a16" else None,
            "script": file_sha256(SCRIPT)}


def check_compressed(folder: Path) -> dict[str, Any]:
    """The folder's quantization_config; raise CompressedError naming the file when it is not compressed-tensors."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CompressedError(f"{config_path}: not a readable model config ({exc})") from None
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        raise CompressedError(f"{config_path}: quantization_config.quant_method is "
                              f"{quantization.get('quant_method')!r}, not 'compressed-tensors'")
    if not any(folder.glob("*.safetensors")):
        raise CompressedError(f"{folder}: no .safetensors weights")
    return quantization


def compressed_folder(source: Path, scheme: str, group_size: int, log: Any = print) -> tuple[Path, dict[str, Any]]:
    """The cached checkpoint of `source` under `scheme`, built on first use; and its sidecar (`fresh` when built)."""
    if scheme not in SCHEMES:
        raise CompressedError(f"unknown compressed-tensors scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    source = Path(source)
    key = cache_key(source, scheme, group_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root() / "compressed" / f"{scheme}-{digest}"
    with file_lock(final.parent / f".{final.name}.lock"):
        sidecar_path = final / SIDECAR
        if sidecar_path.is_file():
            problem = manifest_problem(final)
            sidecar = json.loads(sidecar_path.read_text()) if problem is None else {}
            if problem is None and sidecar.get("key") == key:
                check_compressed(final)
                log(f"compressed-tensors {scheme} checkpoint cached at {final}")
                return final, {**sidecar, "fresh": False}
            log(f"cached checkpoint {final} is unusable ({problem or 'another key'}); rebuilding")
        why = missing_builder()
        if why:
            raise CompressedError(why)
        with atomic_directory(final) as tmp:
            record = _build(source, tmp, scheme, group_size, log)
            for name in TOKENIZER_FILES:
                if (source / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(source / name, tmp / name)
            check_compressed(tmp)
            sidecar = {**record, "key": key}
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1, sort_keys=True))
            write_manifest(tmp)
    log(f"built compressed-tensors {scheme} checkpoint in {record['build_s']:.1f} s at {final}")
    return final, {**sidecar, "fresh": True}


def _build(source: Path, out: Path, scheme: str, group_size: int, log: Any) -> dict[str, Any]:
    """Run llmcompressor's oneshot in its own environment; its record, with the wall time of the whole build."""
    python = llmcompressor_python()
    started = time.perf_counter()
    # the environment's own packages only: quantbench's PYTHONPATH would put vLLM's compressed-tensors first;
    # an interpreter whose llmcompressor lies in a folder of its own (wheels unpacked with --target) names it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if os.environ.get(PATH_VAR):
        env["PYTHONPATH"] = os.environ[PATH_VAR]
    done = subprocess.run([python, str(SCRIPT), str(source), str(out), scheme, str(group_size)], env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    build_s = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise CompressedError(f"llmcompressor ({python}) failed to build the {scheme} checkpoint of {source}:\n{tail}")
    try:
        record = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise CompressedError(f"llmcompressor's build script printed no record: {done.stdout[-500:]!r}") from None
    log(f"llmcompressor {record.get('llmcompressor')} (compressed-tensors {record.get('compressed_tensors')}) "
        f"built {scheme}")
    return {**record, "build_s": build_s, "device": "cpu"}
