"""KV-cache quantization as a method parameter (harness/methods/kvcache.py), and the torchao and quanto checks that
fail a cell whose layers were not quantized as asked, on the synthetic two-layer model."""

import pytest
import torch

from harness.config import MatrixError, ModelSpec
from harness.methods import method_class
from harness.methods.base import importable
from harness.models import prompt_ids, resolve

TINY = ModelSpec(name="tiny", source="synthetic", arch="tiny-test", seed=0)
needs_quanto = pytest.mark.skipif(not importable("optimum.quanto"), reason="optimum-quanto is not installed")
needs_torchao = pytest.mark.skipif(not importable("torchao"), reason="torchao is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUANTBENCH_CACHE", str(tmp_path_factory.mktemp("kv-cache")))
        yield resolve(TINY, log=lambda message: None)


def test_a_quantized_cache_with_compiled_mode_is_refused_naming_the_field():
    with pytest.raises(MatrixError, match=r"methods\.x\.kv_cache: .*mode = 'eager'"):
        method_class("torch").validate({"kv_cache": "quanto-int4", "mode": "compiled"}, "methods.x")
    with pytest.raises(MatrixError, match=r"methods\.x\.kv_residual_length: must be positive"):
        method_class("torch").validate({"kv_cache": "quanto-int4", "kv_residual_length": 0}, "methods.x")
    with pytest.raises(MatrixError, match=r"methods\.x\.kv_cache: expected one of"):
        method_class("bnb").validate({"kv_cache": "fp8"}, "methods.x")


def test_a_full_precision_cache_changes_nothing():
    method = method_class("torch")({"dtype": "float32"}, "cpu")
    assert method.generate_kwargs() == {} and method.device_timing_unavailable() is None


@needs_quanto
def test_generation_and_scoring_go_through_the_quantized_cache(tiny):
    from transformers import AutoModelForCausalLM

    plain = method_class("torch")({"dtype": "float32"}, "cpu")
    quantized = method_class("torch")({"dtype": "float32", "kv_cache": "quanto-int2", "kv_group_size": 32,
                                       "kv_residual_length": 4}, "cpu")
    quantized.check_available()
    model = AutoModelForCausalLM.from_pretrained(tiny.pretrained, dtype=torch.float32).eval()
    rows = prompt_ids(tiny, None, 2, 24, seed=0)
    quantized.generate(model, rows, 6, None)
    quantized.verify(model, generated=True)
    cache = quantized.describe(model)["kv_cache"]
    # tiny-test: 2 layers, 2 key-value heads of 128 / 4 = 32 values; 24 + 6 - 1 tokens in the cache; float32
    assert cache["tokens"] == 29 and cache["layers"] == 2
    assert cache["full_precision_bytes"] == 2 * 2 * 2 * 2 * 29 * 32 * 4
    assert 0 < cache["quantized_bytes"] < cache["full_precision_bytes"] / 8  # 2-bit data plus scales and shifts
    assert cache["ratio"] < 1
    assert "device timer" in quantized.device_timing_unavailable()

    ids = rows[0]
    through_cache = quantized.logits(model, ids)
    full = plain.logits(model, ids)
    assert through_cache.shape == full.shape
    # the first position is the prefill, which attends over its own full-precision keys; later ones read 2-bit ones
    assert torch.allclose(through_cache[0], full[0], atol=1e-4)
    assert not torch.allclose(through_cache[-1], full[-1], atol=1e-3)


@needs_torchao
def test_torchao_fails_a_cell_whose_layers_it_left_unquantized(tiny):
    # Int4WeightOnlyConfig leaves a weight whose width its groups do not divide in full precision, with a log line
    method = method_class("torchao")({"quant": "int8-weight", "dtype": "float32"}, "cpu")
    model = method.load(tiny.pretrained)
    method.verify(model, generated=False)
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.dequantize(), requires_grad=False)
    with pytest.raises(RuntimeError, match="left 1 linear layer.*down_proj"):
        method.verify(model, generated=False)


@needs_torchao
def test_torchao_skips_what_has_no_cpu_kernel_with_the_reason():
    from harness.methods import MethodUnavailable

    for quant, reason in (("int4-weight", "mslk"), ("float8-dynamic", "compute capability")):
        with pytest.raises(MethodUnavailable, match=reason):
            method_class("torchao")({"quant": quant}, "cpu").check_available()
    with pytest.raises(MatrixError, match=r"methods\.x\.dtype: int4-weight .* bfloat16"):
        method_class("torchao").validate({"quant": "int4-weight", "dtype": "float32"}, "methods.x")
