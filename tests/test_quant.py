"""GPTQ and AWQ checkpoints: RTN packing against GPTQModel, spec and checkpoint checks, calibration, the cache, kernels.

Everything runs on a one-layer Llama with 128- and 256-wide linears (groups of 64), so the file takes seconds.
Tests that load or quantize with GPTQModel skip without the 'gptq' extra.
"""

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from harness import quant
from harness.methods.gptq import GPTQMethod
from harness.models import ResolvedModel
from harness.quant import (
    QuantError,
    QuantSpec,
    calibration_ids,
    check_checkpoint,
    check_spec,
    gptqmodel_environment,
    pack_awq,
    pack_gptq,
    quantization_config,
    quantize_gptqmodel,
    quantized_folder,
    rtn,
    write_rtn,
)

CONFIG = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
          "tie_word_embeddings": False}
GROUP = 64  # divides every width of the tiny model
RTN_SPECS = {"gptq": QuantSpec(format="gptq", quantizer="rtn", group_size=GROUP, sym=True),
             "awq": QuantSpec(format="awq", quantizer="rtn", group_size=GROUP, sym=False)}
# The bf16 kernels land ~0.005 from the float32 model with the same dequantized weights here (0.01-0.03 on the
# wider models of the findings): bf16 keeps 8 mantissa bits, ~0.4% per op, on logits of absolute size ~1. A
# mispacked nibble or a zero off by one moves logits as much as quantization itself (~0.1), well above this.
KERNEL_TOLERANCE = 0.04


def quiet(message: str) -> None:
    """A log that keeps the test output clean."""


def word_tokenizer(vocab_size: int = CONFIG["vocab_size"]):
    """One id per whitespace-separated word w0 .. w{vocab_size - 1}; anything else is w0. No download."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def dequantize(codes, scales, zeros, group_size: int):
    """(codes - zeros) * scales as [out, in]: the weight a checkpoint's kernel multiplies with."""
    group = torch.arange(codes.shape[1]) // group_size
    return (codes - zeros[group].T) * scales[group].T


def random_ids(n: int = 48, seed: int = 0):
    return torch.randint(3, CONFIG["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


def float_logits(folder, ids, spec: QuantSpec | None = None):
    """Logits of the float32 model; with `spec`, of the float model holding what an RTN checkpoint stores.

    That is the dequantized RTN weight in every decoder linear and fp16-rounded weights elsewhere.
    """
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if spec is not None:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.data = dequantize(*rtn(module.weight.data, spec.group_size, spec.sym), spec.group_size)
            else:
                for param in module.parameters(recurse=False):
                    param.data = param.data.half().float()
    with torch.inference_mode():
        return model(ids).logits


def quantized_logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


def rewrite_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private QUANTBENCH_CACHE for every test: nothing here touches the user's cache."""
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gptqmodel():
    """GPTQModel, set up as the harness sets it up (offline, a worker pool that fits this CPU)."""
    gptqmodel_environment()
    return pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (the 'gptq' extra)")


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    """The tiny Llama's float32 weights, without a tokenizer like the suite's synthetic models."""
    folder = tmp_path_factory.mktemp("float")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenized_folder(tmp_path_factory, float_folder):
    """The same weights with a tokenizer, which GPTQModel.load needs."""
    folder = tmp_path_factory.mktemp("tokenized")
    for item in float_folder.iterdir():
        shutil.copy2(item, folder / item.name)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rtn_checkpoints(tmp_path_factory, tokenized_folder):
    """write_rtn's GPTQ (sym) and AWQ (zero point) checkpoints of the tiny model, with its tokenizer."""
    folders = {}
    for name, spec in RTN_SPECS.items():
        folder = folders[name] = tmp_path_factory.mktemp(f"rtn-{name}")
        write_rtn(tokenized_folder, spec, folder, log=quiet)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tokenized_folder / file, folder / file)
    return folders


# ---- round-to-nearest and packing ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(256, 128), (128, 256)])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_gptq_matches_gptqmodels_packer_bit_for_bit(gptqmodel, shape, sym):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_features, in_features = shape
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02
    codes, scales, zeros = rtn(weight, GROUP, sym)
    g_idx = torch.arange(in_features, dtype=torch.int32) // GROUP
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = dequantize(codes, scales, zeros, GROUP)  # pack_original re-derives the codes from it
    theirs = TorchLinear(bits=4, group_size=GROUP, sym=sym, desc_act=False, in_features=in_features,
                         out_features=out_features, bias=False, register_buffers=True)
    theirs.pack_original(linear, scales=scales.T.contiguous(), zeros=zeros.T.contiguous(), g_idx=g_idx)
    ours = pack_gptq(codes, scales, zeros, GROUP)
    assert torch.equal(ours["qweight"], theirs.qweight)
    assert torch.equal(ours["scales"], theirs.scales) and torch.equal(ours["g_idx"], theirs.g_idx)
    # GPTQModel keeps v2 zeros in memory (the true zero); v1 stores zero - 1 in each nibble, so packing zero + 1
    # in v1 must give GPTQModel's v2 bits exactly (adding 0x11111111 instead would carry out of a 0xF nibble)
    assert torch.equal(pack_gptq(codes, scales, zeros + 1, GROUP)["qzeros"], theirs.qzeros)
    assert not torch.equal(ours["qzeros"], theirs.qzeros)
    if sym:
        assert (ours["qzeros"] == 0x77777777).all()  # zero 8, stored as 7 in every nibble


@pytest.mark.parametrize("shape", [(256, 128), (128, 256)])
def test_pack_awq_matches_gptqmodels_packer_bit_for_bit(gptqmodel, shape):
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq as their_pack_awq

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.02
    codes, scales, zeros = rtn(weight, GROUP, sym=False)
    qweight, qzeros = their_pack_awq(codes.T.contiguous().to(torch.int32), zeros.to(torch.int32), 4)
    ours = pack_awq(codes, scales, zeros)
    assert ours["qweight"].dtype == torch.int32 and ours["qweight"].shape == (shape[1], shape[0] // 8)
    assert torch.equal(ours["qweight"], qweight)
    assert torch.equal(ours["qzeros"], qzeros)
    assert torch.equal(ours["scales"], scales.half())


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_round_trip_is_within_half_a_step(sym):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(256, 128, generator=generator) * torch.rand(256, 1, generator=generator)
    codes, scales, zeros = rtn(weight, GROUP, sym)
    assert codes.shape == (256, 128) and scales.shape == zeros.shape == (128 // GROUP, 256)
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(scales, scales.half().float())  # quantized with the scale as stored
    if sym:
        assert (zeros == 8).all()
    else:
        assert zeros.min() >= 0 and zeros.max() <= 15 and len(zeros.unique()) > 1
    step = scales[torch.arange(128) // GROUP].T
    error = (dequantize(codes, scales, zeros, GROUP) - weight).abs() / step
    # half a step, plus the fp16 rounding of the scale (relative 2^-11) over the up to 15 steps to a group's edge
    assert error.max() <= 0.5 + 15 * 2**-11
    assert error.max() > 0.4  # rounding happened: the bound is not met trivially


def test_rtn_group_size_minus_one_is_one_group_per_output():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    codes, scales, zeros = rtn(weight, -1, sym=True)
    assert scales.shape == zeros.shape == (1, 64)
    assert torch.allclose(scales[0], (2 * weight.abs().amax(dim=1) / 15).half().float())
    assert pack_gptq(codes, scales, zeros, -1)["g_idx"].eq(0).all()


def test_rtn_asym_quantizes_a_group_of_one_sign():
    weight = 1 + torch.rand(8, GROUP, generator=torch.Generator().manual_seed(5))  # all in [1, 2)
    codes, scales, zeros = rtn(weight, GROUP, sym=False)
    error = (dequantize(codes, scales, zeros, GROUP) - weight).abs() / scales.T
    assert error.max() <= 0.5 + 15 * 2**-11


# ---- spec checks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (QuantSpec(group_size=96), "group_size 96 does not divide the input width 128 of q_proj"),
        (QuantSpec(group_size=0), "group_size: expected -1 or a positive size, got 0"),
        (QuantSpec(group_size=-2), "group_size: expected -1 or a positive size, got -2"),
        (QuantSpec(format="awq", bits=8), "bits: AWQ checkpoints are 4-bit, got 8"),
        (QuantSpec(quantizer="rtn", bits=3), "bits: round-to-nearest packing writes 4-bit checkpoints, got 3"),
        (QuantSpec(format="awq", quantizer="rtn", sym=True), "sym: the AutoAWQ layout .* has zero points"),
        (QuantSpec(format="exl2"), "format: expected gptq or awq, got 'exl2'"),
    ],
    ids=["group-96", "group-0", "group-minus-2", "awq-8-bit", "rtn-3-bit", "rtn-awq-sym", "format-exl2"],
)
def test_check_spec_refuses_what_the_layers_cannot_take(spec, message):
    with pytest.raises(QuantError, match=message):
        check_spec(spec, CONFIG)


@pytest.mark.parametrize(
    ("intermediate", "group_size", "message"),
    [
        (288, GROUP, "group_size 64 does not divide the input width 288 of down_proj"),  # only down_proj's input
        (260, -1, r"gate_proj \(128 -> 260\) cannot be packed"),  # 260 is not a whole number of 8-code int32s
    ],
)
def test_a_layer_of_the_mlp_that_cannot_take_the_spec_is_named(intermediate, group_size, message):
    with pytest.raises(QuantError, match=message):
        check_spec(QuantSpec(group_size=group_size), {**CONFIG, "intermediate_size": intermediate})


@pytest.mark.parametrize("spec", [QuantSpec(group_size=GROUP), QuantSpec(group_size=-1), QuantSpec(bits=8),
                                  QuantSpec(bits=2), *RTN_SPECS.values()],
                         ids=["group-64", "group-minus-1", "8-bit", "2-bit", "rtn-gptq", "rtn-awq"])
def test_check_spec_accepts_what_the_layers_take(spec):
    check_spec(spec, CONFIG)


def test_check_spec_accepts_three_bit_gptq_on_widths_of_32():
    check_spec(QuantSpec(bits=3, group_size=GROUP), CONFIG)


def test_check_spec_refuses_asymmetric_rtn_gptq():
    with pytest.raises(QuantError, match="sym"):
        check_spec(QuantSpec(quantizer="rtn", group_size=GROUP, sym=False), CONFIG)


# ---- calibration -----------------------------------------------------------------------------------------

def test_random_calibration_is_seeded_windows_of_the_requested_size():
    spec = QuantSpec(calibration="random", calibration_samples=3, calibration_tokens=5)
    windows, label = calibration_ids(spec, None, 256, seed=0)
    assert len(windows) == 3 and all(len(window) == 5 for window in windows)
    assert all(3 <= i < 256 for window in windows for i in window)
    assert "random" in label
    assert calibration_ids(spec, None, 256, seed=0)[0] == windows
    assert calibration_ids(spec, None, 256, seed=1)[0] != windows
    assert calibration_ids(QuantSpec(calibration="auto", calibration_samples=3, calibration_tokens=5),
                           None, 256, seed=0)[0] == windows  # auto without tokenizer is random


def test_text_file_calibration_is_the_files_ids_in_order(tmp_path):
    words = [f"w{i % 50}" for i in range(40)]
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(words))
    spec = QuantSpec(calibration=str(text), calibration_samples=4, calibration_tokens=10)
    windows, label = calibration_ids(spec, word_tokenizer(), 256, seed=0)
    assert windows == [[i % 50 for i in range(start, start + 10)] for start in (0, 10, 20, 30)]
    assert str(text) in label


def test_a_text_file_too_short_names_the_counts(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(" ".join(["w5"] * 10))
    spec = QuantSpec(calibration=str(text), calibration_samples=2, calibration_tokens=8)
    with pytest.raises(QuantError, match=f"text file {re.escape(str(text))} has 10 tokens; 2 samples of 8 tokens "
                                         "need 16"):
        calibration_ids(spec, word_tokenizer(), 256, seed=0)


def test_an_unknown_calibration_source_is_refused():
    spec = QuantSpec(calibration="no-such-source", calibration_samples=1, calibration_tokens=4)
    with pytest.raises(QuantError, match="'no-such-source' is neither auto, corpus, random, datasets:NAME nor"):
        calibration_ids(spec, word_tokenizer(), 256, seed=0)


@pytest.mark.parametrize("source", ["corpus", "datasets:wikitext"])
def test_text_calibration_without_tokenizer_is_refused(source):
    spec = QuantSpec(calibration=source, calibration_samples=1, calibration_tokens=4)
    with pytest.raises(QuantError, match=f"'{source}' is text, but this model has no tokenizer; use 'random'"):
        calibration_ids(spec, None, 256, seed=0)


# ---- checkpoint checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_write_rtn_checkpoint_passes_its_check(rtn_checkpoints, fmt):
    folder = rtn_checkpoints[fmt]
    assert check_checkpoint(folder) == quantization_config(RTN_SPECS[fmt])
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float16" and config["quantization_config"]["group_size"] == GROUP
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]


@pytest.mark.parametrize(
    ("fmt", "field", "value", "problem"),
    [
        ("gptq", "group_size", 32, "scales has 4 groups; group_size 32 over 256 inputs gives 8"),
        ("awq", "group_size", 32, "scales has 4 groups; group_size 32 over 256 inputs gives 8"),
        ("gptq", "bits", 8, r"qweight is \[32, 128\], 8-bit gptq needs \[64, 128\]"),
    ],
)
def test_a_config_that_disagrees_with_the_tensors_names_folder_and_module(rtn_checkpoints, tmp_path, fmt, field,
                                                                          value, problem):
    folder = tmp_path / "edited"
    shutil.copytree(rtn_checkpoints[fmt], folder)
    rewrite_json(folder / "config.json", lambda config: config["quantization_config"].update({field: value}))
    with pytest.raises(QuantError, match=f"{re.escape(str(folder))}: model.layers.0.mlp.down_proj: the tensors "
                                         f"disagree with quantization_config \\({problem}\\)"):
        check_checkpoint(folder)


def test_a_float_folder_is_not_a_checkpoint(float_folder):
    with pytest.raises(QuantError, match=f"{re.escape(str(float_folder / 'config.json'))}: quantization_config"
                                         r".quant_method: expected gptq or awq, got None"):
        check_checkpoint(float_folder)


def test_a_gptq_config_over_float_tensors_is_refused(float_folder, tmp_path):
    folder = tmp_path / "float-with-config"
    shutil.copytree(float_folder, folder)
    rewrite_json(folder / "config.json",
                 lambda config: config.update(quantization_config=quantization_config(RTN_SPECS["gptq"])))
    with pytest.raises(QuantError, match="says gptq, but no tensor is a packed .qweight"):
        check_checkpoint(folder)


def test_quantize_config_json_is_read_when_config_has_none(rtn_checkpoints, tmp_path):
    folder = tmp_path / "old-style"
    shutil.copytree(rtn_checkpoints["gptq"], folder)
    rewrite_json(folder / "config.json", lambda config: config.pop("quantization_config"))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": GROUP}))
    assert check_checkpoint(folder) == {"bits": 4, "group_size": GROUP, "quant_method": "gptq"}


def test_check_checkpoint_accepts_three_bit_gptq_shapes(tmp_path):
    folder = tmp_path / "three-bit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": GROUP}}))
    module = "model.layers.0.mlp.down_proj"  # 256 -> 128, shapes as GPTQModel 7.6.0 saves them at 3 bits
    save_file({f"{module}.qweight": torch.zeros(24, 128, dtype=torch.int32),
               f"{module}.qzeros": torch.zeros(4, 12, dtype=torch.int32),
               f"{module}.scales": torch.zeros(4, 128, dtype=torch.float16),
               f"{module}.g_idx": torch.arange(256, dtype=torch.int32) // GROUP}, str(folder / "model.safetensors"))
    assert check_checkpoint(folder)["bits"] == 3


# ---- the cache -------------------------------------------------------------------------------------------

def test_the_cache_builds_once_and_keys_on_the_spec(float_folder, cache):
    spec = RTN_SPECS["gptq"]
    messages = []
    folder, sidecar = quantized_folder(float_folder, spec, None, "cpu", log=messages.append)
    assert sidecar["fresh"] and sidecar["quantize_s"] > 0 and sidecar["device"] == "cpu"
    assert folder.parent == cache / "quant" and folder.name.startswith("gptq-rtn-")
    assert json.loads((folder / "quantbench.json").read_text())["quantize_s"] == sidecar["quantize_s"]
    again, cached = quantized_folder(float_folder, spec, None, "cpu", log=messages.append)
    assert again == folder and not cached["fresh"] and cached["quantize_s"] == sidecar["quantize_s"]
    assert any("cached" in message for message in messages)
    ignored = replace(spec, damp=0.1, calibration="random", desc_act=True)
    assert quantized_folder(float_folder, ignored, None, "cpu", log=quiet)[0] == folder  # rtn ignores these
    other_group = quantized_folder(float_folder, replace(spec, group_size=128), None, "cpu", log=quiet)[0]
    awq = quantized_folder(float_folder, RTN_SPECS["awq"], None, "cpu", log=quiet)[0]
    assert len({folder, other_group, awq}) == 3 and awq.name.startswith("awq-rtn-")
    assert check_checkpoint(other_group)["group_size"] == 128 and check_checkpoint(awq)["quant_method"] == "awq"


def test_round_to_nearest_in_a_gpu_suite_records_the_cpu_it_ran_on(float_folder, cache):
    """RTN packs on the CPU: its quantization memory figure is host memory, not a 0 MiB VRAM peak."""
    spec = replace(RTN_SPECS["gptq"], group_size=32)
    _, sidecar = quantized_folder(float_folder, spec, None, "cuda", log=quiet)
    assert sidecar["fresh"] and sidecar["device"] == "cpu"


def _edit_group(folder):
    rewrite_json(folder / "config.json", lambda config: config["quantization_config"].update(group_size=32))


def _edit_key(folder):
    rewrite_json(folder / "quantbench.json", lambda sidecar: sidecar["key"].update(format=-1))


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize(
    "corrupt",
    [
        _edit_group,
        _edit_key,
        lambda folder: (folder / "model.safetensors").unlink(),
        _truncate,
    ],
    ids=["config-group", "sidecar-key", "weights-deleted", "weights-truncated"],
)
def test_a_corrupted_cached_checkpoint_is_rebuilt(float_folder, corrupt):
    folder, _ = quantized_folder(float_folder, RTN_SPECS["gptq"], None, "cpu", log=quiet)
    corrupt(folder)
    messages = []
    again, sidecar = quantized_folder(float_folder, RTN_SPECS["gptq"], None, "cpu", log=messages.append)
    assert again == folder and sidecar["fresh"]
    assert check_checkpoint(folder)["group_size"] == GROUP
    assert json.loads((folder / "quantbench.json").read_text())["key"]["format"] != -1


def test_a_failed_build_leaves_nothing_under_its_key(float_folder, cache, monkeypatch):
    def half_written(src, spec, out, log):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(quant, "write_rtn", half_written)
        with pytest.raises(RuntimeError, match="disk full"):
            quantized_folder(float_folder, RTN_SPECS["gptq"], None, "cpu", log=quiet)
    assert [p.name for p in (cache / "quant").iterdir() if not p.name.endswith(".lock")] == []
    folder, sidecar = quantized_folder(float_folder, RTN_SPECS["gptq"], None, "cpu", log=quiet)
    assert sidecar["fresh"] and check_checkpoint(folder)


# ---- loading and quantizing with GPTQModel ---------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "backend", "kernel"), [("gptq", "TORCH", "TorchLinear"),
                                                        ("awq", "AWQ_TORCH", "AwqTorchLinear")])
def test_an_rtn_checkpoint_computes_its_dequantized_weights(gptqmodel, rtn_checkpoints, tokenized_folder, fmt,
                                                            backend, kernel):
    folder, ids = rtn_checkpoints[fmt], random_ids()
    model = gptqmodel.GPTQModel.load(str(folder), backend=getattr(gptqmodel.BACKEND, backend), device="cpu",
                                     dtype=torch.bfloat16).model
    assert GPTQMethod({}, "cpu").kernels(model) == [kernel]
    ours, fake = quantized_logits(model, ids), float_logits(tokenized_folder, ids, RTN_SPECS[fmt])
    assert (ours - fake).abs().max().item() < KERNEL_TOLERANCE
    assert (fake - float_logits(tokenized_folder, ids)).abs().max().item() > KERNEL_TOLERANCE  # not trivially met


def test_a_zero_off_by_one_fails_the_logit_check(gptqmodel, tokenized_folder, tmp_path, monkeypatch):
    """The check above can fail: v2 zeros (no v1 minus one) written as a v1 checkpoint shift every weight."""
    def v2_zeros(codes, scales, zeros, group_size):
        return pack_gptq(codes, scales, zeros + 1, group_size)

    monkeypatch.setattr(quant, "pack_gptq", v2_zeros)
    folder = tmp_path / "off-by-one"
    folder.mkdir()
    write_rtn(tokenized_folder, RTN_SPECS["gptq"], folder, log=quiet)
    word_tokenizer().save_pretrained(folder)
    model = gptqmodel.GPTQModel.load(str(folder), backend=gptqmodel.BACKEND.TORCH, device="cpu",
                                     dtype=torch.bfloat16).model
    ids = random_ids()
    wrong = quantized_logits(model, ids) - float_logits(tokenized_folder, ids, RTN_SPECS["gptq"])
    assert wrong.abs().max().item() > KERNEL_TOLERANCE


@pytest.mark.parametrize(("fmt", "backend"), [("gptq", "TORCH"), ("awq", "AWQ_TORCH")])
def test_quantize_gptqmodel_on_random_ids_without_tokenizer(gptqmodel, float_folder, tmp_path, fmt, backend):
    spec = QuantSpec(format=fmt, group_size=GROUP, sym=fmt == "gptq", calibration="random", calibration_samples=8,
                     calibration_tokens=64)
    windows, _ = calibration_ids(spec, None, CONFIG["vocab_size"], seed=0)
    out = tmp_path / "out"
    out.mkdir()  # quantized_folder hands it an existing temporary folder
    here = os.getcwd()
    stats = quantize_gptqmodel(float_folder, spec, windows, out, "cpu", log=quiet)
    assert os.getcwd() == here
    assert stats["quantize_s"] > 0 and stats["modules"] == 7 and stats["mean_loss"] >= 0
    assert not [p for p in tmp_path.iterdir() if "stage" in p.name]  # the placeholder tokenizer's stage is gone
    assert (out / "tokenizer.json").is_file()  # saved with the model: GPTQModel.load opens one
    quant_config = check_checkpoint(out)
    assert (quant_config["quant_method"], quant_config["bits"], quant_config["group_size"]) == (fmt, 4, GROUP)
    model = gptqmodel.GPTQModel.load(str(out), backend=getattr(gptqmodel.BACKEND, backend), device="cpu",
                                     dtype=torch.bfloat16).model
    ids = random_ids()
    ours, reference = quantized_logits(model, ids), float_logits(float_folder, ids)
    assert torch.isfinite(ours).all()
    # 4-bit weights of a random-init model move logits by ~0.1 (RTN: 0.12) on a range of ~0.9; broken weights
    # would move them by about the range
    assert (ours - reference).abs().max().item() < 0.3 * reference.abs().max().item()


# ---- the gptq method -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "kernel"), [("gptq", "TorchLinear"), ("awq", "AwqTorchLinear")])
def test_verify_passes_the_asked_kernel_and_names_another(gptqmodel, rtn_checkpoints, fmt, kernel):
    method = GPTQMethod({"kernel": "torch", "format": fmt, "checkpoint": str(rtn_checkpoints[fmt]),
                         "dtype": "bfloat16"}, "cpu")
    model = method.load("unused: the checkpoint is the user's")
    assert method.kernels(model) == [kernel]
    assert method.quantization_config == quantization_config(RTN_SPECS[fmt])
    method.verify(model, generated=False)
    GPTQMethod({"kernel": "auto", "format": fmt}, "cpu").verify(model, generated=False)
    for other in ("triton", "torch_int8"):
        with pytest.raises(RuntimeError, match=f"kernel '{other}' was asked for, but layers run {kernel}"):
            GPTQMethod({"kernel": other, "format": fmt}, "cpu").verify(model, generated=False)


def test_verify_refuses_a_model_that_was_not_loaded_quantized(gptqmodel):
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    with pytest.raises(RuntimeError, match="no gptqmodel quantized layer in the loaded model"):
        GPTQMethod({"kernel": "torch"}, "cpu").verify(model, generated=False)


def _prepared_and_loaded(folder, has_tokenizer: bool):
    resolved = ResolvedModel("tiny", str(folder), has_tokenizer, False, CONFIG["vocab_size"], {})
    method = GPTQMethod({"quantizer": "rtn", "group_size": GROUP, "kernel": "torch", "dtype": "bfloat16"}, "cpu")
    method.prepared = method.prepare(resolved, 0, quiet)
    return method, method.load(resolved.pretrained)


def test_prepare_builds_the_rtn_checkpoint_once_and_load_runs_the_kernel(gptqmodel, tokenized_folder):
    method, model = _prepared_and_loaded(tokenized_folder, has_tokenizer=True)
    assert method.prepared["fresh"] and method.prepared["quantize_s"] > 0 and "key" not in method.prepared
    assert method.kernels(model) == ["TorchLinear"]
    method.verify(model, generated=False)
    again, _ = _prepared_and_loaded(tokenized_folder, has_tokenizer=True)
    assert not again.prepared["fresh"] and again.prepared["checkpoint"] == method.prepared["checkpoint"]


def test_compiled_mode_runs_the_quantized_model_compiled_with_the_same_tokens(gptqmodel, tokenized_folder):
    """mode = "compiled": static cache + torch.compile around GPTQModel's kernel, what a speed cell runs."""
    eager, model = _prepared_and_loaded(tokenized_folder, has_tokenizer=True)
    rows = [[5, 9, 14, 3, 7, 21, 8, 30]] * 2
    eager.generate(model, rows, 6, None)
    expected, _ = eager.greedy(model, rows, 6)
    compiled = GPTQMethod({**eager.params, "mode": "compiled"}, "cpu")
    compiled.prepared = eager.prepared
    model = compiled.load(str(tokenized_folder))
    with pytest.raises(RuntimeError, match="ran the model uncompiled"):
        compiled.verify(model, generated=True)  # the check can fail: nothing has compiled yet
    compiled.generate(model, rows, 6, None)
    compiled.verify(model, generated=True)
    assert compiled.describe(model)["compiled"] and compiled.describe(model)["params"]["mode"] == "compiled"
    assert compiled.greedy(model, rows, 6)[0] == expected


def test_an_rtn_checkpoint_of_a_model_without_tokenizer_loads(gptqmodel, float_folder):
    """GPTQModel.load always opens a tokenizer: the checkpoint of a synthetic model carries a placeholder."""
    method, model = _prepared_and_loaded(float_folder, has_tokenizer=False)
    assert (Path(method.prepared["checkpoint"]) / "tokenizer.json").is_file()
    assert method.kernels(model) == ["TorchLinear"]
    method.verify(model, generated=False)
