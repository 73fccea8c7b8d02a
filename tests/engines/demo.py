"""A demonstration engine: the model's embedding and output head as a bigram model, decoded in numpy.

It is the worked example of docs/adding-an-engine.md: one file, one registry line (tests/test_engine_contract.py
registers it as backend "demo"), held to the contract every backend passes. It has a runtime of its own,
`DEMO`: like llama.cpp's it keeps torch out of the measured process, and it declares which exception of its
own means the engine ran out of memory, so the worker fails only the batch sizes that did.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.methods.base import Method, MethodUnavailable, Param
from harness.runtimes import NATIVE


class DemoOutOfMemory(MemoryError):
    """The demo's allocator cannot hold the batch: what an engine's own allocation failure looks like."""


DEMO = dataclasses.replace(NATIVE, name="demo", out_of_memory=lambda: (DemoOutOfMemory,))


@dataclass
class DemoModel:
    """The loaded weights, float32: logits of a token are `head @ embed[token]`."""

    embed: Any  # [vocab, hidden]
    head: Any  # [vocab, hidden]

    @property
    def vocab(self) -> int:
        return self.head.shape[0]

    def next_logits(self, tokens: Any) -> Any:
        """Float32 logits [len(tokens), vocab] of the token after each of `tokens`."""
        return self.embed[np.asarray(tokens)] @ self.head.T


class DemoMethod(Method):
    """A zero-layer model (embedding, then output head) decoded greedily by numpy on the host."""

    NAME = "demo"
    MARKER = "demo"
    RUNTIME = DEMO
    PARAMS = {
        "memory_rows": Param(int, 0, "rows the demo's allocator holds (0: any number); a larger batch runs out "
                             "of memory, as a too-large KV cache would"),
    }

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        return ("numpy", "safetensors")

    def check_available(self) -> None:
        super().check_available()
        if self.device != "cpu":
            raise MethodUnavailable("the demo engine runs on the host only")

    def load(self, pretrained: str) -> DemoModel:
        from safetensors.numpy import load_file

        tensors: dict[str, Any] = {}
        for path in sorted(Path(pretrained).glob("*.safetensors")):
            tensors.update(load_file(path))
        embed = tensors["model.embed_tokens.weight"].astype(np.float32)
        head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).astype(np.float32)
        vocab = json.loads((Path(pretrained) / "config.json").read_text())["vocab_size"]
        if head.shape[0] != vocab:
            raise RuntimeError(f"{pretrained}: output head has {head.shape[0]} rows, config.json says vocab_size "
                               f"{vocab}")
        return DemoModel(embed=embed, head=head)

    def _allocate(self, rows: int) -> None:
        limit = self.params["memory_rows"]
        if limit and rows > limit:
            raise DemoOutOfMemory(f"demo engine out of memory: {rows} rows asked, {limit} fit")

    def generate(self, model: DemoModel, rows: list[list[int]], new_tokens: int, streamer: Any) -> None:
        self._allocate(len(rows))
        hand_over = streamer.put if streamer is not None else lambda ids: None  # no streamer while warming up
        last = np.asarray([row[-1] for row in rows])
        hand_over(rows)  # the prompt first, as transformers' generate() hands it over
        for _ in range(new_tokens):
            last = model.next_logits(last).argmax(axis=1)
            if self.inject_delay_ms:
                time.sleep(self.inject_delay_ms / 1000)
            hand_over(last)

    def greedy(self, model: DemoModel, rows: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Any]:
        self._allocate(len(rows))
        last = np.asarray([row[-1] for row in rows])
        ids, scores = [], []
        for _ in range(new_tokens):
            logits = model.next_logits(last)
            last = logits.argmax(axis=1)
            ids.append(last)
            scores.append(logits)
        return np.stack(ids, axis=1).tolist(), np.stack(scores, axis=1)

    def logits(self, model: DemoModel, ids: list[int]) -> Any:
        return model.next_logits(ids)

    def weights_bytes(self, model: DemoModel) -> int:
        return model.embed.nbytes + model.head.nbytes

    def describe(self, model: DemoModel) -> dict[str, Any]:
        return {**super().describe(model), "vocab": model.vocab, "runtime": self.RUNTIME.name}
