"""GPTQ and AWQ checkpoints: calibration ids, quantization with GPTQModel, round-to-nearest packing in the
AutoGPTQ and AutoAWQ layouts, checks of a checkpoint against its tensors, and a content-keyed cache.

Two ways to make a checkpoint from a model folder's float weights:
- `gptqmodel`: GPTQ or AWQ with calibration data (the algorithms of the papers), through GPTQModel;
- `rtn`: round-to-nearest, packed by this module in the layouts most published checkpoints use: AutoGPTQ /
  GPTQ-for-LLaMa (`checkpoint_format` gptq, i.e. v1 zeros: stored zero = zero - 1, packed along the input
  for qweight and along the output for qzeros) and AutoAWQ GEMM (qweight [in, out/8] with the nibble order
  0 2 4 6 1 3 5 7, asymmetric with zero points). No calibration: speed and memory of the real kernels on large
  architectures in seconds, and checkpoints in the old formats without downloading any.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.cache import (
    atomic_directory,
    atomic_write_text,
    cache_root,
    file_lock,
    file_sha256,
    manifest_problem,
    write_manifest,
)

Log = Callable[[str], None]
CACHE_FORMAT = 3  # 2: a checkpoint always carries a tokenizer; 3: asymmetric RTN ranges always hold 0
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a packed int32 holds output column 8j + AWQ_ORDER[i]
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


class QuantError(ValueError):
    """A quantization request or checkpoint that cannot be honoured; the message names the field or tensor."""


@dataclass(frozen=True)
class QuantSpec:
    """What a GPTQ/AWQ checkpoint is made of: the algorithm, its parameters and its calibration data."""

    format: str = "gptq"  # gptq | awq
    quantizer: str = "gptqmodel"  # gptqmodel (with calibration) | rtn (round-to-nearest, no calibration)
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    desc_act: bool = False  # GPTQ act-order
    true_sequential: bool = True
    damp: float = 0.01  # GPTQ dampening, a fraction of the Hessian's mean diagonal
    sym: bool = True  # GPTQ symmetric; AWQ zero point = not sym
    awq_version: str = "gemm"  # gemm | gemv
    calibration: str = "auto"  # auto | corpus | random | a text file | datasets:NAME[:CONFIG]
    calibration_samples: int = 128
    calibration_tokens: int = 512

    def cache_fields(self) -> dict[str, Any]:
        """The fields that decide the checkpoint's bytes (calibration is keyed by its ids' digest instead)."""
        fields = asdict(self)
        if self.quantizer == "rtn":
            for name in ("desc_act", "true_sequential", "damp", "calibration", "calibration_samples",
                         "calibration_tokens"):
                fields.pop(name)
        return fields


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each quantized linear of one decoder layer of a Llama-family config."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config["intermediate_size"]
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
            "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def check_spec(spec: QuantSpec, config: dict[str, Any]) -> None:
    """Refuse parameters the model's layers cannot take, naming the layer; before anything is built."""
    if spec.format not in ("gptq", "awq"):
        raise QuantError(f"format: expected gptq or awq, got {spec.format!r}")
    if spec.format == "awq" and spec.bits != 4:
        raise QuantError(f"bits: AWQ checkpoints are 4-bit, got {spec.bits}")
    if spec.quantizer == "rtn" and spec.bits != 4:
        raise QuantError(f"bits: round-to-nearest packing writes 4-bit checkpoints, got {spec.bits}")
    if spec.quantizer == "rtn" and spec.format == "awq" and spec.sym:
        raise QuantError("sym: the AutoAWQ layout that round-to-nearest writes has zero points (sym = false)")
    if spec.quantizer == "rtn" and spec.format == "gptq" and not spec.sym:
        raise QuantError("sym: the AutoGPTQ v1 layout that round-to-nearest writes must be symmetric (sym = true); "
                         "GPTQModel refuses asymmetric v1 checkpoints that it did not write")
    if spec.group_size == 0 or spec.group_size < -1:
        raise QuantError(f"group_size: expected -1 or a positive size, got {spec.group_size}")
    per_word = 32 // spec.bits if 32 % spec.bits == 0 else 32  # 3 bits: 32 values in 3 int32s
    for name, (in_features, out_features) in linear_shapes(config).items():
        if spec.group_size > 0 and in_features % spec.group_size:
            raise QuantError(f"group_size {spec.group_size} does not divide the input width {in_features} of "
                             f"{name}: pick a group size that divides every layer's width")
        if out_features % per_word or in_features % per_word:
            raise QuantError(f"{name} ({in_features} -> {out_features}) cannot be packed at {spec.bits} bits: "
                             f"both widths must be multiples of {per_word}")


# ---- calibration ---------------------------------------------------------------------------------------

def calibration_ids(spec: QuantSpec, tokenizer: Any, vocab_size: int, seed: int) -> tuple[list[list[int]], str]:
    """`calibration_samples` windows of `calibration_tokens` ids, and a label saying where they come from.

    `auto` is the corpus's training text when the model has a tokenizer (never the held-out text that
    perplexity is measured on) and seeded random ids when it has none (synthetic models).
    """
    source = spec.calibration
    if source == "auto":
        source = "corpus" if tokenizer is not None else "random"
    need = spec.calibration_samples * spec.calibration_tokens
    if source == "random":
        import torch

        generator = torch.Generator().manual_seed(seed + 2)
        ids = torch.randint(min(3, vocab_size - 1), vocab_size, (need,), generator=generator).tolist()
        label = f"seeded random ids (seed {seed + 2}): the model has no tokenizer"
    else:
        if tokenizer is None:
            raise QuantError(f"calibration: {source!r} is text, but this model has no tokenizer; use 'random'")
        text, label = _calibration_text(source)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) < need:
            raise QuantError(f"calibration: {label} has {len(ids)} tokens; {spec.calibration_samples} samples "
                             f"of {spec.calibration_tokens} tokens need {need}")
    windows = [ids[i * spec.calibration_tokens:(i + 1) * spec.calibration_tokens]
               for i in range(spec.calibration_samples)]
    return windows, label


def _calibration_text(source: str) -> tuple[str, str]:
    if source == "corpus":
        from harness.corpus import split

        return split().train, "the corpus's training text (pydoc_data.topics)"
    from harness.models import ModelError, text_source

    try:
        text = text_source(source, "calibration", "train",
                           "neither auto, corpus, random, datasets:NAME nor a text file")
    except ModelError as exc:
        raise QuantError(str(exc)) from None
    return text, source if source.startswith("datasets:") else f"text file {Path(source).expanduser()}"


# ---- round-to-nearest packing ----------------------------------------------------------------------------

def rtn(weight: Any, group_size: int, sym: bool) -> tuple[Any, Any, Any]:
    """Round-to-nearest 4-bit codes [out, in], fp16-exact scales [groups, out] and integer zeros [groups, out]."""
    import torch

    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    blocks = weight.float().reshape(out_features, in_features // group, group)
    if sym:
        scales = (2 * blocks.abs().amax(dim=2) / 15).clamp(min=1e-8)
        zeros = torch.full_like(scales, 8, dtype=torch.int64)
    else:
        high, low = blocks.amax(dim=2).clamp(min=0), blocks.amin(dim=2).clamp(max=0)  # the range holds 0
        scales = ((high - low) / 15).clamp(min=1e-5)
        zeros = torch.round(-low / scales).clamp(0, 15).to(torch.int64)
    scales = scales.half().float()  # quantize with the scale as it will be stored
    codes = (torch.round(blocks / scales[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.int64)
    return codes.reshape(out_features, in_features), scales.T.contiguous(), zeros.T.contiguous()


def _int32(packed: Any) -> Any:
    """Packed uint32 bit patterns (held in int64) as the int32 tensor the checkpoints store."""
    import torch

    packed = packed & 0xFFFFFFFF
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


def pack_gptq(codes: Any, scales: Any, zeros: Any, group_size: int) -> dict[str, Any]:
    """AutoGPTQ / GPTQ-for-LLaMa v1 tensors of one linear layer from its codes [out, in]."""
    import torch

    out_features, in_features = codes.shape
    group = in_features if group_size == -1 else group_size
    by_input = codes.T.reshape(in_features // 8, 8, out_features)
    shifts = (4 * torch.arange(8, dtype=torch.int64))
    qweight = (by_input << shifts[None, :, None]).sum(dim=1)
    stored_zeros = ((zeros - 1) & 0xF).reshape(zeros.shape[0], out_features // 8, 8)  # v1: zero - 1
    qzeros = (stored_zeros << shifts[None, None, :]).sum(dim=2)
    return {"qweight": _int32(qweight), "qzeros": _int32(qzeros), "scales": scales.half(),
            "g_idx": torch.arange(in_features, dtype=torch.int32) // group}


def pack_awq(codes: Any, scales: Any, zeros: Any) -> dict[str, Any]:
    """AutoAWQ GEMM tensors of one linear layer from its codes [out, in]."""
    import torch

    out_features, in_features = codes.shape
    order = torch.tensor(AWQ_ORDER)
    shifts = (4 * torch.arange(8, dtype=torch.int64))
    by_output = codes.T.reshape(in_features, out_features // 8, 8)[:, :, order]
    qweight = (by_output << shifts[None, None, :]).sum(dim=2)
    zero_blocks = zeros.reshape(zeros.shape[0], out_features // 8, 8)[:, :, order]
    qzeros = (zero_blocks << shifts[None, None, :]).sum(dim=2)
    return {"qweight": _int32(qweight), "qzeros": _int32(qzeros), "scales": scales.half()}


def quantization_config(spec: QuantSpec) -> dict[str, Any]:
    """The `quantization_config` of config.json that transformers and GPTQModel read for an RTN checkpoint."""
    if spec.format == "gptq":
        return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": False,
                "sym": spec.sym, "checkpoint_format": "gptq", "true_sequential": True}
    return {"quant_method": "awq", "version": spec.awq_version, "bits": spec.bits, "group_size": spec.group_size,
            "zero_point": not spec.sym}


def write_rtn(src: Path, spec: QuantSpec, out: Path, log: Log = print) -> None:
    """Round-to-nearest quantize every decoder linear of `src`'s float weights into `out` (fp16 elsewhere)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    check_spec(spec, config)
    shard, shard_bytes, index, count = {}, 0, {}, 0
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise QuantError(f"{src}: no *.safetensors weights to quantize")

    def flush() -> None:
        nonlocal shard, shard_bytes, count
        if shard:
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, shard_bytes, count = {}, 0, count + 1

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                tensor = handle.get_tensor(key)
                module, _, leaf = key.rpartition(".")
                if leaf == "weight" and module.rsplit(".", 1)[-1] in LINEAR_NAMES and ".layers." in key:
                    codes, scales, zeros = rtn(tensor, spec.group_size, spec.sym)
                    packed = pack_gptq(codes, scales, zeros, spec.group_size) if spec.format == "gptq" \
                        else pack_awq(codes, scales, zeros)
                    tensors = {f"{module}.{name}": value for name, value in packed.items()}
                else:
                    tensors = {key: tensor.half() if tensor.is_floating_point() else tensor}
                for name, value in tensors.items():
                    shard[name] = value.contiguous()
                    shard_bytes += value.numel() * value.element_size()
                if shard_bytes > 2 * 2**30:
                    flush()
        log(f"RTN {spec.format}: packed {file.name}")
    flush()
    if count > 1:
        atomic_write_text(out / "model.safetensors.index.json",
                          json.dumps({"metadata": {}, "weight_map": index}, indent=1, sort_keys=True))
    else:
        (out / "model-00000.safetensors").rename(out / "model.safetensors")
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    config["quantization_config"] = quantization_config(spec)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))


# ---- GPTQModel -----------------------------------------------------------------------------------------

def gptqmodel_environment() -> None:
    """Settings GPTQModel needs before import: no network for kernel sources; a worker pool that fits small CPUs."""
    os.environ.setdefault("GPTQMODEL_OFFLINE", "1")
    if (os.cpu_count() or 1) <= 4:
        # 7.6.0 asks for 2 loader workers and fails on a 2-core machine unless told how many it has
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))


def write_placeholder_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of `vocab_size` placeholder tokens: GPTQModel opens a tokenizer with every model.

    For models without one (synthetic architectures), which are only ever fed token ids.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {f"<t{i}>": i for i in range(vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<t0>")),
                                        unk_token="<t0>", pad_token="<t0>")
    tokenizer.save_pretrained(folder)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def _stage_with_tokenizer(src: Path, stage: Path, vocab_size: int) -> Path:
    """`src` as GPTQModel can open it: its files linked into `stage`, plus a placeholder tokenizer if it has none.

    GPTQModel.load always opens a tokenizer; synthetic models have none and are calibrated with ids.
    """
    if _has_tokenizer(src):
        return src
    stage.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        (stage / item.name).symlink_to(item.resolve())
    write_placeholder_tokenizer(stage, vocab_size)
    return stage


def quantize_gptqmodel(src: Path, spec: QuantSpec, windows: list[list[int]], out: Path, device: str,
                       log: Log = print) -> dict[str, Any]:
    """GPTQ or AWQ `src` with GPTQModel on `windows` of calibration ids; save into `out`; return its stats."""
    gptqmodel_environment()
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization import AWQConfig, QuantizeConfig

    config = json.loads((src / "config.json").read_text())
    check_spec(spec, config)
    if spec.format == "gptq":
        extra = {"act_group_aware": False} if spec.group_size == -1 or spec.desc_act else {}
        qconfig = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act, sym=spec.sym,
                                 true_sequential=spec.true_sequential, damp_percent=spec.damp, **extra)
    else:
        qconfig = AWQConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, format=spec.awq_version)
    stage = _stage_with_tokenizer(src, out.parent / f".{out.name}.stage", config["vocab_size"])
    try:
        model = GPTQModel.load(str(stage), qconfig, device=device)
        calibration = [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w), dtype=torch.long)}
                       for w in windows]
        # AWQ's default packer needs CUDA in 7.6.0; its torch packer writes the same GEMM layout on a CPU
        backend = {"backend": BACKEND.AWQ_TORCH} if spec.format == "awq" and device == "cpu" else {}
        here = os.getcwd()
        out.mkdir(parents=True, exist_ok=True)
        os.chdir(out)  # GPTQModel writes its per-module logs to ./logs: keep them with the checkpoint
        try:
            started = time.perf_counter()
            stats = model.quantize(calibration, batch_size=1, **backend)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        finally:
            os.chdir(here)
        model.save(str(out))
    finally:
        if stage != src:
            shutil.rmtree(stage, ignore_errors=True)
    losses = [float(row["loss"]) for rows in (stats or {}).values() for row in rows
              if isinstance(row, dict) and _is_float(row.get("loss"))]
    log(f"{spec.format} quantized in {seconds:.1f} s ({len(losses)} modules)")
    return {"quantize_s": seconds, "modules": len(losses), "mean_loss": sum(losses) / len(losses) if losses else None}


def _is_float(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# ---- checkpoints ---------------------------------------------------------------------------------------

def read_quantization_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's quantization settings: config.json's quantization_config, else quantize_config.json."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise QuantError(f"{folder}: no config.json; not a model folder")
    config = json.loads(config_path.read_text())
    quant = config.get("quantization_config")
    if quant is None and (folder / "quantize_config.json").is_file():
        quant = json.loads((folder / "quantize_config.json").read_text())
        quant.setdefault("quant_method", "gptq")
    if not isinstance(quant, dict) or quant.get("quant_method") not in ("gptq", "awq"):
        raise QuantError(f"{config_path}: quantization_config.quant_method: expected gptq or awq, "
                         f"got {None if not isinstance(quant, dict) else quant.get('quant_method')!r}")
    return quant


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """Check that the packed tensors match the quantization config (bits, group size, layout); return it.

    Reads tensor shapes only (safetensors headers), so it costs nothing on a large checkpoint.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    quant = read_quantization_config(folder)
    method = quant["quant_method"]
    bits = int(quant.get("bits", quant.get("w_bit", 4)))
    group = int(quant.get("group_size", quant.get("q_group_size", 128)))
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QuantError(f"{folder}: no *.safetensors weights")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except SafetensorError as exc:
            raise QuantError(f"{file}: not a readable safetensors file ({exc})") from None
    modules = sorted(k.removesuffix(".qweight") for k in shapes if k.endswith(".qweight"))
    if not modules:
        raise QuantError(f"{folder}: quantization_config says {method}, but no tensor is a packed .qweight")
    for module in modules:
        qweight, scales = shapes[f"{module}.qweight"], shapes.get(f"{module}.scales")
        if scales is None:
            raise QuantError(f"{folder}: {module}.scales is missing")
        out_features = scales[1]
        if method == "gptq":  # g_idx holds one entry per input; without it, trust the packed rows
            in_features = shapes[f"{module}.g_idx"][0] if f"{module}.g_idx" in shapes else qweight[0] * 32 // bits
            expected_q = (in_features * bits // 32, out_features)
        else:
            in_features = qweight[0]
            expected_q = (in_features, out_features * bits // 32)
        groups = 1 if group == -1 else -(-in_features // group)
        problem = None
        if tuple(qweight) != expected_q:
            problem = f"qweight is {list(qweight)}, {bits}-bit {method} needs {list(expected_q)}"
        elif scales[0] != groups:
            problem = (f"scales has {scales[0]} groups; group_size {group} over {in_features} inputs "
                       f"gives {groups}")
        if problem:
            raise QuantError(f"{folder}: {module}: the tensors disagree with quantization_config ({problem})")
    return quant


def source_digest(folder: Path) -> str:
    """sha256 over a model folder's config and weight files (hashes remembered per file, see cache.file_sha256)."""
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    payload = {f.name: file_sha256(f) for f in files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_key(src: Path, spec: QuantSpec, windows: list[list[int]] | None) -> dict[str, Any]:
    """Everything that decides a cached checkpoint's bytes."""
    from harness.hardware import package_versions

    versions = {name: package_versions()[name] for name in ("gptqmodel", "transformers", "torch")}
    if spec.quantizer == "rtn":
        versions = {"transformers": None, "torch": None, "gptqmodel": None}  # the packer is this module
    calibration = hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16] if windows is not None else None
    return {"source": source_digest(src), "spec": spec.cache_fields(), "calibration_ids": calibration,
            "versions": versions, "format": CACHE_FORMAT}


def quantized_folder(src: Path, spec: QuantSpec, windows: list[list[int]] | None, device: str,
                     log: Log = print) -> tuple[Path, dict[str, Any]]:
    """The cached checkpoint of `src` under `spec`, built on first use; and its sidecar (stats, `fresh`).

    Built under a lock into a temporary folder that is renamed into place only when complete and checked,
    so a failed or interrupted build never leaves a checkpoint under a key it does not match.
    """
    src = Path(src)
    key = cache_key(src, spec, windows)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root() / "quant" / f"{spec.format}-{spec.quantizer}-{digest}"
    sidecar_path = final / "quantbench.json"
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if sidecar_path.is_file():
            try:
                problem = manifest_problem(final)
                if problem not in (None, "no manifest"):
                    raise QuantError(problem)
                check_checkpoint(final)
                sidecar = json.loads(sidecar_path.read_text())
                if sidecar.get("key") == key:
                    if problem == "no manifest":  # built before manifests, and its tensors check out: record it
                        write_manifest(final)
                    log(f"{spec.format} checkpoint cached at {final}")
                    return final, {**sidecar, "fresh": False}
            except (QuantError, ValueError, OSError) as exc:
                log(f"cached checkpoint {final} is unusable ({exc}); rebuilding")
        with atomic_directory(final) as tmp:
            if spec.quantizer == "rtn":
                started = time.perf_counter()
                write_rtn(src, spec, tmp, log)
                # round-to-nearest packs on the CPU whatever the suite's device
                stats = {"quantize_s": time.perf_counter() - started, "device": "cpu"}
            else:
                if windows is None:
                    raise QuantError("gptqmodel quantization needs calibration ids")
                stats = {**quantize_gptqmodel(src, spec, windows, tmp, device, log), "device": device}
            for name in TOKENIZER_FILES:
                if (src / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(src / name, tmp / name)
            if not _has_tokenizer(tmp):
                write_placeholder_tokenizer(tmp, json.loads((tmp / "config.json").read_text())["vocab_size"])
            check_checkpoint(tmp)
            sidecar = {"key": key, "source": str(src), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       **stats}
            atomic_write_text(tmp / "quantbench.json", json.dumps(sidecar, indent=1, sort_keys=True))
            write_manifest(tmp)
    return final, {**sidecar, "fresh": True}
