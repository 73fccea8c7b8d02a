"""Model sources: synthetic weights are deterministic, local folders load for real, bad entries say why."""

import shutil

import pytest

from harness.config import ModelSpec
from harness.methods.dense import DenseMethod
from harness.models import ModelError, arch_config, architectures, prompt_ids, resolve, synthetic_folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_required_architectures_ship():
    assert {"llama-2-7b", "llama-2-13b", "mistral-7b", "tinyllama-1.1b"} <= set(architectures())
    assert arch_config("llama-2-7b")["hidden_size"] == 4096
    assert arch_config("mistral-7b")["num_key_value_heads"] == 8


def test_an_unknown_architecture_lists_the_known_ones(cache):
    with pytest.raises(ModelError, match="unknown architecture 'llama-9'.*tinyllama-1.1b"):
        synthetic_folder("llama-9", 0)


def test_synthetic_weights_depend_only_on_architecture_and_seed(tmp_path, monkeypatch):
    digests = []
    for run in ("a", "b"):
        monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / run))
        folder = synthetic_folder("tiny-test", 3, log=lambda m: None)
        digests.append((folder / "model-00001.safetensors").read_bytes())
    assert digests[0] == digests[1]
    other = synthetic_folder("tiny-test", 4, log=lambda m: None)
    assert (other / "model-00001.safetensors").read_bytes() != digests[1]


def test_a_synthetic_folder_is_built_once(cache):
    messages = []
    first = synthetic_folder("tiny-test", 0, log=messages.append)
    second = synthetic_folder("tiny-test", 0, log=messages.append)
    assert first == second
    assert sum("building" in m for m in messages) == 1


def test_a_local_folder_loads_through_the_real_path(cache, tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(synthetic_folder("tiny-test", 0, log=lambda m: None), folder)
    resolved = resolve(ModelSpec(name="mine", source="local", path=str(folder)))
    assert resolved.pretrained == str(folder) and not resolved.synthetic
    model = DenseMethod({"dtype": "float32"}, "cpu").load(resolved.pretrained)
    assert model.config.hidden_size == 128


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda d: None, "is not a folder"),
        (lambda d: d.mkdir(), "has no config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), r"holds no \*.safetensors"),
    ],
)
def test_a_bad_local_folder_names_the_model_and_path(tmp_path, prepare, message):
    folder = tmp_path / "missing"
    prepare(folder)
    with pytest.raises(ModelError, match=f"model 'mine'.*{message}"):
        resolve(ModelSpec(name="mine", source="local", path=str(folder)))


def test_prompt_ids_are_seeded_and_rows_are_shared_across_batch_sizes(cache):
    resolved = resolve(ModelSpec(name="tiny", source="synthetic", arch="tiny-test"), log=lambda m: None)
    big = prompt_ids(resolved, None, 8, 16, seed=0)
    small = prompt_ids(resolved, None, 2, 16, seed=0)
    assert len(big) == 8 and all(len(row) == 16 for row in big)
    assert small == big[:2]
    assert prompt_ids(resolved, None, 2, 16, seed=1) != small
    assert all(0 <= t < 1024 for row in big for t in row)


class _Tokenizer:
    """Character ids: enough to see which text was tokenized."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * add_special_tokens + [ord(c) for c in text]}


def test_the_evaluation_text_can_be_a_file_or_a_dataset(tmp_path, monkeypatch):
    import sys
    import types

    from harness.config import AccuracyConfig
    from harness.models import ResolvedModel, eval_ids

    model = ResolvedModel.__new__(ResolvedModel)
    text = tmp_path / "wiki.txt"
    text.write_text("abc")
    assert eval_ids(model, _Tokenizer(), AccuracyConfig(text=str(text), max_eval_tokens=3), 0) == [1, 97, 98]
    with pytest.raises(ModelError, match=r"accuracy.text: '/nope.txt' is neither a text file"):
        eval_ids(model, _Tokenizer(), AccuracyConfig(text="/nope.txt"), 0)

    def offline(name, config, split):
        raise ConnectionError(f"no network for {name}/{config}/{split}")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ModelError, match=r"is not available here: no network for wikitext/wikitext-2-raw-v1/test"):
        eval_ids(model, _Tokenizer(), AccuracyConfig(text="datasets:wikitext:wikitext-2-raw-v1:test"), 0)
