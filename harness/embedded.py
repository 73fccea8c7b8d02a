"""The suite's embedded default model: a small Llama trained on the Python help topics, shipped in the package.

Training it from the recipe takes about 75 s, but the result is not byte for byte the same on every CPU (an
AMD EPYC and an Intel Xeon gave held-out perplexities 70.4 and 77.3 from one recipe key). The weights and
tokenizer trained once are shipped under `harness/embedded_model/`; `shipped()` returns that folder, checked
against `SHIPPED_MODEL_SHA256`. `build()` trains a recipe into the cache.
`build()` caches it as an ordinary Hugging Face folder under `cache_root()/embedded/<recipe key>`, with the
SentencePiece `tokenizer.model` beside `tokenizer.json`, so transformers and llama.cpp's GGUF converter both
accept it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import generate_merges

from harness.cache import (
    atomic_directory,
    atomic_write_text,
    cache_root,
    file_lock,
    manifest_problem,
    sha256_file,
    write_manifest,
)
from harness.corpus import corpus_sha256, split

# Llama's special ids, which GGUF converters and runtimes assume for a SentencePiece vocabulary.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
METADATA_FILE = "quantbench_embedded.json"
HELDOUT_CONTEXT_TOKENS = 256
HELDOUT_MAX_TOKENS = 8192
SHIPPED_FOLDER = Path(__file__).parent / "embedded_model"
# The sha256 of the shipped model.safetensors and tokenizer.model: every machine benchmarks these bytes.
SHIPPED_MODEL_SHA256 = "b8c8040118916ccbba198a21c740110b58892dd35d0c224300eb33c56b82ee37"
SHIPPED_TOKENIZER_MODEL_SHA256 = "49ee6f870f44942542f779b38b712649234e4da74dc30174c9f260177ffdf5d7"


class ShippedModelError(RuntimeError):
    """The shipped embedded model is missing or its bytes differ from the recorded sha256."""


def shipped(folder: Path = SHIPPED_FOLDER) -> Path:
    """Return the shipped embedded model's folder, after checking its weights and tokenizer by sha256.

    The folder is read, never written: conversions of it (GGUF, quantized checkpoints) are cached elsewhere.
    """
    expected = {"model.safetensors": SHIPPED_MODEL_SHA256, "tokenizer.model": SHIPPED_TOKENIZER_MODEL_SHA256}
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise ShippedModelError(f"{path} is missing: reinstall quantbench (the embedded model ships with it)")
        found = sha256_file(path)
        if found != digest:
            raise ShippedModelError(f"{path} has sha256 {found}, not the recorded {digest}: the shipped embedded "
                                    "model was changed; restore it from the repository (git checkout -- "
                                    f"{path.name})")
    return folder


@dataclass(frozen=True)
class EmbeddedRecipe:
    """Every choice that shapes the embedded model; its hash (`recipe_key`) names the cache folder."""

    vocab_size: int = 2048  # SentencePiece pieces, counting <unk> <s> </s> and the 256 byte-fallback pieces
    tokenizer_model_type: str = "bpe"  # transformers' LlamaTokenizer is BPE-only, so "unigram" would not load
    character_coverage: float = 0.9999  # characters rarer than this are spelled as UTF-8 byte pieces
    hidden_size: int = 192  # width of the residual stream
    num_hidden_layers: int = 4  # decoder blocks
    num_attention_heads: int = 4  # query heads, each hidden_size / heads wide
    num_key_value_heads: int = 4  # key/value heads; fewer than the query heads makes it grouped-query attention
    intermediate_size: int = 512  # width of the SwiGLU MLP
    max_position_embeddings: int = 512  # longest context the config declares
    rope_theta: float = 10000.0  # RoPE base, Llama's default
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    initializer_range: float = 0.02  # std of the normal initialisation of the weights
    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 16  # sequences per optimiser step
    steps: int = 400  # optimiser steps; 70-80 s on two CPU cores
    learning_rate: float = 3e-3  # AdamW peak learning rate
    warmup_steps: int = 20  # linear warm-up from 0 to the peak
    min_lr_ratio: float = 0.1  # the cosine decay ends at this fraction of the peak
    weight_decay: float = 0.1  # AdamW decay on matrices; norms are not decayed
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 1.0  # maximum global gradient norm
    seed: int = 0  # seeds weight initialisation, batch sampling and SentencePiece
    train_threads: int = 2  # torch threads while training: CPU reductions depend on the thread count
    log_every: int = 50  # steps between progress lines; the final loss is the mean over the last this many


DEFAULT_RECIPE = EmbeddedRecipe()


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def recipe_key(recipe: EmbeddedRecipe) -> str:
    """Short hex key of one build: the recipe, the corpus, and the library versions that change the weights."""
    payload = {
        "recipe": dataclasses.asdict(recipe),
        "corpus_sha256": corpus_sha256(),
        "torch": _major_minor(torch.__version__),
        "transformers": transformers.__version__.split(".")[0],
        "sentencepiece": _major_minor(spm.__version__),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def build(
    recipe: EmbeddedRecipe = DEFAULT_RECIPE,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Return the embedded model's folder for `recipe`, training it first unless a complete one is cached.

    The folder is `(cache_dir or cache_root()) / "embedded" / recipe_key(recipe)`. It is built in a
    temporary sibling that is renamed into place only when everything, the metadata file last, is written,
    and under a lock, so concurrent processes train once and an interrupted build leaves nothing behind.
    """
    key = recipe_key(recipe)
    final = (cache_dir or cache_root()) / "embedded" / key
    with file_lock(final.parent / f".{key}.lock"):
        # Another process may have finished this build while we waited for the lock.
        if _is_complete(final):
            problem = _changed(final)
            if problem is None:
                log(f"embedded model {key}: cached at {final}")
                return final
            log(f"embedded model {key}: cached folder {final} differs from when it was built ({problem}); "
                "training it again")
        log(f"embedded model {key}: training into {final}")
        with atomic_directory(final) as folder:
            _build_into(folder, recipe, key, log)
            write_manifest(folder)
    return final


def _changed(folder: Path) -> str | None:
    """How a complete cached folder differs from its manifest (None: not at all).

    A folder built before manifests is checked against the weights' sha256 in its metadata, then recorded.
    """
    problem = manifest_problem(folder)
    if problem == "no manifest":
        recorded = json.loads((folder / METADATA_FILE).read_text()).get("model_sha256")
        if sha256_file(folder / "model.safetensors") != recorded:
            return "the sha256 of model.safetensors differs from its metadata's"
        write_manifest(folder)
        return None
    return problem


def heldout_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context_tokens: int = HELDOUT_CONTEXT_TOKENS,
    max_tokens: int = HELDOUT_MAX_TOKENS,
) -> float:
    """Perplexity of `model` on the corpus's held-out text.

    The held-out text is tokenized once (with the tokenizer's BOS), cut to its first `max_tokens` tokens and
    split into non-overlapping windows of `context_tokens`. Each window is scored on its own; every token but
    a window's first is predicted, and the result is exp of the mean negative log-likelihood over all
    predicted tokens.
    """
    if context_tokens < 2:
        raise ValueError(f"context_tokens must be at least 2 to predict anything, got {context_tokens}")
    ids = tokenizer(split().heldout)["input_ids"][:max_tokens]
    total_nll = 0.0
    predicted = 0
    with torch.inference_mode():
        for start in range(0, len(ids), context_tokens):
            window = torch.tensor(ids[start : start + context_tokens], device=model.device)
            if len(window) < 2:
                continue
            logits = model(input_ids=window[None]).logits[0, :-1].float()
            total_nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
            predicted += len(window) - 1
    if predicted == 0:
        raise ValueError(f"the held-out text gave {len(ids)} token(s); at least 2 are needed to score")
    return math.exp(total_nll / predicted)


def _is_complete(folder: Path) -> bool:
    # The metadata file is written last, so its presence means everything else is there.
    return (folder / METADATA_FILE).is_file()


def _build_into(folder: Path, recipe: EmbeddedRecipe, key: str, log: Callable[[str], None]) -> None:
    train_text = split().train
    with _deterministic(recipe):
        sp_model = _train_sentencepiece(train_text, recipe)
        sp = spm.SentencePieceProcessor(model_proto=sp_model)
        tokenizer = _llama_tokenizer(sp)
        model, train_wall_s, final_train_loss = _train_model(recipe, sp, train_text, key, log)
        ppl = heldout_perplexity(model, tokenizer)
    log(
        f"embedded model {key}: trained in {train_wall_s:.1f} s, final loss {final_train_loss:.3f}, "
        f"held-out ppl {ppl:.2f}"
    )

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(sp_model)
    metadata = {
        "recipe": dataclasses.asdict(recipe),
        "recipe_key": key,
        "corpus_sha256": corpus_sha256(),
        "vocab_size": sp.get_piece_size(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_wall_s": train_wall_s,
        "final_train_loss": final_train_loss,
        "heldout_ppl": ppl,
        "heldout_context_tokens": HELDOUT_CONTEXT_TOKENS,
        "heldout_max_tokens": HELDOUT_MAX_TOKENS,
        "model_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
        "tokenizer_model_sha256": hashlib.sha256(sp_model).hexdigest(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentencepiece": spm.__version__,
        },
    }
    atomic_write_text(folder / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _deterministic(recipe: EmbeddedRecipe) -> Iterator[None]:
    """Seed, pin the thread count and require deterministic kernels; restore the caller's settings after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(recipe.train_threads)
    torch.use_deterministic_algorithms(True)
    try:
        # fork_rng hands the global CPU generator back unchanged, so seeding here disturbs no caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            spm.set_random_generator_seed(recipe.seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _train_sentencepiece(train_text: str, recipe: EmbeddedRecipe) -> bytes:
    """Train the SentencePiece model on the training text; return the serialised model file."""
    lines = [line for line in train_text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type=recipe.tokenizer_model_type,
        vocab_size=recipe.vocab_size,
        character_coverage=recipe.character_coverage,
        byte_fallback=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        # The text is kept exactly as written, indentation included, and no space is prepended: this is what
        # transformers' LlamaTokenizer does with no normalizer and no prefix space, so both give the same ids.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        # One thread and every sentence in input order: no sampling, no shuffling, the same model every time.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _llama_tokenizer(sp: spm.SentencePieceProcessor) -> LlamaTokenizer:
    """The transformers Llama tokenizer that encodes text to the same ids as `sp`, with BOS prepended."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # SentencePiece BPE merges in the order it learned the pieces, which is their id order; special and
    # byte pieces are never the result of a merge.
    unmergeable = {
        sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
    }
    return LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab, skip_tokens=unmergeable),
        add_bos_token=True,
        add_eos_token=False,
        add_prefix_space=False,
        legacy=False,
    )


def _train_model(
    recipe: EmbeddedRecipe,
    sp: spm.SentencePieceProcessor,
    train_text: str,
    key: str,
    log: Callable[[str], None],
) -> tuple[LlamaForCausalLM, float, float]:
    """Initialise the Llama and train it on random windows of the training text; return it, seconds, loss."""
    started = time.perf_counter()
    config = LlamaConfig(
        vocab_size=sp.get_piece_size(),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        rms_norm_eps=recipe.rms_norm_eps,
        initializer_range=recipe.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        dtype="float32",
    )
    # Training stays on the CPU even where an accelerator is present, so the weights do not depend on which
    # one the machine has.
    model = LlamaForCausalLM(config)
    stream = torch.tensor([BOS_ID, *sp.encode(train_text)])
    if len(stream) <= recipe.seq_len:
        raise ValueError(f"the training text gave {len(stream)} tokens, fewer than seq_len={recipe.seq_len}")

    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": recipe.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=recipe.adam_betas,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(recipe, step))
    batches = torch.Generator().manual_seed(recipe.seed)

    model.train()
    losses: list[float] = []
    for step in range(recipe.steps):
        starts = torch.randint(0, len(stream) - recipe.seq_len, (recipe.batch_size,), generator=batches)
        batch = torch.stack([stream[s : s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            recent = losses[-recipe.log_every :]
            log(
                f"embedded model {key}: step {step + 1}/{recipe.steps} loss {sum(recent) / len(recent):.3f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    model.eval()
    recent = losses[-recipe.log_every :]
    return model, time.perf_counter() - started, sum(recent) / len(recent)


def _lr_factor(recipe: EmbeddedRecipe, step: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_lr_ratio`."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
