"""How far a method's predictions move from the unquantized reference: KL divergence and top-1 agreement.

The reference (the suite's `reference` method, e.g. fp32 on CPU, fp16 on GPU) scores the evaluation ids
once under the perplexity protocol; its top-k log-probabilities per scored position and its per-token NLL
are cached on disk, keyed by model, reference method, protocol and evaluation ids. Every cell then
compares its own log-probabilities at the same positions:

- KL(reference || method) over the reference's top-k tokens plus one bucket holding the rest of the
  probability mass. By the grouping property this never exceeds the full-vocabulary KL, and equals it
  when the reference's mass sits in its top-k (k = 64 by default; llama.cpp keeps all logits instead).
- top-1 agreement: the share of positions where both pick the same most likely token.
- the perplexity ratio PPL(method) / PPL(reference) with its uncertainty from the paired per-token
  NLL differences (as llama.cpp's KL-divergence mode reports it).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOP_K = 64
FORMAT = 2  # bump when what a reference file holds changes (2: numpy arrays in reference.npz)


class ReferenceError(ValueError):
    """A reference file that does not belong to the cell it is offered to."""


@dataclass
class Reference:
    """The reference's view of the evaluation ids: top-k ids and log-probs and NLL per scored position."""

    key: dict[str, Any]
    top_ids: Any  # int64 [positions, k], numpy
    top_logprobs: Any  # float32 [positions, k]
    nll: Any  # float64 [positions]

    def save(self, path: Path) -> None:
        import numpy as np

        from harness.cache import atomic_directory, write_manifest

        with atomic_directory(path) as tmp:
            np.savez(tmp / "reference.npz", top_ids=self.top_ids, top_logprobs=self.top_logprobs, nll=self.nll)
            (tmp / "key.json").write_text(json.dumps(self.key, indent=1, sort_keys=True))
            write_manifest(tmp)

    @staticmethod
    def cached(path: Path) -> bool:
        """A reference is cached at `path` with the bytes it was saved with (a changed one is computed again).

        One saved before manifests is checked by loading it, and its manifest recorded then.
        """
        import numpy as np

        from harness.cache import manifest_problem, write_manifest

        if not (path / "key.json").is_file():
            return False
        problem = manifest_problem(path)
        if problem == "no manifest":
            try:
                json.loads((path / "key.json").read_text())
                np.load(path / "reference.npz", allow_pickle=False).close()
            except (OSError, ValueError):
                return False
            write_manifest(path)
            return True
        return problem is None

    @classmethod
    def load(cls, path: Path, expected_key: dict[str, Any]) -> Reference:
        """Load a cached reference, refusing one made for another model, method or protocol."""
        import numpy as np

        from harness.cache import manifest_problem

        problem = manifest_problem(path)
        if problem not in (None, "no manifest"):
            raise ReferenceError(f"{path}: {problem}; the reference step computes it again")
        stored = json.loads((path / "key.json").read_text())
        if stored != expected_key:
            changed = sorted(k for k in set(stored) | set(expected_key) if stored.get(k) != expected_key.get(k))
            raise ReferenceError(f"{path}: reference made for another {', '.join(changed)}; it is not used")
        with np.load(path / "reference.npz", allow_pickle=False) as data:
            return cls(stored, data["top_ids"], data["top_logprobs"], data["nll"])


def reference_key(model: dict[str, Any], method: dict[str, Any], protocol: dict[str, Any], eval_digest: str,
                  top_k: int = TOP_K) -> dict[str, Any]:
    """What a reference depends on; its hash names the cache folder."""
    return {"format": FORMAT, "model": model, "reference_method": method, "protocol": protocol,
            "eval_ids_digest": eval_digest, "top_k": top_k}


def reference_dir(root: Path, key: dict[str, Any]) -> Path:
    """The cache folder of the reference with this key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / "reference" / digest


class Collector:
    """Receives each window's float32 log-probabilities at its scored positions (see accuracy.perplexity)."""

    def __init__(self, top_k: int = TOP_K) -> None:
        self.top_k = top_k
        self.top_ids: list[Any] = []
        self.top_logprobs: list[Any] = []
        self.nll: list[Any] = []

    def add(self, log_probs: Any, nll: Any) -> None:
        import numpy as np

        k = min(self.top_k, log_probs.shape[-1])
        ids = np.argpartition(-log_probs, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(log_probs, ids, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")  # most likely first: column 0 is the top-1 token
        self.top_ids.append(np.take_along_axis(ids, order, axis=1).astype(np.int64))
        self.top_logprobs.append(np.take_along_axis(values, order, axis=1))
        self.nll.append(nll)

    def reference(self, key: dict[str, Any]) -> Reference:
        import numpy as np

        return Reference(key, np.concatenate(self.top_ids), np.concatenate(self.top_logprobs),
                         np.concatenate(self.nll))


class Comparer:
    """Compares each window's log-probabilities with the reference's at the same positions."""

    def __init__(self, reference: Reference) -> None:
        self.reference = reference
        self.offset = 0
        self.kld: list[Any] = []
        self.agree: list[Any] = []
        self.nll: list[Any] = []

    def add(self, log_probs: Any, nll: Any) -> None:
        import numpy as np

        n = log_probs.shape[0]
        ref_ids = self.reference.top_ids[self.offset:self.offset + n]
        ref_lp = self.reference.top_logprobs[self.offset:self.offset + n].astype(np.float64)
        if ref_ids.shape[0] != n:
            raise ReferenceError(f"the reference covers {self.reference.top_ids.shape[0]} positions; "
                                 f"this run scored more")
        self.offset += n
        lp = np.take_along_axis(log_probs, ref_ids, axis=1).astype(np.float64)
        p = np.exp(ref_lp)
        kld = (p * (ref_lp - lp)).sum(axis=1)
        rest_p = np.maximum(1 - p.sum(axis=1), 1e-12)
        rest_q = np.maximum(1 - np.exp(lp).sum(axis=1), 1e-12)
        kld = kld + rest_p * (np.log(rest_p) - np.log(rest_q))
        self.kld.append(np.maximum(kld, 0))
        self.agree.append(log_probs.argmax(axis=1) == ref_ids[:, 0])
        self.nll.append(nll)

    def figures(self) -> dict[str, float]:
        """kld_mean, kld_p99, kld_max, top1_agreement, ppl_ratio and the ratio's standard error."""
        import numpy as np

        if self.offset != self.reference.top_ids.shape[0]:
            raise ReferenceError(f"this run scored {self.offset} positions, the reference "
                                 f"{self.reference.top_ids.shape[0]}")
        kld = np.concatenate(self.kld)
        diff = np.concatenate(self.nll).astype(np.float64) - self.reference.nll.astype(np.float64)
        n = diff.size
        ratio = math.exp(float(diff.mean()))
        stderr = ratio * (float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0)
        return {
            "kld_mean": float(kld.mean()),
            "kld_p99": float(np.quantile(kld, 0.99)),
            "kld_max": float(kld.max()),
            "top1_agreement": float(np.concatenate(self.agree).mean()),
            "ppl_ratio": ratio,
            "ppl_ratio_stderr": stderr,
        }
