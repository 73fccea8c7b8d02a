"""The embedded default model: the corpus split it learns from, its build, its cache and its determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from harness import corpus
from harness.embedded import METADATA_FILE, EmbeddedRecipe, build, heldout_perplexity, recipe_key

# Small enough to build in seconds; it runs every step of the real build.
TINY = EmbeddedRecipe(hidden_size=64, num_hidden_layers=1, intermediate_size=128, steps=5, log_every=5)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The default embedded model, trained once per session into a fresh cache, and the lines it logged."""
    lines: list[str] = []
    path = build(cache_dir=tmp_path_factory.mktemp("cache"), log=lines.append)
    return path, lines


def _metadata(path: Path) -> dict:
    return json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_split_is_deterministic() -> None:
    assert corpus.split() == corpus.split()
    assert corpus.corpus_sha256() == corpus.corpus_sha256()
    names = [name for name, _ in corpus.documents()]
    assert names == sorted(names)


def test_split_holds_out_every_tenth_document_and_nothing_else() -> None:
    docs = corpus.documents()
    data = corpus.split()
    assert data.heldout_names == tuple(name for i, (name, _) in enumerate(docs) if i % 10 == 9)
    assert data.heldout_names
    heldout = dict(docs)
    assert data.heldout == "\n\n".join(heldout[name] for name in data.heldout_names)
    assert data.train == "\n\n".join(text for name, text in docs if name not in data.heldout_names)
    for name in data.heldout_names:
        assert heldout[name] not in data.train, f"held-out topic {name!r} leaks into the training text"


def test_recipe_key_follows_the_recipe() -> None:
    assert recipe_key(EmbeddedRecipe()) == recipe_key(EmbeddedRecipe())
    assert recipe_key(EmbeddedRecipe()) != recipe_key(EmbeddedRecipe(seed=1))


def test_build_gives_a_folder_transformers_loads(built: tuple[Path, list[str]]) -> None:
    path, _ = built
    assert path.name == recipe_key(EmbeddedRecipe())
    assert (path / "tokenizer.model").is_file()
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_tokenizer_matches_sentencepiece(built: tuple[Path, list[str]]) -> None:
    path, _ = built
    tokenizer = AutoTokenizer.from_pretrained(path)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert len(tokenizer) == sp.get_piece_size()
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    texts = [corpus.split().heldout, "", " leading space", "  x = 1\n\ttab", "naïve ∑ 😀 12345", "\n\nend  "]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == [sp.bos_id(), *sp.encode(text)], f"ids differ for {text[:40]!r}"
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_metadata_records_a_heldout_perplexity_far_below_uniform(built: tuple[Path, list[str]]) -> None:
    path, _ = built
    metadata = _metadata(path)
    assert metadata["recipe_key"] == path.name
    assert metadata["model_sha256"] == _sha256(path / "model.safetensors")
    assert metadata["heldout_ppl"] < metadata["vocab_size"] / 10
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert heldout_perplexity(model, tokenizer) == pytest.approx(metadata["heldout_ppl"], rel=1e-4)


def test_second_build_reuses_the_cache(built: tuple[Path, list[str]]) -> None:
    path, first_lines = built
    assert any("step" in line for line in first_lines)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert build(cache_dir=path.parent.parent, log=lines.append) == path
    assert not any("step" in line for line in lines), lines
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_builds_are_byte_identical(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    first = build(TINY, cache_dir=tmp_path / "a", log=lambda _: None)
    second = build(TINY, cache_dir=tmp_path / "b", log=lambda _: None)
    assert first.name == second.name == recipe_key(TINY)
    for name in ("model.safetensors", "tokenizer.model", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert _metadata(first)["model_sha256"] == _metadata(second)["model_sha256"]
    assert torch.get_num_threads() == threads


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    def interrupt(line: str) -> None:
        if "step" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(TINY, cache_dir=tmp_path, log=interrupt)
    assert [p.name for p in (tmp_path / "embedded").iterdir()] == [f".{recipe_key(TINY)}.lock"]


def test_shipped_model_has_the_recorded_sha256() -> None:
    from harness.embedded import SHIPPED_FOLDER, SHIPPED_MODEL_SHA256, SHIPPED_TOKENIZER_MODEL_SHA256, shipped

    assert shipped() == SHIPPED_FOLDER
    assert _sha256(SHIPPED_FOLDER / "model.safetensors") == SHIPPED_MODEL_SHA256
    assert _sha256(SHIPPED_FOLDER / "tokenizer.model") == SHIPPED_TOKENIZER_MODEL_SHA256
    assert _metadata(SHIPPED_FOLDER)["model_sha256"] == SHIPPED_MODEL_SHA256


def test_a_changed_shipped_model_is_refused(tmp_path: Path) -> None:
    import shutil

    from harness.embedded import SHIPPED_FOLDER, ShippedModelError, shipped

    copy = tmp_path / "embedded_model"
    shutil.copytree(SHIPPED_FOLDER, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ShippedModelError, match="model.safetensors has sha256"):
        shipped(copy)
    shutil.copy(SHIPPED_FOLDER / "model.safetensors", copy / "model.safetensors")
    (copy / "tokenizer.model").unlink()
    with pytest.raises(ShippedModelError, match="tokenizer.model is missing"):
        shipped(copy)
