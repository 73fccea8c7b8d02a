"""Where weights come from: the embedded model, a synthetic architecture + seed, a local folder, a hub id,
a GGUF file (harness/gguf_model.py).

Every source resolves to something `from_pretrained` accepts, plus the token ids every backend is given:
prompt ids for throughput and evaluation ids for accuracy. Models with a tokenizer take both from the
held-out corpus text; synthetic models (no tokenizer) take seeded random ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cache import atomic_directory, cache_root, file_lock, manifest_problem, write_manifest
from harness.config import AccuracyConfig, ModelError, ModelSpec

ARCH_DIR = Path(__file__).parent / "archs"
SYNTHETIC_FORMAT = "v1"  # bump when the way synthetic weights are drawn changes: old caches then miss
SHARD_BYTES = 2 * 2**30
INIT_STD = 0.02  # the initializer_range of Llama/Mistral configs


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: what to pass to `from_pretrained` and what it is."""

    name: str
    pretrained: str  # a local folder or a hub id
    has_tokenizer: bool
    synthetic: bool
    vocab_size: int
    provenance: dict[str, Any]


def architectures() -> list[str]:
    """Names of the shipped architecture files (usable as `arch = ...` of a synthetic model)."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def arch_config(arch: str) -> dict[str, Any]:
    """The config dict of a shipped architecture, or a ModelError listing the known ones."""
    path = ARCH_DIR / f"{arch}.json"
    if not path.is_file():
        raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(architectures())}")
    config = json.loads(path.read_text())
    config.pop("_source", None)
    return config


def resolve(spec: ModelSpec, log: Callable[[str], None] = print) -> ResolvedModel:
    """Turn a model entry into a loadable folder or hub id, building the embedded or synthetic weights once."""
    if spec.source == "embedded":
        from harness import embedded

        folder = embedded.shipped()  # the same bytes on every machine, checked by sha256
        meta = json.loads((folder / "quantbench_embedded.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        return ResolvedModel(spec.name, str(folder), True, False, config["vocab_size"],
                             {"source": "embedded", "recipe_key": meta.get("recipe_key"), "folder": str(folder),
                              "weights_sha256": embedded.SHIPPED_MODEL_SHA256})
    if spec.source == "synthetic":
        folder = synthetic_folder(spec.arch or "", spec.seed, log=log)
        config = json.loads((folder / "config.json").read_text())
        return ResolvedModel(spec.name, str(folder), False, True, config["vocab_size"],
                             {"source": "synthetic", "arch": spec.arch, "seed": spec.seed,
                              "format": SYNTHETIC_FORMAT, "folder": str(folder)})
    if spec.source == "local":
        folder = Path(spec.path or "").expanduser()
        if not folder.is_dir():
            raise ModelError(f"model {spec.name!r}: path {str(folder)!r} is not a folder")
        if not (folder / "config.json").is_file():
            raise ModelError(f"model {spec.name!r}: {folder} has no config.json; is it a Hugging Face model folder?")
        weights = local_weights(folder, spec)
        config = json.loads((folder / "config.json").read_text())
        return ResolvedModel(spec.name, str(folder), _has_tokenizer(folder), False, config.get("vocab_size", 0),
                             {"source": "local", "folder": str(folder.resolve()),
                              "config_sha256": _sha256((folder / "config.json").read_bytes()),
                              "weights_sha256": weights_digest(weights)})
    if spec.source == "gguf":
        from harness.gguf_model import resolve_gguf

        folder, provenance = resolve_gguf(spec, log=log)
        # the dequantized weights the torch-side methods load, hashed as a local folder's are: what lets the
        # accuracy figures meet another CPU key's baseline (harness/baselines.py)
        provenance["weights_sha256"] = weights_digest(local_weights(folder, spec))
        config = json.loads((folder / "config.json").read_text())
        return ResolvedModel(spec.name, str(folder), True, False, config["vocab_size"], provenance)
    if spec.source == "hub":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec.hub_id, revision=spec.revision)
        except OSError as exc:
            raise ModelError(f"model {spec.name!r}: hub id {spec.hub_id!r} could not be resolved: "
                             f"{str(exc).splitlines()[0]} (offline? download it once, or use a local folder)"
                             ) from None
        return ResolvedModel(spec.name, spec.hub_id or "", True, False, config.vocab_size,
                             {"source": "hub", "hub_id": spec.hub_id, "revision": spec.revision})
    raise ModelError(f"model {spec.name!r}: unknown source {spec.source!r}")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def local_weights(folder: Path, spec: ModelSpec) -> list[Path]:
    """The weight files `from_pretrained` will load from a local folder, checked: safetensors unless the matrix
    opts in to pickles by name (`pickle_weights = true`).

    The safetensors files are the ones transformers reads (`model.safetensors`, or the shards its index
    names), each with a readable header; any other `*.safetensors` beside a pickle proves nothing. A pickle
    weight file in the folder is refused even beside safetensors weights, since a fallback would load it.
    """
    from safetensors import SafetensorError, safe_open

    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
                     and not p.name.startswith(("training_args", "optimizer", "scheduler", "rng_state")))
    if pickles and not spec.pickle_weights:
        raise ModelError(f"model {spec.name!r}: {folder} holds pickle weights ({', '.join(p.name for p in pickles)}), "
                         "which can run code when loaded; convert them to safetensors, or set "
                         f"pickle_weights = true in [models.{spec.name}] to load them anyway")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"model {spec.name!r}: {index} is not a safetensors index ({exc})") from None
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif pickles:
        return pickles
    else:
        raise ModelError(f"model {spec.name!r}: {folder} holds no *.safetensors weights that transformers loads "
                         "(model.safetensors, or the shards model.safetensors.index.json names)")
    for file in files:
        try:
            with safe_open(str(file), framework="np") as handle:
                if not list(handle.keys()):
                    raise ModelError(f"model {spec.name!r}: {file} holds no tensors")
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"model {spec.name!r}: {file} is not a readable safetensors file ({exc})") from None
    return files


def weights_digest(files: list[Path]) -> str:
    """sha256 over the weight files' own sha256s (by name): which weights a figure was measured on."""
    from harness.cache import file_sha256

    return _sha256(json.dumps({f.name: file_sha256(f) for f in files}, sort_keys=True).encode())


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def synthetic_folder(arch: str, seed: int, log: Callable[[str], None] = print) -> Path:
    """A cached HF folder with seeded random fp16 weights in the shape of `arch`.

    Each tensor is drawn from its own CPU generator seeded by (seed, tensor name), so the weights are the
    same on every machine and do not depend on the order tensors are made in. Norm weights are ones and
    everything else is N(0, 0.02), as the architectures' own initializers do.
    """
    config = arch_config(arch)
    key = _sha256(json.dumps([config, seed, SYNTHETIC_FORMAT], sort_keys=True).encode())[:16]
    final = cache_root() / "synthetic" / f"{arch}-s{seed}-{key}"
    with file_lock(final.with_suffix(".lock")):
        if (final / "model.safetensors.index.json").is_file():
            problem = manifest_problem(final)
            if problem == "no manifest":  # built before manifests: its files are what it has, from now on
                write_manifest(final)
                return final
            if problem is None:
                return final
            log(f"cached synthetic weights {final} differ from when they were built ({problem}); rebuilding")
        log(f"building synthetic weights for {arch} (seed {seed}) in {final}")
        with atomic_directory(final) as tmp:
            _write_synthetic(config, seed, tmp, log)
            write_manifest(tmp)
    return final


def _write_synthetic(config: dict[str, Any], seed: int, folder: Path, log: Callable[[str], None]) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shard_count = 0

    def flush() -> None:
        nonlocal shard, shard_bytes, shard_count
        if shard:
            shard_count += 1
            name = f"model-{shard_count:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({tensor: name for tensor in shard})
            log(f"  wrote {name} ({shard_bytes / 2**30:.2f} GiB)")
            shard, shard_bytes = {}, 0

    def draw(name: str) -> torch.Tensor:
        shape = shapes[name]
        if "norm" in name:
            return torch.ones(shape, dtype=torch.float16)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=generator, dtype=torch.float32) * INIT_STD).to(torch.float16)

    # one generator per tensor makes the draws independent, so threads (torch frees the GIL) keep them exact
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        tensors = pool.map(draw, shapes)
    for name, tensor in zip(shapes, tensors, strict=True):
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    total = sum(int(torch.Size(s).numel()) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config.dtype = torch.float16
    hf_config.save_pretrained(folder)


def prompt_ids(model: ResolvedModel, tokenizer: Any, batch_size: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """`batch_size` prompts of exactly `prompt_tokens` ids: held-out text, or seeded ids without a tokenizer.

    Row i of a larger batch equals row i of a smaller one, so batch sizes differ only in how many rows run.
    """
    if tokenizer is None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        low = min(3, model.vocab_size - 1)
        ids = torch.randint(low, model.vocab_size, (batch_size, prompt_tokens), generator=generator)
        return ids.tolist()
    stream = heldout_ids(tokenizer)
    needed = batch_size * prompt_tokens
    if len(stream) < needed:
        stream = (stream * (needed // len(stream) + 1))
    return [stream[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(batch_size)]


def eval_ids(model: ResolvedModel, tokenizer: Any, accuracy: AccuracyConfig, seed: int) -> list[int]:
    """The evaluation token ids for perplexity: the first `max_eval_tokens` held-out ids, or seeded ids."""
    if tokenizer is None:
        import torch

        generator = torch.Generator().manual_seed(seed + 1)
        low = min(3, model.vocab_size - 1)
        return torch.randint(low, model.vocab_size, (accuracy.max_eval_tokens,), generator=generator).tolist()
    if accuracy.text:
        ids, field = list(tokenizer(evaluation_text(accuracy.text), add_special_tokens=True)["input_ids"]), \
            f"accuracy.text {accuracy.text!r}"
    else:
        ids, field = heldout_ids(tokenizer), "the corpus's held-out text"
    # one full window, or all of max_eval_tokens where that is less: a shorter text gives a perplexity over a
    # handful of tokens (ppl 522 +- 460 over 13), or none
    needed = min(accuracy.context_tokens, accuracy.max_eval_tokens)
    if len(ids) < needed:
        raise ModelError(f"{field} gives {len(ids)} evaluation tokens; one window needs {needed} "
                         f"(accuracy.context_tokens = {accuracy.context_tokens}, accuracy.max_eval_tokens = "
                         f"{accuracy.max_eval_tokens}): use a longer text or a smaller accuracy.context_tokens")
    return ids[: accuracy.max_eval_tokens]


def evaluation_text(source: str) -> str:
    """The text of `accuracy.text`: a file, or `datasets:NAME[:CONFIG[:SPLIT]]` (test split by default)."""
    return text_source(source, "accuracy.text", "test", "neither a text file nor datasets:NAME[:CONFIG[:SPLIT]]")


def text_source(source: str, field: str, split: str, otherwise: str) -> str:
    """Text from a file or `datasets:NAME[:CONFIG[:SPLIT]]` (documents joined by newlines; `split` by default).

    Errors name `field`; `otherwise` ends the message for a source that is neither.
    """
    if source.startswith("datasets:"):
        name, config, chosen, *_ = [*source.removeprefix("datasets:").split(":"), None, None]
        try:
            import datasets
        except ImportError:
            raise ModelError(f"{field}: {source!r} needs the 'datasets' package, which is not installed") from None
        try:
            data = datasets.load_dataset(name, config or None, split=chosen or split)
        except Exception as exc:  # offline, unknown name: the library's own words say which
            raise ModelError(f"{field}: {source!r} is not available here: {exc}") from None
        column = "text" if "text" in data.column_names else data.column_names[0]
        return "\n".join(data[column])
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelError(f"{field}: {source!r} is {otherwise}")
    return path.read_text(encoding="utf-8")


def heldout_ids(tokenizer: Any) -> list[int]:
    """The held-out corpus text as one id stream (BOS first), tokenized once per tokenizer."""
    from harness.corpus import split

    return list(tokenizer(split().heldout, add_special_tokens=True)["input_ids"])


def ids_digest(ids: list[list[int]] | list[int]) -> str:
    """A short fingerprint of token ids, recorded so two results can be checked to have seen the same input."""
    return _sha256(json.dumps(ids).encode())[:16]


TOKENIZER_CHECK_CHARS = 2000  # held-out characters an engine's own tokenizer is compared on


def tokenizer_check(tokenizer: Any) -> dict[str, Any]:
    """The held-out text on which an engine's tokenizer is compared with the model's Hugging Face tokenizer,
    and that tokenizer's ids of it."""
    from harness.corpus import split

    text = split().heldout[:TOKENIZER_CHECK_CHARS]
    return {"text": text, "ids": list(tokenizer(text, add_special_tokens=True)["input_ids"])}
