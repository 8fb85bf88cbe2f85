"""Getting a checkpoint through huggingface_hub (resumable), only when asked."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from .files import CheckpointError, DownloadError, WEIGHT_SUFFIXES
from .layouts import Checkpoint, detect_layout, inspect, verify
from .loras import LoraFileError, describe, read_lora


# --------------------------------------------------------------------------------------------------
# Download (only when asked)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def remove_broken(folder: Path) -> list[str]:
    """Delete the weight files `inspect` finds truncated or unreadable (and the hub client's record of
    them, which would otherwise make it keep them), so a download fetches them again."""
    try:
        checkpoint = inspect(folder)
    except CheckpointError:
        return []
    removed = []
    for problem in checkpoint.problems:
        rel, what = problem.where, problem.what
        path = folder / rel
        if what.startswith("missing") or not path.is_file() or path.suffix not in WEIGHT_SUFFIXES:
            continue
        path.unlink()
        record = folder / ".cache" / "huggingface" / "download" / f"{rel}.metadata"
        if record.is_file():
            record.unlink()
        removed.append(rel)
    return removed


def download(repo_id: str, to: str | os.PathLike, revision: str | None = None,
             say: Callable[[str], None] = print, files: list[str] | None = None) -> Checkpoint | None:
    """`huggingface_hub.snapshot_download(repo_id, local_dir=to)`: resumable (an interrupted file goes
    on where it stopped), files already complete are skipped; then the result is verified. `files`: only
    these files (globs) of the repository, e.g. one LoRA of a repository that holds several."""
    if not REPO_ID.match(repo_id or ""):
        raise CheckpointError(f"`{repo_id}` is not a hub repository id: write owner/name, e.g. "
                              "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    target = Path(to).expanduser()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--to {target} is a file; give a folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError("huggingface_hub is not installed: pip install huggingface_hub "
                              "(it comes with diffusers)") from None
    if target.is_dir():
        for rel in remove_broken(target):
            say(f"removed broken {rel} (it is fetched again)")
    what = f"{', '.join(files)} of {repo_id}" if files else repo_id
    say(f"downloading {what}" + (f"@{revision}" if revision else "") + f" into {target} (resumable) …")
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(target), revision=revision, allow_patterns=files or None)
    except KeyboardInterrupt:
        raise DownloadError(f"download of {repo_id} interrupted; what arrived is kept in {target}: run the "
                            "same command again to resume") from None
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DownloadError(f"download of {repo_id} into {target} failed: {type(exc).__name__}: {reason}\n"
                            "What arrived is kept; run the same command again to resume (check the repository "
                            "id, your network, and `hf auth login` for gated repositories)") from None
    if files:
        found = [path for pattern in files for path in sorted(target.glob(pattern)) if path.is_file()]
        if not found:
            raise DownloadError(f"{repo_id} has no file matching {', '.join(files)}: check the names in the "
                                f"repository's file list (https://huggingface.co/{repo_id}/tree/main)")
        for path in found:
            say(f"  {path}" + (f": {_lora_line(path)}" if path.suffix == ".safetensors" else ""))
        return None
    if detect_layout(target) is None:
        say(f"downloaded {repo_id} into {target}; it is not a checkpoint layout `models status` knows, so it "
            "was not checked")
        return None
    return verify(target)


def _lora_line(path: Path) -> str:
    """What a downloaded .safetensors is, if it is a LoRA (the line `models status` gives it)."""
    try:
        return describe(read_lora(path))
    except LoraFileError:
        return "not a LoRA file"
