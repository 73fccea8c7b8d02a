"""Where built artefacts live on disk, and how they are written without ever leaving half a file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The cache folder: `$QUANTBENCH_CACHE`, else `~/.cache/quantbench`."""
    root = Path(os.environ.get("QUANTBENCH_CACHE") or Path.home() / ".cache" / "quantbench")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing); pytest-xdist workers queue here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a stored baseline is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime, ctime, inode) in the cache so big files hash
    once.

    Any write to a file, and any reset of its mtime (os.utime), moves its ctime, which no user can set back:
    a file overwritten in place with its size and mtime restored is hashed again. Entries of an older index
    (size and mtime only) no longer match and are hashed again too.
    """
    path = Path(path).resolve()
    stat = path.stat()
    index = cache_root() / "file-hashes.json"
    entry_key = str(path)
    fingerprint = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    with file_lock(index.with_suffix(".lock")):
        known = json.loads(index.read_text()) if index.is_file() else {}
        entry = known.get(entry_key)
        if entry and entry["fingerprint"] == fingerprint:
            return entry["sha256"]
    digest = sha256_file(path)
    with file_lock(index.with_suffix(".lock")):
        known = json.loads(index.read_text()) if index.is_file() else {}
        known[entry_key] = {"fingerprint": fingerprint, "sha256": digest}
        atomic_write_text(index, json.dumps(known, indent=1, sort_keys=True))
    return digest


MANIFEST = "quantbench-manifest.json"


def write_manifest(folder: Path) -> None:
    """Record the sha256 of every file in a built cache folder, in its manifest, to check before each use."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))


def manifest_problem(folder: Path) -> str | None:
    """Why a cache folder's files differ from its manifest (None: they match); "no manifest" for a folder
    built before manifests, which a caller checks some other way and then records (`write_manifest`)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} is {path.stat().st_size} bytes, {entry['size']} when built"
        if file_sha256(path) != entry["sha256"]:
            return f"the sha256 of {name} differs from the one recorded when it was built"
    return None
