"""KV-cache quantization through transformers' quantized cache, a parameter any transformers-run method composes with.

`generate(cache_implementation="quantized", cache_config=...)` (transformers 5.17, `QuantizedLayer` in its
cache_utils.py) quantizes the prompt's keys and values at the prefill and keeps the newest tokens in a
full-precision residual; once the residual holds `residual_length` tokens, everything is quantized again. Each
decode step dequantizes the whole cache before attention, so the cache takes less memory at rest and costs
speed: its speed is not that of a fused KV-cache kernel. Backends: optimum-quanto (2 and 4 bit) and HQQ (1-8 bit).

A method that runs transformers models puts `**KV_PARAMS` in its PARAMS and derives from `KVCacheMixin` before
its base class. The mixin sends generation through the quantized cache, scores perplexity and divergence
through it (token by token, as decoding reads it: a forward over a whole window never reads the cache), records
the cache's bytes, and says why the device timer (a static full-precision cache) does not apply.
"""

from __future__ import annotations

from typing import Any

from harness.config import MatrixError
from harness.methods.base import MethodUnavailable, Param

# name -> (transformers' cache backend, bits, the module that backend imports)
KV_CACHES: dict[str, tuple[str, int, str] | None] = {
    "none": None,
    "quanto-int4": ("quanto", 4, "optimum.quanto"),
    "quanto-int2": ("quanto", 2, "optimum.quanto"),
    "hqq-int8": ("hqq", 8, "hqq"),
    "hqq-int4": ("hqq", 4, "hqq"),
}

KV_PARAMS: dict[str, Param] = {
    "kv_cache": Param(str, "none", "quantize the KV cache: none (full precision), quanto-int4, quanto-int2 "
                      "(optimum-quanto), hqq-int8, hqq-int4 (HQQ); through transformers' quantized cache",
                      tuple(KV_CACHES)),
    "kv_group_size": Param(int, 64, "quantized cache: elements per quantization group"),
    "kv_residual_length": Param(int, 128, "quantized cache: newest tokens kept in full precision before "
                                "the whole cache is quantized again"),
}


class KVCacheMixin:
    """Generation, scoring and description through a quantized KV cache when `kv_cache` is not "none"."""

    params: dict[str, Any]
    device: str

    @classmethod
    def validate(cls, params: dict[str, Any], where: str) -> None:
        super().validate(params, where)  # type: ignore[misc]
        if params.get("kv_cache", "none") != "none" and params.get("mode") == "compiled":
            raise MatrixError(f"{where}.kv_cache: a quantized cache cannot run with mode = 'compiled' (the "
                              "compiled mode decodes over a static full-precision cache); use mode = 'eager'")
        for name in ("kv_group_size", "kv_residual_length"):
            if name in params and isinstance(params[name], int) and params[name] < 1:
                raise MatrixError(f"{where}.{name}: must be positive, got {params[name]!r}")

    @property
    def kv_cache(self) -> tuple[str, int, str] | None:
        """(backend, bits, module) of the quantized cache, or None for a full-precision one."""
        return KV_CACHES[self.params["kv_cache"]]

    def check_available(self) -> None:
        super().check_available()  # type: ignore[misc]
        from harness.methods.base import importable

        if self.kv_cache is not None and not importable(self.kv_cache[2]):
            raise MethodUnavailable(f"kv_cache {self.params['kv_cache']!r} needs {self.kv_cache[2]}, which is "
                                    "not installed (install quantbench's 'quanto' extra)")

    def cache_config(self) -> dict[str, Any] | None:
        """transformers' `cache_config` of the quantized cache, or None."""
        if self.kv_cache is None:
            return None
        backend, bits, _ = self.kv_cache
        return {"backend": backend, "nbits": bits, "q_group_size": self.params["kv_group_size"],
                "residual_length": self.params["kv_residual_length"]}

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs = super().generate_kwargs()  # type: ignore[misc]
        if self.kv_cache is not None:
            kwargs.update(cache_implementation="quantized", cache_config=self.cache_config())
        return kwargs

    def generate(self, model: Any, rows: list[list[int]], new_tokens: int, streamer: Any) -> None:
        if self.kv_cache is None:
            super().generate(model, rows, new_tokens, streamer)  # type: ignore[misc]
            return
        import torch

        input_ids = torch.tensor(rows, dtype=torch.long, device=model.device)
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
        kwargs = self.generate_kwargs()
        if getattr(self, "inject_delay_ms", 0):
            from harness.methods.base import _delay_processor

            kwargs["logits_processor"] = _delay_processor(self.inject_delay_ms)  # type: ignore[attr-defined]
        with self.no_autograd():  # type: ignore[attr-defined]
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=pad if pad is not None else 0, streamer=streamer,
                                    return_dict_in_generate=True, **kwargs)
        if output.sequences.shape[1] != input_ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate() returned {output.sequences.shape[1] - input_ids.shape[1]} new tokens, "
                               f"asked for {new_tokens}")
        self.last_cache = cache_bytes(output.past_key_values, len(rows), model.config, model.dtype.itemsize)

    def logits(self, model: Any, ids: list[int]) -> Any:
        """Float32 logits of one sequence read through the quantized cache: the first id is the prefill, every
        later one a decode step, so each position attends over the cache as generation would."""
        if self.kv_cache is None:
            return super().logits(model, ids)  # type: ignore[misc]
        import torch
        from transformers import QuantizedCache

        backend, bits, _ = self.kv_cache
        cache = QuantizedCache(backend=backend, config=model.config, nbits=bits,
                               q_group_size=self.params["kv_group_size"],
                               residual_length=self.params["kv_residual_length"])
        out = []
        with self.no_autograd():  # type: ignore[attr-defined]
            for position, token in enumerate(ids):
                step = model(torch.tensor([[token]], dtype=torch.long, device=model.device), past_key_values=cache,
                             use_cache=True, cache_position=torch.tensor([position], device=model.device))
                out.append(step.logits[0, -1].float())
        return torch.stack(out)

    def device_timing_unavailable(self) -> str | None:
        if self.kv_cache is not None:
            return ("the device timer decodes over a static full-precision cache: it would not time the "
                    "quantized cache, which dequantizes itself with host-driven concatenations at every step")
        return super().device_timing_unavailable()  # type: ignore[misc]

    def verify(self, model: Any, generated: bool) -> None:
        super().verify(model, generated)  # type: ignore[misc]
        if generated and self.kv_cache is not None and getattr(self, "last_cache", {}).get("quantized_bytes", 0) <= 0:
            raise RuntimeError("kv_cache was asked for, but generate() left no quantized cache")

    def describe(self, model: Any) -> dict[str, Any]:
        out = super().describe(model)  # type: ignore[misc]
        if self.kv_cache is not None:
            out["kv_cache"] = {"cache_config": self.cache_config(),
                               "accuracy_through": "token-by-token decode through the quantized cache",
                               **getattr(self, "last_cache", {})}
        return out


def _tensor_bytes(value: Any, seen: set[tuple[int, int]]) -> int:
    """Bytes held by the tensors in `value` (tensors, tensor subclasses such as quanto's, dicts, lists)."""
    import torch

    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, name), seen) for name in names)
    key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
    if key in seen:
        return 0
    seen.add(key)
    return value.untyped_storage().nbytes()


def cache_bytes(cache: Any, rows: int, config: Any, element_size: int) -> dict[str, Any]:
    """What a finished quantized cache holds: bytes of its quantized part and of its full-precision residual,
    the tokens it covers, and the bytes a full-precision cache of as many tokens would hold (`element_size`
    bytes per value: the model's activation dtype), for `rows` rows of a model with `config`."""
    seen: set[tuple[int, int]] = set()
    quantized = residual = tokens = 0
    layers = [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "is_initialized", False)]
    for layer in layers:
        quantized += _tensor_bytes([getattr(layer, "_quantized_keys", None),
                                    getattr(layer, "_quantized_values", None)], seen)
        residual += _tensor_bytes([getattr(layer, "keys", None), getattr(layer, "values", None)], seen)
        tokens = max(tokens, int(layer.get_seq_length()))
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full_precision = 2 * len(layers) * rows * heads * tokens * head_dim * element_size
    return {"quantized_bytes": quantized, "residual_bytes": residual, "tokens": tokens, "layers": len(layers),
            "full_precision_bytes": full_precision,
            "ratio": (quantized + residual) / full_precision if full_precision else None}
