"""Files identified by their content: the sha256 of a file's bytes, worked out once per machine.

A LoRA is part of every job id that runs with it (jobs.expand), and a retrained file keeps its name: only its
content tells it apart. Hashing a 1 GB file takes seconds, and every command expands the jobs (`plan`,
`run`, `report`), so a digest is kept per (path, size, mtime): in the process, and in a small JSON file under
$XDG_CACHE_HOME/wan-sweep/ (default ~/.cache/wan-sweep/) that other commands read. A cache that cannot be
written is only not kept. A leaf module: it imports nothing of the package.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_NAME = "file-digests.json"
_CHUNK = 8 << 20
_DIGESTS: dict[tuple[str, int, int], str] = {}


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wan-sweep" / CACHE_NAME


def content_digest(path: str | os.PathLike) -> str:
    """The sha256 (hex) of the file's bytes, read once per (path, size, mtime) on this machine."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    kept = _read_cache()
    entry = kept.get(key[0])
    if isinstance(entry, dict) and (entry.get("size"), entry.get("mtime_ns")) == key[1:] \
            and isinstance(entry.get("sha256"), str):
        _DIGESTS[key] = entry["sha256"]
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(resolved, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    _DIGESTS[key] = found = digest.hexdigest()
    kept[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": found}
    _write_cache(kept)
    return found


def _read_cache() -> dict:
    try:
        kept = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _write_cache(kept: dict) -> None:
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        partial.write_text(json.dumps(kept, indent=0), encoding="utf-8")
        os.replace(partial, target)  # whole or not at all, when two processes write at once
    except OSError as exc:
        log.debug("file digest cache %s not written: %s", target, exc)
