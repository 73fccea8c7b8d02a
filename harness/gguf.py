"""GGUF files for llama.cpp: a Llama/Mistral folder converted to F16 GGUF in Python, quantized, and cached.

The conversion follows llama.cpp's `convert_hf_to_gguf.py` for `LlamaForCausalLM` (tensor names from
`gguf.TensorNameMap`, the q/k rotary permutation, the SentencePiece vocabulary) but streams one tensor at a
time, so a 13 GB folder never sits in memory. Quantization is llama.cpp's own quantizer, called through
llama-cpp-python. Files land in `cache_root()/gguf/<key>/<qtype>.gguf`, where the key hashes the source
folder's contents and the converter and library versions; a JSON sidecar beside each file holds its size,
sha256 and the wall times of conversion and quantization, and a file that no longer matches it is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from harness.cache import atomic_write_text, cache_root, file_lock, file_sha256

CONVERTER_FORMAT = "v1"  # bump when the converter's output changes: cached files then miss
GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("llama", "mistral")
# qtype -> name of llama.cpp's file type constant in llama_cpp
QTYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
}
VOCAB_KEY = "quantbench.vocab"  # GGUF metadata: "sentencepiece" or "placeholder"
# SentencePiece token types, as llama.cpp reads them (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

Log = Callable[[str], None]
_log_callback: Any = None


class GGUFError(ValueError):
    """A GGUF file or conversion that cannot be made or used; the message names the file or setting."""


def check_gguf(path: Path) -> None:
    """Raise GGUFError naming `path` when it is missing or does not start with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{str(path)!r} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


def _quiet_llama_cpp() -> None:
    """Keep llama.cpp's per-tensor info lines out of the worker log; warnings and errors still show.

    llama-cpp-python's own log callback maps ggml's log levels from an older enum (it shows info as
    warnings), so this installs one that reads ggml's current levels: 3 warn, 4 error, 5 continues a line.
    """
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes
    import sys

    import llama_cpp

    showing = [False]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        if level != 5:
            showing[0] = level >= 3
        if showing[0]:
            sys.stderr.write(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _log_callback = callback  # llama.cpp keeps only the pointer: the callback must outlive this call


def library_versions() -> dict[str, str]:
    """The versions of the libraries that decide a GGUF file's bytes."""
    return {"llama_cpp_python": version("llama_cpp_python"), "gguf": version("gguf")}


# ---- conversion -------------------------------------------------------------------------------------


def permute(weights: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's q/k permutation (`LlamaModel.permute`): HF's rotate-half layout to GGML's interleaved one."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{folder} holds no *.safetensors weights to convert")
    return files


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise GGUFError(f"rope type {rope_type!r} is not supported by the GGUF converter; supported: default")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def read_config(hf_folder: Path) -> dict[str, Any]:
    """The folder's config.json, checked to be an architecture the converter supports."""
    path = Path(hf_folder) / "config.json"
    if not path.is_file():
        raise GGUFError(f"{hf_folder} has no config.json; is it a Hugging Face model folder?")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise GGUFError(f"architecture {model_type!r} is not supported by the GGUF converter; "
                        f"supported: {', '.join(SUPPORTED_ARCHS)}")
    return config


def vocab_kind(hf_folder: Path) -> str:
    """"sentencepiece" when the folder has a `tokenizer.model`, else "placeholder" (see `_placeholder_vocab`)."""
    return "sentencepiece" if (Path(hf_folder) / "tokenizer.model").is_file() else "placeholder"


def _sentencepiece_vocab(path: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int], Any]:
    """Tokens, scores and types as the converter's `_create_vocab_sentencepiece` makes them, and the model."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    return tokens, scores, types, sp


def _placeholder_vocab(vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """A SentencePiece-shaped vocabulary of exactly `vocab_size` pieces, for folders without a tokenizer.

    llama.cpp needs a vocabulary to load a model; the suite feeds token ids, never text, so only the count
    and the special ids matter: <unk> <s> </s>, the 256 byte pieces when they fit, then unused pads.
    """
    tokens = [b"<unk>", b"<s>", b"</s>"][:vocab_size]
    types = [UNKNOWN, CONTROL, CONTROL][:vocab_size]
    if vocab_size >= 3 + 256:
        tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
        types += [BYTE] * 256
    pads = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]".encode() for i in range(pads)]
    types += [UNUSED] * pads
    return tokens, [0.0] * 3 + [-1000.0] * (vocab_size - 3), types


def _write_vocab(writer: Any, hf_folder: Path, vocab_size: int, log: Log) -> str:
    kind = vocab_kind(hf_folder)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    if kind == "sentencepiece":
        tokens, scores, types, sp = _sentencepiece_vocab(hf_folder / "tokenizer.model", vocab_size)
        bos, eos, unk = sp.bos_id(), sp.eos_id(), sp.unk_id()
        # llama.cpp prepends a space to SentencePiece text unless told otherwise; the converter reads the
        # setting from tokenizer_config.json
        tokenizer_config = hf_folder / "tokenizer_config.json"
        if tokenizer_config.is_file():
            add_prefix_space = json.loads(tokenizer_config.read_text()).get("add_prefix_space")
            if add_prefix_space is not None:
                writer.add_add_space_prefix(add_prefix_space)
    else:
        if any((hf_folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            log(f"{hf_folder} has no tokenizer.model (SentencePiece): writing a placeholder vocabulary; "
                "token ids are fed directly, so figures are unaffected, but text cannot be tokenized")
        tokens, scores, types = _placeholder_vocab(vocab_size)
        bos, eos, unk = 1, 2, 0
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for setter, token_id in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos),
                             (writer.add_unk_token_id, unk)):
        if 0 <= token_id < vocab_size:
            setter(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_string(VOCAB_KEY, kind)
    return kind


def convert_to_gguf(hf_folder: Path, out: Path, log: Log = print) -> None:
    """Write an F16 GGUF of a Llama or Mistral Hugging Face folder to `out` (1-D tensors stay F32).

    Metadata and vocabulary follow llama.cpp's converter; q_proj/k_proj get its rotary permutation.
    Tensors are streamed from the safetensors files one at a time.
    """
    # torch before gguf: on the H200 image a conversion that imported gguf first aborted ("free(): invalid
    # pointer"; the cause is not established) and one that imported torch first ran
    import torch

    # isort: split
    import gguf
    import numpy as np
    from safetensors import safe_open

    hf_folder = Path(hf_folder)
    config = read_config(hf_folder)
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    n_embd = config["hidden_size"]
    head_dim = config.get("head_dim") or n_embd // n_head
    n_blocks = config["num_hidden_layers"]
    vocab_size = config["vocab_size"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)

    # pass 1: names, shapes and dtypes from the safetensors headers only
    plan: list[tuple[Path, str, str, tuple[int, ...], Any]] = []
    for file in _weight_files(hf_folder):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise GGUFError(f"{file.name}: tensor {name!r} has no GGUF name in llama.cpp's llama map")
                shape = tuple(handle.get_slice(name).get_shape())
                dtype = np.float32 if len(shape) == 1 else np.float16
                plan.append((file, name, gguf_name, shape, dtype))

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(config.get("_name_or_path") or hf_folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != n_embd // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = _write_vocab(writer, hf_folder, vocab_size, log)
    for _, _, gguf_name, shape, dtype in plan:
        writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    # pass 2: the tensor data, in the order of the tensor infos
    handles: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack:
        for file, name, _, _, dtype in plan:
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            data = handles[file].get_tensor(name).to(torch.float32)
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute(data, n_head, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute(data, n_head, n_head_kv)
            writer.write_tensor_data(data.numpy().astype(dtype))
    writer.close()
    log(f"converted {hf_folder} to F16 GGUF ({len(plan)} tensors, {kind} vocabulary)")


# ---- quantization -----------------------------------------------------------------------------------


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """Quantize the GGUF `src` to `dst` with llama.cpp's quantizer; "f16" copies the file as is."""
    ftype = _ftype(qtype)
    check_gguf(src)
    if qtype == "f16":
        shutil.copyfile(src, dst)
        return
    import llama_cpp

    _quiet_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), llama_cpp.byref(params))
    if status != 0:
        raise GGUFError(f"llama.cpp could not quantize {src} to {qtype} (status {status}; its log says why)")


def _ftype(qtype: str) -> int:
    if qtype not in QTYPES:
        raise GGUFError(f"unknown GGUF qtype {qtype!r}; supported: {', '.join(QTYPES)}")
    import llama_cpp

    return getattr(llama_cpp, QTYPES[qtype])


# ---- the cache --------------------------------------------------------------------------------------


def source_key(hf_folder: Path) -> str:
    """Cache key of a folder's GGUF files: its config, weights and tokenizer bytes, converter and versions."""
    hf_folder = Path(hf_folder)
    files = [hf_folder / "config.json", *_weight_files(hf_folder)]
    files += [hf_folder / name for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
              if (hf_folder / name).is_file()]
    payload = {"files": {f.name: file_sha256(f) for f in files}, "format": CONVERTER_FORMAT, **library_versions()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar of a cached GGUF file."""
    return Path(path).with_suffix(".json")


def read_sidecar(path: Path) -> dict[str, Any]:
    """What was recorded when a cached GGUF file was built (size, sha256, timings), or {} if none."""
    side = sidecar_path(path)
    return json.loads(side.read_text()) if side.is_file() else {}


def _problem(path: Path) -> str | None:
    """Why a cached file cannot be used (None: it matches its sidecar)."""
    side = read_sidecar(path)
    if not path.is_file():
        return "missing"
    if not side:
        return "no sidecar"
    try:
        check_gguf(path)
    except GGUFError as exc:
        return str(exc)
    stat = path.stat()
    if stat.st_size != side["size"]:
        return f"size {stat.st_size} bytes, expected {side['size']}"
    # hashed again whenever the file was touched (cache.file_sha256): an unchanged mtime proves nothing
    if file_sha256(path) != side["sha256"]:
        return "sha256 differs from the one recorded at build time"
    return None


@contextlib.contextmanager
def _temporary_sibling(final: Path) -> Iterator[Path]:
    """A temporary file beside `final` that replaces it only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def gguf_file(hf_folder: Path, qtype: str, log: Log = print) -> Path:
    """The cached `<qtype>.gguf` of a Llama/Mistral folder, converted and quantized on first use.

    Built under a lock and renamed into place; its sidecar records size, sha256 and the conversion and
    quantization wall times (`convert_s`, `quantize_s`). A cached file that is truncated or changed is
    rebuilt.
    """
    _ftype(qtype)
    hf_folder = Path(hf_folder)
    read_config(hf_folder)
    folder = cache_root() / "gguf" / source_key(hf_folder)
    final = folder / f"{qtype}.gguf"
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / f".{qtype}.lock"):
        problem = _problem(final)
        if problem is None:
            log(f"GGUF {qtype}: cached at {final}")
            return final
        if problem != "missing":
            log(f"GGUF {qtype}: cached file {final} is unusable ({problem}); rebuilding")
        if qtype == "f16":
            log(f"GGUF f16: converting {hf_folder}")
            started = time.perf_counter()
            with _temporary_sibling(final) as tmp:
                convert_to_gguf(hf_folder, tmp, log)
            timings = {"convert_s": time.perf_counter() - started, "quantize_s": 0.0}
        else:
            f16 = gguf_file(hf_folder, "f16", log)
            log(f"GGUF {qtype}: quantizing {f16}")
            started = time.perf_counter()
            with _temporary_sibling(final) as tmp:
                quantize(f16, tmp, qtype)
            timings = {"convert_s": read_sidecar(f16)["convert_s"], "quantize_s": time.perf_counter() - started}
        stat = final.stat()
        sidecar = {"qtype": qtype, "source": str(hf_folder.resolve()), "vocab": vocab_kind(hf_folder),
                   "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(final),
                   "format": CONVERTER_FORMAT, "versions": library_versions(), **timings}
        atomic_write_text(sidecar_path(final), json.dumps(sidecar, indent=1, sort_keys=True))
        log(f"GGUF {qtype}: {final} ({stat.st_size / 2**20:.1f} MiB), convert {timings['convert_s']:.1f} s, "
            f"quantize {timings['quantize_s']:.1f} s")
    return final
