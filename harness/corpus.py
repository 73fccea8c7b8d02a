"""The text the embedded model learns from: the help topics every Python install carries.

`pydoc_data.topics.topics` maps a topic name ("assert", "if", "typesseq", ...) to the text `help()` shows.
It ships with the standard library, so the corpus is on every machine and needs no download; it does change
between Python releases, which is why caches key on `corpus_sha256()`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pydoc_data.topics import topics

HELDOUT_EVERY = 10
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Split:
    """The corpus divided into training text and held-out text, with the names of the held-out topics."""

    train: str
    heldout: str
    heldout_names: tuple[str, ...]


def documents() -> list[tuple[str, str]]:
    """Every (topic name, text) pair, sorted by name."""
    return sorted(topics.items())


def split() -> Split:
    """Divide the corpus deterministically into training and held-out text.

    Documents are taken in `documents()` order; the one at index i is held out when
    i % 10 == 9 (every 10th document), the rest are training text. Each side joins its documents with a
    blank line ("\\n\\n"), so no held-out document is ever part of the training text.
    """
    train: list[str] = []
    heldout: list[tuple[str, str]] = []
    for index, (name, text) in enumerate(documents()):
        if index % HELDOUT_EVERY == HELDOUT_EVERY - 1:
            heldout.append((name, text))
        else:
            train.append(text)
    return Split(
        train=DOCUMENT_SEPARATOR.join(train),
        heldout=DOCUMENT_SEPARATOR.join(text for _, text in heldout),
        heldout_names=tuple(name for name, _ in heldout),
    )


def corpus_sha256() -> str:
    """Hex SHA-256 of the whole corpus, names and texts, so that anything built from it can key on it."""
    digest = hashlib.sha256()
    for name, text in documents():
        # NUL never occurs in the topics, so it separates fields without ambiguity.
        digest.update(name.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
    return digest.hexdigest()
